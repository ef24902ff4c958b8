"""Seeded random draws used by the mask, kernel and noise generators.

Every function here takes an explicit CPU ``torch.Generator``; nothing touches the global RNG.
Draws are made in float64 on the CPU, so a given seed gives the same numbers whatever device or
dtype the images later live on.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

__all__ = [
    "SeedLike",
    "generators_for_batch",
    "check_seed",
    "uniform",
    "uniforms",
    "randint",
    "beta_1b",
    "beta_int",
    "triangular",
]

#: what ``Task.measure`` and friends accept as randomness for a batch of ``B`` images:
#: ``None`` (seed 0), an int seed (image ``i`` uses seed ``seed + i``), a list of ``B`` int seeds,
#: one ``torch.Generator`` (drawn from for every image in order, so results depend on the batch
#: layout) or a list of ``B`` generators (one per image).
SeedLike = int | Sequence[int] | torch.Generator | Sequence[torch.Generator] | None


def check_seed(seed: object) -> int:
    """Return ``seed`` as an int, raising ``ValueError`` unless it is a non-negative integer."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"a seed must be a non-negative integer; got {seed!r}")
    seed = int(seed)
    if seed < 0 or seed >= 2**63:
        raise ValueError(f"a seed must be a non-negative integer below 2**63; got {seed}")
    return seed


def _cpu_generator(seed: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


def generators_for_batch(seed: SeedLike, batch: int) -> tuple[list[torch.Generator], list[int] | None]:
    """One generator per image for a batch of ``batch`` images.

    Returns ``(generators, seeds)``. ``seeds`` lists the integer seed of each image, or is
    ``None`` when generators were passed in (then the draws cannot be recorded as seeds).

    * ``None`` -> seeds ``0, 1, ..., batch-1``;
    * ``int s`` -> seeds ``s, s+1, ..., s+batch-1`` (image ``i`` depends only on ``s + i``);
    * a list of ints -> one seed per image;
    * one ``torch.Generator`` -> the same generator for every image, drawn from in image order
      (so image ``i``'s draws depend on the images before it);
    * a list of generators -> one per image.
    """
    if batch < 1:
        raise ValueError(f"batch size must be >= 1; got {batch}")
    if seed is None:
        seed = 0
    if isinstance(seed, torch.Generator):
        if seed.device.type != "cpu":
            raise ValueError("generators for masks, kernels and noise must be CPU generators "
                             "(draws are made on the CPU so results do not depend on the device)")
        return [seed] * batch, None
    if isinstance(seed, Sequence) and not isinstance(seed, str | bytes):
        items = list(seed)
        if len(items) != batch:
            raise ValueError(f"got {len(items)} seeds/generators for a batch of {batch} images; "
                             "pass exactly one per image")
        if all(isinstance(s, torch.Generator) for s in items):
            for g in items:
                if g.device.type != "cpu":
                    raise ValueError("generators for masks, kernels and noise must be CPU generators")
            return items, None
        seeds = [check_seed(s) for s in items]
        return [_cpu_generator(s) for s in seeds], seeds
    s0 = check_seed(seed)
    seeds = [s0 + i for i in range(batch)]
    return [_cpu_generator(s) for s in seeds], seeds


def uniforms(g: torch.Generator, n: int, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    """``n`` draws from ``U[low, high)`` as a float64 CPU tensor."""
    return low + (high - low) * torch.rand(n, generator=g, dtype=torch.float64)


def uniform(g: torch.Generator, low: float = 0.0, high: float = 1.0) -> float:
    """One draw from ``U[low, high)``."""
    return float(uniforms(g, 1, low, high)[0])


def randint(g: torch.Generator, low: int, high: int) -> int:
    """One integer uniformly from ``[low, high)`` (``high > low``)."""
    if high <= low:
        raise ValueError(f"randint needs high > low; got [{low}, {high})")
    return int(torch.randint(low, high, (1,), generator=g)[0])


def beta_1b(g: torch.Generator, b: float, n: int) -> torch.Tensor:
    """``n`` draws from Beta(1, b) by inversion: ``1 - (1 - U)^(1/b)``."""
    u = uniforms(g, n)
    return 1.0 - torch.pow(1.0 - u, 1.0 / b)


def beta_int(g: torch.Generator, a: int, b: int) -> float:
    """One draw from Beta(a, b) for integer ``a, b >= 1``: the ``a``-th smallest of ``a+b-1`` uniforms."""
    u = torch.sort(uniforms(g, a + b - 1)).values
    return float(u[a - 1])


def triangular(g: torch.Generator, left: float, mode: float, right: float, n: int) -> torch.Tensor:
    """``n`` draws from the triangular distribution on ``[left, right]`` with the given mode (inversion)."""
    if not left <= mode <= right or right <= left:
        raise ValueError(f"triangular needs left <= mode <= right and left < right; got {left}, {mode}, {right}")
    u = uniforms(g, n)
    width = right - left
    fc = (mode - left) / width
    lo = left + torch.sqrt(u * width * (mode - left))
    hi = right - torch.sqrt((1.0 - u) * width * (right - mode))
    out = torch.where(u < fc, lo, hi)
    return out.clamp(left, right)
