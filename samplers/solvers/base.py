"""Base diffusion solvers as plain functions over the denoiser contract.

Every solver has the signature ``sample_x(denoiser, x, grid, *, ..., generator=None,
correction=None, corrector=None, callback=None, progress=False) -> Tensor``:

* ``x`` is the starting noise at ``grid`` point 0 (already scaled: ``x ~ N(alpha_0 x0, sigma_0^2 I)``;
  for a VP schedule starting near pure noise just pass ``sigma_0 * randn``);
* ``grid`` is a :class:`~hessdiff.samplers.schedule.TimeGrid` (``n + 1`` points, ``n`` steps, one
  network evaluation per step);
* ``generator`` is a ``torch.Generator`` or a list of them, one per sample (image ``i`` then depends
  on generator ``i`` only, whatever the batch size).

**The correction hook.** ``correction`` (a :class:`StepCorrection`) is applied to the step's
*update vector* ``g`` -- the quantity the LML paper preconditions -- and must return a vector of
the same shape: for DDIM ``g`` is the noise estimate used in the direction term (``x0`` stays
uncorrected); for DPM-Solver (noise prediction) ``g`` is the whole increment
``x_next - (alpha_next/alpha) x``; for DPM-Solver++ it is ``x_next - (sigma_next/sigma) x``; for
flow-matching Euler it is the velocity. ``correction.reset()`` is called at the start of every run.
The :class:`StepContext` passed along gives the step's state (and the denoiser, for corrections
that evaluate Jacobian-vector products).

``corrector`` is called after each step that lands at a noise level ``sigma > 0``:
``corrector(x, ctx) -> x`` (e.g. a Langevin corrector at that noise level; it may call
``ctx.denoiser``).

Arithmetic is float32 (float64 for float64 inputs) whatever the network's dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from ..denoiser import Prediction, compute_dtype
from ..schedule import TimeGrid

__all__ = [
    "StepContext",
    "StepCorrection",
    "Corrector",
    "randn_like",
    "ddim_step",
    "sample_ddim",
    "sample_dpm_solver",
    "sample_dpm_solver_pp",
    "sample_flow_euler",
    "SOLVERS",
    "get_solver",
]

GeneratorArg = torch.Generator | Sequence[torch.Generator] | None


@dataclass
class StepContext:
    """What a correction or corrector may look at in step ``i`` (from grid point ``i`` to ``i+1``)."""

    i: int
    num_steps: int
    t: Tensor  # model time at point i (scalar tensor)
    alpha: float  # at point i
    sigma: float
    alpha_next: float  # at point i + 1
    sigma_next: float
    x: Tensor  # state at point i (compute dtype)
    pred: Prediction  # denoiser output at (x, t)
    kind: str  # what the update vector is: "eps", "increment", "increment++" or "velocity"
    solver: str
    denoiser: Any
    generator: GeneratorArg = None


@runtime_checkable
class StepCorrection(Protocol):
    """A map of a step's update vector, e.g. the LML Levenberg--Marquardt correction."""

    def reset(self) -> None: ...

    def __call__(self, g: Tensor, ctx: StepContext) -> Tensor: ...


Corrector = Callable[[Tensor, StepContext], Tensor]
Callback = Callable[[int, Tensor, Tensor, Prediction], None]


def randn_like(x: Tensor, generator: GeneratorArg = None) -> Tensor:
    """Standard normal noise shaped like ``x``; with a list of generators, sample ``i`` uses
    generator ``i`` (so a sample's noise does not depend on the batch it is in)."""
    if generator is None:
        return torch.randn(x.shape, dtype=x.dtype, device=x.device)
    if isinstance(generator, torch.Generator):
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=generator.device)
        return z.to(x.device)
    gens = list(generator)
    if len(gens) != x.shape[0]:
        raise ValueError(f"got {len(gens)} generators for a batch of {x.shape[0]}")
    return torch.cat([randn_like(x[i : i + 1], g) for i, g in enumerate(gens)])


def _check_inputs(x: Tensor, grid: TimeGrid) -> None:
    if not isinstance(grid, TimeGrid):
        raise TypeError(f"grid must be a TimeGrid (see NoiseSchedule.grid), got {type(grid).__name__}")
    if not torch.is_floating_point(x):
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError("the starting sample x contains NaN or Inf")


def _progress(n: int, enabled: bool, desc: str) -> Any:
    if not enabled:
        return range(n)
    from tqdm.auto import tqdm

    return tqdm(range(n), desc=desc, leave=False)


def _start(denoiser: Any, x: Tensor, grid: TimeGrid, correction: StepCorrection | None) -> Tensor:
    _check_inputs(x, grid)
    if correction is not None:
        correction.reset()
    return x.to(compute_dtype(x.dtype))


def _call(denoiser: Any, x: Tensor, t: Tensor) -> Prediction:
    p = denoiser(x, t)
    return Prediction(eps=p.eps.to(x.dtype), x0=p.x0.to(x.dtype))


def _finish(x: Tensor, x_in: Tensor) -> Tensor:
    return x.to(x_in.dtype)


def ddim_step(x0: Tensor, eps: Tensor, alpha: float, sigma: float, alpha_next: float, sigma_next: float, *,
              eta: float = 0.0, generator: GeneratorArg = None) -> Tensor:
    """One DDIM update from the point ``(alpha, sigma)`` to ``(alpha_next, sigma_next)``:
    ``alpha_next x0 + sqrt(sigma_next^2 - v) eps + sqrt(v) z`` with the DDIM variance
    ``v = eta^2 (sigma_next^2 / sigma^2) (1 - alpha^2 / alpha_next^2)`` (Song et al. 2021, eq. 12/16;
    ``eta = 1`` on consecutive training steps is DDPM's posterior variance)."""
    # (1 - abar_prev)/(1 - abar) * (1 - abar/abar_prev), abar = alpha^2, 1 - abar = sigma^2
    an, sn = alpha_next, sigma_next
    var = eta**2 * (sn**2 / sigma**2) * max(0.0, 1.0 - alpha**2 / an**2) if (eta > 0 and sn > 0) else 0.0
    x = an * x0 + max(sn**2 - var, 0.0) ** 0.5 * eps
    if var > 0:
        x = x + var**0.5 * randn_like(x, generator)
    return x


def sample_ddim(
    denoiser: Any,
    x: Tensor,
    grid: TimeGrid,
    *,
    eta: float = 0.0,
    generator: GeneratorArg = None,
    correction: StepCorrection | None = None,
    corrector: Corrector | None = None,
    callback: Callback | None = None,
    progress: bool = False,
) -> Tensor:
    """DDIM (Song et al. 2021) with stochasticity ``eta`` (0: deterministic, 1: DDPM-like).

    ``x_next = alpha_next x0 + sqrt(sigma_next^2 - v) eps' + sqrt(v) z`` with the DDIM variance
    ``v = eta^2 (sigma_next^2 / sigma^2) (1 - alpha^2 / alpha_next^2)`` and ``eps' = correction(eps)``
    (``x0`` is computed from the uncorrected ``eps``). This is diffusers' ``DDIMScheduler.step``
    written for a grid whose next point is the step's target.
    """
    if eta < 0:
        raise ValueError(f"eta must be nonnegative, got {eta}")
    x_in = x
    x = _start(denoiser, x, grid, correction)
    n = grid.num_steps
    for i in _progress(n, progress, "ddim"):
        t = grid.t[i]
        a, s = float(grid.alpha[i]), float(grid.sigma[i])
        an, sn = float(grid.alpha[i + 1]), float(grid.sigma[i + 1])
        pred = _call(denoiser, x, t)
        eps = pred.eps
        if correction is not None:
            ctx = StepContext(i, n, t, a, s, an, sn, x, pred, "eps", "ddim", denoiser, generator)
            eps = correction(eps, ctx)
        x = ddim_step(pred.x0, eps, a, s, an, sn, eta=eta, generator=generator)
        if corrector is not None and i + 1 < n and sn > 0:
            x = corrector(x, StepContext(i + 1, n, grid.t[i + 1], an, sn, an, sn, x, pred, "eps", "ddim",
                                         denoiser, generator))
        if callback is not None:
            callback(i, grid.t[i], x, pred)
    return _finish(x, x_in)


def _dpm_orders(n: int, order: int, lower_order_final: bool, final_zero: bool) -> list[int]:
    """Per-step orders of the multistep solver, as diffusers' ``DPMSolverMultistepScheduler`` picks
    them: warm-up with lower orders, and the last steps lowered when ``n < 15`` (or when the last
    step lands at ``sigma = 0``, where only the first-order step is finite)."""
    orders = []
    for i in range(n):
        o = min(order, i + 1)
        if i == n - 1 and (final_zero or (lower_order_final and n < 15)):
            o = 1
        if i == n - 2 and lower_order_final and n < 15:
            o = min(o, 2)
        orders.append(o)
    return orders


def sample_dpm_solver(
    denoiser: Any,
    x: Tensor,
    grid: TimeGrid,
    *,
    order: int = 3,
    algorithm: str = "dpmsolver++",
    solver_type: str = "midpoint",
    lower_order_final: bool = True,
    generator: GeneratorArg = None,
    correction: StepCorrection | None = None,
    corrector: Corrector | None = None,
    callback: Callback | None = None,
    progress: bool = False,
) -> Tensor:
    """Multistep DPM-Solver (``algorithm="dpmsolver"``, noise prediction, Lu et al. 2022) and
    DPM-Solver++ (``"dpmsolver++"``, data prediction, Lu et al. 2023), orders 1--3.

    Matches diffusers' ``DPMSolverMultistepScheduler`` (same order warm-up, ``lower_order_final``,
    ``solver_type`` for order 2) to float rounding on the same grid.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order}")
    if algorithm not in ("dpmsolver", "dpmsolver++"):
        raise ValueError(f"unknown algorithm {algorithm!r}; expected 'dpmsolver' or 'dpmsolver++'")
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"unknown solver_type {solver_type!r}; expected 'midpoint' or 'heun'")
    pp = algorithm == "dpmsolver++"
    x_in = x
    x = _start(denoiser, x, grid, correction)
    if bool((grid.alpha <= 0).any()):
        raise ValueError("DPM-Solver needs alpha > 0 (a finite log-SNR) at every grid point; a grid that starts "
                         "at pure noise (alpha = 0, e.g. a flow-matching grid) needs sample_flow_euler or sample_ddim")
    n = grid.num_steps
    lam = grid.lambdas
    orders = _dpm_orders(n, order, lower_order_final, float(grid.sigma[-1]) == 0.0)
    hist: list[Tensor] = []  # model outputs (x0 for ++, eps otherwise), newest last
    lam_hist: list[float] = []
    name = "dpm++" if pp else "dpm"
    for i in _progress(n, progress, name):
        t = grid.t[i]
        a, s = float(grid.alpha[i]), float(grid.sigma[i])
        an, sn = float(grid.alpha[i + 1]), float(grid.sigma[i + 1])
        pred = _call(denoiser, x, t)
        m0 = pred.x0 if pp else pred.eps
        hist.append(m0)
        lam_hist.append(float(lam[i]))
        hist, lam_hist = hist[-3:], lam_hist[-3:]
        o = orders[i]
        lt, l0 = float(lam[i + 1]), lam_hist[-1]
        h = lt - l0
        if o == 1:
            D = [m0]
        else:
            h0 = l0 - lam_hist[-2]
            r0 = h0 / h
            D1_0 = (m0 - hist[-2]) / r0
            if o == 2:
                D = [m0, D1_0]
            else:
                h1 = lam_hist[-2] - lam_hist[-3]
                r1 = h1 / h
                D1_1 = (hist[-2] - hist[-3]) / r1
                D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
                D2 = (D1_0 - D1_1) / (r0 + r1)
                D = [m0, D1, D2]
        if pp:
            base = (sn / s) * x
            if sn == 0.0:  # h = inf: the step lands on x0
                inc = an * D[0]
            else:
                em = torch.expm1(torch.tensor(-h, dtype=torch.float64)).item()  # e^{-h} - 1
                inc = -(an * em) * D[0]
                if o == 2:
                    if solver_type == "midpoint":
                        inc = inc - 0.5 * (an * em) * D[1]
                    else:
                        inc = inc + (an * (em / h + 1.0)) * D[1]
                elif o == 3:
                    inc = inc + (an * (em / h + 1.0)) * D[1] - (an * ((em + h) / h**2 - 0.5)) * D[2]
        else:
            base = (an / a) * x
            if sn == 0.0:  # sigma_next e^h = alpha_next sigma / alpha
                inc = -(an * s / a) * D[0]
            else:
                ep = torch.expm1(torch.tensor(h, dtype=torch.float64)).item()  # e^{h} - 1
                inc = -(sn * ep) * D[0]
                if o == 2:
                    if solver_type == "midpoint":
                        inc = inc - 0.5 * (sn * ep) * D[1]
                    else:
                        inc = inc - (sn * (ep / h - 1.0)) * D[1]
                elif o == 3:
                    inc = inc - (sn * (ep / h - 1.0)) * D[1] - (sn * ((ep - h) / h**2 - 0.5)) * D[2]
        if correction is not None:
            ctx = StepContext(i, n, t, a, s, an, sn, x, pred, "increment++" if pp else "increment", name,
                              denoiser, generator)
            inc = correction(inc, ctx)
        x = base + inc
        if corrector is not None and i + 1 < n and sn > 0:
            x = corrector(x, StepContext(i + 1, n, grid.t[i + 1], an, sn, an, sn, x, pred, "increment", name,
                                         denoiser, generator))
        if callback is not None:
            callback(i, t, x, pred)
    return _finish(x, x_in)


def sample_dpm_solver_pp(denoiser: Any, x: Tensor, grid: TimeGrid, **kwargs: Any) -> Tensor:
    """DPM-Solver++ (data prediction); see :func:`sample_dpm_solver`. Default order 2 (2M)."""
    kwargs.setdefault("order", 2)
    return sample_dpm_solver(denoiser, x, grid, algorithm="dpmsolver++", **kwargs)


def sample_flow_euler(
    denoiser: Any,
    x: Tensor,
    grid: TimeGrid,
    *,
    generator: GeneratorArg = None,
    correction: StepCorrection | None = None,
    corrector: Corrector | None = None,
    callback: Callback | None = None,
    progress: bool = False,
) -> Tensor:
    """Euler on the flow-matching ODE: ``x_next = x + (sigma_next - sigma) v``, ``v = eps - x0``.

    On a rectified-flow schedule (``alpha = 1 - sigma``) this is diffusers'
    ``FlowMatchEulerDiscreteScheduler``; the correction acts on the velocity ``v``.
    """
    x_in = x
    x = _start(denoiser, x, grid, correction)
    if abs(float(grid.alpha[0] + grid.sigma[0]) - 1.0) > 1e-9:
        raise ValueError("sample_flow_euler needs a flow-matching grid (alpha + sigma = 1); "
                         "use sample_ddim on VP schedules")
    n = grid.num_steps
    for i in _progress(n, progress, "euler"):
        t = grid.t[i]
        a, s = float(grid.alpha[i]), float(grid.sigma[i])
        an, sn = float(grid.alpha[i + 1]), float(grid.sigma[i + 1])
        pred = _call(denoiser, x, t)
        v = pred.eps - pred.x0
        if correction is not None:
            v = correction(v, StepContext(i, n, t, a, s, an, sn, x, pred, "velocity", "euler", denoiser, generator))
        x = x + (sn - s) * v
        if corrector is not None and i + 1 < n and sn > 0:
            x = corrector(x, StepContext(i + 1, n, grid.t[i + 1], an, sn, an, sn, x, pred, "velocity", "euler",
                                         denoiser, generator))
        if callback is not None:
            callback(i, t, x, pred)
    return _finish(x, x_in)


def _dpm3(denoiser: Any, x: Tensor, grid: TimeGrid, **kw: Any) -> Tensor:
    kw.setdefault("order", 3)
    return sample_dpm_solver(denoiser, x, grid, algorithm="dpmsolver", **kw)


#: name -> solver function (all take ``denoiser, x, grid`` and the common keywords)
SOLVERS: dict[str, Callable[..., Tensor]] = {
    "ddim": sample_ddim,
    "dpm": _dpm3,
    "dpm++": sample_dpm_solver_pp,
    "euler": sample_flow_euler,
}


def get_solver(name: str) -> Callable[..., Tensor]:
    try:
        return SOLVERS[name]
    except KeyError:
        raise ValueError(f"unknown solver {name!r}; available: {', '.join(SOLVERS)}") from None
