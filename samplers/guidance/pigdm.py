"""ΠGDM (Song et al., ICLR 2023, "Pseudoinverse-guided diffusion models"): an isotropic Tweedie covariance
as a denoiser transform.

ΠGDM takes ``Cov[x0 | x_t] ~ r_t^2 I`` with ``r_t^2 = sigma_t^2 / (alpha_t^2 + sigma_t^2)`` (the exact posterior
variance for standard normal data), so ``p(y | x_t) ~ N(y; A x0_hat, r_t^2 A A^T + sigma_y^2 I)`` and

    g = grad_{x_t} log p(y | x_t) = J^T A^T (r_t^2 A A^T + sigma_y^2 I)^{-1} (y - A x0_hat)

(``J = d x0_hat / d x_t``: one VJP). The solve is in measurement space with operator + adjoint only:
``(lam I + A A^T) u' = y - A x0_hat`` with ``lam = sigma_y^2 / r_t^2`` (``u' = r_t^2 u``), by
``cg_iterations`` conjugate-gradient iterations (:func:`.krylov.cg`, float64, no convergence test; the
matrix is symmetric positive definite, and CG is exact after as many iterations as ``A A^T`` has distinct
eigenvalues: 1 for inpainting and average-pooling super-resolution). For ``sigma_y = 0`` the pseudo-inverse
form ``A^T u' = A^+ (y - A x0_hat)`` is used when the operator has ``pinv`` (pixel space), else CG on
``A A^T``.

How ``g`` enters the sample (``scaling``):

* ``"tweedie"`` (default): the conditional Tweedie mean ``x0_hat(x_t | y) = x0_hat + (sigma_t^2/alpha_t) g``
  with ``eps`` recomputed from it -- MMPS's transform with ``J`` replaced by ``r_t^2 alpha_t/sigma_t^2 I``,
  exact when ``Cov[x0 | x_t] = r_t^2 I`` (standard normal data); it composes with any solver.
* ``"released"``: the released code [``NVlabs/RED-diff`` ``algos/pgdm.py`` with its default ``awd: True``;
  ``probabilists/azula`` ``azula/guidance/pgdm.py::PGDMSampler.step``; ``francois-rozet/mmps-benchmark``
  ``guided_diffusion/condition_methods.py::PseudoinverseGuided``, whose ΠGDM rows PAPERS.md section 6 quotes]:
  ``x_{t-1} = DDIM(x0_hat, eps_hat) + alpha_{t-1} alpha_t r_t^2 g`` (in DDPM notation
  ``sqrt(abar_{t-1} abar_t) r_t^2 g``; noiseless: ``r_t^2 g = J^T A^+ (y - A x0_hat)``). As a prediction this
  is ``x0 = x0_hat + alpha_t r_t^2 g`` with the network's ``eps`` kept, so it reproduces the released update
  on DDIM only (:func:`sample_pigdm`). On DDIM it moves ``x_{t-1}`` by ``alpha_{t-1} alpha_t r_t^2 g`` per
  step, where the Tweedie mean moves it by ``(alpha_{t-1} - c_2 alpha_t/sigma_t) (sigma_t^2/alpha_t) g``
  (``c_2`` DDIM's ``eps`` coefficient, the term going to 0 with the step size): per step a much larger
  move that keeps the network's noise estimate, close to re-projecting ``x0_hat`` onto the measurement at
  every step when ``sigma_y`` is small. It is not exact even for standard normal data (the tests).
  The benchmark's ΠGDM rows ran this update.

``clip_x0``: ``"tweedie"`` clamps the guided mean to ``[-c, c]`` (as MMPS); ``"released"`` clamps ``x0_hat``
before the guidance (as guided-diffusion's ``clip_denoised`` in the benchmark: the residual and the VJP see
the clamped ``x0_hat``, ``eps`` is recomputed from it, the guidance itself is not clamped).

In latent space the measurement is ``A(D(z0))``, linearised at ``x0_hat`` through the decoder: each CG
iteration is a decoder VJP and a decoder JVP (``A J_D J_D^T A^T``), and ``A^T u'`` one more decoder VJP.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..autodiff import forward_jvp
from ..denoiser import Prediction, broadcast_time
from ..loop import Result
from ..schedule import TimeGrid
from .krylov import cg
from .measurement import LikelihoodDenoiser, _choice
from .mmps import run_transform_on_ddim

__all__ = ["PiGDMDenoiser", "sample_pigdm", "PIGDM_SCALINGS"]

#: how the guidance enters the sample (see the module docstring)
PIGDM_SCALINGS = ("tweedie", "released")


class PiGDMDenoiser(LikelihoodDenoiser):
    """``x0_hat(x_t | y)`` of ΠGDM behind the denoiser contract (see the module docstring).

    denoiser: the prior denoiser (differentiable in ``x``); operator, y: the linear measurement
      ``y = A x + n`` with ``n ~ N(0, sigma_y^2 I)`` (``y`` batch 1 or the run's batch);
    cg_iterations: CG iterations of the measurement-space solve per call; scaling: ``"tweedie"`` or
      ``"released"``; autoencoder: latent space (``A(D(z))``); clip_x0: see the module docstring.
    Cost per call: 1 forward and 1 VJP of the network (latent: plus ``cg_iterations`` decoder JVPs and
    ``cg_iterations + 1`` decoder backward passes).
    """

    def __init__(self, denoiser: Any, operator: Any, y: Tensor, sigma_y: float, *, cg_iterations: int = 20,
                 scaling: str = "tweedie", autoencoder: Any | None = None, clip_x0: float | None = None) -> None:
        _choice(scaling, PIGDM_SCALINGS, "ΠGDM scaling")
        if not (isinstance(cg_iterations, int) and not isinstance(cg_iterations, bool) and cg_iterations >= 1):
            raise ValueError(f"cg_iterations must be a positive integer, got {cg_iterations!r}")
        super().__init__(denoiser, operator, y, sigma_y, autoencoder=autoencoder, clip_x0=clip_x0)
        self.cg_iterations, self.scaling = cg_iterations, scaling

    def __call__(self, x: Tensor, t: Tensor | float) -> Prediction:
        a, s = (float(v.reshape(-1)[0]) for v in self.schedule.alpha_sigma(broadcast_time(t, x)))
        released = self.scaling == "released"
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            pred = self.denoiser(xr, t)
            x0 = pred.x0
            if released and self.clip_x0 is not None:  # clip_denoised before the guidance
                x0 = x0.clamp(-self.clip_x0, self.clip_x0)
            ax = self._measure(x0)
        eps = pred.eps.detach() if not (released and self.clip_x0 is not None and s > 0) \
            else (x - a * x0.detach()) / s
        r2 = s * s / (a * a + s * s)
        if not r2 > 0 and self.sigma_y > 0:  # Cov[x0 | x_t] = 0: the likelihood carries no x_t information
            return self._finish(x, a, s, x0.detach(), eps)
        lam = self.sigma_y**2 / r2 if self.sigma_y > 0 else 0.0
        y = self.y.to(dtype=ax.dtype, device=ax.device).expand_as(ax)
        B, shape = ax.shape[0], ax.shape
        r = (y - ax.detach()).reshape(B, -1).to(torch.float64)

        def at(v: Tensor) -> Tensor:  # A^T v at x0_hat (latent: J_D^T A^T v, a decoder VJP)
            v = v.reshape(shape).to(ax.dtype)
            if self.autoencoder is None:
                return self.operator.adjoint(v)
            (g,) = torch.autograd.grad(ax, x0, grad_outputs=v, retain_graph=True)
            return g

        def lin(w: Tensor) -> Tensor:  # A w (latent: A J_D w, a decoder JVP at x0_hat)
            if self.autoencoder is None:
                return self.operator(w)
            z0 = x0.detach()
            return forward_jvp(self._measure, z0, w)

        if lam == 0.0 and self.autoencoder is None and callable(getattr(self.operator, "pinv", None)) \
                and getattr(self.operator, "has_pinv", True):
            w = self.operator.pinv(r.reshape(shape).to(ax.dtype))  # A^T (A A^T)^{-1} r = A^+ r
        else:
            u = cg(lambda v: lam * v + lin(at(v)).reshape(B, -1).to(torch.float64), r, self.cg_iterations)
            w = at(u)
        (g,) = torch.autograd.grad(x0, xr, grad_outputs=w.to(x0.dtype))  # r_t^2 J^T A^T (...)^{-1} r = r_t^2 g
        if released:  # x0 + alpha_t r_t^2 g, the network's eps kept
            return self._finish(x, a, s, (x0 + a * g).detach(), eps)
        # sigma^2/alpha g = (alpha^2 + sigma^2)/alpha (r^2 g): finite as sigma -> 0
        x0 = (x0 + (a * a + s * s) / a * g).detach()
        if self.clip_x0 is not None:
            x0 = x0.clamp(-self.clip_x0, self.clip_x0)
        return Prediction(eps=(x - a * x0) / s if s > 0 else pred.eps.detach(), x0=x0)

    def _finish(self, x: Tensor, a: float, s: float, x0: Tensor, eps: Tensor) -> Prediction:
        if self.scaling == "tweedie":
            if self.clip_x0 is not None:
                x0 = x0.clamp(-self.clip_x0, self.clip_x0)
            eps = (x - a * x0) / s if s > 0 else eps
        return Prediction(eps=eps, x0=x0)


def sample_pigdm(denoiser: Any, operator: Any, y: Tensor, x: Tensor, grid: TimeGrid, autoencoder: Any | None = None,
                 *, sigma_y: float, cg_iterations: int = 20, scaling: str = "tweedie", ddim_eta: float = 1.0,
                 clip_x0: float | None = None, **hooks: Any) -> Result:
    """ΠGDM on a DDIM loop: :class:`PiGDMDenoiser` as the denoiser of
    :class:`~hessdiff.samplers.solvers.DDIM` (``scaling="released"`` with ``ddim_eta = 1`` is the
    mmps-benchmark's ΠGDM). ``hooks``: ``generator``, ``callback``, ``progress``. NFE counts network forwards
    plus VJPs (``network_backward``): 2 per step."""

    def make(counted: Any, yb: Tensor, decoder: Any) -> PiGDMDenoiser:
        return PiGDMDenoiser(counted, operator, yb, sigma_y,
                             autoencoder=decoder, cg_iterations=cg_iterations, scaling=scaling, clip_x0=clip_x0)

    return run_transform_on_ddim("sample_pigdm", make, denoiser, operator, y, x, grid, autoencoder, sigma_y=sigma_y,
                                 ddim_eta=ddim_eta, hooks=hooks,
                                 nfe_convention="network forwards plus vector-Jacobian products (1 + 1 per step)")
