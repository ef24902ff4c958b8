"""DEIS (Zhang & Chen, ICLR 2023): the time-based Adams--Bashforth exponential integrator, tAB-DEIS.

On the noise-prediction ODE in ``y = x / alpha`` against ``rho = sigma / alpha`` (``dy / drho = eps``), the
step from grid point ``i`` to ``i + 1`` integrates the linear part exactly and replaces ``eps`` along the
step by its Lagrange interpolant of degree ``r`` *in the model time t* through the last ``r + 1``
evaluations (``qsh-zh/deis`` ``t_ab``; ``zju-pi/diff-sampler`` ``deis_sampler`` with ``deis_mode="tab"``):

    y_{i+1} = y_i + sum_{j=0}^{r} C_ij eps_{i-j},    C_ij = int_{t_i}^{t_{i+1}} l_j(tau) drho(tau),

``l_j`` the Lagrange basis on ``t_i, t_{i-1}, ..., t_{i-r}``. With ``r = 0`` (tAB0) the step is DDIM; the
first ``r`` steps warm up with the lower degrees. ``DEIS(order=r)`` is the paper's tAB-``r`` (nominal
convergence order ``r + 1``); the table's "DEIS-tAB3" is ``order=3`` (diff-sampler ``max_order=4``).

The coefficients depend on the schedule between grid points (``rho(tau)``), not only on the grid: they
are computed once per run, in float64, from the denoiser's ``schedule`` (or the one passed in), by
parts, ``C_ij = [rho l_j] - int rho(tau) l_j'(tau) dtau``, with composite Gauss--Legendre quadrature that
is split at a discrete schedule's integer times (where its ``rho`` has kinks) and refined until it no
longer changes. deis and diff-sampler take a 10 000-point Riemann sum of ``rho'(tau) l_j(tau)`` instead
(first-order accurate: relative error 1e-5 to 1e-4 of the coefficients on a 10-step grid); the integrand is
the same.

A step that lands at ``sigma = 0`` has no model time (the grid's placeholder ``t``) and takes order 0:
the Tweedie step ``x0_hat``, as DPM-Solver and UniPC do there. ``lower_order_final`` (off by default, as in
deis and diff-sampler) lowers the last two steps as diffusers' multistep schedulers do for ``n < 15``.

Parity: diffusers' ``DEISMultistepScheduler`` is the *log-rho* variant (Lagrange basis in ``log rho``,
closed-form integrals), not tAB; the two coincide when the model time is affine in ``log rho`` (a
schedule uniform in log-SNR), which ``tests/samplers/test_deis.py`` checks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..denoiser import Prediction
from ..loop import Method, Run
from ..schedule import DiscreteVPSchedule, NoiseSchedule, TimeGrid

__all__ = ["DEIS", "tab_coefficients", "deis_orders"]

_GL = np.polynomial.legendre.leggauss(8)


def _gauss_legendre(edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights of 8-point Gauss--Legendre on every interval ``[edges[k], edges[k+1]]``."""
    x, w = _GL
    a, b = edges[:-1, None], edges[1:, None]
    return (0.5 * (b - a) * x[None] + 0.5 * (a + b)).ravel(), (0.5 * (b - a) * w[None]).ravel()


def tab_coefficients(rho: Callable[[np.ndarray], np.ndarray], t_nodes: Sequence[float], t_next: float, *,
                     rho_ends: tuple[float, float] | None = None, breaks: Sequence[float] = (),
                     rtol: float = 1e-13) -> list[float]:
    """``[C_0, ..., C_r]``, ``C_j = int_{t_nodes[0]}^{t_next} l_j(tau) drho(tau)`` in float64.

    ``l_j`` is the Lagrange basis on ``t_nodes`` (the current time first, then the earlier ones), so that
    ``sum_j C_j eps(t_nodes[j])`` integrates the degree-``r`` interpolant of ``eps`` against ``rho``.
    ``rho(tau)`` maps an array of times to ``sigma / alpha``; ``rho_ends`` (default: ``rho`` at the ends) are
    the values at ``t_nodes[0]`` and ``t_next``; ``breaks``: times where ``rho`` is not smooth (quadrature
    pieces end there). Integration by parts, ``C_j = rho(t_next) l_j(t_next) - rho(t_0) l_j(t_0) -
    int rho(tau) l_j'(tau) dtau``, in the step's own variable ``u = (tau - t_0) / (t_next - t_0)``, by
    8-point Gauss--Legendre on pieces that are halved until no coefficient changes by more than
    ``rtol (|rho(t_0)| + |rho(t_next)|)`` (the rounding level of the integrand; relative to the step's
    ``rho(t_next) - rho(t_0)`` that is ~1e-11 at 300 steps).
    """
    if rho_ends is None:
        rho_ends = tuple(float(v) for v in rho(np.array([float(t_nodes[0]), float(t_next)], dtype=np.float64)))
    return _tab_batch(rho, [(t_nodes, t_next, rho_ends, breaks)], rtol)[0]


def _tab_batch(rho: Callable[[np.ndarray], np.ndarray],
               steps: Sequence[tuple[Sequence[float], float, tuple[float, float], Sequence[float]]],
               rtol: float = 1e-13, max_pieces: int = 1 << 12) -> list[list[float]]:
    """:func:`tab_coefficients` of many steps ``(t_nodes, t_next, rho_ends, breaks)`` at once (one call of
    ``rho`` per refinement)."""
    S = len(steps)
    J = max(len(st[0]) for st in steps)
    D = np.zeros((S, J, max(J - 1, 1)))  # coefficients of l_j'(u), lowest degree first
    ends = np.zeros((S, J))
    t0, h, scale, inner, sizes = np.zeros(S), np.zeros(S), np.zeros(S), [], []
    for k, (nodes, t_next, (r0, r1), breaks) in enumerate(steps):
        t0[k], h[k] = float(nodes[0]), float(t_next) - float(nodes[0])
        if not h[k] != 0 or not np.isfinite(h[k]):
            raise ValueError(f"a step needs two distinct finite times, got {t0[k]} and {t_next}")
        u = (np.asarray(nodes, dtype=np.float64) - t0[k]) / h[k]
        if len(np.unique(u)) != len(u):
            raise ValueError(f"the interpolation times must be distinct, got {list(nodes)}")
        for j in range(len(u)):
            others = np.delete(u, j)
            lj = np.atleast_1d(np.poly(others)) / float(np.prod(u[j] - others))  # highest degree first
            ends[k, j] = r1 * float(np.sum(lj)) - r0 * float(lj[-1])  # rho l_j at u = 1 and u = 0
            dj = np.polyder(lj)[::-1] if len(lj) > 1 else np.zeros(1)
            D[k, j, : len(dj)] = dj
        b = (np.asarray(breaks, dtype=np.float64) - t0[k]) / h[k]
        inner.append(b[(b > 0.0) & (b < 1.0)])
        scale[k], sizes = abs(r0) + abs(r1) + 1e-300, [*sizes, len(u)]
    out = np.zeros((S, J))
    active, last, pieces = np.arange(S), None, 4
    while True:
        xs, ws, ids = [], [], []
        uniform = np.linspace(0.0, 1.0, pieces + 1)
        base = _gauss_legendre(uniform)
        for k in active:
            x, w = _gauss_legendre(np.unique(np.concatenate([uniform, inner[k]]))) if inner[k].size else base
            xs.append(x), ws.append(w), ids.append(np.full(x.size, k))
        x, w, idx = np.concatenate(xs), np.concatenate(ws), np.concatenate(ids)
        rx = np.asarray(rho(t0[idx] + h[idx] * x), dtype=np.float64)
        vals = np.einsum("njk,nk->nj", D[idx], x[:, None] ** np.arange(D.shape[2])[None])  # l_j'(u_n)
        integral = np.zeros((S, J))
        np.add.at(integral, idx, (w * rx)[:, None] * vals)
        coef = ends[active] - integral[active]
        if last is not None:
            done = np.max(np.abs(coef - last), axis=1) <= rtol * scale[active]
            out[active[done]] = coef[done]
            active, coef = active[~done], coef[~done]
            if active.size == 0:
                return [out[k, : sizes[k]].tolist() for k in range(S)]
        if pieces >= max_pieces:
            raise RuntimeError(f"DEIS coefficients did not converge on the steps from t = {t0[active].tolist()} "
                               "(schedule not smooth there?)")
        last, pieces = coef, 2 * pieces


def deis_orders(n: int, order: int, lower_order_final: bool, final_zero: bool) -> list[int]:
    """Per-step polynomial degrees: ``min(order, i)`` (warm start), 0 on a last step to ``sigma = 0``,
    and with ``lower_order_final`` and ``n < 15`` the last two steps at most 0 and 1 (diffusers' rule)."""
    orders = []
    for i in range(n):
        o = min(order, i)
        if i == n - 1 and (final_zero or (lower_order_final and n < 15)):
            o = 0
        if i == n - 2 and lower_order_final and n < 15:
            o = min(o, 1)
        orders.append(o)
    return orders


def _rho_fn(schedule: NoiseSchedule) -> Callable[[np.ndarray], np.ndarray]:
    def rho(t: np.ndarray) -> np.ndarray:
        return schedule.rho(torch.from_numpy(np.asarray(t, dtype=np.float64))).numpy()

    return rho


class DEIS(Method):
    """tAB-DEIS of degree ``order`` (0--3; 3 = DEIS-tAB3, 0 = DDIM): ``x_next = (alpha_next / alpha) x +
    alpha_next (rho_next - rho) sum_j w_j eps_{i-j}`` with ``w_j = C_ij / (rho_next - rho)`` (they sum to 1).
    The correction acts on the combined noise ``sum_j w_j eps_{i-j}`` (a DDIM step when it is ``eps_i``), as
    for iPNDM. ``schedule``: the one whose model time the polynomials live in (default: the denoiser's)."""

    def __init__(self, order: int = 3, lower_order_final: bool = False, schedule: NoiseSchedule | None = None) -> None:
        if order not in (0, 1, 2, 3):
            raise ValueError(f"order must be 0, 1, 2 or 3 (tAB0..tAB3), got {order}")
        self.order, self.lower_order_final, self.schedule = order, bool(lower_order_final), schedule
        self.name = f"deis-tab{order}"

    def coefficients(self, grid: TimeGrid, schedule: NoiseSchedule) -> list[list[float]]:
        """Per step ``i`` the weights ``[w_0, ..., w_p]`` of ``eps_i, eps_{i-1}, ...`` (float64)."""
        n = grid.num_steps
        rho = (grid.sigma / grid.alpha).tolist()
        ts = grid.t.tolist()
        final_zero = float(grid.sigma[-1]) == 0.0
        real = n if final_zero else n + 1  # points with a model time
        t_real = grid.t[:real]
        a, s = schedule.alpha_sigma(t_real)
        ref = torch.tensor(rho[:real], dtype=torch.float64)
        off = ((s / a) - ref).abs() / ref.abs()
        if bool((off > 1e-8).any()):
            k = int(off.argmax())
            raise ValueError(f"DEIS: the grid's sigma/alpha at t = {ts[k]:g} is {rho[k]:.6g}, the schedule's "
                             f"{float(s[k] / a[k]):.6g}; the grid must come from the schedule whose time DEIS uses")
        discrete = isinstance(schedule, DiscreteVPSchedule)  # rho has kinks at the integer times
        rho_fn = _rho_fn(schedule)
        orders = deis_orders(n, self.order, self.lower_order_final, final_zero)
        steps, where = [], []
        for i, p in enumerate(orders):
            if p > 0:
                lo, hi = sorted((ts[i], ts[i + 1]))
                breaks = np.arange(np.floor(lo) + 1, np.ceil(hi)) if discrete else ()
                steps.append(([ts[i - k] for k in range(p + 1)], ts[i + 1], (rho[i], rho[i + 1]), breaks))
                where.append(i)
        out: list[list[float]] = [[1.0] for _ in orders]
        for i, c in zip(where, _tab_batch(rho_fn, steps) if steps else [], strict=True):
            out[i] = [cj / (rho[i + 1] - rho[i]) for cj in c]
        return out

    def start(self, run: Run, x: Tensor) -> Tensor:
        g = run.grid
        if bool((g.alpha <= 0).any()):
            raise ValueError("DEIS needs alpha > 0 at every grid point")
        schedule = self.schedule if self.schedule is not None else getattr(run.counted, "schedule", None)
        if schedule is None:
            raise ValueError("DEIS needs the schedule between grid points: the denoiser has no `schedule`; "
                             "pass DEIS(schedule=...)")
        run.state.update(eps=[], w=self.coefficients(g, schedule))
        return x

    def step(self, run: Run, x: Tensor, i: int) -> tuple[Tensor, Prediction]:
        t, a, s, an, sn = run.point(i)
        pred = run.denoise(x, t)
        hist = run.state["eps"] = ([pred.eps] + run.state["eps"])[: self.order + 1]
        w = run.state["w"][i]
        d = w[0] * hist[0]
        for c, e in zip(w[1:], hist[1 : len(w)], strict=True):
            d = d + c * e
        x = run.propose(i, x, pred, (an / a) * x, an * (sn / an - s / a), d, first_order=lambda x0, eps: eps)
        return run.correct(i, x, pred), pred

    def info(self, run: Run) -> dict[str, Any]:
        return {"orders": [len(w) - 1 for w in run.state.get("w", [])]}
