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


def test_rank0_waits_on_progress_and_names_a_frozen_rank(tmp_path):
    """The end-of-sweep wait: items appearing keep it going; none appearing for the timeout stops it
    with one line naming the rank (a frozen rank no longer blocks for a fixed 2 hours)."""
    import threading

    from hessdiff.eval.sweep.run import _wait_for_items
    from hessdiff.eval.sweep.store import SweepError
    from hessdiff.eval.sweep.work import _Item, _Unit

    unit = _Unit("sample", "m", None, None, 1, "m/t/x/1", "items/m", {}, "")
    items = [_Item(i, unit, i, 0, f"k{i}", f"items/m/i{i}", f"r{i}") for i in range(3)]

    def finish(it):
        (tmp_path / "items" / "m").mkdir(parents=True, exist_ok=True)
        (tmp_path / f"{it.stem}.json").write_text(json.dumps({"key": it.key, "reuse": it.reuse, "files": {}}))

    def later():
        for it in items:
            time.sleep(0.3)
            finish(it)

    t = threading.Thread(target=later)
    t.start()
    # each item comes 0.3 s after the last: a 0.01-minute (0.6 s) timeout on progress is never hit
    _wait_for_items(tmp_path, [(1, it) for it in items], "h", 0.01, lambda s: None, poll_s=0.05)
    t.join()
    more = [_Item(3, unit, 3, 0, "k3", "items/m/i3", "r3")]
    start = time.monotonic()
    with pytest.raises(SweepError, match=r"rank\(s\) 2 finished no item for 0.01 min .*--resume.*--dist-timeout"):
        _wait_for_items(tmp_path, [(2, more[0])], "h", 0.01, lambda s: None, poll_s=0.05)
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("bad", ["0", "-1", "nan", "inf"])
def test_dist_timeout_is_checked(bad, sweep_dir, capsys):
    from hessdiff.scripts.cmd_sweep import main

    out = sweep_dir / "o"
    assert main([str(sweep_dir / "sweep.toml"), "--out", str(out), "--dist-timeout", bad, "--no-progress"]) == 2
    assert "timeout must be a positive number of minutes" in capsys.readouterr().err
    assert not out.exists()
