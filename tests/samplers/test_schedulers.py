"""diffusers drop-ins with the published LML correction: config round trips, insertion points,
float64 identity against the stock schedulers, dtype discipline, and use inside stock pipelines
(tiny random-init components built here; no downloads)."""

import json

import pytest
import torch
from diffusers import (
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    UNet2DModel,
)

from hessdiff.samplers.diffusers.schedulers import (
    LMLDDIMScheduler,
    LMLDPMSolverMultistepScheduler,
    LMLFlowMatchEulerDiscreteScheduler,
    lml_scheduler_from,
)
from hessdiff.samplers.lml import lm_correct


def _public(cfg) -> dict:
    return {k: v for k, v in dict(cfg).items() if not k.startswith("_")}


class _Spy:
    """Stands in for a scheduler's correction; records inputs, applies ``fn`` (default: identity)."""

    def __init__(self, fn=None):
        self.fn = fn
        self.seen: list[torch.Tensor] = []
        self.resets = 0
        self.precision = "float32"

    def reset(self):
        self.resets += 1

    def __call__(self, g, ctx=None):
        self.seen.append(g.detach().clone())
        return g if self.fn is None else self.fn(g)


def _fake_model(x: torch.Tensor, t) -> torch.Tensor:
    """A deterministic stand-in for a network output (any prediction type)."""
    return torch.tanh(0.8 * x) + 1e-3 * float(t)


def _run(sched, n: int, *, seed: int = 0, shape=(2, 3, 8, 8), **step_kw) -> torch.Tensor:
    sched.set_timesteps(n)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * float(getattr(sched,
                                                                                        "init_noise_sigma", 1.0))
    for t in sched.timesteps:
        x = sched.step(_fake_model(x, t), t, x, **step_kw).prev_sample
    return x


STOCK = [
    (DDIMScheduler, LMLDDIMScheduler, {}),
    (DDIMScheduler, LMLDDIMScheduler, {"prediction_type": "v_prediction", "clip_sample": False}),
    (DPMSolverMultistepScheduler, LMLDPMSolverMultistepScheduler, {"solver_order": 2}),
    (DPMSolverMultistepScheduler, LMLDPMSolverMultistepScheduler,
     {"solver_order": 3, "algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    (DPMSolverMultistepScheduler, LMLDPMSolverMultistepScheduler, {"solver_order": 1}),
    (FlowMatchEulerDiscreteScheduler, LMLFlowMatchEulerDiscreteScheduler, {"shift": 3.0}),
]


@pytest.mark.parametrize("stock_cls,lml_cls,kw", STOCK)
def test_from_config_roundtrip_and_compatibles(stock_cls, lml_cls, kw, tmp_path):
    stock = stock_cls(**kw)
    sched = lml_cls.from_config(stock.config, lamb=2e-3, kappa=0.25, precision="float64")
    cfg = _public(sched.config)
    for k, v in _public(stock.config).items():
        assert cfg[k] == v, k
    assert (cfg["lamb"], cfg["kappa"], cfg["precision"]) == (2e-3, 0.25, "float64")
    sched.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved["_class_name"] == lml_cls.__name__ and saved["lamb"] == 2e-3
    again = lml_cls.from_pretrained(tmp_path)
    assert type(again) is lml_cls and _public(again.config) == cfg
    assert stock_cls in sched.compatibles
    # back to the stock class: every stock entry survives (diffusers carries the unknown LML keys along)
    back = stock_cls.from_config(sched.config)
    assert type(back) is stock_cls
    assert {k: v for k, v in _public(back.config).items() if k in _public(stock.config)} == _public(stock.config)
    assert type(lml_scheduler_from(stock, lamb=5e-3)) is lml_cls
    assert lml_scheduler_from(saved, lamb=5e-3).config.lamb == 5e-3  # a saved config names its class
    with pytest.raises(ValueError, match="_class_name"):
        lml_scheduler_from({"num_train_timesteps": 1000})


def test_bad_configuration_raises_clear_errors():
    with pytest.raises(ValueError, match="lamb"):
        LMLDDIMScheduler(lamb=0.0)
    with pytest.raises(ValueError, match="lamb"):
        LMLDPMSolverMultistepScheduler.from_config(DPMSolverMultistepScheduler().config, lamb=-1.0)
    with pytest.raises(ValueError, match="kappa"):
        LMLFlowMatchEulerDiscreteScheduler(kappa=2.0)
    with pytest.raises(ValueError, match="precision"):
        LMLDDIMScheduler(precision="float16")
    with pytest.raises(ValueError, match="algorithm_type"):
        LMLDPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")
    with pytest.raises(ValueError, match="prediction_type"):
        LMLDDIMScheduler(prediction_type="flow_prediction")
    with pytest.raises(ValueError, match="no LML version"):
        lml_scheduler_from(EulerDiscreteScheduler())


@pytest.mark.parametrize("stock_cls,lml_cls,kw", STOCK)
def test_float64_correction_reproduces_the_stock_scheduler(stock_cls, lml_cls, kw):
    ref = _run(stock_cls(**kw), 6)
    out = _run(lml_cls(**kw, lamb=1e-3, precision="float64"), 6)
    assert float((out - ref).norm() / ref.norm()) < 1e-6
    # the published float32 arithmetic at a small lamb is visibly not the identity
    noisy = _run(lml_cls(**kw, lamb=1e-3, precision="float32"), 6)
    assert float((noisy - ref).norm() / ref.norm()) > 1e-4
    # ... and is reproducible: the history is reset by set_timesteps
    sched = lml_cls(**kw, lamb=1e-3, kappa=0.5, precision="float64")
    assert torch.equal(_run(sched, 6), _run(sched, 6))


def test_ddim_eta_and_clipping_paths():
    for kw in ({"eta": 0.7}, {"eta": 0.5, "use_clipped_model_output": True}):
        ref = _run(DDIMScheduler(), 5, generator=torch.Generator().manual_seed(1), **kw)
        out = _run(LMLDDIMScheduler(precision="float64"), 5, generator=torch.Generator().manual_seed(1), **kw)
        assert float((out - ref).norm() / ref.norm()) < 1e-6


def test_insertion_points_match_the_released_code():
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    # DDIM, v-prediction: the corrected vector is diffusers' pred_epsilon
    s = LMLDDIMScheduler(prediction_type="v_prediction", clip_sample=False)
    s.set_timesteps(4)
    s._lml = spy = _Spy()
    t = s.timesteps[1]
    v = _fake_model(x, t)
    s.step(v, t, x)
    abar = s.alphas_cumprod[t]
    torch.testing.assert_close(spy.seen[0], abar**0.5 * v + (1 - abar) ** 0.5 * x)
    # DPM-Solver++ order 1: the corrected vector is the whole increment x_next - (sigma_t/sigma_s) x
    stock = DPMSolverMultistepScheduler(solver_order=1)
    s = LMLDPMSolverMultistepScheduler(solver_order=1)
    for sc in (stock, s):
        sc.set_timesteps(4)
    s._lml = spy = _Spy()
    t = s.timesteps[0]
    ref = stock.step(_fake_model(x, t), t, x).prev_sample
    out = s.step(_fake_model(x, t), t, x).prev_sample
    sig_t, sig_s = stock.sigmas[1], stock.sigmas[0]
    a_t, s_t = stock._sigma_to_alpha_sigma_t(sig_t)
    a_s, s_s = stock._sigma_to_alpha_sigma_t(sig_s)
    torch.testing.assert_close(spy.seen[0], ref - (s_t / s_s) * x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    # flow Euler: the corrected vector is the velocity; x_next = x + dt * LML(v)
    lamb = 1e-4
    f = LMLFlowMatchEulerDiscreteScheduler(lamb=lamb)
    f.set_timesteps(4)
    t = f.timesteps[0]
    v = _fake_model(x, t)
    out = f.step(v, t, x).prev_sample
    dt = f.sigmas[1] - f.sigmas[0]
    torch.testing.assert_close(out, x + dt * lm_correct(v, None, lamb), rtol=0, atol=1e-6)


def test_half_precision_model_output_is_upcast_before_the_correction():
    for sched in (LMLDDIMScheduler(), LMLDPMSolverMultistepScheduler(), LMLFlowMatchEulerDiscreteScheduler()):
        sched.set_timesteps(3)
        sched._lml = spy = _Spy()
        x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(3)).half()
        for t in sched.timesteps:
            x = sched.step(_fake_model(x.float(), t).half(), t, x).prev_sample
        assert len(spy.seen) == 3 and {g.dtype for g in spy.seen} == {torch.float32}
        assert x.dtype == torch.float16 and torch.isfinite(x).all()


# ---------------------------------------------------------------------------------------------------
# inside stock pipelines
# ---------------------------------------------------------------------------------------------------
def _tiny_unet(dtype=torch.float32) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(4, 8), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                       attention_head_dim=4).to(dtype).eval()


def test_ddpm_and_ddim_pipelines():
    unet = _tiny_unet()
    ref = DDPMPipeline(unet, DDIMScheduler())(batch_size=2, num_inference_steps=3, output_type="np",
                                              generator=torch.Generator().manual_seed(0)).images
    sched = LMLDDIMScheduler(precision="float64")
    pipe = DDPMPipeline(unet, sched)
    spy = _Spy(sched._lml)
    sched._lml = spy
    out = pipe(batch_size=2, num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert len(spy.seen) == 3 and spy.resets == 1
    assert abs(out - ref).max() < 1e-5
    # DDIMPipeline converts its scheduler to DDIM at construction; the drop-in goes in afterwards
    pipe = DDIMPipeline(unet, DDIMScheduler())
    pipe.scheduler = LMLDDIMScheduler.from_config(pipe.scheduler.config, lamb=1e-3)
    assert isinstance(pipe.scheduler, LMLDDIMScheduler)
    pipe.scheduler._lml = spy = _Spy()
    img = pipe(batch_size=1, num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert len(spy.seen) == 3 and img.shape == (1, 8, 8, 3)


def test_fp16_unet_in_a_pipeline_never_feeds_fp16_into_the_correction():
    unet = _tiny_unet(torch.float16)
    try:
        unet(torch.zeros(1, 3, 8, 8, dtype=torch.float16), torch.tensor([1]))
    except RuntimeError:
        pytest.skip("this torch build has no CPU float16 kernels")
    sched = LMLDDIMScheduler()
    sched._lml = spy = _Spy()
    DDPMPipeline(unet, sched)(batch_size=1, num_inference_steps=2, output_type="np",
                              generator=torch.Generator().manual_seed(0))
    assert len(spy.seen) == 2 and {g.dtype for g in spy.seen} == {torch.float32}


def _tiny_sd(tmp_path):
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = ["<|startoftext|>", "<|endoftext|>"] + letters + [c + "</w>" for c in letters]
    (tmp_path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=8)
    torch.manual_seed(0)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokens), hidden_size=8, intermediate_size=16,
                                      num_attention_heads=2, num_hidden_layers=1, max_position_embeddings=8,
                                      bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(4, 8),
                                layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=8,
                                norm_num_groups=4, attention_head_dim=2).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(4,), latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        norm_num_groups=4, sample_size=8).eval()
    return StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
                                   scheduler=DPMSolverMultistepScheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def test_stable_diffusion_pipeline(tmp_path):
    pipe = _tiny_sd(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=3, height=8, width=8, guidance_scale=2.0, output_type="np")
    ref = pipe("a cat", generator=torch.Generator().manual_seed(0), **kw).images
    pipe.scheduler = LMLDPMSolverMultistepScheduler.from_config(pipe.scheduler.config, precision="float64")
    pipe.scheduler._lml = spy = _Spy(pipe.scheduler._lml)
    out = pipe("a cat", generator=torch.Generator().manual_seed(0), **kw).images
    assert len(spy.seen) == 3 and abs(out - ref).max() < 1e-5
    pipe.scheduler = LMLDDIMScheduler.from_config(pipe.scheduler.config, lamb=1e-3)
    img = pipe("a cat", generator=torch.Generator().manual_seed(0), **kw).images
    assert img.shape == (1, 8, 8, 3) and (img >= 0).all() and (img <= 1).all()


@pytest.mark.parametrize("algo", ["dpmsolver++", "dpmsolver"])
def test_secant_variant_matches_the_hessdiff_solver(algo):
    """lml_variant="secant" in the drop-in computes what HessianStepCorrection does in hessdiff's solver."""
    from hessdiff.samplers import GMMDenoiser, grid_gmm_prior, sample_dpm_solver
    from hessdiff.samplers.lml import HessianStepCorrection

    den = GMMDenoiser(grid_gmm_prior(8))
    kw = dict(solver_order=2, algorithm_type=algo, timestep_spacing="trailing")
    if algo == "dpmsolver":
        kw["final_sigmas_type"] = "sigma_min"
    grid = den.schedule.grid(6, "trailing", style="dpmsolver", final="zero" if algo == "dpmsolver++" else "first")
    x = den.marginal(float(grid.t[0])).sample(64, torch.Generator().manual_seed(0))

    def run(sched):
        sched.set_timesteps(6)
        z = x.float()
        for t in sched.timesteps:
            z = sched.step(den(z.double(), float(t)).eps.float(), t, z).prev_sample
        return z.double()

    ref = sample_dpm_solver(den, x, grid, order=2, algorithm=algo,
                            correction=HessianStepCorrection("secant", 1, adaptive=True, radial="exclude"))
    base = sample_dpm_solver(den, x, grid, order=2, algorithm=algo)
    out = run(LMLDPMSolverMultistepScheduler(**kw, lml_variant="secant"))
    stock = run(DPMSolverMultistepScheduler(**kw))
    assert float((stock - base).norm() / base.norm()) < 1e-4  # the two grids agree
    assert float((ref - base).norm() / base.norm()) > 1e-3  # the variant does something
    assert float((out - ref).norm() / ref.norm()) < 1e-4
    with pytest.raises(ValueError, match="lml_variant"):
        LMLDDIMScheduler(lml_variant="fisher")


def test_secant_variant_in_ddim_and_flow_runs():
    for sched in (LMLDDIMScheduler(lml_variant="secant", clip_sample=False),
                  LMLFlowMatchEulerDiscreteScheduler(lml_variant="secant")):
        ref = _run(type(sched).__bases__[-1](**{k: v for k, v in sched.config.items() if k == "clip_sample"}), 5)
        out = _run(sched, 5)
        assert torch.isfinite(out).all() and float((out - ref).norm() / ref.norm()) > 1e-5
    with pytest.raises(ValueError, match="eta = 0"):
        _run(LMLDDIMScheduler(lml_variant="secant"), 3, eta=0.5)
