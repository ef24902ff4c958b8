"""Diffusion posterior samplers that take gradients through the denoiser: DPS, latent DPS, PSLD, STSL.

Problem: sample ``x0 ~ p(x0 | y)`` for ``y = A x0 + n`` with a diffusion prior. Each method is a step of
the one sampling loop (:func:`~hessdiff.samplers.loop.sample`) and follows its paper / released code
line by line; the comments cite the equations:

* :class:`GuidedDDIM` (``dps.py``): a DDIM/DDPM step guided by the gradient of a loss of ``x0_hat``;
  :class:`DPS` is DPS and latent DPS (the loss taken through ``run.decode``), :class:`PSLD` (``psld.py``)
  PSLD with its gluing term;
* :class:`STSL` (``stsl.py``): inner gradient steps on STSL's surrogate loss, then a DDIM step;
* :class:`MMPSDenoiser` (``mmps.py``): MMPS's moment-matched posterior denoiser, a *denoiser transform*
  that composes with any solver (:func:`sample_mmps` runs it on DDIM);
* :class:`TMPDDenoiser` (``tmpd.py``, :func:`sample_tmpd`) and :class:`PiGDMDenoiser` (``pigdm.py``,
  :func:`sample_pigdm`): the same family with the diagonal of ``A J Aᵀ`` (TMPD) or an isotropic
  covariance ``r_t² I`` (ΠGDM);
* :class:`DiffPIR` (``diffpir.py``, :func:`sample_diffpir`) and :class:`DAPS` (``daps.py``,
  :func:`sample_daps`): no network VJP -- DiffPIR's proximal data step on ``x0_hat`` (CG through the
  operator) then re-noising with weight ``zeta``; DAPS's annealing with an inner ODE for ``x0_hat`` and
  Langevin steps in ``x0`` space (operator adjoint, or the decoder's VJP in latent space);
* ``measurement.py``: the measurement and input checks, norms, step-size schedules and
  :func:`hutchinson_trace_fd`; ``result.py``: :class:`Cost` and :func:`run_posterior`.

Conventions shared by every sampler here:

* ``denoiser(x_t, t) -> Prediction(eps, x0)`` is the hessdiff denoiser contract; ``grid`` a
  :class:`~hessdiff.samplers.schedule.TimeGrid` (``n`` steps, noisiest point first).
* ``operator`` is any linear measurement map with ``operator(x)`` and ``operator.adjoint(y)`` (true
  adjoint), optionally ``operator.pinv(y)`` and ``operator.output_shape(shape)`` -- e.g. the
  operators of :mod:`hessdiff.tasks.operators` (``MatrixOperator`` for the Gaussian-mixture oracles).
* ``y`` is the measurement, shaped like ``operator(x)`` for the data batch, or with batch size 1
  (then it is shared by every sample).
* ``x`` is the state at grid point 0 with the batch shape of the run (latent shape for the latent
  methods). For a VP grid starting near pure noise pass ``sigma_0 * randn``.
* Latent methods take an ``autoencoder`` with ``decode(z) -> x`` and ``encode(x) -> z``
  (:class:`~hessdiff.samplers.oracles.gmm.LinearAutoencoder`, or
  :class:`~hessdiff.samplers.diffusers.pipeline.VAEAutoencoder` for a diffusers VAE).
* Norms are per sample (the released DPS/PSLD code takes ``torch.linalg.norm`` over the whole batch
  and runs batch size 1, where the two coincide); losses are summed over the batch before
  ``torch.autograd.grad``, so samples never interact.
* ``generator`` is a ``torch.Generator`` or one per sample (see
  :func:`~hessdiff.samplers.loop.randn_like`); it drives DDIM/DDPM noise and STSL's probes.
* Arithmetic runs in float32 (float64 for float64 inputs) whatever the network's dtype.

Every run returns a :class:`PosteriorResult` (the loop's :class:`~hessdiff.samplers.loop.Result`) with
the samples and a :class:`Cost` record.
"""

from __future__ import annotations

from collections.abc import Callable

from ..loop import CountingDenoiser, Result
from .daps import DAPS, sample_daps
from .diffpir import DiffPIR, sample_diffpir
from .dps import DPS, GuidedDDIM, sample_dps, sample_latent_dps
from .measurement import hutchinson_trace_fd, prepare_measurement
from .mmps import MMPSDenoiser, sample_mmps
from .pigdm import PiGDMDenoiser, sample_pigdm
from .psld import PSLD, sample_psld
from .result import Cost, PosteriorResult, run_posterior
from .stsl import STSL, STSLOptions, sample_stsl
from .tmpd import TMPDDenoiser, sample_tmpd

__all__ = [
    "Cost",
    "PosteriorResult",
    "CountingDenoiser",
    "sample_dps",
    "sample_latent_dps",
    "sample_psld",
    "sample_stsl",
    "sample_mmps",
    "MMPSDenoiser",
    "sample_tmpd",
    "TMPDDenoiser",
    "sample_pigdm",
    "PiGDMDenoiser",
    "sample_diffpir",
    "DiffPIR",
    "sample_daps",
    "DAPS",
    "hutchinson_trace_fd",
    "prepare_measurement",
    "POSTERIOR_SAMPLERS",
    "LATENT_METHODS",
    "get_posterior_sampler",
    "GuidedDDIM",
    "DPS",
    "PSLD",
    "STSL",
    "STSLOptions",
    "run_posterior",
]

#: name -> sampler; latent methods take ``autoencoder`` as their sixth argument
POSTERIOR_SAMPLERS: dict[str, Callable[..., Result]] = {
    "dps": sample_dps,
    "latent_dps": sample_latent_dps,
    "psld": sample_psld,
    "stsl": sample_stsl,
    "mmps": sample_mmps,
    "tmpd": sample_tmpd,
    "pigdm": sample_pigdm,
    "diffpir": sample_diffpir,
    "daps": sample_daps,
}
#: methods that need an autoencoder
LATENT_METHODS = ("latent_dps", "psld")


def get_posterior_sampler(name: str) -> Callable[..., Result]:
    try:
        return POSTERIOR_SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown posterior sampler {name!r}; available: {', '.join(POSTERIOR_SAMPLERS)}") from None
