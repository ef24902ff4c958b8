"""The LML benchmark plumbing (hessdiff.scripts.bench.lml, ``hessdiff bench lml``) on tiny sizes."""

import json

import pytest
import torch

from hessdiff.samplers import CountingDenoiser, GMMDenoiser, grid_gmm_prior
from hessdiff.scripts.bench import lml as BL
from hessdiff.scripts.cli import main


def test_methods_match_the_budget_with_jvps_counted():
    methods = BL.lml_methods(triples=[("dpm++2m", "jvp2-first", False), ("dpm++2m", "jvp2-first", True),
                                      ("dpm++2m", "jvp2-every", False), ("dpm++2m", "nl-jvp2", False)])
    assert set(methods) >= {"dpm++2m", "dpm++2m+jvp2-first", "dpm++2m+jvp2-first+jvp", "dpm++2m+nl-jvp2"}
    den = CountingDenoiser(GMMDenoiser(grid_gmm_prior(8)))
    grid = BL.make_grid(den.schedule, 7)
    x = den.inner.marginal(float(grid.t[0])).sample(8, torch.Generator().manual_seed(0))
    for name, total in (("dpm++2m+jvp2-first", 7), ("dpm++2m+jvp2-first+jvp", 9), ("dpm++2m+jvp2-every", 6),
                        ("dpm++2m+nl-jvp2", 5)):  # 2 steps + 1 corrector call (1 + 2 JVPs) <= 7
        den.nfe, den.extra = 0, {}
        out = methods[name](den, x, grid)
        assert torch.isfinite(out).all()
        assert den.nfe + sum(den.extra.values()) == total, (name, den.nfe, den.extra)
    with pytest.raises(ValueError, match="unknown LML variant"):
        BL.lml_methods(["nope"])
    with pytest.raises(ValueError, match="unknown base"):
        BL.lml_methods(["lml32"], bases=["heun"])


def test_goal_rows_decides_on_mean_and_spread():
    rows = []
    for seed, (b, v) in enumerate([(1.0, 0.5), (1.1, 0.6), (0.9, 0.55)]):
        rows += [{"problem": "p", "nfe": 5, "seed": seed, "metric": "sw1", "method": "dpm++2m", "value": b},
                 {"problem": "p", "nfe": 5, "seed": seed, "metric": "sw1", "method": "dpm++2m+x", "value": v},
                 {"problem": "p", "nfe": 20, "seed": seed, "metric": "sw1", "method": "dpm++2m+x", "value": 0.1}]
    (g,) = BL.goal_rows(rows)
    assert g["nfe"] == 5 and g["lml"] == "dpm++2m+x" and g["met"] and g["improvement"] == pytest.approx(0.45)
    rows[1]["value"] = 2.0  # one bad seed: spread too large
    (g,) = BL.goal_rows(rows)
    assert not g["met"]
    assert BL.zero_nfe("dpm++2m+sec1-ad") and BL.zero_nfe("ddim+lml32") and not BL.zero_nfe("dpm++2m+jvp2-first")
    assert not BL.zero_nfe("dpm++2m") and not BL.zero_nfe("dpm++2m+unknown")


def test_identity_and_hessian_parts_on_a_small_mixture():
    rows = BL.identity_rows(dims=(8,), nfe=6, n_samples=32, lambdas=(1e-2,))
    assert len(rows) == len(BL.BASES)
    for r in rows:
        assert r["f64_rel"] <= 1e-8 and r["f32_rel"] > 1e-7
        assert 1 / 3 < r["law_ratio_median"] < 3 and r["law_n"] > 0
    hrows = BL.hessian_error_rows(dims=(8,), ranks=(1, 3), nfe=4, n_samples=3)
    lz3 = [r for r in hrows if r["estimator"] == "lanczos" and r["rank"] == 3]
    assert lz3 and max(r["op"] for r in lz3) < 1e-8  # A = alpha^2 I + rank 2: 3 Lanczos steps are exact
    assert max(r["op"] for r in hrows if r["estimator"] == "fisher") > 1.0
    assert "lanczos" in BL.format_hessian(hrows)


def test_cli_runs_saves_and_renders(tmp_path, capsys):
    out = tmp_path / "rows.jsonl"
    bench = tmp_path / "BENCHMARKS.md"
    bench.write_text("# Benchmarks\n\nkeep me\n")
    assert main(["bench", "lml", "--quick", "--parts", "identity", "--threads", "1", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and {r["part"] for r in rows} == {"identity"}
    assert main(["bench", "lml", "--render", str(out), "--write-benchmarks", str(bench)]) == 0
    text = bench.read_text()
    assert "keep me" in text and text.count("<!-- bench:lml -->") == 1 and "float32 per-step change" in text
    assert main(["bench", "lml", "--render", str(tmp_path / "missing.jsonl")]) == 2
    assert "no such rows file" in capsys.readouterr().err
    assert main(["bench", "lml", "--quick", "--variants", "nope"]) == 2


def test_fast_isotropic_jvp_equals_the_oracle():
    for d in (8, 80):
        den = GMMDenoiser(grid_gmm_prior(d))
        fast = BL.FastIsotropicGMM(den)
        x = den.marginal(300.0).sample(16, torch.Generator().manual_seed(d))
        v = torch.randn(16, d, generator=torch.Generator().manual_seed(d + 1), dtype=torch.float64)
        torch.testing.assert_close(fast.jvp_x0(x, 300.0, v), den.jvp_x0(x, 300.0, v), rtol=1e-9, atol=1e-9)
        assert torch.equal(fast(x, 300.0).x0, den(x, 300.0).x0)


def test_embedded_part_on_the_pixel_model():
    rows = BL.embedded_rows(models=("mnist",), nfes=(4,), n_samples=6, batch_size=3, reference_steps=12,
                            triples=(("dpm++2m", "jvp2-first-perp", False), ("dpm++2m", "jvp2-first-perp", True)),
                            bases=("dpm++2m",))
    by = {r["method"]: r for r in rows}
    assert set(by) == {"dpm++2m", "dpm++2m+jvp2-first-perp", "dpm++2m+jvp2-first-perp+jvp"}
    assert by["dpm++2m"]["nfe_counted"] == 4 and by["dpm++2m+jvp2-first-perp+jvp"]["nfe_counted"] == 6
    assert by["dpm++2m+jvp2-first-perp"]["nfe_counted"] == 4  # 2 solver steps + 2 JVPs
    for r in rows:
        assert r["fid"] > 0 and 5 < r["psnr"] < 60 and 0 < r["ssim"] <= 1
    # more steps are closer to the converged solution of the same start noise
    more = BL.embedded_rows(models=("mnist",), nfes=(6,), n_samples=6, batch_size=3, reference_steps=12,
                            triples=(), bases=("dpm++2m",))
    assert more[0]["psnr"] > by["dpm++2m"]["psnr"]
    assert "| dpm++2m+jvp2-first-perp | " in BL.format_embedded(rows)


def test_embedded_blocks_give_pooled_fid_a_floor_and_paired_goal_rows(monkeypatch):
    """Seed blocks: per-block rows, a pooled FID over all blocks, the real-vs-real floor at the same sizes,
    and the family's test set and classifier for a Fashion-MNIST model."""
    from hessdiff.samplers import models as M

    dataset = M.embedded_dataset

    def fake_train(split="test", **kw):  # the Fashion training split needs a Debian package CI does not have
        if split == "train" and kw.get("family") == "fashion":
            split = "test"
        return dataset(split, **kw)

    monkeypatch.setattr(M, "embedded_dataset", fake_train)
    rows = BL.embedded_rows(models=("fashion",), nfes=(3,), n_samples=4, blocks=2, reference_blocks=1,
                            batch_size=4, reference_steps=6, triples=(("dpm++2m", "sec1-ad", False),),
                            bases=("dpm++2m",))
    assert {r["family"] for r in rows} == {"fashion"} and {r["n_test"] for r in rows} == {1000}
    real = [r for r in rows if r["method"] == "real"]
    assert [r["block"] for r in real] == [0, 1, "pooled"] and all(r["fid"] > 0 for r in real)
    cells = {(r["method"], r["block"]): r for r in rows if r["method"] != "real"}
    assert set(cells) == {(m, b) for m in ("dpm++2m", "dpm++2m+sec1-ad") for b in (0, 1, "pooled")}
    assert "psnr" in cells[("dpm++2m", 0)] and "psnr" not in cells[("dpm++2m", 1)]  # reference_blocks=1
    # the blocks start from different noise; the pooled FID is of all 8 images, not a block mean
    assert cells[("dpm++2m", 0)]["fid"] != cells[("dpm++2m", 1)]["fid"]
    pooled = cells[("dpm++2m", "pooled")]["fid"]
    assert pooled != pytest.approx((cells[("dpm++2m", 0)]["fid"] + cells[("dpm++2m", 1)]["fid"]) / 2)
    goal = BL.embedded_goal_rows(rows)
    assert len(goal) == 1 and goal[0]["base"] == "dpm++2m" and goal[0]["lml"] == "dpm++2m+sec1-ad"
    d = [cells[("dpm++2m", b)]["fid"] - cells[("dpm++2m+sec1-ad", b)]["fid"] for b in (0, 1)]
    assert goal[0]["paired_diff"] == pytest.approx(sum(d) / 2)
    text = BL.format_embedded(rows)
    assert "the 1000 held-out fashion images" in text and "Real-vs-real floor" in text
    assert f"| dpm++2m | {pooled:.2f} (" in text and "| fashion | 3 | dpm++2m |" in text
    assert "PSNR (dB) to the converged ODE solution" in text
    no_ref = [{k: v for k, v in r.items() if k not in ("psnr", "psnr_sd", "ssim", "ssim_sd")} for r in rows]
    text = BL.format_embedded(no_ref)  # --reference-blocks 0: no empty PSNR / SSIM tables
    assert "Real-vs-real floor" in text and "PSNR" not in text and "SSIM" not in text
    # skip: the cells already done are not run again
    again = BL.embedded_rows(models=("fashion",), nfes=(3,), n_samples=4, blocks=2, batch_size=4,
                             reference_steps=6, triples=(("dpm++2m", "sec1-ad", False),), bases=("dpm++2m",),
                             skip=lambda m, k, n: k == "dpm++2m")
    assert {r["method"] for r in again} == {"real", "dpm++2m+sec1-ad"}
    assert [r["fid"] for r in again if r["method"] == "dpm++2m+sec1-ad"] == [
        cells[("dpm++2m+sec1-ad", b)]["fid"] for b in (0, 1, "pooled")]  # same noise, same images


def test_cov_variant_on_a_trained_network_uses_its_training_images(monkeypatch):
    """On an embedded model the model-free cov variants take the data covariance of 1024 training images."""
    from hessdiff.samplers.lml.curvature import DataCovarianceSource

    seen = []
    real = DataCovarianceSource.from_data.__func__

    def spy(cls, x, rank=32):
        seen.append(tuple(x.shape))
        return real(cls, x, rank)

    monkeypatch.setattr(DataCovarianceSource, "from_data", classmethod(spy))
    rows = BL.embedded_rows(models=("mnist",), nfes=(3,), n_samples=3, batch_size=3, reference_steps=6,
                            triples=(("dpm++2m", "cov-ad", False),), bases=("dpm++2m",))
    by = {r["method"]: r for r in rows}
    assert seen == [(1024, 1024)]  # 1024 images of 1x32x32, flattened
    assert by["dpm++2m+cov-ad"]["nfe_counted"] == by["dpm++2m"]["nfe_counted"] == 3
    assert by["dpm++2m+cov-ad"]["psnr"] != by["dpm++2m"]["psnr"]


def test_method_names_parse_and_the_embedded_cli_resumes(tmp_path, monkeypatch):
    assert BL.parse_method_names(["unipc-2", "dpm++2m+stats8-ad", "dpm++2m+jvp2-first+jvp"]) == (
        ("unipc-2",), (("dpm++2m", "stats8-ad", False), ("dpm++2m", "jvp2-first", True)))
    with pytest.raises(ValueError, match="unknown base solver 'heun'"):
        BL.parse_method_names(["heun+sec1"])
    with pytest.raises(ValueError, match="unknown LML variant 'nope'"):
        BL.parse_method_names(["dpm++2m+nope"])
    calls = []
    real_rows = BL.embedded_rows

    def spy(*a, **kw):
        calls.append(kw)
        return real_rows(*a, **kw)

    monkeypatch.setattr(BL, "embedded_rows", spy)
    out = tmp_path / "rows.jsonl"
    argv = ["bench", "lml", "--parts", "embedded", "--models", "mnist", "--embedded-samples", "2",
            "--embedded-nfe", "2", "--reference-steps", "3", "--embedded-methods", "ddim", "dpm++2m",
            "--out", str(out), "--threads", "1"]
    assert main(argv) == 0
    first = [json.loads(x) for x in out.read_text().splitlines()]
    assert {r["method"] for r in first} == {"ddim", "dpm++2m"}
    assert calls[0]["bases"] == ("ddim", "dpm++2m") and calls[0]["triples"] == ()
    assert main([*argv, "--resume"]) == 0  # nothing left to run: no new rows
    assert [json.loads(x) for x in out.read_text().splitlines()] == first
    assert not calls[1]["skip"]("mnist", "ddim", 3) and calls[1]["skip"]("mnist", "ddim", 2)
    # only the methods asked for run (a variant's base is not added)
    assert main([*argv[:argv.index("--embedded-methods") + 1], "ddim+sec1-ad", *argv[argv.index("--out"):]]) == 0
    added = [json.loads(x) for x in out.read_text().splitlines()][len(first):]
    assert {r["method"] for r in added} == {"ddim+sec1-ad"}
    assert main(["bench", "lml", "--parts", "embedded", "--resume"]) == 2
    assert main(["bench", "lml", "--parts", "embedded", "--embedded-methods", "heun"]) == 2


def test_new_bases_and_model_variants_parse_and_run():
    new = ("unipc-2", "unipc-3", "ipndm-4", "deis-3")
    assert set(new) <= set(BL.ALL_BASES) and set(BL.BASES) <= set(BL.ALL_BASES)
    variants = ["sec1-ad", "stats8-ad", "stats8-ad-perp", "cov-ad", "sec1-cov-ad"]
    methods = BL.lml_methods(variants, bases=new)
    assert set(methods) == set(new) | {f"{b}+{v}" for b in new for v in variants}
    assert BL.lml_methods(["none"], bases=new).keys() == set(new)
    for name in ("unipc-3+stats8-ad", "ipndm-4+cov-ad", "deis-3+sec1-cov-ad", "unipc-2+sec1-ad"):
        assert BL.zero_nfe(name), name
    assert not BL.zero_nfe("deis-3") and not BL.zero_nfe("ipndm-4+jvp2-first")
    den = CountingDenoiser(GMMDenoiser(grid_gmm_prior(8)))
    grid = BL.make_grid(den.schedule, 6)
    x = den.inner.marginal(float(grid.t[0])).sample(16, torch.Generator().manual_seed(0))
    outs = {}
    for name, fn in methods.items():
        den.nfe, den.extra = 0, {}
        outs[name] = fn(den, x, grid)
        assert torch.isfinite(outs[name]).all(), name
        assert den.nfe == 6 and not den.extra, (name, den.nfe, den.extra)  # zero extra evaluations
    for b in new:
        for v in variants:
            assert float((outs[f"{b}+{v}"] - outs[b]).norm() / outs[b].norm()) > 1e-6, (b, v)
    st = BL.oracle_stats(den)
    assert st is BL.oracle_stats(den.inner) and st.rank == 8 and st.dim == 8  # one estimate per prior
    with pytest.raises(ValueError, match="oracle"):
        BL.oracle_stats(object())


def test_oracle_stats_of_a_gaussian_give_the_exact_step():
    """On a Gaussian prior the data-averaged Jacobian is the Jacobian: DDIM with the stats8 step is the exact
    probability-flow map of the grid (the "exact-ode" row), the base solver is not."""
    from hessdiff.samplers.oracles.gmm import cifar_like_spectrum
    from hessdiff.scripts.bench.gmm import gaussian_spectrum_problem, run_prior_benchmark

    prob = gaussian_spectrum_problem(8, cifar_like_spectrum(8))
    methods = BL.lml_methods(["stats8", "cov-ad"], bases=["ddim"])
    rows = run_prior_benchmark(methods, [5], [prob], [0], 200, num_projections=20)
    w2 = {r["method"]: r["value"] for r in rows if r["metric"] == "w2"}
    assert abs(w2["ddim+stats8"] - w2["exact-ode"]) < 1e-9 < abs(w2["ddim"] - w2["exact-ode"]) - 1e-3, w2


def test_cli_accepts_the_new_bases():
    assert main(["bench", "lml", "--parts", "quality", "--bases", "unipc-3", "ipndm-4", "--variants", "none",
                 "sec1-ad", "--nfe", "5", "--seeds", "1", "--n-samples", "40", "--dims", "8", "--gaussian-dim", "0",
                 "--projections", "20", "--threads", "1"]) == 0
    assert main(["bench", "lml", "--quick", "--parts", "quality", "--bases", "heun"]) == 2


def test_overhead_on_an_embedded_model_with_its_statistics(tmp_path, capsys):
    """The overhead part times the embedded model (its lml_stats file serves the stats variant): rows per
    method, ratio 1 for a base, the same network evaluations with and without the zero-NFE correction."""
    rows = BL.overhead_rows(steps=2, batch=2, repeats=1, model="mnist", methods=["ddim", "ddim+stats8-ad"])
    by = {r["method"]: r for r in rows}
    assert set(by) == {"ddim", "ddim+stats8-ad"} and by["ddim"]["ratio"] == 1.0
    assert by["ddim"]["nfe"] == by["ddim+stats8-ad"]["nfe"] == 2 and by["ddim+stats8-ad"]["s_per_step"] > 0
    assert by["ddim"]["model"] == "mnist" and by["ddim"]["size"] == 32
    out = tmp_path / "rows.jsonl"
    out.write_text("".join(json.dumps({**r, "part": "overhead", "command": "c"}) + "\n" for r in rows))
    assert main(["bench", "lml", "--render", str(out)]) == 0
    text = capsys.readouterr().out
    assert "### Wall-clock overhead per step (mnist, 32x32, batch 2, 2 steps, CPU)" in text
    assert "| ddim+stats8-ad | 2 |" in text
    assert main(["bench", "lml", "--parts", "overhead", "--overhead-methods", "ddim+nope"]) == 2
    assert "unknown LML variant 'nope'" in capsys.readouterr().err


def test_quality_report_has_a_gaussian_goal_table_on_the_shared_sample_bound():
    from hessdiff.scripts import cmd_bench_lml
    from hessdiff.scripts.bench import gmm as BG

    rows = []
    for seed, (base, lml) in enumerate([(1.20, 0.50), (1.25, 0.55), (1.22, 0.52)]):
        rows += [{"method": m, "problem": "gauss-3072", "d": 3072, "nfe": 5, "seed": seed, "metric": "w2_lb",
                  "value": v, "wall_s": 0.0, "n_samples": 500, "spacing": "trailing"}
                 for m, v in (("unipc-2", base), ("unipc-2+cov-ad", lml))]
    rows.append({"method": "unipc-2", "problem": "gauss-3072", "d": 3072, "nfe": 5, "seed": 0, "metric": "w2",
                 "value": 1.21, "wall_s": 0.0, "n_samples": 500, "spacing": "trailing"})
    text = cmd_bench_lml._quality_section(rows, BL, BG)
    gauss = text.split("On the Gaussian problems")[1].split("### Sample quality")[0]
    line = next(ln for ln in gauss.splitlines() if ln.startswith("| gauss-3072 | 5 |"))
    assert "| unipc-2 | 1.223 ± 0.025 | unipc-2+cov-ad | 0.523 ± 0.025 | +57 % | yes |" in line
    # without Gaussian rows there is no such table
    assert "On the Gaussian problems" not in cmd_bench_lml._quality_section(
        [r for r in rows if r["metric"] == "w2"], BL, BG)


def test_cov_variants_on_a_latent_model_read_the_latents_of_the_training_pick():
    from hessdiff.samplers.denoiser import UNetDenoiser
    from hessdiff.samplers.models import load_model

    model = load_model("mnist-ldm")
    den = CountingDenoiser(UNetDenoiser.from_unet_and_scheduler(model.unet, model.scheduler))
    BL._attach_model_sources(den, "mnist-ldm", model, "mnist", ["cov-ad"])
    assert tuple(den.lml_data.shape) == (1024, *model.sample_shape)  # latents, not 1x32x32 images
    with torch.no_grad():
        first = model.encode(BL._training_pick("mnist")[:4]).float()
    torch.testing.assert_close(den.lml_data[:4], first, rtol=1e-5, atol=1e-5)
    src = BL._oracle_cov(den)
    assert src.dim == den.lml_data[0].numel()
    # a pixel model gets the images themselves
    pix = load_model("mnist")
    den2 = CountingDenoiser(UNetDenoiser.from_unet_and_scheduler(pix.unet, pix.scheduler))
    BL._attach_model_sources(den2, "mnist", pix, "mnist", ["cov-ad"])
    assert torch.equal(den2.lml_data, BL._training_pick("mnist"))
