"""The grid-GMM posterior benchmark: exact posterior helper, batched operator, runner, tables, CLI."""

import math

import pytest
import torch

from hessdiff.samplers.oracles.gmm import GaussianMixture, grid_gmm_problem
from hessdiff.scripts.bench.posterior import (
    GridPosterior,
    StackedMatrixOperator,
    compare,
    format_markdown,
    load_rows,
    run_posterior_benchmark,
)
from hessdiff.scripts.cli import main as cli_main
from hessdiff.tasks.operators import MatrixOperator


@pytest.mark.parametrize("d_x,d_y,sigma", [(8, 2, 0.1), (8, 1, 0.01), (80, 4, 1.0)])
def test_grid_posterior_matches_the_general_mixture_posterior(d_x, d_y, sigma):
    p = grid_gmm_problem(d_x, d_y, 3, sigma_y=sigma)
    ref = p.posterior()
    gp = GridPosterior(p.prior.weights, p.prior.means, p.A, p.y, sigma)
    torch.testing.assert_close(gp.weights, ref.weights, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gp.means, ref.means, rtol=1e-9, atol=1e-9)
    xs = ref.sample(40, torch.Generator().manual_seed(1))
    torch.testing.assert_close(gp.responsibilities(xs), ref.responsibilities(xs), rtol=1e-6, atol=1e-9)


def test_grid_posterior_sampler_has_the_exact_moments():
    """One component: Matheron draws have mean m and covariance P = I - Aᵀ(σ²I + AAᵀ)⁻¹A."""
    p = grid_gmm_problem(8, 2, 0, sigma_y=0.3)
    mu = torch.randn(1, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = GaussianMixture(torch.ones(1), mu).posterior(p.A, p.y, 0.3)
    gp = GridPosterior(torch.ones(1), mu, p.A, p.y, 0.3)
    n = 40_000
    x = gp.sample(n, torch.Generator().manual_seed(2))
    cov = ref.covariances()[0]
    se_mean = (torch.diagonal(cov) / n).sqrt()
    assert bool(((x.mean(0) - ref.means[0]).abs() <= 4.5 * se_mean).all())
    # entrywise sd of a sample covariance: sqrt((C_ii C_jj + C_ij^2) / n)
    se_cov = ((torch.diagonal(cov)[:, None] * torch.diagonal(cov)[None] + cov**2) / n).sqrt()
    assert bool(((torch.cov(x.T) - cov).abs() <= 4.5 * se_cov).all())


def test_stacked_operator_matches_per_block_matrix_operators():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, 2, 5, generator=g, dtype=torch.float64)
    op = StackedMatrixOperator(A, repeats=4)
    x = torch.randn(12, 5, generator=g, dtype=torch.float64)
    y = torch.randn(12, 2, generator=g, dtype=torch.float64)
    for p in range(3):
        ref = MatrixOperator(A[p])
        sl = slice(4 * p, 4 * p + 4)
        torch.testing.assert_close(op(x)[sl], ref(x[sl]))
        torch.testing.assert_close(op.adjoint(y)[sl], ref.adjoint(y[sl]))
        torch.testing.assert_close(op.pinv(y)[sl], ref.pinv(y[sl]))
    assert op.output_shape((12, 5)) == (12, 2)
    with pytest.raises(ValueError, match="batch of 12"):
        op(x[:5])


def test_runner_rows_resume_and_tables(tmp_path):
    out = tmp_path / "rows.jsonl"
    kw = dict(dims=[8], measurement_dims=[1], sigmas=[0.1], replicates=[0, 1], steps=[4], num_samples=60,
              num_projections=50, out_path=out)
    rows = run_posterior_benchmark(**kw)
    assert {(r["method"], r["steps"]) for r in rows} == {("exact", 0), ("dps", 4), ("latent_dps", 4), ("psld", 4),
                                                         ("stsl", 4)}
    assert len(rows) == 10 and len(load_rows(out)) == 10
    for r in rows:
        assert math.isfinite(r["sw1"]) and 0 <= r["tv"] <= 1 and r["mean_err"] >= 0
    stsl = next(r for r in rows if r["method"] == "stsl")
    assert (stsl["nfe"], stsl["network_forward"], stsl["network_backward"]) == (12, 28, 24)
    assert run_posterior_benchmark(**kw) == []  # resumed: nothing left to do
    text = format_markdown(load_rows(out))
    assert "| 8 | 1 | 2 |" in text and "stsl @4" in text and "NFE (paper)" in text
    cmp = compare(rows, ("psld", 4), ("stsl", 4))
    assert "| 8 | 1 | 0.1 | 2 |" in cmp and "of 1 settings" in cmp  # one (d_x, d_y, sigma), 2 replicates


def test_cli_quick_and_bad_options(tmp_path, capsys):
    out = tmp_path / "q.jsonl"
    md = tmp_path / "B.md"
    assert cli_main(["bench", "posterior", "--quick", "--out", str(out), "--write-benchmarks", str(md)]) == 0
    text = md.read_text()
    assert text.count("<!-- bench:posterior -->") == 1 and "stsl @10" in text
    assert cli_main(["bench", "posterior", "--dims", "9", "--out", str(out)]) == 2
    assert "d_x in" in capsys.readouterr().err
    assert cli_main(["bench", "posterior", "--methods", "p2l", "--out", str(out)]) == 2


def test_method_specs():
    from hessdiff.scripts.bench.posterior import method_from_spec

    m = method_from_spec("stsl[eta=0;inner_steps=5;init_mode=inversion]")
    assert m.name == "stsl[eta=0;inner_steps=5;init_mode=inversion]"
    assert "eta=0" in m.settings and "inner_steps=5" in m.settings and "init_mode=inversion" in m.settings
    assert "omega=1.0" in method_from_spec("psld").settings
    with pytest.raises(ValueError, match="no setting 'zeta'"):
        method_from_spec("psld[zeta=1]")
    with pytest.raises(ValueError, match="unknown method"):
        method_from_spec("p2l")


def test_timing_helpers():
    from hessdiff.scripts.bench.posterior import (
        format_pipeline_timing,
        format_timing,
        time_interleaved,
        time_latent_pipeline,
    )

    rows = time_interleaved([("psld", 5), ("stsl", 2)], d_x=8, d_y=1, sigmas=[0.1], replicates=[0], num_samples=20,
                            repeats=2)
    assert len(rows) == 4 and all(r["wall_s"] > 0 and r["batch"] == 20 for r in rows)
    text = format_timing(rows, base=("psld", 5))
    assert "| 8 | 1 | 20 | stsl | 2 | 6 | 14 | 12 | 2 |" in text and "1.00x" in text
    prow = time_latent_pipeline((("psld", 1, 1000), ("stsl", 1, 50)), repeats=1, image_size=32)
    assert [r["nfe_full"] for r in prow] == [1000, 250]
    assert prow[0]["per_step"]["encoder_backward"] == 1 and prow[1]["per_step"]["network_forward"] == 11
    assert "psld | 1000 | 1000 |" in format_pipeline_timing(prow)


def test_sigma_methods_run_per_noise_level(tmp_path):
    """MMPS / TMPD / PiGDM / DiffPIR / DAPS take the problem's sigma_y: their runs are split by noise level,
    and MMPS (exact for the moment-matched likelihood up to the mixture) beats DPS on the grid problems."""
    from hessdiff.scripts.bench.posterior import method_from_spec

    methods = {n: method_from_spec(n) for n in ("mmps", "tmpd", "pigdm", "diffpir", "daps[langevin_steps=5]", "dps")}
    assert all(methods[n].needs_sigma for n in methods if n != "dps") and not methods["dps"].needs_sigma
    rows = run_posterior_benchmark(methods, dims=[8], measurement_dims=[2], sigmas=[0.1, 1.0], replicates=[0, 1],
                                   steps=[10], num_samples=80, num_projections=50)
    got = {(r["method"], r["sigma_y"]) for r in rows if r["method"] != "exact"}
    assert got == {(n, s) for n in methods for s in (0.1, 1.0)}
    chunks = {r["method"]: r["chunks"] for r in rows if r["method"] != "exact"}
    assert chunks["mmps"] == 2 and chunks["dps"] == 1  # one run per noise level vs one batched run
    mmps = next(r for r in rows if r["method"] == "mmps")
    assert (mmps["network_forward"], mmps["network_backward"]) == (10, 60)  # 1 forward + 6 VJPs per step
    sw = {n: sum(r["sw1"] for r in rows if r["method"] == n) for n in ("mmps", "dps")}
    assert sw["mmps"] < sw["dps"], sw


def test_stsl_spec_with_the_moment_matched_likelihood_takes_the_noise_level():
    from hessdiff.scripts.bench.posterior import method_from_spec

    mm = method_from_spec("stsl[likelihood=moment-matched;iterations=3]")
    assert mm.needs_sigma and "likelihood=moment-matched" in mm.settings and "iterations=3" in mm.settings
    assert not method_from_spec("stsl").needs_sigma
    with pytest.raises(ValueError, match="no setting 'sigma'"):
        method_from_spec("stsl[sigma=1]")


def test_anisotropic_problems():
    """Random means and diagonal covariances: reproducible, the prior shared by every d_y and sigma_y of one
    (d_x, replicate), A / x* shared by the sigma_y values, and the exact posterior a mixture again."""
    from hessdiff.samplers.oracles.gmm import anisotropic_gmm_problem

    a = anisotropic_gmm_problem(8, 2, 3, sigma_y=0.1)
    b = anisotropic_gmm_problem(8, 4, 3, sigma_y=1.0)
    c = anisotropic_gmm_problem(8, 2, 3, sigma_y=1.0)
    torch.testing.assert_close(a.prior.means, b.prior.means, rtol=0, atol=0)
    torch.testing.assert_close(a.prior.eig, b.prior.eig, rtol=0, atol=0)
    torch.testing.assert_close(a.A, c.A, rtol=0, atol=0)
    torch.testing.assert_close(a.x_true, c.x_true, rtol=0, atol=0)
    assert not torch.equal(anisotropic_gmm_problem(8, 2, 4, sigma_y=0.1).prior.means, a.prior.means)
    v = a.prior.eig
    assert a.prior.num_components == 10 and float(v.min()) >= 0.05 and float(v.max()) <= 5.0
    assert float((v.max(1).values / v.min(1).values).min()) > 5  # each component anisotropic
    post = a.posterior()
    assert post.weights.shape == (10,) and math.isclose(float(post.weights.sum()), 1.0, rel_tol=1e-12)
    with pytest.raises(ValueError, match="d_y"):
        anisotropic_gmm_problem(4, 8, 0, sigma_y=0.1)


def test_anisotropic_runner_rows_are_tagged_and_mmps_beats_dps(tmp_path):
    from hessdiff.scripts.bench.posterior import method_from_spec

    out = tmp_path / "rows.jsonl"
    run_posterior_benchmark({"dps": method_from_spec("dps")}, dims=[8], measurement_dims=[2], sigmas=[0.1],
                            replicates=[0], steps=[10], num_samples=60, num_projections=50, out_path=out)  # grid
    methods = {n: method_from_spec(n) for n in ("mmps", "dps")}
    kw = dict(dims=[8], measurement_dims=[2], sigmas=[0.1, 1.0], replicates=[0, 1], steps=[20], num_samples=300,
              num_projections=200, out_path=out, prior="anisotropic")
    rows = run_posterior_benchmark(methods, **kw)
    assert len(rows) == 3 * 4 and all(r["prior"] == "anisotropic" for r in rows)
    assert {r["chunks"] for r in rows if r["method"] == "dps"} == {1}  # one batch per replicate
    assert run_posterior_benchmark(methods, **kw) == []  # resumed, grid rows not mistaken for these
    assert sum(1 for r in load_rows(out) if "prior" not in r) == 2  # the grid rows, untagged as before
    sw = {n: sum(r["sw1"] for r in rows if r["method"] == n) for n in ("exact", "mmps", "dps")}
    assert sw["exact"] < sw["mmps"] < sw["dps"], sw
    with pytest.raises(ValueError, match="prior"):
        run_posterior_benchmark(methods, **{**kw, "prior": "nope"})


def test_a_resumed_cell_draws_exactly_what_a_full_run_draws(tmp_path):
    """Chunks are cut from all the group's problems, so a problem recomputed on resume (its row lost) gets the
    same start noise and sampler noise as in the run from scratch, even when the rest of its chunk is done."""
    import json

    from hessdiff.scripts.bench.posterior import method_from_spec

    out = tmp_path / "rows.jsonl"
    methods = {"dps": method_from_spec("dps")}
    kw = dict(dims=[8], measurement_dims=[1], sigmas=[0.1], replicates=[0, 1, 2, 3], steps=[5], num_samples=50,
              num_projections=40, max_batch_elements=2 * 50 * 8, out_path=out)  # 2 problems per chunk
    full = [r for r in run_posterior_benchmark(methods, **kw) if r["method"] == "dps"]
    assert {r["chunks"] for r in full} == {2}
    kept = [r for r in load_rows(out) if not (r["method"] == "dps" and r["replicate"] in (1, 2))]
    out.write_text("".join(json.dumps(r) + "\n" for r in kept))
    again = run_posterior_benchmark(methods, **kw)  # replicates 1 and 2: one in each chunk
    assert sorted(r["replicate"] for r in again) == [1, 2]
    for r in again:
        f = next(x for x in full if x["replicate"] == r["replicate"])
        assert (r["sw1"], r["tv"], r["mean_err"]) == (f["sw1"], f["tv"], f["mean_err"])
