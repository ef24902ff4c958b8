"""The denoiser contract and the diffusers UNet adapter."""

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel

from hessdiff.samplers.denoiser import (
    CallableDenoiser,
    Denoiser,
    UNetDenoiser,
    convert_prediction,
)
from hessdiff.samplers.loop import CountingDenoiser
from hessdiff.samplers.oracles.gmm import GaussianMixture, GMMDenoiser
from hessdiff.samplers.schedule import DiscreteVPSchedule, FlowMatchingSchedule


def tiny_unet(channels: int = 3) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=channels, out_channels=channels, block_out_channels=(4, 8),
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)


def tiny_cond_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, cross_attention_dim=8, norm_num_groups=4,
                                attention_head_dim=2,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


@pytest.mark.parametrize("ptype", ["epsilon", "sample", "v_prediction"])
def test_conversions_are_consistent(ptype):
    sch = DiscreteVPSchedule.from_config({"num_train_timesteps": 1000})
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    t = torch.tensor([10.0, 200.0, 600.0, 999.0], dtype=torch.float64)
    a, s = sch.alpha_sigma(t)
    ab, sb = a[:, None, None, None], s[:, None, None, None]
    xt = ab * x0 + sb * eps
    out = {"epsilon": eps, "sample": x0, "v_prediction": ab * eps - sb * x0}[ptype]
    p = convert_prediction(out, xt, a, s, ptype)
    torch.testing.assert_close(p.x0, x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(p.eps, eps, rtol=1e-9, atol=1e-9)


def test_flow_conversion():
    sch = FlowMatchingSchedule()
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 6, generator=g, dtype=torch.float64), torch.randn(2, 6, generator=g, dtype=torch.float64)
    a, s = sch.alpha_sigma(torch.tensor([300.0, 800.0], dtype=torch.float64))
    xt = a[:, None] * x0 + s[:, None] * eps
    p = convert_prediction(eps - x0, xt, a, s, "flow_prediction")
    torch.testing.assert_close(p.x0, x0)
    torch.testing.assert_close(p.eps, eps)


def test_unet_adapter_matches_manual_conversion_and_is_a_denoiser():
    unet = tiny_unet().double()
    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    den = UNetDenoiser.from_unet_and_scheduler(unet, sched)
    assert isinstance(den, Denoiser) and den.prediction_type == "v_prediction"
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    t = torch.tensor([500.0, 20.0])
    p = den(x, t)
    with torch.no_grad():
        v = unet(x, t.float()).sample
    ac = sched.alphas_cumprod.double()[t.long()]
    a, s = ac.sqrt()[:, None, None, None], (1 - ac).sqrt()[:, None, None, None]
    torch.testing.assert_close(p.x0, a * x - s * v, rtol=1e-7, atol=1e-7)
    assert p.x0.dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_gives_float32_predictions(dtype):
    unet = tiny_unet().to(dtype)
    den = UNetDenoiser(unet, DiscreteVPSchedule.from_config({"num_train_timesteps": 1000}))
    x = torch.randn(2, 3, 8, 8)
    try:
        p = den(x, 300)
    except RuntimeError as exc:  # pragma: no cover - CPU kernels missing for this dtype
        pytest.skip(f"{dtype} UNet forward unsupported on this CPU build: {exc}")
    assert p.eps.dtype == torch.float32 and p.x0.dtype == torch.float32
    assert torch.isfinite(p.x0).all()


def test_classifier_free_guidance():
    unet = tiny_cond_unet()
    sch = DiscreteVPSchedule.from_config({"num_train_timesteps": 1000})
    g = torch.Generator().manual_seed(0)
    cond, null = torch.randn(1, 3, 8, generator=g), torch.randn(1, 3, 8, generator=g)
    x = torch.randn(2, 4, 8, 8, generator=g)
    w = 4.0
    den = UNetDenoiser(unet, sch, encoder_hidden_states=cond, negative_encoder_hidden_states=null, guidance_scale=w)
    e_c = UNetDenoiser(unet, sch, encoder_hidden_states=cond)(x, 400).eps
    e_u = UNetDenoiser(unet, sch, encoder_hidden_states=null)(x, 400).eps
    torch.testing.assert_close(den(x, 400).eps, e_u + w * (e_c - e_u), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="classifier-free guidance needs both"):
        UNetDenoiser(unet, sch, encoder_hidden_states=cond, guidance_scale=3.0)


def test_counting_and_callable_denoisers():
    sch = DiscreteVPSchedule.from_config({"num_train_timesteps": 1000})
    base = CallableDenoiser(lambda x, t: torch.zeros_like(x), sch, "epsilon")
    den = CountingDenoiser(base)
    x = torch.randn(3, 4)
    p = den(x, 999)
    den(x, 10)
    assert den.nfe == 2
    torch.testing.assert_close(p.x0, x / sch.alpha(999.0).float())
    gmm = CountingDenoiser(GMMDenoiser(GaussianMixture(torch.ones(1), torch.zeros(1, 4))))
    gmm.jvp_x0(x.double(), 100, torch.ones(3, 4, dtype=torch.float64))
    assert gmm.extra == {"jvp_x0": 1} and gmm.nfe == 0


def test_adapter_errors():
    sch = DiscreteVPSchedule.from_config({"num_train_timesteps": 1000})
    with pytest.raises(ValueError, match="unknown prediction_type 'noise'"):
        UNetDenoiser(tiny_unet(), sch, "noise")
    with pytest.raises(ValueError, match="unknown prediction_type"):
        CallableDenoiser(lambda x, t: x, sch, "x_start")
    den = UNetDenoiser(tiny_unet(), sch)
    with pytest.raises(ValueError, match="timesteps for a batch"):
        den(torch.randn(2, 3, 8, 8), torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="out of range"):
        den(torch.randn(2, 3, 8, 8), 5000)
    bad = CallableDenoiser(lambda x, t: x[:, :1], sch)
    with pytest.raises(ValueError, match="does not match input shape"):
        bad(torch.randn(2, 3, 4, 4), 10)
