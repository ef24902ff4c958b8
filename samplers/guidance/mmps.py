"""MMPS (Rozet et al., NeurIPS 2024): moment-matching posterior sampling as a denoiser transform.

With Tweedie's covariance ``Cov[x0 | x_t] = (sigma_t^2 / alpha_t) J`` (``J = d x0_hat / d x_t``) the
moment-matched likelihood is ``p(y | x_t) ~ N(y; A x0_hat, Sigma_y + (sigma_t^2/alpha_t) A J A^T)`` -- exact
for a Gaussian prior and a linear ``A``. Its posterior denoiser is

    x0_hat(x_t | y) = x0_hat + (sigma_t^2 / alpha_t) J^T A^T u,
    (Sigma_y + (sigma_t^2 / alpha_t) A J A^T) u = y - A x0_hat,

with ``u`` from a few Krylov iterations (:mod:`.krylov`); every matvec is one vector-Jacobian product of
``x0_hat`` (``J`` is symmetric for an exact denoiser, so ``J A^T v`` is taken as ``J^T A^T v``), plus one
more for the guided mean. :class:`MMPSDenoiser` returns that guided prediction through the denoiser
contract, so it composes with any solver of :mod:`hessdiff.samplers.solvers` (the paper's benchmark:
DDIM with ``eta = 1``). In latent space the measurement is ``A(D(z0))``: ``A`` is linearised through the
decoder by a decoder JVP in each matvec (``A J_D J J_D^T A^T``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..autodiff import forward_jvp
from ..denoiser import Prediction, broadcast_time
from ..loop import CountingDenoiser, Result
from ..schedule import TimeGrid
from ..solvers import DDIM
from .krylov import KRYLOV_SOLVERS
from .measurement import (
    LikelihoodDenoiser,
    _check_nonneg,
    _choice,
    latent_data_shape,
    prepare_measurement,
)
from .result import Cost, run_posterior

__all__ = ["MMPSDenoiser", "moment_matched_solve", "sample_mmps"]


class MMPSDenoiser(LikelihoodDenoiser):
    """``x0_hat(x_t | y)`` of MMPS behind the denoiser contract (see the module docstring).

    denoiser: the prior denoiser (differentiable in ``x``); operator, y: the linear measurement
      ``y = A x + n`` with ``n ~ N(0, sigma_y^2 I)`` (``y`` batch 1 or the run's batch);
    iterations: Krylov iterations per call (1--5 in the paper); solver: ``"gmres"`` (azula, the
      benchmark: a trained ``J`` is not symmetric) or ``"cg"``;
    autoencoder: latent space (``A(D(z))``); clip_x0: clamp the guided ``x0_hat`` to ``[-c, c]``;
    gate_sigma: trust the network's Jacobian only at noise levels ``sigma_t / alpha_t <= gate_sigma``; above
      it ``Cov[x0 | x_t]`` is ΠGDM's ``r_t^2 I`` (``r_t^2 = sigma_t^2 / (alpha_t^2 + sigma_t^2)``), so that
      ``x0_hat(x_t | y) = x0_hat + r_t^2 A^T u`` with ``(Sigma_y + r_t^2 A A^T) u = y - A x0_hat`` -- no VJP of
      the network (for networks whose Jacobian is wrong at high noise; None: everywhere the Jacobian, MMPS).
    Cost per call: 1 forward and ``iterations + 1`` VJPs of the network (latent: plus ``iterations``
    decoder JVPs and ``iterations + 1`` decoder backward passes); above the gate no network VJP (latent:
    ``iterations + 1`` decoder backward passes and ``iterations`` decoder JVPs).
    """

    def __init__(self, denoiser: Any, operator: Any, y: Tensor, sigma_y: float, *, iterations: int = 5,
                 solver: str = "gmres", autoencoder: Any | None = None, clip_x0: float | None = None,
                 gate_sigma: float | None = None) -> None:
        _choice(solver, tuple(KRYLOV_SOLVERS), "Krylov solver")
        if not (isinstance(iterations, int) and iterations >= 1):
            raise ValueError(f"iterations must be a positive integer, got {iterations!r}")
        if gate_sigma is not None and not (math.isfinite(float(gate_sigma)) and gate_sigma >= 0):
            raise ValueError(f"gate_sigma must be a finite non-negative noise level sigma/alpha, got {gate_sigma!r}")
        super().__init__(denoiser, operator, y, sigma_y, autoencoder=autoencoder, clip_x0=clip_x0)
        self.iterations, self.solver = iterations, KRYLOV_SOLVERS[solver]
        self.gate_sigma = None if gate_sigma is None else float(gate_sigma)

    def __call__(self, x: Tensor, t: Tensor | float) -> Prediction:
        a, s = (float(v.reshape(-1)[0]) for v in self.schedule.alpha_sigma(broadcast_time(t, x)))
        c = s * s / a  # Cov[x0 | x_t] = (sigma^2 / alpha) J
        gated = self.gate_sigma is not None and s > self.gate_sigma * a
        with torch.enable_grad():
            xr = x.detach().requires_grad_(not gated)
            pred = self.denoiser(xr, t)
            if gated:  # the prior covariance r^2 I: A^T (latent: J_D^T A^T) by autograd through the measurement
                pred = Prediction(eps=pred.eps.detach(), x0=pred.x0.detach().requires_grad_(True))
            ax = self._measure(pred.x0)
        y = self.y.to(dtype=ax.dtype, device=ax.device).expand_as(ax)
        if gated:
            r2 = s * s / (a * a + s * s)
            u, at = moment_matched_solve(ax, pred.x0, y, self.sigma_y, r2, self.solver, self.iterations,
                                         measure=self._measure, x0=pred.x0,
                                         through_decoder=self.autoencoder is not None)
            x0 = (pred.x0 + r2 * at(u)).detach()
        else:
            u, vjp = moment_matched_solve(ax, xr, y, self.sigma_y, c, self.solver, self.iterations,
                                          measure=self._measure, x0=pred.x0,
                                          through_decoder=self.autoencoder is not None)
            x0 = (pred.x0 + c * vjp(u)).detach()
        if self.clip_x0 is not None:
            x0 = x0.clamp(-self.clip_x0, self.clip_x0)
        return Prediction(eps=(x - a * x0) / s if s > 0 else pred.eps.detach(), x0=x0)


def moment_matched_solve(ax: Tensor, x: Tensor, y: Tensor, sigma_y: float, c: float, solver: Callable[..., Tensor],
                         iterations: int, *, measure: Callable[[Tensor], Tensor], x0: Tensor,
                         through_decoder: bool) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """``u ~ (Sigma_y + c A J A^T)^{-1} (y - A x0_hat)`` by ``iterations`` Krylov steps, per sample.

    ax: ``measure(x0)`` with ``x0 = x0_hat(x)``, still attached to the graph of ``x`` (which requires grad);
    measure: ``x0 -> A x0`` (latent: ``z0 -> A D(z0)``, linearised at ``x0`` by a decoder JVP in each matvec
    when ``through_decoder``); c: the Tweedie factor ``sigma_t^2 / alpha_t``. Every matvec is one VJP of
    ``ax`` (``J A^T v`` taken as ``J^T A^T v``); the scalars are float64. Returns ``u`` (``[B, m]`` float64)
    and ``vjp: v -> J^T A^T v`` (the guidance ``J^T A^T u`` is one more VJP)."""
    B, shape = ax.shape[0], ax.shape
    z0 = x0.detach()

    def lin(w: Tensor) -> Tensor:  # A w (latent: A J_D w, a decoder JVP at x0_hat)
        if not through_decoder:
            return measure(w)
        return forward_jvp(measure, z0, w)

    def vjp(v: Tensor) -> Tensor:  # J^T A^T v (through the decoder: J^T J_D^T A^T v)
        (g,) = torch.autograd.grad(ax, x, grad_outputs=v.reshape(shape).to(ax.dtype), retain_graph=True)
        return g

    def matvec(v: Tensor) -> Tensor:
        mv = lin(vjp(v)).reshape(B, -1).to(torch.float64)
        return sigma_y**2 * v + c * mv

    r = (y - ax.detach()).reshape(B, -1).to(torch.float64)
    return solver(matvec, r, iterations), vjp


def sample_mmps(denoiser: Any, operator: Any, y: Tensor, x: Tensor, grid: TimeGrid, autoencoder: Any | None = None,
                *, sigma_y: float, iterations: int = 5, solver: str = "gmres", ddim_eta: float = 1.0,
                clip_x0: float | None = None, gate_sigma: float | None = None, **hooks: Any) -> Result:
    """MMPS on a DDIM loop (``ddim_eta = 1``: the paper's benchmark): :class:`MMPSDenoiser` as the
    denoiser of :class:`~hessdiff.samplers.solvers.DDIM` (``gate_sigma``: the Jacobian only at noise
    levels ``sigma/alpha <= gate_sigma``, ΠGDM's ``r_t^2 I`` above). ``hooks``: ``generator``, ``callback``,
    ``progress``. NFE counts network forwards plus VJPs (``network_backward``)."""
    def make(counted: Any, yb: Tensor, decoder: Any) -> MMPSDenoiser:
        return MMPSDenoiser(counted, operator, yb, sigma_y, iterations=iterations, solver=solver,
                            autoencoder=decoder, clip_x0=clip_x0, gate_sigma=gate_sigma)

    return run_transform_on_ddim("sample_mmps", make, denoiser, operator, y, x, grid, autoencoder, sigma_y=sigma_y,
                                 ddim_eta=ddim_eta, nfe_convention="network forwards plus vector-Jacobian products "
                                 "(1 + iterations + 1 per step)", hooks=hooks)


def run_transform_on_ddim(name: str, make: Any, denoiser: Any, operator: Any, y: Tensor, x: Tensor, grid: TimeGrid,
                          autoencoder: Any | None, *, sigma_y: float, ddim_eta: float, nfe_convention: str,
                          hooks: dict[str, Any]) -> Result:
    """Run a guided denoiser transform (MMPS, TMPD, PiGDM) on a DDIM loop: checks, the counted denoiser,
    the prepared measurement, ``make(counted, y_prepared, decoder_or_None)`` -> the transform, and the cost
    (network forwards plus VJPs; the transform's decoder passes plus the final decode)."""
    _check_nonneg(ddim_eta=ddim_eta)
    if not (isinstance(x, Tensor) and math.isfinite(float(sigma_y))):
        raise ValueError(f"{name} needs a tensor x and a finite sigma_y")
    counted = CountingDenoiser(denoiser, autoencoder)
    data_shape = latent_data_shape(autoencoder, x, counted.decode)
    yb = prepare_measurement(operator, y, data_shape, torch.float64 if x.dtype == torch.float64 else torch.float32,
                             x.device)
    guided = make(counted, yb, None if autoencoder is None else _Decoder(counted))
    res = run_posterior(DDIM(ddim_eta), guided, x, grid, autoencoder, **hooks)
    cost = Cost(**{**vars(counted.cost), "wall_time_s": res.cost.wall_time_s,
                   "peak_memory_bytes": res.cost.peak_memory_bytes, "memory_measure": res.cost.memory_measure})
    cost.decoder_forward += res.cost.decoder_forward  # the final decode
    cost.nfe = cost.network_forward + cost.network_backward
    cost.nfe_convention = nfe_convention
    res.cost = cost
    return res


class _Decoder:
    """The counted decoder, as :class:`MMPSDenoiser` calls it."""

    def __init__(self, counted: CountingDenoiser) -> None:
        self.counted = counted

    def decode(self, z: Tensor) -> Tensor:
        return self.counted.decode(z)
