"""FID and KID: streaming float64 feature statistics, Fréchet distance, kernel distance.

Conventions
-----------
* A **feature extractor** is any callable ``extractor(images) -> features`` taking a uint8
  tensor ``[B, 3, H, W]`` (values 0..255, any H, W) and returning ``[B, F]`` features (tensor or
  array, any float dtype). It should carry a ``name`` attribute (wrap plain functions with
  :class:`NamedExtractor`); the name is stated in every result and is part of cache keys.
  The default is :class:`CleanFIDInception`, clean-fid's Inception-v3 in its ``"clean"``
  mode (PIL bicubic resize to 299x299 in float, then the TF-ported Inception pool features).
* Images reach the extractor through :func:`hessdiff.eval.images.as_uint8_image` (float images
  in ``[-1, 1]`` are quantised with ``to_uint8``), exactly as if they had been saved as PNG.
* :class:`FeatureStats` accumulates the count, mean and scatter matrix in float64 with the
  pairwise (Chan et al.) update, so batches and processes can be merged in any order;
  ``cov`` is the unbiased covariance (divisor ``n - 1``), as ``numpy.cov``.
* FID is ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2})`` where
  ``tr((S1 S2)^{1/2})`` is computed as the nuclear norm (sum of singular values) of
  ``S1^{1/2} S2^{1/2}`` with symmetric square roots from ``eigh`` (negative round-off
  eigenvalues clipped to 0). This equals the sum of square roots of the eigenvalues of
  ``S1 S2`` without forming a non-symmetric product.
* KID is clean-fid's estimator: cubic polynomial kernel ``k(x, y) = (x.y / F + 1)^3``,
  unbiased MMD^2 within sets, averaged over ``num_subsets`` random subsets of size
  ``m = min(n1, n2, max_subset_size)`` drawn without replacement (from a seeded generator).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from hessdiff.eval.images import as_uint8_image
from hessdiff.eval.metrics.weights import MissingWeightsError, default_cache_dir, ensure_weights_file
from hessdiff.utils.files import atomic_write

__all__ = [
    "INCEPTION_FILENAME",
    "INCEPTION_URL",
    "CleanFIDInception",
    "DistributionMetrics",
    "FeatureExtractor",
    "FeatureStats",
    "NamedExtractor",
    "extractor_name",
    "fid_from_stats",
    "folder_feature_stats",
    "frechet_distance",
    "inception_weights_path",
    "kernel_inception_distance",
]

INCEPTION_FILENAME = "inception-2015-12-05.pt"
"""File name of the Inception-v3 TorchScript weights used by clean-fid (and StyleGAN2-ADA)."""
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
"""Where clean-fid downloads :data:`INCEPTION_FILENAME` from."""

STATS_FORMAT = "hessdiff-feature-stats-v1"
PREPROCESSING = "hessdiff.eval.images.to_uint8/v1"
"""Identifies the preprocessing path in cache keys; change it if the path ever changes. (The quantisation is
now :func:`hessdiff.utils.images.to_uint8`, unchanged; the tag keeps its old module name so that existing
caches stay valid.)"""


# ----------------------------------------------------------------------------------------------
# Streaming statistics
# ----------------------------------------------------------------------------------------------


def _as_features(features: Any, what: str = "features") -> torch.Tensor:
    t = torch.as_tensor(features).detach()
    if t.ndim != 2:
        raise ValueError(f"{what}: expected a [B, F] array of features, got shape {tuple(t.shape)}")
    if not (torch.is_floating_point(t) or t.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"{what}: expected real-valued features, got dtype {t.dtype}")
    t = t.to(torch.float64) if t.device.type != "mps" else t.cpu().to(torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{what}: features contain NaN or infinite values")
    return t


class FeatureStats:
    """Running count, mean and scatter matrix of feature vectors, in float64.

    ``update(f)`` adds a batch ``[B, F]``; ``merge(other)`` adds another accumulator (e.g. one per
    process). Both use the pairwise update of Chan, Golub and LeVeque, so the result does not
    depend on how the data were split (up to float64 round-off).

    Args:
        dim: expected feature dimension (``None``: taken from the first batch).
        keep_features: also keep every feature row (float32, on CPU); needed for KID.

    Attributes:
        n: number of feature vectors seen.
    """

    def __init__(self, dim: int | None = None, *, keep_features: bool = False) -> None:
        self.dim = dim
        self.keep_features = keep_features
        self.n = 0
        self._mean: torch.Tensor | None = None
        self._m2: torch.Tensor | None = None
        self._kept: list[torch.Tensor] = []

    def _combine(self, n_b: int, mean_b: torch.Tensor, m2_b: torch.Tensor) -> None:
        if self.dim is None:
            self.dim = int(mean_b.shape[0])
        if mean_b.shape[0] != self.dim:
            raise ValueError(f"feature dimension mismatch: statistics have {self.dim}, got {mean_b.shape[0]}")
        if self.n == 0:
            self._mean, self._m2, self.n = mean_b.clone(), m2_b.clone(), n_b
            return
        mean_b, m2_b = mean_b.to(self._mean.device), m2_b.to(self._m2.device)
        n = self.n + n_b
        delta = mean_b - self._mean
        self._mean = self._mean + delta * (n_b / n)
        self._m2 = self._m2 + m2_b + torch.outer(delta, delta) * (self.n * n_b / n)
        self.n = n

    def update(self, features: Any) -> FeatureStats:
        """Add a batch of features ``[B, F]`` (tensor or array); returns ``self``."""
        f = _as_features(features)
        if f.shape[0] == 0:
            return self
        mean_b = f.mean(0)
        c = f - mean_b
        self._combine(f.shape[0], mean_b, c.T @ c)
        if self.keep_features:
            self._kept.append(f.to("cpu", torch.float32))
        return self

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Add the data summarised by ``other``; returns ``self``.

        Kept features are concatenated when both keep them; otherwise this object stops
        keeping features (it can no longer provide all of them).
        """
        if not isinstance(other, FeatureStats):
            raise TypeError(f"can only merge FeatureStats, got {type(other).__name__}")
        if other.n == 0:
            return self
        if self.keep_features and other.keep_features:
            self._kept.extend(other._kept)
        elif self.keep_features:
            self.keep_features, self._kept = False, []
        self._combine(other.n, other._mean, other._m2)
        return self

    @property
    def mean(self) -> torch.Tensor:
        """Mean feature vector ``[F]`` (float64)."""
        if self.n == 0:
            raise ValueError("no features have been added")
        return self._mean

    @property
    def cov(self) -> torch.Tensor:
        """Unbiased covariance ``[F, F]`` (float64, divisor ``n - 1``); needs ``n >= 2``."""
        if self.n < 2:
            raise ValueError(f"the covariance needs at least 2 feature vectors, have {self.n}")
        return self._m2 / (self.n - 1)

    @property
    def features(self) -> torch.Tensor:
        """All kept features ``[n, F]`` (float32, CPU), in the order added."""
        if not self.keep_features:
            raise ValueError("features were not kept; create FeatureStats(keep_features=True) (needed for KID)")
        if not self._kept:
            return torch.empty(0, self.dim or 0)
        return torch.cat(self._kept)

    # ---- persistence -------------------------------------------------------------------------

    def save(self, path: str | os.PathLike, meta: dict | None = None) -> Path:
        """Write the statistics to an ``.npz`` file atomically (:func:`hessdiff.utils.files.atomic_write`).

        Stored arrays: ``n``, ``mean``, ``m2`` (scatter matrix), ``mu`` and ``sigma`` (as in
        clean-fid's files), ``features`` when kept, and ``meta`` (a JSON string).
        """
        if self.n < 2:
            raise ValueError(f"refusing to save statistics of {self.n} feature vector(s)")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {
            "format": np.array(STATS_FORMAT),
            "n": np.array(self.n, dtype=np.int64),
            "mean": self.mean.cpu().numpy(),
            "m2": self._m2.cpu().numpy(),
            "mu": self.mean.cpu().numpy(),
            "sigma": self.cov.cpu().numpy(),
            "meta": np.array(json.dumps(meta or {}, sort_keys=True)),
        }
        if self.keep_features:
            arrays["features"] = self.features.numpy()
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

        return atomic_write(path, write, overwrite=True)

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStats:
        """Read statistics written by :meth:`save`.

        clean-fid's reference files (arrays ``mu`` and ``sigma`` only) cannot be loaded here
        because their sample count is unknown; pass ``(mu, sigma)`` to :func:`fid_from_stats`.
        """
        with np.load(path, allow_pickle=False) as data:
            if "format" not in data or str(data["format"]) != STATS_FORMAT:
                raise ValueError(
                    f"{path} is not a hessdiff feature-statistics file (for clean-fid mu/sigma files "
                    "use fid_from_stats with a (mu, sigma) pair)"
                )
            stats = cls(int(data["mean"].shape[0]), keep_features="features" in data)
            stats.n = int(data["n"])
            stats._mean = torch.from_numpy(np.array(data["mean"], dtype=np.float64))
            stats._m2 = torch.from_numpy(np.array(data["m2"], dtype=np.float64))
            if "features" in data:
                stats._kept = [torch.from_numpy(np.array(data["features"], dtype=np.float32))]
        return stats

    def __repr__(self) -> str:
        return f"FeatureStats(n={self.n}, dim={self.dim}, keep_features={self.keep_features})"


# ----------------------------------------------------------------------------------------------
# Distances
# ----------------------------------------------------------------------------------------------


def _as_f64_numpy(a: Any) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (negative round-off eigenvalues -> 0)."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    ``|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 * sum(svdvals(sigma1^{1/2} sigma2^{1/2}))``, clamped
    at 0 (rounding would make it slightly negative for equal Gaussians).

    Raises:
        ValueError: shapes do not match, matrices are not square, or values are not finite.
    """
    mu1, mu2 = _as_f64_numpy(mu1).reshape(-1), _as_f64_numpy(mu2).reshape(-1)
    s1, s2 = np.atleast_2d(_as_f64_numpy(sigma1)), np.atleast_2d(_as_f64_numpy(sigma2))
    d = mu1.shape[0]
    if mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(
            f"shape mismatch: mu1 {mu1.shape}, sigma1 {s1.shape}, mu2 {mu2.shape}, sigma2 {s2.shape}"
        )
    for name, a in (("mu1", mu1), ("mu2", mu2), ("sigma1", s1), ("sigma2", s2)):
        if not np.isfinite(a).all():
            raise ValueError(f"{name} contains NaN or infinite values")
    diff = mu1 - mu2
    tr_sqrt = np.linalg.svd(_sqrt_psd(s1) @ _sqrt_psd(s2), compute_uv=False).sum()
    # a distance: rounding makes it slightly negative for (nearly) equal Gaussians, e.g. -2.3e-13
    return max(0.0, float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt))


def _moments(s: FeatureStats | tuple[Any, Any]) -> tuple[Any, Any]:
    if isinstance(s, FeatureStats):
        return s.mean, s.cov
    if isinstance(s, tuple | list) and len(s) == 2:
        return s[0], s[1]
    raise TypeError(f"expected FeatureStats or a (mu, sigma) pair, got {type(s).__name__}")


def fid_from_stats(a: FeatureStats | tuple[Any, Any], b: FeatureStats | tuple[Any, Any]) -> float:
    """FID between two sets given as :class:`FeatureStats` or ``(mu, sigma)`` pairs."""
    return frechet_distance(*_moments(a), *_moments(b))


def kernel_inception_distance(
    features1: Any,
    features2: Any,
    *,
    num_subsets: int = 100,
    max_subset_size: int = 1000,
    generator: torch.Generator | None = None,
    seed: int = 0,
) -> tuple[float, float]:
    """KID (clean-fid's estimator) between two feature sets ``[n1, F]`` and ``[n2, F]``.

    For each of ``num_subsets`` subsets, ``m = min(n1, n2, max_subset_size)`` rows are drawn
    without replacement from each set and
    ``(sum_{i!=j} k(x_i, x_j) + sum_{i!=j} k(y_i, y_j)) / (m (m - 1)) - 2 sum_{i,j} k(x_i, y_j) / m^2``
    is computed in float64 with ``k(x, y) = (x.y / F + 1)^3``.

    Args:
        generator: random source for the subsets; if ``None``, a CPU generator seeded with ``seed``.

    Returns:
        ``(mean, std)`` over subsets (``std`` uses divisor ``num_subsets``; 0 for one subset).
    """
    x_all, y_all = _as_features(features1, "features1"), _as_features(features2, "features2")
    if x_all.shape[1] != y_all.shape[1]:
        raise ValueError(f"feature dimensions differ: {x_all.shape[1]} vs {y_all.shape[1]}")
    if num_subsets < 1:
        raise ValueError(f"num_subsets must be >= 1, got {num_subsets}")
    m = min(x_all.shape[0], y_all.shape[0], max_subset_size)
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples per set, have {x_all.shape[0]} and {y_all.shape[0]}")
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    f = x_all.shape[1]
    values = torch.empty(num_subsets, dtype=torch.float64)
    for s in range(num_subsets):
        x = x_all[torch.randperm(x_all.shape[0], generator=generator)[:m].to(x_all.device)]
        y = y_all[torch.randperm(y_all.shape[0], generator=generator)[:m].to(y_all.device)]
        kxx = (x @ x.T / f + 1) ** 3
        kyy = (y @ y.T / f + 1) ** 3
        kxy = (x @ y.T / f + 1) ** 3
        within = (kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
        values[s] = (within - 2 * kxy.sum() / m**2).cpu()
    return float(values.mean()), float(values.std(unbiased=False))


# ----------------------------------------------------------------------------------------------
# Feature extractors
# ----------------------------------------------------------------------------------------------


@runtime_checkable
class FeatureExtractor(Protocol):
    """``extractor(uint8 [B, 3, H, W]) -> [B, F]`` features, with a descriptive ``name``."""

    name: str

    def __call__(self, images: torch.Tensor) -> Any: ...


class NamedExtractor:
    """Give a plain callable ``fn(uint8 [B, 3, H, W]) -> [B, F]`` a ``name`` (used in results and cache keys)."""

    def __init__(self, fn: Callable[[torch.Tensor], Any], name: str) -> None:
        if not name:
            raise ValueError("an extractor name must be a non-empty string")
        self.fn = fn
        self.name = name

    def __call__(self, images: torch.Tensor) -> Any:
        return self.fn(images)

    def __repr__(self) -> str:
        return f"NamedExtractor(name={self.name!r})"


def extractor_name(extractor: Callable[..., Any]) -> str:
    """Return an extractor's ``name`` attribute, or raise a ValueError asking for one."""
    name = getattr(extractor, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(
            "the feature extractor has no 'name' attribute; wrap it as NamedExtractor(fn, name='...') "
            "so that results and cached statistics say which features were used"
        )
    return name


def inception_weights_path() -> Path:
    """Where hessdiff looks for (and downloads) clean-fid's Inception weights:
    ``$XDG_CACHE_HOME/hessdiff/weights/inception-2015-12-05.pt`` (default ``~/.cache/...``)."""
    return default_cache_dir("weights") / INCEPTION_FILENAME


def _cleanfid_inception_path() -> Path:
    """The location clean-fid itself downloads the weights to (``/tmp``, ``./`` on Windows)."""
    return Path("./" if platform.system() == "Windows" else "/tmp") / INCEPTION_FILENAME


class CleanFIDInception:
    """clean-fid's Inception-v3 feature extractor (``mode="clean"``), 2048-d pool features.

    Each uint8 image is resized to 299x299 exactly as clean-fid does (per channel, as float32,
    PIL bicubic, clipped to [0, 255]; ``cleanfid.resize.build_resizer("clean")``), normalised
    as ``(x - 128) / 128`` and passed through the TorchScript network
    ``inception-2015-12-05.pt`` (the TensorFlow FID Inception).

    Weights are looked for at ``weights_path`` if given, else at :func:`inception_weights_path`. If
    absent they are downloaded there (when ``download``), and if that fails a
    :class:`~hessdiff.eval.metrics.weights.MissingWeightsError` names the file and that path. clean-fid's
    own download location (``/tmp/inception-2015-12-05.pt``) is deliberately not used: ``/tmp`` is writable
    by every user and ``torch.jit.load`` of a planted file would run its code; the error says so when a
    file is there.
    """

    name = "inception-v3-clean-fid"
    feature_dim = 2048

    def __init__(
        self,
        device: str | torch.device = "cpu",
        *,
        weights_path: str | os.PathLike | None = None,
        download: bool = True,
    ) -> None:
        from cleanfid.resize import build_resizer

        if weights_path is not None:
            path = ensure_weights_file(weights_path, what="FID/KID Inception-v3 (clean-fid)", url=INCEPTION_URL,
                                       download=download)
        else:
            try:
                path = ensure_weights_file(inception_weights_path(), what="FID/KID Inception-v3 (clean-fid)",
                                           url=INCEPTION_URL, download=download)
            except MissingWeightsError as err:
                other = _cleanfid_inception_path()
                if other.is_file():  # never loaded from there: a world-writable folder, and torch.jit.load runs code
                    err.args = (f"{err.args[0]}. (clean-fid's copy at {other} is not used: that folder is writable "
                                f"by every user; if you trust the file, copy it to {inception_weights_path()})",)
                raise
        self.device = torch.device(device)
        self.weights_path = path
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
            self.model = torch.jit.load(str(path), map_location=self.device).eval()
        self._resize = build_resizer("clean")

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, 3, H, W]`` -> float32 ``[B, 3, 299, 299]`` in [0, 255] (clean-fid's resize)."""
        if images.dtype != torch.uint8:
            raise TypeError(f"CleanFIDInception expects uint8 images, got {images.dtype}")
        arrs = [self._resize(img.permute(1, 2, 0).cpu().numpy()) for img in images]
        return torch.from_numpy(np.stack(arrs).astype(np.float32)).permute(0, 3, 1, 2)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Features ``[B, 2048]`` (float32) of uint8 images ``[B, 3, H, W]``."""
        x = self.preprocess(images).to(self.device)
        return self.model.layers.forward((x - 128) / 128).reshape(x.shape[0], self.feature_dim)


# ----------------------------------------------------------------------------------------------
# Feature statistics of image sets
# ----------------------------------------------------------------------------------------------


def _same_shape_batches(images: Iterable[torch.Tensor], batch_size: int) -> Iterable[torch.Tensor]:
    """Group single images ``[3, H, W]`` into batches of equal shape (order kept)."""
    batch: list[torch.Tensor] = []
    for img in images:
        if batch and (len(batch) == batch_size or img.shape != batch[0].shape):
            yield torch.stack(batch)
            batch = []
        batch.append(img)
    if batch:
        yield torch.stack(batch)


def _extract(extractor: Callable[[torch.Tensor], Any], images: torch.Tensor, device: torch.device | None) -> Any:
    u = as_uint8_image(images)
    if device is not None:
        u = u.to(device)
    return extractor(u)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def folder_feature_stats(
    root: str | os.PathLike,
    extractor: Callable[[torch.Tensor], Any],
    *,
    resolution: int | tuple[int, int] | None = None,
    resize: str = "center-crop",
    first_n: int | None = None,
    files: Sequence[str | os.PathLike] | None = None,
    keep_features: bool = False,
    batch_size: int = 50,
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    progress: bool = False,
) -> FeatureStats:
    """Feature statistics of the images of a folder, cached by content.

    Images are read with :class:`hessdiff.eval.data.ImageFolderDataset` (same ordering,
    ``first_n``/``files`` selection, resize and unreadable-file handling) and fed to the
    extractor as uint8.

    The cache key is a SHA-256 over the extractor's name, the preprocessing version, the
    resolution and resize mode, and the SHA-256 of every selected file's bytes (in order); the
    statistics are stored as ``<cache_dir>/<extractor>-<key>.npz`` with ``cache_dir`` defaulting
    to ``$XDG_CACHE_HOME/hessdiff/fid`` (``~/.cache/hessdiff/fid``). Editing, adding or removing
    an image changes the key; moving the folder does not.

    Args:
        keep_features: also keep (and cache) all features, needed for KID; a cached file
            without features is recomputed when they are requested.
        device: where the extractor runs (images are moved there); ``None`` leaves them on CPU.
        use_cache: read and write the cache.
        progress: show a tqdm bar.
    """
    from hessdiff.eval.data import ImageFolderDataset

    name = extractor_name(extractor)
    dataset = ImageFolderDataset(root, resolution, first_n=first_n, files=files, resize=resize)
    cache_path = None
    if use_cache:
        key_data = {
            "extractor": name,
            "preprocessing": PREPROCESSING,
            "resolution": list(resolution) if isinstance(resolution, tuple) else resolution,
            "resize": resize if resolution is not None else "none",
            "files": [_file_digest(p) for p in dataset.files],
        }
        key = hashlib.sha256(json.dumps(key_data, sort_keys=True).encode()).hexdigest()[:32]
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:64]
        cache_path = Path(cache_dir) if cache_dir is not None else default_cache_dir("fid")
        cache_path = cache_path / f"{slug}-{key}.npz"
        if cache_path.is_file():
            stats = FeatureStats.load(cache_path)
            if stats.keep_features or not keep_features:
                return stats
    stats = FeatureStats(keep_features=keep_features)
    images: Iterable[torch.Tensor] = (dataset.load_uint8(i) for i in range(len(dataset)))
    if progress:
        from tqdm.auto import tqdm

        images = tqdm(images, total=len(dataset), desc=f"features {dataset.root.name}")
    dev = torch.device(device) if device is not None else None
    with torch.no_grad():
        for batch in _same_shape_batches(images, batch_size):
            stats.update(_extract(extractor, batch, dev))
    if cache_path is not None:
        stats.save(cache_path, meta={**dataset.describe(), "extractor": name})
    return stats


class DistributionMetrics:
    """Streaming FID (and optionally KID) of generated images against reference statistics.

    Args:
        reference: reference set as :class:`FeatureStats` (with kept features for KID), a
            ``(mu, sigma)`` pair (FID only), or a path to a file written by
            :meth:`FeatureStats.save`.
        extractor: feature extractor (default: :class:`CleanFIDInception` on ``device``).
        kid: also compute KID (keeps all generated features in memory).
        kid_subsets, kid_subset_size, seed: KID subset sampling (see :func:`kernel_inception_distance`).
        device: where the default extractor runs and images are sent.
        download: allow the default extractor to download its weights.

    ``update(images)`` takes float images in ``[-1, 1]`` or uint8 ``[B, 3, H, W]``;
    ``compute()`` returns ``{"fid", "kid", "kid_std", "num_images", "num_reference",
    "feature_extractor"}`` (``kid`` keys only with ``kid=True``).
    """

    def __init__(
        self,
        reference: FeatureStats | tuple[Any, Any] | str | os.PathLike,
        extractor: Callable[[torch.Tensor], Any] | None = None,
        *,
        kid: bool = False,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        seed: int = 0,
        device: str | torch.device = "cpu",
        download: bool = True,
    ) -> None:
        if isinstance(reference, str | os.PathLike):
            reference = FeatureStats.load(reference)
        if kid and not (isinstance(reference, FeatureStats) and reference.keep_features):
            raise ValueError("KID needs the reference features: give FeatureStats computed with keep_features=True")
        if not isinstance(reference, FeatureStats):
            _moments(reference)  # type check
        self.reference = reference
        self.device = torch.device(device)
        self.extractor = extractor if extractor is not None else CleanFIDInception(self.device, download=download)
        self.extractor_name = extractor_name(self.extractor)
        self.kid = kid
        self.kid_subsets, self.kid_subset_size, self.seed = kid_subsets, kid_subset_size, seed
        self.stats = FeatureStats(keep_features=kid)

    @torch.no_grad()
    def update(self, images: torch.Tensor) -> None:
        """Add generated images (float in ``[-1, 1]`` or uint8, ``[B, 3, H, W]``)."""
        self.stats.update(_extract(self.extractor, images, self.device))

    def compute(self) -> dict[str, Any]:
        """FID (and KID) of the images added so far against the reference."""
        ref_n = self.reference.n if isinstance(self.reference, FeatureStats) else None
        out: dict[str, Any] = {
            "fid": fid_from_stats(self.stats, self.reference),
            "num_images": self.stats.n,
            "num_reference": ref_n,
            "feature_extractor": self.extractor_name,
        }
        if self.kid:
            out["kid"], out["kid_std"] = kernel_inception_distance(
                self.reference.features,
                self.stats.features,
                num_subsets=self.kid_subsets,
                max_subset_size=self.kid_subset_size,
                seed=self.seed,
            )
        return out
