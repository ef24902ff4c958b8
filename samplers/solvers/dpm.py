"""Multistep DPM-Solver (Lu et al., NeurIPS 2022) and DPM-Solver++ (Lu et al., 2023), orders 1--3,
as a step of the sampling loop; matches diffusers' ``DPMSolverMultistepScheduler`` to rounding."""

from __future__ import annotations

import torch
from torch import Tensor

from ..denoiser import Prediction
from ..loop import Method, Run


def dpm_orders(n: int, order: int, lower_order_final: bool, final_zero: bool) -> list[int]:
    """Per-step orders as diffusers picks them: warm-up with lower orders, and the last steps lowered
    when ``n < 15`` (or when the last step lands at ``sigma = 0``, where only order 1 is finite)."""
    orders = []
    for i in range(n):
        o = min(order, i + 1)
        if i == n - 1 and (final_zero or (lower_order_final and n < 15)):
            o = 1
        if i == n - 2 and lower_order_final and n < 15:
            o = min(o, 2)
        orders.append(o)
    return orders


def _differences(hist: list[Tensor], lam_hist: list[float], h: float, o: int) -> list[Tensor]:
    """``[D0, D1(, D2)]``: the model output and its scaled divided differences in log-SNR."""
    m0 = hist[-1]
    if o == 1:
        return [m0]
    r0 = (lam_hist[-1] - lam_hist[-2]) / h
    D1_0 = (m0 - hist[-2]) / r0
    if o == 2:
        return [m0, D1_0]
    r1 = (lam_hist[-2] - lam_hist[-3]) / h
    D1_1 = (hist[-2] - hist[-3]) / r1
    return [m0, D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1), (D1_0 - D1_1) / (r0 + r1)]


def _increment_pp(D: list[Tensor], h: float, an: float, sn: float, o: int, midpoint: bool) -> Tensor:
    """DPM-Solver++ (data prediction): ``x_next - (sigma_next / sigma) x``."""
    if sn == 0.0:  # h = inf: the step lands on x0
        return an * D[0]
    em = torch.expm1(torch.tensor(-h, dtype=torch.float64)).item()  # e^{-h} - 1
    inc = -(an * em) * D[0]
    if o == 2:
        inc = inc - 0.5 * (an * em) * D[1] if midpoint else inc + (an * (em / h + 1.0)) * D[1]
    elif o == 3:
        inc = inc + (an * (em / h + 1.0)) * D[1] - (an * ((em + h) / h**2 - 0.5)) * D[2]
    return inc


def _increment_eps(D: list[Tensor], h: float, a: float, s: float, an: float, sn: float, o: int,
                   midpoint: bool) -> Tensor:
    """DPM-Solver (noise prediction): ``x_next - (alpha_next / alpha) x``."""
    if sn == 0.0:  # sigma_next e^h = alpha_next sigma / alpha
        return -(an * s / a) * D[0]
    ep = torch.expm1(torch.tensor(h, dtype=torch.float64)).item()  # e^{h} - 1
    inc = -(sn * ep) * D[0]
    if o == 2:
        inc = inc - 0.5 * (sn * ep) * D[1] if midpoint else inc - (sn * (ep / h - 1.0)) * D[1]
    elif o == 3:
        inc = inc - (sn * (ep / h - 1.0)) * D[1] - (sn * ((ep - h) / h**2 - 0.5)) * D[2]
    return inc


class DPMSolver(Method):
    """Multistep DPM-Solver (``algorithm="dpmsolver"``) or DPM-Solver++ (``"dpmsolver++"``) of ``order``
    1--3 with diffusers' order warm-up, ``lower_order_final`` and ``solver_type`` for order 2. The
    correction acts on the whole increment ``x_next - base`` (base: ``(sigma_next/sigma) x`` for ++,
    ``(alpha_next/alpha) x`` otherwise)."""

    def __init__(self, order: int = 3, algorithm: str = "dpmsolver++", solver_type: str = "midpoint",
                 lower_order_final: bool = True) -> None:
        if order not in (1, 2, 3):
            raise ValueError(f"order must be 1, 2 or 3, got {order}")
        if algorithm not in ("dpmsolver", "dpmsolver++"):
            raise ValueError(f"unknown algorithm {algorithm!r}; expected 'dpmsolver' or 'dpmsolver++'")
        if solver_type not in ("midpoint", "heun"):
            raise ValueError(f"unknown solver_type {solver_type!r}; expected 'midpoint' or 'heun'")
        self.order, self.algorithm, self.solver_type = order, algorithm, solver_type
        self.lower_order_final = bool(lower_order_final)
        self.pp = algorithm == "dpmsolver++"
        self.name = "dpm++" if self.pp else "dpm"

    def start(self, run: Run, x: Tensor) -> Tensor:
        g = run.grid
        if bool((g.alpha <= 0).any()):
            raise ValueError("DPM-Solver needs alpha > 0 (a finite log-SNR) at every grid point; a grid that starts "
                             "at pure noise (alpha = 0, e.g. a flow-matching grid) needs sample_flow_euler or "
                             "sample_ddim")
        run.state.update(orders=dpm_orders(g.num_steps, self.order, self.lower_order_final,
                                           float(g.sigma[-1]) == 0.0), hist=[], lam_hist=[], lam=g.lambdas)
        return x

    def step(self, run: Run, x: Tensor, i: int) -> tuple[Tensor, Prediction]:
        st = run.state
        t, a, s, an, sn = run.point(i)
        pred = run.denoise(x, t)
        st["hist"] = (st["hist"] + [pred.x0 if self.pp else pred.eps])[-3:]
        st["lam_hist"] = (st["lam_hist"] + [float(st["lam"][i])])[-3:]
        o = st["orders"][i]
        h = float(st["lam"][i + 1]) - st["lam_hist"][-1]
        D = _differences(st["hist"], st["lam_hist"], h, o)
        midpoint = self.solver_type == "midpoint"
        if self.pp:
            base, inc = (sn / s) * x, _increment_pp(D, h, an, sn, o, midpoint)
        else:
            base, inc = (an / a) * x, _increment_eps(D, h, a, s, an, sn, o, midpoint)

        def first_order(x0: Tensor, eps: Tensor) -> Tensor:  # the DPM-Solver-1 (= DDIM) increment
            return (an - sn * a / s) * x0 if self.pp else (sn - an * s / a) * eps

        x = run.propose(i, x, pred, base, 1.0, inc, first_order=first_order)
        return run.correct(i, x, pred), pred
