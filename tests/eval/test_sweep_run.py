"""Sweeps in one process: outputs, metrics read back from the saved files, resume, refusal to mix
configurations, bad data, a tiny diffusion model, folder-to-folder evaluation and the CLI."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from hessdiff.eval.metrics import psnr, ssim
from hessdiff.eval.sweep import (
    SweepError,
    SweepMismatchError,
    evaluate_folders,
    load_results,
    run_sweep,
    strip_run_fields,
)
from hessdiff.eval.sweep.config import SweepConfigError, parse_config
from hessdiff.eval.sweep.methods import PixelFeatures
from hessdiff.eval.sweep.store import _FolderLock
from hessdiff.utils.images import load_image, to_uint8


def make_folder(path: Path, n: int, size: tuple[int, int] = (18, 20), grey: bool = False, seed: int = 0) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        a = (rng.random(size if grey else (*size, 3)) * 255).astype(np.uint8)
        Image.fromarray(a).save(path / f"im{i:02d}.png")
    return path


def restoration_config(folder: Path, **metrics) -> dict:
    return {
        "sweep": {"name": "t", "seeds": [0, 1]},
        "data": {"folder": str(folder), "resolution": 16, "channels": 3},
        "tasks": [{"name": "random_inpainting", "params": {"drop": 0.5, "sigma_y": 0.05}},
                  {"name": "super_resolution", "label": "sr2", "params": {"scale": 2}}],
        "methods": [{"name": "pinv"}],
        "metrics": {"paired": ["psnr", "ssim"], "features": "pixels", "kid": True, "kid_subsets": 5,
                    "kid_subset_size": 3, **metrics},
    }


def records(out: Path) -> dict[str, dict]:
    return {r["key"]: strip_run_fields(r) for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}


def scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    """Reference FID with scipy's sqrtm (the textbook formula)."""
    m1, m2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_restoration_sweep_files_metrics_and_resume(tmp_path):
    data = make_folder(tmp_path / "imgs", 4)
    (data / "broken.png").write_bytes(b"\x89PNG not really")
    cfg = parse_config(restoration_config(data), name="t.toml")
    out = tmp_path / "out"
    # an injected 3-d extractor keeps the covariances full rank, so that scipy's sqrtm is an accurate oracle
    ext = PixelFeatures(1)
    lines: list[str] = []
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        rep = run_sweep(cfg, out, plots=True, feature_extractor=ext, log=lines.append)
    # the start line counts the samples to compute apart from the reference images' features
    assert any("16 items, 0 already done, 16 to compute (and 4 reference images' features)" in s for s in lines)
    assert rep.complete and rep.num_items == 4 * 2 * 2 and rep.num_computed == 16 + 4  # + 4 reference items
    assert [Path(p).name for p, _ in rep.skipped_files] == ["broken.png"]
    assert json.loads((out / "sweep.json").read_text())["info"]["skipped_files"][0][0].endswith("broken.png")
    recs = records(out)
    assert len(recs) == 16 and len((out / "results.jsonl").read_text().splitlines()) == 16
    for name in ("summary.csv", "summary.md", "summary.json", "plots/psnr.png", "plots/ssim.png", "plots/fid.png"):
        assert (out / name).is_file(), name
    md = (out / "summary.md").read_text()
    assert "| no-model | sr2 | pinv |" in md and "±" in md

    # per-item metrics are those of the saved PNG against the clean image (quantised, no rescaling)
    rec = recs["no-model/sr2/pinv/0/im02/s1"]
    assert rec["files"]["image"].endswith("items/no-model/sr2/pinv/steps-0/im02_s1.png")
    assert rec["image"] == {"id": "im02", "file": "im02.png", "index": 2, "seed": 2}
    fake = to_uint8(load_image(out / rec["files"]["image"], channels=3))
    from hessdiff.eval.data import ImageFolderDataset

    clean = ImageFolderDataset(data, 16, files=[data / "im02.png"]).load_uint8(0)[None]
    assert rec["metrics"]["psnr"] == pytest.approx(float(psnr(fake, clean)), rel=1e-12)
    assert rec["metrics"]["ssim"] == pytest.approx(float(ssim(fake, clean)), rel=1e-12)
    assert rec["config"]["task"]["params"]["scale"] == 2 and rec["nfe"] == 0

    # FID once from all items' features, against the reference features; parity with scipy
    summary = {r["config"]: r for r in json.loads((out / "summary.json").read_text())["configurations"]}
    row = summary["no-model/sr2/pinv/0"]
    fake_f = np.stack([np.load(out / r["files"]["features"]) for k, r in recs.items() if "/sr2/" in k])
    real_f = np.stack([np.load(p) for p in sorted((out / "reference" / "no-model").glob("*.npy"))])
    assert row["n"] == 8 and row["n_reference"] == 4
    assert row["fid"] == pytest.approx(scipy_fid(fake_f, real_f), rel=1e-6, abs=1e-9)
    assert math.isfinite(row["kid"])
    psnrs = [r["metrics"]["psnr"] for k, r in recs.items() if "/sr2/" in k]
    assert row["psnr"] == pytest.approx(np.mean(psnrs)) and row["psnr_sd"] == pytest.approx(np.std(psnrs, ddof=1))

    # resume: nothing to do, nothing rewritten
    stamp = {p: p.stat().st_mtime_ns for p in (out / "items").rglob("*.json")}
    with pytest.warns(UserWarning):
        rep2 = run_sweep(cfg, out, resume=True, plots=False, feature_extractor=ext)
    assert rep2.num_computed == 0 and rep2.complete
    assert {p: p.stat().st_mtime_ns for p in (out / "items").rglob("*.json")} == stamp
    assert records(out) == recs

    # the same folder without resume, or another configuration without resume, is refused
    with pytest.warns(UserWarning), pytest.raises(SweepError, match="pass --resume"):
        run_sweep(cfg, out, feature_extractor=ext)
    other = restoration_config(data)
    other["sweep"]["seeds"] = [0, 1, 2]
    mixed = r"different sweep configuration.*seeds: \"0-1\" -> \"0-2\".*Pass --resume .* to extend it"
    with pytest.warns(UserWarning), pytest.raises(SweepMismatchError, match=mixed):
        run_sweep(parse_config(other, name="t.toml"), out, feature_extractor=ext)
    assert records(out) == recs and {p: p.stat().st_mtime_ns for p in (out / "items").rglob("*.json")} == stamp


def test_interrupted_in_pieces_equals_one_run(tmp_path):
    """--limit runs (any order of completion) and a deleted item give exactly the one-run results."""
    data = make_folder(tmp_path / "imgs", 3)
    raw = restoration_config(data)
    raw["sweep"]["batch_size"] = 2
    cfg = parse_config(raw, name="t.toml")
    run_sweep(cfg, tmp_path / "full", plots=False)
    piece = tmp_path / "pieces"
    rep = run_sweep(cfg, piece, limit=3, plots=False)
    assert not rep.complete and 0 < rep.num_done < rep.num_items
    assert "partial results" in (piece / "summary.md").read_text()
    while not rep.complete:
        rep = run_sweep(cfg, piece, resume=True, limit=5, plots=False)
    # a lost item (e.g. its result file deleted) is recomputed identically
    victim = next((piece / "items").rglob("*_s1.json"))
    victim.unlink()
    rep = run_sweep(cfg, piece, resume=True, plots=False)
    assert rep.num_computed == 1
    assert records(piece) == records(tmp_path / "full")
    s1 = json.loads((piece / "summary.json").read_text())["configurations"]
    s2 = json.loads((tmp_path / "full" / "summary.json").read_text())["configurations"]
    assert [r["fid"] for r in s1] == [r["fid"] for r in s2]
    assert not list(piece.rglob("*.tmp"))


def test_interleaved_run_gives_the_same_items(tmp_path):
    """``interleave = true`` only reorders the batches: every item's record is that of the plain run."""
    data = make_folder(tmp_path / "imgs", 3)
    raw = restoration_config(data)
    raw["sweep"]["batch_size"] = 2
    raw["methods"] = [{"name": "pinv"}, {"name": "adjoint"}]
    run_sweep(parse_config(raw, name="t.toml"), tmp_path / "plain", plots=False)
    raw["sweep"]["interleave"] = True
    run_sweep(parse_config(raw, name="t.toml"), tmp_path / "mixed", plots=False)
    plain, mixed = records(tmp_path / "plain"), records(tmp_path / "mixed")
    assert len(plain) == 2 * 2 * 3 * 2  # tasks x methods x images x seeds
    drop = ("index", "run", "config", "sweep_hash")  # position in the file, timing, the sweep-level identity
    assert {k: {f: v for f, v in r.items() if f not in drop} for k, r in mixed.items()} == \
        {k: {f: v for f, v in r.items() if f not in drop} for k, r in plain.items()}


def test_folder_checks_and_bad_data(tmp_path):
    data = make_folder(tmp_path / "imgs", 2)
    cfg = parse_config(restoration_config(data, fid=False, kid=False), name="t.toml")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(SweepError, match="not empty and is not a sweep folder"):
        run_sweep(cfg, busy)
    assert (busy / "notes.txt").read_text() == "mine"

    locked = tmp_path / "locked"
    locked.mkdir()
    lock = _FolderLock(locked / ".lock")
    lock.acquire()
    try:
        with pytest.raises(SweepError, match="in use by another running sweep"):
            run_sweep(cfg, locked)
    finally:
        lock.release()

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no image files found"):
        run_sweep(parse_config(restoration_config(empty, fid=False, kid=False), name="t.toml"), tmp_path / "o1")
    junk = tmp_path / "junk"
    junk.mkdir()
    for i in range(2):
        (junk / f"{i}.jpg").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="no readable image.*all 2 image file"):
        run_sweep(parse_config(restoration_config(junk, fid=False, kid=False), name="t.toml"), tmp_path / "o2")


def _tiny_unet_folder(path: Path) -> Path:
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)  # test-only: initial weights of the throw-away model
    unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, layers_per_block=1,
                       block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    unet.save_pretrained(path / "unet")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(path / "scheduler")
    return path


def test_tiny_unet_generation_and_posterior_sampling(tmp_path):
    model = _tiny_unet_folder(tmp_path / "tiny")
    ref = make_folder(tmp_path / "ref", 4, size=(16, 16), grey=True)
    gen = {
        "sweep": {"seeds": "0-2", "batch_size": 2},
        "models": [{"name": str(model), "label": "tiny"}],
        "methods": [{"name": "ddim", "steps": [2, 3]}, {"name": "dpm++", "steps": 3, "options": {"order": 2}},
                    {"name": "ddim", "label": "ddim-lml", "steps": 2,
                     "options": {"correction": "published", "correction_options": {"lamb": 1e-3}}}],
        "metrics": {"features": "pixels", "reference": str(ref)},
    }
    out = tmp_path / "gen"
    rep = run_sweep(parse_config(gen, name="g.toml"), out, plots=False)
    assert rep.complete and rep.num_items == 3 * 4
    recs = records(out)
    assert {r["nfe"] for k, r in recs.items() if "/ddim/2/" in k} == {2}
    assert {r["nfe"] for k, r in recs.items() if "/dpm++/3/" in k} == {3}
    assert {r["nfe"] for k, r in recs.items() if "/ddim-lml/2/" in k} == {2}
    assert recs["tiny/unconditional/ddim-lml/2/seed0"]["config"]["method"]["options"]["correction"] == "published"
    png = out / "items/tiny/unconditional/ddim/steps-3/seed000001.png"
    with Image.open(png) as im:
        assert im.mode == "L" and im.size == (16, 16)
    assert recs["tiny/unconditional/ddim/3/seed1"]["sampler_seed"] == 1
    rows = json.loads((out / "summary.json").read_text())["configurations"]
    assert all(math.isfinite(r["fid"]) and r["n_reference"] == 4 for r in rows)
    # an item recomputed alone (its batch recomputed whole) gives the identical image
    before = png.read_bytes()
    png.with_suffix(".json").unlink()
    png.unlink()
    assert run_sweep(parse_config(gen, name="g.toml"), out, resume=True, plots=False).num_computed == 1
    assert png.read_bytes() == before

    from hessdiff.eval.sweep.methods import METHODS

    if "dps" not in METHODS:
        pytest.skip("hessdiff.samplers.guidance is not importable in this checkout")
    rest = {
        "sweep": {"seeds": [0]},
        "models": [{"name": str(model), "label": "tiny"}],
        "data": {"folder": str(ref)},
        "tasks": [{"name": "box_inpainting", "params": {"box_size": 6}}],
        "methods": [{"name": "dps", "steps": 2, "options": {"zeta": 0.5}}, {"name": "pinv"}],
        "metrics": {"paired": ["psnr"], "fid": False},
    }
    out = tmp_path / "rest"
    rep = run_sweep(parse_config(rest, name="r.toml"), out, plots=False)
    recs = records(out)
    assert rep.complete and len(recs) == 8
    assert {r["nfe"] for k, r in recs.items() if "/dps/" in k} == {2}
    assert all(math.isfinite(r["metrics"]["psnr"]) for r in recs.values())
    # the summaries average the counted passes: DPS runs one forward and one backward per step
    rows = {r["method"]: r for r in json.loads((out / "summary.json").read_text())["configurations"]}
    assert rows["dps"]["cost"]["network_forward"] == 2 and rows["dps"]["cost"]["network_backward"] == 2
    assert rows["pinv"]["cost"] == {}
    md = (out / "summary.md").read_text()
    assert "| network fwd / bwd | decoder fwd / bwd |" in md and "| 2 / 2 | 0 / 0 |" in md
    assert "network_forward" in (out / "summary.csv").read_text().splitlines()[0]
    # one picture per model and task: a caption strip, then clean | measurement | dps 2 | pinv for 4 images
    pic = np.asarray(Image.open(out / "pictures" / "tiny" / "box_inpainting.png"))
    assert pic.shape[1] > 4 * 96 and pic.shape[0] > 4 * 96
    assert rep.files["pictures"] == out / "pictures"


def test_sweep_pictures_show_clean_measurement_and_every_method(tmp_path):
    data = make_folder(tmp_path / "imgs", 5)
    raw = restoration_config(data)
    raw["methods"] = [{"name": "pinv"}, {"name": "pinv", "label": "again"}]
    out = tmp_path / "out"
    run_sweep(parse_config(raw, name="t.toml"), out, plots=False, limit=4)  # some items pending
    pics = sorted(p.relative_to(out).as_posix() for p in (out / "pictures").rglob("*.png"))
    assert pics == ["pictures/no-model/random_inpainting.png", "pictures/no-model/sr2.png"]
    pic = np.asarray(Image.open(out / "pictures/no-model/random_inpainting.png"))
    # 4 columns of 96-px tiles (16-px images enlarged 6x) + 3 gaps; a 16-px caption strip + 4 rows + 3 gaps
    assert pic.shape == (16 + 4 * 96 + 3 * 4, 4 * 96 + 3 * 4, 3)
    tile = lambda r, c: pic[16 + r * 100: 16 + r * 100 + 96, c * 100: c * 100 + 96]  # noqa: E731
    from hessdiff.eval.sweep.images import _ImageSet

    clean = _ImageSet("data", folder=data).load(0, (16, 16)).permute(1, 2, 0).numpy()
    first = next(r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())
                 if r["image"]["index"] == 0 and r["seed"] == 0 and "/random_inpainting/pinv/" in r["key"])
    done = np.asarray(Image.open(out / first["files"]["image"]).convert("RGB"))
    assert np.array_equal(tile(0, 2)[::6, ::6], done)  # the method's saved image, enlarged
    assert not np.array_equal(tile(0, 1), tile(0, 0))  # the measurement (half the pixels dropped)
    assert np.array_equal(tile(0, 0)[::6, ::6], clean)  # the clean image as the sweep loads it
    pending = [tile(r, 3) for r in range(4)]
    assert any(np.median(t) == 225 for t in pending)  # the limit left "again" items pending: grey tiles


def test_evaluate_folders_pairs_by_name(tmp_path):
    real = make_folder(tmp_path / "real", 4, size=(16, 16))
    fake = tmp_path / "fake"
    fake.mkdir()
    rng = np.random.default_rng(1)
    for p in sorted(real.glob("*.png")):
        a = np.asarray(Image.open(p)).astype(np.int16) + rng.integers(-20, 21, (16, 16, 3))
        Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(fake / f"{p.stem}_s0.png")
    res = evaluate_folders(real, fake, metrics=["psnr", "ssim", "fid"], features="pixels")
    u8 = [(to_uint8(load_image(fake / f"{p.stem}_s0.png", channels=3)), to_uint8(load_image(p, channels=3)))
          for p in sorted(real.glob("*.png"))]
    expect = [float(psnr(a, b)) for a, b in u8]
    assert res["num_pairs"] == 4 and res["psnr"] == pytest.approx(np.mean(expect), rel=1e-12)
    assert res["fid"] > 0
    same = evaluate_folders(real, real, metrics=["fid"], features="pixels")
    assert abs(same["fid"]) < 1e-9
    (fake / "orphan.png").write_bytes((fake / "im00_s0.png").read_bytes())
    with pytest.raises(ValueError, match="no real image of the same name"):
        evaluate_folders(real, fake, metrics=["psnr"])


def test_cli_sweep_and_eval(tmp_path, capsys):
    from hessdiff.scripts import cmd_eval, cmd_sweep

    data = make_folder(tmp_path / "imgs", 2)
    toml = tmp_path / "s.toml"
    toml.write_text(
        f'[sweep]\nseeds = "0-1"\n[data]\nfolder = "{data.name}"\nresolution = 16\n'
        '[[tasks]]\nname = "denoising"\nparams = { sigma_y = 0.1 }\n[[methods]]\nname = "pinv"\n'
        '[metrics]\npaired = ["psnr"]\nfeatures = "pixels"\n'
    )
    out = tmp_path / "out"
    assert cmd_sweep.main([str(toml), "--out", str(out), "--no-progress", "--no-plots"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("sweep complete") and str(out / "results.jsonl") in last and "summary.md" in last
    assert cmd_sweep.main([str(toml), "--out", str(out), "--no-progress"]) == 2
    assert "pass --resume" in capsys.readouterr().err
    toml.write_text(toml.read_text().replace('name = "pinv"', 'name = "pinv"\nstepz = 3'))
    assert cmd_sweep.main([str(toml), "--out", str(tmp_path / "o2")]) == 2
    assert "s.toml: [[methods]] entry 1: unknown key 'stepz'" in capsys.readouterr().err
    assert cmd_sweep.main(["--list-methods"]) == 0
    assert "pinv" in capsys.readouterr().out

    fake = out / "items" / "no-model" / "denoising" / "pinv" / "steps-0"
    with contextlib.suppress(Exception):
        (fake / "x").mkdir()
    parser_args = ["--real", str(data), "--fake", str(fake), "--metrics", "psnr,fid", "--features", "pixels",
                   "--resolution", "16", "--no-progress", "--json", str(tmp_path / "e.json")]
    import argparse

    p = argparse.ArgumentParser()
    cmd_eval.register(p.add_subparsers())
    args = p.parse_args(["eval", *parser_args])
    assert args.func(args) == 0
    res = json.loads((tmp_path / "e.json").read_text())
    recs = load_results(out)
    assert res["num_pairs"] == 4
    assert res["psnr"] == pytest.approx(np.mean([r["metrics"]["psnr"] for r in recs]), rel=1e-12)


def test_config_error_for_inconsistent_image_space(tmp_path):
    data = make_folder(tmp_path / "imgs", 2)
    raw = restoration_config(data, fid=False, kid=False)
    raw["data"].pop("resolution")
    with pytest.raises(SweepConfigError, match="resolution"):
        parse_config(raw, name="t.toml")


def test_metric_that_cannot_run_is_marked_missing(tmp_path):
    data = make_folder(tmp_path / "imgs", 2)
    raw = restoration_config(data, fid=False, kid=False)
    raw["data"]["resolution"] = 8  # SSIM needs at least 11x11 pixels
    raw["tasks"] = raw["tasks"][:1]
    with pytest.warns(UserWarning, match="metric ssim is skipped"):
        rep = run_sweep(parse_config(raw, name="t.toml"), tmp_path / "out", plots=False)
    assert rep.complete
    recs = records(tmp_path / "out")
    assert all(r["metrics"]["ssim"] is None and "11x11" in r["missing"]["ssim"] for r in recs.values())
    assert all(math.isfinite(r["metrics"]["psnr"]) for r in recs.values())
    assert "— (missing)" in (tmp_path / "out" / "summary.md").read_text()
