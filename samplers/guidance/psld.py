"""PSLD (Rout et al., NeurIPS 2023; released ``psld.py::p_sample_ddim``): the gradient-guided DDIM step
of :class:`~hessdiff.samplers.guidance.dps.GuidedDDIM` with PSLD's loss, data term plus gluing term."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..loop import Result, Run, randn_like
from ..schedule import TimeGrid
from .dps import GuidedDDIM
from .measurement import GLUING_MODES, _back_project, _check_nonneg, _choice, _norm, _require_autoencoder
from .result import run_posterior

__all__ = ["PSLD", "sample_psld"]


def _gluing(run: Run, operator: Any, x: Tensor, z0: Tensor, y_back: Tensor, mode: str) -> Tensor:
    """PSLD's gluing residual ``E(Aᵀy + (I - AᵀA) x) - z0`` (``mode="adjoint"``, true adjoint) or with the
    orthogonal projector ``E(A⁺y + (I - A⁺A) x) - z0`` (``mode="pinv"``); ``y_back`` is ``Aᵀy`` / ``A⁺y``."""
    back = operator.adjoint(operator(x)) if mode == "adjoint" else operator.pinv(operator(x))
    return run.encode(y_back + x - back, z0) - z0


class PSLD(GuidedDDIM):
    """PSLD's guided step (``placement="after"``, no clipping), latent space:
    ``loss = omega |A D(z0_hat) (+ noise) - y| + gamma |E(Aᵀy + (I - AᵀA) D(z0_hat)) - z0_hat|``."""

    name = "psld"

    def __init__(self, operator: Any, y: Tensor, *, gamma: float = 0.1, omega: float = 1.0, gluing: str = "adjoint",
                 ddim_eta: float = 0.0, measurement_noise: float = 0.0) -> None:
        _choice(gluing, GLUING_MODES, "gluing")
        _check_nonneg(gamma=gamma, omega=omega, ddim_eta=ddim_eta, measurement_noise=measurement_noise)
        super().__init__(operator, y, ddim_eta=ddim_eta)
        self.gamma, self.omega, self.gluing, self.measurement_noise = gamma, omega, gluing, measurement_noise

    def start(self, run: Run, x: Tensor) -> Tensor:
        x = super().start(run, x)
        run.state["y_back"] = _back_project(self.operator, run.state["y"], self.gluing)
        return x

    def loss(self, run: Run, z0: Tensor, z: Tensor, i: int) -> Tensor:
        # Alg. 2 / eq. 8, both norms unsquared: x = D(z0_hat), omega |A x - y| + gamma |gluing|
        x = run.decode(z0)
        ax = self.operator(x)
        if self.measurement_noise > 0:  # the released code's noiser on A x
            ax = ax + self.measurement_noise * randn_like(ax, run.generator)
        out = self.omega * _norm(ax - run.state["y"])
        if self.gamma > 0:
            out = out + self.gamma * _norm(_gluing(run, self.operator, x, z0, run.state["y_back"], self.gluing))
        return out


def sample_psld(
    denoiser: Any,
    operator: Any,
    y: Tensor,
    z: Tensor,
    grid: TimeGrid,
    autoencoder: Any,
    *,
    gamma: float = 0.1,
    omega: float = 1.0,
    gluing: str = "adjoint",
    ddim_eta: float = 0.0,
    measurement_noise: float = 0.0,
    **hooks: Any,
) -> Result:
    """PSLD (Rout et al., NeurIPS 2023; released ``psld.py::p_sample_ddim``), latent space.

    Per step: ``z0_hat = z0(z_i)``, ``z'_{i-1} = DDIM(z_i)``, ``x = D(z0_hat)``, then (Alg. 2 / eq. 8)
    ``z_{i-1} = z'_{i-1} - grad_{z_i}[ omega |A x - y| + gamma |E(Aᵀy + (I - AᵀA) x) - z0_hat| ]``
    with both norms unsquared.

    gamma, omega: published defaults 0.1 and 1 (box inpainting: 0.01 and 0.1), 1000 DDIM steps.
    gluing: ``"adjoint"`` uses the operator's true adjoint in the gluing term (the paper's formula;
      the released operators use the identity as the blur "transpose"); ``"pinv"`` uses the
      orthogonal projector ``A⁺A`` instead.
    measurement_noise: the released code passes ``A x`` through its noiser (adds fresh Gaussian noise
      of this standard deviation, from ``generator``) before the norm; 0 (default) follows the paper.
    hooks: ``generator``, ``callback``, ``progress`` (:func:`~hessdiff.samplers.loop.sample`).
    """
    _require_autoencoder(autoencoder, "psld", needs_encode=True)
    method = PSLD(operator, y, gamma=gamma, omega=omega, gluing=gluing, ddim_eta=ddim_eta,
                  measurement_noise=measurement_noise)
    return run_posterior(method, denoiser, z, grid, autoencoder, **hooks)
