"""The one preprocessing path of hessdiff's metrics, and resizing.

Input contract
--------------
Images are batches ``[B, 3, H, W]`` (or single images ``[3, H, W]``) in one of two forms:

* **float** tensors with values in ``[-1, 1]`` (the range diffusion models work in); values
  outside are clipped to ``[-1, 1]`` (fixed clipping, never per-image min-max rescaling);
  NaN or infinite values are an error;
* **uint8** tensors with values ``0..255``.

Conversions (the only ones the metrics use; the first two are the image convention of
:mod:`hessdiff.utils.images`, which also reads and writes image files):

* :func:`~hessdiff.utils.images.to_uint8` ``(x) = round(clamp((x + 1) / 2, 0, 1) * 255)``
  computed in at least float32; ``round`` is :func:`torch.round` (half to even);
* :func:`~hessdiff.utils.images.from_uint8` ``(u) = u / 127.5 - 1`` as float32;
  ``to_uint8(from_uint8(u)) == u`` exactly for every ``u`` in ``0..255``;
* :func:`to_unit` ``(x) = (clamp(x, -1, 1) + 1) / 2`` in float64: the ``[0, 1]`` images on
  which PSNR and SSIM are computed (``data_range = 1``).

FID/KID see uint8 images (as when evaluating saved PNG files); LPIPS sees the clipped float
image in ``[-1, 1]``; PSNR/SSIM see :func:`to_unit` of it.

Resizing (:func:`resize_image`) works on PIL images; the named modes are listed in
:data:`RESIZE_MODES`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from hessdiff.utils.images import _check_finite_float, from_uint8, to_uint8

if TYPE_CHECKING:
    from PIL import Image as PILImage

__all__ = [
    "IMAGE_EXTENSIONS",
    "RESIZE_MODES",
    "as_float_image",
    "as_uint8_image",
    "check_image_batch",
    "resize_image",
    "to_unit",
]

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
"""File extensions (lower case) treated as images when scanning folders."""

RESIZE_MODES = {
    "center-crop": (
        "crop the largest centred region with the target aspect ratio, then resize it to the "
        "target size with PIL bicubic (antialiased when shrinking)"
    ),
    "resize-short-side": (
        "resize with PIL bicubic so that the image covers the target size while keeping its "
        "aspect ratio, then crop the centre (torchvision Resize + CenterCrop convention)"
    ),
    "none": "no resizing; the image must already have the target size",
}
"""Named resize modes of :func:`resize_image` with what each does."""


def check_image_batch(x: torch.Tensor, what: str = "images") -> torch.Tensor:
    """Check that ``x`` is an image batch ``[B, 3, H, W]`` (float or uint8) and return it.

    A single image ``[3, H, W]`` is returned with a leading batch axis.

    Raises:
        TypeError: ``x`` is not a tensor, or has another dtype than float / uint8.
        ValueError: wrong number of dimensions or channels, empty batch.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(x).__name__}")
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"{what}: expected shape [B, 3, H, W] or [3, H, W], got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{what}: empty batch")
    if x.dtype != torch.uint8 and not torch.is_floating_point(x):
        raise TypeError(f"{what}: expected a float tensor in [-1, 1] or a uint8 tensor, got dtype {x.dtype}")
    return x


def as_uint8_image(x: torch.Tensor) -> torch.Tensor:
    """Return ``x`` as uint8 ``[B, 3, H, W]``: uint8 passes through, floats go through :func:`to_uint8`."""
    x = check_image_batch(x)
    return x if x.dtype == torch.uint8 else to_uint8(x)


def as_float_image(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Return ``x`` as a float image ``[B, 3, H, W]`` in ``[-1, 1]``.

    uint8 goes through :func:`from_uint8`; floats are checked for NaN/inf, cast to ``dtype``
    and clipped to ``[-1, 1]``.
    """
    x = check_image_batch(x)
    if x.dtype == torch.uint8:
        return from_uint8(x, dtype)
    _check_finite_float(x, "image")
    return x.to(dtype).clamp(-1, 1)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """Return ``x`` as a float64 image ``[B, 3, H, W]`` in ``[0, 1]``.

    Floats: ``(clamp(x, -1, 1) + 1) / 2``; uint8: ``u / 255`` (the same value as going
    through :func:`from_uint8`, without its float32 rounding).
    """
    x = check_image_batch(x)
    if x.dtype == torch.uint8:
        return x.to(torch.float64) / 255
    _check_finite_float(x, "image")
    return (x.to(torch.float64).clamp(-1, 1) + 1) / 2


def _target_size(resolution: int | tuple[int, int]) -> tuple[int, int]:
    """Return (height, width) from an int or a (height, width) pair, checking positivity."""
    if isinstance(resolution, int):
        h = w = resolution
    else:
        h, w = (int(v) for v in resolution)
    if h <= 0 or w <= 0:
        raise ValueError(f"resolution must be positive, got {resolution!r}")
    return h, w


def resize_image(
    img: PILImage.Image, resolution: int | tuple[int, int], mode: str = "center-crop"
) -> PILImage.Image:
    """Resize a PIL image to ``resolution`` (an int for square, or ``(height, width)``).

    Modes (see :data:`RESIZE_MODES`):

    * ``"center-crop"``: crop the largest centred box with the target aspect ratio (integer
      box, offsets rounded down), then ``PIL.Image.resize(..., BICUBIC)`` to the target size;
      PIL's resize filters over the whole source footprint, so shrinking is antialiased;
    * ``"resize-short-side"``: bicubic resize so that the image just covers the target (the
      scale is ``max(H_t / H, W_t / W)``, sizes rounded to the nearest integer), then a
      centred crop;
    * ``"none"``: return the image unchanged; it must already be the target size.

    An image already of the target size is returned unchanged by every mode.
    """
    from PIL import Image

    h_t, w_t = _target_size(resolution)
    w, h = img.size
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; choose one of {sorted(RESIZE_MODES)}")
    if (h, w) == (h_t, w_t):
        return img
    if mode == "none":
        raise ValueError(f"image is {h}x{w} (HxW) but {h_t}x{w_t} is required and resize='none'")
    if mode == "center-crop":
        # largest box with aspect w_t/h_t inside (w, h)
        if w * h_t >= h * w_t:  # image wider than target: keep full height
            cw, ch = max(1, round(h * w_t / h_t)), h
        else:
            cw, ch = w, max(1, round(w * h_t / w_t))
        left, top = (w - cw) // 2, (h - ch) // 2
        img = img.crop((left, top, left + cw, top + ch))
        return img.resize((w_t, h_t), resample=Image.BICUBIC)
    # resize-short-side
    scale = max(h_t / h, w_t / w)
    nw, nh = max(w_t, round(w * scale)), max(h_t, round(h * scale))
    img = img.resize((nw, nh), resample=Image.BICUBIC)
    left, top = (nw - w_t) // 2, (nh - h_t) // 2
    return img.crop((left, top, left + w_t, top + h_t))
