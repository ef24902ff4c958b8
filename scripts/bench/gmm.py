"""Prior benchmarks on exact Gaussian(-mixture) models: sampling error against NFE.

Every sampler in hessdiff is compared against the same table: the error of its samples against an
exactly known prior, as a function of the number of network evaluations (NFE), with the exact
denoiser of that prior standing in for the network (so the only error is the sampler's own).

Problems (:class:`PriorProblem`):

* ``grid-gmm-<d>`` -- the 25-component grid mixture of PAPERS.md 5.2 (identity covariances, means
  ``(-8i, -8j, -8i, ...)``, uniform weights) in ``d`` dimensions. Metrics: ``sw1``, the sliced
  Wasserstein-1 distance between the sampler's ``n`` draws and ``n`` exact prior draws
  (:func:`~hessdiff.eval.metrics.distances.sliced_wasserstein`, fixed-seed directions), and ``tv``, the
  total variation between the prior's component weights and the component masses of the draws
  (:func:`~hessdiff.eval.metrics.distances.component_tv`). Reference rows (``method = "exact"``) hold the
  same metrics for a second, independent set of exact draws: the Monte-Carlo floor.
* ``gauss-<d>`` -- ``N(0, diag(c))`` with a natural-image-like spectrum ``c`` (PAPERS.md 5.3,
  :func:`~hessdiff.samplers.oracles.gmm.cifar_like_spectrum`; ``d = 3072`` is CIFAR-sized). Every
  deterministic solver is then a per-coordinate linear map ``x -> g * x``; one run on a probe input
  gives the gain ``g``, and the output law ``N(0, g^2 v0)`` (``v0`` the exact start variance) has a
  closed-form ``W2`` to the target law: metric ``w2``, exact, no Monte Carlo. A method that is not
  per-coordinate linear (a norm-dependent correction, a stochastic sampler) is detected by the probe
  and gets ``w2_lb`` instead: the Gelbrich lower bound ``sqrt(sum_i (m_i - m*_i)^2 + (s_i - s*_i)^2)``
  from per-coordinate sample means and standard deviations of ``n`` draws (a lower bound of the true
  ``W2`` up to sampling noise). Linear methods get ``w2_lb`` too, from their gain applied to the same
  draws, so that every method has one comparable (paired) metric; on this diagonal target the
  population bound equals the exact ``W2``.

Protocol: for each seed, the starting points are ``n`` exact draws of the noised prior at the first
grid point (so no error comes from the start), shared by all methods and NFEs of that seed; the
grid comes from one schedule (default: diffusers' DDPM linear schedule,
:func:`~hessdiff.samplers.oracles.gmm.default_gmm_schedule`) with one spacing for every method, and lands on
clean data (``sigma = 0``) unless ``final`` says otherwise; the target is the exact law at the grid's
final point.

A *method* is any callable ``method(denoiser, x, grid) -> samples`` (see :func:`default_methods`).
Rows are plain dicts (:func:`run_prior_benchmark`), formatted by :func:`format_markdown`.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor

from hessdiff.eval.metrics.distances import component_tv, gaussian_w2, sliced_wasserstein
from hessdiff.samplers.oracles.gmm import (
    GaussianMixture,
    GMMDenoiser,
    cifar_like_spectrum,
    default_gmm_schedule,
    grid_gmm_prior,
)
from hessdiff.samplers.schedule import DiscreteVPSchedule, NoiseSchedule, TimeGrid
from hessdiff.samplers.solvers import sample_ddim, sample_dpm_solver

__all__ = [
    "Method",
    "PriorProblem",
    "grid_gmm_prior_problem",
    "gaussian_spectrum_problem",
    "default_problems",
    "default_methods",
    "low_nfe_methods",
    "make_grid",
    "linear_gain",
    "exact_ode_gain",
    "gaussian_prior_w2",
    "convergence_order",
    "run_prior_benchmark",
    "format_markdown",
    "DEFAULT_NFES",
    "METRIC_DOCS",
]

#: ``method(denoiser, x, grid) -> samples`` (``x`` exact draws at grid point 0)
Method = Callable[[Any, Tensor, TimeGrid], Tensor]

DEFAULT_NFES: tuple[int, ...] = (5, 6, 8, 10, 15, 20, 50)

METRIC_DOCS: dict[str, str] = {
    "sw1": "sliced W1 to exact prior draws (lower is better)",
    "tv": "TV between component weights and the draws' component masses",
    "w2": "exact W2 of the output Gaussian to the target Gaussian",
    "w2_lb": "per-coordinate Gelbrich lower bound of W2 from samples (every method, the same draws)",
}


@dataclass(frozen=True)
class PriorProblem:
    """An exactly known prior to sample.

    ``kind`` is ``"gmm"`` (metrics ``sw1``, ``tv``) or ``"gaussian"`` (a single zero-mean
    diagonal component; metric ``w2``, exact when the method is linear).
    """

    name: str
    prior: GaussianMixture
    kind: str

    def __post_init__(self) -> None:
        if self.kind not in ("gmm", "gaussian"):
            raise ValueError(f"unknown problem kind {self.kind!r}; expected 'gmm' or 'gaussian'")
        if self.kind == "gaussian":
            p = self.prior
            if p.num_components != 1 or p.Q is not None or bool(p.means.abs().max() > 0):
                raise ValueError("a 'gaussian' problem needs one zero-mean component with a diagonal covariance")

    @property
    def dim(self) -> int:
        return self.prior.dim


def grid_gmm_prior_problem(dim: int) -> PriorProblem:
    """The 25-component grid mixture (uniform weights, identity covariances) in ``dim`` dimensions."""
    return PriorProblem(f"grid-gmm-{dim}", grid_gmm_prior(dim, weights="uniform"), "gmm")


def gaussian_spectrum_problem(dim: int = 3 * 32 * 32, spectrum: Tensor | None = None) -> PriorProblem:
    """``N(0, diag(c))``, ``c = cifar_like_spectrum(dim)`` unless ``spectrum`` is given."""
    c = cifar_like_spectrum(dim) if spectrum is None else torch.as_tensor(spectrum, dtype=torch.float64).flatten()
    if c.numel() != dim:
        raise ValueError(f"spectrum has {c.numel()} entries, expected dim={dim}")
    if not bool((c > 0).all()):
        raise ValueError("spectrum entries (variances) must be positive")
    prior = GaussianMixture(torch.ones(1), torch.zeros(1, dim, dtype=torch.float64), c[None])
    return PriorProblem(f"gauss-{dim}", prior, "gaussian")


def default_problems(dims: Iterable[int] = (8, 80, 800), gaussian_dim: int | None = 3 * 32 * 32
                     ) -> list[PriorProblem]:
    """Grid mixtures in ``dims`` and (unless ``gaussian_dim`` is None) the CIFAR-like Gaussian."""
    probs = [grid_gmm_prior_problem(int(d)) for d in dims]
    if gaussian_dim:
        probs.append(gaussian_spectrum_problem(int(gaussian_dim)))
    return probs


def default_methods() -> dict[str, Method]:
    """The base solvers every later sampler is compared with (diffusers' defaults otherwise:
    ``lower_order_final=True``, midpoint order-2 update).

    ``ddim`` (eta = 0); ``dpm-3``: multistep DPM-Solver-3, noise prediction (the LML paper's base);
    ``dpm++2m`` / ``dpm++3m``: multistep DPM-Solver++ of order 2 / 3.
    """
    return {
        "ddim": partial(sample_ddim, eta=0.0),
        "dpm-3": partial(sample_dpm_solver, order=3, algorithm="dpmsolver"),
        "dpm++2m": partial(sample_dpm_solver, order=2, algorithm="dpmsolver++"),
        "dpm++3m": partial(sample_dpm_solver, order=3, algorithm="dpmsolver++"),
    }


def low_nfe_methods() -> dict[str, Method]:
    """The training-free low-NFE solvers (named with ``--methods``; not in the default set, whose table
    is kept): ``unipc-2`` / ``unipc-3`` (UniPC bh2), ``ipndm-4`` (iPNDM, lower-order warm start),
    ``deis-3`` (DEIS-tAB3)."""
    from hessdiff.samplers.solvers import sample_deis, sample_ipndm, sample_unipc

    return {
        "unipc-2": partial(sample_unipc, order=2),
        "unipc-3": partial(sample_unipc, order=3),
        "ipndm-4": partial(sample_ipndm, order=4),
        "deis-3": partial(sample_deis, order=3),
    }


def make_grid(schedule: NoiseSchedule, nfe: int, spacing: str = "trailing", final: str = "zero") -> TimeGrid:
    """The ``nfe``-step grid used for every method (one network evaluation per step).

    On a :class:`DiscreteVPSchedule` the diffusers integer spacings follow
    ``DPMSolverMultistepScheduler`` (``trailing`` is the same for DDIM); ``logsnr``, ``karras`` and
    ``uniform`` are continuous. ``final``: ``"zero"`` (clean data) or ``"first"`` (``t = 0``).
    """
    if isinstance(schedule, DiscreteVPSchedule):
        return schedule.grid(int(nfe), spacing, final=final, style="dpmsolver")
    return schedule.grid(int(nfe), spacing, final=final)


def _start_law(prior: GaussianMixture, grid: TimeGrid) -> GaussianMixture:
    return prior.noised(float(grid.alpha[0]), float(grid.sigma[0]))


def _final_law(prior: GaussianMixture, grid: TimeGrid) -> GaussianMixture:
    return prior.noised(float(grid.alpha[-1]), float(grid.sigma[-1]))


def linear_gain(method: Method, denoiser: Any, grid: TimeGrid, dim: int, *, seed: int = 0,
                rtol: float = 1e-8) -> Tensor | None:
    """Per-coordinate gain ``g`` of a method that maps ``x -> g * x`` (float64), or ``None``.

    Runs the method on a probe batch ``[1, ..., 1]``, ``[-2, ..., -2]`` and a random vector ``z``
    (a generator seeded with ``seed``) and checks that the outputs are ``g``, ``-2 g`` and ``g * z``
    to relative accuracy ``rtol``; returns ``None`` if not (a nonlinear or stochastic method).
    """
    z = torch.randn(dim, generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float64)
    probe = torch.stack([torch.ones(dim, dtype=torch.float64), torch.full((dim,), -2.0, dtype=torch.float64), z])
    out = method(denoiser, probe, grid).reshape(3, dim).to(torch.float64)
    g = out[0]
    scale = float(g.abs().max()) + 1e-300
    if not bool(torch.isfinite(out).all()):
        return None
    if float((out[1] + 2 * g).abs().max()) > rtol * 2 * scale or \
            float((out[2] - g * z).abs().max()) > rtol * scale * float(z.abs().max()):
        return None
    return g


def gaussian_prior_w2(
    solver: Method,
    nfe: int,
    spectrum: Tensor,
    *,
    schedule: NoiseSchedule | None = None,
    spacing: str = "trailing",
    final: str = "zero",
    grid: TimeGrid | None = None,
) -> float:
    """Exact ``W2`` between a deterministic solver's output and the target, for ``N(0, diag(c))``.

    ``c = spectrum`` (``[d]`` variances). The solver starts from the exact law at the first grid
    point, ``N(0, alpha_0^2 c + sigma_0^2)``; being a per-coordinate linear map with gain ``g``
    (checked with :func:`linear_gain`; raises ``ValueError`` otherwise), its output law is
    ``N(0, g^2 (alpha_0^2 c + sigma_0^2))``, compared with the exact law at the final grid point,
    ``N(0, alpha_n^2 c + sigma_n^2)`` (``= N(0, c)`` for a grid ending at ``sigma = 0``).
    ``grid`` overrides ``schedule``/``nfe``/``spacing``/``final``.
    """
    problem = gaussian_spectrum_problem(int(torch.as_tensor(spectrum).numel()), spectrum)
    schedule = default_gmm_schedule() if schedule is None else schedule
    grid = make_grid(schedule, nfe, spacing, final) if grid is None else grid
    den = GMMDenoiser(problem.prior, schedule)
    g = linear_gain(solver, den, grid, problem.dim)
    if g is None:
        raise ValueError("the solver is not a per-coordinate linear map on this problem (nonlinear or stochastic); "
                         "exact W2 needs a deterministic linear solver")
    return _gauss_w2_from_gain(problem.prior, grid, g)


def convergence_order(nfes: Sequence[int], errors: Sequence[float]) -> float:
    """Least-squares slope ``p`` of ``log error = c - p log NFE`` (the empirical order)."""
    if len(nfes) != len(errors) or len(nfes) < 2:
        raise ValueError("need at least two (nfe, error) pairs of equal length")
    if any(e <= 0 for e in errors) or any(n <= 0 for n in nfes):
        raise ValueError("NFEs and errors must be positive")
    lx = torch.log(torch.tensor([float(n) for n in nfes], dtype=torch.float64))
    ly = torch.log(torch.tensor([float(e) for e in errors], dtype=torch.float64))
    lx = lx - lx.mean()
    return float(-(lx * (ly - ly.mean())).sum() / (lx * lx).sum())


def _gauss_w2_from_gain(prior: GaussianMixture, grid: TimeGrid, g: Tensor) -> float:
    v0 = _start_law(prior, grid).eig[0]
    vt = _final_law(prior, grid).eig[0]
    zero = torch.zeros_like(v0)
    return gaussian_w2(zero, g**2 * v0, zero, vt)


def exact_ode_gain(prior: GaussianMixture, grid: TimeGrid) -> Tensor:
    """Gain of the exact probability-flow ODE from grid point 0 to the last network time
    ``n - 1``, followed -- when the grid lands on ``sigma = 0`` -- by the Tweedie step
    ``x -> E[x0 | x]`` that every solver takes last (a model trained on ``t >= 0`` cannot do
    better); for a grid ending at ``sigma > 0`` the exact ODE to the end. Zero-mean diagonal
    Gaussian priors only: ``v(point) = alpha^2 c + sigma^2`` and the ODE gain is ``sqrt(v_j / v_0)``.
    """
    c = prior.eig[0]
    a, s = grid.alpha.to(c.dtype), grid.sigma.to(c.dtype)
    v = a[:, None] ** 2 * c[None] + s[:, None] ** 2
    if float(s[-1]) > 0 or grid.num_steps < 1:
        return (v[-1] / v[0]).sqrt()
    last = grid.num_steps - 1
    flow = (v[last] / v[0]).sqrt()
    return flow * a[last] * c / v[last] * a[-1]


def _component_tv(x: Tensor, prior: GaussianMixture) -> float:
    """:func:`~hessdiff.eval.metrics.distances.component_tv`, with a fast path for mixtures whose components
    share one isotropic covariance (then the responsibilities need only ``x @ mu^T``)."""
    e = prior.eig
    if prior.Q is None and bool((e == e[0, 0]).all()):
        x = x.reshape(x.shape[0], -1).to(prior.dtype)
        v = e[0, 0]
        logits = prior.weights.log() + (x @ prior.means.T - 0.5 * (prior.means**2).sum(1)) / v
        r = torch.softmax(logits, dim=1)
        return float(0.5 * (r.mean(0) - prior.weights).abs().sum())
    return component_tv(x, prior)


def _gelbrich_lb(x: Tensor, target: GaussianMixture) -> float:
    """``sqrt(sum_i (mean_i - m_i)^2 + (std_i - s_i)^2)`` over coordinates (diagonal target)."""
    x = x.reshape(x.shape[0], -1).to(torch.float64)
    m = x.mean(0)
    s = x.std(0, unbiased=True) if x.shape[0] > 1 else torch.zeros_like(m)
    return float(((m - target.means[0]) ** 2 + (s - target.eig[0].sqrt()) ** 2).sum().sqrt())


def _problem_seed(problem: PriorProblem, seed: int, stream: int) -> int:
    """A deterministic generator seed per (problem, seed, stream)."""
    h = sum((i + 1) * ord(ch) for i, ch in enumerate(problem.name))
    return (int(seed) * 1_000_003 + h * 101 + stream) % (2**63 - 1)


def _check_positive_ints(values: Iterable[int], what: str) -> list[int]:
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{what} must be positive integers, got {v!r}")
        out.append(int(v))
    if not out:
        raise ValueError(f"{what} is empty")
    return out


def run_prior_benchmark(
    methods: Mapping[str, Method],
    nfes: Sequence[int] = DEFAULT_NFES,
    problems: Sequence[PriorProblem] | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    n_samples: int = 2000,
    *,
    schedule: NoiseSchedule | None = None,
    spacing: str = "trailing",
    final: str = "zero",
    num_projections: int = 1000,
    include_floor: bool = True,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every method at every NFE on every problem and seed; return one row per metric value.

    Row keys: ``method, problem, d, nfe, seed, metric, value, wall_s`` (seconds spent in the method
    itself), ``n_samples``, ``spacing``. Exact-W2 values of a linear method do not depend on the
    seed and are reported once (seed ``seeds[0]``). With ``include_floor``, rows of method
    ``"exact"`` (``nfe = 0``) hold the metrics of a second independent set of exact draws (mixtures:
    ``sw1``, ``tv``; Gaussian: ``w2_lb`` of ``n`` exact draws, the Monte-Carlo floor of that bound),
    and rows of method ``"exact-ode"`` the W2 of :func:`exact_ode_gain` (Gaussian).
    ``on_row`` is called with each row as soon as it exists (streaming to a file, progress).
    """
    if not methods:
        raise ValueError("no methods to benchmark")
    for name, m in methods.items():
        if not callable(m):
            raise TypeError(f"method {name!r} is not callable")
    nfes = _check_positive_ints(nfes, "nfes")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds is empty")
    n_samples = _check_positive_ints([n_samples], "n_samples")[0]
    if n_samples < 2:
        raise ValueError("n_samples must be at least 2")
    num_projections = _check_positive_ints([num_projections], "num_projections")[0]
    problems = default_problems() if problems is None else list(problems)
    schedule = default_gmm_schedule() if schedule is None else schedule
    grids = {nfe: make_grid(schedule, nfe, spacing, final) for nfe in nfes}
    rows: list[dict[str, Any]] = []

    def emit(method: str, prob: PriorProblem, nfe: int, seed: int, metric: str, value: float,
             wall: float) -> None:
        row = {"method": method, "problem": prob.name, "d": prob.dim, "nfe": nfe, "seed": seed, "metric": metric,
               "value": float(value), "wall_s": round(float(wall), 4), "n_samples": n_samples, "spacing": spacing}
        rows.append(row)
        if on_row is not None:
            on_row(row)

    for prob in problems:
        den = GMMDenoiser(prob.prior, schedule)
        for si, seed in enumerate(seeds):
            cache: dict[tuple[int, float, float], Tensor] = {}

            def draws(law: GaussianMixture, key: tuple[float, float], stream: int,
                      prob: PriorProblem = prob, seed: int = seed,
                      cache: dict[tuple[int, float, float], Tensor] = cache) -> Tensor:
                """``n`` exact draws of ``law`` from stream ``stream`` of this (problem, seed), cached."""
                if (stream, *key) not in cache:
                    gen = torch.Generator().manual_seed(_problem_seed(prob, seed, stream))
                    cache[(stream, *key)] = law.sample(n_samples, gen)
                return cache[(stream, *key)]

            if include_floor and prob.kind == "gmm":
                g0 = grids[nfes[0]]
                law = _final_law(prob.prior, g0)
                key = (float(g0.alpha[-1]), float(g0.sigma[-1]))
                ref = draws(law, key, 1)
                other = draws(law, key, 2)
                emit("exact", prob, 0, seed, "sw1", sliced_wasserstein(other, ref, num_projections), 0.0)
                emit("exact", prob, 0, seed, "tv", _component_tv(other, law), 0.0)
            if include_floor and prob.kind == "gaussian":  # Monte-Carlo floor of w2_lb at this n
                g0 = grids[nfes[0]]
                law = _final_law(prob.prior, g0)
                other = draws(law, (float(g0.alpha[-1]), float(g0.sigma[-1])), 2)
                emit("exact", prob, 0, seed, "w2_lb", _gelbrich_lb(other, law), 0.0)
            for nfe in nfes:
                grid = grids[nfe]
                skey = (float(grid.alpha[0]), float(grid.sigma[0]))
                fkey = (float(grid.alpha[-1]), float(grid.sigma[-1]))
                if prob.kind == "gaussian" and include_floor and si == 0:
                    g_ode = exact_ode_gain(prob.prior, grid)
                    emit("exact-ode", prob, nfe, seed, "w2", _gauss_w2_from_gain(prob.prior, grid, g_ode), 0.0)
                x = draws(_start_law(prob.prior, grid), skey, 0)  # the same start for every method
                law = _final_law(prob.prior, grid)
                for mname, method in methods.items():
                    if prob.kind == "gaussian":
                        t0 = time.perf_counter()
                        gain = linear_gain(method, den, grid, prob.dim)
                        wall = time.perf_counter() - t0
                        if gain is not None:
                            if si == 0:
                                emit(mname, prob, nfe, seed, "w2", _gauss_w2_from_gain(prob.prior, grid, gain), wall)
                            # the sample bound of the same draws as the nonlinear methods, so that both
                            # kinds share one comparable metric (the exact w2 has no sampling noise)
                            lin = x.reshape(n_samples, -1).to(torch.float64) * gain
                            emit(mname, prob, nfe, seed, "w2_lb", _gelbrich_lb(lin, law), wall)
                            continue
                    t0 = time.perf_counter()
                    out = method(den, x.clone(), grid)
                    wall = time.perf_counter() - t0
                    out = out.reshape(out.shape[0], -1).to(torch.float64)
                    if not bool(torch.isfinite(out).all()):
                        raise FloatingPointError(f"{mname} produced NaN/Inf on {prob.name} at NFE {nfe}")
                    if prob.kind == "gaussian":
                        emit(mname, prob, nfe, seed, "w2_lb", _gelbrich_lb(out, law), wall)
                    else:
                        ref = draws(law, fkey, 1)
                        emit(mname, prob, nfe, seed, "sw1", sliced_wasserstein(out, ref, num_projections), wall)
                        emit(mname, prob, nfe, seed, "tv", _component_tv(out, law), wall)
    return rows


def _fmt(v: float) -> str:
    if v == 0 or not math.isfinite(v):
        return f"{v:g}"
    if abs(v) >= 1e-3:
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.3g}"
    return f"{v:.2e}"


def _cell(values: list[float]) -> str:
    if not values:
        return ""
    m = statistics.fmean(values)
    if len(values) == 1:
        return _fmt(m)
    return f"{_fmt(m)} ± {_fmt(statistics.stdev(values))}"


def format_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown tables, one per (problem, metric): methods down, NFE across, ``mean ± sd`` over seeds.

    One table per (spacing, problem, metric). Rows of method ``"exact"`` become a floor line under
    the table; ``"exact-ode"`` rows are shown as a method.
    """
    groups: dict[tuple[str, str, str], list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault((str(r.get("spacing", "")), str(r["problem"]), str(r["metric"])), []).append(r)
    out: list[str] = []
    for (spacing, prob, metric), rs in groups.items():
        body = [r for r in rs if r["method"] != "exact"]
        floor = [float(r["value"]) for r in rs if r["method"] == "exact"]
        if not body:
            continue
        nfes = sorted({int(r["nfe"]) for r in body})
        methods = list(dict.fromkeys(str(r["method"]) for r in body))
        seeds = sorted({r["seed"] for r in body})
        d = body[0]["d"]
        n = body[0].get("n_samples")
        desc = METRIC_DOCS.get(metric, metric)
        extra = "" if metric == "w2" else f", n = {n}, {len(seeds)} seed(s)"
        grid = f", {spacing} grid" if spacing else ""
        out.append(f"**{prob}** (d = {d}{grid}) -- `{metric}`: {desc}{extra}\n")
        out.append("| method | " + " | ".join(f"NFE {k}" for k in nfes) + " |")
        out.append("|---|" + "---|" * len(nfes))
        for m in methods:
            cells = [_cell([float(r["value"]) for r in body if r["method"] == m and int(r["nfe"]) == k]) for k in nfes]
            out.append(f"| {m} | " + " | ".join(cells) + " |")
        if floor:
            out.append(f"\nfloor (a second set of exact draws): {_cell(floor)}")
        out.append("")
    return "\n".join(out).rstrip() + "\n"
