"""The LML benchmark: what the published correction does, how well the Hessian variants approximate
the exact Hessian, sample quality against NFE, and wall-clock overhead.

Four parts, each a function returning plain row dicts plus a Markdown formatter:

* :func:`identity_rows` -- the published correction in float64 against the base sampler (relative
  difference of the final samples), and the float32 deviation per step against the rounding law
  ``3.4e-8 |g|^2 / lamb`` (:func:`~hessdiff.samplers.lml.lml_rounding_law`), on the grid mixtures.
* :func:`hessian_error_rows` -- each curvature estimate against the exact mixture Hessian along a
  DPM-Solver++(1) trajectory: relative operator-norm error ``|H_hat - H|_2 / |H|_2`` and relative
  error along the update direction ``|(H_hat - H) e| / |H e|`` (``e = eps_hat``), by rank and noise level.
* :func:`quality_rows` -- the prior benchmark of :mod:`hessdiff.scripts.bench.gmm`
  (:func:`~hessdiff.scripts.bench.gmm.run_prior_benchmark`, same problems, protocol and metrics) with
  the LML methods of :func:`lml_methods`, at matched NFE (JVPs counted as network evaluations:
  a method with ``j`` JVPs runs ``NFE - j`` solver steps) and, for the JVP methods, also with JVPs
  not counted (suffix ``+jvp``: ``NFE`` steps plus the JVPs).
* :func:`overhead_rows` -- wall-clock time per step of base vs corrected solvers with a small
  random-init ``UNet2DModel`` on CPU, in the same process, interleaved repeats, medians.

:func:`goal_rows` summarises the quality table: for every mixture and NFE <= 10, the best base
solver against the best LML method (relative improvement, and whether it exceeds 10 % and twice the
seed spread). ``hessdiff bench lml`` runs it from the shell.
"""

from __future__ import annotations

import statistics
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor

from hessdiff.samplers.lml import (
    DataCovarianceSource,
    GatedSource,
    HessianStepCorrection,
    LMLCorrection,
    MatchedNoiseCorrection,
    NewtonLangevinCorrector,
    SecantCurvature,
    SecantSource,
    StatsSource,
    estimate_model_stats,
    exact_curvature,
    jvp_curvature,
    lml_rounding_law,
    published_lambda,
)
from hessdiff.samplers.lml.lowrank import flat
from hessdiff.samplers.loop import CountingDenoiser, Proposal
from hessdiff.samplers.oracles.gmm import GMMDenoiser, default_gmm_schedule
from hessdiff.samplers.solvers import sample_dpm_solver
from hessdiff.scripts.bench.gmm import (
    Method,
    default_methods,
    default_problems,
    grid_gmm_prior_problem,
    low_nfe_methods,
    make_grid,
    run_prior_benchmark,
)

__all__ = [
    "BASES",
    "ALL_BASES",
    "base_methods",
    "oracle_stats",
    "oracle_data",
    "VARIANTS",
    "Variant",
    "DEFAULT_SET",
    "FastIsotropicGMM",
    "published_lambda_for",
    "lml_methods",
    "parse_method_names",
    "identity_rows",
    "hessian_error_rows",
    "quality_rows",
    "overhead_rows",
    "goal_rows",
    "zero_nfe",
    "format_identity",
    "format_hessian",
    "format_overhead",
    "format_goal",
    "EMBEDDED_SET",
    "embedded_rows",
    "format_embedded",
    "embedded_goal_rows",
]

#: the base solvers of the issue (names as in :func:`hessdiff.scripts.bench.gmm.default_methods`)
BASES: tuple[str, ...] = ("ddim", "dpm-3", "dpm++2m", "dpm++3m")


def base_methods() -> dict[str, Method]:
    """Every base solver the LML benchmark accepts: :func:`~hessdiff.scripts.bench.gmm.default_methods`
    (``ddim``, ``dpm-3``, ``dpm++2m``, ``dpm++3m``) and the training-free low-NFE solvers of PAPERS.md 7
    (:func:`~hessdiff.scripts.bench.gmm.low_nfe_methods`: ``unipc-2`` / ``unipc-3``, UniPC bh2 with data
    prediction; ``ipndm-4``, iPNDM with lower-order warm start; ``deis-3``, DEIS-tAB3). The corrections act on
    each solver's update vector (:mod:`hessdiff.samplers.solvers`): UniPC's predictor increment, iPNDM's /
    DEIS's combined noise."""
    return {**default_methods(), **low_nfe_methods()}


#: every accepted base name (:func:`base_methods`)
ALL_BASES: tuple[str, ...] = tuple(base_methods())

#: seeds of the oracle's model statistics / data covariance (fixed: they belong to the "model", not to a run)
_ORACLE_DATA_SEED = 20251
_ORACLE_DATA_N = 1024
_ORACLE_STATS_LEVELS = 12
_ORACLE_CACHE: dict[tuple[str, int, int], tuple[Any, Any]] = {}


def _prior_of(den: Any) -> Any:
    """The exact prior behind an oracle denoiser (through FastIsotropicGMM / CountingDenoiser), else None."""
    return getattr(den, "prior", None)


def _cached(kind: str, den: Any, param: int, make: Callable[[], Any], anchor: Any = None) -> Any:
    """``make()``, computed once per (kind, param) and ``anchor`` (default: the oracle's prior), the object
    whose identity keys the cache."""
    anchor = _prior_of(den) if anchor is None else anchor
    if anchor is None:
        raise ValueError(f"the {kind} variants need an exact oracle (a denoiser with a `prior`) or a denoiser "
                         "carrying `lml_stats` (a StatsSource)")
    key = (kind, id(anchor), param)
    hit = _ORACLE_CACHE.get(key)
    if hit is None or hit[0] is not anchor:
        hit = _ORACLE_CACHE[key] = (anchor, make())
    return hit[1]


def oracle_data(den: Any) -> Tensor:
    """``1024`` exact draws of the oracle's prior from a fixed seed: the "training data" of the model-free
    data-covariance and statistics sources (the same for every run, seed and NFE of a problem)."""
    return _cached("data", den, _ORACLE_DATA_N, lambda: _prior_of(den).sample(
        _ORACLE_DATA_N, torch.Generator().manual_seed(_ORACLE_DATA_SEED)))


def oracle_stats(den: Any, rank: int = 8) -> StatsSource:
    """The model statistics of an exact denoiser (:func:`~hessdiff.samplers.lml.curvature.estimate_model_stats`
    with its closed-form JVPs on :func:`oracle_data`, rank ``min(rank, d)``, 12 levels log-spaced over the
    schedule as ``python -m hessdiff.scripts.lml_stats`` places them), computed once per prior; a denoiser
    with an ``lml_stats`` attribute (a loaded statistics file) gives that instead."""
    own = getattr(den, "lml_stats", None)
    if own is not None:
        return own
    from hessdiff.scripts.lml_stats import stats_levels

    def make() -> StatsSource:
        data = oracle_data(den)
        k = min(rank, data.shape[1])
        rhos, _ = stats_levels(den.schedule, _ORACLE_STATS_LEVELS)
        exact = den
        while isinstance(exact, CountingDenoiser):  # a precomputation: not counted against any run
            exact = exact.inner
        return estimate_model_stats(_fast(exact), data, rhos, k, oversample=4, iterations=1,
                                    generator=torch.Generator().manual_seed(_ORACLE_DATA_SEED + 1))

    return _cached("stats", den, rank, make)


class _NoCurvature:
    """A curvature source that never has an estimate (the step is left to the base solver): the low side of
    a gate that corrects only at high noise."""

    jvp_calls = 0

    def reset(self) -> None:
        pass

    def observe(self, y: Tensor, x0: Tensor, rho: float) -> None:
        pass

    def estimate(self, ctx: Any, eps: Tensor, rho: float, project: Tensor | None) -> None:
        return None


def _oracle_cov(den: Any, rank: int = 32) -> DataCovarianceSource:
    """The data-covariance source of the ``cov`` variants: of :func:`oracle_data` for an exact denoiser, of
    the training images in a denoiser's ``lml_data`` attribute (a trained network, :func:`embedded_rows`)."""
    own = getattr(den, "lml_data", None)

    def make() -> DataCovarianceSource:
        data = flat(own) if own is not None else oracle_data(den)
        return DataCovarianceSource.from_data(data, rank=min(rank, data.shape[1]))

    return _cached("cov", den, rank, make, anchor=own)


def _seed_of(x: Tensor) -> int:
    """A deterministic seed from the start batch (stochastic methods then repeat exactly per seed)."""
    return zlib.crc32(x.detach().to(torch.float64).cpu().numpy().tobytes()[:4096])


def published_lambda_for(nfe: int, dim: int) -> float:
    """The README's CIFAR-10 ``lamb`` at this NFE, scaled by ``dim / 3072``: for a unit-variance update
    vector (DDIM's noise estimate, DPM-Solver's noise-form increment) this keeps ``|g|^2 / lamb``, and so
    the size of the float32 effect, as in the published CIFAR-10 setting."""
    return published_lambda("cifar10", nfe) * dim / 3072


@dataclass(frozen=True)
class Variant:
    """An LML method on top of a base solver.

    ``correction(nfe, seed, dim)`` / ``corrector(nfe, generator)`` build the hooks (either may be None);
    ``model_correction(denoiser, nfe, seed, dim)`` builds a correction that needs the model (its statistics or
    its data, e.g. :func:`oracle_stats`) instead of ``correction``; ``extra(n)`` is the number of network
    evaluations beyond the ``n`` solver steps (JVPs and corrector evaluations), used to match budgets.
    """

    doc: str
    correction: Callable[[int, int, int], Any] | None = None
    corrector: Callable[[int, torch.Generator], Any] | None = None
    extra: Callable[[int], int] = field(default=lambda n: 0)
    model_correction: Callable[[Any, int, int, int], Any] | None = None


VARIANTS: dict[str, Variant] = {
    "lml32": Variant("the published correction, float32 arithmetic, README lambda of DPM-Solver-3 on CIFAR-10 "
                     "at this NFE scaled by d / 3072 (published_lambda_for); samples where the float32 "
                     "arithmetic gives 0/0 (NaN in the released code) are left uncorrected",
                     lambda nfe, seed, d: LMLCorrection(published_lambda_for(nfe, d), 0.0, "float32", "keep")),
    "lml64": Variant("the published operator in float64 (the identity)",
                     lambda nfe, seed, d: LMLCorrection(published_lambda_for(nfe, d), 0.0, "float64")),
    "noise": Variant("control: random perturbation of the float32 correction's size",
                     lambda nfe, seed, d: MatchedNoiseCorrection(published_lambda_for(nfe, d), seed=seed)),
    "sec1": Variant("secant curvature (rank 1, zero NFE), Gaussian step at every step",
                    lambda nfe, seed, d: HessianStepCorrection("secant", 1, adaptive=False, radial="keep")),
    "sec1-ad": Variant("secant curvature (rank 1, zero NFE), gain-ratio damping",
                       lambda nfe, seed, d: HessianStepCorrection("secant", 1, adaptive=True, radial="keep")),
    "sec1-last": Variant("secant curvature, last step only (zero NFE)",
                         lambda nfe, seed, d: HessianStepCorrection("secant", 1, only="last", adaptive=False,
                                                                    radial="keep")),
    "jvp2-first": Variant("2 JVPs (Lanczos from eps_hat) at the first step: local-Gaussian first step",
                          lambda nfe, seed, d: HessianStepCorrection("jvp", 2, only="first", radial="keep"),
                          extra=lambda n: 2),
    "jvp2-first-perp": Variant("2 JVPs at the first step, radial direction excluded (radial='exclude')",
                               lambda nfe, seed, d: HessianStepCorrection("jvp", 2, only="first", radial="exclude"),
                               extra=lambda n: 2),
    "sec1-ad-perp": Variant("secant curvature, gain-ratio damping, radial part of the step left to the base "
                            "solver (zero NFE)",
                            lambda nfe, seed, d: HessianStepCorrection("secant", 1, adaptive=True, radial="exclude")),
    "jvp2-first-ad": Variant("2 JVPs at the first step, transported to later steps, gain-ratio damping",
                             lambda nfe, seed, d: HessianStepCorrection("jvp", 2, refresh="first", adaptive=True,
                                                                        radial="keep"),
                             extra=lambda n: 2),
    "jvp2-every": Variant("2 JVPs at every step, Gaussian step",
                          lambda nfe, seed, d: HessianStepCorrection("jvp", 2, adaptive=False, radial="keep"),
                          extra=lambda n: 2 * n),
    "jvp2-lm": Variant("Levenberg-Marquardt preconditioning of the update, 2-JVP Hessian, lambda = 1",
                       lambda nfe, seed, d: HessianStepCorrection("jvp", 2, mode="lm", damping=1.0, adaptive=False,
                                                                  radial="keep"),
                       extra=lambda n: 2 * n),
    "nl-jvp2": Variant("Newton-Langevin corrector after every step (1 evaluation + 2 JVPs, OU step 0.5, "
                       "lambda = 1)",
                       corrector=lambda nfe, gen: NewtonLangevinCorrector("jvp", 2, step_size=0.5, damping=1.0,
                                                                          generator=gen),
                       extra=lambda n: 3 * (n - 1)),
    "langevin": Variant("plain Langevin corrector after every step (M = sigma^2 / 2, 1 evaluation, OU step 0.5)",
                        corrector=lambda nfe, gen: NewtonLangevinCorrector("none", step_size=0.5, damping=1.0,
                                                                           generator=gen),
                        extra=lambda n: n - 1),
    "stats8": Variant("model statistics (zero NFE; rank 8, 12 levels, data-averaged Jacobian of the model, "
                      "oracle_stats; a stats file on a trained network), Gaussian step at every step",
                      model_correction=lambda den, nfe, seed, d: HessianStepCorrection(
                          oracle_stats(den), adaptive=False, radial="keep")),
    "stats8-ad": Variant("model statistics (zero NFE), gain-ratio damping: the drop-ins' lml_variant='stats'",
                         model_correction=lambda den, nfe, seed, d: HessianStepCorrection(
                             oracle_stats(den), adaptive=True, radial="keep")),
    "stats8-ad-perp": Variant("model statistics (zero NFE), gain-ratio damping, radial part left to the base "
                              "solver",
                              model_correction=lambda den, nfe, seed, d: HessianStepCorrection(
                                  oracle_stats(den), adaptive=True, radial="exclude")),
    "stats8-hi-ad": Variant("model statistics only at high noise (rho = sigma / alpha >= 1; below it the base "
                            "solver's step), gain-ratio damping (zero NFE)",
                            model_correction=lambda den, nfe, seed, d: HessianStepCorrection(
                                GatedSource(_NoCurvature(), oracle_stats(den), gate=1.0), adaptive=True,
                                radial="keep")),
    "stats8-cov-ad": Variant("gated (zero NFE): model statistics below rho = sigma / alpha = 1, the data covariance "
                             "above (where a trained network's Jacobian is least reliable and the Gaussian "
                             "transport multiplies its error by rho^2), gain-ratio damping",
                             model_correction=lambda den, nfe, seed, d: HessianStepCorrection(
                                 GatedSource(oracle_stats(den), _oracle_cov(den), gate=1.0), adaptive=True,
                                 radial="keep")),
    "cov-ad": Variant("data covariance (zero NFE, model-free: rank 32 PCA of 1024 data draws, the mean variance "
                      "on the rest), gain-ratio damping",
                      model_correction=lambda den, nfe, seed, d: HessianStepCorrection(
                          _oracle_cov(den), adaptive=True, radial="keep")),
    "cov128-ad": Variant("data covariance of rank 128 (zero NFE, model-free: rank 128 PCA of the same 1024 data "
                         "draws, the mean variance on the rest), gain-ratio damping",
                         model_correction=lambda den, nfe, seed, d: HessianStepCorrection(
                             _oracle_cov(den, 128), adaptive=True, radial="keep")),
    "sec1-cov-ad": Variant("gated (zero NFE): secant curvature below rho = sigma / alpha = 1, data covariance "
                           "above, gain-ratio damping",
                           model_correction=lambda den, nfe, seed, d: HessianStepCorrection(
                               GatedSource(SecantSource(1), _oracle_cov(den), gate=1.0), adaptive=True,
                               radial="keep")),
}

#: the method set of the published benchmark: ``(base, variant, jvp_free)`` triples
DEFAULT_SET: tuple[tuple[str, str, bool], ...] = tuple(
    [(b, v, False) for b in ("ddim", "dpm-3") for v in ("lml32", "noise")]
    + [(b, v, False) for b in ("ddim", "dpm-3", "dpm++2m") for v in ("sec1-ad", "jvp2-first")]
    + [(b, "jvp2-first-ad", False) for b in ("dpm-3", "dpm++2m")]
    + [("dpm++3m", "jvp2-first", False)]
    + [("dpm++2m", v, False) for v in ("jvp2-every", "nl-jvp2")]
    + [("dpm++2m", v, True) for v in ("jvp2-first", "jvp2-every", "jvp2-lm", "nl-jvp2")]
    + [("dpm-3", "jvp2-first", True)]
)


def _steps_for_budget(nfe: int, extra: Callable[[int], int]) -> int | None:
    """The most solver steps ``n`` with ``n + extra(n) <= nfe`` (None if not even one)."""
    best = None
    for n in range(1, nfe + 1):
        if n + extra(n) <= nfe:
            best = n
    return best


def parse_method_names(names: Sequence[str]) -> tuple[tuple[str, ...], tuple[tuple[str, str, bool], ...]]:
    """Benchmark method names as in the tables (``"unipc-2"``, ``"dpm++2m+stats8-ad"``, ``"...+jvp"``) ->
    ``(bases, triples)`` for :func:`lml_methods`; the bases are the names without a variant."""
    bases, triples = [], []
    for name in names:
        base = next((b for b in sorted(ALL_BASES, key=len, reverse=True)  # bases may contain '+'
                     if name == b or name.startswith(b + "+")), None)
        if base is None:
            raise ValueError(f"unknown base solver {name.partition('+')[0]!r} in {name!r}; "
                             f"available: {', '.join(ALL_BASES)}")
        rest = name[len(base) + 1:]
        free = rest.endswith("+jvp")
        variant = rest.removesuffix("+jvp")
        if rest and variant not in VARIANTS:
            raise ValueError(f"unknown LML variant {variant!r} in {name!r}; available: {', '.join(VARIANTS)}")
        if rest:
            triples.append((base, variant, free))
        else:
            bases.append(base)
    return tuple(dict.fromkeys(bases)), tuple(dict.fromkeys(triples))


def lml_methods(
    names: Sequence[str] | None = None,
    *,
    spacing: str = "trailing",
    bases: Sequence[str] = BASES,
    jvp_free: bool = True,
    triples: Sequence[tuple[str, str, bool]] | None = None,
) -> dict[str, Method]:
    """Benchmark methods ``"<base>"`` and ``"<base>+<variant>"`` for :func:`run_prior_benchmark`.

    Either ``names`` (keys of :data:`VARIANTS`, default all; ``"none"``: only the bases) on every base in
    ``bases`` (keys of :func:`base_methods`), or explicit
    ``triples`` ``(base, variant, jvp_free)`` (e.g. :data:`DEFAULT_SET`; their bases are added to
    ``bases``). A variant with extra evaluations (JVPs, corrector steps) at budget ``NFE`` runs the
    largest number of steps ``n`` with ``n + extra(n) <= NFE`` on a grid of the same ``spacing``
    (JVPs counted as network evaluations); its ``jvp_free`` form, named ``"<base>+<variant>+jvp"``,
    runs ``NFE`` steps with the extra evaluations on top. A budget too small for one step yields
    NaN samples (the benchmark then raises), so such combinations should not be requested.
    """
    base_fns = base_methods()
    if triples is None:
        names = list(VARIANTS) if names is None else [n for n in names if n != "none"]
        bad = [n for n in names if n not in VARIANTS]
        if bad:
            raise ValueError(f"unknown LML variant {bad[0]!r}; available: {', '.join(VARIANTS)}")
        triples = [(b, v, False) for b in bases for v in names]
        if jvp_free:
            triples += [(b, v, True) for b in bases for v in names if VARIANTS[v].extra(2) > 0]
    else:
        bases = list(dict.fromkeys([*bases, *(t[0] for t in triples)]))
    unknown = [b for b in bases if b not in base_fns]
    if unknown:
        raise ValueError(f"unknown base solver {unknown[0]!r}; available: {', '.join(base_fns)}")
    bad = [t[1] for t in triples if t[1] not in VARIANTS]
    if bad:
        raise ValueError(f"unknown LML variant {bad[0]!r}; available: {', '.join(VARIANTS)}")
    out: dict[str, Method] = {b: base_fns[b] for b in bases}
    for b, v, free in triples:
        name = f"{b}+{v}" + ("+jvp" if free else "")
        out[name] = partial(_run_variant, base_fns[b], VARIANTS[v], spacing, not free)
    return out


class FastIsotropicGMM:
    """The exact denoiser of a mixture with isotropic components, with an ``O(B K d)`` matmul JVP.

    Forwards ``__call__``/``schedule``/everything else to a :class:`~hessdiff.samplers.oracles.gmm.GMMDenoiser`
    and replaces ``jvp_x0`` by the closed form for ``Sigma_k = e_k I``: with ``v_k = alpha^2 e_k +
    sigma^2``, ``s_k = (alpha mu_k - x) / v_k``, ``(grad^2 log p) u = sum_k r_k (s_k <s_k, u> - u / v_k)
    - s <s, u>``, all through ``[B, K]`` matmuls (the general oracle forms ``[B, K, d]`` tensors, about
    100x slower at d = 800). Same values to float64 rounding (tested).
    """

    def __init__(self, den: GMMDenoiser) -> None:
        p = den.prior
        if p.Q is not None or not bool((p.eig == p.eig[:, :1]).all()):
            raise ValueError("FastIsotropicGMM needs isotropic components")
        self.den, self.schedule = den, den.schedule

    def __call__(self, x: Tensor, t: Any) -> Any:
        return self.den(x, t)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.den, name)

    def jvp_x0(self, x: Tensor, t: Any, v: Tensor) -> Tensor:
        p = self.den.prior
        f = flat(x).to(p.dtype)
        u = flat(v).to(p.dtype)
        a, s = (w.to(f.dtype)[:, None] for w in self.den.alpha_sigma(x, t))
        var = a**2 * p.eig[None, :, 0] + s**2  # [B, K]
        mu = p.means
        sq = (f * f).sum(-1, keepdim=True) - 2 * a * (f @ mu.T) + a**2 * (mu**2).sum(-1)[None]
        r = torch.softmax(p.weights.log() - 0.5 * (sq / var + p.dim * var.log()), dim=-1)
        rv = r / var
        score = a * (rv @ mu) - f * rv.sum(-1, keepdim=True)
        c = (a * (u @ mu.T) - (f * u).sum(-1, keepdim=True)) / var  # <s_k, u>
        rcv = r * c / var
        hu = a * (rcv @ mu) - f * rcv.sum(-1, keepdim=True) - u * rv.sum(-1, keepdim=True) \
            - score * (score * u).sum(-1, keepdim=True)
        return ((u + s**2 * hu) / a).reshape(x.shape).to(x.dtype)


def _fast(den: Any) -> Any:
    if isinstance(den, GMMDenoiser):
        p = den.prior
        if p.Q is None and bool((p.eig == p.eig[:, :1]).all()):
            return FastIsotropicGMM(den)
    return den


def _run_variant(base: Method, var: Variant, spacing: str, matched: bool, den: Any, x: Tensor,
                 grid: Any) -> Tensor:
    nfe = grid.num_steps
    den = _fast(den)
    if matched and var.extra(2) > 0:
        n = _steps_for_budget(nfe, var.extra)
        if n is None:
            return torch.full_like(x, float("nan"))
        grid = make_grid(den.schedule, n, spacing)
    seed = _seed_of(x)
    kw: dict[str, Any] = {}
    if var.correction is not None:
        kw["correction"] = var.correction(nfe, seed, flat(x).shape[1])
    if var.model_correction is not None:
        kw["correction"] = var.model_correction(den, nfe, seed, flat(x).shape[1])
    if var.corrector is not None:
        kw["corrector"] = var.corrector(nfe, torch.Generator().manual_seed(seed))
    return base(den, x, grid, **kw)


# ----------------------------------------------------------------------------------------------------
# 1. the published correction: identity in float64, rounding law in float32
# ----------------------------------------------------------------------------------------------------
class _Recorder:
    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.pairs: list[tuple[Tensor, Tensor]] = []

    def reset(self) -> None:
        self.inner.reset()
        self.pairs.clear()

    def __call__(self, p: Proposal) -> Tensor:
        out = self.inner(p)
        self.pairs.append((p.g.detach().clone(), out.detach().clone()))
        return out


def identity_rows(dims: Sequence[int] = (8, 80, 800), nfe: int = 10, n_samples: int = 256, seed: int = 0,
                  lambdas: Sequence[float] = (1e-4, 1e-3, 1e-2)) -> list[dict[str, Any]]:
    """Float64 identity and float32 rounding law of the published correction, per base solver.

    Rows: ``problem, method, lamb, f64_rel`` (``|x_LML64 - x_base| / |x_base|`` of the final float64
    samples), ``f32_rel`` (the same for float32 samples, float32 correction vs float32 base),
    ``law_ratio_median/q05/q95`` (median and 5 % / 95 % quantiles of the measured per-step
    ``|g' - g| / |g|`` over the law, over all steps and samples where the law predicts between
    1e-5 and 0.1), ``law_n`` (how many such pairs), ``nonfinite`` / ``corrected``: sample-steps
    where the float32 arithmetic gives 0/0 (``lamb`` below the float32 resolution of ``|g|^2``; the
    released code returns NaN there, here they are left uncorrected) out of all corrected ones.
    """
    rows = []
    bases = default_methods()
    for d in dims:
        prob = grid_gmm_prior_problem(int(d))
        den = GMMDenoiser(prob.prior)
        grid = make_grid(den.schedule, nfe)
        x = prob.prior.noised(float(grid.alpha[0]), float(grid.sigma[0])).sample(
            n_samples, torch.Generator().manual_seed(seed))
        for name in BASES:
            solver = bases[name]
            base64 = solver(den, x, grid)
            base32 = solver(den, x.float(), grid).double()
            for lamb in lambdas:
                out64 = solver(den, x, grid, correction=LMLCorrection(lamb, 0.0, "float64"))
                corr32 = LMLCorrection(lamb, 0.0, "float32", "keep")
                rec = _Recorder(corr32)
                out32 = solver(den, x.float(), grid, correction=rec).double()
                f32 = float((out32 - base32).norm() / base32.norm())
                ratios = []
                for g, gc in rec.pairs:
                    law = lml_rounding_law(g, lamb)
                    law = torch.where(torch.isfinite(gc).all(1) & (gc != g).any(1), law, torch.zeros_like(law))
                    rel = (gc.double() - g.double()).norm(dim=1) / g.double().norm(dim=1).clamp(min=1e-300)
                    ok = (law > 1e-5) & (law < 0.1)
                    ratios += (rel[ok] / law[ok]).tolist()
                q = torch.tensor(ratios, dtype=torch.float64) if ratios else torch.full((1,), float("nan"))
                lo, med, hi = (float(v) for v in torch.quantile(q, torch.tensor([0.05, 0.5, 0.95], dtype=q.dtype)))
                rows.append({
                    "problem": prob.name, "method": name, "lamb": lamb, "nfe": nfe,
                    "f64_rel": float((out64 - base64).norm() / base64.norm()), "f32_rel": f32,
                    "law_ratio_median": med, "law_ratio_q05": lo, "law_ratio_q95": hi, "law_n": len(ratios),
                    "nonfinite": corr32.nonfinite_count, "corrected": corr32.count,
                })
    return rows


def format_identity(rows: Sequence[Mapping[str, Any]]) -> str:
    out = ["| problem | base | lambda | float64: rel. diff. of samples | float32: rel. diff. of samples | "
           "float32 per-step change / law: median [5 %, 95 %] (pairs) | float32 0/0 (NaN in the released code) |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['problem']} | {r['method']} | {r['lamb']:g} | {r['f64_rel']:.1e} | {r['f32_rel']:.1e} | "
                   f"{r['law_ratio_median']:.2f} [{r['law_ratio_q05']:.2f}, {r['law_ratio_q95']:.2f}] "
                   f"({r['law_n']}) | {r['nonfinite']} / {r['corrected']} |")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------------
# 2. Hessian approximation error against the exact mixture Hessian
# ----------------------------------------------------------------------------------------------------
def hessian_error_rows(dims: Sequence[int] = (8, 80, 800), ranks: Sequence[int] = (1, 2, 3, 4, 8),
                       nfe: int = 10, n_samples: int = 8, seed: int = 0) -> list[dict[str, Any]]:
    """Curvature estimates against the exact ``H = -grad^2 log p_t`` along a DPM-Solver++(1) run.

    At every step of an ``nfe``-step trailing grid (states visited by the exact-denoiser sampler
    from exact draws), for each estimator: ``op`` = ``|H_hat - H|_2 / |H|_2`` and ``dir`` =
    ``|(H_hat - H) e| / |H e|`` with ``e = eps_hat`` (the update direction), averaged over samples.
    Estimators: ``none`` (``H = I / sigma^2``, i.e. ``A = 0``), ``fisher`` (the rank-one
    ``s s^T`` of the score, the published code's implicit choice), ``lanczos`` (``k`` JVPs from
    ``eps_hat``), ``nystrom`` (``k`` random-probe JVPs), both with the ``min`` floor, and ``secant``
    (rank ``k``, zero NFE, ``min`` floor). ``d x d`` matrices are formed, so keep ``d`` moderate.
    """
    rows: list[dict[str, Any]] = []
    for d in dims:
        prob = grid_gmm_prior_problem(int(d))
        den = GMMDenoiser(prob.prior)
        grid = make_grid(den.schedule, nfe)
        x = prob.prior.noised(float(grid.alpha[0]), float(grid.sigma[0])).sample(
            n_samples, torch.Generator().manual_seed(seed))
        probe = _HessianProbe(den, prob.name, int(d), ranks, torch.Generator().manual_seed(seed + 1))
        sample_dpm_solver(den, x, grid, order=1, algorithm="dpmsolver++", correction=probe)
        rows += probe.rows
    return rows


class _HessianProbe:
    """A pass-through correction that scores every curvature estimator at each visited state."""

    def __init__(self, den: GMMDenoiser, name: str, d: int, ranks: Sequence[int], gen: torch.Generator) -> None:
        self.den, self.name, self.d, self.ranks, self.gen = den, name, d, [k for k in ranks if k <= d], gen
        self.secants = {k: SecantCurvature(k, "min") for k in self.ranks if k <= 3}
        self.rows: list[dict[str, Any]] = []

    def reset(self) -> None:
        for sc in self.secants.values():
            sc.reset()

    def __call__(self, ctx: Proposal) -> Tensor:
        g = ctx.g
        den, d = self.den, self.d
        a, s = ctx.alpha, ctx.sigma
        eps = flat(ctx.pred.eps)
        y, rho = flat(ctx.x) / a, s / a
        A = exact_curvature(den, ctx.x, ctx.t)
        eye = torch.eye(d, dtype=A.dtype)
        Hs = eye - A  # sigma^2 H
        He = (Hs @ eps[..., None])[..., 0]
        hn = torch.linalg.matrix_norm(Hs, ord=2)
        ests: dict[tuple[str, int], Tensor] = {("none", 0): torch.zeros_like(A)}
        ests[("fisher", 1)] = eye - eps[:, :, None] * eps[:, None, :]  # A_hat = I - sigma^2 s s^T
        for k in self.ranks:
            ests[("lanczos", k)] = jvp_curvature(den, ctx.x, ctx.t, a, k, method="lanczos", start=eps,
                                                 floor="min").dense()
            ests[("nystrom", k)] = jvp_curvature(den, ctx.x, ctx.t, a, k, method="nystrom", generator=self.gen,
                                                 floor="min").dense()
        for k, sc in self.secants.items():
            sc.push(y, flat(ctx.pred.x0), rho)  # as HessianStepCorrection: the newest pair ends here
            est = sc.estimate(rho)
            if est is not None:
                ests[("secant", k)] = est.dense()
        for (est_name, k), Ah in ests.items():
            D = Ah - A
            op = torch.linalg.matrix_norm(D, ord=2) / hn
            dr = (D @ eps[..., None])[..., 0].norm(dim=1) / He.norm(dim=1)
            self.rows.append({"problem": self.name, "d": d, "step": ctx.i, "t": float(ctx.t), "sigma": s,
                              "estimator": est_name, "rank": k, "op": float(op.mean()), "dir": float(dr.mean())})
        return g


def format_hessian(rows: Sequence[Mapping[str, Any]], steps: Sequence[int] | None = None) -> str:
    """One table per problem: estimators down, noise levels across, ``op / dir`` relative errors."""
    out = []
    for prob in dict.fromkeys(r["problem"] for r in rows):
        rs = [r for r in rows if r["problem"] == prob]
        all_steps = sorted({int(r["step"]) for r in rs})
        use = [s for s in all_steps if steps is None or s in steps]
        sig = {int(r["step"]): (r["t"], r["sigma"]) for r in rs}
        out.append(f"**{prob}** -- relative error `|H_hat - H|_2 / |H|_2` / along the update "
                   f"`|(H_hat - H) eps| / |H eps|`, mean over samples\n")
        out.append("| estimator | rank | " + " | ".join(f"t {sig[s][0]:.0f} (σ {sig[s][1]:.3g})" for s in use) + " |")
        out.append("|---|---|" + "---|" * len(use))
        keys = list(dict.fromkeys((r["estimator"], int(r["rank"])) for r in rs))
        for name, k in keys:
            cells = []
            for s in use:
                m = [r for r in rs if r["estimator"] == name and int(r["rank"]) == k and int(r["step"]) == s]
                cells.append(f"{m[0]['op']:.2f} / {m[0]['dir']:.2f}" if m else "")
            out.append(f"| {name} | {k} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------------
# 3. sample quality against NFE
# ----------------------------------------------------------------------------------------------------
def quality_rows(
    variants: Sequence[str] | None = None,
    nfes: Sequence[int] = (5, 6, 8, 10, 15, 20, 50),
    dims: Sequence[int] = (8, 80, 800),
    gaussian_dim: int | None = 3072,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    n_samples: int = 2000,
    *,
    spacing: str = "trailing",
    bases: Sequence[str] = BASES,
    jvp_free: bool = True,
    triples: Sequence[tuple[str, str, bool]] | None = None,
    num_projections: int = 1000,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """The prior benchmark (:func:`~hessdiff.scripts.bench.gmm.run_prior_benchmark`) with :func:`lml_methods`
    (``triples`` overrides ``variants``/``bases``/``jvp_free``; :data:`DEFAULT_SET` is the published set)."""
    methods = lml_methods(variants, spacing=spacing, bases=bases, jvp_free=jvp_free, triples=triples)
    problems = default_problems(dims, gaussian_dim)
    return run_prior_benchmark(methods, nfes, problems, seeds, n_samples, spacing=spacing,
                               num_projections=num_projections, on_row=on_row)


def zero_nfe(method: str) -> bool:
    """Whether a benchmark method name is a base solver with a zero-extra-evaluation variant."""
    for b in sorted(base_methods(), key=len, reverse=True):  # base names contain "+" (dpm++2m)
        if method.startswith(b + "+"):
            v = method[len(b) + 1:]
            return v in VARIANTS and VARIANTS[v].extra(2) == 0
    return False


def goal_rows(rows: Sequence[Mapping[str, Any]], *, metric: str = "sw1", max_nfe: int = 10,
              bases: Sequence[str] = ALL_BASES, exclude_jvp_free: bool = True,
              include: Callable[[str], bool] | None = None) -> list[dict[str, Any]]:
    """Best base solver vs best LML method per (problem, NFE <= max_nfe) on ``metric``.

    ``improvement`` = ``(base - lml) / base`` of the seed means; ``spread`` = the larger of the two
    seed standard deviations; ``met`` = improvement >= 10 % and ``base - lml > 2 spread``. Because
    all methods of one seed share the start draws and the reference draws, much of the seed spread
    is common to both; ``paired_diff`` / ``paired_sd`` are the mean and standard deviation over seeds
    of the per-seed difference ``base - lml``, and ``met_paired`` = improvement >= 10 % and
    ``paired_diff > 2 paired_sd``. Methods with JVPs not counted (``+jvp``) are excluded unless
    ``exclude_jvp_free`` is False; ``include`` filters the LML methods (e.g. :func:`zero_nfe`).
    """
    cells: dict[tuple[str, int, str], list[float]] = {}
    by_seed: dict[tuple[str, int, str], dict[Any, float]] = {}
    for r in rows:
        if r["metric"] != metric or r["method"] == "exact" or int(r["nfe"]) > max_nfe:
            continue
        if exclude_jvp_free and str(r["method"]).endswith("+jvp"):
            continue
        key = (str(r["problem"]), int(r["nfe"]), str(r["method"]))
        cells.setdefault(key, []).append(float(r["value"]))
        by_seed.setdefault(key, {})[r.get("seed")] = float(r["value"])
    out = []
    for prob, nfe in sorted({(p, n) for p, n, _ in cells}):
        stats = {m: v for (p, n, m), v in cells.items() if p == prob and n == nfe}

        def best(keys: list[str], stats: dict[str, list[float]] = stats) -> tuple[str, float, float]:
            means = {m: statistics.fmean(stats[m]) for m in keys}
            name = min(means, key=means.__getitem__)
            v = stats[name]
            return name, means[name], (statistics.stdev(v) if len(v) > 1 else 0.0)

        base_keys = [m for m in stats if m in bases]
        lml_keys = [m for m in stats if m not in bases and "+" in m and (include is None or include(m))]
        if not base_keys or not lml_keys:
            continue
        bn, bm, bs = best(base_keys)
        ln, lm, ls = best(lml_keys)
        imp = (bm - lm) / bm if bm > 0 else float("nan")
        spread = max(bs, ls)
        sb, sl = by_seed[(prob, nfe, bn)], by_seed[(prob, nfe, ln)]
        diffs = [sb[k] - sl[k] for k in sb if k in sl]
        dm = statistics.fmean(diffs) if diffs else float("nan")
        dsd = statistics.stdev(diffs) if len(diffs) > 1 else float("nan")
        out.append({"problem": prob, "nfe": nfe, "base": bn, "base_mean": bm, "base_sd": bs, "lml": ln,
                    "lml_mean": lm, "lml_sd": ls, "improvement": imp,
                    "met": bool(imp >= 0.10 and (bm - lm) > 2 * spread),
                    "paired_diff": dm, "paired_sd": dsd,
                    "met_paired": bool(imp >= 0.10 and dm > 2 * dsd)})
    return out


def format_goal(rows: Sequence[Mapping[str, Any]], metric: str = "sw1") -> str:
    out = [f"| problem | NFE | best base | {metric} | best LML method | {metric} | improvement | >= 10 % and > 2 sd | "
           "paired difference | >= 10 % and > 2 sd (paired) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['problem']} | {r['nfe']} | {r['base']} | {r['base_mean']:.3f} ± {r['base_sd']:.3f} | "
                   f"{r['lml']} | {r['lml_mean']:.3f} ± {r['lml_sd']:.3f} | {100 * r['improvement']:+.0f} % | "
                   f"{'yes' if r['met'] else 'no'} | {r['paired_diff']:.3f} ± {r['paired_sd']:.3f} | "
                   f"{'yes' if r['met_paired'] else 'no'} |")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------------
# 4. wall-clock overhead
# ----------------------------------------------------------------------------------------------------
def small_unet(size: int = 32, seed: int = 0) -> Any:
    """A small random-init ``UNet2DModel`` (``size x size`` RGB, channels 32/64, one attention level)."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=size, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8).eval()


def overhead_rows(steps: int = 10, batch: int = 8, size: int = 32, repeats: int = 7,
                  variants: Sequence[str] = ("lml32", "lml64", "sec1-ad", "jvp2-first"),
                  bases: Sequence[str] = ("ddim", "dpm-3", "dpm++2m"), *, model: str | None = None,
                  methods: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Seconds per step of each base solver and corrected variant on a small ``UNet2DModel``.

    All runs share one process, model and start batch; repeats are interleaved (every method once
    per round) and the median per method is reported with ``ratio`` = median / median of its base.
    ``nfe`` counts network evaluations (JVPs of the ``jvp`` variants included, via
    :class:`~hessdiff.samplers.denoiser.CountingDenoiser`). ``model``: an embedded model (or a model
    folder; its ``lml_stats.safetensors`` serves the ``stats`` variants) instead of the random-init UNet,
    at its own image size; ``methods``: names as in the tables (:func:`parse_method_names`) instead of
    ``variants`` x ``bases``.
    """
    from hessdiff.samplers.denoiser import UNetDenoiser

    if methods is not None:
        bases, triples = parse_method_names(methods)
        pairs = [(b, None) for b in bases] + [(b, v) for b, v, _ in triples]
    else:
        pairs = [p for b in bases for p in [(b, None), *((b, v) for v in variants)]]
    if model is None:
        unet = small_unet(size)
        den = CountingDenoiser(UNetDenoiser(unet, default_gmm_schedule()))
        shape: tuple[int, ...] = (3, size, size)
    else:
        from hessdiff.samplers.models import load_model

        m = load_model(model)
        den = CountingDenoiser(UNetDenoiser.from_unet_and_scheduler(m.unet, m.scheduler))
        _attach_model_sources(den, model, m, _embedded_family(model), [v for _, v in pairs if v is not None])
        shape = tuple(m.sample_shape)
    grid = den.schedule.grid(steps, "trailing", style="dpmsolver")
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))
    base_fns = base_methods()
    runs: dict[str, tuple[str, Callable[[], Tensor]]] = {}
    for b, v in pairs:
        runs.setdefault(b, (b, partial(base_fns[b], den, x, grid)))
        if v is not None:
            runs[f"{b}+{v}"] = (b, partial(_run_variant, base_fns[b], VARIANTS[v], "trailing", False, den, x, grid))
    times: dict[str, list[float]] = {k: [] for k in runs}
    nfe: dict[str, int] = {}
    with torch.no_grad():
        for _, fn in runs.values():  # warm-up
            fn()
        for _ in range(repeats):
            for k, (_, fn) in runs.items():
                den.nfe = 0
                t0 = time.perf_counter()
                fn()
                times[k].append((time.perf_counter() - t0) / steps)
                nfe[k] = den.nfe
    rows = []
    for k, (b, _) in runs.items():
        med = statistics.median(times[k])
        rows.append({"method": k, "base": b, "s_per_step": med, "ratio": med / statistics.median(times[b]),
                     "nfe": nfe[k], "steps": steps, "batch": batch, "size": shape[-1], "repeats": repeats,
                     "threads": torch.get_num_threads(), "model": model or "small-unet"})
    return rows


def format_overhead(rows: Sequence[Mapping[str, Any]]) -> str:
    out = ["| method | network evaluations | ms / step (median) | ratio to base |", "|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['method']} | {r['nfe']} | {1000 * r['s_per_step']:.1f} | {r['ratio']:.3f} |")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------------
# 5. the embedded models: domain FID and distance to the converged ODE solution
# ----------------------------------------------------------------------------------------------------
#: methods of the embedded-model part: every base of :data:`EMBEDDED_BASES` plus these (base, variant, jvp_free)
EMBEDDED_SET: tuple[tuple[str, str, bool], ...] = (
    ("dpm-3", "lml32", False), ("dpm-3", "noise", False),
    ("dpm++2m", "sec1-ad", False), ("ddim", "sec1-ad-perp", False), ("dpm-3", "sec1-ad-perp", False),
    ("dpm++2m", "sec1-ad-perp", False), ("dpm++2m", "jvp2-first", False), ("dpm++2m", "jvp2-first-perp", False),
    ("dpm++2m", "jvp2-first-perp", True),
)
EMBEDDED_BASES: tuple[str, ...] = ("ddim", "dpm-3", "dpm++2m")


def _attach_model_sources(den: Any, name: str, model: Any, family: str, variants: Sequence[str]) -> None:
    """What the model-dependent variants read from a trained network's denoiser: ``lml_stats`` (the model
    folder's statistics file, for the stats variants) and, when a variant uses the data covariance,
    ``lml_data`` (:func:`_training_pick`; for a latent model their VAE latents, the space its UNet denoises,
    as ``python -m hessdiff.scripts.lml_stats MODEL --covariance`` encodes them)."""
    from hessdiff.samplers.models import LML_STATS_FILE, _resolve_local
    from hessdiff.scripts.lml_stats import _model_space

    folder = _resolve_local(name)
    if folder is not None and (folder / LML_STATS_FILE).is_file():
        den.lml_stats = StatsSource.load(folder / LML_STATS_FILE)
    if any(v.startswith(("cov", "sec1-cov", "stats8-cov")) for v in variants):
        device = next(model.unet.parameters()).device
        den.lml_data = _model_space(model, _training_pick(family), 64, device)


def _training_pick(family: str, n: int = 1024) -> Tensor:
    """The cov variants' data on a trained network: ``n`` training images of the family (seeded choice), the
    model-free covariance prior."""
    from hessdiff.samplers.models import embedded_dataset

    xtr = embedded_dataset("train", family=family)
    pick = torch.randperm(xtr.shape[0], generator=torch.Generator().manual_seed(_ORACLE_DATA_SEED))[:n]
    return xtr[pick]


def _embedded_family(name: str) -> str:
    """The data family of an embedded model (or of a copy of one, from its folder name); mnist otherwise."""
    from hessdiff.samplers.models import FAMILIES, _resolve_local

    folder = _resolve_local(name)
    stem = (folder.name if folder is not None else str(name)).split("-")[0]
    return stem if stem in FAMILIES else "mnist"


def embedded_rows(
    models: Sequence[str] = ("mnist", "mnist-ldm"),
    nfes: Sequence[int] = (5, 8, 10, 15, 20),
    n_samples: int = 250,
    *,
    triples: Sequence[tuple[str, str, bool]] = EMBEDDED_SET,
    bases: Sequence[str] = EMBEDDED_BASES,
    spacing: str = "trailing",
    reference_steps: int = 100,
    batch_size: int = 50,
    first_seed: int = 0,
    blocks: int = 1,
    reference_blocks: int | None = None,
    family: str | None = None,
    skip: Callable[[str, str, int], bool] | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Base solvers and LML methods on the embedded models (:func:`~hessdiff.samplers.models.load_model`).

    ``blocks`` seed blocks of ``n_samples`` each: sample ``i`` of block ``b`` starts from ``sigma_0 * randn``
    drawn from ``torch.Generator().manual_seed(first_seed + b * n_samples + i)``, the same for every
    method and NFE. Per (model, method, NFE, block): ``fid`` = domain FID of the block's decoded images
    against the family's held-out test images (features of the family's embedded classifier,
    :func:`~hessdiff.samplers.models.domain_features`; the family comes from the model's folder name
    unless ``family`` is given; biased upwards at small ``n``, comparable across methods at equal
    ``n``), and, for the first ``reference_blocks`` blocks (default all), ``psnr`` / ``ssim`` (mean and
    sd over images) of each image against the converged solution of the same probability-flow ODE from
    the same start (DPM-Solver++(2M) with ``reference_steps`` steps): the solver error as an image
    distance. With ``blocks > 1`` each (model, method, NFE) also gets a row with ``block = "pooled"``:
    the FID of all ``blocks * n_samples`` images, and each model a ``method = "real"`` row per block and
    pooled: the same FID between as many training images (class-balanced, disjoint per block) and the
    test images, the real-vs-real floor. Methods and NFE accounting as in :func:`lml_methods` (JVPs count
    as network evaluations); ``nfe_counted`` is what :class:`~hessdiff.samplers.denoiser.CountingDenoiser`
    saw per image (network forwards + JVPs). ``skip(model, method, nfe)`` True: that cell is not run
    (to resume a run whose rows are saved).
    """
    from hessdiff.eval.metrics import psnr, ssim
    from hessdiff.eval.metrics.fid import FeatureStats, fid_from_stats
    from hessdiff.samplers.denoiser import UNetDenoiser
    from hessdiff.samplers.models import (
        domain_features,
        embedded_dataset,
        load_classifier,
        load_model,
    )

    if n_samples < 2:
        raise ValueError(f"n_samples must be at least 2, got {n_samples}")
    if blocks < 1:
        raise ValueError(f"blocks must be at least 1, got {blocks}")
    n_ref_blocks = blocks if reference_blocks is None else max(0, min(blocks, reference_blocks))
    methods = lml_methods(spacing=spacing, bases=bases, triples=triples)
    rows: list[dict[str, Any]] = []

    def emit(row: dict[str, Any]) -> None:
        rows.append(row)
        if on_row is not None:
            on_row(row)

    for name in models:
        fam = family or _embedded_family(name)
        clf = load_classifier(f"hessdiff/{fam}-classifier")
        x_test = embedded_dataset("test", family=fam)
        ref_stats = FeatureStats().update(domain_features(x_test, clf))
        common = {"model": name, "family": fam, "n_test": int(x_test.shape[0]), "n_samples": n_samples,
                  "blocks": blocks, "first_seed": first_seed, "spacing": spacing}
        if blocks > 1:  # the real-vs-real floor at the same sizes
            xtr, ytr = embedded_dataset("train", with_labels=True, family=fam)
            g = torch.Generator().manual_seed(first_seed)
            per = [torch.nonzero(ytr == k).flatten() for k in range(10)]
            per = [ix[torch.randperm(ix.numel(), generator=g)] for ix in per]
            order = torch.stack([ix[: -(-n_samples * blocks // 10)] for ix in per], 1).flatten()  # class-interleaved
            feats = []
            for b in range(blocks):
                f = domain_features(xtr[order[b * n_samples:(b + 1) * n_samples]], clf)
                feats.append(f)
                emit({**common, "method": "real", "nfe": 0, "block": b,
                      "fid": fid_from_stats(FeatureStats().update(f), ref_stats)})
            emit({**common, "method": "real", "nfe": 0, "block": "pooled",
                  "fid": fid_from_stats(FeatureStats().update(torch.cat(feats)), ref_stats)})
        model = load_model(name)
        den = CountingDenoiser(UNetDenoiser.from_unet_and_scheduler(model.unet, model.scheduler))
        _attach_model_sources(den, name, model, fam, [v for _, v, _ in triples])
        decode = model.decode if model.is_latent else (lambda z: z)

        def noise_of(b: int, model: Any = model) -> Tensor:
            s0 = first_seed + b * n_samples
            return torch.cat([torch.randn((1, *model.sample_shape), generator=torch.Generator().manual_seed(s))
                              for s in range(s0, s0 + n_samples)])

        def run(fn: Callable[..., Tensor], grid: Any, noise: Tensor, den: CountingDenoiser = den,
                decode: Callable[[Tensor], Tensor] = decode) -> tuple[Tensor, float, int]:
            outs = []
            den.nfe, den.extra = 0, {}
            t0 = time.perf_counter()
            with torch.no_grad():
                for xb in (float(grid.sigma[0]) * noise).split(batch_size):
                    outs.append(decode(fn(den, xb.clone(), grid)).float().clamp(-1, 1))
            return torch.cat(outs), time.perf_counter() - t0, den.evaluations // -(-noise.shape[0] // batch_size)

        todo = [(nfe, m) for nfe in nfes for m in methods if skip is None or not skip(name, m, int(nfe))]
        if not todo:
            continue
        ref_grid = make_grid(den.schedule, reference_steps, spacing)
        refs = [run(default_methods()["dpm++2m"], ref_grid, noise_of(b))[0] for b in range(n_ref_blocks)]
        for nfe, mname in todo:
            grid = make_grid(den.schedule, nfe, spacing)
            feats = []
            for b in range(blocks):
                imgs, wall, counted = run(methods[mname], grid, noise_of(b))
                f = domain_features(imgs, clf)
                feats.append(f)
                row = {**common, "method": mname, "nfe": int(nfe), "nfe_counted": int(counted), "block": b,
                       "fid": fid_from_stats(FeatureStats().update(f), ref_stats), "wall_s": wall,
                       "reference_steps": reference_steps}
                if b < n_ref_blocks:
                    rgb, ref_rgb = imgs.expand(-1, 3, -1, -1), refs[b].expand(-1, 3, -1, -1)  # metrics take RGB
                    p, s = psnr(rgb, ref_rgb), ssim(rgb, ref_rgb)
                    row.update(psnr=float(p.mean()), psnr_sd=float(p.std()), ssim=float(s.mean()),
                               ssim_sd=float(s.std()))
                emit(row)
            if blocks > 1:
                emit({**common, "method": mname, "nfe": int(nfe), "block": "pooled",
                      "fid": fid_from_stats(FeatureStats().update(torch.cat(feats)), ref_stats)})
    return rows


def embedded_goal_rows(rows: Sequence[Mapping[str, Any]], **kw: Any) -> list[dict[str, Any]]:
    """:func:`goal_rows` on the per-block domain FIDs of :func:`embedded_rows` (problem = model, seed =
    block): best base solver vs best LML method per NFE, with the paired per-block differences."""
    flat_rows = [{"problem": r["model"], "method": r["method"], "nfe": r["nfe"], "metric": "fid",
                  "value": r["fid"], "seed": r.get("block", 0)}
                 for r in rows if r.get("block", 0) != "pooled" and r["method"] != "real"]
    return goal_rows(flat_rows, metric="fid", **kw)


def format_embedded(rows: Sequence[Mapping[str, Any]]) -> str:
    """One table per (model, metric): methods down, NFE across. With seed blocks: the pooled FID with the
    mean ± sd of the block FIDs, the real-vs-real floor, and the goal table on the paired block FIDs."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == model]
        per_block = [r for r in rs if r.get("block", 0) != "pooled" and r["method"] != "real"]
        nfes = sorted({int(r["nfe"]) for r in per_block})
        n, nb = rs[0]["n_samples"], int(rs[0].get("blocks", 1))
        fam = rs[0].get("family", "mnist")
        test = f"the {rs[0].get('n_test', 500)} held-out {'test digits' if fam == 'mnist' else fam + ' images'}"
        methods = list(dict.fromkeys(r["method"] for r in per_block))

        def cell(m: str, k: int, metric: str, fmt: str, rs: list = rs, per_block: list = per_block,
                 nb: int = nb) -> str:
            c = [float(r[metric]) for r in per_block if r["method"] == m and int(r["nfe"]) == k and metric in r]
            if not c:
                return ""
            pooled = [r for r in rs if r["method"] == m and int(r["nfe"]) == k and r.get("block") == "pooled"]
            if metric == "fid" and nb > 1:
                sd = statistics.stdev(c) if len(c) > 1 else 0.0
                head = fmt.format(pooled[0]["fid"]) if pooled else "–"
                return f"{head} ({fmt.format(statistics.fmean(c))} ± {fmt.format(sd)})"
            return fmt.format(statistics.fmean(c))

        if nb > 1:
            fid_what = (f"domain FID of {nb * n} samples ({nb} seed blocks of {n}) against {test}; in brackets "
                        f"the mean ± sd of the {nb} block FIDs (lower is better)")
        else:
            fid_what = f"domain FID of {n} samples against {test} (lower is better)"
        ref_n = sum(1 for r in per_block if r["method"] == methods[0] and int(r["nfe"]) == nfes[0] and "psnr" in r)
        for metric, what, fmt in (
            ("fid", fid_what, "{:.2f}"),
            ("psnr", f"PSNR (dB) to the converged ODE solution from the same noise, mean over "
                     f"{ref_n * n} samples", "{:.2f}"),
            ("ssim", "SSIM to the converged ODE solution, mean", "{:.3f}"),
        ):
            if metric != "fid" and not any(metric in r for r in per_block):
                continue  # no block was compared with the converged solution (--reference-blocks 0)
            out.append(f"**{model}** -- {what}\n")
            out.append("| method | " + " | ".join(f"NFE {k}" for k in nfes) + " |")
            out.append("|---|" + "---|" * len(nfes))
            for m in methods:
                out.append(f"| {m} | " + " | ".join(cell(m, k, metric, fmt) for k in nfes) + " |")
            out.append("")
            if metric != "fid":
                continue
            real = [r for r in rs if r["method"] == "real"]
            if real:
                rb = [float(r["fid"]) for r in real if r["block"] != "pooled"]
                rp = [float(r["fid"]) for r in real if r["block"] == "pooled"]
                out.append(f"Real-vs-real floor (class-balanced training images vs the same test images, the "
                           f"same sizes): {rp[0]:.2f} ({statistics.fmean(rb):.2f} ± "
                           f"{statistics.stdev(rb) if len(rb) > 1 else 0.0:.2f} per block).\n")
            goal = embedded_goal_rows(per_block) if nb > 1 else []
            if goal:
                out.append("Best LML method vs best base solver per NFE (block FIDs; paired = per-block "
                           "differences, the same start noise):\n")
                out.append(format_goal(goal, metric="FID"))
    return "\n".join(out)
