"""``hessdiff restore``: outputs and their reproducibility, model sources (local folder, in-memory pipeline,
latent and text-conditional pipelines, hub id offline), and bad input that must fail cleanly (exit code 2,
nothing left behind)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from hessdiff.samplers.defaults import method_defaults
from hessdiff.scripts import _common, cli, cmd_restore
from hessdiff.tasks import load_measurement, make_task
from hessdiff.utils.images import load_image

EXAMPLE_DIGIT = "mnist_test_150_digit3.png"  # the README's example
EXAMPLE_LABEL = 3


# ------------------------------------------------------------------------------------------ fixtures
def _tiny_unet(channels: int = 1, size: int = 32):
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, block_out_channels=(4, 8),
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)


def _tiny_pipeline(channels: int = 1, size: int = 32):
    from diffusers import DDPMPipeline, DDPMScheduler

    torch.manual_seed(0)  # weight init of the test model only
    return DDPMPipeline(unet=_tiny_unet(channels, size), scheduler=DDPMScheduler())


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=1, out_channels=1, latent_channels=2, block_out_channels=(4, 8),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=4, sample_size=32, scaling_factor=0.5)


@pytest.fixture(scope="module")
def pixel_model_dir(tmp_path_factory):
    """A random-init 1x32x32 DDPMPipeline saved with save_pretrained (diffusers pipeline layout)."""
    path = tmp_path_factory.mktemp("tiny-ddpm")
    _tiny_pipeline().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def latent_model_dir(tmp_path_factory):
    """A tiny latent model: AutoencoderKL 1x32x32 -> 2x16x16 and a UNet on the latents (unet/, vae/, scheduler/)."""
    from diffusers import DDIMScheduler

    path = tmp_path_factory.mktemp("tiny-ldm")
    torch.manual_seed(0)
    _tiny_unet(channels=2, size=16).save_pretrained(path / "unet")
    _tiny_vae().save_pretrained(path / "vae")
    DDIMScheduler().save_pretrained(path / "scheduler")
    return path


@pytest.fixture(scope="module")
def text_model_dir(tmp_path_factory):
    """A tiny Stable-Diffusion-like folder: conditional UNet, VAE, CLIP text encoder and tokenizer."""
    from diffusers import PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    path = tmp_path_factory.mktemp("tiny-sd")
    torch.manual_seed(0)
    UNet2DConditionModel(sample_size=16, in_channels=2, out_channels=2, block_out_channels=(8, 16),
                         layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
                         attention_head_dim=2, norm_num_groups=4).save_pretrained(path / "unet")
    _tiny_vae().save_pretrained(path / "vae")
    PNDMScheduler(skip_prk_steps=True).save_pretrained(path / "scheduler")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    raw = path / "raw-tokenizer"
    raw.mkdir()
    (raw / "vocab.json").write_text(json.dumps(vocab))
    (raw / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(raw / "vocab.json"), str(raw / "merges.txt"), model_max_length=8).save_pretrained(
        path / "tokenizer")
    cfg = CLIPTextConfig(vocab_size=len(vocab), hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=8, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1)
    CLIPTextModel(cfg).save_pretrained(path / "text_encoder")
    return path


@pytest.fixture
def digit_png(tmp_path):
    """A 32x32 grey digit-like PNG (a bright bar on black)."""
    from PIL import Image

    arr = np.zeros((32, 32), dtype=np.uint8)
    arr[6:26, 14:19] = 255
    arr[6:10, 9:24] = 200
    path = tmp_path / "digit.png"
    Image.fromarray(arr).save(path)
    return path


def _main(*argv: str) -> int:
    return cli.main(["restore", *argv])


FAST = ("--steps", "3", "--device", "cpu", "--quiet")
NAMES = ["comparison.png", "measurement.png", "measurement.pt", "metrics.json", "restored.png"]


def _png(path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im).copy()


# ------------------------------------------------------------------------------------------ happy paths
def test_restore_writes_reproducible_outputs(tmp_path, digit_png, pixel_model_dir, capsys):
    out = tmp_path / "out"
    rc = _main(str(digit_png), "--task", "box-inpainting", "--param", "box_size=10", "--method", "dps",
               "--model", str(pixel_model_dir), "--seed", "3", "--out", str(out), *FAST)
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == NAMES
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("wrote ") and str(out / "restored.png") in last and str(out / "comparison.png") in last

    # the measurement file is exactly what the task makes for this image and seed
    x = load_image(digit_png)
    m = load_measurement(out / "measurement.pt")
    ref = make_task("box_inpainting", box_size=10).measure(x, seed=3)
    assert m.seeds == [3] and m.params["box_size"] == 10
    assert torch.equal(m.y, ref.y) and torch.equal(m.operator.mask, ref.operator.mask)

    # the restoration is what the library function computes from the same model, measurement and seed
    model = _common.load_model_for_cli(str(pixel_model_dir), torch.device("cpu"), torch.float32)
    res = cmd_restore.restore_image(model, ref, method="dps", steps=3, seed=3)
    from hessdiff.utils.images import to_uint8_array

    assert np.array_equal(_png(out / "restored.png"), to_uint8_array(res.restored))
    assert res.cost.nfe == 3 and res.cost.network_forward == 3 and res.cost.network_backward == 3

    # the comparison shows input | measurement | restoration, enlarged with nearest neighbour
    comp = _png(out / "comparison.png")
    assert comp.ndim == 3 and comp.shape[0] >= 128 and comp.shape[1] >= 3 * 128
    report = json.loads((out / "metrics.json").read_text())
    from hessdiff.eval.metrics import psnr

    expect = float(psnr(res.restored.repeat(1, 3, 1, 1), x.repeat(1, 3, 1, 1))[0])
    assert report["metrics_vs_input"]["psnr"] == pytest.approx(expect, rel=1e-6)
    assert report["cost"]["nfe"] == 3 and report["method"] == "dps"
    # nothing else (no temporary files) in the folder
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_stsl_options_and_progress(tmp_path, digit_png, pixel_model_dir, capsys):
    out = tmp_path / "o"
    rc = _main(str(digit_png), "--task", "random_inpainting", "--param", "drop=0.5", "--model", str(pixel_model_dir),
               "--method", "stsl", "--option", "inner_steps=1", "--option", "eta=0.05", "--steps", "2",
               "--device", "cpu", "--out", str(out))
    assert rc == 0
    captured = capsys.readouterr()
    report = json.loads((out / "metrics.json").read_text())
    assert report["method"] == "stsl"
    # a folder model has no family: its defaults are the table's published row (the pipeline's too)
    published = {k: v for k, v in method_defaults("stsl", None).items() if k != "steps"}
    assert report["options"] == {**published, "inner_steps": 1, "eta": 0.05}
    # STSL: 1 inner step x 2 steps, each inner step 2 forwards (denoiser + trace probe), plus 1 per DDIM step
    assert report["cost"]["nfe"] == 2 and report["cost"]["network_forward"] == 2 * (2 + 1)
    assert "PSNR" in captured.out and "NFE 2" in captured.out
    assert "step" in captured.err  # the tqdm bar goes to stderr, stdout keeps the results


def test_default_methods():
    assert cmd_restore.default_method(is_latent=False) == "dps"
    assert cmd_restore.default_method(is_latent=True) == "stsl"


def test_in_memory_pipeline_matches_saved_folder(tmp_path, digit_png):
    """``model_from_pipeline`` (an in-memory diffusers pipeline) and the same pipeline saved and loaded back
    through ``--model FOLDER`` give the same restoration."""
    pipe = _tiny_pipeline()
    folder = tmp_path / "pipe"
    pipe.save_pretrained(folder)
    model = _common.model_from_pipeline(pipe)
    m = make_task("super_resolution", scale=2).measure(load_image(digit_png), seed=1)
    res = cmd_restore.restore_image(model, m, method="stsl", steps=2, seed=1, options={"inner_steps": 1})
    out = tmp_path / "out"
    assert _main(str(digit_png), "--task", "super-resolution", "--param", "scale=2", "--method", "stsl",
                 "--option", "inner_steps=1", "--steps", "2", "--seed", "1", "--model", str(folder),
                 "--out", str(out), "--device", "cpu", "--quiet") == 0
    from hessdiff.utils.images import to_uint8_array

    assert np.array_equal(_png(out / "restored.png"), to_uint8_array(res.restored))
    assert _png(out / "measurement.png").shape == (16, 16)
    other = cmd_restore.restore_image(model, m, method="stsl", steps=2, seed=2, options={"inner_steps": 1})
    assert not torch.equal(res.restored, other.restored)  # the sampler's seed matters


def test_latent_model_psld_and_stsl(tmp_path, digit_png, latent_model_dir):
    for method in ("psld", "stsl", "latent_dps"):
        out = tmp_path / method
        opts = ("--option", "inner_steps=1") if method == "stsl" else ()
        assert _main(str(digit_png), "--task", "gaussian-blur", "--param", "kernel_size=5", "--param", "std=1.0",
                     "--method", method, "--model", str(latent_model_dir), "--out", str(out), *opts, *FAST) == 0
        report = json.loads((out / "metrics.json").read_text())
        assert report["space"] == "latent" and report["cost"]["decoder_forward"] > 0
        assert _png(out / "restored.png").shape == (32, 32)


def test_latent_model_covariance_aware_methods(tmp_path, digit_png, latent_model_dir):
    # MMPS, ΠGDM and TMPD apply the decoder's Jacobian by forward-mode AD; the VAE's decoder has a mid-block
    # attention layer in float32, whose fused CPU kernel has no forward-mode rule (they must still run)
    for method in ("mmps", "pigdm", "tmpd"):
        out = tmp_path / method
        assert _main(str(digit_png), "--task", "gaussian-blur", "--param", "kernel_size=5", "--param", "std=1.0",
                     "--method", method, "--model", str(latent_model_dir), "--out", str(out), *FAST) == 0
        report = json.loads((out / "metrics.json").read_text())
        assert report["space"] == "latent" and report["cost"]["decoder_backward"] > 0
        assert _png(out / "restored.png").shape == (32, 32)


def test_latent_x0_clamp_is_not_applied_to_latents():
    # clip_x0 is an image range ([-1, 1]); with an autoencoder x0_hat is a latent and must not be clamped
    from hessdiff.samplers.guidance.mmps import MMPSDenoiser

    class Dec:
        def decode(self, z):
            return 3.0 * z

    class Den:
        schedule = object()

    op = lambda x: x  # noqa: E731
    y = torch.zeros(1, 4)
    assert MMPSDenoiser(Den(), op, y, 0.1, clip_x0=1.0).clip_x0 == 1.0
    assert MMPSDenoiser(Den(), op, y, 0.1, autoencoder=Dec(), clip_x0=1.0).clip_x0 is None

def test_text_conditional_model_uses_its_text_encoder(tmp_path, digit_png, text_model_dir):
    out = tmp_path / "sd"
    assert _main(str(digit_png), "--task", "box-inpainting", "--param", "box_size=8", "--method", "psld",
                 "--model", str(text_model_dir), "--prompt", "a digit", "--out", str(out), *FAST) == 0
    assert _png(out / "restored.png").shape == (32, 32)
    model = _common.load_model_for_cli(str(text_model_dir), torch.device("cpu"), torch.float32)
    pos, neg = _common.text_conditioning(model, "a digit")
    assert pos.shape == (1, 8, 8) and not torch.equal(pos, neg)


def test_resize_note_and_rgb_to_grey(tmp_path, pixel_model_dir, capsys):
    from PIL import Image

    rng = np.random.default_rng(0)
    path = tmp_path / "odd.png"
    Image.fromarray(rng.integers(0, 256, size=(37, 31, 3), dtype=np.uint8)).save(path)
    out = tmp_path / "o"
    assert _main(str(path), "--task", "denoising", "--method", "dps", "--model", str(pixel_model_dir),
                 "--out", str(out), "--steps", "2", "--device", "cpu") == 0
    text = capsys.readouterr().out
    assert "37x31" in text and "resized" in text and "--no-resize" in text
    assert tuple(load_measurement(out / "measurement.pt").x_shape) == (1, 1, 32, 32)


def test_help_shows_examples(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["restore", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and "hessdiff restore" in text and "--no-resize" in text
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    top = capsys.readouterr().out
    assert "restore" in top and "sample" in top


def _embedded_ready() -> bool:
    from hessdiff.samplers.models import assets_path

    return (assets_path() / "models" / "mnist-ddpm" / "unet").is_dir()


@pytest.mark.skipif(not _embedded_ready(), reason="the embedded model assets/models/mnist-ddpm is not trained yet")
def test_readme_main_job_restores_the_digit(tmp_path):
    """The README's main job (embedded model, default method and steps): the restoration is recognised as
    the input's digit by the embedded classifier and is structurally closer to the input than the measurement."""
    from hessdiff.samplers.models import assets_path, load_classifier

    image = assets_path() / "examples" / EXAMPLE_DIGIT
    out = tmp_path / "digit3"
    assert _main(str(image), "--task", "box-inpainting", "--param", "box_size=10", "--out", str(out),
                 "--device", "cpu", "--quiet") == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["method"] == "dps" and report["steps"] == cmd_restore.DEFAULT_STEPS
    assert report["metrics_vs_input"]["ssim"] > report["measurement_metrics_vs_input"]["ssim"]
    with torch.no_grad():
        logits = load_classifier()(load_image(out / "restored.png"))
    assert int(logits.argmax()) == EXAMPLE_LABEL


@pytest.mark.skipif(not _embedded_ready(), reason="the embedded models are not trained yet")
def test_readme_main_job_restores_the_fashion_item(tmp_path):
    """The README's main job: MMPS on the embedded Fashion-MNIST model with its embedded-model defaults (20
    steps); the restoration is recognised as a sneaker by the embedded Fashion classifier and is closer to the
    input than the measurement, in PSNR and SSIM."""
    from hessdiff.samplers.models import assets_path, load_classifier

    image = assets_path() / "examples" / "fashion_test_0004_class7.png"
    out = tmp_path / "sneaker"
    assert _main(str(image), "--model", "fashion", "--method", "mmps", "--task", "box-inpainting", "--param",
                 "box_size=10", "--out", str(out), "--device", "cpu", "--quiet") == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["method"] == "mmps" and report["steps"] == 20
    got, meas = report["metrics_vs_input"], report["measurement_metrics_vs_input"]
    assert got["ssim"] > meas["ssim"] and got["psnr"] > meas["psnr"] + 2
    with torch.no_grad():
        logits = load_classifier("hessdiff/fashion-classifier")(load_image(out / "restored.png"))
    assert int(logits.argmax()) == 7


# ------------------------------------------------------------------------------------------ bad input
def _unreadable(tmp_path):
    p = tmp_path / "broken.png"
    p.write_bytes(b"this is not a PNG file")
    return p


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing-image", "not found"),
        ("unreadable-image", "cannot read"),
        ("unknown-method", "unknown method"),
        ("unknown-task", "unknown task"),
        ("unknown-option", "unknown option"),
        ("negative-step-size", "option 'zeta' of method 'dps' must be a finite non-negative number"),
        ("negative-gate", "option 'gate_sigma' of method 'mmps' must be a finite non-negative number"),
        ("bad-param", "unknown parameter"),
        ("no-resize", "--no-resize"),
        ("box-too-large", "does not fit"),
        ("latent-method-on-pixel-model", "latent space"),
        ("out-under-a-file", "is a file"),
        ("bad-device", "--device"),
        ("bad-dtype", "--dtype"),
        ("corrupt-model-folder", "cannot load the model"),
        ("missing-model-folder", "not found"),
    ],
)
def test_bad_input_fails_cleanly(case, message, tmp_path, digit_png, pixel_model_dir, capsys):
    from PIL import Image

    image = str(digit_png)
    out = tmp_path / "out"
    extra: list[str] = []
    task = ["--task", "box_inpainting", "--param", "box_size=8"]
    if case == "missing-image":
        image = str(tmp_path / "nope.png")
    elif case == "unreadable-image":
        image = str(_unreadable(tmp_path))
    elif case == "unknown-method":
        extra = ["--method", "magic"]
    elif case == "unknown-task":
        task = ["--task", "colorization"]
    elif case == "unknown-option":
        extra = ["--method", "dps", "--option", "lam=3"]
    elif case == "negative-step-size":
        extra = ["--method", "dps", "--option", "zeta=-1"]
    elif case == "negative-gate":
        extra = ["--method", "mmps", "--option", "gate_sigma=-0.5"]
    elif case == "bad-param":
        task = ["--task", "box_inpainting", "--param", "size=8"]
    elif case == "no-resize":
        big = tmp_path / "big.png"
        Image.fromarray(np.zeros((40, 40), dtype=np.uint8)).save(big)
        image, extra = str(big), ["--no-resize"]
    elif case == "box-too-large":
        task = ["--task", "box_inpainting", "--param", "box_size=40"]  # a 40x40 box in a 32x32 image
    elif case == "latent-method-on-pixel-model":
        extra = ["--method", "psld"]
    elif case == "out-under-a-file":
        blocker = tmp_path / "file.txt"
        blocker.write_text("x")
        out = blocker / "sub"
    elif case == "bad-device":
        extra = ["--device", "tpu"]
    elif case == "bad-dtype":
        extra = ["--dtype", "int8"]
    elif case == "corrupt-model-folder":
        bad = tmp_path / "bad-model"
        (bad / "unet").mkdir(parents=True)
        (bad / "unet" / "config.json").write_text("{not json")
        extra = ["--model", str(bad)]
    elif case == "missing-model-folder":
        extra = ["--model", str(tmp_path / "no-model-here")]
    before = sorted(p.name for p in tmp_path.iterdir())
    rc = _main(image, *task, "--model", str(pixel_model_dir), "--out", str(out), "--steps", "2", *extra)
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and "Traceback" not in err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("task, expect", [("box-inpainting", {"box_size": 16}), ("super-resolution", {"scale": 2}),
                                          ("gaussian-blur", {"kernel_size": 9, "std": 1.0})])
def test_task_defaults_follow_the_model_resolution(task, expect, tmp_path, digit_png, pixel_model_dir, capsys):
    out = tmp_path / "o"
    rc = _main(str(digit_png), "--task", task, "--model", str(pixel_model_dir), "--out", str(out),
               "--steps", "2", "--device", "cpu")
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    m = load_measurement(out / "measurement.pt")
    assert {k: m.params[k] for k in expect} == expect
    line = next(s for s in captured.out.splitlines() if s.startswith("task "))
    assert all(f"{k}={v}" in line for k, v in expect.items())  # the parameters used are printed
    # an explicit --param still wins
    assert _main(str(digit_png), "--task", "box-inpainting", "--param", "box_size=6", "--model", str(pixel_model_dir),
                 "--out", str(tmp_path / "o2"), *FAST) == 0
    assert load_measurement(tmp_path / "o2" / "measurement.pt").params["box_size"] == 6


def test_pixel_limit_is_a_clear_error(tmp_path, digit_png, pixel_model_dir, capsys):
    out = tmp_path / "o"
    rc = _main(str(digit_png), "--task", "denoising", "--model", str(pixel_model_dir), "--out", str(out),
               "--max-pixels", "1000", *FAST)
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "32x32 = 0.0 MP, more than the limit" in err and "--max-pixels" in err
    assert not out.exists()
    assert _main(str(digit_png), "--task", "denoising", "--model", str(pixel_model_dir), "--out", str(out),
                 "--max-pixels", "1024", *FAST) == 0


def test_example_flag_uses_the_shipped_images(tmp_path, pixel_model_dir, capsys):
    assert _main("--example", "list") == 0
    listing = capsys.readouterr().out
    names = cmd_restore.example_images()
    assert EXAMPLE_DIGIT in [p.name for p in names] and all(f"{i}  {p.name}" in listing for i, p in enumerate(names))
    k = [p.name for p in names].index(EXAMPLE_DIGIT)
    out = tmp_path / "o"
    assert _main("--example", str(k), "--task", "denoising", "--model", str(pixel_model_dir), "--out", str(out),
                 *FAST) == 0
    assert json.loads((out / "metrics.json").read_text())["image"].endswith(EXAMPLE_DIGIT)
    assert _main("--example", "99", "--task", "denoising", "--out", str(tmp_path / "o2"), *FAST) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "choose N from 0 to" in err and not (tmp_path / "o2").exists()


def test_unwritable_output_folder(tmp_path, digit_png, pixel_model_dir, monkeypatch, capsys):
    out = tmp_path / "ro"
    out.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if os.fspath(p) == str(out) else real(p, mode, **kw))
    rc = _main(str(digit_png), "--task", "denoising", "--model", str(pixel_model_dir), "--out", str(out), *FAST)
    assert rc == 2 and "not writable" in capsys.readouterr().err
    assert list(out.iterdir()) == []


def test_hub_id_without_network_says_so(tmp_path, digit_png, monkeypatch, capsys):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "hub"
    rc = _main(str(digit_png), "--task", "denoising", "--model", "hessdiff-tests/no-such-model", "--out", str(out),
               *FAST)
    err = capsys.readouterr().err
    assert rc == 2
    assert "no network" in err and "hessdiff-tests/no-such-model" in err
    assert not out.exists()


def test_existing_outputs_are_kept_without_overwrite(tmp_path, digit_png, pixel_model_dir, capsys):
    out = tmp_path / "o"
    args = (str(digit_png), "--task", "denoising", "--method", "dps", "--model", str(pixel_model_dir),
            "--out", str(out), *FAST)
    assert _main(*args) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert _main(*args[:-len(FAST)], "--steps", "2", "--device", "cpu", "--quiet") == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _main(*args, "--overwrite") == 0


def test_overwrite_with_a_folder_among_the_targets_replaces_nothing(tmp_path, digit_png, pixel_model_dir, capsys):
    out = tmp_path / "o"
    args = (str(digit_png), "--task", "denoising", "--model", str(pixel_model_dir), "--out", str(out), *FAST)
    assert _main(*args) == 0
    (out / "metrics.json").unlink()
    (out / "metrics.json").mkdir()
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    assert _main(*args, "--overwrite", "--seed", "1") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "metrics.json" in err and "folder of that name is in the way" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert (out / "metrics.json").is_dir()


def test_failures_during_the_run_leave_nothing(tmp_path, digit_png, pixel_model_dir, monkeypatch):
    out = tmp_path / "deep" / "out"

    def boom(*a, **k):
        raise RuntimeError("sampler exploded")

    monkeypatch.setattr(cmd_restore, "restore_image", boom)
    with pytest.raises(RuntimeError, match="exploded"):
        _main(str(digit_png), "--task", "denoising", "--model", str(pixel_model_dir), "--out", str(out), *FAST)
    assert not (tmp_path / "deep").exists()


def test_failing_write_leaves_no_partial_files(tmp_path, digit_png, pixel_model_dir, monkeypatch):
    out = tmp_path / "o"
    out.mkdir()
    real = _common.png_writer
    calls = {"n": 0}

    def flaky(picture):
        calls["n"] += 1
        if calls["n"] == 3:  # the third PNG fails after the first two were written to temporary files
            def fail(tmp):
                raise OSError("disk full")
            return fail
        return real(picture)

    monkeypatch.setattr(_common, "png_writer", flaky)
    with pytest.raises(OSError, match="disk full"):
        _main(str(digit_png), "--task", "denoising", "--method", "dps", "--model", str(pixel_model_dir),
              "--out", str(out), *FAST)
    assert list(out.iterdir()) == []
