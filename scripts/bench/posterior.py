"""The grid-GMM posterior benchmark (PAPERS.md 5.2) for DPS, latent DPS, PSLD, STSL, and (named with
``--methods``) MMPS, TMPD, PiGDM, DiffPIR and DAPS.

Problem ``(d_x, d_y, sigma_y, i)``: the 25-component grid prior (identity covariances, uniform
weights) in ``R^{d_x}``, the published seeding of ``A`` (``d_y x d_x``), ``x*`` and ``y = A x* +
sigma_y n`` (:func:`~hessdiff.samplers.oracles.gmm.grid_gmm_problem`), ``i`` the replicate. The exact denoiser
of the prior stands in for the network, so the only error is the sampler's; the exact posterior is
again a mixture (:class:`GridPosterior`).

Metrics per problem (``num_samples`` sampler draws against as many exact posterior draws):
``sw1`` -- sliced Wasserstein-1 with ``num_projections`` fixed-seed directions
(:func:`~hessdiff.eval.metrics.distances.sliced_wasserstein`); ``tv`` -- total variation between the exact
posterior component weights and the draws' component masses; ``mean_err`` -- ``|mean(draws) - E[x|y]|``.
Rows of method ``"exact"`` hold the same metrics for a second set of exact draws (the Monte-Carlo floor).

Methods (:data:`PUBLISHED_SETTINGS`, fixed before any run, none tuned on this benchmark; other
settings are named ``"psld[omega=0.1]"``, see :func:`method_from_spec`):

* ``dps``: pixel DPS, ``zeta = 0.3`` (the released SR/blur value), gradient of the unsquared norm
  (released code), DDPM-style ancestral loop (DDIM ``eta = 1``), no ``x0`` clamping (the means reach
  +-16, outside ``[-1, 1]``);
* ``latent_dps``: latent DPS with ``zeta = 1`` (PSLD's ``omega`` with ``gamma = 0``), DDIM ``eta = 0``;
* ``psld``: PSLD, ``gamma = 0.1``, ``omega = 1``, gluing with the true adjoint, DDIM ``eta = 0``;
* ``stsl``: STSL with TMPD's GMM settings ``eta = 0.02``, ``lam = 0.05``, 3 inner steps, one
  unit probe, squared data term, ``Aᵀy`` initialisation (stochastic), DDIM ``eta = 0``.

The latent methods run with the identity autoencoder (``d_z = d_x``, ``D = E = I``), the pixel
methods' twins. Every problem of one ``(d_x, d_y)`` pair is run in one batch (``num_samples`` per
problem, each sample with its own problem's ``A`` and ``y`` through :class:`StackedMatrixOperator`);
losses are per sample, so batching changes nothing but speed. ``wall_s`` is the wall clock of that
whole batched run (same model, same batch for every method: directly comparable across methods).
Grids: the DDPM linear schedule, ``trailing`` spacing (first point ``t = 999``), landing on clean data;
the start is ``sigma_0 * N(0, I)``.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hessdiff.eval.metrics.distances import component_tv, posterior_mean_error, sliced_wasserstein
from hessdiff.samplers.guidance import (
    PosteriorResult,
    sample_daps,
    sample_diffpir,
    sample_dps,
    sample_latent_dps,
    sample_mmps,
    sample_pigdm,
    sample_psld,
    sample_stsl,
    sample_tmpd,
)
from hessdiff.samplers.oracles.gmm import (
    GRID_DIMS,
    GRID_MEASUREMENT_DIMS,
    GMMDenoiser,
    anisotropic_gmm_problem,
    default_gmm_schedule,
    grid_gmm_problem,
)

__all__ = [
    "GridPosterior",
    "StackedMatrixOperator",
    "IdentityAutoencoder",
    "BenchMethod",
    "published_methods",
    "method_from_spec",
    "PUBLISHED_SETTINGS",
    "run_posterior_benchmark",
    "format_markdown",
    "format_costs",
    "compare",
    "load_rows",
    "time_interleaved",
    "format_timing",
    "time_latent_pipeline",
    "format_pipeline_timing",
    "run_from_args",
    "main",
    "DEFAULT_STEPS",
    "DEFAULT_SIGMAS",
]

DEFAULT_STEPS: tuple[int, ...] = (20, 50, 100, 1000)
DEFAULT_SIGMAS: tuple[float, ...] = (0.01, 0.1, 1.0)


# ================================================================================ exact posterior
class GridPosterior:
    """The exact posterior of ``y = A x + sigma_y n`` under a mixture with identity covariances.

    ``S = sigma_y^2 I + A Aᵀ``; component ``k``: mean ``m_k = mu_k + Aᵀ S⁻¹ (y - A mu_k)``, shared
    covariance ``P = I - Aᵀ S⁻¹ A`` (precision ``I + AᵀA / sigma_y^2``), weight
    ``∝ w_k N(y; A mu_k, S)``. Sampling uses Matheron's rule (a prior draw ``x`` of component ``k``
    moved by ``Aᵀ S⁻¹ (y - A x - sigma_y n)``), so no ``d x d`` matrix is formed. Float64.
    Duck-types the parts of :class:`~hessdiff.samplers.oracles.gmm.GaussianMixture` that
    :func:`~hessdiff.eval.metrics.distances.component_tv` uses.
    """

    def __init__(self, prior_weights: Tensor, prior_means: Tensor, A: Tensor, y: Tensor, sigma_y: float) -> None:
        if not sigma_y > 0:
            raise ValueError(f"sigma_y must be positive, got {sigma_y}")
        self.A = torch.as_tensor(A, dtype=torch.float64)
        self.y = torch.as_tensor(y, dtype=torch.float64).flatten()
        self.sigma_y = float(sigma_y)
        mu = torch.as_tensor(prior_means, dtype=torch.float64)
        S = self.sigma_y**2 * torch.eye(self.A.shape[0], dtype=torch.float64) + self.A @ self.A.T
        self._L = torch.linalg.cholesky(S)
        resid = self.y[None] - mu @ self.A.T  # [K, d_y]
        sol = torch.cholesky_solve(resid.T, self._L).T  # S^-1 (y - A mu_k)
        self.means = mu + sol @ self.A
        self.prior_means = mu
        logw = torch.as_tensor(prior_weights, dtype=torch.float64).log() - 0.5 * (resid * sol).sum(-1)
        self.weights = torch.softmax(logw, 0)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def mean(self) -> Tensor:
        return self.weights @ self.means

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        x = self.prior_means[k] + torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        noise = self.sigma_y * torch.randn(n, self.A.shape[0], generator=generator, dtype=torch.float64)
        r = self.y[None] - x @ self.A.T - noise
        return x + torch.cholesky_solve(r.T, self._L).T @ self.A

    def responsibilities(self, x: Tensor) -> Tensor:
        """Posterior component probabilities of ``x`` ``[B, d]`` under the posterior mixture."""
        x = x.to(torch.float64)
        ax, am = x @ self.A.T, self.means @ self.A.T
        q = ((x * x).sum(1, keepdim=True) - 2 * x @ self.means.T + (self.means**2).sum(1)[None]
             + ((ax * ax).sum(1, keepdim=True) - 2 * ax @ am.T + (am**2).sum(1)[None]) / self.sigma_y**2)
        return torch.softmax(self.weights.log()[None] - 0.5 * q, dim=1)


# ================================================================================ batched problems
class StackedMatrixOperator:
    """Per-sample matrices: sample ``b`` of a ``[P * repeats, d]`` batch is measured with
    ``A[b // repeats]`` (``A``: ``[P, m, d]``). ``__call__`` / ``adjoint`` / ``pinv`` / ``output_shape``
    as the posterior samplers expect. Used to run many benchmark problems in one batch."""

    def __init__(self, A: Tensor, repeats: int) -> None:
        if A.ndim != 3:
            raise ValueError(f"A must be [P, m, d], got {tuple(A.shape)}")
        self.A = A
        self.repeats = int(repeats)
        self._pinv = torch.linalg.pinv(A.to(torch.float64)).to(A.dtype)  # [P, d, m]

    def _split(self, v: Tensor) -> Tensor:
        P = self.A.shape[0]
        if v.shape[0] != P * self.repeats:
            raise ValueError(f"expected a batch of {P * self.repeats}, got {v.shape[0]}")
        return v.reshape(P, self.repeats, -1)

    def __call__(self, x: Tensor) -> Tensor:
        return torch.einsum("pnd,pmd->pnm", self._split(x), self.A.to(x.dtype)).reshape(x.shape[0], -1)

    def adjoint(self, y: Tensor) -> Tensor:
        return torch.einsum("pnm,pmd->pnd", self._split(y), self.A.to(y.dtype)).reshape(y.shape[0], -1)

    def pinv(self, y: Tensor) -> Tensor:
        return torch.einsum("pnm,pdm->pnd", self._split(y), self._pinv.to(y.dtype)).reshape(y.shape[0], -1)

    def output_shape(self, shape: Sequence[int]) -> tuple[int, int]:
        if len(shape) != 2 or shape[1] != self.A.shape[2]:
            raise ValueError(f"input must be [B, {self.A.shape[2]}], got {list(shape)}")
        return (int(shape[0]), self.A.shape[1])


class IdentityAutoencoder:
    """``D = E = I`` on ``R^d``: the latent methods' twin of pixel space (``d_z = d_x``, ``W = I``)."""

    def __init__(self, dim: int) -> None:
        self.data_dim = int(dim)

    def decode(self, z: Tensor) -> Tensor:
        return z

    def encode(self, x: Tensor) -> Tensor:
        return x


# ================================================================================ methods
@dataclass(frozen=True)
class BenchMethod:
    """A named sampler setting: ``run(denoiser, operator, y, x, grid, autoencoder, generator, sigma_y)``
    (``needs_sigma``: the sampler takes the noise level, so its runs are batched per ``sigma_y``)."""

    name: str
    run: Callable[..., PosteriorResult]
    settings: str
    needs_sigma: bool = False


#: name -> (sampler, takes an autoencoder, published settings); see the module docstring
PUBLISHED_SETTINGS: dict[str, tuple[Callable[..., PosteriorResult], bool, dict[str, Any]]] = {
    "dps": (sample_dps, False, {"zeta": 0.3, "norm": "code", "ddim_eta": 1.0, "clip_x0": None}),
    "latent_dps": (sample_latent_dps, True, {"zeta": 1.0, "norm": "code", "ddim_eta": 0.0}),
    "psld": (sample_psld, True, {"gamma": 0.1, "omega": 1.0, "gluing": "adjoint", "ddim_eta": 0.0}),
    "stsl": (sample_stsl, True, {"lam": 0.05, "eta": 0.02, "inner_steps": 3, "num_probes": 1, "probe_scale": 1.0,
                                 "data_norm": "squared", "init": "adjoint", "init_mode": "stochastic",
                                 "ddim_eta": 0.0}),
    # the covariance-aware family and the VJP-free methods (samplers/defaults.py "published" rows, minus the
    # [-1, 1] clamping of images: the grid means reach +-16); they take the problem's sigma_y
    "mmps": (sample_mmps, False, {"iterations": 5, "solver": "gmres", "ddim_eta": 1.0, "clip_x0": None}),
    "tmpd": (sample_tmpd, False, {"ddim_eta": 1.0, "clip_x0": None}),
    "pigdm": (sample_pigdm, False, {"scaling": "released", "cg_iterations": 5, "ddim_eta": 1.0, "clip_x0": None}),
    "diffpir": (sample_diffpir, False, {"lam": 7.0 / 4, "zeta": 0.3, "clip_x0": None}),
    # tau = None: the likelihood's std is the problem's sigma_y (the published 0.01 is for their image tasks)
    "daps": (sample_daps, False, {"ode_steps": 5, "ode_sigma_min": 0.01, "langevin_steps": 100, "lr": 1e-4,
                                  "lr_min_ratio": 0.01, "tau": None}),
}

#: methods whose sampler takes ``sigma_y`` (runs are batched per noise level)
SIGMA_METHODS = ("mmps", "tmpd", "pigdm", "diffpir", "daps")

#: settings a spec may add to a method's published ones (``stsl[likelihood=moment-matched;iterations=3]``)
EXTRA_SETTINGS: dict[str, tuple[str, ...]] = {"stsl": ("likelihood", "iterations", "solver", "step_schedule")}


def _bench_method(name: str, base: str, overrides: Mapping[str, Any]) -> BenchMethod:
    fn, latent, settings = PUBLISHED_SETTINGS[base]
    kw = {**settings, **overrides}
    needs_sigma = base in SIGMA_METHODS or kw.get("likelihood") == "moment-matched"

    def run(den, op, y, x, grid, ae, gen, sigma_y=None):
        args = [den, op, y, x, grid] + ([ae] if latent else [])
        extra = {"sigma_y": sigma_y} if needs_sigma else {}
        return fn(*args, generator=gen, **extra, **kw)

    return BenchMethod(name, run, ", ".join(f"{k}={v}" for k, v in kw.items()), needs_sigma)


def published_methods() -> dict[str, BenchMethod]:
    """The first four samplers (DPS, latent DPS, PSLD, STSL) with the published settings of
    :data:`PUBLISHED_SETTINGS` (the default set of a run; name the others with ``--methods``)."""
    return {name: _bench_method(name, name, {}) for name in ("dps", "latent_dps", "psld", "stsl")}


def _value(text: str) -> Any:
    t = text.strip()
    if t in ("None", "none"):
        return None
    for conv in (int, float):
        try:
            return conv(t)
        except ValueError:
            pass
    return t


def method_from_spec(spec: str) -> BenchMethod:
    """A published method by name (``"psld"``) or with changed settings, ``"psld[omega=0.1]"``,
    ``"stsl[eta=0;inner_steps=5]"`` (``;``-separated; the name of the rows is the spec itself)."""
    spec = spec.strip()
    if spec in PUBLISHED_SETTINGS:
        return _bench_method(spec, spec, {})
    base, sep, rest = spec.partition("[")
    if not sep or not rest.endswith("]") or base not in PUBLISHED_SETTINGS:
        raise ValueError(f"unknown method {spec!r}; use one of {', '.join(PUBLISHED_SETTINGS)}, optionally with "
                         "settings in brackets, e.g. psld[omega=0.1] or stsl[eta=0;inner_steps=5]")
    over: dict[str, Any] = {}
    for item in rest[:-1].split(";"):
        if item.strip():
            k, eq, v = item.partition("=")
            if not eq:
                raise ValueError(f"bad setting {item!r} in {spec!r}; expected key=value")
            over[k.strip()] = _value(v)
    allowed = (*PUBLISHED_SETTINGS[base][2], *EXTRA_SETTINGS.get(base, ()))
    unknown = [k for k in over if k not in allowed]
    if unknown:
        raise ValueError(f"{base} has no setting {unknown[0]!r}; settings: {', '.join(allowed)}")
    return _bench_method(spec, base, over)


# ================================================================================ runner
def _seed(*parts: int) -> int:
    s = 0
    for p in parts:
        s = (s * 1_000_003 + int(p)) % (2**63 - 1)
    return s


def _method_index(name: str) -> int:
    return sum(ord(c) * 31**i for i, c in enumerate(name)) % 1_000_003


def load_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows saved by :func:`run_posterior_benchmark` (JSON lines); missing file -> ``[]``."""
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


PRIORS: tuple[str, ...] = ("grid", "anisotropic")


def _problem_groups(prior: str, dims: Iterable[int], measurement_dims: Iterable[int], sigmas: Sequence[float],
                    reps: Sequence[int]) -> Iterable[tuple[int, int, list[tuple[float, int, Any]], tuple[int, ...]]]:
    """The benchmark's problems in the batches that share one prior: ``(d_x, d_y, [(sigma_y, replicate,
    problem)], group)``; ``group`` is mixed into the samplers' seeds (empty for the grid, whose seeds are
    those of earlier rows files)."""
    for d_x in dims:
        for d_y in measurement_dims:
            if prior == "grid":
                yield d_x, d_y, [(s, i, grid_gmm_problem(d_x, d_y, i, sigma_y=s)) for s in sigmas for i in reps], ()
            else:
                for i in reps:
                    yield d_x, d_y, [(s, i, anisotropic_gmm_problem(d_x, d_y, i, sigma_y=s)) for s in sigmas], (i,)


def _run_cell(method: BenchMethod, name: str, grid: Any, den: Any, probs: Sequence[Any], todo: Sequence[int],
              A: Tensor, Y: Tensor, sigmas: Sequence[float], num_samples: int, max_batch_elements: int,
              key: tuple[int, ...]) -> tuple[dict[int, Tensor], dict[str, float]]:
    """One (method, steps) cell: the problems ``todo`` of a group, batched in chunks of at most
    ``max_batch_elements`` entries (one chunk per noise level when the method takes ``sigma_y``). Returns
    the float64 draws per problem index and the cost of one call (with ``chunks``, the number of calls).
    ``key`` = ``(d_x, d_y, steps, *group)`` seeds each chunk's start noise with the method and first problem.
    The chunks are cut from *all* the group's problems, and a chunk runs whole when any of its problems is
    in ``todo`` (only those are returned): a resumed cell draws exactly what a run from scratch draws."""
    d_x, d_y, n, *group = key
    chunk = max(1, max_batch_elements // (num_samples * d_x))  # problems per chunk
    every = range(len(probs))
    groups = [[k for k in every if probs[k][0] == s] for s in sigmas] if method.needs_sigma else [list(every)]
    wanted = set(todo)
    draws: dict[int, Tensor] = {}
    cost: dict[str, float] = {}
    chunks = (g[c0: c0 + chunk] for g in groups for c0 in range(0, len(g), chunk))
    for ks in (c for c in chunks if wanted.intersection(c)):
        op = StackedMatrixOperator(A[ks], num_samples)
        y = Y[ks].repeat_interleave(num_samples, 0)
        gen = torch.Generator().manual_seed(_seed(d_x, d_y, _method_index(name), n, ks[0], *group))
        x = float(grid.sigma[0]) * torch.randn(len(ks) * num_samples, d_x, generator=gen, dtype=torch.float64)
        res = method.run(den, op, y, x.to(A.dtype), grid, IdentityAutoencoder(d_x), gen, sigma_y=probs[ks[0]][0])
        out = res.samples.reshape(len(ks), num_samples, d_x).to(torch.float64)
        for j, k in enumerate(ks):
            if k in wanted:
                draws[k] = out[j]
        for c in ("nfe", "network_forward", "network_backward", "decoder_forward", "encoder_forward"):
            cost[c] = getattr(res.cost, c)  # the same for every chunk
        cost["chunks"] = cost.get("chunks", 0) + 1
    return draws, cost


def run_posterior_benchmark(
    methods: Mapping[str, BenchMethod] | None = None,
    *,
    dims: Iterable[int] = GRID_DIMS,
    measurement_dims: Iterable[int] = GRID_MEASUREMENT_DIMS,
    sigmas: Iterable[float] = DEFAULT_SIGMAS,
    replicates: int | Sequence[int] = 20,
    steps: Iterable[int] = DEFAULT_STEPS,
    num_samples: int = 1000,
    num_projections: int = 1000,
    max_batch_elements: int = 4_000_000,
    dtype: torch.dtype = torch.float64,
    cells: Callable[[int, int, str, int], bool] | None = None,
    out_path: str | Path | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    prior: str = "grid",
) -> list[dict[str, Any]]:
    """Run the benchmark; return one row per (problem, method, steps) with its metrics and costs.

    replicates: a count (``range(n)``) or explicit replicate indices.
    cells: optional filter ``cells(d_x, d_y, method, steps) -> bool`` selecting which runs to do
      (the exact-draw floor rows are always computed).
    max_batch_elements: the batched run is split into chunks of at most this many ``B * d`` entries.
    dtype: dtype of the sampler runs (prior, denoiser, operator, states); exact posteriors, reference
      draws and metrics are always float64.
    out_path: JSON-lines file; rows already there (same d_x, d_y, sigma_y, replicate, method, steps,
      num_samples) are kept and not recomputed, new rows are appended as they are produced.
    prior: ``"grid"`` (the published problems, :func:`grid_gmm_problem`; one prior per ``(d_x, d_y)``) or
      ``"anisotropic"`` (:func:`anisotropic_gmm_problem`: random means and diagonal covariances, a prior per
      ``(d_x, replicate)``; its rows carry ``"prior": "anisotropic"``, and each replicate is its own batch).
    Row keys: ``d_x, d_y, sigma_y, replicate, method, steps, num_samples, sw1, tv, mean_err`` and the
    run's ``nfe, network_forward, network_backward, decoder_forward, encoder_forward`` (per batched
    call), ``chunks`` (calls) and ``wall_s`` (all chunks of that (d_x, d_y, method, steps) together).
    """
    methods = published_methods() if methods is None else dict(methods)
    reps = list(range(replicates)) if isinstance(replicates, int) else [int(r) for r in replicates]
    sigmas = [float(s) for s in sigmas]
    steps = [int(s) for s in steps]
    if num_samples < 2 or num_projections < 1 or not reps or not sigmas or not steps:
        raise ValueError("need num_samples >= 2, num_projections >= 1 and nonempty replicates, sigmas, steps")
    for s in sigmas:
        if not s > 0:
            raise ValueError(f"sigma_y must be positive, got {s}")
    schedule = default_gmm_schedule()
    existing = load_rows(out_path) if out_path is not None else []
    if prior not in PRIORS:
        raise ValueError(f"unknown prior {prior!r}; choose one of {', '.join(PRIORS)}")
    done = {(r["d_x"], r["d_y"], r["sigma_y"], r["replicate"], r["method"], r["steps"], r["num_samples"])
            for r in existing if r.get("prior", "grid") == prior}
    tag = {} if prior == "grid" else {"prior": prior}
    rows: list[dict[str, Any]] = []

    def emit(row: dict[str, Any]) -> None:
        rows.append(row)
        if out_path is not None:
            with open(out_path, "a") as fh:
                fh.write(json.dumps(row) + "\n")
        if on_row is not None:
            on_row(row)

    for d_x, d_y, probs, group in _problem_groups(prior, dims, measurement_dims, sigmas, reps):
        mixture = probs[0][2].prior
        den = GMMDenoiser(mixture.to(dtype=dtype), schedule)
        posts: list[Any] = [GridPosterior(mixture.weights, mixture.means, p.A, p.y, s) if prior == "grid"
                            else p.posterior() for s, _, p in probs]
        refs = [post.sample(num_samples, torch.Generator().manual_seed(_seed(p.seed, k, 1)))
                for k, ((_, _, p), post) in enumerate(zip(probs, posts, strict=True))]

        def metrics(k: int, draws: Tensor, refs: list[Tensor] = refs,
                    posts: list[Any] = posts) -> dict[str, float]:
            return {"sw1": sliced_wasserstein(draws, refs[k], num_projections),
                    "tv": component_tv(draws, posts[k]),
                    "mean_err": posterior_mean_error(draws, posts[k].mean())}

        base = {"d_x": d_x, "d_y": d_y, "num_samples": num_samples, **tag}
        for k, (s, i, p) in enumerate(probs):
            if (d_x, d_y, s, i, "exact", 0, num_samples) in done:
                continue
            other = posts[k].sample(num_samples, torch.Generator().manual_seed(_seed(p.seed, k, 2)))
            emit({**base, "sigma_y": s, "replicate": i, "method": "exact", "steps": 0, **metrics(k, other)})

        A = torch.stack([p.A for _, _, p in probs]).to(dtype)  # [P, d_y, d_x]
        Y = torch.stack([p.y for _, _, p in probs]).to(dtype)  # [P, d_y]
        for name, method in methods.items():
            for n in steps:
                if cells is not None and not cells(d_x, d_y, name, n):
                    continue
                todo = [k for k, (s, i, _) in enumerate(probs)
                        if (d_x, d_y, s, i, name, n, num_samples) not in done]
                if not todo:
                    continue
                t0 = time.perf_counter()
                draws, cost = _run_cell(method, name, schedule.grid(n, "trailing"), den, probs, todo, A, Y,
                                        sigmas, num_samples, max_batch_elements, (d_x, d_y, n, *group))
                wall = time.perf_counter() - t0
                for k in todo:
                    s, i, _ = probs[k]
                    d = draws[k]
                    m = metrics(k, d) if bool(torch.isfinite(d).all()) else \
                        {"sw1": math.inf, "tv": math.inf, "mean_err": math.inf}
                    emit({**base, "sigma_y": s, "replicate": i, "method": name, "steps": n, **m,
                          **cost, "wall_s": wall, "problems_in_run": len(todo),
                          "dtype": str(dtype).replace("torch.", "")})
    return rows


# ================================================================================ tables
def _fmt(v: float) -> str:
    if not math.isfinite(v):
        return "diverged"
    return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"


def _ci(values: list[float]) -> str:
    """``mean ± 1.96 sd / sqrt(n)`` (``diverged`` if any value is not finite)."""
    if not values:
        return "—"
    if not all(math.isfinite(v) for v in values):
        return "diverged"
    m = statistics.fmean(values)
    if len(values) == 1:
        return _fmt(m)
    return f"{_fmt(m)} ± {_fmt(1.96 * statistics.stdev(values) / math.sqrt(len(values)))}"


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, int]]:
    body = [r for r in rows if r["method"] != "exact"]
    order = list(dict.fromkeys(str(r["method"]) for r in body))
    cols = list(dict.fromkeys((str(r["method"]), int(r["steps"])) for r in body))
    return sorted(cols, key=lambda c: (order.index(c[0]), c[1]))


def format_markdown(rows: Sequence[Mapping[str, Any]], metric: str = "sw1",
                    columns: Sequence[tuple[str, int]] | None = None, costs: bool = True) -> str:
    """One table per ``sigma_y``: ``(d_x, d_y)`` down, ``method @ steps`` across (``columns``, default
    all), each cell ``mean ± 1.96 sd/sqrt(n)`` over the replicates run (``(n=..)`` where fewer than the
    row's exact-floor count), ``—`` where not run; rows only for ``(d_x, d_y)`` pairs with a result in
    some column; then (``costs``) a cost table."""
    out: list[str] = []
    cols = _columns(rows) if columns is None else [(str(m), int(n)) for m, n in columns]
    keep = {(r["d_x"], r["d_y"]) for r in rows if (r["method"], int(r["steps"])) in cols}
    rows = [r for r in rows if (r["d_x"], r["d_y"]) in keep and
            (r["method"] == "exact" or (r["method"], int(r["steps"])) in cols)]
    for s in sorted({float(r["sigma_y"]) for r in rows}):
        out.append(f"**sigma_y = {s:g}** -- `{metric}` (mean ± 1.96·sd/√n over n replicates)\n")
        out.append("| d_x | d_y | n | exact floor | " + " | ".join(f"{m} @{n}" for m, n in cols) + " |")
        out.append("|---|---|---|---|" + "---|" * len(cols))
        pairs = sorted({(int(r["d_x"]), int(r["d_y"])) for r in rows if float(r["sigma_y"]) == s})
        for dx, dy in pairs:
            sel = [r for r in rows if float(r["sigma_y"]) == s and r["d_x"] == dx and r["d_y"] == dy]
            floor = [float(r[metric]) for r in sel if r["method"] == "exact"]
            nmax = len(floor)
            cells = []
            for m, n in cols:
                vals = [float(r[metric]) for r in sel if r["method"] == m and int(r["steps"]) == n]
                cell = _ci(vals)
                if vals and len(vals) != nmax:
                    cell += f" (n={len(vals)})"
                cells.append(cell)
            out.append(f"| {dx} | {dy} | {nmax} | {_ci(floor)} | " + " | ".join(cells) + " |")
        out.append("")
    if costs:
        out.append(format_costs(rows))
    return "\n".join(out).rstrip() + "\n"


def format_summary(rows: Sequence[Mapping[str, Any]], metric: str = "sw1") -> str:
    """One line per ``(method, steps)``: ``mean ± 1.96 sd/sqrt(n)`` of ``metric`` over every problem in
    ``rows`` (used for the held-out tuning runs)."""
    groups: dict[tuple[str, int], list[float]] = {}
    for r in rows:
        groups.setdefault((str(r["method"]), int(r["steps"])), []).append(float(r[metric]))
    out = [f"| method | steps | problems | `{metric}` |", "|---|---|---|---|"]
    for (m, n), v in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        out.append(f"| {m} | {n if n else '—'} | {len(v)} | {_ci(v)} |")
    return "\n".join(out) + "\n"


def format_costs(rows: Sequence[Mapping[str, Any]]) -> str:
    """Cost per batched run, one line per (d_x, method, steps): the paper's NFE, network forward and
    backward passes per call, wall clock of the batched run and per problem (mean over runs)."""
    cols = _columns(rows)
    runs: dict[tuple[int, str, int], dict[tuple[Any, ...], Mapping[str, Any]]] = {}
    for r in rows:
        if r["method"] != "exact":
            key = (int(r["d_x"]), str(r["method"]), int(r["steps"]))
            runs.setdefault(key, {})[(r["d_y"], r["wall_s"])] = r  # one entry per batched run
    out = ["**cost** (one batched run = every problem of one (d_x, d_y) pair; mean over runs)\n",
           "| d_x | method | steps | NFE (paper) | net fwd | net bwd | problems/run | wall s / run "
           "| wall s / problem |",
           "|---|---|---|---|---|---|---|---|---|"]
    for (dx, m, n), by in sorted(runs.items(), key=lambda kv: (kv[0][0], cols.index(kv[0][1:]))):
        rs = list(by.values())
        wall = statistics.fmean(float(r["wall_s"]) for r in rs)
        wpp = statistics.fmean(float(r["wall_s"]) / float(r["problems_in_run"]) for r in rs)
        probs = statistics.fmean(float(r["problems_in_run"]) for r in rs)
        r0 = rs[0]
        out.append(f"| {dx} | {m} | {n} | {r0['nfe']} | {r0['network_forward']} | {r0['network_backward']} | "
                   f"{probs:g} | {wall:.1f} | {wpp:.2f} |")
    return "\n".join(out) + "\n"


def compare(rows: Sequence[Mapping[str, Any]], base: tuple[str, int], other: tuple[str, int],
            metric: str = "sw1") -> str:
    """``other`` against ``base`` on the problems both ran: per ``(d_x, d_y, sigma_y)`` the mean of the
    paired differences ``other - base`` (negative: ``other`` closer to the posterior) ± 1.96 sd/√n and a
    verdict (``better`` / ``worse`` when the interval excludes 0, else ``tie``). Wall clock is not
    compared here (the runs of a long benchmark see different machine loads): see :func:`time_interleaved`."""
    def index(m: tuple[str, int]) -> dict[tuple[Any, ...], Mapping[str, Any]]:
        return {(r["d_x"], r["d_y"], r["sigma_y"], r["replicate"]): r for r in rows
                if r["method"] == m[0] and int(r["steps"]) == m[1]}

    a, b = index(base), index(other)
    groups: dict[tuple[Any, ...], list[tuple[Any, ...]]] = {}
    for k in sorted(set(a) & set(b)):
        groups.setdefault(k[:3], []).append(k)
    out = [f"**{other[0]} @{other[1]} vs {base[0]} @{base[1]}** -- paired `{metric}` difference "
           f"(negative: {other[0]} @{other[1]} closer to the exact posterior)\n",
           f"| d_x | d_y | sigma_y | n | {base[0]} @{base[1]} | {other[0]} @{other[1]} | difference | verdict |",
           "|---|---|---|---|---|---|---|---|"]
    tally = {"better": 0, "tie": 0, "worse": 0, "n/a": 0}
    for g, ks in groups.items():
        da = [float(a[k][metric]) for k in ks]
        db = [float(b[k][metric]) for k in ks]
        diff = [y - x for x, y in zip(da, db, strict=True)]
        if all(math.isfinite(v) for v in diff) and len(diff) > 1:
            m = statistics.fmean(diff)
            h = 1.96 * statistics.stdev(diff) / math.sqrt(len(diff))
            verdict = "better" if m + h < 0 else ("worse" if m - h > 0 else "tie")
            dtxt = f"{_fmt(m)} ± {_fmt(h)}"
        else:
            verdict, dtxt = "n/a", "—"
        tally[verdict] += 1
        out.append(f"| {g[0]} | {g[1]} | {g[2]:g} | {len(ks)} | {_ci(da)} | {_ci(db)} | {dtxt} | {verdict} |")
    out.append(f"\n{other[0]} @{other[1]} against {base[0]} @{base[1]}: better in {tally['better']}, tie in "
               f"{tally['tie']}, worse in {tally['worse']} of {len(groups)} settings.")
    return "\n".join(out) + "\n"


# ================================================================================ timing
def time_interleaved(
    configs: Sequence[tuple[str, int]],
    *,
    d_x: int = 8,
    d_y: int = 2,
    sigmas: Iterable[float] = DEFAULT_SIGMAS,
    replicates: Sequence[int] = tuple(range(20)),
    num_samples: int = 500,
    repeats: int = 3,
    dtype: torch.dtype = torch.float32,
    methods: Mapping[str, BenchMethod] | None = None,
) -> list[dict[str, Any]]:
    """Wall clock of ``(method, steps)`` configurations on one batch (every problem of ``(d_x, d_y)``),
    run round-robin ``repeats`` times in this process so that load changes hit all alike; one row per
    run with ``wall_s`` and the cost counters."""
    methods = published_methods() if methods is None else dict(methods)
    schedule = default_gmm_schedule()
    probs = [grid_gmm_problem(d_x, d_y, i, sigma_y=float(s)) for s in sigmas for i in replicates]
    den = GMMDenoiser(probs[0].prior.to(dtype=dtype), schedule)
    op = StackedMatrixOperator(torch.stack([p.A for p in probs]).to(dtype), num_samples)
    y = torch.stack([p.y for p in probs]).to(dtype).repeat_interleave(num_samples, 0)
    out = []
    for r in range(repeats):
        for name, n in configs:
            grid = schedule.grid(n, "trailing")
            gen = torch.Generator().manual_seed(_seed(d_x, d_y, r))
            x = (float(grid.sigma[0]) * torch.randn(len(probs) * num_samples, d_x, generator=gen,
                                                    dtype=torch.float64)).to(dtype)
            t0 = time.perf_counter()
            res = methods[name].run(den, op, y, x, grid, IdentityAutoencoder(d_x), gen)
            wall = time.perf_counter() - t0
            out.append({"method": name, "steps": n, "repeat": r, "wall_s": wall, "d_x": d_x, "d_y": d_y,
                        "batch": len(probs) * num_samples, **{k: getattr(res.cost, k) for k in
                                                              ("nfe", "network_forward", "network_backward")}})
    return out


def format_timing(rows: Sequence[Mapping[str, Any]], base: tuple[str, int] = ("psld", 1000)) -> str:
    """Median wall clock per configuration and its speed-up over ``base`` (same batch, same process)."""
    groups: dict[tuple[int, int, str, int], list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["d_x"], r["d_y"], r["method"], r["steps"]), []).append(r)
    out = [f"| d_x | d_y | batch | method | steps | NFE (paper) | net fwd | net bwd | runs | median wall s | "
           f"speed-up vs {base[0]} @{base[1]} |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (dx, dy, m, n), rs in groups.items():
        med = statistics.median(float(r["wall_s"]) for r in rs)
        b = groups.get((dx, dy, base[0], base[1]))
        sp = f"{statistics.median(float(r['wall_s']) for r in b) / med:.2f}x" if b else "—"
        r0 = rs[0]
        out.append(f"| {dx} | {dy} | {r0['batch']} | {m} | {n} | {r0['nfe']} | {r0['network_forward']} | "
                   f"{r0['network_backward']} | {len(rs)} | {med:.2f} | {sp} |")
    return "\n".join(out) + "\n"


def time_latent_pipeline(
    configs: Sequence[tuple[str, int, int]] = (("psld", 100, 1000), ("stsl", 10, 50), ("stsl", 10, 20)),
    *,
    repeats: int = 3,
    image_size: int = 64,
) -> list[dict[str, Any]]:
    """Wall clock of :class:`~hessdiff.samplers.diffusers.pipeline.PosteriorSamplingPipeline` runs with random-init
    latent-diffusion components (a ``UNet2DModel`` with channels (64, 128) and one attention level on
    8x8x4 latents, an ``AutoencoderKL`` with channels (32, 64, 64, 64), 8x down-sampling, ``image_size``
    RGB images), x4 average-pooling super-resolution, batch 1, float32, CPU.

    ``configs``: ``(method, steps_run, steps_full)``: each run has ``steps_run`` sampling steps; every
    step does identical work, so the full-length time is projected as ``wall * steps_full / steps_run``
    (reported separately from the measured time). Runs are round-robin, ``repeats`` times.
    STSL runs with the pipeline defaults (K = 5 inner steps, one probe).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DModel

    from hessdiff.samplers.diffusers.pipeline import PosteriorSamplingPipeline
    from hessdiff.tasks.operators import SuperResolution

    torch.manual_seed(0)  # random-init weights (timing only); the sampler runs use explicit generators
    unet = UNet2DModel(sample_size=image_size // 8, in_channels=4, out_channels=4, layers_per_block=1,
                       block_out_channels=(64, 128), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 64, 64),
                        layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4)
    pipe = PosteriorSamplingPipeline(unet=unet, scheduler=DDIMScheduler(), vae=vae)
    op = SuperResolution(4, filter="average")
    x = torch.rand(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    y = op(x)
    out = []
    for r in range(repeats):
        for method, n, full in configs:
            kw = {"lam": 0.1} if method == "stsl" else {}
            t0 = time.perf_counter()
            res = pipe(y, op, method=method, num_inference_steps=n, method_kwargs=kw, output_type="pt",
                       generator=torch.Generator().manual_seed(r), progress=False)
            wall = time.perf_counter() - t0
            c = res.cost
            out.append({"method": method, "steps": n, "steps_full": full, "repeat": r, "wall_s": wall,
                        "projected_full_s": wall * full / n, "nfe_full": c.nfe * full // n,
                        "per_step": {k: getattr(c, k) // n for k in ("network_forward", "network_backward",
                                                                      "decoder_forward", "decoder_backward",
                                                                      "encoder_forward", "encoder_backward")}})
    return out


def format_pipeline_timing(rows: Sequence[Mapping[str, Any]]) -> str:
    groups: dict[tuple[str, int], list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["steps_full"]), []).append(r)
    base = groups.get(("psld", 1000))
    bfull = statistics.median(float(r["projected_full_s"]) for r in base) if base else None
    out = ["| method | steps (full run) | NFE (paper) | per step: net fwd/bwd, dec fwd/bwd, enc fwd/bwd | steps timed "
           "| runs | median wall s (timed) | projected full run s | speed-up vs psld @1000 |",
           "|---|---|---|---|---|---|---|---|---|"]
    for (m, full), rs in groups.items():
        ps = rs[0]["per_step"]
        per = (f"{ps['network_forward']}/{ps['network_backward']}, {ps['decoder_forward']}/{ps['decoder_backward']}, "
               f"{ps['encoder_forward']}/{ps['encoder_backward']}")
        proj = statistics.median(float(r["projected_full_s"]) for r in rs)
        sp = f"{bfull / proj:.2f}x" if bfull else "—"
        out.append(f"| {m} | {full} | {rs[0]['nfe_full']} | {per} | {rs[0]['steps']} | {len(rs)} | "
                   f"{statistics.median(float(r['wall_s']) for r in rs):.1f} | {proj:.0f} | {sp} |")
    return "\n".join(out) + "\n"


# ================================================================================ command line
def _ints(text: str, what: str) -> list[int]:
    try:
        out = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{what}: expected comma-separated integers, got {text!r}") from None
    if not out:
        raise ValueError(f"{what} is empty")
    return out


#: default paired comparisons: STSL at 1/50 and 3/20 of PSLD's NFE against PSLD at full NFE
DEFAULT_COMPARE = "psld@1000:stsl@20,psld@1000:stsl@50"


def _pairs(text: str) -> list[tuple[tuple[str, int], tuple[str, int]]]:
    """``"a@n:b@m,..."`` -> ``[((a, n), (b, m)), ...]`` (method specs may contain brackets)."""
    out = []
    for item in str(text).split(","):
        if not item.strip():
            continue
        parts = item.split(":")
        if len(parts) != 2 or any("@" not in p for p in parts):
            raise ValueError(f"bad comparison {item!r}; expected base@steps:other@steps, e.g. psld@1000:stsl@50")
        a, b = (p.strip().rsplit("@", 1) for p in parts)
        out.append(((a[0], int(a[1])), (b[0], int(b[1]))))
    return out


MARK_BEGIN = "<!-- bench:posterior -->"
MARK_END = "<!-- /bench:posterior -->"


def run_from_args(args: Any) -> int:
    """``hessdiff bench posterior`` (options in :mod:`hessdiff.scripts.cmd_bench`): run the benchmark
    (resuming ``--out``), print the tables, optionally the interleaved timing, and write the
    ``<!-- bench:posterior -->`` section of a Markdown file."""
    torch.set_num_threads(max(1, int(args.threads)))
    names = [m.strip() for m in str(args.methods).split(",") if m.strip()]
    methods = {m: method_from_spec(m) for m in names}
    from hessdiff.utils.seeds import parse_seeds

    try:
        replicates = sorted(parse_seeds(args.replicates, bound=2**63))
    except ValueError as exc:
        raise ValueError(f"--replicates: {exc}") from None
    kw: dict[str, Any] = dict(
        dims=_ints(args.dims, "--dims"), measurement_dims=_ints(args.measurement_dims, "--measurement-dims"),
        sigmas=[float(v) for v in str(args.sigmas).split(",")], replicates=replicates,
        steps=_ints(args.steps, "--steps"), num_samples=args.samples, num_projections=args.projections)
    if args.quick:
        kw.update(dims=[8], measurement_dims=[1], sigmas=[0.1], replicates=[0, 1], steps=[5, 10], num_samples=200,
                  num_projections=200)
    prior = getattr(args, "prior", "grid")
    bad = [d for d in kw["dims"] if d not in GRID_DIMS] + [d for d in kw["measurement_dims"]
                                                          if d not in GRID_MEASUREMENT_DIMS]
    if bad and prior == "grid":
        raise ValueError(f"the grid benchmark has d_x in {GRID_DIMS} and d_y in {GRID_MEASUREMENT_DIMS}; got {bad}")
    if prior != "grid" and any(not 1 <= d_y <= d_x for d_x in kw["dims"] for d_y in kw["measurement_dims"]):
        raise ValueError("--measurement-dims must lie in 1..d_x for every --dims value")
    if args.samples < 2 or args.projections < 1:
        raise ValueError("--samples must be at least 2 and --projections positive")
    if not args.report_only:
        run_posterior_benchmark(methods, dtype=getattr(torch, args.dtype),
                                out_path=args.out, prior=prior, **kw)
    rows = [r for r in load_rows(args.out)
            if r["num_samples"] == kw["num_samples"] and r.get("prior", "grid") == prior]
    if not rows:
        raise ValueError(f"no {prior} rows with {kw['num_samples']} samples in {args.out}")
    published = [c for c in _columns(rows) if c[0] in PUBLISHED_SETTINGS]
    others = [c for c in _columns(rows) if c[0] not in PUBLISHED_SETTINGS]
    text = "### Published settings\n\n" + format_markdown(rows, columns=published)
    pairs = _pairs(getattr(args, "compare", None) or DEFAULT_COMPARE)
    text += "\n### Paired comparisons\n\n" + "\n".join(compare(rows, a, b) for a, b in pairs)
    if getattr(args, "tuning", None):
        trows = [r for r in load_rows(args.tuning) if r["method"] != "exact"]
        text += (f"\n### Held-out tuning runs (`{Path(args.tuning).name}`)\n\nMean over every problem of the file "
                 "(its replicates are not benchmark replicates).\n\n" + format_summary(trows))
    if others:
        base_cols = [c for c in published if c in {(a[0], a[1]) for p in pairs for a in p}]
        text += ("\n### Other settings (tuned or ablations), next to the published ones they modify\n\n"
                 + format_markdown(rows, columns=base_cols + others, costs=False))
    # timings are appended to side files next to --out and reported whenever those exist
    timing_path = Path(str(args.out) + ".timing.jsonl")
    pipe_path = Path(str(args.out) + ".pipeline-timing.jsonl")
    if args.timing:
        trows = time_interleaved([("psld", 1000), ("stsl", 20), ("stsl", 50)], d_x=kw["dims"][0],
                                 replicates=kw["replicates"], num_samples=kw["num_samples"],
                                 dtype=getattr(torch, args.dtype), repeats=2)
        with open(timing_path, "a") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in trows)
    if getattr(args, "timing_pipeline", False):
        prows = time_latent_pipeline()
        with open(pipe_path, "a") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in prows)
    if timing_path.exists():
        text += ("\n**interleaved timing** (median of round-robin runs on one batch in one process; "
                 f"`{timing_path.name}`)\n\n" + format_timing(load_rows(timing_path)))
    if pipe_path.exists():
        text += ("\n**latent-pipeline timing** (random-init latent-diffusion components, 64x64 RGB, x4 SR, batch 1, "
                 f"CPU float32; `time_latent_pipeline`; `{pipe_path.name}`)\n\n"
                 + format_pipeline_timing(load_rows(pipe_path)))
    print(text)
    if args.write_benchmarks:
        from hessdiff.scripts.cmd_bench import write_benchmarks

        notes = Path(args.notes).read_text() if getattr(args, "notes", None) else ""
        write_benchmarks(args.write_benchmarks, SECTION_HEADER + "\n" + notes + "\n" + text, MARK_BEGIN, MARK_END)
        print(f"wrote the posterior section of {args.write_benchmarks}")
    return 0


SECTION_HEADER = """## Posterior benchmark: DPS, latent DPS, PSLD, STSL on grid-GMM posteriors
(`hessdiff bench posterior`)

Protocol (`hessdiff.scripts.bench.posterior`): the PAPERS.md 5.2 problems (25-component grid prior with
identity covariances and uniform weights, published seeding of `A`, `x*`, `y`); the exact denoiser of the
prior replaces the network; DDPM linear schedule, `trailing` grid from t = 999 to clean data, start
`sigma_0 * N(0, I)`. Metric: sliced W1 between the sampler's draws and as many exact posterior draws
(fixed-seed directions); cells are mean ± 1.96·sd/√n over replicates; `exact floor` is the same metric for
a second set of exact draws. Settings (`PUBLISHED_SETTINGS`, none tuned on this benchmark): `dps` zeta 0.3,
gradient of the unsquared norm (released code), DDPM-style loop (DDIM eta 1), no x0 clamping; `latent_dps`
zeta 1 (PSLD with gamma 0), DDIM; `psld` gamma 0.1, omega 1, true-adjoint gluing, DDIM; `stsl` TMPD's GMM
settings eta 0.02, lam 0.05, K = 3 inner steps, one unit probe, squared data term, stochastic A^T y
initialisation, DDIM. Latent methods use D = E = I (d_z = d_x). NFE as the papers count: one per step for
DPS / PSLD, one per inner step for STSL (each STSL inner step runs 2 network forwards + 2 backwards, each
DDIM step 1 more forward: see `net fwd` / `net bwd`).
"""


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m hessdiff.scripts.bench.posterior ...`` = ``hessdiff bench posterior ...``."""
    from hessdiff.scripts.cli import main as cli_main

    return cli_main(["bench", "posterior", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
