import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from hessdiff.samplers.schedule import (
    ContinuousVPSchedule,
    DiscreteVPSchedule,
    FlowMatchingSchedule,
    TimeGrid,
    schedule_from_config,
)

CONFIGS = [
    dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True),
]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_alphas_cumprod_match_diffusers(cfg):
    ref = DDPMScheduler(num_train_timesteps=1000, **cfg)
    sch = DiscreteVPSchedule.from_config(ref.config)
    ac = ref.alphas_cumprod.to(torch.float64)
    if cfg.get("rescale_betas_zero_snr"):
        ac = ac.clone()
        ac[-1] = 2**-24  # hessdiff clamps the zero-SNR endpoint, as DDIM/DPM schedulers do
    assert torch.equal(sch.alphas_cumprod, ac)
    t = torch.arange(1000, dtype=torch.float64)
    a, s = sch.alpha_sigma(t)
    torch.testing.assert_close(a**2, ac, rtol=1e-12, atol=0)
    torch.testing.assert_close(a**2 + s**2, torch.ones_like(a), rtol=1e-12, atol=1e-12)


def test_trained_betas():
    betas = np.linspace(1e-4, 0.02, 50)
    sch = DiscreteVPSchedule.from_config({"num_train_timesteps": 50, "trained_betas": betas.tolist()})
    expect = torch.cumprod(1 - torch.tensor(betas, dtype=torch.float32), 0).to(torch.float64)
    assert torch.equal(sch.alphas_cumprod, expect)


def test_fractional_time_interpolates_log_snr():
    sch = DiscreteVPSchedule.from_config({"num_train_timesteps": 1000})
    lam = sch.lambda_(torch.tensor([10.0, 11.0, 10.5]))
    assert lam[0] > lam[2] > lam[1]
    torch.testing.assert_close(lam[2], 0.5 * (lam[0] + lam[1]), rtol=1e-12, atol=1e-12)
    t = torch.tensor([3.0, 250.25, 998.5], dtype=torch.float64)
    torch.testing.assert_close(sch.t_from_lambda(sch.lambda_(t)), t, rtol=0, atol=1e-9)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n", [1, 7, 10, 50])
def test_diffusers_grids(spacing, n):
    cfg = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
               steps_offset=1, timestep_spacing=spacing)
    sch = DiscreteVPSchedule.from_config(cfg)
    ddim = DDIMScheduler(**cfg)
    ddim.set_timesteps(n)
    assert torch.equal(sch.diffusers_timesteps(n, style="ddim").long(), ddim.timesteps)
    dpm = DPMSolverMultistepScheduler(**cfg)
    dpm.set_timesteps(n)
    assert torch.equal(sch.diffusers_timesteps(n, style="dpmsolver").long(), dpm.timesteps)


@pytest.mark.parametrize("spacing", ["logsnr", "karras", "uniform"])
def test_other_spacings_are_monotone(spacing):
    sch = DiscreteVPSchedule.from_config({"num_train_timesteps": 1000})
    g = sch.grid(12, spacing)
    assert g.num_steps == 12
    assert bool((g.sigma[:-1] > g.sigma[1:]).all())
    assert float(g.sigma[-1]) == 0.0 and float(g.alpha[-1]) == 1.0
    assert float(g.t[0]) == 999.0
    if spacing == "logsnr":
        d = torch.diff(g.lambdas[:-1])
        torch.testing.assert_close(d, d.mean().expand_as(d), rtol=1e-6, atol=1e-9)


def test_final_point_conventions():
    sch = DiscreteVPSchedule.from_config({"num_train_timesteps": 1000, "set_alpha_to_one": False})
    g = sch.grid(10, "leading", final="diffusers")
    assert float(g.alpha[-1]) ** 2 == pytest.approx(float(sch.alphas_cumprod[0]), rel=1e-12)
    assert float(sch.grid(10, "leading", final="zero").sigma[-1]) == 0.0
    with pytest.raises(ValueError, match="unknown final"):
        sch.grid(10, final="nowhere")


def test_continuous_schedules():
    for sch in (ContinuousVPSchedule.linear(), ContinuousVPSchedule.cosine()):
        t = torch.linspace(sch.t_min, sch.t_max, 17, dtype=torch.float64)
        a, s = sch.alpha_sigma(t)
        torch.testing.assert_close(a**2 + s**2, torch.ones_like(a), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(sch.t_from_lambda(sch.lambda_(t)), t, rtol=0, atol=1e-8)
        for spacing in ("uniform", "logsnr", "karras"):
            g = sch.grid(8, spacing)
            assert bool((g.sigma[:-1] > g.sigma[1:]).all()) and float(g.sigma[-1]) == 0.0
    # VP-SDE linear schedule: log alpha = -t^2 (bmax - bmin)/4 - t bmin / 2
    sch = ContinuousVPSchedule.linear(0.1, 20.0)
    assert float(sch.alpha(torch.tensor(0.5))) == pytest.approx(math.exp(-0.25 * 0.25 * 19.9 - 0.25 * 0.1), rel=1e-12)


def test_flow_matching_grid_matches_diffusers():
    from diffusers import FlowMatchEulerDiscreteScheduler

    for shift in (1.0, 3.0):
        ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        ref.set_timesteps(10)
        sch = schedule_from_config(ref.config)
        assert isinstance(sch, FlowMatchingSchedule)
        g = sch.grid(10)
        torch.testing.assert_close(g.sigma.float(), ref.sigmas.float(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(g.t[:-1].float(), ref.timesteps.float(), rtol=1e-6, atol=1e-3)
        torch.testing.assert_close(g.alpha + g.sigma, torch.ones_like(g.alpha))


def test_bad_inputs_have_clear_errors():
    sch = DiscreteVPSchedule.from_config({"num_train_timesteps": 1000})
    with pytest.raises(ValueError, match="out of range"):
        sch.alpha_sigma(torch.tensor([1000.5]))
    with pytest.raises(ValueError, match="out of range"):
        sch.alpha_sigma(-3.0)
    with pytest.raises(ValueError, match="NaN"):
        sch.alpha_sigma(float("nan"))
    with pytest.raises(ValueError, match="unsupported beta_schedule 'sigmoid'"):
        DiscreteVPSchedule.from_config({"num_train_timesteps": 10, "beta_schedule": "sigmoid"})
    with pytest.raises(ValueError, match="cannot read this scheduler config"):
        DiscreteVPSchedule.from_config({"foo": 1})
    with pytest.raises(TypeError, match="scheduler config mapping"):
        DiscreteVPSchedule.from_config(42)
    with pytest.raises(ValueError, match="trained_betas has 3 entries"):
        DiscreteVPSchedule.from_config({"num_train_timesteps": 10, "trained_betas": [0.1, 0.2, 0.3]})
    with pytest.raises(ValueError, match="num_steps must be a positive integer"):
        sch.grid(0)
    with pytest.raises(ValueError, match="exceeds num_train_timesteps"):
        sch.grid(2000, "leading")
    with pytest.raises(ValueError, match="unknown spacing"):
        sch.grid(10, "geometric")
    with pytest.raises(ValueError, match="same length"):
        TimeGrid(torch.zeros(3), torch.ones(2), torch.ones(3))
    with pytest.raises(ValueError, match="shift must be positive"):
        FlowMatchingSchedule(shift=-1)
