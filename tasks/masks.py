"""Inpainting masks: box, random pixels, free-form strokes, and masks read from PNG files.

Convention: a mask is a float64 CPU tensor ``[C, H, W]`` with ``C = 1`` (shared by all channels)
or ``C`` = the image's channel count; ``1`` marks an observed pixel, ``0`` a missing one (a hole).
Random masks take a CPU ``torch.Generator``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from . import _random as rnd

__all__ = ["box_mask", "random_mask", "freeform_mask", "png_mask"]


def _check_hw(height: int, width: int, what: str) -> None:
    for v in (height, width):
        if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1:
            raise ValueError(f"{what}: image height and width must be positive integers; got {height}x{width}")


def _pair(v: int | Sequence[int], what: str) -> tuple[int, int]:
    if isinstance(v, int | np.integer) and not isinstance(v, bool):
        return int(v), int(v)
    if isinstance(v, Sequence) and len(v) == 2 and all(isinstance(u, int | np.integer) for u in v):
        return int(v[0]), int(v[1])
    raise ValueError(f"{what} must be an int or a pair of ints; got {v!r}")


def box_mask(height: int, width: int, box_size: int | Sequence[int] = 128, position: str = "center",
             margin: int = 0, generator: torch.Generator | None = None) -> Tensor:
    """A rectangular hole of ``box_size`` (``int`` or ``(h, w)``) in an ``height x width`` image; ``[1, H, W]``.

    ``position="center"``: the box's top-left corner is at ``((H - h) // 2, (W - w) // 2)``.
    ``position="random"``: the top-left corner is uniform over positions that keep the box at least
    ``margin`` pixels inside every edge (the DPS protocol uses ``margin=16``), drawn from ``generator``.
    """
    _check_hw(height, width, "box_mask")
    bh, bw = _pair(box_size, "box_mask: box_size")
    if bh < 1 or bw < 1:
        raise ValueError(f"box_mask: box size must be positive; got {bh}x{bw}")
    if isinstance(margin, bool) or not isinstance(margin, int) or margin < 0:
        raise ValueError(f"box_mask: margin must be a non-negative integer; got {margin!r}")
    if bh + 2 * margin > height or bw + 2 * margin > width:
        raise ValueError(f"box_mask: a {bh}x{bw} box with margin {margin} does not fit in a {height}x{width} image")
    if position == "center":
        top, left = (height - bh) // 2, (width - bw) // 2
    elif position == "random":
        if generator is None:
            raise ValueError("box_mask: position='random' needs a generator")
        top = rnd.randint(generator, margin, height - margin - bh + 1)
        left = rnd.randint(generator, margin, width - margin - bw + 1)
    else:
        raise ValueError(f"box_mask: position must be 'center' or 'random'; got {position!r}")
    m = torch.ones(1, height, width, dtype=torch.float64)
    m[:, top:top + bh, left:left + bw] = 0.0
    return m


def random_mask(height: int, width: int, drop: float | Sequence[float] = 0.92, channels: int = 3,
                shared_channels: bool = True, generator: torch.Generator | None = None) -> Tensor:
    """Random missing pixels: exactly ``floor(drop · n)`` of the ``n`` entries are holes.

    ``drop`` is the fraction of entries removed, in ``[0, 1]``, or a range ``(lo, hi)`` from which
    one fraction is drawn uniformly (the DPS code uses ``(0.3, 0.7)``; the DPS paper states 92%).
    ``shared_channels=True``: one ``[1, H, W]`` mask for all channels (``n = H·W``, as in DPS);
    ``False``: an independent hole pattern per channel, ``[channels, H, W]`` (``n = channels·H·W``).
    The holes are a uniformly random subset (random permutation from ``generator``).
    """
    _check_hw(height, width, "random_mask")
    if generator is None:
        raise ValueError("random_mask needs a generator")
    if isinstance(drop, int | float) and not isinstance(drop, bool):
        frac = float(drop)
        if not 0.0 <= frac <= 1.0:
            raise ValueError(f"random_mask: drop fraction must be in [0, 1]; got {drop}")
    elif isinstance(drop, Sequence) and len(drop) == 2:
        lo, hi = float(drop[0]), float(drop[1])
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"random_mask: drop range must satisfy 0 <= lo <= hi <= 1; got {list(drop)}")
        frac = rnd.uniform(generator, lo, hi)
    else:
        raise ValueError(f"random_mask: drop must be a fraction or a (lo, hi) range; got {drop!r}")
    c = 1 if shared_channels else int(channels)
    if c < 1:
        raise ValueError(f"random_mask: channels must be >= 1; got {channels}")
    n = c * height * width
    n_drop = int(math.floor(frac * n))
    perm = torch.randperm(n, generator=generator)
    m = torch.ones(n, dtype=torch.float64)
    m[perm[:n_drop]] = 0.0
    return m.view(c, height, width)


def _stroke_holes(height: int, width: int, g: torch.Generator, max_vertices: int,
                  width_range: tuple[float, float], length_range: tuple[float, float]) -> Tensor:
    """One random brush stroke (boolean ``[H, W]``): a random walk drawn with a round brush."""
    size = min(height, width)
    n_vert = rnd.randint(g, 2, max_vertices + 1)
    brush = max(1.0, rnd.uniform(g, *width_range) * size)
    x, y = rnd.uniform(g, 0, width), rnd.uniform(g, 0, height)
    angle = rnd.uniform(g, 0, 2 * math.pi)
    pts = [(x, y)]
    for _ in range(n_vert - 1):
        angle += rnd.uniform(g, -math.pi / 2, math.pi / 2)
        length = rnd.uniform(g, *length_range) * size
        x = min(max(x + length * math.cos(angle), 0.0), float(width))
        y = min(max(y + length * math.sin(angle), 0.0), float(height))
        pts.append((x, y))
    px = (torch.arange(width, dtype=torch.float64) + 0.5)[None, :]
    py = (torch.arange(height, dtype=torch.float64) + 0.5)[:, None]
    holes = torch.zeros(height, width, dtype=torch.bool)
    for (ax, ay), (bx, by) in zip(pts[:-1], pts[1:], strict=True):
        dx, dy = bx - ax, by - ay
        ll = dx * dx + dy * dy
        t = (((px - ax) * dx + (py - ay) * dy) / ll).clamp(0, 1) if ll > 0 else torch.zeros(height, width,
                                                                                               dtype=torch.float64)
        d = torch.hypot(px - (ax + t * dx), py - (ay + t * dy))
        holes |= d <= brush / 2
    return holes


def freeform_mask(height: int, width: int, coverage: Sequence[float] = (0.1, 0.3),
                  generator: torch.Generator | None = None, max_vertices: int = 8,
                  brush_width: Sequence[float] = (0.04, 0.1), stroke_length: Sequence[float] = (0.1, 0.3),
                  max_strokes: int = 200) -> Tensor:
    """Free-form holes from seeded random brush strokes; ``[1, H, W]``.

    Strokes are random walks of 2..``max_vertices`` vertices, each segment turning by up to ±90°,
    segment lengths ``stroke_length`` and round-brush widths ``brush_width`` given as fractions of
    ``min(H, W)``. Strokes are added one at a time; a stroke that would push the hole fraction above
    ``coverage[1]`` is discarded; drawing stops once the hole fraction reaches ``coverage[0]``.
    Raises ``RuntimeError`` if ``max_strokes`` strokes do not reach the range (e.g. a range too narrow
    for the image size).
    """
    _check_hw(height, width, "freeform_mask")
    if generator is None:
        raise ValueError("freeform_mask needs a generator")
    if len(coverage) != 2 or not 0.0 < float(coverage[0]) <= float(coverage[1]) <= 1.0:
        raise ValueError(f"freeform_mask: coverage must be (lo, hi) with 0 < lo <= hi <= 1; got {coverage!r}")
    lo, hi = float(coverage[0]), float(coverage[1])
    if isinstance(max_vertices, bool) or not isinstance(max_vertices, int) or max_vertices < 2:
        raise ValueError(f"freeform_mask: max_vertices must be an integer >= 2; got {max_vertices!r}")
    for name, rng in (("brush_width", brush_width), ("stroke_length", stroke_length)):
        if len(rng) != 2 or not 0.0 < float(rng[0]) <= float(rng[1]):
            raise ValueError(f"freeform_mask: {name} must be (lo, hi) with 0 < lo <= hi; got {rng!r}")
    holes = torch.zeros(height, width, dtype=torch.bool)
    n = height * width
    for _ in range(max_strokes):
        cand = holes | _stroke_holes(height, width, generator, max_vertices,
                                     (float(brush_width[0]), float(brush_width[1])),
                                     (float(stroke_length[0]), float(stroke_length[1])))
        frac = int(cand.sum()) / n
        if frac > hi:
            continue
        holes = cand
        if frac >= lo:
            return (~holes).to(torch.float64)[None]
    raise RuntimeError(
        f"freeform_mask: {max_strokes} strokes did not give a hole fraction in [{lo}, {hi}] on a "
        f"{height}x{width} image (reached {int(holes.sum()) / n:.3f}); widen the coverage range or "
        "change brush_width / stroke_length"
    )


def png_mask(path: str | Path, height: int | None = None, width: int | None = None,
             keep: str = "white", threshold: int = 128) -> Tensor:
    """Read a mask from an image file (PNG etc.); ``[1, H, W]`` float64 of 0/1.

    The file is read as grey levels with :func:`hessdiff.utils.images.load_image` (so 16-bit files are
    scaled, not clipped, and the EXIF orientation is applied, as for images) and quantised to
    ``0..255``; with ``keep="white"`` pixels ``>= threshold`` are
    observed (1) and darker ones are holes (0); ``keep="black"`` swaps this. If ``height`` / ``width``
    are given the file must have that size. Raises ``FileNotFoundError`` (missing file) or
    ``ValueError`` (unreadable file, wrong size, bad options), naming the path.
    """
    from hessdiff.utils.images import load_image, to_uint8

    p = Path(path)
    if keep not in ("white", "black"):
        raise ValueError(f"png_mask: keep must be 'white' or 'black'; got {keep!r}")
    if not 0 <= int(threshold) <= 255:
        raise ValueError(f"png_mask: threshold must be in [0, 255]; got {threshold}")
    if not p.is_file():
        raise FileNotFoundError(f"mask file not found: {p}")
    try:
        grey = to_uint8(load_image(p, channels=1))[0, 0].numpy()
    except ValueError as exc:
        raise ValueError(f"cannot read a mask image from {p}: {exc.__cause__ or exc}") from exc
    h, w = grey.shape
    if (height is not None and h != height) or (width is not None and w != width):
        raise ValueError(f"mask {p} is {h}x{w} but the image is {height}x{width}; "
                         "resize the mask or the image so that they match")
    observed = grey >= int(threshold)
    if keep == "black":
        observed = ~observed
    return torch.from_numpy(observed.astype(np.float64))[None]
