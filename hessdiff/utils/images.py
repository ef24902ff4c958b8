"""Image files <-> tensors: one loader, one saver, one tensor convention.

Convention
----------
An image is a float tensor ``[1, C, H, W]`` (``C = 1`` grey, ``3`` colour) with values in ``[-1, 1]``;
:func:`load_image` returns float32. Values outside ``[-1, 1]`` are clipped when an image is quantised,
never rescaled per image (no min-max).

8-bit mapping (``u`` in ``0..255``)::

    u = round(clamp((x + 1) / 2, 0, 1) * 255)      (round half to even)
    x = u / 127.5 - 1

:func:`to_uint8` / :func:`from_uint8` evaluate it on tensors of any shape in the input's precision
(float32 for float32 / half inputs, float64 for float64), the metrics' convention
(:mod:`hessdiff.eval.images`). The file functions evaluate it in float64 (exactly rounded for float32
images): :func:`save_image` / :func:`to_uint8_array` quantise ``x.double()``, and :func:`load_image`
computes ``u / 255 * 2 - 1`` in float64 before rounding to float32. ``to_uint8(from_uint8(u)) == u``
and ``to_uint8(load_image(f))`` is the file's 8-bit data exactly.

Reading (:func:`load_image`)
----------------------------
* 8-bit grey (``L``, ``1``) and colour (``RGB``, palette ``P``, ``CMYK``, ``YCbCr`` ...) images: ``u / 255``;
* 16-bit grey PNG / TIFF (``I;16`` and variants, and ``I``, which some Pillow versions use for them):
  ``u / 65535``, so the full 16-bit range maps to ``[-1, 1]`` (``Image.convert("RGB")`` would clip
  every value above 255 to white). Pillow decodes 16-bit *colour* PNGs to 8 bits per channel; they are
  read at that precision;
* float TIFF (``F``): the values are taken as ``[0, 1]`` intensities and clipped; NaN / inf are an error;
* alpha (``RGBA``, ``LA``, ``PA``) is dropped, not composited: the colour channels are used as stored;
* the EXIF orientation tag is applied (``ImageOps.exif_transpose``), so the tensor is upright as shown;
* ``channels=None`` keeps grey sources as one channel and reads everything else as RGB; ``channels=3``
  repeats a grey image into three channels; ``channels=1`` converts colour to grey with Pillow's
  ``convert("L")`` (ITU-R 601-2 luma ``0.299 R + 0.587 G + 0.114 B``).

Writing (:func:`save_image`)
----------------------------
8-bit (or, for grey images, 16-bit) PNG or any format Pillow writes, chosen by the file suffix; the file
is written atomically (:mod:`hessdiff.utils.files`) and, unless ``overwrite``, an existing file is refused.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["ImageTooLargeError", "from_uint8", "load_image", "save_image", "to_uint8", "to_uint8_array"]

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_GREY_MODES = ("L", "1", "LA", "La")


# ------------------------------------------------------------------------------------------ tensors
def _check_finite_float(x: Tensor, what: str) -> None:
    if not torch.is_floating_point(x):
        raise TypeError(f"{what}: expected a float tensor in [-1, 1] or a uint8 tensor, got dtype {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{what}: image contains NaN or infinite values")


def to_uint8(x: Tensor) -> Tensor:
    """Map a float image in ``[-1, 1]`` to uint8: ``round(clamp((x + 1) / 2, 0, 1) * 255)``.

    Computed in float32 (float64 inputs stay float64); any shape is accepted.

    Raises:
        TypeError: ``x`` is not a float tensor.
        ValueError: ``x`` contains NaN or infinite values.
    """
    _check_finite_float(x, "to_uint8")
    work = x.to(torch.promote_types(x.dtype, torch.float32))
    return torch.round(((work + 1) / 2).clamp(0, 1) * 255).to(torch.uint8)


def from_uint8(u: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Map a uint8 image to floats in ``[-1, 1]``: ``u / 127.5 - 1``, computed in ``dtype``."""
    if u.dtype != torch.uint8:
        raise TypeError(f"from_uint8: expected a uint8 tensor, got dtype {u.dtype}")
    return u.to(dtype) / 127.5 - 1


def _single_image(x: Tensor, what: str) -> Tensor:
    """``[1, C, H, W]`` / ``[C, H, W]`` with ``C`` in (1, 3) -> ``[C, H, W]``."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{what} expects a tensor, got {type(x).__name__}")
    if x.ndim == 4:
        if x.shape[0] != 1:
            raise ValueError(f"{what} expects one image; got a batch of {x.shape[0]}")
        x = x[0]
    if x.ndim != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"{what} expects one image [1, C, H, W] or [C, H, W] with C in (1, 3); "
                         f"got shape {list(x.shape)}")
    return x


def to_uint8_array(x: Tensor) -> np.ndarray:
    """One image ``[1, C, H, W]`` / ``[C, H, W]`` in ``[-1, 1]`` -> uint8 array ``[H, W]`` (C = 1) or
    ``[H, W, 3]``: ``round((clamp(x, -1, 1) + 1) * 127.5)`` in float64 (what :func:`save_image` writes)."""
    x = _single_image(x, "to_uint8_array")
    if not torch.is_floating_point(x):
        raise ValueError(f"to_uint8_array expects a float image in [-1, 1], got dtype {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("image contains NaN or Inf values")
    u8 = torch.round((x.detach().double().cpu().clamp(-1.0, 1.0) + 1.0) * 127.5).to(torch.uint8)
    arr = u8.permute(1, 2, 0).numpy()
    return arr[..., 0] if arr.shape[2] == 1 else arr


# ------------------------------------------------------------------------------------------ files
def _unit_array(im: object, channels: int | None) -> np.ndarray:
    """A PIL image as float64 ``[H, W, C]`` in [0, 1] (see the module docstring for the modes)."""
    mode = im.mode  # type: ignore[attr-defined]
    if mode in _SIXTEEN_BIT_MODES:
        arr = np.asarray(im, dtype=np.float64) / 65535.0
    elif mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        if not np.isfinite(arr).all():
            raise ValueError("the float image contains NaN or infinite values")
    else:
        grey = channels == 1 or (channels is None and mode in _GREY_MODES)
        arr = np.asarray(im.convert("L" if grey else "RGB"), dtype=np.float64) / 255.0  # type: ignore[attr-defined]
    if arr.ndim == 2:
        arr = arr[..., None]
    if channels == 3 and arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return arr


class ImageTooLargeError(ValueError):
    """An image has more pixels than the allowed limit (``max_pixels`` or PIL's decompression-bomb limit)."""

    def __init__(self, message: str, pixels: int | None = None, limit: int | None = None) -> None:
        super().__init__(message)
        self.pixels, self.limit = pixels, limit


def load_image(path: str | os.PathLike, channels: int | None = None, *, max_pixels: int | None = None) -> Tensor:
    """Read an image file into a float32 tensor ``[1, C, H, W]`` in ``[-1, 1]``.

    Args:
        channels: ``None`` (grey stays one channel, everything else is RGB), ``1`` or ``3``.
        max_pixels: refuse images with more pixels (checked from the header, before decoding); it
            replaces PIL's decompression-bomb limit. ``None`` keeps PIL's limit.

    Raises:
        FileNotFoundError: there is no file at ``path``.
        ImageTooLargeError: more pixels than ``max_pixels`` (or than PIL's limit); a ``ValueError``.
        ValueError: the file cannot be decoded as an image (the message names it).
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    p = Path(path)
    if channels not in (None, 1, 3):
        raise ValueError(f"load_image: channels must be None, 1 or 3; got {channels!r}")
    if max_pixels is not None and max_pixels < 1:
        raise ValueError(f"load_image: max_pixels must be positive; got {max_pixels}")
    if not p.is_file():
        raise FileNotFoundError(f"image file not found: {p}")
    saved_limit = Image.MAX_IMAGE_PIXELS
    try:
        if max_pixels is not None:
            Image.MAX_IMAGE_PIXELS = None  # our limit replaces PIL's
        with Image.open(p) as im:
            n = im.size[0] * im.size[1]
            if max_pixels is not None and n > max_pixels:
                raise ImageTooLargeError(f"image {p} is {im.size[0]}x{im.size[1]} = {n / 1e6:.1f} MP, more than "
                                         f"the limit of {max_pixels / 1e6:g} MP", n, max_pixels)
            im.load()
            arr = _unit_array(ImageOps.exif_transpose(im), channels)
    except ImageTooLargeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"image {p} is too large: {exc}") from exc
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise ValueError(f"cannot read an image from {p}: {exc}") from exc
    finally:
        Image.MAX_IMAGE_PIXELS = saved_limit
    x = torch.from_numpy(arr.clip(0.0, 1.0) * 2.0 - 1.0).permute(2, 0, 1)[None]
    return x.to(torch.float32).contiguous()


def _format_for(path: Path) -> str:
    from PIL import Image

    if not path.suffix:
        return "PNG"
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise ValueError(f"save_image: cannot write {path.suffix!r} files (use e.g. .png)")
    return fmt


def save_image(x: Tensor, path: str | os.PathLike, *, overwrite: bool = False, mkdir: bool = False,
               bits: int = 8) -> Path:
    """Write one image to ``path`` atomically (format from the suffix, PNG without one); returns the path.

    ``x`` is ``[1, C, H, W]`` or ``[C, H, W]`` (C = 1 or 3): floats in ``[-1, 1]`` (clipped; quantised with
    :func:`to_uint8_array`), or uint8 written as it is. ``bits=16`` writes a 16-bit grey PNG / TIFF
    (``round(clamp((x + 1) / 2, 0, 1) * 65535)``, floats only). An existing file is refused
    (:class:`FileExistsError`) unless ``overwrite``; ``mkdir`` creates missing parent folders.
    """
    from PIL import Image

    from hessdiff.utils.files import atomic_write

    path = Path(path)
    fmt = _format_for(path)
    img = _single_image(x, "save_image").detach().cpu()
    if bits == 8:
        if img.dtype == torch.uint8:
            arr = img.permute(1, 2, 0).numpy()
            arr = arr[..., 0] if arr.shape[2] == 1 else arr
        else:
            arr = to_uint8_array(img)
    elif bits == 16:
        if img.shape[0] != 1 or not torch.is_floating_point(img):
            raise ValueError("save_image: bits=16 writes grey float images only (Pillow has no 16-bit colour)")
        if fmt not in ("PNG", "TIFF"):
            raise ValueError(f"save_image: bits=16 needs a .png or .tif file, not {path.suffix!r}")
        if not bool(torch.isfinite(img).all()):
            raise ValueError("image contains NaN or Inf values")
        arr = torch.round(((img[0].double() + 1.0) / 2.0).clamp(0.0, 1.0) * 65535.0).to(torch.int32).numpy()
        arr = arr.astype(np.uint16)
    else:
        raise ValueError(f"save_image: bits must be 8 or 16, got {bits!r}")
    pil = Image.fromarray(np.ascontiguousarray(arr))

    def write(tmp: Path) -> None:
        pil.save(tmp, format=fmt)

    return atomic_write(path, write, overwrite=overwrite, mkdir=mkdir)
