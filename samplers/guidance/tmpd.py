"""TMPD (Boys et al. 2023, "Tweedie moment projected diffusions"): MMPS's likelihood with a diagonal
measurement covariance, as a denoiser transform.

The moment-matched likelihood of :mod:`.mmps` is ``N(y; A x0_hat, sigma_y^2 I + (sigma_t^2/alpha_t) A J A^T)``
(``J = d x0_hat / d x_t``). TMPD keeps the diagonal of ``A J A^T`` only, estimated from one vector-Jacobian
product as ``d = A J A^T 1``, taken as ``A (J^T A^T 1)`` (``J`` is symmetric for an exact denoiser) -- the
exact diagonal when ``A J A^T`` is diagonal (e.g. a diagonal prior covariance seen through a mask), its row
sums otherwise. The posterior denoiser is then

    u = (y - A x0_hat) / (sigma_y^2 + (sigma_t^2/alpha_t) d)      (elementwise),
    x0_hat(x_t | y) = x0_hat + (sigma_t^2/alpha_t) J^T A^T u       (a second VJP)

[code: ``bb515/tmpdjax`` ``tmpd/solvers.py::KPDDPMplus.analysis``; ``probabilists/azula``
``azula/guidance/tmpd.py::TMPDenoiser.forward``]. Cost per call: 1 forward and 2 VJPs. (tmpdjax uses the
row-sum estimate in its masked ("plus") samplers only. For a blur, the row sum of a smooth ``A J A^T`` is
about the kernel's footprint times its diagonal, so the variance is overestimated and the guidance weak.)

Guard: for a trained network the row-sum estimate ``d`` can be zero or negative (``J`` is no covariance
there, and off-diagonal entries can cancel the diagonal), which would flip or blow up ``u`` when
``sigma_y`` is small. The variance estimate ``(sigma_t^2/alpha_t) d`` is therefore clamped to at least
``variance_floor`` (default ``1e-6``, in the squared units of ``y``: far below the exact value
``diag(A Cov[x0|x_t] A^T)`` except where the estimate failed). The released code has no such guard and relies
on clamping ``x0_hat`` instead (tmpdjax: "requires static thresholding ... to remain numerically stable").

As :class:`~.mmps.MMPSDenoiser`, the result goes through the denoiser contract and composes with any solver;
:func:`sample_tmpd` runs it on DDIM (``eta = 1``: the mmps-benchmark setting). In latent space the
measurement is ``A(D(z0))``, linearised through the decoder by one decoder JVP (``A J_D J J_D^T A^T 1``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..autodiff import forward_jvp
from ..denoiser import Prediction, broadcast_time
from ..loop import Result
from ..schedule import TimeGrid
from .measurement import LikelihoodDenoiser
from .mmps import run_transform_on_ddim

__all__ = ["TMPDDenoiser", "sample_tmpd"]


class TMPDDenoiser(LikelihoodDenoiser):
    """``x0_hat(x_t | y)`` of TMPD behind the denoiser contract (see the module docstring).

    denoiser: the prior denoiser (differentiable in ``x``); operator, y: the linear measurement
      ``y = A x + n`` with ``n ~ N(0, sigma_y^2 I)`` (``y`` batch 1 or the run's batch);
    autoencoder: latent space (``A(D(z))``); clip_x0: clamp the guided ``x0_hat`` to ``[-c, c]``;
    variance_floor: the smallest value of the diagonal variance estimate ``(sigma_t^2/alpha_t) d``.
    Cost per call: 1 forward and 2 VJPs of the network (latent: plus 1 decoder JVP and 2 decoder
    backward passes).
    """

    def __init__(self, denoiser: Any, operator: Any, y: Tensor, sigma_y: float, *, autoencoder: Any | None = None,
                 clip_x0: float | None = None, variance_floor: float = 1e-6) -> None:
        if not (isinstance(variance_floor, int | float) and math.isfinite(variance_floor) and variance_floor > 0):
            raise ValueError(f"variance_floor must be a finite positive number, got {variance_floor!r}")
        super().__init__(denoiser, operator, y, sigma_y, autoencoder=autoencoder, clip_x0=clip_x0)
        self.variance_floor = float(variance_floor)

    def __call__(self, x: Tensor, t: Tensor | float) -> Prediction:
        a, s = (float(v.reshape(-1)[0]) for v in self.schedule.alpha_sigma(broadcast_time(t, x)))
        c = s * s / a  # Cov[x0 | x_t] = (sigma^2 / alpha) J
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            pred = self.denoiser(xr, t)
            ax = self._measure(pred.x0)
        y = self.y.to(dtype=ax.dtype, device=ax.device).expand_as(ax)
        B, shape = ax.shape[0], ax.shape

        def vjp(v: Tensor) -> Tensor:  # J^T A^T v (through the decoder: J^T J_D^T A^T v)
            (g,) = torch.autograd.grad(ax, xr, grad_outputs=v.reshape(shape).to(ax.dtype), retain_graph=True)
            return g

        def lin(w: Tensor) -> Tensor:  # A w (latent: A J_D w, a decoder JVP at x0_hat)
            if self.autoencoder is None:
                return self.operator(w)
            z0 = pred.x0.detach()
            return forward_jvp(self._measure, z0, w)

        d = lin(vjp(torch.ones_like(ax))).reshape(B, -1).to(torch.float64)  # A J A^T 1
        var = (c * d).clamp(min=self.variance_floor)
        r = (y - ax.detach()).reshape(B, -1).to(torch.float64)
        u = r / (self.sigma_y**2 + var)
        x0 = (pred.x0 + c * vjp(u)).detach()
        if self.clip_x0 is not None:
            x0 = x0.clamp(-self.clip_x0, self.clip_x0)
        return Prediction(eps=(x - a * x0) / s if s > 0 else pred.eps.detach(), x0=x0)


def sample_tmpd(denoiser: Any, operator: Any, y: Tensor, x: Tensor, grid: TimeGrid, autoencoder: Any | None = None,
                *, sigma_y: float, ddim_eta: float = 1.0, clip_x0: float | None = None,
                variance_floor: float = 1e-6, **hooks: Any) -> Result:
    """TMPD on a DDIM loop (``ddim_eta = 1``: the mmps-benchmark setting): :class:`TMPDDenoiser` as the
    denoiser of :class:`~hessdiff.samplers.solvers.DDIM`. ``hooks``: ``generator``, ``callback``,
    ``progress``. NFE counts network forwards plus VJPs (``network_backward``): 3 per step."""

    def make(counted: Any, yb: Tensor, decoder: Any) -> TMPDDenoiser:
        return TMPDDenoiser(counted, operator, yb, sigma_y,
                            autoencoder=decoder, clip_x0=clip_x0, variance_floor=variance_floor)

    return run_transform_on_ddim("sample_tmpd", make, denoiser, operator, y, x, grid, autoencoder, sigma_y=sigma_y,
                                 ddim_eta=ddim_eta, hooks=hooks,
                                 nfe_convention="network forwards plus vector-Jacobian products (1 + 2 per step)")
