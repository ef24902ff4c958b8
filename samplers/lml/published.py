"""The published LML correction (Wang et al., ICCV 2025, released code) and its control.

:class:`LMLCorrection` is the rank-one Levenberg--Marquardt map of the released code, applied to a
solver's proposed update vector (:class:`~hessdiff.samplers.loop.Proposal`). With the published
``kappa = 0`` it is **the identity in exact arithmetic**; what it changes in float32 is rounding noise
of relative size about ``3.4e-8 |g|^2 / lamb`` (:func:`lml_rounding_law`).
:class:`MatchedNoiseCorrection` is the control experiment: a random perturbation of the same size.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..loop import Proposal
from .lowrank import flat

__all__ = [
    "PUBLISHED_LAMBDA", "PRECISIONS", "NONFINITE", "ROUNDING_CONSTANT", "published_lambda", "lm_correct",
    "lml_rounding_law", "LMLCorrection", "MatchedNoiseCorrection", "check_lamb_kappa", "check_precision",
]

PRECISIONS = ("float32", "float64")
#: lambda values tuned in the released README (CIFAR-10: DPM-Solver-3 + LML, by NFE; others: one value)
PUBLISHED_LAMBDA: dict[str, Any] = {
    "cifar10": {5: 8e-4, 6: 8e-4, 7: 1e-3, 8: 1e-3, 9: 1e-3, 10: 8e-4, 12: 1e-3, 15: 1e-3, 20: 5e-4, 30: 3e-4,
                50: 1e-4, 100: 5e-5},
    "celebahq-ldm": 5e-3,
    "sd": 1e-3,
    "flux": 1e-2,
}

#: relative rounding change per call of the float32 published correction, per unit of |g|^2 / lamb
ROUNDING_CONSTANT = 3.4e-8


def published_lambda(setting: str = "cifar10", nfe: int | None = None) -> float:
    """The ``lamb`` the released README uses for ``setting`` (``cifar10`` needs ``nfe``; nearest tuned NFE)."""
    if setting not in PUBLISHED_LAMBDA:
        raise ValueError(f"unknown setting {setting!r}; expected one of {sorted(PUBLISHED_LAMBDA)}")
    v = PUBLISHED_LAMBDA[setting]
    if isinstance(v, dict):
        if nfe is None:
            raise ValueError(f"setting {setting!r} is tuned per NFE; pass nfe")
        key = min(v, key=lambda k: (abs(k - int(nfe)), k))
        return float(v[key])
    return float(v)


def check_lamb_kappa(lamb: float, kappa: float) -> None:
    if not isinstance(lamb, int | float) or isinstance(lamb, bool) or not math.isfinite(lamb) or lamb <= 0:
        raise ValueError(f"lamb (the Levenberg-Marquardt damping) must be a finite number > 0, got {lamb!r}")
    if not isinstance(kappa, int | float) or isinstance(kappa, bool) or not 0.0 <= kappa <= 1.0:
        raise ValueError(f"kappa (the history weight) must lie in [0, 1], got {kappa!r}")


def check_precision(precision: str) -> torch.dtype:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
    return torch.float32 if precision == "float32" else torch.float64


# ----------------------------------------------------------------------------------------------------
# 1. The published correction
# ----------------------------------------------------------------------------------------------------
NONFINITE = ("raise", "nan", "keep")


def lm_correct(g: Tensor, prev: Tensor | None, lamb: float, kappa: float = 0.0,
               precision: str = "float32", nonfinite: str = "raise") -> Tensor:
    """The released LML map of an update vector ``g`` (per sample, flattened).

    ``u = g`` (no history) or ``kappa p + (1 - kappa) g`` (``p`` = previous *uncorrected* update),
    ``q = g - u <u, g> / (lamb + |u|^2)`` (``= lamb (lamb I + u u^T)^{-1} g``, Sherman--Morrison),
    ``g' = q |g| / |q|``. The operations run in ``precision`` in the released order (so
    ``"float32"`` reproduces the published float32 rounding bit for bit on float32 input) and the
    result is cast back to ``g.dtype``. A sample with ``g = 0`` is returned unchanged (the released
    code would return 0/0). When ``q`` vanishes or overflows (in float32: ``lamb`` below the
    resolution of ``|g|^2``, about ``|g|^2 > 1.7e7 lamb``), ``nonfinite`` decides: ``"raise"``
    (``FloatingPointError``), ``"nan"`` (return the NaN the released code returns) or ``"keep"``
    (return ``g`` unchanged for those samples).
    """
    check_lamb_kappa(lamb, kappa)
    dt = check_precision(precision)
    if nonfinite not in NONFINITE:
        raise ValueError(f"unknown nonfinite policy {nonfinite!r}; expected one of {NONFINITE}")
    if g.ndim < 1:
        raise ValueError("g must be a batch [B, ...]")
    gf = flat(g).to(dt)
    if prev is None:
        u = gf
    else:
        if prev.shape != g.shape:
            raise ValueError(f"history shape {tuple(prev.shape)} does not match g {tuple(g.shape)}")
        u = kappa * flat(prev).to(dt) + (1 - kappa) * gf
    norm_sq = (gf * gf).sum(1)[:, None]
    norm_sq_u = (u * u).sum(1)[:, None]
    inner = (gf * u).sum(1)
    part2 = (u * inner[:, None]) / (lamb + norm_sq_u)
    q = gf - part2
    norm = torch.sqrt(norm_sq)
    norm_q = torch.sqrt((q * q).sum(1)[:, None])
    out = q * norm / norm_q
    zero = norm[:, 0] == 0
    if bool(zero.any()):
        out = torch.where(zero[:, None], gf, out)
    bad_rows = ~torch.isfinite(out).all(1)
    if bool(bad_rows.any()) and nonfinite == "keep":
        out = torch.where(bad_rows[:, None], gf, out)
    elif bool(bad_rows.any()) and nonfinite == "raise":
        bad = bad_rows.nonzero()[:, 0].tolist()
        raise FloatingPointError(
            f"the published LML correction produced 0/0 for sample(s) {bad[:8]}: lamb={lamb:g} is below the "
            f"{precision} resolution of |g|^2 (max |g|^2 = {float(norm_sq.max()):.3g}); use a larger lamb or "
            "precision='float64' (where the correction is the identity up to rounding)"
        )
    return out.reshape(g.shape).to(g.dtype)


def lml_rounding_law(g: Tensor, lamb: float) -> Tensor:
    """Predicted relative change ``|g' - g| / |g|`` of the float32 published correction (``kappa = 0``),
    ``3.4e-8 |g|^2 / lamb`` per sample, saturating at ``sqrt(2)`` (a random direction)."""
    n2 = flat(g).to(torch.float64).pow(2).sum(1)
    return (ROUNDING_CONSTANT * n2 / lamb).clamp(max=math.sqrt(2.0))


class LMLCorrection:
    """The published LML correction (Wang et al., ICCV 2025, released code), as a solver ``correction``.

    What it computes, per sample: ``g' = |g| q / |q|`` with ``q = lamb (lamb I + u u^T)^{-1} g`` and
    ``u = kappa p + (1 - kappa) g`` (``p``: previous uncorrected update; ``u = g`` at the first step),
    applied to the update vector exactly where the released code applies it: DDIM's noise estimate
    (``x0`` stays uncorrected), DPM-Solver's / DPM-Solver++'s whole increment, flow-matching Euler's
    velocity. Every step is corrected; the history is reset at the start of every sampling run.

    What it does mathematically: with ``kappa = 0`` (every published setting) ``u = g``, so ``q`` is
    a positive multiple of ``g`` and ``g' = g`` -- **the identity**. In float32 the subtraction
    ``g - g |g|^2 / (lamb + |g|^2)`` cancels and the rescaling by about ``|g|^2 / lamb`` amplifies its
    rounding: ``precision="float32"`` (the published arithmetic) changes ``g`` by rounding noise of
    relative size about ``3.4e-8 |g|^2 / lamb`` (:func:`lml_rounding_law`); ``precision="float64"``
    computes the mathematical operator (the identity up to float64 rounding when ``kappa = 0``).
    With ``kappa > 0`` the map is a genuine rank-one damped projection of ``g`` away from the
    history direction, rescaled to the original length.

    Args:
        lamb: damping ``lambda > 0`` (README values: :data:`PUBLISHED_LAMBDA`).
        kappa: history weight in ``[0, 1]`` (published: 0).
        precision: ``"float32"`` (published rounding) or ``"float64"`` (the exact operator).
        nonfinite: what to do where the arithmetic gives 0/0 (see :func:`lm_correct`): ``"raise"``,
            ``"nan"`` (the released behaviour) or ``"keep"`` (leave those samples uncorrected);
            :attr:`nonfinite_count` counts them.
    """

    def __init__(self, lamb: float = 1e-3, kappa: float = 0.0, precision: str = "float32",
                 nonfinite: str = "raise") -> None:
        check_lamb_kappa(lamb, kappa)
        check_precision(precision)
        if nonfinite not in NONFINITE:
            raise ValueError(f"unknown nonfinite policy {nonfinite!r}; expected one of {NONFINITE}")
        self.lamb, self.kappa, self.precision, self.nonfinite = float(lamb), float(kappa), precision, nonfinite
        self._prev: Tensor | None = None
        self.nonfinite_count = 0  # samples x steps where the arithmetic gave 0/0 (since construction)
        self.count = 0  # samples x steps corrected (since construction)

    def reset(self) -> None:
        self._prev = None

    def __call__(self, proposal: Proposal | Tensor) -> Tensor:
        g = proposal.g if isinstance(proposal, Proposal) else proposal
        prev = self._prev if (self._prev is not None and self._prev.shape == g.shape) else None
        out = lm_correct(g, prev, self.lamb, self.kappa, self.precision,
                         "nan" if self.nonfinite == "keep" else self.nonfinite)
        bad = ~torch.isfinite(flat(out)).all(1)
        self.count += g.shape[0]
        if bool(bad.any()):
            self.nonfinite_count += int(bad.sum())
            if self.nonfinite == "keep":
                out = torch.where(bad.reshape((-1,) + (1,) * (g.ndim - 1)), g, out)
        self._prev = g.detach().clone()
        return out

    def __repr__(self) -> str:
        return f"LMLCorrection(lamb={self.lamb:g}, kappa={self.kappa:g}, precision={self.precision!r})"


class MatchedNoiseCorrection:
    """Control for the published correction: a random perturbation of the same relative size.

    Per sample, computes what the float32 published correction would change, ``delta = |g_LML - g|``,
    and returns ``g`` rotated towards a uniformly random direction orthogonal to it by the angle that
    gives ``|g' - g| = delta`` and ``|g'| = |g|`` exactly (the published map keeps the length too). If
    the published correction's effect is rounding noise, this control reproduces its size with a
    dense random direction (in the saturated regime the published map returns a sparse vector
    instead). ``generator`` (or ``seed``) draws the directions.
    Where the float32 correction would give 0/0 the sample is left unchanged.
    """

    def __init__(self, lamb: float = 1e-3, kappa: float = 0.0, *, seed: int = 0,
                 generator: torch.Generator | None = None) -> None:
        check_lamb_kappa(lamb, kappa)
        self.lamb, self.kappa = float(lamb), float(kappa)
        self.seed = int(seed)
        self._user_gen = generator
        self._gen = generator
        self._prev: Tensor | None = None

    def reset(self) -> None:
        self._prev = None
        if self._user_gen is None:
            self._gen = torch.Generator().manual_seed(self.seed)

    def __call__(self, proposal: Proposal | Tensor) -> Tensor:
        g = proposal.g if isinstance(proposal, Proposal) else proposal
        if self._gen is None:
            self.reset()
        prev = self._prev if (self._prev is not None and self._prev.shape == g.shape) else None
        lml = lm_correct(g, prev, self.lamb, self.kappa, "float32", "keep")
        self._prev = g.detach().clone()
        gf = flat(g).to(torch.float64)
        n = gf.norm(dim=1, keepdim=True)
        delta = (flat(lml).to(torch.float64) - gf).norm(dim=1, keepdim=True)
        z = torch.randn(gf.shape, generator=self._gen, dtype=torch.float64)
        z = z - gf * (z * gf).sum(1, keepdim=True) / (n * n).clamp(min=1e-300)  # orthogonal to g
        z = z / z.norm(dim=1, keepdim=True).clamp(min=1e-300)
        # rotate g by the angle theta with |g' - g| = 2 |g| sin(theta / 2) = delta and |g'| = |g|
        theta = 2 * torch.asin((delta / (2 * n).clamp(min=1e-300)).clamp(0.0, 1.0))
        out = torch.cos(theta) * gf + torch.sin(theta) * n * z
        return out.reshape(g.shape).to(g.dtype)
