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


def test_an_in_place_edit_of_the_same_size_is_seen_and_recomputed(tmp_path):
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
    with pytest.raises(SweepMismatchError, match="different sweep configuration"):
        run_sweep(cfg, out, plots=False)
    old = {json.loads(line)["key"]: json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()}
    rep = run_sweep(cfg, out, resume=True, plots=False)  # only the edited image's items are computed again
    new = {json.loads(line)["key"]: json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()}
    # its sample item and its reference features (the FID reference is the data)
    assert rep.num_computed == sum("/im1/" in k for k in old) + 1 == 2 and new.keys() == old.keys()
    for k in old:
        assert (new[k]["reuse"] == old[k]["reuse"]) == ("/im1/" not in k), k  # a new result identity


def test_truncated_jpeg_is_skipped_and_listed_not_a_crash(tmp_path):
    data = tmp_path / "imgs"
    data.mkdir()
    for i in range(2):
        _png(data / f"im{i}.png", i)
    rng = np.random.default_rng(5)
    Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(data / "cut.jpg", quality=95)
    raw = (data / "cut.jpg").read_bytes()
    (data / "cut.jpg").write_bytes(raw[: len(raw) // 2])
    cfg = parse_config(_config(data), name="t.toml")
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        rep = run_sweep(cfg, out, plots=False)
    assert rep.complete and rep.num_items == 2
    assert [Path(p).name for p, _ in rep.skipped_files] == ["cut.jpg"]
    assert json.loads((out / "sweep.json").read_text())["info"]["skipped_files"][0][0].endswith("cut.jpg")
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        assert run_sweep(cfg, out, resume=True, plots=False).num_computed == 0


def _cli_sweep(*argv: str) -> int:
    from hessdiff.scripts.cli import main

    return main(["sweep", *argv])


def test_out_that_is_a_file_or_under_a_file_is_one_clear_error(tmp_path, capsys):
    data = tmp_path / "imgs"
    data.mkdir()
    _png(data / "im0.png", 0)
    toml = tmp_path / "s.toml"
    toml.write_text(f'[sweep]\nseeds = "0"\n[data]\nfolder = "{data}"\nresolution = 16\n'
                    '[[tasks]]\nname = "denoising"\n[[methods]]\nname = "pinv"\n[metrics]\npaired = ["psnr"]\n')
    blocker = tmp_path / "afile"
    blocker.write_text("keep")
    for out, msg in ((blocker, "is a file, not a folder"), (blocker / "sub", "afile is a file, not a folder")):
        assert _cli_sweep(str(toml), "--out", str(out), "--no-progress", "--no-plots") == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and msg in err and "Traceback" not in err
    assert blocker.read_text() == "keep"


def test_run_failing_before_its_first_item_leaves_the_folder_as_it_was(tmp_path, monkeypatch):
    from hessdiff.eval.sweep import run as run_mod

    data = tmp_path / "imgs"
    data.mkdir()
    _png(data / "im0.png", 0)
    cfg = parse_config(_config(data), name="t.toml")

    def boom(*a, **k):
        raise RuntimeError("model exploded")

    monkeypatch.setattr(run_mod._Runner, "run_batch", boom)
    out = tmp_path / "deep" / "out"
    with pytest.raises(RuntimeError, match="exploded"):
        run_sweep(cfg, out, plots=False)
    assert not (tmp_path / "deep").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RuntimeError, match="exploded"):
        run_sweep(cfg, empty, plots=False)
    assert list(empty.iterdir()) == []


@pytest.mark.parametrize("method, model, message", [
    ({"name": "dps", "options": {"zeta": -1.0}}, "mnist", "'zeta' of method 'dps' must be a finite non-negative"),
    ({"name": "stsl", "options": {"lam": 0.5, "inner_steps": 0}}, "mnist",
     "'inner_steps' of method 'stsl' must be a positive integer"),
    ({"name": "dps"}, "./no-such-model-folder", "not found"),
])
def test_check_refuses_what_the_run_would_reject(method, model, message, tmp_path, capsys):
    data = tmp_path / "imgs"
    data.mkdir()
    _png(data / "im0.png", 0, size=32)
    opts = ", ".join(f"{k} = {json.dumps(v)}" for k, v in method.get("options", {}).items())
    toml = tmp_path / "s.toml"
    toml.write_text(f'[sweep]\nseeds = "0"\n[data]\nfolder = {json.dumps(str(data))}\n'
                    f'[[models]]\nname = {json.dumps(model)}\n[[tasks]]\nname = "denoising"\n'
                    f'[[methods]]\nname = {json.dumps(method["name"])}\nsteps = [2]\n'
                    + (f"options = {{ {opts} }}\n" if opts else "") + '[metrics]\npaired = ["psnr"]\n')
    assert _cli_sweep(str(toml), "--check") == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    out = tmp_path / "out"
    assert _cli_sweep(str(toml), "--out", str(out), "--no-progress", "--no-plots") == 2
    assert message in capsys.readouterr().err and not out.exists()


def _records(out: Path) -> dict[str, dict]:
    return {json.loads(line)["key"]: json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()}


def test_a_finished_sweep_is_extended_reusing_unchanged_items(tmp_path):
    """Adding a task, a seed and changing the batch size: only the new items are computed, the old item
    files are not rewritten, and every result equals that of one run of the extended configuration."""
    data = tmp_path / "imgs"
    data.mkdir()
    for i in range(3):
        _png(data / f"im{i}.png", i)
    small = _config(data)
    big = _config(data)
    big["sweep"].update(seeds=[0, 1], batch_size=2)
    big["tasks"].append({"name": "super_resolution", "label": "sr2", "params": {"scale": 2}})
    out = tmp_path / "out"
    run_sweep(parse_config(small, name="t.toml"), out, plots=False)
    stamps = {p: p.stat().st_mtime_ns for p in (out / "items").rglob("*") if p.is_file()}
    with pytest.raises(SweepMismatchError) as info:  # without resume: refused, with a readable diff
        run_sweep(parse_config(big, name="t.toml"), out, plots=False)
    msg = str(info.value)
    assert "tasks[1]: added {label \"sr2\"" in msg and "seeds: \"0\" -> \"0-1\"" in msg, msg
    logs: list[str] = []
    rep = run_sweep(parse_config(big, name="t.toml"), out, resume=True, plots=False, log=logs.append)
    assert rep.num_items == 12 and rep.num_computed == 12 - 3 and rep.num_done == 12
    assert any("configuration changed" in m and "reused" in m for m in logs), logs
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # the 3 old items untouched
    fresh = tmp_path / "fresh"
    run_sweep(parse_config(big, name="t.toml"), fresh, plots=False)
    got, want = _records(out), _records(fresh)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k]["metrics"] == want[k]["metrics"] and got[k]["sampler_seed"] == want[k]["sampler_seed"], k
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and [c["n"] for c in summary["configurations"]] == [6, 6]
    meta = json.loads((out / "sweep.json").read_text())
    assert len(meta["extended_from"]) == 1
    # back to the small configuration: nothing to compute (its items are still there)
    assert run_sweep(parse_config(small, name="t.toml"), out, resume=True, plots=False).num_computed == 0


def test_a_failed_extension_puts_sweep_json_back(tmp_path, monkeypatch):
    data = tmp_path / "imgs"
    data.mkdir()
    _png(data / "im0.png", 0)
    out = tmp_path / "out"
    run_sweep(parse_config(_config(data), name="t.toml"), out, plots=False)
    before = (out / "sweep.json").read_bytes()
    big = _config(data)
    big["sweep"]["seeds"] = [0, 1]
    from hessdiff.eval.sweep import run as run_mod

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(run_mod._Runner, "run_batch", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        run_sweep(parse_config(big, name="t.toml"), out, resume=True, plots=False)
    assert (out / "sweep.json").read_bytes() == before
