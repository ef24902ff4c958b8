"""A Newton--Langevin corrector at one noise level, preconditioned by the damped low-rank Hessian."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..denoiser import Prediction
from ..loop import StepContext, randn_like
from .curvature import floor_value, jvp_curvature
from .lowrank import LowRankSym, flat, nystrom
from .published import check_precision

__all__ = ["NewtonLangevinCorrector"]


class NewtonLangevinCorrector:
    """A Newton--Langevin corrector at one noise level (a solver ``corrector`` hook).

    At the level ``(alpha, sigma)`` the step lands on, ``n_steps`` iterations of

        x <- x + h M s + sqrt(2 h') M^{1/2} z,     s = grad log p_t = -eps_hat / sigma,
        M = (H_+ + lam / sigma^2 I)^{-1} = sigma^2 (clamp(I - A, 0) + lam I)^{-1},

    with ``integrator="euler"`` (``h = h' = step_size``, the Euler--Maruyama step of preconditioned
    Langevin dynamics) or ``"ou"`` (``h = 1 - e^{-step}``, ``2h' = 1 - e^{-2 step}``: the exact
    discretisation when ``p_t`` is Gaussian with ``M`` its covariance, so no step-size bias there).
    ``M`` and ``M^{1/2}`` are applied in low-rank-plus-identity form, ``O(d k)``. ``lam`` is the
    Levenberg--Marquardt damping relative to ``1/sigma^2`` (``H`` is clamped at 0 first, so ``M``
    is positive definite in non-log-concave regions).

    Curvature: ``"jvp"`` (``rank`` JVPs at the first iteration, random Nystrom probes or Lanczos
    from the score) or ``"secant"`` (pairs between the corrector's own iterates at this fixed noise
    level, exact secants ``J dx = d x0_hat``; the first iteration uses ``M = sigma^2/(1+lam) I``).
    **No divergence correction**: ``M`` is computed at the corrector's first state and held fixed
    through its iterations (secant: updated between iterations), so for ``n_steps`` iterations at a
    fixed ``M`` the chain has ``p_t`` as its small-step invariant law; the dependence of ``M`` on the
    entry state (the ``div M`` term a state-dependent ``M`` would need) is not corrected for.

    Cost per call: ``n_steps`` network evaluations plus ``rank`` JVPs (jvp source).
    ``sigma_range = (lo, hi)`` restricts it to levels with ``lo <= sigma <= hi``; ``max_calls``
    limits the number of calls per run (counted after ``reset``).
    """

    def __init__(
        self,
        source: str = "jvp",
        rank: int = 4,
        *,
        n_steps: int = 1,
        step_size: float = 0.5,
        damping: float = 0.1,
        integrator: str = "ou",
        method: str = "nystrom",
        floor: str | float = "min",
        sigma_range: tuple[float, float] | None = None,
        max_calls: int | None = None,
        precision: str = "float64",
        generator: torch.Generator | None = None,
    ) -> None:
        if source not in ("secant", "jvp", "none"):
            raise ValueError(f"unknown curvature source {source!r}; expected 'jvp', 'secant' or 'none'")
        if integrator not in ("ou", "euler"):
            raise ValueError(f"unknown integrator {integrator!r}; expected 'ou' or 'euler'")
        if not isinstance(n_steps, int) or n_steps < 1:
            raise ValueError(f"n_steps must be a positive integer, got {n_steps!r}")
        if not step_size > 0:
            raise ValueError(f"step_size must be positive, got {step_size}")
        if not damping > 0:
            raise ValueError(f"damping must be positive (M must stay bounded), got {damping}")
        if source != "none" and (not isinstance(rank, int) or rank < 1):
            raise ValueError(f"rank must be a positive integer, got {rank!r}")
        self.source, self.rank, self.n_steps = source, rank, n_steps
        self.step_size, self.damping, self.integrator = float(step_size), float(damping), integrator
        self.method, self.floor = method, floor
        self.sigma_range, self.max_calls = sigma_range, max_calls
        self.dtype = check_precision(precision)
        self.generator = generator
        self.reset()

    def reset(self) -> None:
        self.calls = 0
        self.nfe = 0
        self.jvps = 0

    def _active(self, sigma: float) -> bool:
        if self.max_calls is not None and self.calls >= self.max_calls:
            return False
        if self.sigma_range is not None:
            lo, hi = self.sigma_range
            return lo <= sigma <= hi
        return True

    def __call__(self, x: Tensor, ctx: StepContext) -> Tensor:
        a, s = ctx.alpha, ctx.sigma
        if s <= 0 or not self._active(s):
            return x
        self.calls += 1
        dt = self.dtype
        den, t = ctx.denoiser, ctx.t
        if self.integrator == "ou":
            h = -math.expm1(-self.step_size)
            hn = -math.expm1(-2 * self.step_size)
        else:
            h, hn = self.step_size, 2 * self.step_size
        lam = self.damping
        A: LowRankSym | None = None
        pairs: list[tuple[Tensor, Tensor]] = []
        x_prev = x0_prev = None
        gen = ctx.generator if self.generator is None else self.generator
        for it in range(self.n_steps):
            pred: Prediction = den(x, t)
            self.nfe += 1
            xf = flat(x).to(dt)
            x0f = flat(pred.x0).to(dt)
            score = -flat(pred.eps).to(dt) / s
            if self.source == "jvp" and it == 0:
                self.jvps += self.rank
                A = jvp_curvature(den, x, t, a, self.rank, method=self.method, start=score, generator=gen,
                                  floor=self.floor, dtype=dt)
            elif self.source == "secant" and x_prev is not None:
                pairs.append(((xf - x_prev) / a, x0f - x0_prev))
                pairs = pairs[-self.rank:]
                Om = torch.stack([p[0] for p in pairs], 2)
                Y = torch.stack([p[1] for p in pairs], 2)
                est = nystrom(Om, Y)
                A = LowRankSym(est.U, est.s, floor_value(est, self.floor))
            x_prev, x0_prev = xf, x0f
            if A is None:
                M = LowRankSym.scalar(s * s / (1.0 + lam), xf.shape[0], xf.shape[1], dtype=dt, device=xf.device)
            else:
                M = A.map(lambda av: (s * s) / ((1.0 - av).clamp(min=0.0) + lam))
            z = randn_like(xf, gen)
            xf = xf + h * M.apply(score) + math.sqrt(hn) * M.sqrt_apply(z)
            x = xf.reshape(x.shape).to(x.dtype)
        return x
