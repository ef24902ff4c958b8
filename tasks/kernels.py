"""Blur kernels: Gaussian, seeded random-trajectory motion blur, and kernels read from files.

All kernels are float64 ``[size, size]`` CPU tensors with odd ``size``, non-negative entries
summing to one (a file kernel is normalised unless asked not to be).
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import _random as rnd

__all__ = ["gaussian_kernel", "motion_blur_kernel", "load_kernel"]


def _check_size(size: int, what: str) -> int:
    if isinstance(size, bool) or not isinstance(size, int | np.integer):
        raise ValueError(f"{what}: kernel size must be an odd positive integer; got {size!r}")
    size = int(size)
    if size < 1 or size % 2 == 0:
        raise ValueError(f"{what}: kernel size must be an odd positive integer (centred kernel); got {size}")
    return size


def gaussian_kernel(size: int, std: float, truncate: float | None = None) -> Tensor:
    """Normalised 2-D Gaussian ``k[i, j] ∝ exp(-((i-c)² + (j-c)²) / (2 std²))``, ``c = size // 2``.

    ``truncate``: if given, entries with ``|i - c|`` or ``|j - c|`` above ``int(truncate·std + 0.5)``
    are zero before normalising. ``truncate=4.0`` reproduces the kernel of the DPS / PSLD code, which
    filters a centred impulse with ``scipy.ndimage.gaussian_filter(sigma=std)`` (default truncate 4).
    """
    size = _check_size(size, "gaussian_kernel")
    if not (isinstance(std, int | float) and math.isfinite(std) and std > 0):
        raise ValueError(f"gaussian_kernel: std must be a positive number; got {std!r}")
    if truncate is not None and not truncate > 0:
        raise ValueError(f"gaussian_kernel: truncate must be positive; got {truncate!r}")
    g = _gaussian_1d(size, std, truncate)
    return torch.outer(g, g)


def _gaussian_1d(size: int, std: float, truncate: float | None = None) -> Tensor:
    r = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-0.5 * (r / std) ** 2)
    if truncate is not None:
        radius = int(truncate * std + 0.5)
        g = torch.where(r.abs() <= radius, g, torch.zeros_like(g))
    return g / g.sum()


def _rasterise_polyline(points: Tensor, n: int, width: float) -> Tensor:
    """Anti-aliased stroke of the polyline ``points`` (complex, canvas pixel units) on an ``n x n`` grid.

    Pixel ``(row, col)`` has its centre at ``x = col + 0.5``, ``y = row + 0.5``; coverage is
    ``clamp(width/2 + 0.5 - d, 0, 1)`` with ``d`` the distance to the nearest segment.
    """
    dist = torch.full((n, n), math.inf, dtype=torch.float64)
    pts = [(float(p.real), float(p.imag)) for p in points]
    if len(pts) == 1:
        pts = pts * 2
    reach = width / 2 + 1.0  # pixels farther than this from a segment get zero coverage from it
    for (ax, ay), (bx, by) in zip(pts[:-1], pts[1:], strict=True):
        # only the segment's bounding box (grown by the brush reach) can be covered
        c0 = max(0, int(math.floor(min(ax, bx) - reach)))
        c1 = min(n, int(math.ceil(max(ax, bx) + reach)) + 1)
        r0 = max(0, int(math.floor(min(ay, by) - reach)))
        r1 = min(n, int(math.ceil(max(ay, by) + reach)) + 1)
        if c0 >= c1 or r0 >= r1:
            continue
        px = (torch.arange(c0, c1, dtype=torch.float64) + 0.5)[None, :]
        py = (torch.arange(r0, r1, dtype=torch.float64) + 0.5)[:, None]
        dx, dy = bx - ax, by - ay
        ll = dx * dx + dy * dy
        if ll > 0:
            t = (((px - ax) * dx + (py - ay) * dy) / ll).clamp(0.0, 1.0)
        else:
            t = torch.zeros(r1 - r0, c1 - c0, dtype=torch.float64)
        d = torch.hypot(px - (ax + t * dx), py - (ay + t * dy))
        dist[r0:r1, c0:c1] = torch.minimum(dist[r0:r1, c0:c1], d)
    return (width / 2 + 0.5 - dist).clamp(0.0, 1.0)


def motion_blur_kernel(size: int = 61, intensity: float = 0.5,
                       generator: torch.Generator | None = None, max_tries: int = 10) -> Tensor:
    """A random camera-shake kernel from a seeded random-walk trajectory (``[size, size]``, sums to 1).

    Same controls as the ``MotionBlur`` package's ``Kernel(size, intensity)`` used by the DPS / PSLD
    protocols (size 61 or 121, intensity 0.5): ``intensity`` in ``[0, 1]``, 0 giving a straight
    motion, 1 a long, strongly curved one. The construction follows the same recipe on a canvas
    twice the kernel size (side ``N = 2·size``, diagonal ``D = √2·N``):

    1. total path length ``L = 0.75·D·(U(0,1) + U(0, intensity²))``; steps of length
       ``Beta(1, 30)·(1 − intensity + 0.1)·D`` (steps longer than ``L`` are redrawn) until they add up
       to ``L`` (if 16384 draws do not reach ``L``, a last step of the remaining length is added);
    2. angles: ``θ_max = U(0, intensity·π)``, sign-flip probability ``Beta(2, 20)``; the first angle is
       ``U(−θ_max, θ_max)``, each next one has magnitude ``Triangular(0, intensity·θ_max, θ_max + 0.1)``
       and keeps the previous sign unless flipped;
    3. the path (starting at the origin) is centred on its vertices' mean, rotated by ``U(0, π)`` and
       moved to the canvas centre;
    4. it is drawn as an anti-aliased line of width ``max(1, D/150)``, blurred by a Gaussian of std
       ``max(0.5, 0.01·D)``, reduced to ``size x size`` by ``2x2`` averaging, and normalised.

    All draws come from ``generator`` (a CPU ``torch.Generator``; a fresh one seeded with 0 if
    ``None``), so a seed always gives the same kernel. The kernels are not bit-identical to the
    package's (its numpy RNG is unseeded there and its rasteriser is PIL's).
    """
    size = _check_size(size, "motion_blur_kernel")
    if not (isinstance(intensity, int | float) and 0.0 <= intensity <= 1.0):
        raise ValueError(f"motion_blur_kernel: intensity must be a number in [0, 1]; got {intensity!r}")
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    g = generator
    eps = 0.1
    n = 2 * size
    diag = math.sqrt(2.0) * n
    for _ in range(max_tries):
        # 1. step lengths
        max_len = 0.75 * diag * (rnd.uniform(g) + rnd.uniform(g, 0.0, intensity**2))
        scale = (1.0 - intensity + eps) * diag
        steps: list[float] = []
        total = 0.0
        for _batch in range(256):  # draws come 64 at a time; a cap keeps a tiny max_len from looping long
            for s in (rnd.beta_1b(g, 30.0, 64) * scale).tolist():
                if s < max_len:
                    steps.append(s)
                    total += s
                    if total >= max_len:
                        break
            if total >= max_len:
                break
        else:  # (almost never) draws kept exceeding a tiny L: close the path with the remainder
            steps.append(max_len - total)
        # 2. angles
        max_angle = rnd.uniform(g, 0.0, intensity * math.pi)
        jitter = rnd.beta_int(g, 2, 20)
        n_steps = len(steps)
        mags = rnd.triangular(g, 0.0, intensity * max_angle, max_angle + eps, max(n_steps - 1, 1))
        flips = rnd.uniforms(g, max(n_steps - 1, 1)) < jitter
        angles = [rnd.uniform(g, -max_angle, max_angle)]
        sign = 1.0 if angles[0] >= 0 else -1.0
        for i in range(n_steps - 1):
            if bool(flips[i]):
                sign = -sign
            angles.append(sign * float(mags[i]))
        # 3. path
        inc = torch.polar(torch.tensor(steps, dtype=torch.float64), torch.tensor(angles, dtype=torch.float64))
        path = torch.cat([torch.zeros(1, dtype=torch.complex128), torch.cumsum(inc, 0)])
        path = path - path.mean()
        rot = rnd.uniform(g, 0.0, math.pi)
        path = path * complex(math.cos(rot), math.sin(rot)) + complex(n / 2, n / 2)
        # 4. raster, blur, reduce
        canvas = _rasterise_polyline(path, n, max(1.0, diag / 150.0))
        sigma = max(0.5, 0.01 * diag)
        radius = int(math.ceil(3 * sigma))
        g1 = _gaussian_1d(2 * radius + 1, sigma)
        canvas = F.pad(canvas[None, None], (radius,) * 4)
        canvas = F.conv2d(F.conv2d(canvas, g1.view(1, 1, 1, -1)), g1.view(1, 1, -1, 1))
        k = F.avg_pool2d(canvas, 2)[0, 0]
        total_mass = float(k.sum())
        if total_mass > 0:
            return k / total_mass
    raise RuntimeError(f"motion_blur_kernel: no trajectory fell inside the {size}x{size} kernel after "
                       f"{max_tries} tries")


def load_kernel(path: str | Path, normalize: bool = True) -> Tensor:
    """Read a blur kernel from ``.npy``, ``.pt``/``.pth`` (a tensor) or an image file (PNG etc., grey levels).

    Returns float64 ``[kh, kw]`` with odd sizes; ``normalize`` divides by the sum (which must be
    positive). Raises ``FileNotFoundError`` / ``ValueError`` with the path on a missing or unreadable
    file, a non-2-D array, even sizes, negative sums or NaN / Inf.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"kernel file not found: {p}")
    suffix = p.suffix.lower()
    try:
        if suffix == ".npy":
            k = torch.from_numpy(np.load(p, allow_pickle=False))
        elif suffix in (".pt", ".pth"):
            k = torch.load(p, map_location="cpu", weights_only=True)
            if not isinstance(k, Tensor):
                raise ValueError("the file does not hold a single tensor")
        else:
            from PIL import Image

            with Image.open(p) as im:
                k = torch.from_numpy(np.asarray(im.convert("F"), dtype=np.float64).copy())
    except pickle.UnpicklingError as exc:  # torch.load(weights_only=True) refusing pickled objects
        raise ValueError(f"cannot read a kernel from {p}: the file holds pickled Python objects, not only a tensor, "
                         "and is not loaded (unsafe); save the kernel with torch.save(tensor) or as .npy") from exc
    except (OSError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"cannot read a kernel from {p}: {first}") from exc
    k = k.to(torch.float64)
    if k.ndim == 3 and k.shape[0] == 1:
        k = k[0]
    if k.ndim != 2:
        raise ValueError(f"kernel in {p} must be 2-D; got shape {list(k.shape)}")
    if k.shape[0] % 2 == 0 or k.shape[1] % 2 == 0:
        raise ValueError(f"kernel in {p} must have odd sizes (centred); got {k.shape[0]}x{k.shape[1]}")
    if not bool(torch.isfinite(k).all()):
        raise ValueError(f"kernel in {p} contains NaN or Inf")
    if normalize:
        s = float(k.sum())
        if not s > 0:
            raise ValueError(f"kernel in {p} sums to {s}; cannot normalise")
        k = k / s
    return k
