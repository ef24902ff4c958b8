"""diffusers setups users meet: every stock scheduler's default config read as the right noise schedule,
pipelines saved with an LML drop-in loaded back, and zero-terminal-SNR schedules in the drop-ins
(tiny random-init components built here; no downloads)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DEISMultistepScheduler,
    DiffusionPipeline,
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
    LMLDDIMScheduler,
    LMLDPMSolverMultistepScheduler,
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


# ---------------------------------------------------------------------------------------------------
# 2. pipelines saved with an LML scheduler load back
# ---------------------------------------------------------------------------------------------------
LML = [
    (LMLDDIMScheduler, DDIMScheduler),
    (LMLDPMSolverMultistepScheduler, DPMSolverMultistepScheduler),
    (LMLFlowMatchEulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler),
]
LML_KW = dict(lamb=2e-3, kappa=0.25, precision="float64")


def _check_loaded(sched, lml_cls, ref):
    assert type(sched) is lml_cls
    assert _public(sched.config) == _public(ref.config)
    assert (sched.config.lamb, sched.config.kappa, sched.config.precision) == (2e-3, 0.25, "float64")
    assert (sched._lml.lamb, sched._lml.kappa, sched._lml.precision) == (2e-3, 0.25, "float64")


@pytest.mark.parametrize("lml_cls,stock_cls", LML)
def test_ddpm_pipeline_saved_with_an_lml_scheduler_loads_back(lml_cls, stock_cls, tmp_path):
    sched = lml_cls(**LML_KW)
    pipe = DDPMPipeline(unet=_unet(), scheduler=sched)
    pipe.save_pretrained(tmp_path)
    entry = json.loads((tmp_path / "model_index.json").read_text())["scheduler"]
    assert entry == ["hessdiff.samplers.diffusers.schedulers", lml_cls.__name__]
    for loaded in (DDPMPipeline.from_pretrained(tmp_path), DiffusionPipeline.from_pretrained(tmp_path)):
        assert type(loaded) is DDPMPipeline
        _check_loaded(loaded.scheduler, lml_cls, sched)
    # passing the scheduler (the LML class or a stock one) is accepted too
    mine = lml_cls.from_pretrained(tmp_path / "scheduler")
    assert DDPMPipeline.from_pretrained(tmp_path, scheduler=mine).scheduler is mine
    stock = stock_cls()
    assert DDPMPipeline.from_pretrained(tmp_path, scheduler=stock).scheduler is stock
    if lml_cls is not LMLFlowMatchEulerDiscreteScheduler:  # the loaded pipeline samples what the saved one did
        kw = dict(batch_size=1, num_inference_steps=2, output_type="np")
        ref = pipe(generator=torch.Generator().manual_seed(0), **kw).images
        out = DDPMPipeline.from_pretrained(tmp_path)(generator=torch.Generator().manual_seed(0), **kw).images
        assert abs(out - ref).max() < 1e-5  # stock schedulers reload to float32 rounding too


def _tiny_sd(tmp_path, scheduler):
    """A StableDiffusionPipeline of tiny random components; the tokenizer is a CLIPTokenizer on a
    hand-written letter vocabulary (as in test_schedulers.py: building one needs no download)."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = ["<|startoftext|>", "<|endoftext|>"] + letters + [c + "</w>" for c in letters]
    (tmp_path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=8)
    torch.manual_seed(0)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_hidden_layers=1,
                                      vocab_size=1000, max_position_embeddings=8, bos_token_id=0, eos_token_id=1,
                                      pad_token_id=1)).eval()
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(4, 8),
                                layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=8,
                                norm_num_groups=4, attention_head_dim=2).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(4,), latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        norm_num_groups=4, sample_size=8).eval()
    return StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@pytest.mark.parametrize("lml_cls", [LMLDPMSolverMultistepScheduler, LMLDDIMScheduler])
def test_stable_diffusion_pipeline_saved_with_an_lml_scheduler_loads_back(lml_cls, tmp_path):
    from diffusers import StableDiffusionPipeline

    sched = lml_cls(**LML_KW)
    pipe = _tiny_sd(tmp_path, sched)
    pipe.set_progress_bar_config(disable=True)
    out_dir = tmp_path / "sd"
    pipe.save_pretrained(out_dir)
    entry = json.loads((out_dir / "model_index.json").read_text())["scheduler"]
    assert entry == ["hessdiff.samplers.diffusers.schedulers", lml_cls.__name__]
    kw = dict(num_inference_steps=2, height=8, width=8, guidance_scale=2.0, output_type="np")
    ref = pipe("a cat", generator=torch.Generator().manual_seed(0), **kw).images
    for cls in (StableDiffusionPipeline, DiffusionPipeline):
        loaded = cls.from_pretrained(out_dir, safety_checker=None, requires_safety_checker=False)
        assert type(loaded) is StableDiffusionPipeline
        _check_loaded(loaded.scheduler, lml_cls, sched)
    loaded.set_progress_bar_config(disable=True)
    out = loaded("a cat", generator=torch.Generator().manual_seed(0), **kw).images
    assert abs(out - ref).max() < 1e-5
    mine = lml_cls.from_pretrained(out_dir / "scheduler")
    again = StableDiffusionPipeline.from_pretrained(out_dir, scheduler=mine, safety_checker=None,
                                                    requires_safety_checker=False)
    assert again.scheduler is mine


# ---------------------------------------------------------------------------------------------------
# 3. zero-terminal-SNR schedules in the drop-ins
# ---------------------------------------------------------------------------------------------------
def _loop(sched, x, unet, steps=4):
    sched.set_timesteps(steps)
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample, t, x).prev_sample
    return x


def _zero_snr(stock_cls, **kw):
    return stock_cls(rescale_betas_zero_snr=True, timestep_spacing="trailing", **kw).config


def test_zero_snr_ddim_warns_at_set_timesteps_and_does_not_crash():
    """Zero-SNR DDIM with v-prediction: the first corrected noise estimate is x_T itself. An x_T of
    1 x 128 x 256 elements (|x_T|^2 = 3.3e4, the SD 768 latent size) puts lamb = 1e-3 below the float32
    resolution of |g|^2; with unit-variance +-1 noise |x_T|^2 = 2^15 exactly and the published map is
    0/0 (a FloatingPointError before the fix), with Gaussian noise rounding residue."""
    unet = _unet()
    cfg = _zero_snr(DDIMScheduler, prediction_type="v_prediction")
    x = (torch.randint(0, 2, (1, 1, 128, 256), generator=torch.Generator().manual_seed(0)) * 2 - 1).float()
    sched = LMLDDIMScheduler.from_config(cfg, lamb=1e-3)
    with pytest.warns(UserWarning, match=r"zero terminal SNR.*precision='float64'.*larger lamb") as rec:
        sched.set_timesteps(4)
    assert "lamb=0.001" in str(rec[0].message)
    with pytest.warns(UserWarning, match=r"saturated for 1 of 1 sample.*left uncorrected.*precision='float64'"):
        out = _loop(sched, x, unet)
    assert bool(torch.isfinite(out).all())
    assert sched.lml_nonfinite_count >= 1 and sched.lml_saturated_count >= sched.lml_nonfinite_count
    # saturated steps are the stock DDIM step; so with every step saturated the run is the stock run
    ref = _loop(DDIMScheduler.from_config(cfg), x, unet)
    if sched.lml_saturated_count == 4:
        assert torch.equal(out, ref)
    else:
        assert float((out - ref).norm() / ref.norm()) < 0.5
    # the counts are per run: set_timesteps resets them
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched.set_timesteps(4)
    assert (sched.lml_saturated_count, sched.lml_nonfinite_count) == (0, 0)
    # the exact operator corrects those steps: the identity, no warning
    f64 = LMLDDIMScheduler.from_config(cfg, lamb=1e-3, precision="float64")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        out64 = _loop(f64, x, unet)
    assert f64.lml_saturated_count == 0 and float((out64 - ref).norm() / ref.norm()) < 1e-5
    # the strict mode stops at the first saturated step with the same advice
    strict = LMLDDIMScheduler.from_config(cfg, lamb=1e-3, saturated="raise")
    with pytest.warns(UserWarning, match="zero terminal SNR"), \
            pytest.raises(FloatingPointError, match="precision='float64'"):
        _loop(strict, x, unet)
    # a grid that does not start at zero SNR (leading spacing) does not warn at set_timesteps
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        LMLDDIMScheduler.from_config({**cfg, "timestep_spacing": "leading"}).set_timesteps(4)


def test_zero_snr_dpm_solver_warns_at_set_timesteps_and_keeps_saturated_steps_uncorrected():
    """Zero-SNR DPM-Solver++ with epsilon prediction: diffusers clamps alphas_cumprod[-1] to 2^-24, and the
    increments carry the x0 estimate (x - sigma eps) / alpha_T: |g|^2 of 1e6..1e9, far above 1.7e7 lamb."""
    unet = _unet()
    cfg = _zero_snr(DPMSolverMultistepScheduler)
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    sched = LMLDPMSolverMultistepScheduler.from_config(cfg, lamb=1e-3)
    with pytest.warns(UserWarning, match=r"zero terminal SNR.*alphas_cumprod = 5.96e-08.*precision='float64'"):
        sched.set_timesteps(4)
    with pytest.warns(UserWarning, match=r"saturated for 2 of 2 sample.*left uncorrected"):
        out = _loop(sched, x, unet)
    assert sched.lml_saturated_count == 2 * 4 and bool(torch.isfinite(out).all())
    ref = _loop(DPMSolverMultistepScheduler.from_config(cfg), x, unet)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    # the released arithmetic there is rounding residue rescaled to |g|: nothing like the stock step
    published = LMLDPMSolverMultistepScheduler.from_config(cfg, lamb=1e-3, saturated="published")
    with pytest.warns(UserWarning, match="saturated='published'"):
        bad = _loop(published, x, unet)
    assert published.lml_saturated_count == 2 * 4
    assert float((bad - ref).norm() / ref.norm()) > 0.5
    # float64: not saturated, the stock result up to the float64 rounding law (2^-53 |g|^2 / lamb ~ 1e-4 here)
    f64 = LMLDPMSolverMultistepScheduler.from_config(cfg, lamb=1e-3, precision="float64")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        out64 = _loop(f64, x, unet)
    assert f64.lml_saturated_count == 0
    assert float((out64 - ref).norm() / ref.norm()) < 1e-2
    with pytest.raises(ValueError, match="saturated"):
        LMLDPMSolverMultistepScheduler(saturated="ignore")


def test_model_folder_saved_with_an_lml_scheduler_loads_through_load_model(tmp_path):
    """``hessdiff sample/restore --model DIR`` read the scheduler class from the folder: an LML drop-in's
    name is not in diffusers' namespace and must still resolve (with its config)."""
    from diffusers import DDPMPipeline

    import hessdiff
    from hessdiff.samplers.models import load_model

    pipe = DDPMPipeline.from_pretrained(hessdiff.embedded_model_path("mnist"))
    pipe.scheduler = hessdiff.LMLDDIMScheduler.from_config(pipe.scheduler.config, lamb=1e-2)
    pipe.save_pretrained(tmp_path / "m")
    model = load_model(str(tmp_path / "m"))
    assert type(model.scheduler).__name__ == "LMLDDIMScheduler" and model.scheduler.config.lamb == 1e-2
