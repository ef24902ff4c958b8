"""DiffPIR (Zhu et al., CVPR-W 2023): plug-and-play restoration on the diffusion loop, no network VJP.

One step from grid point ``i`` (algorithm 1 of the paper; ``yuanzhi-zhu/DiffPIR``
``main_ddpir_deblur.py`` / ``main_ddpir_sisr.py`` / ``main_ddpir_inpainting.py``, the loop body):

1. ``x0_hat = x0(x_i)`` from one network call (the released code clamps it to ``[-1, 1]``);
2. the data (proximal) step::

       x0' = argmin_x ||y - A x||^2 + rho_i ||x - x0_hat||^2,   rho_i = lam * sigma_y^2 / sigma_bar_i^2,

   ``sigma_bar_i = sigma_i / alpha_i`` (the noise level of ``x_i / alpha_i``), i.e. the minimiser of
   ``||y - A x||^2 / (2 sigma_y^2) + (lam / (2 sigma_bar_i^2)) ||x - x0_hat||^2``. It is solved as
   ``x0' = x0_hat + d`` with ``(A^T A + rho_i I) d = A^T (y - A x0_hat)`` by at most ``cg_iterations``
   conjugate-gradient iterations (to a relative residual ``cg_tol``) through ``operator`` /
   ``operator.adjoint`` (float64 inner products, :func:`.krylov.cg`);
   for a diagonal operator (:class:`~hessdiff.tasks.operators.Inpainting`, ``Identity``) in closed form,
   ``d = A^T r / (diag(A^T A) + rho_i)`` -- the code's ``(mask * y + rho x0) / (mask + rho)``;
3. re-noising with the mixing weight ``zeta``: ``eps_hat = (x_i - alpha_i x0') / sigma_i`` and
   ``x_{i+1} = alpha_{i+1} x0' + sigma_{i+1} (sqrt(1 - zeta) eps_hat + sqrt(zeta) z)``, ``z ~ N(0, I)``
   (the code's ``eta = 0`` default: no extra DDIM noise inside the ``1 - zeta`` part).

At the last step the released code skips the data step and returns the network's ``x0_hat``
(``if seq[i] != seq[-1]``); ``data_step_last=True`` applies it there too.

Units of ``lam``. The released code solves the data step on images in ``[0, 1]`` with ``sigma`` the noise
level on that scale (``noise_level_img = 12.75/255``) while ``sigma_bar`` is measured on the ``[-1, 1]`` scale
of the network, so its ``rho = lam_code * (sigma_y / 2)^2 / sigma_bar^2`` for ``sigma_y`` on ``[-1, 1]``.
Here everything is on the run's own scale: ``lam = lam_code / 4`` reproduces the code on ``[-1, 1]``
images (the defaults table's published row says so).

``sigma_y = 0``: the code floors ``sigma`` at 0.001 on ``[0, 1]`` (``sigma = max(0.001, noise_level_img)``), i.e.
``sigma_y_min = 0.002`` on ``[-1, 1]``: the data step is then a near-exact projection. ``sigma_y_min = 0`` with
``sigma_y = 0`` gives ``rho = 0``: the exact projection ``x0_hat + A^+ (y - A x0_hat)`` (the CG iterates from 0
stay in the range of ``A^T``; exact after enough iterations, and at once for diagonal operators).

Pixel space only: DiffPIR's data step is a proximal step on the image, and with a decoder it is no longer a
linear least-squares problem; a latent run raises ``ValueError``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..denoiser import Prediction
from ..loop import Method, Result, Run, randn_like
from ..schedule import TimeGrid
from .krylov import cg
from .measurement import _check_nonneg, _choice, _measurement
from .result import run_posterior

__all__ = ["DiffPIR", "sample_diffpir", "diffpir_prox"]

DIFFPIR_SOLVERS = ("auto", "cg")


def _is_diagonal(operator: Any) -> bool:
    """Whether ``A^T A`` is diagonal with ``diag(A^T A) = A^T A 1`` (masks and the identity)."""
    from ...tasks.operators import Identity, Inpainting  # lazy: the samplers do not import the tasks

    return isinstance(operator, Inpainting | Identity)


def diffpir_prox(operator: Any, y: Tensor, x0: Tensor, rho: float, *, iterations: int = 50,
                 solver: str = "auto", tol: float | None = None) -> Tensor:
    """``argmin_x ||y - A x||^2 + rho ||x - x0||^2`` per sample (``rho >= 0``; ``rho = 0``: the
    projection of ``x0`` onto ``{A x = y}``, or the least-squares point nearest to it).

    ``solver="cg"``: ``iterations`` CG iterations on ``(A^T A + rho I) d = A^T (y - A x0)`` from ``d = 0``, in
    float64, each sample stopping once its residual is below ``tol`` times ``|A^T (y - A x0)|`` (``None``: 1e-5
    for float32 ``x0``, 1e-10 for float64 -- past that, CG would resolve the matvec's rounding noise in the
    near-null space of ``A^T A + rho I``, amplified by ``1 / rho``); ``"auto"``: the closed form for diagonal
    operators (inpainting masks, identity), CG otherwise.
    ``y`` has the operator's output shape for ``x0``'s batch; the result has ``x0``'s dtype.
    """
    r = y - operator(x0)
    b = operator.adjoint(r)
    if solver == "auto" and _is_diagonal(operator):
        ata = operator.adjoint(operator(torch.ones_like(x0)))  # diag(A^T A), broadcast to x0's shape
        den = ata + rho
        safe = torch.where(den > 0, den, torch.ones_like(den))
        return x0 + torch.where(den > 0, b / safe, torch.zeros_like(b))
    B, shape = x0.shape[0], x0.shape

    def matvec(v: Tensor) -> Tensor:  # (A^T A + rho I) v, float64 [B, d]
        w = v.reshape(shape).to(x0.dtype)
        return operator.adjoint(operator(w)).reshape(B, -1).to(torch.float64) + rho * v

    if tol is None:
        tol = 1e-10 if x0.dtype == torch.float64 else 1e-5
    d = cg(matvec, b.reshape(B, -1).to(torch.float64), iterations, tol=tol)
    return x0 + d.reshape(shape).to(x0.dtype)


class DiffPIR(Method):
    """DiffPIR's step (module docstring). ``run.state["y"]`` holds the prepared measurement.

    NFE: one network forward per step; no network VJPs (the data step uses the operator only).
    """

    name = "diffpir"
    nfe_convention = "network forwards (one per sampling step; the data step uses only the operator)"

    def __init__(self, operator: Any, y: Tensor, *, sigma_y: float, lam: float = 1.75, zeta: float = 0.3,
                 sigma_y_min: float = 0.002, cg_iterations: int = 50, cg_tol: float | None = None,
                 solver: str = "auto", clip_x0: float | None = None, data_step_last: bool = False) -> None:
        _check_nonneg(sigma_y=sigma_y, lam=lam, sigma_y_min=sigma_y_min)
        if cg_tol is not None:
            _check_nonneg(cg_tol=cg_tol)
        if not (isinstance(zeta, int | float) and 0 <= zeta <= 1):
            raise ValueError(f"zeta must be a number in [0, 1], got {zeta!r}")
        if not (isinstance(cg_iterations, int) and not isinstance(cg_iterations, bool) and cg_iterations >= 1):
            raise ValueError(f"cg_iterations must be a positive integer, got {cg_iterations!r}")
        _choice(solver, DIFFPIR_SOLVERS, "DiffPIR solver")
        if clip_x0 is not None and not (isinstance(clip_x0, int | float) and clip_x0 > 0):
            raise ValueError(f"clip_x0 must be positive or None, got {clip_x0!r}")
        if not isinstance(data_step_last, bool):
            raise ValueError(f"data_step_last must be True or False, got {data_step_last!r}")
        self.operator, self.y = operator, y
        self.sigma_y, self.lam, self.zeta = float(sigma_y), float(lam), float(zeta)
        self.sigma_y_min, self.cg_iterations, self.solver = float(sigma_y_min), cg_iterations, solver
        self.cg_tol = None if cg_tol is None else float(cg_tol)
        self.clip_x0, self.data_step_last = clip_x0, data_step_last

    def rho(self, alpha: float, sigma: float) -> float:
        """``rho = lam * max(sigma_y, sigma_y_min)^2 / (sigma / alpha)^2`` (0 where ``alpha = 0``; ``sigma > 0``)."""
        sy = max(self.sigma_y, self.sigma_y_min)
        return self.lam * sy * sy * (alpha / sigma) ** 2

    def start(self, run: Run, x: Tensor) -> Tensor:
        if run.autoencoder is not None:
            raise ValueError("diffpir works in pixel space: its proximal data step is a linear least-squares "
                             "problem on the image, which a decoder breaks; use a pixel-space model, or daps / "
                             "latent_dps / psld for latent models")
        x = x.detach()
        run.state["y"] = _measurement(run, self.operator, self.y, x)
        return x

    def step(self, run: Run, x: Tensor, i: int) -> tuple[Tensor, Prediction]:
        t, a, s, an, sn = run.point(i)
        with torch.no_grad():
            pred = run.denoise(x, t)
            x0 = pred.x0  # step 1: x0_hat
            if self.clip_x0 is not None:
                x0 = x0.clamp(-self.clip_x0, self.clip_x0)
            if s > 0 and (i + 1 < run.num_steps or self.data_step_last):  # step 2: the proximal data step
                x0 = diffpir_prox(self.operator, run.state["y"], x0, self.rho(a, s), iterations=self.cg_iterations,
                                  solver=self.solver, tol=self.cg_tol)
            eps = (x - a * x0) / s if s > 0 else pred.eps  # the effective noise of the corrected x0
            # step 3: x_{i+1} = alpha' x0 + sigma' (sqrt(1 - zeta) eps_hat + sqrt(zeta) z)
            x_next = an * x0
            if sn > 0:
                x_next = x_next + sn * math.sqrt(1.0 - self.zeta) * eps
                if self.zeta > 0:
                    x_next = x_next + sn * math.sqrt(self.zeta) * randn_like(x, run.generator)
        return x_next, Prediction(eps=eps, x0=x0)

    def nfe(self, run: Run) -> int:
        return run.cost.network_forward


def sample_diffpir(denoiser: Any, operator: Any, y: Tensor, x: Tensor, grid: TimeGrid,
                   autoencoder: Any | None = None, *, sigma_y: float, lam: float = 1.75, zeta: float = 0.3,
                   sigma_y_min: float = 0.002, cg_iterations: int = 50, cg_tol: float | None = None,
                   solver: str = "auto", clip_x0: float | None = None, data_step_last: bool = False,
                   **hooks: Any) -> Result:
    """DiffPIR (Zhu et al., CVPR-W 2023), pixel space; see :mod:`.diffpir` for the step.

    sigma_y: the measurement noise std (on the run's scale, ``[-1, 1]`` for images); floored at
      ``sigma_y_min`` in ``rho`` (0.002: the released code's 0.001 on ``[0, 1]``).
    lam: ``rho_i = lam * sigma_y^2 / (sigma_i / alpha_i)^2`` on the run's scale; the released code's
      ``lambda`` is ``4 * lam`` (its ``sigma`` is on ``[0, 1]``): deblurring ``lambda = 7`` -> ``lam = 1.75``.
    zeta: the re-noising weight in ``[0, 1]`` (deblurring 0.3, super-resolution 0.25, inpainting 1.0 in the code).
    cg_iterations, cg_tol, solver: the data step's CG, at most ``cg_iterations`` iterations and a relative
      residual tolerance (``None``: 1e-5 in float32, 1e-10 in float64); ``solver="auto"``: closed form for
      masks / identity, ``"cg"`` always CG (:func:`diffpir_prox`).
    clip_x0: clamp ``x0_hat`` to ``[-c, c]`` before the data step (the code: ``c = 1``); ``None`` disables it.
    data_step_last: also apply the data step at the last step (the code does not).
    autoencoder: must be ``None`` (pixel space only; ``ValueError`` otherwise).
    hooks: ``generator``, ``callback``, ``progress``. Cost: one network forward per step, no VJPs.
    """
    if autoencoder is not None:
        raise ValueError("diffpir works in pixel space; it has no latent (decoder) version here -- use daps, "
                         "latent_dps or psld with a latent model")
    method = DiffPIR(operator, y, sigma_y=sigma_y, lam=lam, zeta=zeta, sigma_y_min=sigma_y_min,
                     cg_iterations=cg_iterations, cg_tol=cg_tol, solver=solver, clip_x0=clip_x0,
                     data_step_last=data_step_last)
    return run_posterior(method, denoiser, x, grid, **hooks)
