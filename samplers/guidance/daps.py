"""DAPS (Zhang et al., 2024, "Improving diffusion inverse problem solving with decoupled noise
annealing"): decoupled annealing posterior sampling on the diffusion loop, no network VJP.

Each grid point ``i`` is one annealing level, ``sigma_bar_i = sigma_i / alpha_i`` on the variance-exploding
scale of the authors' EDM code (``zhangbingliang2019/DAPS``, branch ``legacy`` = the paper's code,
``sampler.py::DAPS.sample``; the same loop on ``main``, ``sampler.py`` + ``cores/mcmc.py``):

1. ``x0_hat``: the probability-flow ODE from ``x_i`` down to clean data in ``ode_steps`` Euler steps
   (``DiffusionSampler._euler`` / ``DiffusionPFODE``: EDM ``poly-7`` levels from ``sigma_bar_i`` to
   ``ode_sigma_min = 0.01``, then to 0). An Euler step of that ODE in the VE variable is a deterministic
   DDIM step in the run's own ``(alpha, sigma)``; ``ode_steps = 1`` is Tweedie's ``x0_hat(x_i)``.
   ``ode_steps`` network forwards per level.
2. ``langevin_steps`` unadjusted Langevin steps in ``x0`` space from ``x0_hat`` (``LangevinDynamics.sample``)
   on ``log N(x0; x0_hat, r_i^2 I) + log N(y; A x0, tau^2 I)`` with ``r_i = sigma_bar_i`` (the code's prior
   term ``|x - x0_hat|^2 / (2 sigma^2)``)::

       x0 <- x0 + lr_i * ( -A^T (A x0 - y) / tau^2 - (x0 - x0_hat) / r_i^2 ) + sqrt(2 lr_i) z,
       lr_i = lr * (1 + (i / n) * (lr_min_ratio - 1))            (``get_lr``: linear decay to lr * lr_min_ratio)

   The data gradient uses ``operator.adjoint`` (pixel space) or, in latent space, autograd through
   ``run.decode`` (a decoder VJP per Langevin step, counted as ``decoder_backward``; never a network VJP).
3. re-noising: ``x_{i+1} = alpha_{i+1} x0 + sigma_{i+1} z`` (the code's ``x0y + sigma_{i+1} randn`` on the
   VE scale); the last step lands at ``sigma = 0`` and returns the Langevin sample.

Likelihood std ``tau``: the authors' configs use ``tau = 0.01`` with measurements of noise 0.05 (a sharper
likelihood than the true one); ``tau=None`` uses ``sigma_y``, the likelihood of the measurement model.
The ``main`` branch's ``cores/mcmc.py`` takes the data term as ``-grad(|A x - y|^2) / tau^2`` (twice the
``legacy`` / paper term, i.e. its ``tau`` is ``sqrt(2)`` times this one); this module follows ``legacy``.
The paper's DAPS-1K: 200 levels x 5 ODE steps, 100 Langevin steps, ``lr = 1e-4`` (``5e-5`` for box
inpainting and motion deblurring), ``lr_min_ratio = 0.01``; its annealing grid is EDM ``poly-7`` from
``sigma_bar = 100`` to 0.1 (a ``karras`` grid here).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..denoiser import Prediction
from ..loop import Method, Result, Run, randn_like
from ..schedule import TimeGrid
from .measurement import _check_nonneg, _measurement, _sqnorm
from .result import run_posterior

__all__ = ["DAPS", "sample_daps"]

#: the EDM ``poly-7`` exponent of the inner ODE's levels (``timestep: 'poly-7'`` in the configs)
_POLY = 7.0


def _positive_int(name: str, v: Any) -> int:
    if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return v


def _positive(name: str, v: Any) -> float:
    if not (isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a finite positive number, got {v!r}")
    return float(v)


class DAPS(Method):
    """DAPS's annealing level as a step of the loop (module docstring). ``run.state["y"]`` holds the
    prepared measurement. NFE: ``ode_steps`` network forwards per level (fewer where the level is
    already below ``ode_sigma_min``); no network VJPs."""

    name = "daps"
    nfe_convention = "network forwards (the inner ODE's steps, ode_steps per annealing level)"

    def __init__(self, operator: Any, y: Tensor, *, sigma_y: float, tau: float | None = None, ode_steps: int = 5,
                 ode_sigma_min: float = 0.01, langevin_steps: int = 100, lr: float = 1e-4,
                 lr_min_ratio: float = 0.01) -> None:
        _check_nonneg(sigma_y=sigma_y)
        if tau is not None:
            _positive("tau", tau)
        elif not sigma_y > 0:
            raise ValueError("daps needs a positive likelihood std: with sigma_y = 0 pass tau > 0 "
                             "(the authors use tau = 0.01 on [-1, 1] images)")
        self.ode_steps = _positive_int("ode_steps", ode_steps)
        self.langevin_steps = _positive_int("langevin_steps", langevin_steps)
        self.ode_sigma_min, self.lr = _positive("ode_sigma_min", ode_sigma_min), _positive("lr", lr)
        self.lr_min_ratio = _positive("lr_min_ratio", lr_min_ratio)
        self.operator, self.y = operator, y
        self.sigma_y = float(sigma_y)
        self.tau = float(sigma_y) if tau is None else float(tau)

    # ---------------------------------------------------------------------------- run set-up
    def start(self, run: Run, x: Tensor) -> Tensor:
        if self.ode_steps > 1:
            schedule = getattr(run.counted, "schedule", None)
            if schedule is None or not callable(getattr(schedule, "t_from_lambda", None)):
                raise ValueError("daps with ode_steps > 1 needs the denoiser's noise schedule (denoiser.schedule "
                                 "with t_from_lambda) to place the inner ODE's levels; use ode_steps=1")
        x = x.detach()
        run.state["y"] = _measurement(run, self.operator, self.y, x)
        return x

    # ---------------------------------------------------------------------------- the three parts
    def _ode_levels(self, run: Run, t: Tensor, a: float, s: float) -> list[tuple[Tensor, float, float]]:
        """The inner ODE's points ``(t_k, alpha_k, sigma_k)``: EDM poly-7 levels of ``sigma/alpha`` from the
        current one to ``ode_sigma_min`` (``ode_steps`` of them; one if the current level is not above it)."""
        sb = s / a if a > 0 else math.inf
        K = self.ode_steps
        if K == 1 or not sb > self.ode_sigma_min or not math.isfinite(sb):
            return [(t, a, s)]
        schedule = run.counted.schedule
        hi, lo = sb ** (1 / _POLY), self.ode_sigma_min ** (1 / _POLY)
        levels = [(t, a, s)]
        for k in range(1, K):
            sig = (hi + k / (K - 1) * (lo - hi)) ** _POLY
            tk = schedule.t_from_lambda(torch.tensor(-math.log(sig), dtype=torch.float64))
            ak, sk = (float(v) for v in schedule.alpha_sigma(tk))
            levels.append((tk, ak, sk))
        return levels

    def _x0_hat(self, run: Run, x: Tensor, t: Tensor, a: float, s: float) -> Tensor:
        """Step 1: the PF-ODE from ``x`` to clean data by deterministic DDIM (= Euler on the VE scale)."""
        levels = self._ode_levels(run, t, a, s)
        for k, (tk, _, _) in enumerate(levels):
            pred = run.denoise(x, tk)
            if k + 1 == len(levels):
                return pred.x0  # the last Euler step lands on sigma = 0: x = x0_hat
            _, an, sn = levels[k + 1]
            x = an * pred.x0 + sn * pred.eps
        raise AssertionError("unreachable")

    def _data_grad(self, run: Run, z: Tensor) -> Tensor:
        """``grad_z log N(y; A D(z), tau^2 I)`` (``D`` = ``run.decode``, the identity in pixel space)."""
        y = run.state["y"]
        if run.autoencoder is None:
            return self.operator.adjoint(y - self.operator(z)) / self.tau**2
        with torch.enable_grad():
            zr = z.detach().requires_grad_(True)
            loss = _sqnorm(self.operator(run.decode(zr)) - y).sum() / (2 * self.tau**2)
            (g,) = torch.autograd.grad(loss, zr)
        return -g

    def lr_at(self, i: int, n: int) -> float:
        """``lr * (1 + (i / n) (lr_min_ratio - 1))`` (the code's ``get_lr(step / num_steps)``)."""
        return self.lr * (1.0 + (i / n) * (self.lr_min_ratio - 1.0))

    def step(self, run: Run, x: Tensor, i: int) -> tuple[Tensor, Prediction]:
        t, a, s, an, sn = run.point(i)
        with torch.no_grad():
            x0_hat = self._x0_hat(run, x, t, a, s)
            prior_prec = (a / s) ** 2 if s > 0 else math.inf  # 1 / r_i^2, r_i = sigma_i / alpha_i
            lr = self.lr_at(i, run.num_steps)
            z = x0_hat
            if math.isfinite(prior_prec):
                for _ in range(self.langevin_steps):
                    g = self._data_grad(run, z) - prior_prec * (z - x0_hat)
                    z = z + lr * g + math.sqrt(2 * lr) * randn_like(z, run.generator)
            x_next = an * z
            if sn > 0:
                x_next = x_next + sn * randn_like(z, run.generator)
            eps = (x - a * z) / s if s > 0 else torch.zeros_like(x)
        return x_next, Prediction(eps=eps, x0=z)

    def nfe(self, run: Run) -> int:
        return run.cost.network_forward


def sample_daps(denoiser: Any, operator: Any, y: Tensor, x: Tensor, grid: TimeGrid, autoencoder: Any | None = None,
                *, sigma_y: float, tau: float | None = None, ode_steps: int = 5, ode_sigma_min: float = 0.01,
                langevin_steps: int = 100, lr: float = 1e-4, lr_min_ratio: float = 0.01, **hooks: Any) -> Result:
    """DAPS (Zhang et al., 2024) in pixel space, or in latent space with ``autoencoder`` (the data term
    through the decoder); see :mod:`.daps` for the step.

    sigma_y: the measurement noise std; tau: the Langevin likelihood std (``None``: ``sigma_y``; the
      authors' configs: 0.01 on ``[-1, 1]`` images).
    ode_steps: Euler steps of the inner PF-ODE per level (the paper: 5; 1 = Tweedie); ode_sigma_min: its
      last nonzero level (0.01).
    langevin_steps, lr, lr_min_ratio: the Langevin chain per level and its step size, decayed linearly
      over the levels to ``lr * lr_min_ratio`` (the paper's pixel configs: 100, 1e-4 (5e-5 box inpainting /
      motion blur), 0.01). Stability needs ``lr * (|A|^2 / tau^2 + (alpha/sigma)^2) < 2`` at every level.
    hooks: ``generator``, ``callback``, ``progress``. Cost: ``ode_steps`` network forwards per level, no
      network VJPs (latent: one decoder forward and backward per Langevin step).
    """
    if autoencoder is not None and not callable(getattr(autoencoder, "decode", None)):
        raise ValueError("daps: the autoencoder has no decode(z) method")
    method = DAPS(operator, y, sigma_y=sigma_y, tau=tau, ode_steps=ode_steps, ode_sigma_min=ode_sigma_min,
                  langevin_steps=langevin_steps, lr=lr, lr_min_ratio=lr_min_ratio)
    return run_posterior(method, denoiser, x, grid, autoencoder, **hooks)
