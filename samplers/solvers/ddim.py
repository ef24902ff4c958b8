"""DDIM (Song et al., ICLR 2021) as a step of the sampling loop."""

from __future__ import annotations

from torch import Tensor

from ..denoiser import Prediction
from ..loop import GeneratorArg, Method, Run, randn_like


def ddim_variance(eta: float, alpha: float, sigma: float, alpha_next: float, sigma_next: float) -> float:
    """The DDIM variance ``v = eta^2 (sigma_next^2 / sigma^2) (1 - alpha^2 / alpha_next^2)`` (eq. 16;
    ``eta = 1`` on consecutive training steps is DDPM's posterior variance)."""
    an, sn = alpha_next, sigma_next
    # (1 - abar_prev)/(1 - abar) * (1 - abar/abar_prev), abar = alpha^2, 1 - abar = sigma^2
    return eta**2 * (sn**2 / sigma**2) * max(0.0, 1.0 - alpha**2 / an**2) if (eta > 0 and sn > 0) else 0.0


def ddim_step(x0: Tensor, eps: Tensor, alpha: float, sigma: float, alpha_next: float, sigma_next: float, *,
              eta: float = 0.0, generator: GeneratorArg = None) -> Tensor:
    """One DDIM update from ``(alpha, sigma)`` to ``(alpha_next, sigma_next)``:
    ``alpha_next x0 + sqrt(sigma_next^2 - v) eps + sqrt(v) z`` (Song et al. 2021, eq. 12)."""
    var = ddim_variance(eta, alpha, sigma, alpha_next, sigma_next)
    x = alpha_next * x0 + max(sigma_next**2 - var, 0.0) ** 0.5 * eps
    if var > 0:
        x = x + var**0.5 * randn_like(x, generator)
    return x


class DDIM(Method):
    """DDIM with stochasticity ``eta`` (0: deterministic, 1: DDPM-like): diffusers' ``DDIMScheduler.step``
    on a grid whose next point is the step's target. The correction acts on the noise estimate of the
    direction term (``x0`` stays uncorrected)."""

    name = "ddim"

    def __init__(self, eta: float = 0.0) -> None:
        if eta < 0:
            raise ValueError(f"eta must be nonnegative, got {eta}")
        self.eta = float(eta)

    def step(self, run: Run, x: Tensor, i: int) -> tuple[Tensor, Prediction]:
        t, a, s, an, sn = run.point(i)
        pred = run.denoise(x, t)
        var = ddim_variance(self.eta, a, s, an, sn)
        x = run.propose(i, x, pred, an * pred.x0, max(sn**2 - var, 0.0) ** 0.5, pred.eps,
                        first_order=lambda x0, eps: eps)
        if var > 0:
            x = x + var**0.5 * randn_like(x, run.generator)
        return run.correct(i, x, pred), pred
