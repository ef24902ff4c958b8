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
