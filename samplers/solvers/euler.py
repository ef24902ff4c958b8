"""Euler on the flow-matching ODE as a step of the sampling loop."""

from __future__ import annotations

from torch import Tensor

from ..denoiser import Prediction
from ..loop import Method, Run


class FlowEuler(Method):
    """``x_next = x + (sigma_next - sigma) v`` with the velocity ``v = eps - x0``: diffusers'
    ``FlowMatchEulerDiscreteScheduler`` on a rectified-flow schedule. The correction acts on ``v``."""

    name = "euler"

    def start(self, run: Run, x: Tensor) -> Tensor:
        g = run.grid
        if abs(float(g.alpha[0] + g.sigma[0]) - 1.0) > 1e-9:
            raise ValueError("sample_flow_euler needs a flow-matching grid (alpha + sigma = 1); "
                             "use sample_ddim on VP schedules")
        return x

    def step(self, run: Run, x: Tensor, i: int) -> tuple[Tensor, Prediction]:
        t, a, s, an, sn = run.point(i)
        pred = run.denoise(x, t)
        x = run.propose(i, x, pred, x, sn - s, pred.eps - pred.x0, first_order=lambda x0, eps: eps - x0)
        return run.correct(i, x, pred), pred
