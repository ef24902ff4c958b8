"""diffusers setups users meet: every stock scheduler's default config read as the right noise schedule
(tiny random-init components built here; no downloads)."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UNet2DModel,
    UniPCMultistepScheduler,
)

from hessdiff.samplers.denoiser import UNetDenoiser
from hessdiff.samplers.diffusers.pipeline import PosteriorSamplingPipeline
from hessdiff.samplers.diffusers.schedulers import (
    LMLFlowMatchEulerDiscreteScheduler,
)
from hessdiff.samplers.schedule import (
    DiscreteVPSchedule,
    FlowMatchingSchedule,
    flow_matching_reason,
    schedule_from_config,
)
from hessdiff.tasks.operators import SuperResolution


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(4, 8), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4).eval()


def _public(cfg) -> dict:
    return {k: v for k, v in dict(cfg).items() if not k.startswith("_")}


# ---------------------------------------------------------------------------------------------------
# 1. every stock scheduler's default config -> the right schedule
# ---------------------------------------------------------------------------------------------------
VP_SCHEDULERS = {
    "ddpm": lambda: DDPMScheduler(),
    "ddim": lambda: DDIMScheduler(),
    "pndm": lambda: PNDMScheduler(),
    "lms": lambda: LMSDiscreteScheduler(),
    "euler": lambda: EulerDiscreteScheduler(),
    "euler-ancestral": lambda: EulerAncestralDiscreteScheduler(),
    "heun": lambda: HeunDiscreteScheduler(),
    "dpm++2m": lambda: DPMSolverMultistepScheduler(),  # algorithm_type="dpmsolver++", solver_order=2
    "dpm++2m-sde": lambda: DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"),
    "unipc": lambda: UniPCMultistepScheduler(),
    "deis": lambda: DEISMultistepScheduler(),
}


@pytest.mark.parametrize("name", list(VP_SCHEDULERS))
def test_vp_scheduler_default_config_gives_its_vp_schedule(name, tmp_path):
    """DPM-Solver, UniPC and DEIS configs carry use_dynamic_shifting / flow_shift and are still VP."""
    sched = VP_SCHEDULERS[name]()
    unet = _unet()
    den = UNetDenoiser.from_unet_and_scheduler(unet, sched)
    assert isinstance(den.schedule, DiscreteVPSchedule) and den.schedule.kind == "vp"
    assert den.prediction_type == "epsilon"
    assert torch.equal(den.schedule.alphas_cumprod, sched.alphas_cumprod.to(torch.float64))
    out = den(torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)), 500.0)
    assert bool(torch.isfinite(out.x0).all()) and bool(torch.isfinite(out.eps).all())
    # the same from the bare config mapping and from the saved scheduler_config.json (with _class_name)
    sched.save_config(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    for cfg in (sched.config, dict(sched.config), saved):
        assert flow_matching_reason(cfg) is None
        sch = schedule_from_config(cfg)
        assert isinstance(sch, DiscreteVPSchedule)
        assert torch.equal(sch.alphas_cumprod, den.schedule.alphas_cumprod)
    assert isinstance(DiscreteVPSchedule.from_config(sched), DiscreteVPSchedule)
    # a switched scheduler, as users do it: pipe.scheduler = X.from_config(pipe.scheduler.config)
    switched = type(sched).from_config(DDPMScheduler().config)
    assert isinstance(UNetDenoiser.from_unet_and_scheduler(unet, switched).schedule, DiscreteVPSchedule)


@pytest.mark.parametrize("name", list(VP_SCHEDULERS))
def test_posterior_pipeline_dps_runs_with_every_vp_scheduler(name):
    pipe = PosteriorSamplingPipeline.from_pipe(DDPMPipeline(unet=_unet(), scheduler=VP_SCHEDULERS[name]()))
    op = SuperResolution(2, filter="average")
    y = op(torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1)
    out = pipe(y, op, method="dps", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
               output_type="pt", progress=False)
    assert out.images.shape == (1, 1, 8, 8) and bool(torch.isfinite(out.images).all())
    assert out.cost.nfe == 2


def test_flow_matching_configs_give_a_flow_schedule(tmp_path):
    unet = _unet()
    for sched in (FlowMatchEulerDiscreteScheduler(), FlowMatchEulerDiscreteScheduler(shift=3.0),
                  LMLFlowMatchEulerDiscreteScheduler(shift=3.0)):
        den = UNetDenoiser.from_unet_and_scheduler(unet, sched)
        assert isinstance(den.schedule, FlowMatchingSchedule) and den.schedule.kind == "flow"
        assert den.prediction_type == "flow_prediction" and den.schedule.shift == sched.config.shift
        sched.save_config(tmp_path)
        saved = json.loads((tmp_path / "scheduler_config.json").read_text())
        for cfg in (sched.config, saved):  # with and without _class_name
            assert isinstance(schedule_from_config(cfg), FlowMatchingSchedule)
        with pytest.raises(ValueError, match="flow-matching scheduler config"):
            DiscreteVPSchedule.from_config(sched)
    # the multistep solvers on flow sigmas (use_flow_sigmas=True): flow_shift is the shift
    dpm = DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")
    assert flow_matching_reason(dpm) == "use_flow_sigmas=True"
    den = UNetDenoiser.from_unet_and_scheduler(unet, dpm)
    assert isinstance(den.schedule, FlowMatchingSchedule) and den.schedule.shift == 3.0
    assert den.prediction_type == "flow_prediction"
    dpm.set_timesteps(6)  # its timesteps are s * T rounded to integers
    torch.testing.assert_close(den.schedule.alpha_sigma(dpm.timesteps.double())[1].float(), dpm.sigmas[:-1],
                               rtol=0, atol=1.0 / dpm.config.num_train_timesteps)
    # posterior samplers need a VP schedule and say so
    pipe = PosteriorSamplingPipeline.from_pipe(DDPMPipeline(unet=unet, scheduler=FlowMatchEulerDiscreteScheduler()))
    op = SuperResolution(2, filter="average")
    with pytest.raises(ValueError, match="VP"):
        pipe(op(torch.zeros(1, 1, 8, 8)), op, method="dps", num_inference_steps=2, output_type="pt", progress=False)


def test_non_ddpm_family_scheduler_is_refused_clearly():
    from diffusers import EDMEulerScheduler

    with pytest.raises(ValueError, match="EDMEulerScheduler is not a DDPM-family scheduler"):
        schedule_from_config(EDMEulerScheduler())


def test_model_folder_saved_with_dpm_solver_loads(tmp_path):
    """``hessdiff sample/restore --model DIR`` go through load_model + from_unet_and_scheduler."""
    from hessdiff.samplers.models import load_model

    DDPMPipeline(unet=_unet(), scheduler=DPMSolverMultistepScheduler()).save_pretrained(tmp_path)
    m = load_model(str(tmp_path))
    assert type(m.scheduler) is DPMSolverMultistepScheduler
    den = UNetDenoiser.from_unet_and_scheduler(m.unet, m.scheduler)
    assert isinstance(den.schedule, DiscreteVPSchedule)


def test_cli_sample_and_restore_with_a_dpm_solver_folder(tmp_path):
    import numpy as np
    from PIL import Image

    from hessdiff.scripts import cli

    model = tmp_path / "model"
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=32, in_channels=1, out_channels=1, block_out_channels=(4, 8), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    DDPMPipeline(unet=unet, scheduler=DPMSolverMultistepScheduler()).save_pretrained(model)
    fast = ("--steps", "2", "--device", "cpu", "--quiet")
    assert cli.main(["sample", "--model", str(model), "--seeds", "0", "--out", str(tmp_path / "s"), *fast]) == 0
    arr = np.zeros((32, 32), dtype=np.uint8)
    arr[6:26, 14:19] = 255
    Image.fromarray(arr).save(tmp_path / "x.png")
    assert cli.main(["restore", str(tmp_path / "x.png"), "--task", "denoising", "--method", "dps", "--model",
                     str(model), "--out", str(tmp_path / "r"), *fast]) == 0
    assert (tmp_path / "r" / "restored.png").is_file()
