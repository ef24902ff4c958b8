"""``hessdiff degrade``: round trip through the files, refusal to overwrite, nothing written on errors."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from hessdiff.scripts import cmd_degrade
from hessdiff.scripts.cli import CLIError
from hessdiff.tasks import load_measurement, make_task
from hessdiff.utils.images import load_image


def _run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="hessdiff")
    sub = parser.add_subparsers(dest="command")
    cmd_degrade.register(sub)
    args = parser.parse_args(["degrade", *argv])
    return args.func(args)


@pytest.fixture()
def image(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(40, 36, 3), dtype=np.uint8)
    path = tmp_path / "clean.png"
    Image.fromarray(arr).save(path)
    return path


def test_round_trip(tmp_path, image, capsys):
    out = tmp_path / "out"
    assert _run(str(image), "--task", "motion_blur", "--param", "kernel_size=9", "--param", "intensity=0.3",
                "--seed", "4", "--out", str(out)) == 0
    assert sorted(p.name for p in out.iterdir()) == ["measurement.png", "measurement.pt"]
    m = load_measurement(out / "measurement.pt")
    assert m.task == "motion_blur" and m.seeds == [4] and m.params["kernel_size"] == 9
    x = load_image(image)
    # the stored operator and y are exactly what the library computes for this image and seed
    ref = make_task("motion_blur", kernel_size=9, intensity=0.3).measure(x, seed=4)
    assert torch.equal(m.y, ref.y)
    assert torch.equal(m.operator.kernel, ref.operator.kernel)
    # the PNG shows the measurement with the fixed [-1, 1] -> uint8 mapping
    png = load_image(out / "measurement.png")
    assert png.shape == m.y.shape
    assert float((png - m.y.clamp(-1, 1)).abs().max()) <= 1 / 127.5 + 1e-6
    assert "wrote" in capsys.readouterr().out


def test_preset_super_resolution_writes_low_resolution_png(tmp_path, image):
    out = tmp_path / "sr"
    assert _run(str(image), "--preset", "dps-256", "--task", "super_resolution_x4", "--out", str(out)) == 0
    m = load_measurement(out / "measurement.pt")
    assert m.y.shape == (1, 3, 10, 9) and m.label == "dps-256:super_resolution_x4"
    assert load_image(out / "measurement.png").shape == (1, 3, 10, 9)


def test_refuses_to_overwrite(tmp_path, image):
    out = tmp_path / "o"
    _run(str(image), "--task", "denoising", "--out", str(out))
    before = (out / "measurement.pt").read_bytes()
    with pytest.raises(CLIError, match="refusing to overwrite"):
        _run(str(image), "--task", "denoising", "--seed", "1", "--out", str(out))
    assert (out / "measurement.pt").read_bytes() == before
    assert _run(str(image), "--task", "denoising", "--seed", "1", "--out", str(out), "--overwrite") == 0
    assert (out / "measurement.pt").read_bytes() != before
    assert sorted(p.name for p in out.iterdir()) == ["measurement.png", "measurement.pt"]


@pytest.mark.parametrize("argv,error,match", [
    (["--task", "box_inpainting", "--param", "box_size=64"], ValueError, "does not fit"),
    (["--task", "super_resolution", "--param", "scale=7"], ValueError, "scale 7 does not divide"),
    (["--task", "gaussian_blur", "--param", "kernel_size=8"], ValueError, "odd"),
    (["--task", "denoising", "--param", "sigma_y=-1"], ValueError, "non-negative"),
    (["--task", "mask_inpainting", "--param", "mask_path=MISSING"], FileNotFoundError, "mask file not found"),
    (["--task", "blur"], CLIError, "unknown task"),
    (["--task", "denoising", "--param", "oops"], CLIError, "KEY=VALUE"),
    (["--preset", "dps-256", "--task", "nope"], ValueError, "has no task 'nope'"),
])
def test_bad_input_writes_nothing(tmp_path, image, argv, error, match):
    out = tmp_path / "never"
    argv = [a.replace("MISSING", str(tmp_path / "missing.png")) for a in argv]
    with pytest.raises(error, match=match):
        _run(str(image), *argv, "--out", str(out))
    assert not out.exists()


def test_unreadable_inputs_write_nothing(tmp_path, image):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG not really")
    out = tmp_path / "never"
    with pytest.raises(ValueError, match="cannot read a mask image"):
        _run(str(image), "--task", "mask_inpainting", "--param", f"mask_path={bad}", "--out", str(out))
    with pytest.raises(ValueError, match="cannot read an image"):
        _run(str(bad), "--task", "denoising", "--out", str(out))
    with pytest.raises(FileNotFoundError, match="image file not found"):
        _run(str(tmp_path / "none.png"), "--task", "denoising", "--out", str(out))
    assert not out.exists()


def test_mask_size_mismatch_writes_nothing(tmp_path, image):
    from PIL import Image

    Image.fromarray(np.zeros((20, 20), dtype=np.uint8)).save(tmp_path / "small.png")
    out = tmp_path / "never"
    with pytest.raises(ValueError, match="is 20x20 but the image is 40x36"):
        _run(str(image), "--task", "mask_inpainting", "--param", f"mask_path={tmp_path / 'small.png'}",
             "--out", str(out))
    assert not out.exists()


def test_list(capsys):
    assert _run("--list") == 0
    text = capsys.readouterr().out
    assert "gaussian_blur:" in text and "dps-256:" in text and "psld-512:" in text


def test_registered_in_cli():
    from hessdiff.scripts import cli

    assert "hessdiff.scripts.cmd_degrade" in cli.COMMAND_MODULES


def test_through_cli_main(tmp_path, image, monkeypatch, capsys):
    """The ``hessdiff`` entry point: exit 0 on success, exit 2 with a one-line error on bad input."""
    from hessdiff.scripts import cli

    monkeypatch.setattr(cli, "COMMAND_MODULES", ("hessdiff.scripts.cmd_degrade",))
    out = tmp_path / "cli"
    assert cli.main(["degrade", str(image), "--task", "denoising", "--out", str(out)]) == 0
    assert cli.main(["degrade", str(image), "--task", "denoising", "--out", str(out)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert cli.main(["degrade", str(image), "--task", "super_resolution", "--param", "scale=7",
                     "--out", str(tmp_path / "x")]) == 2
    assert "scale 7 does not divide the image size 40x36" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def _cli(*argv: str) -> int:
    from hessdiff.scripts.cli import main

    return main(["degrade", *argv])


def test_dashed_task_names_are_accepted(tmp_path, image, capsys):
    out = tmp_path / "out"
    assert _cli(str(image), "--task", "gaussian-blur", "--param", "kernel_size=5", "--out", str(out)) == 0
    assert load_measurement(out / "measurement.pt").task == "gaussian_blur"
    assert _cli(str(image), "--task", "gausian-blur", "--out", str(tmp_path / "o2")) == 2
    err = capsys.readouterr().err
    assert "did you mean 'gaussian-blur'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o2").exists()


def test_out_under_a_file_is_one_clear_error(tmp_path, image, capsys):
    blocker = tmp_path / "somefile"
    blocker.write_text("keep me")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert _cli(str(image), "--task", "denoising", "--out", str(blocker / "x")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "somefile is a file, not a folder" in err and "Traceback" not in err
    assert blocker.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == before


def test_pickled_kernel_file_is_one_clear_error(tmp_path, image, capsys):
    import pickle

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(Payload()))
    out = tmp_path / "out"
    assert _cli(str(image), "--task", "kernel_blur", "--param", f"kernel={evil}", "--out", str(out)) == 2
    captured = capsys.readouterr()
    assert "pwned" not in captured.out
    err = captured.err
    assert err.count("\n") == 1 and "pickled Python objects" in err and "weights_only" not in err
    assert not out.exists()
