"""PosteriorSamplingPipeline with tiny random-init diffusers components (offline, a few seconds each)."""

import json

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from hessdiff.samplers.diffusers.pipeline import PosteriorSamplingPipeline, VAEAutoencoder
from hessdiff.tasks.operators import Inpainting, SuperResolution


def _pixel_unet(size: int = 8) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=size, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(8, 16), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))


def _vae() -> AutoencoderKL:
    torch.manual_seed(1)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                         norm_num_groups=4, layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)


def _cond_unet() -> UNet2DConditionModel:
    torch.manual_seed(2)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=16,
                                attention_head_dim=4,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def _text(tmp_path):
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for i, c in enumerate("abcdefghijklmnopqrstuvwxyz"):
        vocab[c] = 3 + i
        vocab[c + "</w>"] = 29 + i
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=16)
    torch.manual_seed(3)
    enc = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                                       num_attention_heads=2, num_hidden_layers=1, max_position_embeddings=16,
                                       bos_token_id=0, eos_token_id=1, pad_token_id=1))
    return enc, tok


def _sr_measurement(size: int, scale: int = 2, batch: int = 1):
    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(4)) * 2 - 1
    op = SuperResolution(scale, filter="average")
    return op, op(x)


def test_pixel_pipeline_from_ddpm_pipe_dps_and_stsl():
    ddpm = DDPMPipeline(unet=_pixel_unet(), scheduler=DDPMScheduler(num_train_timesteps=100))
    pipe = PosteriorSamplingPipeline.from_pipe(ddpm)
    assert pipe.vae is None and pipe.unet is ddpm.unet
    op, y = _sr_measurement(8)
    out = pipe(y, op, method="dps", num_inference_steps=4, generator=torch.Generator().manual_seed(0),
               output_type="pt", progress=False)
    assert out.images.shape == (1, 3, 8, 8) and bool(torch.isfinite(out.images).all())
    c = out.cost
    assert (c.network_forward, c.network_backward, c.nfe) == (4, 4, 4)
    assert c.decoder_forward == 0
    # determinism with the same generator; a different one changes the sample
    again = pipe(y, op, method="dps", num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                 output_type="pt", progress=False).images
    torch.testing.assert_close(out.images, again)
    other = pipe(y, op, method="dps", num_inference_steps=4, generator=torch.Generator().manual_seed(1),
                 output_type="pt", progress=False).images
    assert not torch.allclose(out.images, other)
    out = pipe(y, op, method="stsl", num_inference_steps=3, generator=torch.Generator().manual_seed(0),
               method_kwargs={"lam": 0.5, "inner_steps": 2}, output_type="np", progress=False)
    assert out.images.shape == (1, 8, 8, 3) and 0 <= out.images.min() and out.images.max() <= 1
    assert out.cost.nfe == 3 * 2 and out.cost.network_forward == 3 * (2 * 2 + 1)


def test_latent_pipeline_psld_stsl_latent_dps(tmp_path):
    pipe = PosteriorSamplingPipeline(unet=_pixel_unet_latent(), scheduler=DDIMScheduler(num_train_timesteps=100),
                                     vae=_vae())
    mask = torch.ones(1, 1, 16, 16)
    mask[..., 4:12, 4:12] = 0
    op = Inpainting(mask)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1
    y = op(x)
    gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
    for method, kw in (("psld", {}), ("latent_dps", {}), ("stsl", {"lam": 0.1, "inner_steps": 1})):
        out = pipe(y, op, method=method, num_inference_steps=3, generator=gens, method_kwargs=kw,
                   output_type="pt", progress=False)
        assert out.images.shape == (2, 3, 16, 16) and bool(torch.isfinite(out.images).all()), method
        assert out.cost.decoder_forward >= 3 and out.cost.decoder_backward >= 3, method
    assert out.cost.encoder_forward == 1  # STSL's E(Aᵀy) initialisation
    lat = pipe(y, op, method="latent_dps", num_inference_steps=2, output_type="latent", progress=False).images
    assert lat.shape == (2, 4, 8, 8)


def _pixel_unet_latent() -> UNet2DModel:
    torch.manual_seed(6)
    return UNet2DModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                       block_out_channels=(8, 16), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))


def test_stable_diffusion_from_pipe_with_null_prompt_bf16_and_checkpointing(tmp_path):
    enc, tok = _text(tmp_path)
    sd = StableDiffusionPipeline(vae=_vae(), text_encoder=enc, tokenizer=tok, unet=_cond_unet(),
                                 scheduler=PNDMScheduler(num_train_timesteps=100, skip_prk_steps=True),
                                 safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = PosteriorSamplingPipeline.from_pipe(sd)
    assert pipe.text_encoder is enc and pipe.vae is sd.vae
    op, y = _sr_measurement(16)
    kw = {"lam": 0.1, "inner_steps": 1}
    ref = pipe(y, op, method="stsl", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
               method_kwargs=kw, output_type="pt", progress=False)
    ck = pipe(y, op, method="stsl", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
              method_kwargs=kw, output_type="pt", progress=False, gradient_checkpointing=True)
    torch.testing.assert_close(ref.images, ck.images, rtol=1e-5, atol=1e-5)  # checkpointing changes nothing
    prompted = pipe(y, op, method="stsl", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                    prompt="a cat", method_kwargs=kw, output_type="pt", progress=False).images
    assert not torch.allclose(prompted, ref.images)
    # bf16 network and VAE: guidance arithmetic stays float32, output finite
    pipe.unet.to(torch.bfloat16)
    pipe.vae.to(torch.bfloat16)
    out = pipe(y, op, method="psld", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
               output_type="pt", progress=False)
    assert out.images.dtype == torch.float32 and bool(torch.isfinite(out.images).all())


def test_pipeline_takes_a_task_or_a_measurement():
    from hessdiff.tasks import make_task

    pipe = PosteriorSamplingPipeline(unet=_pixel_unet(), scheduler=DDPMScheduler(num_train_timesteps=100))
    task = make_task("super_resolution", scale=2, filter="average")
    m = task.measure(torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1, seed=0)
    kw = dict(method="dps", num_inference_steps=3, output_type="pt", progress=False)
    a = pipe(m, **kw, generator=torch.Generator().manual_seed(0)).images
    b = pipe(m.y, task, **kw, generator=torch.Generator().manual_seed(0)).images
    c = pipe(m.y, m.operator, **kw, generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)


def test_save_pretrained_round_trip(tmp_path):
    pipe = PosteriorSamplingPipeline(unet=_pixel_unet(), scheduler=DDPMScheduler(num_train_timesteps=100))
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = PosteriorSamplingPipeline.from_pretrained(tmp_path / "pipe")
    assert loaded.vae is None and loaded.scheduler.config.num_train_timesteps == 100
    op, y = _sr_measurement(8)
    kw = dict(method="dps", num_inference_steps=3, output_type="pt", progress=False)
    a = pipe(y, op, generator=torch.Generator().manual_seed(0), **kw).images
    b = loaded(y, op, generator=torch.Generator().manual_seed(0), **kw).images
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_vae_autoencoder_scaling_and_shapes():
    vae = _vae()
    ae = VAEAutoencoder(vae)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    z = ae.encode(x)
    assert z.shape == ae.latent_shape(x.shape) == (1, 4, 8, 8)
    with torch.no_grad():
        raw = vae.encode(x).latent_dist.mean
    torch.testing.assert_close(z, raw * vae.config.scaling_factor)
    assert ae.decode(z).shape == ae.data_shape(z.shape) == (1, 3, 16, 16)


def test_vq_model_latent_pipeline():
    """A VQModel decodes through its quantiser with straight-through gradients, as diffusers does."""
    from diffusers import VQModel

    torch.manual_seed(7)
    vq = VQModel(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), norm_num_groups=4,
                 num_vq_embeddings=16, vq_embed_dim=4, layers_per_block=1,
                 down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    ae = VAEAutoencoder(vq)
    z = ae.encode(torch.rand(1, 3, 16, 16) * 2 - 1).requires_grad_(True)
    (g,) = torch.autograd.grad(ae.decode(z).square().sum(), z)
    assert bool(torch.isfinite(g).all()) and float(g.abs().sum()) > 0
    pipe = PosteriorSamplingPipeline(unet=_pixel_unet_latent(), scheduler=DDIMScheduler(num_train_timesteps=100),
                                     vae=vq)
    op, y = _sr_measurement(16)
    out = pipe(y, op, method="psld", num_inference_steps=2, output_type="pt", progress=False)
    assert out.images.shape == (1, 3, 16, 16) and out.cost.encoder_backward == 2


def test_bad_inputs(tmp_path):
    pix = PosteriorSamplingPipeline(unet=_pixel_unet(), scheduler=DDPMScheduler(num_train_timesteps=100))
    op, y = _sr_measurement(8)
    with pytest.raises(ValueError, match="measurement shape"):
        pix(y[..., :3], op, method="dps", num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match="NaN"):
        pix(torch.full_like(y, float("nan")), op, method="dps", num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match="cannot be taken"):
        pix(y, op, method="dps", num_inference_steps=2, height=9, width=8, progress=False)
    with pytest.raises(ValueError, match="no VAE"):
        pix(y, op, method="psld", num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match="unknown method"):
        pix(y, op, method="p2l", progress=False)
    with pytest.raises(TypeError, match="measurement operator"):
        pix(y, object(), method="dps", progress=False)
    lat = PosteriorSamplingPipeline(unet=_pixel_unet_latent(), scheduler=DDIMScheduler(num_train_timesteps=100),
                                    vae=_vae())
    with pytest.raises(ValueError, match="pixel space"):
        lat(y, op, method="dps", progress=False)
    with pytest.raises(ValueError, match="cannot take|measurement shape"):  # 8x8 measurement vs 16x16 images
        lat(y, op, method="psld", num_inference_steps=2, progress=False)
    enc, tok = _text(tmp_path)
    cond = PosteriorSamplingPipeline(unet=_cond_unet(), scheduler=DDIMScheduler(num_train_timesteps=100),
                                     vae=_vae())
    op16, y16 = _sr_measurement(16)
    with pytest.raises(ValueError, match="text-conditioned"):
        cond(y16, op16, method="stsl", num_inference_steps=2, progress=False)


@pytest.mark.parametrize("method", ["mmps", "tmpd", "pigdm", "diffpir", "daps"])
def test_covariance_family_in_the_pipeline_takes_sigma_y_from_the_measurement(method):
    from hessdiff.tasks import make_task

    pipe = PosteriorSamplingPipeline(unet=_pixel_unet(), scheduler=DDPMScheduler(num_train_timesteps=100))
    task = make_task("super_resolution", scale=2, filter="average", sigma_y=0.1)
    m = task.measure(torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1, seed=0)
    extra = {"langevin_steps": 2, "ode_steps": 1} if method == "daps" else {}
    kw = dict(method=method, num_inference_steps=3, output_type="pt", progress=False)
    a = pipe(m, **kw, method_kwargs=extra, generator=torch.Generator().manual_seed(0)).images
    b = pipe(m, **kw, method_kwargs={**extra, "sigma_y": 0.1}, generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(a, b)  # the measurement's own noise level was used
    assert bool(torch.isfinite(a).all())
    with pytest.raises(ValueError, match="needs the measurement's noise level"):  # a bare tensor has none
        pipe(m.y, m.operator, **kw, method_kwargs=extra, generator=torch.Generator().manual_seed(0))


def test_the_task_of_a_measurement_or_task_selects_the_per_task_defaults():
    """DiffPIR's published row sets lam / zeta / steps per task: a Measurement or a Task names the task;
    a bare operator does not, and runs the row's base values."""
    from hessdiff.samplers.defaults import method_defaults
    from hessdiff.tasks import make_task

    pipe = PosteriorSamplingPipeline(unet=_pixel_unet(), scheduler=DDPMScheduler(num_train_timesteps=100))
    task = make_task("random_inpainting", drop=0.5, sigma_y=0.05)
    m = task.measure(torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1, seed=0)
    row = method_defaults("diffpir", task="random_inpainting")
    kw = dict(method="diffpir", output_type="pt", progress=False)
    a = pipe(m, **kw, generator=torch.Generator().manual_seed(0))
    explicit = pipe(m.y, m.operator, **kw, num_inference_steps=row["steps"], generator=torch.Generator().manual_seed(0),
                    method_kwargs={"sigma_y": 0.05, "lam": row["lam"], "zeta": row["zeta"]})
    torch.testing.assert_close(a.images, explicit.images)
    assert a.cost.nfe == row["steps"]
    base = pipe(m.y, m.operator, **kw, num_inference_steps=row["steps"], generator=torch.Generator().manual_seed(0),
                method_kwargs={"sigma_y": 0.05})
    assert not torch.allclose(a.images, base.images)
