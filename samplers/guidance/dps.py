"""DPS (Chung et al., ICLR 2023) and latent DPS as one gradient-guided DDIM step of the sampling loop.

:class:`GuidedDDIM` is the update DPS, latent DPS and PSLD share (DPS Alg. 1 / PSLD Alg. 2, the
released code): one network call at ``x_i``, the DDIM/DDPM step ``x'_{i-1}`` from it, then
``x_{i-1} = x'_{i-1} - grad_{x_i} loss(x0_hat(x_i))``. :class:`DPS` is its loss for both DPS and
latent DPS: the data term is taken through ``run.decode``, the identity without an autoencoder.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..denoiser import Prediction
from ..loop import Method, Result, Run
from ..schedule import TimeGrid
from ..solvers import ddim_step
from .measurement import (
    DPS_NORMS,
    PLACEMENTS,
    _check_nonneg,
    _choice,
    _clipped,
    _grad,
    _measurement,
    _norm,
    _require_autoencoder,
    _sqnorm,
)
from .result import run_posterior

__all__ = ["GuidedDDIM", "DPS", "sample_dps", "sample_latent_dps"]

_FIRST_ORDER_NFE = ("sampling steps, as the DPS/PSLD papers count (one network forward + backward each; "
                    "placement='before' adds a second forward per step)")


class GuidedDDIM(Method):
    """A DDIM/DDPM step guided by the gradient of ``loss(run, x0_hat, x_i, i)`` (per sample, step size
    included; subclasses give it). ``run.state["y"]`` holds the prepared measurement.

    ``placement="after"`` (DPS Alg. 1 / PSLD Alg. 2): the DDIM step ``x'_{i-1}`` from the network call at
    ``x_i``, then ``x_{i-1} = x'_{i-1} - grad_{x_i} loss``. ``placement="before"``: ``x_i <- x_i - grad
    loss`` first, then a DDIM step from the moved point (a second network call) -- the first-order form
    of STSL's update. ``clip_x0`` clamps ``x0_hat`` for the step and the loss (:func:`_clipped`).
    NFE: one per sampling step, as these papers count.
    """

    name = "guided-ddim"
    nfe_convention = _FIRST_ORDER_NFE

    def __init__(self, operator: Any, y: Tensor, *, ddim_eta: float, clip_x0: float | None = None,
                 placement: str = "after") -> None:
        self.operator, self.y = operator, y
        self.ddim_eta, self.clip_x0, self.placement = ddim_eta, clip_x0, placement

    def loss(self, run: Run, x0: Tensor, x: Tensor, i: int) -> Tensor:
        raise NotImplementedError

    def start(self, run: Run, x: Tensor) -> Tensor:
        x = x.detach()
        run.state["y"] = _measurement(run, self.operator, self.y, x)
        return x

    def step(self, run: Run, x: Tensor, i: int) -> tuple[Tensor, Prediction]:
        t, a, s, an, sn = run.point(i)
        x = x.detach().requires_grad_(True)
        pred = run.denoise(x, t)
        x0, eps = _clipped(pred, x, a, s, self.clip_x0)
        if self.placement == "after":
            # x'_{i-1}: DDPM ancestral step (DPS eq. 10 / Alg. 1 line 6) or DDIM step (PSLD Alg. 2)
            x_next = ddim_step(x0.detach(), eps.detach(), a, s, an, sn, eta=self.ddim_eta, generator=run.generator)
            # x_{i-1} = x'_{i-1} - grad_{x_i} loss (DPS Alg. 1 line 7; PSLD Alg. 2 lines 8-10)
            x = x_next - _grad(self.loss(run, x0, x, i).sum(), x)
        else:
            x = (x - _grad(self.loss(run, x0, x, i).sum(), x)).detach()
            with torch.no_grad():
                pred = run.denoise(x, t)
                x0, eps = _clipped(pred, x, a, s, self.clip_x0)
                x = ddim_step(x0, eps, a, s, an, sn, eta=self.ddim_eta, generator=run.generator)
        return x.detach(), pred

    def nfe(self, run: Run) -> int:
        return run.num_steps


def _dps_term(r: Tensor, zeta: float, norm: str) -> Tensor:
    """DPS's data objective whose gradient is the step: ``code``: ``zeta |r|`` (released code,
    ``norm_grad * scale``); ``paper``: ``(zeta / |r|) |r|^2`` with ``|r|`` held constant, i.e. the paper's
    ``zeta_i = zeta' / |y - A(x0_hat)|`` times the gradient of the squared norm (Alg. 1, = 2x ``code``);
    ``squared``: ``zeta |r|^2``."""
    if norm == "code":
        return zeta * _norm(r)
    sq = _sqnorm(r)
    if norm == "squared":
        return zeta * sq
    nd = sq.detach().sqrt()
    return zeta * torch.where(nd > 0, sq / nd.clamp_min(torch.finfo(nd.dtype).tiny), torch.zeros_like(sq))


class DPS(GuidedDDIM):
    """DPS's guided step, pixel or latent: ``loss = zeta * data(y - A D(x0_hat))`` with ``D`` =
    ``run.decode`` (the identity without an autoencoder, so pixel DPS and latent DPS are this one
    step). ``norm``: see :func:`_dps_term`."""

    def __init__(self, operator: Any, y: Tensor, *, zeta: float = 0.3, norm: str = "code", ddim_eta: float = 1.0,
                 clip_x0: float | None = None, placement: str = "after", name: str = "dps") -> None:
        _choice(norm, DPS_NORMS, "DPS norm")
        _choice(placement, PLACEMENTS, "placement")
        _check_nonneg(zeta=zeta, ddim_eta=ddim_eta)
        if clip_x0 is not None and not clip_x0 > 0:
            raise ValueError(f"clip_x0 must be positive or None, got {clip_x0}")
        super().__init__(operator, y, ddim_eta=ddim_eta, clip_x0=clip_x0, placement=placement)
        self.zeta, self.norm, self.name = zeta, norm, name

    def loss(self, run: Run, x0: Tensor, x: Tensor, i: int) -> Tensor:
        return _dps_term(run.state["y"] - self.operator(run.decode(x0)), self.zeta, self.norm)


def sample_dps(
    denoiser: Any,
    operator: Any,
    y: Tensor,
    x: Tensor,
    grid: TimeGrid,
    *,
    zeta: float = 0.3,
    norm: str = "code",
    ddim_eta: float = 1.0,
    clip_x0: float | None = None,
    placement: str = "after",
    **hooks: Any,
) -> Result:
    """Diffusion posterior sampling (Chung et al., ICLR 2023), pixel space.

    Per step ``i`` (Alg. 1): ``x0_hat = x0(x_i)``; ``x'_{i-1}`` = ancestral step (``ddim_eta=1`` on the
    training grid is DDPM with the posterior variance ``beta_tilde``, the paper's 1000-step loop;
    ``ddim_eta=0`` a DDIM step); ``x_{i-1} = x'_{i-1} - grad_{x_i} zeta * data(y - A x0_hat)``.

    zeta: 0.3 is the published value for super-resolution and blur, 0.5 for inpainting (1000 steps,
      images in [-1, 1]).
    norm: ``"code"`` (released code: gradient of the unsquared norm), ``"paper"`` (Alg. 1: ``zeta/|r|``
      times the gradient of ``|r|^2``, twice ``code``) or ``"squared"``; see :func:`_dps_term`.
    clip_x0: clamp ``x0_hat`` to ``[-c, c]`` for the step and the loss, as the released code does with
      ``c = 1``; ``None`` (default) disables it -- it must stay off for priors not inside ``[-1, 1]``.
    placement: ``"after"`` (DPS) or ``"before"`` (gradient step first, then a DDIM step; 2 NFE/step).
    hooks: ``generator``, ``callback``, ``progress`` (:func:`~hessdiff.samplers.loop.sample`).
    """
    method = DPS(operator, y, zeta=zeta, norm=norm, ddim_eta=ddim_eta, clip_x0=clip_x0, placement=placement)
    return run_posterior(method, denoiser, x, grid, **hooks)


def sample_latent_dps(
    denoiser: Any,
    operator: Any,
    y: Tensor,
    z: Tensor,
    grid: TimeGrid,
    autoencoder: Any,
    *,
    zeta: float = 1.0,
    norm: str = "code",
    ddim_eta: float = 0.0,
    placement: str = "after",
    **hooks: Any,
) -> Result:
    """Latent DPS: DPS through the decoder on a DDIM loop (the PSLD paper's LDPS baseline = PSLD with
    ``gamma = 0``, ``omega = zeta``):
    ``z_{i-1} = DDIM(z_i) - grad_{z_i} zeta * data(y - A D(z0_hat(z_i)))``.

    With ``placement="before"``, ``norm="squared"`` and ``zeta = lam`` this is STSL with ``eta = 0`` and
    one inner step (:func:`~hessdiff.samplers.guidance.sample_stsl`). ``hooks``: as :func:`sample_dps`.
    """
    _require_autoencoder(autoencoder, "latent_dps", needs_encode=False)
    method = DPS(operator, y, zeta=zeta, norm=norm, ddim_eta=ddim_eta, placement=placement, name="latent-dps")
    return run_posterior(method, denoiser, z, grid, autoencoder, **hooks)
