"""Image files <-> tensors, and atomic file writes.

Images are ``[1, C, H, W]`` float32 tensors in ``[-1, 1]`` (``C = 1`` for grey, ``3`` for colour).
The mapping to 8-bit is fixed: ``u8 = round((clamp(x, -1, 1) + 1) · 127.5)``; reading does
``x = u8 / 127.5 − 1``. Never a per-image min–max.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["load_image", "save_image", "image_to_uint8", "atomic_write", "atomic_write_many"]


def load_image(path: str | Path, mode: str = "auto") -> Tensor:
    """Read an image file into a ``[1, C, H, W]`` float32 tensor in ``[-1, 1]``.

    ``mode="auto"`` keeps grey-level images (PIL modes ``L``, ``I;16``, ``I``, ``1``) as one channel and
    converts everything else (``RGBA``, palette, ``CMYK``...) to RGB (alpha dropped); ``"RGB"`` / ``"L"``
    force three / one channels. 16-bit grey images are scaled by 65535.
    """
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"image file not found: {p}")
    if mode not in ("auto", "RGB", "L"):
        raise ValueError(f"load_image: mode must be auto, RGB or L; got {mode!r}")
    try:
        with Image.open(p) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I") and mode != "RGB":
                arr = np.asarray(im, dtype=np.float64) / 65535.0
                arr = arr[..., None]
            else:
                target = mode
                if mode == "auto":
                    target = "L" if im.mode in ("L", "1", "LA") else "RGB"
                arr = np.asarray(im.convert(target), dtype=np.float64) / 255.0
                if arr.ndim == 2:
                    arr = arr[..., None]
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise ValueError(f"cannot read an image from {p}: {exc}") from exc
    x = torch.from_numpy(arr.clip(0.0, 1.0) * 2.0 - 1.0).permute(2, 0, 1)[None]
    return x.to(torch.float32).contiguous()


def image_to_uint8(x: Tensor) -> np.ndarray:
    """``[1, C, H, W]`` / ``[C, H, W]`` in ``[-1, 1]`` -> ``uint8`` array ``[H, W]`` (C=1) or ``[H, W, C]``."""
    if not isinstance(x, Tensor):
        raise ValueError("image_to_uint8 expects a tensor")
    if x.ndim == 4:
        if x.shape[0] != 1:
            raise ValueError(f"image_to_uint8 expects a single image; got a batch of {x.shape[0]}")
        x = x[0]
    if x.ndim != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"image_to_uint8 expects [C, H, W] with C in (1, 3); got shape {list(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("image contains NaN or Inf values")
    u8 = torch.round((x.detach().double().cpu().clamp(-1.0, 1.0) + 1.0) * 127.5).to(torch.uint8)
    arr = u8.permute(1, 2, 0).numpy()
    return arr[..., 0] if arr.shape[2] == 1 else arr


@contextlib.contextmanager
def _temp_path_for(target: Path) -> Iterator[Path]:
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_many(writers: dict[Path, Callable[[Path], None]], overwrite: bool = False) -> None:
    """Write several files so that either all of them appear or none does.

    ``writers`` maps each target path to a function writing that file's content to a given path.
    Every file is first written to a temporary file next to its target; only when all writes
    succeeded are they renamed into place. Existing targets raise ``FileExistsError`` unless
    ``overwrite``; on any error the temporary files are removed and nothing is changed.
    """
    targets = [Path(t) for t in writers]
    if not overwrite:
        existing = [str(t) for t in targets if t.exists()]
        if existing:
            raise FileExistsError(f"refusing to overwrite existing file(s): {', '.join(existing)} "
                                  "(choose another output folder or pass overwrite)")
    with contextlib.ExitStack() as stack:
        temps = [stack.enter_context(_temp_path_for(t)) for t in targets]
        for write, tmp in zip(writers.values(), temps, strict=True):
            write(tmp)
        for tmp, target in zip(temps, targets, strict=True):
            os.replace(tmp, target)


def atomic_write(path: str | Path, write: Callable[[Path], None], overwrite: bool = False) -> None:
    """Write one file atomically (temporary file, then rename); see :func:`atomic_write_many`."""
    atomic_write_many({Path(path): write}, overwrite=overwrite)


def save_image(path: str | Path, x: Tensor, overwrite: bool = False) -> None:
    """Write ``x`` (``[1, C, H, W]`` or ``[C, H, W]`` in ``[-1, 1]``, values clipped) as an 8-bit PNG, atomically."""
    from PIL import Image

    arr = image_to_uint8(x)

    def write(tmp: Path) -> None:
        Image.fromarray(arr).save(tmp, format="PNG")

    atomic_write(path, write, overwrite=overwrite)

