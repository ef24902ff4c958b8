"""User-reported sweep bugs: item ids of non-ASCII names, stale results after an in-place edit, bad files
and output folders, configurations that ``--check`` passed but the run rejected."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hessdiff.eval.sweep import SweepMismatchError, run_sweep
from hessdiff.eval.sweep.config import parse_config
from hessdiff.eval.sweep.images import _ImageSet


def _png(path: Path, seed: int, size: int = 16) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(path)
    return path


def _config(folder: Path) -> dict:
    return {
        "sweep": {"name": "t", "seeds": [0]},
        "data": {"folder": str(folder), "resolution": 16, "channels": 3},
        "tasks": [{"name": "denoising", "params": {"sigma_y": 0.05}}],
        "methods": [{"name": "pinv"}],
        "metrics": {"paired": ["psnr"], "features": "pixels"},
    }


def test_names_differing_only_in_unsafe_characters_stay_separate_items(tmp_path):
    data = tmp_path / "imgs"
    data.mkdir()
    for i, name in enumerate(["猫.png", "犬.png", "鳥.png", "plain.png"]):
        _png(data / name, i)
    s = _ImageSet("data", folder=data)
    assert len(set(s.ids)) == 4
    assert s.ids[s.files.index("plain.png")] == "plain"  # clean names keep their plain id
    assert all(len(i.rsplit("-", 1)[-1]) == 8 for i in s.ids if i != "plain")  # sanitised name + short hash
    assert _ImageSet("data", folder=data).ids == s.ids  # stable
    rep = run_sweep(parse_config(_config(data), name="t.toml"), tmp_path / "out", plots=False)
    assert rep.num_items == 4
    lines = (tmp_path / "out" / "results.jsonl").read_text().splitlines()
    assert len({json.loads(x)["image"]["id"] for x in lines}) == 4
    # same content and names that sanitise alike: one clear error, not one merged item
    (data / "犬.png").write_bytes((data / "猫.png").read_bytes())
    with pytest.raises(ValueError, match="same item id"):
        _ImageSet("data", folder=data)


def test_resume_after_an_in_place_edit_of_the_same_size_is_refused(tmp_path):
    data = tmp_path / "imgs"
    data.mkdir()
    for i in range(2):
        _png(data / f"im{i}.png", i)
    cfg = parse_config(_config(data), name="t.toml")
    out = tmp_path / "out"
    run_sweep(cfg, out, plots=False)
    before = (data / "im1.png").stat().st_size
    arr = np.asarray(Image.open(data / "im1.png")).copy()
    arr[0, 0] = 255 - arr[0, 0]
    for seed in range(50):  # find an edit with the same file size
        Image.fromarray(arr).save(data / "im1.png")
        if (data / "im1.png").stat().st_size == before:
            break
        arr[1, seed % 16] = 255 - arr[1, seed % 16]
    assert (data / "im1.png").stat().st_size == before
    with pytest.raises(SweepMismatchError, match="refusing to mix"):
        run_sweep(cfg, out, resume=True, plots=False)
