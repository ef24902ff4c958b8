"""Paired image metrics (PSNR, SSIM, LPIPS) and a metric suite that survives missing weights.

Input contract (see :mod:`hessdiff.eval.images`): ``x`` (estimate) and ``y`` (reference) are
``[B, 3, H, W]`` batches (or single ``[3, H, W]`` images) of the same shape, either float in
``[-1, 1]`` (clipped to that range, never rescaled per image) or uint8 ``0..255``. Every
metric returns one float64 value per image, shape ``[B]``.

* **PSNR** and **SSIM** are computed in float64 on images mapped to ``[0, 1]``
  (:func:`~hessdiff.eval.images.to_unit`) with ``data_range = 1``; for uint8 inputs this is
  exactly scikit-image on the uint8 arrays with ``data_range = 255``. SSIM follows
  scikit-image's ``structural_similarity(..., gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, channel_axis=...)``: 11-tap Gaussian window (truncate 3.5),
  K1 = 0.01, K2 = 0.03, the SSIM map averaged over the pixels at least 5 pixels away from the
  border, then over channels. Images must be at least 11x11. PSNR of identical images is ``inf``.
* **LPIPS** is the ``lpips`` package (v0.1 linear layers shipped with it) on the clipped
  ``[-1, 1]`` float32 images, with an AlexNet (``"alex"``) or VGG-16 (``"vgg"``) backbone
  whose ImageNet weights come from torchvision's cache; the backbone is named in every result.

:class:`MetricSuite` builds the metrics requested by name from :data:`METRICS` (plus FID/KID
from :mod:`hessdiff.eval.metrics.fid`); a metric whose weights are missing is reported as ``None``
with the reason under ``"missing"`` while the others are computed.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from hessdiff.eval.images import as_float_image, check_image_batch, to_unit
from hessdiff.eval.metrics.weights import MissingWeightsError, ensure_weights_file

__all__ = [
    "LPIPS",
    "LPIPS_BACKBONES",
    "METRICS",
    "PSNR",
    "SSIM",
    "MetricSuite",
    "PairedMetric",
    "lpips_backbone_path",
    "psnr",
    "ssim",
]


def _pair(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = check_image_batch(x, "x"), check_image_batch(y, "y")
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    return x, y


# ----------------------------------------------------------------------------------------------
# PSNR / SSIM
# ----------------------------------------------------------------------------------------------


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image, ``10 log10(1 / mse)`` on ``[0, 1]`` images (see module docstring).

    Returns float64 ``[B]``; ``inf`` where the images are equal.
    """
    x, y = _pair(x, y)
    u, v = to_unit(x), to_unit(y.to(x.device))
    mse = (u - v).square().flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse)


def _gaussian_window(sigma: float, truncate: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """scipy.ndimage's 1-D Gaussian kernel: radius ``int(truncate * sigma + 0.5)``, normalised to sum 1."""
    radius = int(truncate * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    w = torch.exp(-0.5 * (t / sigma) ** 2)
    return w / w.sum()


def ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """SSIM per image on ``[0, 1]`` images, matching scikit-image's Gaussian-weighted SSIM.

    The local statistics are Gaussian-filtered (window radius ``int(3.5 * sigma + 0.5)``) and
    only the "valid" region (pixels whose window lies inside the image) is averaged, which is
    exactly scikit-image's cropped mean, so no boundary padding enters the result.

    Returns float64 ``[B]``.

    Raises:
        ValueError: an image side is smaller than the window (11 for ``sigma=1.5``).
    """
    x, y = _pair(x, y)
    u, v = to_unit(x), to_unit(y.to(x.device))
    b, c, h, w = u.shape
    win = _gaussian_window(sigma, 3.5, u.dtype, u.device)
    n = win.numel()
    if h < n or w < n:
        raise ValueError(f"SSIM needs images of at least {n}x{n} pixels, got {h}x{w}")

    def filt(a: torch.Tensor) -> torch.Tensor:
        a = a.reshape(b * c, 1, h, w)
        a = torch.nn.functional.conv2d(a, win.view(1, 1, n, 1))
        return torch.nn.functional.conv2d(a, win.view(1, 1, 1, n))

    mu_x, mu_y = filt(u), filt(v)
    var_x = filt(u * u) - mu_x * mu_x
    var_y = filt(v * v) - mu_y * mu_y
    cov_xy = filt(u * v) - mu_x * mu_y
    c1, c2 = k1**2, k2**2  # (K * data_range)^2 with data_range = 1
    s = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.reshape(b, -1).mean(1)


# ----------------------------------------------------------------------------------------------
# Metric objects and registry
# ----------------------------------------------------------------------------------------------


@runtime_checkable
class PairedMetric(Protocol):
    """A full-reference image metric: ``metric(x, y) -> float64 [B]``.

    ``name`` is the key of the metric in results, ``info`` states its settings (e.g. the LPIPS
    backbone), ``higher_is_better`` its direction.
    """

    name: str
    info: Mapping[str, Any]
    higher_is_better: bool

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...


class PSNR:
    """PSNR (dB) on ``[0, 1]`` images, ``data_range = 1`` (see :func:`psnr`)."""

    name = "psnr"
    higher_is_better = True
    info: Mapping[str, Any] = {"psnr_range": "[0,1] (x+1)/2, data_range=1"}

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return psnr(x.to(self.device), y.to(self.device))


class SSIM:
    """SSIM on ``[0, 1]`` images as scikit-image with Gaussian weights (see :func:`ssim`)."""

    name = "ssim"
    higher_is_better = True
    info: Mapping[str, Any] = {"ssim_range": "[0,1] (x+1)/2, data_range=1, gaussian sigma=1.5"}

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ssim(x.to(self.device), y.to(self.device))


LPIPS_BACKBONES = {
    "alex": ("alexnet", "AlexNet_Weights", "AlexNet"),
    "vgg": ("vgg16", "VGG16_Weights", "VGG-16"),
}
"""LPIPS backbones: net name -> (torchvision constructor, weights enum, display name)."""


def _backbone_url(net: str) -> str:
    from torchvision import models

    return getattr(models, LPIPS_BACKBONES[net][1]).IMAGENET1K_V1.url


def lpips_backbone_path(net: str) -> Path:
    """Where torchvision keeps the ImageNet weights of an LPIPS backbone:
    ``$TORCH_HOME/hub/checkpoints/<file>`` (``torch.hub.get_dir()/checkpoints``), e.g.
    ``alexnet-owt-7be5be79.pth`` for ``"alex"`` and ``vgg16-397923af.pth`` for ``"vgg"``."""
    if net not in LPIPS_BACKBONES:
        raise ValueError(f"unknown LPIPS backbone {net!r}; choose one of {sorted(LPIPS_BACKBONES)}")
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(_backbone_url(net))


def _lpips_linear_path(net: str) -> Path:
    import lpips

    return Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"


class LPIPS:
    """LPIPS v0.1 distance of the ``lpips`` package with an AlexNet or VGG-16 backbone.

    Args:
        net: ``"alex"`` or ``"vgg"``.
        device: where the network runs.
        backbone_weights: the backbone's ImageNet weights: ``None`` (torchvision's file at
            :func:`lpips_backbone_path`, downloaded if absent and ``download``), a path to a
            torchvision state-dict file, or a state dict (torchvision key names,
            ``features.<i>.weight`` ...).
        linear_weights: path of the LPIPS linear-layer weights (default: the file shipped with
            the ``lpips`` package, ``lpips/weights/v0.1/<net>.pth``).
        download: allow downloading the backbone weights.

    Raises:
        MissingWeightsError: a weight file is absent and could not be downloaded; the message
            names the file and the exact path where to place it.

    ``lpips(x, y)`` returns float64 ``[B]`` (computed in float32, inputs clipped to ``[-1, 1]``).
    """

    higher_is_better = False

    def __init__(
        self,
        net: str = "alex",
        *,
        device: str | torch.device = "cpu",
        backbone_weights: str | os.PathLike | Mapping[str, torch.Tensor] | None = None,
        linear_weights: str | os.PathLike | None = None,
        download: bool = True,
    ) -> None:
        import lpips

        if net not in LPIPS_BACKBONES:
            raise ValueError(f"unknown LPIPS backbone {net!r}; choose one of {sorted(LPIPS_BACKBONES)}")
        self.net = net
        self.name = f"lpips_{net}"
        self.info = {f"{self.name}_net": net, "lpips_version": "0.1"}
        self.device = torch.device(device)
        display = LPIPS_BACKBONES[net][2]

        lin_path = ensure_weights_file(
            linear_weights if linear_weights is not None else _lpips_linear_path(net),
            what=f"LPIPS-{net} linear layers (shipped with the lpips package)",
            url=None,
            download=False,
        )
        if isinstance(backbone_weights, Mapping):
            state = dict(backbone_weights)
        else:
            if backbone_weights is None:
                path = ensure_weights_file(
                    lpips_backbone_path(net),
                    what=f"LPIPS-{net} backbone ({display} ImageNet weights, torchvision; folder "
                    "$TORCH_HOME/hub/checkpoints)",
                    url=_backbone_url(net),
                    download=download,
                )
            else:
                path = ensure_weights_file(backbone_weights, what=f"LPIPS-{net} backbone", url=None, download=False)
            state = torch.load(path, map_location="cpu", weights_only=True)

        # Build the package's model with a random trunk (no download), then load the trunk.
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torchvision\..*")
            model = lpips.LPIPS(
                pretrained=True, net=net, version="0.1", pnet_rand=True, model_path=str(lin_path), verbose=False
            )
        trunk = {}
        for key in model.net.state_dict():
            src = "features." + key.split(".", 1)[1]  # "slice2.3.weight" -> "features.3.weight"
            if src not in state:
                raise ValueError(f"LPIPS-{net} backbone weights lack '{src}' (is this a torchvision {display}?)")
            trunk[key] = state[src]
        model.net.load_state_dict(trunk, strict=True)
        self.model = model.to(self.device).eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, y = _pair(x, y)
        a = as_float_image(x.to(self.device), torch.float32)
        b = as_float_image(y.to(self.device), torch.float32)
        return self.model(a, b).reshape(-1).to(torch.float64)


METRICS: dict[str, Callable[..., PairedMetric]] = {
    "psnr": PSNR,
    "ssim": SSIM,
    "lpips_alex": lambda **kw: LPIPS("alex", **kw),
    "lpips_vgg": lambda **kw: LPIPS("vgg", **kw),
}
"""Paired metrics by name; each factory takes keyword arguments (``device``, and for LPIPS
``download``, ``backbone_weights``) and returns an object satisfying :class:`PairedMetric`."""


# ----------------------------------------------------------------------------------------------
# Suite
# ----------------------------------------------------------------------------------------------


class MetricSuite:
    """Several metrics computed together, robust to missing metric weights.

    Args:
        paired: names from :data:`METRICS` (per-pair metrics needing a reference image).
        fid_reference: reference set for FID (:class:`~hessdiff.eval.metrics.fid.FeatureStats`, a
            ``(mu, sigma)`` pair, a saved statistics ``.npz`` file or an image folder);
            ``None``: no FID.
        kid: also compute KID (needs a reference with features: a folder, or FeatureStats
            with ``keep_features=True``).
        feature_extractor: FID/KID extractor (default: clean-fid's Inception).
        reference_resolution, reference_resize: how reference folder images are resized
            (use the model's resolution); the folder statistics are cached by content.
        metric_kwargs: extra keyword arguments per metric name (e.g.
            ``{"lpips_alex": {"backbone_weights": path}}``).
        on_missing: ``"warn"`` (mark the metric missing, warn, go on) or ``"raise"``.

    ``update(x, y)`` adds a batch (``y`` may be ``None`` when no paired metric is used);
    ``compute()`` returns a flat dict: the mean of each paired metric (and ``<name>_std``), FID /
    KID, ``num_images``, the settings (``feature_extractor``, ``lpips_<net>_net``, value ranges), and ``missing``
    (metric name -> reason) with the missing metrics' values set to ``None``.
    """

    def __init__(
        self,
        paired: Sequence[str] = ("psnr", "ssim", "lpips_alex"),
        *,
        fid_reference: Any = None,
        kid: bool = False,
        feature_extractor: Callable[[torch.Tensor], Any] | None = None,
        reference_resolution: int | tuple[int, int] | None = None,
        reference_resize: str = "center-crop",
        device: str | torch.device = "cpu",
        download: bool = True,
        metric_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
        on_missing: str = "warn",
        fid_cache_dir: str | os.PathLike | None = None,
    ) -> None:
        from hessdiff.eval.metrics import fid as fidmod

        if on_missing not in ("warn", "raise"):
            raise ValueError(f"on_missing must be 'warn' or 'raise', got {on_missing!r}")
        unknown = [n for n in paired if n not in METRICS]
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; available: {sorted(METRICS)}")
        if kid and fid_reference is None:
            raise ValueError("kid=True needs fid_reference")
        metric_kwargs = dict(metric_kwargs or {})
        self.on_missing = on_missing
        self.missing: dict[str, str] = {}
        self.metrics: dict[str, PairedMetric] = {}
        self._values: dict[str, list[torch.Tensor]] = {}
        self.info: dict[str, Any] = {}
        for name in paired:
            kwargs = {"device": device, **metric_kwargs.get(name, {})}
            if name.startswith("lpips"):
                kwargs.setdefault("download", download)
            try:
                metric = METRICS[name](**kwargs)
            except MissingWeightsError as err:
                self._mark_missing(name, err)
                continue
            self.metrics[name] = metric
            self._values[name] = []
            self.info.update(metric.info)
        for name in paired:
            if name.startswith("lpips_") and name in self.missing:
                self.info[f"{name}_net"] = name.split("_", 1)[1]

        self.distribution: fidmod.DistributionMetrics | None = None
        self.kid = kid
        if fid_reference is not None:
            try:
                extractor = feature_extractor or fidmod.CleanFIDInception(device, download=download)
            except MissingWeightsError as err:
                self._mark_missing("fid", err)
                if kid:
                    self._mark_missing("kid", err, warn=False)
                self.info["feature_extractor"] = fidmod.CleanFIDInception.name
            else:
                reference = fid_reference
                if isinstance(reference, str | os.PathLike) and Path(reference).is_dir():
                    reference = fidmod.folder_feature_stats(
                        reference,
                        extractor,
                        resolution=reference_resolution,
                        resize=reference_resize,
                        keep_features=kid,
                        device=device,
                        cache_dir=fid_cache_dir,
                    )
                self.distribution = fidmod.DistributionMetrics(reference, extractor, kid=kid, device=device)
                self.info["feature_extractor"] = self.distribution.extractor_name
        self.num_images = 0

    def _mark_missing(self, name: str, err: Exception, warn: bool = True) -> None:
        if self.on_missing == "raise":
            raise err
        self.missing[name] = str(err)
        if warn:
            warnings.warn(f"metric {name} is skipped: {err}", stacklevel=3)

    def update(self, x: torch.Tensor, y: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Add estimates ``x`` (and references ``y``); returns this batch's per-image paired values."""
        x = check_image_batch(x, "x")
        batch: dict[str, torch.Tensor] = {}
        if self.metrics:
            if y is None:
                raise ValueError(f"paired metrics {sorted(self.metrics)} need reference images y")
            for name, metric in self.metrics.items():
                batch[name] = metric(x, y).detach().cpu()
                self._values[name].append(batch[name])
        if self.distribution is not None:
            self.distribution.update(x)
        self.num_images += x.shape[0]
        return batch

    def compute(self) -> dict[str, Any]:
        """Aggregate results (means over images; see the class docstring for the keys)."""
        out: dict[str, Any] = {"num_images": self.num_images}
        for name, chunks in self._values.items():
            vals = torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.float64)
            out[name] = float(vals.mean()) if vals.numel() else math.nan
            out[f"{name}_std"] = float(vals.std(unbiased=False)) if vals.numel() else math.nan
        if self.distribution is not None:
            res = self.distribution.compute()
            out["fid"] = res["fid"]
            out["num_reference"] = res["num_reference"]
            if self.kid:
                out["kid"], out["kid_std"] = res["kid"], res["kid_std"]
        for name in self.missing:
            out[name] = None
        out.update(self.info)
        out["missing"] = dict(self.missing)
        return out
