"""``hessdiff sample``: per-seed images that depend only on their seed, the grid, LML samplers, latent models,
and bad input that must fail cleanly (exit code 2, nothing left behind)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hessdiff.scripts import _common, cli, cmd_sample


def _tiny_unet(channels: int = 1, size: int = 32):
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, block_out_channels=(4, 8),
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)


@pytest.fixture(scope="module")
def pixel_model_dir(tmp_path_factory):
    """A random-init 1x32x32 DDPMPipeline saved with save_pretrained."""
    from diffusers import DDPMPipeline, DDPMScheduler

    path = tmp_path_factory.mktemp("tiny-ddpm-sample")
    torch.manual_seed(0)  # weight init of the test model only
    DDPMPipeline(unet=_tiny_unet(), scheduler=DDPMScheduler()).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def latent_model_dir(tmp_path_factory):
    from diffusers import AutoencoderKL, DDIMScheduler

    path = tmp_path_factory.mktemp("tiny-ldm-sample")
    torch.manual_seed(0)
    _tiny_unet(channels=2, size=16).save_pretrained(path / "unet")
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=2, block_out_channels=(4, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, sample_size=32, scaling_factor=0.5)
    vae.save_pretrained(path / "vae")
    DDIMScheduler().save_pretrained(path / "scheduler")
    return path


def _main(*argv: str) -> int:
    return cli.main(["sample", *argv])


def _png(path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im).copy()


FAST = ("--steps", "3", "--device", "cpu", "--quiet")


def test_sample_writes_grid_and_one_png_per_seed(tmp_path, pixel_model_dir, capsys):
    out = tmp_path / "s"
    assert _main("--model", str(pixel_model_dir), "--seeds", "0-3", "--out", str(out), "--steps", "3",
                 "--device", "cpu") == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["grid.png", "seed0000.png", "seed0001.png", "seed0002.png", "seed0003.png"]
    text = capsys.readouterr().out
    assert "NFE 3 per image" in text
    assert text.strip().splitlines()[-1].startswith(f"wrote {out / 'grid.png'}")
    tiles = [_png(out / f"seed{s:04d}.png") for s in range(4)]
    assert all(t.shape == (32, 32) and t.dtype == np.uint8 for t in tiles)
    grid = _png(out / "grid.png")
    # 2x2 tiles of 32 px enlarged twice (nearest neighbour) with a 2 px gap
    assert grid.shape == (2 * 64 + 2, 2 * 64 + 2, 3)
    assert np.array_equal(grid[:64:2, :64:2, 0], tiles[0]) and np.array_equal(grid[66::2, 66::2, 0], tiles[3])
    # the files hold what the library function computes
    model = _common.load_model_for_cli(str(pixel_model_dir), torch.device("cpu"), torch.float32)
    images, rep = cmd_sample.sample_images(model, [0, 1, 2, 3], steps=3)
    from hessdiff.utils.images import to_uint8_array

    assert rep["nfe"] == 3 and rep["sampler"] == "dpm++"
    assert all(np.array_equal(tiles[i], to_uint8_array(images[i:i + 1])) for i in range(4))


def test_image_depends_only_on_its_seed(tmp_path, pixel_model_dir):
    """Stochastic DDIM (eta = 1): seed 5's image is the same alone, in a batch, or in another batch layout."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert _main("--model", str(pixel_model_dir), "--sampler", "ddim", "--eta", "1", "--seeds", "5,2",
                 "--batch-size", "1", "--out", str(a), *FAST) == 0
    assert _main("--model", str(pixel_model_dir), "--sampler", "ddim", "--eta", "1", "--seeds", "0-5",
                 "--batch-size", "4", "--out", str(b), *FAST) == 0
    for s in (2, 5):
        assert np.array_equal(_png(a / f"seed{s:04d}.png"), _png(b / f"seed{s:04d}.png"))
    assert not np.array_equal(_png(b / "seed0002.png"), _png(b / "seed0005.png"))


@pytest.mark.parametrize("sampler, extra", [
    ("lml-published", ("--solver", "dpm", "--lml-option", "lamb=8e-4")),
    ("lml-hessian-step", ()),
    ("lml-matched-noise", ("--solver", "ddim")),
])
def test_lml_samplers(sampler, extra, tmp_path, pixel_model_dir, capsys):
    out = tmp_path / sampler
    assert _main("--model", str(pixel_model_dir), "--sampler", sampler, *extra, "--seeds", "0-1", "--out", str(out),
                 "--steps", "4", "--device", "cpu") == 0
    text = capsys.readouterr().out
    assert "NFE 4 per image" in text and "Correction(" in text
    if sampler == "lml-published":
        assert "lamb=0.0008" in text
    if sampler == "lml-hessian-step":  # the command's default for networks; --lml-option radial=keep overrides
        assert "radial='exclude'" in text
        assert _main("--model", str(pixel_model_dir), "--sampler", sampler, "--lml-option", "radial=keep", "--seeds",
                     "0", "--out", str(tmp_path / "keep"), "--steps", "4", "--device", "cpu") == 0
        assert "radial='keep'" in capsys.readouterr().out


def test_lml_stats_sampler_uses_the_model_statistics(tmp_path, pixel_model_dir, capsys):
    """``lml-stats``: the model folder's lml_stats.safetensors (the embedded MNIST DDPM ships one), zero extra
    evaluations, a different image than its base; a model without a file exits 2 naming the command."""
    model = _common.load_model_for_cli("mnist", torch.device("cpu"), torch.float32)
    base, _ = cmd_sample.sample_images(model, [0, 1], sampler="unipc", steps=4)
    lml, rep = cmd_sample.sample_images(model, [0, 1], sampler="lml-stats", solver="unipc", steps=4)
    assert rep["correction"] == "stats" and rep["nfe"] == 4 and not rep["extra"]
    assert "lml_stats.safetensors" in rep["correction_repr"] or "StatsSource" in rep["correction_repr"]
    assert torch.isfinite(lml).all() and (lml - base).abs().max() > 1e-3
    assert _main("--model", str(pixel_model_dir), "--sampler", "lml-stats", "--seeds", "0", "--out",
                 str(tmp_path / "none"), *FAST) == 2
    err = capsys.readouterr().err
    assert "no LML statistics at" in err and "python -m hessdiff.scripts.lml_stats" in err
    assert not (tmp_path / "none").exists()
    assert _main("--model", "mnist", "--sampler", "lml-stats", "--lml-option", f"stats={tmp_path / 'x.st'}",
                 "--seeds", "0", "--out", str(tmp_path / "none2"), *FAST) == 2
    assert f"no LML statistics at {tmp_path / 'x.st'}" in capsys.readouterr().err


def test_lml_cov_sampler_uses_the_shipped_data_covariance(tmp_path, capsys):
    """``lml-cov``: the model folder's lml_cov.safetensors (shipped for the embedded pixel models), zero extra
    evaluations; an image different from the base solver's."""
    model = _common.load_model_for_cli("fashion", torch.device("cpu"), torch.float32)
    base, _ = cmd_sample.sample_images(model, [0], sampler="unipc", steps=3)
    lml, rep = cmd_sample.sample_images(model, [0], sampler="lml-cov", solver="unipc", steps=3)
    assert rep["correction"] == "cov" and rep["nfe"] == 3 and not rep["extra"]
    assert "DataCovarianceSource" in rep["correction_repr"]
    assert torch.isfinite(lml).all() and (lml - base).abs().max() > 1e-2
    assert _main("--model", "fashion", "--sampler", "lml-cov", "--lml-option", f"stats={tmp_path / 'x.st'}",
                 "--seeds", "0", "--out", str(tmp_path / "none"), *FAST) == 2
    assert f"no data covariance at {tmp_path / 'x.st'}" in capsys.readouterr().err


def test_sampler_auto_takes_the_defaults_table_recommendation(tmp_path, pixel_model_dir, capsys):
    from hessdiff import recommended_sampler
    from hessdiff.samplers.models import assets_path

    # the table: the covariance step on UniPC at low step counts for the embedded pixel models, plain UniPC above
    assert recommended_sampler("fashion", 5) == ("lml-cov", "unipc") == recommended_sampler("hessdiff/mnist-ddpm", 10)
    assert recommended_sampler("fashion", 11) == ("unipc", None)
    assert recommended_sampler("fashion-ldm", 6) == ("lml-cov", "unipc")  # latent: the VAE latents' covariance
    assert recommended_sampler("fashion-ldm", 8) == ("unipc", None) == recommended_sampler("mnist-ldm", 5)
    assert recommended_sampler(str(assets_path() / "models" / "fashion-ddpm"), 6) == ("lml-cov", "unipc")
    # anything else: the published row (diffusers' default), a copy of an embedded folder elsewhere included
    assert recommended_sampler("google/ddpm-cifar10-32", 5) == ("dpm++", None)
    assert recommended_sampler(str(pixel_model_dir), 5) == ("dpm++", None)
    assert _main("--model", "fashion", "--sampler", "auto", "--steps", "3", "--seeds", "0",
                 "--out", str(tmp_path / "a"), "--quiet") == 0
    model = _common.load_model_for_cli("fashion", torch.device("cpu"), torch.float32)
    lml, _ = cmd_sample.sample_images(model, [0], sampler="lml-cov", solver="unipc", steps=3)
    from PIL import Image

    from hessdiff.utils.images import to_uint8_array

    got = torch.from_numpy(np.asarray(Image.open(tmp_path / "a" / "seed0000.png"), dtype=np.float32))
    want = torch.from_numpy(np.asarray(to_uint8_array(lml[0]), dtype=np.float32))
    assert torch.equal(got.reshape(want.shape), want)  # the same image as lml-cov on unipc
    # the library function resolves "auto" the same way (the CLI only prints it)
    auto, rep = cmd_sample.sample_images(model, [0], sampler="auto", steps=3)
    assert torch.equal(auto, lml) and rep["auto"] and (rep["sampler"], rep["correction"]) == ("unipc", "cov")
    assert _main("--model", str(pixel_model_dir), "--sampler", "auto", "--steps", "2", "--seeds", "0",
                 "--out", str(tmp_path / "b"), "--device", "cpu") == 0
    assert "sampler dpm++ (auto: the defaults table's choice" in capsys.readouterr().out
    with pytest.raises(cli.CLIError, match="--solver is chosen by --sampler auto"):
        cmd_sample.sample_images(model, [0], sampler="auto", solver="ddim", steps=3)


def test_latent_models_ship_their_lml_files_and_the_lml_samplers_use_them():
    """fashion-ldm: lml_cov / lml_stats of its VAE latents (256 numbers), zero extra evaluations each."""
    model = _common.load_model_for_cli("fashion-ldm", torch.device("cpu"), torch.float32)
    base, _ = cmd_sample.sample_images(model, [0], sampler="unipc", steps=3)
    for sampler, source in (("lml-cov", "DataCovarianceSource"), ("lml-stats", "StatsSource")):
        img, rep = cmd_sample.sample_images(model, [0], sampler=sampler, solver="unipc", steps=3)
        assert source in rep["correction_repr"] and rep["nfe"] == 3 and not rep["extra"]
        assert torch.isfinite(img).all() and (img - base).abs().max() > 1e-3


def test_published_lml_float64_is_the_base_solver(pixel_model_dir):
    """The published correction is the identity in exact arithmetic (kappa = 0): in float64 precision the
    LML sampler reproduces the base solver's images to float32 rounding."""
    model = _common.load_model_for_cli(str(pixel_model_dir), torch.device("cpu"), torch.float32)
    base, _ = cmd_sample.sample_images(model, [3, 4], sampler="dpm++", steps=4)
    lml, rep = cmd_sample.sample_images(model, [3, 4], sampler="lml-published", steps=4,
                                        lml_options={"precision": "float64"})
    assert rep["correction"] == "published"
    torch.testing.assert_close(lml, base, rtol=0, atol=1e-4)


def test_latent_model_decodes_to_rgb(tmp_path, latent_model_dir):
    out = tmp_path / "l"
    assert _main("--model", str(latent_model_dir), "--sampler", "ddim", "--seeds", "1", "--out", str(out), *FAST) == 0
    assert _png(out / "seed0001.png").shape == (32, 32, 3)


def test_help_shows_examples(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["sample", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and "hessdiff sample" in text and "lml-published" in text


def test_parse_seeds():
    assert _common.parse_seeds("0-3") == [0, 1, 2, 3]
    assert _common.parse_seeds("7, 2,4-5") == [7, 2, 4, 5]
    for bad in ("5-2", "a", "1,,2", "-3", "1,1"):
        with pytest.raises(cli.CLIError):
            _common.parse_seeds(bad)


@pytest.mark.parametrize("args, message", [
    (("--sampler", "heun"), "unknown sampler"),
    (("--sampler", "euler"), "flow-matching"),
    (("--sampler", "dpm++", "--eta", "1"), "--eta"),
    (("--sampler", "ddim", "--eta", "nan"), "--eta must be a finite non-negative number, got nan"),
    (("--sampler", "ddim", "--eta", "inf"), "--eta must be a finite non-negative number"),
    (("--sampler", "ddim", "--eta", "-0.5"), "--eta must be a finite non-negative number"),
    (("--seeds", "9-3"), "--seeds"),
    (("--sampler", "lml-published", "--lml-option", "lamb=-1"), "lamb"),
    (("--sampler", "lml-published", "--lml-option", "colour=1"), "--lml-option"),
    (("--lml-option", "lamb=1e-3"), "lml-"),
    (("--steps", "0"), "--steps"),
    (("--sampler", "auto", "--solver", "ddim"), "--solver is chosen by --sampler auto"),
    (("--prompt", "a cat"), "not text-conditional"),
    (("--model", "no/such-model-here"), "no network"),
])
def test_bad_input_fails_cleanly(args, message, tmp_path, pixel_model_dir, capsys, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "o"
    argv = ["--model", str(pixel_model_dir), *args] if "--model" not in args else list(args)
    rc = _main(*argv, "--out", str(out), "--device", "cpu")
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err
    assert not out.exists()


def test_output_under_a_file_and_existing_files(tmp_path, pixel_model_dir, capsys):
    blocker = tmp_path / "f"
    blocker.write_text("x")
    assert _main("--model", str(pixel_model_dir), "--out", str(blocker / "o"), *FAST) == 2
    assert "is a file" in capsys.readouterr().err
    out = tmp_path / "o"
    assert _main("--model", str(pixel_model_dir), "--seeds", "0", "--out", str(out), *FAST) == 0
    before = (out / "seed0000.png").read_bytes()
    assert _main("--model", str(pixel_model_dir), "--seeds", "0-1", "--out", str(out), *FAST) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "seed0000.png"]
    assert (out / "seed0000.png").read_bytes() == before
