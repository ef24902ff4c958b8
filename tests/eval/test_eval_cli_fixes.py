"""User-reported ``hessdiff eval`` bugs: relative folders, outputs checked first, metric reporting."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from hessdiff.scripts.cli import main


def make_folder(path: Path, n: int, size: int = 16, seed: int = 0) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(path / f"{i:05d}.png")
    return path


def test_eval_relative_folders_with_resolution(tmp_path, monkeypatch, capsys):
    make_folder(tmp_path / "rel" / "dir", 3)
    make_folder(tmp_path / "rel" / "dir2", 3, seed=1)
    monkeypatch.chdir(tmp_path)
    rc = main(["eval", "--real", "rel/dir", "--fake", "rel/dir2", "--resolution", "8", "--metrics", "psnr,fid",
               "--features", "pixels", "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "do not exist" not in captured.err
    assert "psnr" in captured.out


def _eval(tmp_path, *extra: str) -> int:
    real = make_folder(tmp_path / "real", 3)
    fake = make_folder(tmp_path / "fake", 3, seed=1)
    return main(["eval", "--real", str(real), "--fake", str(fake), "--features", "pixels", "--no-progress", *extra])


def test_eval_json_refuses_an_existing_file_without_overwrite(tmp_path, capsys):
    target = tmp_path / "e.json"
    target.write_text("precious")
    assert _eval(tmp_path, "--json", str(target)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refusing to overwrite" in err and "--overwrite" in err
    assert target.read_text() == "precious"
    assert _eval(tmp_path, "--json", str(target), "--overwrite") == 0
    assert "fid" in json.loads(target.read_text())


def test_eval_checks_outputs_and_device_before_computing(tmp_path, monkeypatch, capsys):
    import hessdiff.eval.sweep as sweep

    def never(*a, **k):
        raise AssertionError("computed before the checks")

    monkeypatch.setattr(sweep, "evaluate_folders", never)
    (tmp_path / "adir").mkdir()
    assert _eval(tmp_path, "--json", str(tmp_path / "adir")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a folder" in err
    assert list((tmp_path / "adir").iterdir()) == []
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _eval(tmp_path, "--device", "cuda") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "CUDA is not available" in err


def test_eval_fails_when_no_requested_metric_could_be_computed(tmp_path, monkeypatch, capsys):
    import hessdiff.eval.sweep.methods as methods
    from hessdiff.eval.metrics.weights import MissingWeightsError

    def missing(*a, **k):
        raise MissingWeightsError("Inception", tmp_path / "w" / "inception.pt", None, "offline")

    monkeypatch.setattr(methods, "make_feature_extractor", missing)
    assert _eval(tmp_path, "--json", str(tmp_path / "e.json")) == 2
    captured = capsys.readouterr()
    assert "fid None" not in " ".join(captured.out.split())
    assert "no requested metric could be computed" in captured.err and "inception.pt" in captured.err
    assert not (tmp_path / "e.json").exists()


def test_eval_fid_of_a_folder_against_itself_is_zero_and_small_sets_warn(tmp_path, capsys):
    real = make_folder(tmp_path / "real", 5)
    assert main(["eval", "--real", str(real), "--fake", str(real), "--features", "pixels", "--metrics", "fid,kid",
                 "--no-progress", "--json", str(tmp_path / "e.json")]) == 0
    captured = capsys.readouterr()
    res = json.loads((tmp_path / "e.json").read_text())
    assert res["fid"] >= 0.0 and res["fid"] < 1e-9
    assert "fid from 5 images" in captured.err and "at least 2048" in captured.err
    assert "kid from 5 images" in captured.err and "at least 100" in captured.err


def test_frechet_distance_of_equal_gaussians_is_not_negative():
    from hessdiff.eval.metrics import frechet_distance

    a = np.random.default_rng(1).random((50, 20))  # raw formula gives -3.1e-15 here
    s, mu = np.cov(a, rowvar=False), a.mean(0)
    assert frechet_distance(mu, s, mu, s) == 0.0
