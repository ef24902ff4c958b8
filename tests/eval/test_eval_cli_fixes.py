"""User-reported ``hessdiff eval`` bugs: relative folders, outputs checked first, metric reporting."""

from __future__ import annotations

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
