"""Paired comparisons of two methods of a sweep (``hessdiff sweep ... --compare A:B``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from hessdiff.eval.sweep import run_sweep
from hessdiff.eval.sweep.compare import format_comparison, paired_comparison, parse_pair
from hessdiff.eval.sweep.config import parse_config
from hessdiff.eval.sweep.summary import load_results


def _sweep(tmp_path):
    data = tmp_path / "imgs"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).save(data / f"im{i}.png")
    raw = {"sweep": {"name": "c", "seeds": [0, 1]}, "data": {"folder": str(data), "resolution": 16, "channels": 3},
           "tasks": [{"name": "denoising", "params": {"sigma_y": 0.1}},
                     {"name": "super_resolution", "label": "sr2", "params": {"scale": 2}}],
           "methods": [{"name": "pinv"}],
           "metrics": {"paired": ["psnr"]}}
    out = tmp_path / "out"
    run_sweep(parse_config(raw, name="c.toml"), out, plots=False)
    return out


def test_paired_differences_are_the_mean_and_t_interval_of_per_item_differences(tmp_path):
    out = _sweep(tmp_path)
    rows = paired_comparison(out, ("pinv", 0), ("pinv", 0))  # a method against itself: exactly zero
    assert [r["task"] for r in rows] == ["denoising", "sr2"] and all(r["diff"] == 0 and r["n"] == 8 for r in rows)
    # a second "method": the same records with psnr shifted per item, written as another label
    recs = load_results(out)
    import json

    shifted = []
    for k, r in enumerate(recs):
        s = json.loads(json.dumps(r))
        s["config_label"] = s["config_label"].replace("/pinv/", "/other/")
        s["metrics"]["psnr"] = r["metrics"]["psnr"] + 1.0 + 0.1 * (k % 3)
        shifted.append(s)
    (out / "results.jsonl").write_text("\n".join(json.dumps(r) for r in recs + shifted) + "\n")
    rows = paired_comparison(out, ("other", 0), ("pinv", 0))
    for r in rows:
        d = np.array([1.0 + 0.1 * (k % 3) for k, rec in enumerate(recs) if f"/{r['task']}/" in rec["config_label"]])
        assert r["diff"] == pytest.approx(d.mean()) and r["sd"] == pytest.approx(d.std(ddof=1))
        assert r["ci"] == pytest.approx(2.365 * d.std(ddof=1) / math.sqrt(8))  # t(0.975, 7 df)
    table = format_comparison(rows, ("other", 0), ("pinv", 0))
    assert "| other - pinv (95 % CI) |" in table.splitlines()[0] and table.count("| yes |") == 2


def test_bad_compare_specs_are_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="expected A:B"):
        parse_pair("mmps@20")
    with pytest.raises(ValueError, match="bad step count"):
        parse_pair("mmps@x:dps@100")
    assert parse_pair("mmps@20:pinv") == (("mmps", 20), ("pinv", 0))
    out = _sweep(tmp_path)
    with pytest.raises(ValueError, match="no items where both"):
        paired_comparison(out, ("dps", 100), ("pinv", 0))


def test_against_pairs_a_method_with_another_sweeps_rows_by_task_image_and_seed(tmp_path):
    import gzip
    import json

    out = _sweep(tmp_path)
    recs = load_results(out)
    # the "other sweep": another model label, the same images / seeds, psnr shifted by image
    other = []
    for r in recs:
        s = json.loads(json.dumps(r))
        s["config_label"] = s["config_label"].replace("/pinv/", "/dps/").replace(s["config_label"].split("/")[0],
                                                                                  "pixel", 1)
        s["metrics"]["psnr"] = r["metrics"]["psnr"] - (2.0 if s["image"]["id"].endswith("0") else 1.0)
        other.append(s)
    path = tmp_path / "other-results.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write("\n".join(json.dumps(r) for r in other) + "\n")
    rows = paired_comparison(out, ("pinv", 0), ("dps", 0), against=path)
    assert [r["task"] for r in rows] == ["denoising", "sr2"]
    for r in rows:
        assert r["model"].endswith(" vs pixel") and r["n"] == 8
        ids = [rec["image"]["id"] for rec in recs if f"/{r['task']}/" in rec["config_label"]]
        d = np.array([2.0 if i.endswith("0") else 1.0 for i in ids])
        assert r["diff"] == pytest.approx(d.mean()) and r["sd"] == pytest.approx(d.std(ddof=1))
    # without against, the other sweep's rows are not seen; a folder works as well as a file
    with pytest.raises(ValueError, match="no items where both"):
        paired_comparison(out, ("pinv", 0), ("dps", 0))
    assert all(r["diff"] == 0 for r in paired_comparison(out, ("pinv", 0), ("pinv", 0), against=out))
    with pytest.raises(FileNotFoundError, match="sweep folder or a results"):
        paired_comparison(out, ("pinv", 0), ("pinv", 0), against=tmp_path / "missing.jsonl")


def test_compare_only_prints_the_tables_of_a_finished_sweep_without_running(tmp_path, capsys):
    from hessdiff.scripts.cli import main

    out = _sweep(tmp_path)
    before = sorted(p.name for p in out.iterdir())
    assert main(["sweep", "--out", str(out), "--compare-only", "--compare", "pinv:pinv",
                 "--against", str(out / "results.jsonl")]) == 0
    text = capsys.readouterr().out
    assert "| pinv - pinv (95 % CI) |" in text and text.count("+0.000 ± 0.000") == 2
    assert sorted(p.name for p in out.iterdir()) == before  # nothing written
    assert main(["sweep", "--out", str(tmp_path / "none"), "--compare-only", "--compare", "pinv:pinv"]) == 2
    assert "has no results.jsonl" in capsys.readouterr().err
    assert main(["sweep", "--out", str(out), "--compare-only"]) == 2
    assert "at least one --compare" in capsys.readouterr().err


def _pinv_sweep(tmp_path, name, **data):
    src = tmp_path / "imgs"
    if not src.is_dir():
        src.mkdir()
        rng = np.random.default_rng(1)
        for i in range(5):
            Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).save(src / f"im{i}.png")
    raw = {"sweep": {"name": name, "seeds": [0]},
           "data": {"folder": str(src), "resolution": 16, "channels": 3, **data},
           "tasks": [{"name": "denoising", "params": {"sigma_y": 0.2}}],
           "methods": [{"name": "pinv"}], "metrics": {"paired": ["psnr"]}}
    out = tmp_path / name
    run_sweep(parse_config(raw, name=f"{name}.toml"), out, plots=False)
    return out


def test_a_skip_shard_has_the_ids_seeds_and_results_of_the_same_images_in_the_full_order(tmp_path, capsys):
    import json

    from hessdiff.scripts.cli import main

    full = _pinv_sweep(tmp_path, "full", first_n=5)
    head = _pinv_sweep(tmp_path, "head", first_n=2)
    tail = _pinv_sweep(tmp_path, "tail", skip=2, first_n=3)
    rest = _pinv_sweep(tmp_path, "rest", skip=3)  # no first_n: everything after the skipped ones
    by_id = {r["image"]["id"]: r for r in load_results(full)}
    for shard, ids in ((tail, [2, 3, 4]), (rest, [3, 4])):
        recs = load_results(shard)
        assert sorted(r["image"]["id"] for r in recs) == [f"im{i}" for i in ids]
        for r in recs:  # same image, same seed, so the same measurement noise and metric
            f = by_id[r["image"]["id"]]
            assert r["seed"] == f["seed"] and r["image"] == f["image"] and r["metrics"]["psnr"] == f["metrics"]["psnr"]
    assert json.loads((head / "sweep.json").read_text())["identity"] != json.loads(
        (tail / "sweep.json").read_text())["identity"]
    # the joined shards pair exactly like the full run
    joined = paired_comparison([head, tail], ("pinv", 0), ("pinv", 0), against=[full])
    assert joined[0]["n"] == 5 and joined[0]["diff"] == 0
    assert paired_comparison([head, tail], ("pinv", 0), ("pinv", 0))[0]["n"] == 5
    assert paired_comparison([tail, rest], ("pinv", 0), ("pinv", 0))[0]["n"] == 3  # overlap counted once
    assert main(["sweep", "--out", str(head), "--compare-only", "--compare", "pinv:pinv", "--with",
                 str(tail / "results.jsonl"), "--against", str(full)]) == 0
    assert "| 5 |" in capsys.readouterr().out
    # a "shard" whose shared item disagrees is not a shard of the same sweep
    recs = load_results(rest)
    recs[0]["metrics"]["psnr"] += 1.0
    (rest / "results.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    with pytest.raises(ValueError, match="different metrics: not shards"):
        paired_comparison([tail, rest], ("pinv", 0), ("pinv", 0))
    assert main(["sweep", "--out", str(head), "--compare-only", "--compare", "pinv:pinv", "--with",
                 str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "--with" in err and "no such sweep folder" in err
    with pytest.raises(ValueError, match="skip=5"):
        _pinv_sweep(tmp_path, "past", skip=5)


def test_embedded_shards_keep_the_ids_seeds_and_pixels_of_the_full_order():
    import torch

    from hessdiff.eval.sweep.config import SweepConfigError
    from hessdiff.eval.sweep.images import _ImageSet

    full = _ImageSet("data", embedded="mnist-test", first_n=8)
    shard = _ImageSet("data", embedded="mnist-test", skip=5, first_n=3)
    assert shard.ids == full.ids[5:] == ["mnist-test__00005", "mnist-test__00006", "mnist-test__00007"]
    assert shard.seeds == full.seeds[5:] and shard.content == full.content[5:]
    assert torch.equal(shard.load(0, (32, 32)), full.load(5, (32, 32)))
    with pytest.raises(ValueError, match="has only 100 images"):
        _ImageSet("data", embedded="mnist-tune", skip=90, first_n=20)
    raw = {"sweep": {"name": "s"}, "data": {"embedded": "mnist-test", "resolution": 32, "skip": -1},
           "tasks": [{"name": "denoising"}], "methods": [{"name": "pinv"}]}
    with pytest.raises(SweepConfigError, match=r"\[data\].*skip"):
        parse_config(raw, name="s.toml")
    raw["data"]["skip"] = 0  # skip = 0 is the default and leaves the configuration's identity unchanged
    no_skip = dict(raw, data={"embedded": "mnist-test", "resolution": 32})
    assert parse_config(raw, name="s.toml").resolved() == parse_config(no_skip, name="s.toml").resolved()


def test_a_method_error_names_the_configuration_it_happened_in(tmp_path, monkeypatch):
    import dataclasses

    from hessdiff.eval.sweep import methods

    _pinv_sweep(tmp_path, "ok", first_n=2)  # builds the image folder
    spec = methods.METHODS["pinv"]

    def diverged(call):
        raise ValueError("input contains NaN or Inf values")

    monkeypatch.setitem(methods.METHODS, "pinv", dataclasses.replace(spec, fn=diverged))
    with pytest.raises(ValueError, match=r"^\S+/denoising/pinv/0: input contains NaN"):
        _pinv_sweep(tmp_path, "bad", first_n=2)
