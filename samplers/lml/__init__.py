"""LML (Levenberg--Marquardt--Langevin) corrections for diffusion solvers (``PAPERS.md`` section 1).

* :mod:`.published` -- the published rank-one map (:class:`LMLCorrection`), the identity in exact
  arithmetic, and its matched-noise control;
* :mod:`.curvature` -- ``A = d x0_hat / d y = I - sigma^2 H`` from JVPs or secants, and the sources
  (JVPs, secants, the data covariance, a noise-level gate, per-level model statistics);
* :mod:`.hessian_step` -- the second-order Gaussian / Levenberg--Marquardt steps
  (:class:`HessianStepCorrection`) with their damping policies;
* :mod:`.langevin` -- a Newton--Langevin corrector at one noise level.

A correction is a solver hook: ``correction(proposal) -> g'`` maps the update vector ``proposal.g`` of
the solver's proposed step ``offset + scale * g`` (:class:`~hessdiff.samplers.loop.Proposal`). All
correction arithmetic runs in float32 or float64, never in the model's half precision.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from torch import Tensor

from ..loop import Proposal
from .curvature import (
    DataCovarianceSource,
    GatedSource,
    JVPSource,
    SecantCurvature,
    SecantSource,
    StatsSource,
    denoiser_jvp,
    estimate_model_stats,
    exact_curvature,
    hessian_from_curvature,
    jvp_curvature,
    secant_to_level,
    transport,
)
from .hessian_step import (
    FixedDamping,
    GainRatioDamping,
    HessianStepCorrection,
    HessianStepOptions,
    gaussian_step,
    lm_step,
)
from .langevin import NewtonLangevinCorrector
from .published import (
    NONFINITE,
    PRECISIONS,
    PUBLISHED_LAMBDA,
    LMLCorrection,
    MatchedNoiseCorrection,
    check_lamb_kappa,
    lm_correct,
    lml_rounding_law,
    published_lambda,
)

__all__ = [
    "PUBLISHED_LAMBDA", "PRECISIONS", "NONFINITE", "published_lambda", "lm_correct", "lml_rounding_law",
    "LMLCorrection", "MatchedNoiseCorrection", "denoiser_jvp", "jvp_curvature", "exact_curvature",
    "hessian_from_curvature", "SecantCurvature", "JVPSource", "SecantSource", "FixedDamping", "GainRatioDamping",
    "HessianStepOptions", "HessianStepCorrection", "gaussian_step", "lm_step", "NewtonLangevinCorrector",
    "ChainCorrection", "make_correction", "sample_lml", "sample_lml_jvp", "check_lamb_kappa", "secant_to_level",
    "transport", "DataCovarianceSource", "GatedSource", "StatsSource", "estimate_model_stats",
]


class ChainCorrection:
    """Apply several corrections in turn (``reset`` resets all)."""

    def __init__(self, *corrections: Any) -> None:
        if not corrections:
            raise ValueError("ChainCorrection needs at least one correction")
        self.corrections = corrections

    def reset(self) -> None:
        for c in self.corrections:
            c.reset()

    def __call__(self, proposal: Proposal) -> Tensor:
        for c in self.corrections:
            proposal = proposal.with_g(c(proposal))
        return proposal.g


def sample_lml(denoiser: Any, x: Tensor, grid: Any, *, solver: str = "dpm", lamb: float = 1e-3,
               kappa: float = 0.0, precision: str = "float32", **solver_kwargs: Any) -> Tensor:
    """Sample with the published LML correction (:class:`LMLCorrection`) on a base solver.

    ``solver``: a key of :data:`~hessdiff.samplers.solvers.SOLVERS` (``"dpm"`` = multistep
    DPM-Solver-3 with noise prediction, the paper's CIFAR-10 base; ``"ddim"``, ``"dpm++"`` (2M),
    ``"euler"`` for flow matching). With ``kappa = 0`` the result equals the base solver's up to
    float32 rounding noise (see :class:`LMLCorrection`).
    """
    from ..solvers import get_solver

    return get_solver(solver)(denoiser, x, grid, correction=LMLCorrection(lamb, kappa, precision), **solver_kwargs)


_HS_KEYS = {"damping", "adaptive", "only", "method", "floor", "generator", "refresh", "hold", "lam_min",
            "lam_bad"} | {f.name for f in fields(HessianStepOptions)}


def sample_lml_jvp(denoiser: Any, x: Tensor, grid: Any, *, solver: str = "dpm++", rank: int = 2,
                   only: str | None = "first", **kwargs: Any) -> Tensor:
    """Sample with the JVP-curvature Gaussian step (:class:`HessianStepCorrection`, ``source="jvp"``).

    Costs ``grid.num_steps`` network evaluations plus ``rank`` JVPs per corrected step (with the
    default ``only="first"``: ``rank`` JVPs in total). Keywords of :class:`HessianStepCorrection` go
    to it, the others to the solver.
    """
    from ..solvers import get_solver

    ckw = {k: kwargs.pop(k) for k in list(kwargs) if k in _HS_KEYS}
    corr = HessianStepCorrection("jvp", rank, only=only, **ckw)
    return get_solver(solver)(denoiser, x, grid, correction=corr, **kwargs)


_CORRECTIONS: dict[str, Any] = {
    "published": LMLCorrection,
    "matched-noise": MatchedNoiseCorrection,
    "hessian-step": HessianStepCorrection,
}


def make_correction(name: str, **kwargs: Any) -> Any:
    """Build a correction by name: ``"published"`` (:class:`LMLCorrection`), ``"matched-noise"``,
    ``"hessian-step"`` (:class:`HessianStepCorrection`)."""
    if name not in _CORRECTIONS:
        raise ValueError(f"unknown correction {name!r}; expected one of {sorted(_CORRECTIONS)}")
    return _CORRECTIONS[name](**kwargs)
