"""The prior benchmark library: rows, reference rows, metrics, formatting, errors."""

from __future__ import annotations

import pytest
import torch

from hessdiff.eval.metrics.distances import component_tv
from hessdiff.samplers.oracles.gmm import GaussianMixture, grid_gmm_prior
from hessdiff.samplers.solvers import sample_ddim
from hessdiff.scripts.bench import gmm as B


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    methods = {k: v for k, v in B.default_methods().items() if k in ("ddim", "dpm++2m")}

    def squashed(den, x, grid):  # not linear: gets the sample-based W2 lower bound on the Gaussian
        return 0.9 * torch.tanh(sample_ddim(den, x, grid) / 0.9)

    methods["squashed"] = squashed
    problems = [B.grid_gmm_prior_problem(8), B.gaussian_spectrum_problem(16)]
    return B.run_prior_benchmark(methods, [5, 20], problems, seeds=[0, 1], n_samples=300, num_projections=50)


def test_rows_have_the_documented_keys(rows):
    keys = {"method", "problem", "d", "nfe", "seed", "metric", "value", "wall_s", "n_samples", "spacing"}
    assert all(set(r) == keys for r in rows)
    gmm = [r for r in rows if r["problem"] == "grid-gmm-8"]
    # 3 methods x 2 NFEs x 2 seeds x 2 metrics, plus the floor rows (2 seeds x 2 metrics)
    assert len([r for r in gmm if r["method"] != "exact"]) == 24
    assert len([r for r in gmm if r["method"] == "exact"]) == 4
    gauss = [r for r in rows if r["problem"] == "gauss-16"]
    # exact W2 once per (linear method, NFE); the sample bound per seed for every method
    assert sorted((r["method"], r["metric"]) for r in gauss if r["nfe"] == 5) == [
        ("ddim", "w2"), ("ddim", "w2_lb"), ("ddim", "w2_lb"), ("dpm++2m", "w2"), ("dpm++2m", "w2_lb"),
        ("dpm++2m", "w2_lb"), ("exact-ode", "w2"), ("squashed", "w2_lb"), ("squashed", "w2_lb")]
    # the Monte-Carlo floor of the sample bound: exact draws, once per seed
    assert sorted((r["method"], r["metric"], r["seed"]) for r in gauss if r["nfe"] == 0) == [
        ("exact", "w2_lb", 0), ("exact", "w2_lb", 1)]
    assert all(r["value"] >= 0 for r in rows)


def test_more_steps_help_and_reference_rows_are_lower(rows):
    def val(method, problem, nfe, metric, seed=0):
        (r,) = [r for r in rows if (r["method"], r["problem"], r["nfe"], r["metric"], r["seed"])
                == (method, problem, nfe, metric, seed)]
        return r["value"]

    for m in ("ddim", "dpm++2m"):
        assert val(m, "grid-gmm-8", 20, "sw1") < val(m, "grid-gmm-8", 5, "sw1")
        assert val(m, "gauss-16", 20, "w2") < val(m, "gauss-16", 5, "w2")
        assert val("exact-ode", "gauss-16", 20, "w2") <= val(m, "gauss-16", 20, "w2")
    assert val("exact", "grid-gmm-8", 0, "sw1") < val("ddim", "grid-gmm-8", 5, "sw1")
    assert val("exact", "gauss-16", 0, "w2_lb") < val("squashed", "gauss-16", 5, "w2_lb")


def test_the_sample_bound_of_a_linear_method_is_that_of_running_it_on_the_draws():
    """A linear method's ``w2_lb`` comes from its gain times the shared draws; running the method on those
    draws (a copy the linearity probe rejects) gives the same value; on a diagonal Gaussian the population
    bound is the exact W2, so the two differ by sampling noise only (the floor at n = 400 is ~0.05)."""
    def ddim_run(den, x, grid):  # DDIM, but not recognised as linear: it is run on the draws
        return sample_ddim(den, x, grid) + (1.0 if x.shape[0] == 3 else 0.0)

    rows = B.run_prior_benchmark({"ddim": sample_ddim, "ddim-run": ddim_run}, [4],
                                 [B.gaussian_spectrum_problem(16)], seeds=[0, 3], n_samples=400,
                                 include_floor=False)
    lb = {(r["method"], r["seed"]): r["value"] for r in rows if r["metric"] == "w2_lb"}
    assert set(lb) == {("ddim", 0), ("ddim", 3), ("ddim-run", 0), ("ddim-run", 3)}
    for seed in (0, 3):
        assert lb[("ddim", seed)] == pytest.approx(lb[("ddim-run", seed)], rel=1e-9, abs=1e-12)
    assert lb[("ddim", 0)] != lb[("ddim", 3)]  # other draws per seed
    (w2,) = [r["value"] for r in rows if r["metric"] == "w2"]
    assert w2 > 0.5 and all(abs(lb[("ddim", seed)] - w2) < 0.1 for seed in (0, 3))


def test_same_start_for_every_method_of_a_seed():
    """Paired design: all methods of one seed see the same starting draws."""
    seen: list[torch.Tensor] = []

    def spy(den, x, grid):
        seen.append(x.clone())
        return sample_ddim(den, x, grid)

    B.run_prior_benchmark({"a": spy, "b": spy}, [3, 4], [B.grid_gmm_prior_problem(8)], seeds=[7], n_samples=20,
                          num_projections=10, include_floor=False)
    assert len(seen) == 4 and all(torch.equal(s, seen[0]) for s in seen)


def test_fast_component_tv_matches_reference():
    g = torch.Generator().manual_seed(0)
    prior = grid_gmm_prior(80)
    x = prior.sample(400, g) + 2.0 * torch.randn(400, 80, generator=g, dtype=torch.float64)
    assert abs(B._component_tv(x, prior) - component_tv(x, prior)) < 1e-12
    aniso = GaussianMixture(torch.ones(2), torch.randn(2, 3, generator=g, dtype=torch.float64),
                            torch.rand(2, 3, generator=g, dtype=torch.float64) + 0.5)
    y = aniso.sample(50, g)
    assert B._component_tv(y, aniso) == component_tv(y, aniso)  # falls back


def test_format_markdown(rows):
    md = B.format_markdown(rows)
    assert "**grid-gmm-8** (d = 8, trailing grid) -- `sw1`" in md
    assert "| method | NFE 5 | NFE 20 |" in md
    assert "| ddim | " in md and " ± " in md  # two seeds: mean ± sd
    assert "floor (a second set of exact draws)" in md
    assert "| exact-ode | " in md and "`w2_lb`" in md
    # a single-seed exact W2 cell has no spread
    line = next(ln for ln in md.splitlines() if ln.startswith("| ddim") and "±" not in ln)
    assert line.count("|") == 4


def test_bad_arguments():
    prob = [B.grid_gmm_prior_problem(8)]
    ddim = {"ddim": sample_ddim}
    with pytest.raises(ValueError, match="no methods"):
        B.run_prior_benchmark({}, [5], prob)
    with pytest.raises(TypeError, match="'x' is not callable"):
        B.run_prior_benchmark({"x": 3}, [5], prob)
    with pytest.raises(ValueError, match="nfes must be positive integers, got 0"):
        B.run_prior_benchmark(ddim, [5, 0], prob)
    with pytest.raises(ValueError, match="n_samples must be at least 2"):
        B.run_prior_benchmark(ddim, [5], prob, n_samples=1)
    with pytest.raises(ValueError, match="unknown spacing 'even'"):
        B.run_prior_benchmark(ddim, [5], prob, spacing="even", n_samples=10)
    with pytest.raises(ValueError, match="one zero-mean component"):
        B.PriorProblem("x", grid_gmm_prior(8), "gaussian")
    with pytest.raises(ValueError, match="unknown problem kind"):
        B.PriorProblem("x", grid_gmm_prior(8), "mixture")
    with pytest.raises(ValueError, match="must be positive"):
        B.gaussian_spectrum_problem(3, torch.tensor([1.0, 0.0, 2.0]))

    def broken(den, x, grid):
        return x * float("nan")

    with pytest.raises(FloatingPointError, match="broken produced NaN"):
        B.run_prior_benchmark({"broken": broken}, [2], prob, n_samples=10, include_floor=False)
