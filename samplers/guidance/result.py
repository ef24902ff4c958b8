"""What a posterior-sampling run returns: the loop's :class:`~hessdiff.samplers.loop.Result` with a
:class:`Cost` record, from :func:`run_posterior` (one call of the sampling loop)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from .. import loop
from ..loop import Callback, GeneratorArg, Method, Result
from ..schedule import TimeGrid

__all__ = ["Cost", "PosteriorResult", "run_posterior"]

#: a posterior run's result: ``samples`` (latents for latent methods), ``images``, ``cost``, ``info``
PosteriorResult = Result


@dataclass
class Cost(loop.Cost):
    """What a posterior-sampling run spent: the loop's :class:`~hessdiff.samplers.loop.Cost`.

    ``nfe`` counts as each method's paper does (``nfe_convention`` says how): DPS/PSLD one per sampling
    step; STSL one per inner gradient step, the count behind the paper's "250 NFE" for 50 DDIM steps x
    5 inner steps, although each inner step runs two network forwards; DDIM-inversion evaluations of
    the initialisation are included. ``wall_time_s`` covers the initialisation, the sampling loop and
    the final decode. These methods take no Jacobian-vector products, so ``as_dict`` leaves
    ``network_jvp`` (always 0 here) out.
    """

    def as_dict(self) -> dict[str, Any]:
        d = super().as_dict()
        d.pop("network_jvp", None)
        return d


def run_posterior(method: Method, denoiser: Any, x: Tensor, grid: TimeGrid, autoencoder: Any | None = None, *,
                  generator: GeneratorArg = None, callback: Callback | None = None,
                  progress: bool = False) -> Result:
    """``method`` on the sampling loop from ``x`` along ``grid``; the result's cost as a :class:`Cost`."""
    res = loop.sample(denoiser, x, grid, method, autoencoder=autoencoder, generator=generator, callback=callback,
                      progress=progress)
    res.cost = Cost(**vars(res.cost))
    return res
