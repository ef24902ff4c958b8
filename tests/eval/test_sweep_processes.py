"""Sweeps across processes: kill -9 at random points then resume, and torchrun with 2 CPU processes,
both compared with one uninterrupted single-process run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hessdiff.eval.sweep import run_sweep, strip_run_fields
from hessdiff.eval.sweep.config import load_config

CONFIG = """
[sweep]
name = "crash-test"
seeds = [0, 1, 2]

[data]
folder = "imgs"
resolution = 16
channels = 3

[[tasks]]
name = "random_inpainting"
params = { drop = 0.5, sigma_y = 0.05 }

[[tasks]]
name = "super_resolution"
label = "sr2"
params = { scale = 2 }

[[methods]]
name = "pinv"

[metrics]
paired = ["psnr", "ssim"]
features = "pixels"
kid = true
kid_subsets = 5
kid_subset_size = 4
"""
N_IMAGES = 6
N_SAMPLE = N_IMAGES * 2 * 3


@pytest.fixture()
def sweep_dir(tmp_path: Path) -> Path:
    d = tmp_path / "imgs"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        Image.fromarray((rng.random((18, 20, 3)) * 255).astype(np.uint8)).save(d / f"im{i:02d}.png")
    (tmp_path / "sweep.toml").write_text(CONFIG)
    return tmp_path


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return env


def _cmd(cfg: Path, out: Path) -> list[str]:
    return [str(cfg), "--out", str(out), "--resume", "--no-progress", "--no-plots", "--threads", "1"]


def _reference_run(root: Path) -> Path:
    """The uninterrupted single-process run (in this process, one thread)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = root / "uninterrupted"
        run_sweep(load_config(root / "sweep.toml"), out, plots=False)
    finally:
        torch.set_num_threads(n)
    return out


def _records(out: Path) -> dict[str, dict]:
    lines = (out / "results.jsonl").read_text().splitlines()
    recs = [json.loads(line) for line in lines]
    keys = [r["key"] for r in recs]
    assert len(keys) == len(set(keys)), "duplicated items in results.jsonl"
    return {r["key"]: strip_run_fields(r) for r in recs}


def _summary(out: Path) -> list[dict]:
    rows = json.loads((out / "summary.json").read_text())["configurations"]
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]


def _finished_items(out: Path) -> dict[Path, bytes]:
    """Every item result file on disk; each must be complete JSON (writes are atomic)."""
    done = {}
    for p in list(out.glob("items/**/*.json")) + list(out.glob("reference/**/*.json")):
        data = p.read_bytes()
        json.loads(data)  # a torn write would fail here
        done[p] = data
    return done


def _check_kill_and_resume(root: Path, kills: int, seed: int) -> None:
    ref = _reference_run(root)
    out = root / "killed"
    cfg = root / "sweep.toml"
    rng = random.Random(seed)
    n_files = N_SAMPLE + N_IMAGES  # sample items + reference features
    base = [sys.executable, "-m", "hessdiff.scripts.cmd_sweep"]
    kept: dict[Path, bytes] = {}
    killed = 0
    log: list[str] = []
    for _ in range(kills):
        # kill once a random number of further results exist, plus a random delay to land anywhere in a
        # write; with everything done the kill lands in the summaries (or start-up) instead
        target = len(kept) + rng.randint(1, max(1, 2 * n_files // kills))
        delay = rng.uniform(0.0, 0.04) if len(kept) < n_files else rng.uniform(0.0, 12.0)
        target = min(target, n_files)
        proc = subprocess.Popen(base + _cmd(cfg, out), env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        t0 = time.monotonic()
        while proc.poll() is None and time.monotonic() - t0 < 120:
            if len(list(out.glob("items/**/*.json"))) + len(list(out.glob("reference/**/*.json"))) >= target:
                time.sleep(delay)
                break
            time.sleep(0.003)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            killed += 1
            log.append(f"target {target}, killed with {len(_finished_items(out))} results on disk")
        else:
            log.append(f"target {target}, finished before the kill")
        proc.wait(timeout=60)
        if proc.returncode not in (0, -signal.SIGKILL):
            raise AssertionError(f"sweep failed (rc {proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
        proc.stderr.close()
        # nothing already finished is lost or altered by a kill
        now = _finished_items(out)
        assert all(now.get(p) == b for p, b in kept.items())
        kept = now
    print("\n".join(log))  # shown with pytest -s
    assert killed >= 1
    proc = subprocess.run(base + _cmd(cfg, out), env=_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "sweep complete" in proc.stdout
    final = _finished_items(out)
    assert all(final[p] == b for p, b in kept.items())  # finished items were never recomputed
    assert len(final) == n_files
    assert _records(out) == _records(ref)
    assert _summary(out) == _summary(ref)
    for p in (ref / "items").rglob("*.png"):
        assert (out / p.relative_to(ref)).read_bytes() == p.read_bytes()
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_kill9_at_random_points_then_resume(sweep_dir):
    _check_kill_and_resume(sweep_dir, kills=3, seed=20240607)


@pytest.mark.slow
def test_kill9_many_times(sweep_dir):
    _check_kill_and_resume(sweep_dir, kills=12, seed=7)


def test_torchrun_two_processes_match_one(sweep_dir):
    ref = _reference_run(sweep_dir)
    out = sweep_dir / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "hessdiff.scripts.cmd_sweep"] + _cmd(sweep_dir / "sweep.toml", out)
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sweep complete" in proc.stdout
    recs_two, recs_one = _records(out), _records(ref)
    assert recs_two == recs_one  # same items, same metrics, same files, same seeds
    ranks = {json.loads(line)["run"]["rank"] for line in (out / "results.jsonl").read_text().splitlines()}
    assert ranks == {0, 1}  # the work was shared
    s_two, s_one = _summary(out), _summary(ref)
    for a, b in zip(s_two, s_one, strict=True):
        assert a["fid"] == pytest.approx(b["fid"], rel=1e-9, abs=1e-12)
        assert a["kid"] == pytest.approx(b["kid"], rel=1e-9, abs=1e-12)
        assert a["n"] == b["n"] == N_IMAGES * 3
    for p in (ref / "items").rglob("*.png"):
        assert (out / p.relative_to(ref)).read_bytes() == p.read_bytes()
