"""Pictures for people: images side by side with captions, tiled grids, nearest-neighbour enlargement.

Every function takes and returns uint8 ``[H, W, 3]`` numpy arrays (``to_rgb_uint8`` makes one from a
``[-1, 1]`` tensor with the fixed mapping of :func:`~hessdiff.utils.images.to_uint8_array`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import Tensor

from hessdiff.utils.images import to_uint8_array

__all__ = ["blank_tile", "image_grid", "labelled_grid", "labelled_row", "to_rgb_uint8", "upscale_nearest"]


def to_rgb_uint8(x: Tensor) -> np.ndarray:
    """One image ``[1, C, H, W]`` / ``[C, H, W]`` in [-1, 1] (C = 1 or 3) -> uint8 ``[H, W, 3]``,
    with the fixed mapping ``round((clamp(x, -1, 1) + 1) * 127.5)`` (never a per-image min-max)."""
    arr = to_uint8_array(x.detach().float().cpu())
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    return np.ascontiguousarray(arr)


def upscale_nearest(arr: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upscaling of an ``[H, W, ...]`` array by an integer ``factor`` (pixels stay sharp)."""
    if factor <= 1:
        return arr
    return np.repeat(np.repeat(arr, factor, axis=0), factor, axis=1)


def _fit_factor(side: int, min_side: int) -> int:
    return max(1, -(-int(min_side) // max(1, int(side))))


def image_grid(pictures: Sequence[np.ndarray], *, ncols: int | None = None, min_tile: int = 64,
               gap: int = 2) -> np.ndarray:
    """Tile uint8 ``[H, W, 3]`` pictures (all the same size) into a grid, ``ncols`` columns (default: about
    square), each upscaled by nearest neighbour to at least ``min_tile`` pixels, with ``gap`` white pixels."""
    if not pictures:
        raise ValueError("image_grid: no pictures")
    h, w = pictures[0].shape[:2]
    if any(p.shape != pictures[0].shape for p in pictures):
        raise ValueError("image_grid: all pictures must have the same shape")
    n = len(pictures)
    ncols = ncols or int(np.ceil(np.sqrt(n)))
    nrows = int(np.ceil(n / ncols))
    f = _fit_factor(min(h, w), min_tile)
    th, tw = h * f, w * f
    grid = np.full((nrows * th + (nrows - 1) * gap, ncols * tw + (ncols - 1) * gap, 3), 255, dtype=np.uint8)
    for k, p in enumerate(pictures):
        r, c = divmod(k, ncols)
        grid[r * (th + gap): r * (th + gap) + th, c * (tw + gap): c * (tw + gap) + tw] = upscale_nearest(p, f)
    return grid


def labelled_row(pictures: Sequence[np.ndarray], labels: Sequence[str], *, min_side: int = 128,
                 gap: int = 4) -> np.ndarray:
    """Pictures side by side (uint8 ``[H_i, W_i, 3]``), each upscaled by nearest neighbour to the height of
    the tallest one and to at least ``min_side`` pixels, with a caption strip above each."""
    from PIL import Image, ImageDraw, ImageFont

    if len(pictures) != len(labels) or not pictures:
        raise ValueError("labelled_row: one label per picture")
    height = max(max(p.shape[0] for p in pictures), min_side)
    panels = []
    for p in pictures:
        f = _fit_factor(p.shape[0], height)
        q = upscale_nearest(p, f)
        if q.shape[0] != height:  # sizes that do not divide: resample the last bit with nearest neighbour
            w = max(1, round(q.shape[1] * height / q.shape[0]))
            q = np.asarray(Image.fromarray(q).resize((w, height), resample=Image.NEAREST))
        panels.append(q)
    caption = 16
    total_w = sum(p.shape[1] for p in panels) + gap * (len(panels) - 1)
    canvas = Image.new("RGB", (total_w, height + caption), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    x = 0
    for p, label in zip(panels, labels, strict=True):
        canvas.paste(Image.fromarray(p), (x, caption))
        tw = draw.textlength(label, font=font)
        draw.text((x + max(0, (p.shape[1] - tw) / 2), 2), label, fill=(0, 0, 0), font=font)
        x += p.shape[1] + gap
    return np.asarray(canvas)


def blank_tile(height: int, width: int, text: str = "") -> np.ndarray:
    """A light grey ``[height, width, 3]`` tile with ``text`` in its middle (a missing picture)."""
    from PIL import Image, ImageDraw, ImageFont

    tile = Image.new("RGB", (max(1, width), max(1, height)), (225, 225, 225))
    if text:
        draw = ImageDraw.Draw(tile)
        font = ImageFont.load_default()
        tw = draw.textlength(text, font=font)
        draw.text((max(0, (width - tw) / 2), max(0, height / 2 - 6)), text, fill=(90, 90, 90), font=font)
    return np.asarray(tile)


def labelled_grid(rows: Sequence[Sequence[np.ndarray]], labels: Sequence[str], *, min_side: int = 96,
                  gap: int = 4) -> np.ndarray:
    """Rows of pictures under one caption strip (``labels``, one per column): each row as
    :func:`labelled_row` makes it (captions only above the first row), stacked with ``gap`` white pixels.
    Pictures of one column may differ in size (e.g. a low-resolution measurement): each is enlarged by
    nearest neighbour to the row's height."""
    if not rows:
        raise ValueError("labelled_grid: no rows")
    if any(len(r) != len(labels) for r in rows):
        raise ValueError("labelled_grid: every row needs one picture per label")
    built = [labelled_row(list(r), list(labels) if k == 0 else [""] * len(labels), min_side=min_side, gap=gap)
             for k, r in enumerate(rows)]
    built = [b if k == 0 else b[16:] for k, b in enumerate(built)]  # one caption strip, on top
    width = max(b.shape[1] for b in built)
    out = np.full((sum(b.shape[0] for b in built) + gap * (len(built) - 1), width, 3), 255, dtype=np.uint8)
    y = 0
    for b in built:
        out[y: y + b.shape[0], : b.shape[1]] = b
        y += b.shape[0] + gap
    return out
