"""Measurement noise models.

Noise is drawn on the CPU in float64 from explicit ``torch.Generator``s (one per image, or one for
the whole batch), then cast to the measurement's dtype and device, so a seed gives the same noise
on any device and in any dtype (up to the final rounding).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["NoiseModel", "NoNoise", "GaussianNoise", "PoissonNoise", "from_scale", "SCALES", "noise_from_config"]

#: value-range conventions understood by :func:`from_scale`: the width of the range relative to [-1, 1]
SCALES: dict[str, float] = {"[-1,1]": 1.0, "[0,1]": 2.0, "0-255": 2.0 / 255.0}


def from_scale(value: float, scale: str = "[-1,1]") -> float:
    """Convert a noise level stated for images in ``scale`` to the ``[-1, 1]`` image scale.

    ``"[0,1]"``: ``σ_[-1,1] = 2·σ``; ``"0-255"``: ``σ_[-1,1] = 2·σ/255``; ``"[-1,1]"``: unchanged.
    E.g. ``from_scale(0.025, "[0,1]") == 0.05``, ``from_scale(12.75, "0-255") == 0.1``.
    """
    key = scale.replace(" ", "")
    if key not in SCALES:
        raise ValueError(f"unknown value scale {scale!r}; choose one of {', '.join(SCALES)}")
    v = float(value)
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"noise level must be a finite non-negative number; got {value!r}")
    return v * SCALES[key]


def _generators(generator: torch.Generator | Sequence[torch.Generator] | None, batch: int) -> list[torch.Generator]:
    if generator is None:
        raise ValueError("noise draws need a torch.Generator (or one per image); library code never uses the "
                         "global RNG")
    if isinstance(generator, torch.Generator):
        return [generator] * batch
    gens = list(generator)
    if len(gens) != batch:
        raise ValueError(f"got {len(gens)} generators for a batch of {batch} measurements")
    return gens


def _check_measurement(y: Tensor, who: str) -> None:
    if not isinstance(y, Tensor) or not y.is_floating_point():
        raise ValueError(f"{who}: measurement must be a floating-point tensor")
    if y.ndim < 1 or y.shape[0] < 1:
        raise ValueError(f"{who}: measurement must have a leading batch dimension; got shape {list(y.shape)}")
    if not bool(torch.isfinite(y).all()):
        raise ValueError(f"{who}: measurement contains NaN or Inf values")


class NoiseModel:
    """Base class: ``noise(y, generator) -> y_noisy`` where ``generator`` is one CPU generator or one per image."""

    def __call__(self, y: Tensor, generator: torch.Generator | Sequence[torch.Generator] | None) -> Tensor:
        raise NotImplementedError

    def get_config(self) -> dict[str, Any]:
        raise NotImplementedError


class NoNoise(NoiseModel):
    """Noise-free measurements: returns ``y`` unchanged (draws nothing)."""

    sigma = 0.0

    def __call__(self, y: Tensor, generator: torch.Generator | Sequence[torch.Generator] | None = None) -> Tensor:
        _check_measurement(y, "NoNoise")
        return y

    def get_config(self) -> dict[str, Any]:
        return {"type": "none"}

    def __repr__(self) -> str:
        return "NoNoise()"


class GaussianNoise(NoiseModel):
    """Additive white Gaussian noise ``y + σ·n``, ``n ~ N(0, I)``, with ``σ`` on the ``[-1, 1]`` image scale.

    Use :func:`from_scale` (or ``GaussianNoise.from_scale``) for a level stated on ``[0, 1]`` or 0-255.
    """

    def __init__(self, sigma: float = 0.05) -> None:
        s = float(sigma)
        if not math.isfinite(s) or s < 0:
            raise ValueError(f"GaussianNoise: sigma_y must be a finite non-negative number; got {sigma!r}")
        self.sigma = s

    @classmethod
    def from_scale(cls, value: float, scale: str = "[-1,1]") -> GaussianNoise:
        """``GaussianNoise(from_scale(value, scale))``."""
        return cls(from_scale(value, scale))

    def __call__(self, y: Tensor, generator: torch.Generator | Sequence[torch.Generator] | None) -> Tensor:
        _check_measurement(y, "GaussianNoise")
        gens = _generators(generator, y.shape[0])
        if self.sigma == 0:
            return y
        n = torch.stack([torch.randn(y.shape[1:], generator=g, dtype=torch.float64) for g in gens])
        return y + (self.sigma * n).to(device=y.device, dtype=y.dtype)

    def get_config(self) -> dict[str, Any]:
        return {"type": "gaussian", "sigma": self.sigma}

    def __repr__(self) -> str:
        return f"GaussianNoise(sigma={self.sigma})"


class PoissonNoise(NoiseModel):
    """Poisson (shot) noise on images in ``[-1, 1]``, as in the DPS code.

    The image is mapped to ``[0, 1]`` (``u = clamp((y + 1)/2, 0, 1)``), photon counts are drawn as
    ``Poisson(255·rate·u)``, divided by ``255·rate`` and mapped back to ``[-1, 1]``; the result is
    clipped to ``[-1, 1]`` when ``clip`` is true. Larger ``rate`` means less noise.
    """

    def __init__(self, rate: float = 1.0, clip: bool = True) -> None:
        r = float(rate)
        if not math.isfinite(r) or r <= 0:
            raise ValueError(f"PoissonNoise: rate must be a finite positive number; got {rate!r}")
        self.rate = r
        self.clip = bool(clip)

    def __call__(self, y: Tensor, generator: torch.Generator | Sequence[torch.Generator] | None) -> Tensor:
        _check_measurement(y, "PoissonNoise")
        gens = _generators(generator, y.shape[0])
        peak = 255.0 * self.rate
        u = ((y.detach().to(device="cpu", dtype=torch.float64) + 1.0) / 2.0).clamp(0.0, 1.0)
        counts = torch.stack([torch.poisson(u[i] * peak, generator=g) for i, g in enumerate(gens)])
        out = counts / peak * 2.0 - 1.0
        if self.clip:
            out = out.clamp(-1.0, 1.0)
        return out.to(device=y.device, dtype=y.dtype)

    def get_config(self) -> dict[str, Any]:
        return {"type": "poisson", "rate": self.rate, "clip": self.clip}

    def __repr__(self) -> str:
        return f"PoissonNoise(rate={self.rate}, clip={self.clip})"


def noise_from_config(config: dict[str, Any]) -> NoiseModel:
    """Rebuild a noise model from ``get_config()`` output."""
    kind = config.get("type")
    if kind == "none":
        return NoNoise()
    if kind == "gaussian":
        return GaussianNoise(config["sigma"])
    if kind == "poisson":
        return PoissonNoise(config["rate"], config.get("clip", True))
    raise ValueError(f"unknown noise type {kind!r}; known: none, gaussian, poisson")
