"""LML corrections: the published map (identity in exact arithmetic, float32 rounding law, released
arithmetic), its insertion in every solver, dtype discipline, and the second-order variants against
exact Gaussian / Gaussian-mixture oracles."""

import math

import pytest
import torch

from hessdiff.samplers import (
    CountingDenoiser,
    GaussianMixture,
    GMMDenoiser,
    UNetDenoiser,
    grid_gmm_prior,
    sample_ddim,
    sample_dpm_solver,
    sample_flow_euler,
)
from hessdiff.samplers.lml import (
    HessianStepCorrection,
    LMLCorrection,
    MatchedNoiseCorrection,
    NewtonLangevinCorrector,
    SecantCurvature,
    denoiser_jvp,
    exact_curvature,
    jvp_curvature,
    lm_correct,
    lml_rounding_law,
    published_lambda,
    secant_to_level,
)
from hessdiff.samplers.lml.lowrank import flat
from hessdiff.samplers.oracles.gmm import default_gmm_schedule
from hessdiff.samplers.schedule import FlowMatchingSchedule

F64 = torch.float64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _released_reference(g: torch.Tensor, prev, lamb: float, kappa: float) -> torch.Tensor:
    """The released arithmetic on a 4-D tensor, step by step as described in PAPERS.md 1.1
    (sums over dims 1, 2, 3, the order of the released operations)."""
    u = g if prev is None else kappa * prev + (1 - kappa) * g
    ns = (g * g).sum(dim=(1, 2, 3))[:, None, None, None]
    nsu = (u * u).sum(dim=(1, 2, 3))[:, None, None, None]
    ip = torch.sum(g * u, dim=(1, 2, 3))[:, None, None, None]
    q = g - (u * ip) / (lamb + nsu)
    nq = torch.sqrt((q * q).sum(dim=(1, 2, 3)))[:, None, None, None]
    return q * torch.sqrt(ns) / nq


# ---------------------------------------------------------------------------------------------------
# the published correction
# ---------------------------------------------------------------------------------------------------
def test_float32_reproduces_released_arithmetic_bit_for_bit():
    g = torch.randn(4, 3, 8, 8, generator=_gen(0))
    p = torch.randn(4, 3, 8, 8, generator=_gen(1))
    for lamb, kappa, prev in [(1e-3, 0.0, None), (8e-4, 0.0, p), (1e-2, 0.3, p)]:
        assert torch.equal(lm_correct(g, prev, lamb, kappa, "float32"), _released_reference(g, prev, lamb, kappa))


def test_float64_is_the_identity_for_kappa_zero():
    g = torch.randn(5, 3072, generator=_gen(2), dtype=F64) * 0.7
    p = torch.randn(5, 3072, generator=_gen(3), dtype=F64)
    u64 = 3.4e-8 * 2.0**-29  # the rounding law with float64's unit roundoff
    for lamb in (1e-4, 1e-3, 1.0, 100.0):
        out = lm_correct(g, p, lamb, 0.0, "float64")
        rel = (out - g).norm(dim=1) / g.norm(dim=1)
        assert float((rel / (u64 * g.pow(2).sum(1) / lamb + 1e-15)).max()) < 3
    # while the float32 arithmetic is visibly not the identity at small lamb
    out32 = lm_correct(g.float(), None, 1e-3, 0.0, "float32").to(F64)
    assert float(((out32 - g).norm(dim=1) / g.norm(dim=1)).min()) > 1e-3


def test_kappa_positive_is_the_damped_rank_one_projection():
    g = torch.randn(3, 50, generator=_gen(4), dtype=F64)
    p = torch.randn(3, 50, generator=_gen(5), dtype=F64)
    lamb, kappa = 2.0, 0.4
    u = kappa * p + (1 - kappa) * g
    M = lamb * torch.eye(50, dtype=F64) + u[:, :, None] * u[:, None, :]
    q = lamb * torch.linalg.solve(M, g)
    ref = q * g.norm(dim=1, keepdim=True) / q.norm(dim=1, keepdim=True)
    out = lm_correct(g, p, lamb, kappa, "float64")
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert float((out - g).norm()) > 1e-2  # genuinely not the identity


@pytest.mark.parametrize("d", [64, 3072])
def test_float32_deviation_follows_the_rounding_law(d):
    g = torch.randn(16, d, generator=_gen(6))
    for scale in (0.05, 1.0, 20.0):
        x = g * scale
        n2 = float(x.double().pow(2).sum(1).mean())
        for predicted in (1e-5, 1e-3, 1e-1):
            lamb = 3.4e-8 * n2 / predicted
            out = lm_correct(x, None, lamb, 0.0, "float32").double()
            rel = (out - x.double()).norm(dim=1) / x.double().norm(dim=1)
            ratio = rel / lml_rounding_law(x, lamb)
            assert float(ratio.min()) > 1 / 3 and float(ratio.max()) < 3, (scale, predicted, ratio)


def test_bad_input_raises_clear_errors():
    g = torch.randn(2, 10)
    with pytest.raises(ValueError, match="lamb"):
        LMLCorrection(lamb=0.0)
    with pytest.raises(ValueError, match="lamb"):
        LMLCorrection(lamb=-1e-3)
    with pytest.raises(ValueError, match="lamb"):
        LMLCorrection(lamb=float("nan"))
    with pytest.raises(ValueError, match="kappa"):
        LMLCorrection(kappa=1.5)
    with pytest.raises(ValueError, match="kappa"):
        LMLCorrection(kappa=-0.1)
    with pytest.raises(ValueError, match="precision"):
        LMLCorrection(precision="float16")
    with pytest.raises(ValueError, match="history shape"):
        lm_correct(g, torch.randn(2, 11), 1e-3, 0.5)
    # lamb below the float32 resolution of |g|^2: the published arithmetic gives 0/0
    big = torch.cat([torch.ones(1, 4096) * 100.0, torch.randn(1, 4096, generator=_gen(30))])
    with pytest.raises(FloatingPointError, match="float64"):
        lm_correct(big, None, 1e-9, 0.0, "float32")
    nan = lm_correct(big, None, 1e-9, 0.0, "float32", nonfinite="nan")
    assert torch.isnan(nan[0]).all() and torch.isfinite(nan[1]).all()
    kept = lm_correct(big, None, 1e-9, 0.0, "float32", nonfinite="keep")
    assert torch.equal(kept[0], big[0]) and torch.equal(kept[1], nan[1])
    corr = LMLCorrection(1e-9, nonfinite="keep")
    assert torch.equal(corr(big), kept) and (corr.nonfinite_count, corr.count) == (1, 2)
    with pytest.raises(ValueError, match="nonfinite"):
        LMLCorrection(nonfinite="ignore")
    # zero update: returned unchanged
    assert torch.equal(lm_correct(torch.zeros(2, 5), None, 1e-3), torch.zeros(2, 5))
    assert published_lambda("cifar10", 10) == 8e-4 and published_lambda("flux") == 1e-2
    with pytest.raises(ValueError, match="unknown setting"):
        published_lambda("imagenet")


# ---------------------------------------------------------------------------------------------------
# inside the solvers
# ---------------------------------------------------------------------------------------------------
def _gmm(d: int, schedule=None) -> GMMDenoiser:
    return GMMDenoiser(grid_gmm_prior(d), schedule or default_gmm_schedule())


def _start(den: GMMDenoiser, grid, n: int, seed: int) -> torch.Tensor:
    law = den.prior.noised(float(grid.alpha[0]), float(grid.sigma[0]))
    return law.sample(n, _gen(seed))


SOLVER_CASES = [
    ("ddim", lambda den, x, grid, **k: sample_ddim(den, x, grid, **k)),
    ("dpm-3", lambda den, x, grid, **k: sample_dpm_solver(den, x, grid, order=3, algorithm="dpmsolver", **k)),
    ("dpm++2m", lambda den, x, grid, **k: sample_dpm_solver(den, x, grid, order=2, algorithm="dpmsolver++", **k)),
    ("dpm++3m", lambda den, x, grid, **k: sample_dpm_solver(den, x, grid, order=3, algorithm="dpmsolver++", **k)),
]


@pytest.mark.parametrize("name,solver", SOLVER_CASES)
@pytest.mark.parametrize("d", [8, 80])
def test_float64_correction_equals_base_sampler(name, solver, d):
    den = _gmm(d)
    grid = den.schedule.grid(10, "trailing", style="dpmsolver")
    x = _start(den, grid, 64, seed=d)
    base = solver(den, x, grid)
    lml = solver(den, x, grid, correction=LMLCorrection(lamb=1e-3, precision="float64"))
    rel = float((lml - base).norm() / base.norm())
    assert rel <= 1e-8, rel
    # the float32 published arithmetic is not the identity on the same run
    f32 = solver(den, x.float(), grid, correction=LMLCorrection(lamb=1e-3, precision="float32")).double()
    b32 = solver(den, x.float(), grid).double()
    assert float((f32 - b32).norm() / b32.norm()) > 1e-4


def test_flow_euler_float64_identity_and_float32_noise():
    sch = FlowMatchingSchedule()
    den = _gmm(8, sch)
    grid = sch.grid(8, s_start=0.999)
    x = _start(den, grid, 64, seed=1)
    base = sample_flow_euler(den, x, grid)
    out = sample_flow_euler(den, x, grid, correction=LMLCorrection(lamb=1e-2, precision="float64"))
    assert float((out - base).norm() / base.norm()) <= 1e-8


class _Spy:
    """Wraps a correction and records its inputs and outputs."""

    def __init__(self, inner=None):
        self.inner = inner
        self.calls: list[tuple[torch.Tensor, torch.Tensor, str]] = []

    def reset(self):
        self.calls.clear()
        if self.inner is not None:
            self.inner.reset()

    def __call__(self, p):
        out = p.g if self.inner is None else self.inner(p)
        self.calls.append((p.g.detach().clone(), out.detach().clone(), p.scale))
        return out


@pytest.mark.parametrize("name,solver", SOLVER_CASES)
def test_float32_sampler_deviation_follows_the_law_per_step(name, solver):
    den = _gmm(80)
    grid = den.schedule.grid(8, "trailing", style="dpmsolver")
    x = _start(den, grid, 32, seed=3).float()
    lamb = 1e-1
    spy = _Spy(LMLCorrection(lamb=lamb, precision="float32"))
    solver(den, x, grid, correction=spy)
    assert len(spy.calls) == grid.num_steps
    checked = 0
    for g, out, _ in spy.calls:
        assert g.dtype == torch.float32
        law = lml_rounding_law(g, lamb)
        rel = (out.double() - g.double()).norm(dim=1) / g.double().norm(dim=1)
        ok = (law > 1e-5) & (law < 0.1)
        if bool(ok.any()):
            ratio = rel[ok] / law[ok]
            assert float(ratio.min()) > 1 / 3 and float(ratio.max()) < 3, (name, ratio)
            checked += int(ok.sum())
    assert checked > 0


def test_history_is_reset_per_run_and_kappa_uses_the_uncorrected_update():
    den = _gmm(8)
    grid = den.schedule.grid(6, "trailing", style="dpmsolver")
    x = _start(den, grid, 16, seed=4)
    corr = LMLCorrection(lamb=1.0, kappa=0.5, precision="float64")
    a = sample_dpm_solver(den, x, grid, correction=corr)
    b = sample_dpm_solver(den, x, grid, correction=corr)
    assert torch.equal(a, b)
    spy = _Spy(LMLCorrection(lamb=1.0, kappa=0.5, precision="float64"))
    sample_dpm_solver(den, x, grid, correction=spy)
    g0, out0, _ = spy.calls[0]
    g1, out1, _ = spy.calls[1]
    torch.testing.assert_close(out0, g0, rtol=1e-12, atol=1e-12)  # first step: u = g
    torch.testing.assert_close(out1, lm_correct(g1, g0, 1.0, 0.5, "float64"), rtol=1e-12, atol=1e-12)


def test_matched_noise_control_has_the_published_size():
    g = torch.randn(6, 3072, generator=_gen(7))
    lamb = 3.4e-8 * 3072 / 1e-3
    ctl = MatchedNoiseCorrection(lamb=lamb, seed=0)
    ctl.reset()
    out = ctl(g)
    lml = lm_correct(g, None, lamb)
    d_ctl = (out.double() - g.double()).norm(dim=1)
    d_lml = (lml.double() - g.double()).norm(dim=1)
    torch.testing.assert_close(d_ctl, d_lml, rtol=1e-5, atol=0)
    torch.testing.assert_close(out.double().norm(dim=1), g.double().norm(dim=1), rtol=1e-6, atol=0)
    # in the saturated regime too (the published map returns a random sparse vector there)
    sat = MatchedNoiseCorrection(lamb=3.4e-8 * 3072 / 3.0, seed=1)
    out_s = sat(g)
    d_s = (lm_correct(g, None, 3.4e-8 * 3072 / 3.0).double() - g.double()).norm(dim=1)
    torch.testing.assert_close((out_s.double() - g.double()).norm(dim=1), d_s, rtol=1e-5, atol=0)
    assert float(((out - lml).double().norm(dim=1) / d_lml).min()) > 0.5  # a different direction
    ctl.reset()
    assert torch.equal(ctl(g), out)  # reproducible from its seed


def _tiny_unet(dtype: torch.dtype):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(4, 8), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=4)
    return unet.to(dtype).eval()


def test_fp16_model_never_feeds_fp16_into_the_correction():
    try:
        unet = _tiny_unet(torch.float16)
        unet(torch.zeros(1, 3, 8, 8, dtype=torch.float16), torch.tensor([1]))
        half = torch.float16
    except RuntimeError:  # no CPU float16 kernels in this torch build
        unet = _tiny_unet(torch.bfloat16)
        half = torch.bfloat16
    den = UNetDenoiser(unet, default_gmm_schedule())
    grid = den.schedule.grid(3, "trailing", style="dpmsolver")
    x = torch.randn(2, 3, 8, 8, generator=_gen(8))
    for solver in (sample_ddim, sample_dpm_solver):
        spy = _Spy(LMLCorrection(lamb=1e-3))
        with torch.no_grad():
            out = solver(den, x, grid, correction=spy)
        assert len(spy.calls) == 3
        assert {c[0].dtype for c in spy.calls} == {torch.float32}, half
        assert {c[1].dtype for c in spy.calls} == {torch.float32}
        assert out.dtype == torch.float32 and torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------------
# second-order variants
# ---------------------------------------------------------------------------------------------------
def _gauss(c: torch.Tensor, schedule=None) -> GMMDenoiser:
    d = c.numel()
    prior = GaussianMixture(torch.ones(1), torch.zeros(1, d, dtype=F64), c[None])
    return GMMDenoiser(prior, schedule or default_gmm_schedule())


C6 = torch.tensor([4.0, 1.0, 0.3, 0.05, 0.01, 0.002], dtype=F64)


class _NoOracle:
    """A denoiser that hides the oracle's exact JVP (forces autodiff)."""

    def __init__(self, inner):
        self.inner, self.schedule = inner, inner.schedule

    def __call__(self, x, t):
        return self.inner(x, t)


def test_denoiser_jvp_autodiff_matches_the_oracle():
    den = _gmm(8)
    x = torch.randn(4, 8, generator=_gen(9), dtype=F64) * 5
    v = torch.randn(4, 8, generator=_gen(10), dtype=F64)
    exact = den.jvp_x0(x, 300.0, v)
    torch.testing.assert_close(denoiser_jvp(den, x, 300.0, v), exact)
    torch.testing.assert_close(denoiser_jvp(_NoOracle(den), x, 300.0, v), exact, rtol=1e-9, atol=1e-9)

    class _NoForwardAD(torch.autograd.Function):  # has a backward but no forward-mode rule
        @staticmethod
        def forward(ctx, z):
            return z * 1.0

        @staticmethod
        def backward(ctx, g):
            return g

    class _Blocked(_NoOracle):
        def __call__(self, x, t):
            return self.inner(_NoForwardAD.apply(x), t)

    torch.testing.assert_close(denoiser_jvp(_Blocked(den), x, 300.0, v), exact, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("method", ["lanczos", "nystrom"])
def test_full_rank_jvp_curvature_is_exact(method):
    den = _gmm(8)
    t = 400.0
    x = torch.randn(3, 8, generator=_gen(11), dtype=F64) * 6
    a, _ = den.schedule.alpha_sigma(torch.tensor([t]))
    A = jvp_curvature(den, x, t, float(a), 8, method=method, start=torch.randn(3, 8, generator=_gen(12), dtype=F64),
                      generator=_gen(13))
    torch.testing.assert_close(A.dense(), exact_curvature(den, x, t), rtol=1e-8, atol=1e-8)


def test_secant_sign_identity_along_the_ode():
    """Along the probability-flow ODE, d x0_hat = -A dy (Gaussian posterior: exact to first order)."""
    prior = _gauss(C6).prior

    def x0_hat(y, rho):  # Tweedie at y = x / alpha, for the VP point with noise-to-signal ratio rho
        a = 1 / math.sqrt(1 + rho * rho)
        x = y * a
        return (x + (rho * a) ** 2 * prior.score(x, a, rho * a)) / a

    rho = 3.0
    y = torch.randn(4, 6, generator=_gen(14), dtype=F64) * torch.sqrt(C6 + rho**2)
    x0 = x0_hat(y, rho)
    eps = (y - x0) / rho
    drho = -1e-4 * rho
    y2 = y + drho * eps  # the ODE direction dy/drho = eps_hat
    dx0 = x0_hat(y2, rho + drho) - x0
    A = torch.diag(C6 / (C6 + rho**2))  # exact d x0_hat / dy for N(0, diag(c))
    Ady = (y2 - y) @ A
    assert float((dx0 + Ady).norm() / dx0.norm()) < 1e-3
    assert float((dx0 - Ady).norm() / dx0.norm()) > 1.5  # the naive secant has the wrong sign


def test_secant_transport_inverts_the_gaussian_ratio():
    c = torch.tensor([1e-3, 0.1, 1.0, 30.0], dtype=F64)
    r1, r2, rho = 2.0, 0.7, 0.3
    m = c / torch.sqrt((c + r1**2) * (c + r2**2))
    torch.testing.assert_close(secant_to_level(m, r1, r2, rho), c / (c + rho**2), rtol=1e-10, atol=1e-12)
    sc = SecantCurvature(rank=2)
    assert sc.estimate(1.0) is None
    with pytest.raises(ValueError, match="rank"):
        SecantCurvature(rank=0)


@pytest.mark.parametrize("kind", ["eps", "increment", "increment++", "velocity"])
def test_full_rank_gauss_step_is_exact_for_gaussian_data(kind):
    """With the exact curvature, the corrected first-order step is the exact ODE map of Gaussian data,
    whatever the step size (two steps from t = 999)."""
    sched = FlowMatchingSchedule() if kind == "velocity" else default_gmm_schedule()
    den = _gauss(C6, sched)
    if kind == "velocity":
        grid = sched.grid(2, s_start=0.99)
    elif kind == "eps":
        grid = sched.grid(2, "trailing", final="first")
    else:
        grid = sched.grid(2, "trailing", style="dpmsolver")
    a0, s0 = float(grid.alpha[0]), float(grid.sigma[0])
    an, sn = float(grid.alpha[-1]), float(grid.sigma[-1])
    x = torch.randn(5, 6, generator=_gen(15), dtype=F64) * torch.sqrt(a0**2 * C6 + s0**2)
    exact = x * torch.sqrt((an**2 * C6 + sn**2) / (a0**2 * C6 + s0**2))
    corr = HessianStepCorrection("jvp", 6, floor="zero", generator=_gen(16))
    run = {
        "eps": lambda **k: sample_ddim(den, x, grid, **k),
        "increment": lambda **k: sample_dpm_solver(den, x, grid, order=1, algorithm="dpmsolver", **k),
        "increment++": lambda **k: sample_dpm_solver(den, x, grid, order=1, algorithm="dpmsolver++", **k),
        "velocity": lambda **k: sample_flow_euler(den, x, grid, **k),
    }[kind]
    out = run(correction=corr)
    base = run()
    assert float((out - exact).norm() / exact.norm()) < 1e-8
    assert float((base - exact).norm() / exact.norm()) > 1e-2


def test_gauss_step_replace_mode_and_jvp_count():
    den = CountingDenoiser(_gauss(C6))
    grid = den.schedule.grid(3, "trailing", style="dpmsolver")
    a0, s0 = float(grid.alpha[0]), float(grid.sigma[0])
    x = torch.randn(4, 6, generator=_gen(17), dtype=F64) * torch.sqrt(a0**2 * C6 + s0**2)
    exact = x * torch.sqrt(C6 / (a0**2 * C6 + s0**2))
    corr = HessianStepCorrection("jvp", 6, floor="zero", multistep="replace")
    out = sample_dpm_solver(den, x, grid, order=2, algorithm="dpmsolver++", correction=corr)
    assert float((out - exact).norm() / exact.norm()) < 1e-8
    assert den.nfe == 3 and den.extra.get("jvp_x0") == 3 * 6 and corr.jvp_calls == 18


def test_secant_and_first_step_jvp_variants_run_and_change_the_sample():
    den = _gmm(80)
    grid = den.schedule.grid(6, "trailing", style="dpmsolver")
    x = _start(den, grid, 32, seed=5)
    base = sample_dpm_solver(den, x, grid, order=1)
    for corr in (HessianStepCorrection("secant", 1), HessianStepCorrection("secant", 2, floor="zero"),
                 HessianStepCorrection("jvp", 3, refresh="first"),
                 HessianStepCorrection("jvp", 3, adaptive=True, damping=0.1),
                 HessianStepCorrection("jvp", 2, mode="lm", damping=0.5)):
        out = sample_dpm_solver(den, x, grid, order=1, correction=corr)
        assert torch.isfinite(out).all()
        assert float((out - base).norm() / base.norm()) > 1e-4, corr
    with pytest.raises(ValueError, match="source"):
        HessianStepCorrection("fisher")
    with pytest.raises(ValueError, match="damping"):
        HessianStepCorrection(damping=-1.0)
    with pytest.raises(ValueError, match="refresh"):
        HessianStepCorrection("jvp", refresh="never")


def _gauss_level_samples(den, t, n, seed, scale=1.0):
    a, s = (float(v) for v in den.schedule.alpha_sigma(torch.tensor([t])))
    v = a * a * C6 + s * s
    return torch.randn(n, 6, generator=_gen(seed), dtype=F64) * torch.sqrt(v) * scale, v


def _corrector_ctx(den, t, x):
    from hessdiff.samplers.solvers import StepContext

    a, s = (float(v) for v in den.schedule.alpha_sigma(torch.tensor([t])))
    return StepContext(0, 1, torch.tensor(t, dtype=F64), a, s, a, s, x, den(x, t), den, _gen(99))


def test_newton_langevin_ou_corrector_preserves_and_finds_the_gaussian_level():
    den = _gauss(C6)
    t = 500.0
    x, v = _gauss_level_samples(den, t, 4000, seed=18)
    cor = NewtonLangevinCorrector("jvp", 6, n_steps=1, step_size=0.7, damping=1e-9, floor="zero",
                                  generator=_gen(19))
    out = cor(x, _corrector_ctx(den, t, x))
    assert float((out.var(0) / v - 1).abs().max()) < 0.1  # invariant
    bad = x * 0.2
    cor = NewtonLangevinCorrector("jvp", 6, n_steps=8, step_size=1.0, damping=1e-9, floor="zero", generator=_gen(20))
    out = cor(bad, _corrector_ctx(den, t, bad))
    assert float((out.var(0) / v - 1).abs().max()) < 0.1  # converges from a wrong start
    assert cor.nfe == 8 and cor.jvps == 6
    # one Euler step from the exact law inflates the variance by 1 + h^2 on a Gaussian
    cor = NewtonLangevinCorrector("jvp", 6, n_steps=1, step_size=0.5, damping=1e-9, floor="zero",
                                  integrator="euler", generator=_gen(21))
    out = cor(x, _corrector_ctx(den, t, x))
    assert float((out.var(0) / v).mean()) == pytest.approx(1 + 0.5**2, rel=0.05)


def test_newton_langevin_corrector_in_a_solver_and_validation():
    den = CountingDenoiser(_gmm(8))
    grid = den.schedule.grid(5, "trailing", style="dpmsolver")
    x = _start(den.inner, grid, 16, seed=6)
    cor = NewtonLangevinCorrector("jvp", 2, n_steps=2, max_calls=2)
    out = sample_dpm_solver(den, x, grid, corrector=cor, generator=_gen(22))
    assert torch.isfinite(out).all()
    assert cor.calls == 2 and den.nfe == 5 + 2 * 2 and den.extra["jvp_x0"] == 2 * 2
    sec = NewtonLangevinCorrector("secant", 2, n_steps=3, sigma_range=(0.0, 0.5))
    out2 = sample_dpm_solver(den, x, grid, corrector=sec, generator=_gen(23))
    assert torch.isfinite(out2).all()
    for bad in (dict(integrator="rk4"), dict(n_steps=0), dict(step_size=0.0), dict(damping=0.0)):
        with pytest.raises(ValueError):
            NewtonLangevinCorrector(**bad)


def test_sample_functions_step_selection_and_chaining():
    from hessdiff.samplers.lml import ChainCorrection, sample_lml, sample_lml_jvp

    den = CountingDenoiser(_gmm(8))
    grid = den.schedule.grid(5, "trailing", style="dpmsolver")
    x = _start(den.inner, grid, 16, seed=7)
    ref = sample_dpm_solver(den, x, grid, order=3, algorithm="dpmsolver",
                            correction=LMLCorrection(2e-3, 0.0, "float32"))
    assert torch.equal(sample_lml(den, x, grid, solver="dpm", lamb=2e-3), ref)
    den.nfe, den.extra = 0, {}
    out = sample_lml_jvp(den, x, grid, solver="dpm++", rank=2)
    assert den.nfe == 5 and den.extra["jvp_x0"] == 2 and torch.isfinite(out).all()
    # only="last" / only="first" touch exactly one step
    for only, idx in (("first", 0), ("last", 4)):
        spy = _Spy(HessianStepCorrection("jvp", 2, only=only))
        sample_dpm_solver(den, x, grid, order=1, correction=spy)
        changed = [i for i, (g, o, _) in enumerate(spy.calls) if not torch.equal(g, o)]
        assert changed == [idx], (only, changed)
    chain = ChainCorrection(LMLCorrection(1.0, 0.0, "float64"), HessianStepCorrection("jvp", 2, only="first"))
    torch.testing.assert_close(sample_dpm_solver(den, x, grid, order=1, correction=chain),
                               sample_dpm_solver(den, x, grid, order=1,
                                                 correction=HessianStepCorrection("jvp", 2, only="first")))
    with pytest.raises(ValueError, match="only"):
        HessianStepCorrection(only="middle")
    with pytest.raises(ValueError, match="hold"):
        HessianStepCorrection("jvp", refresh="first", hold=0)
    with pytest.raises(ValueError, match="at least one"):
        ChainCorrection()


def test_jvp_variant_runs_on_a_real_unet_through_autodiff():
    unet = _tiny_unet(torch.float32)
    den = CountingDenoiser(UNetDenoiser(unet, default_gmm_schedule()))
    grid = den.schedule.grid(2, "trailing", style="dpmsolver")
    x = torch.randn(1, 3, 8, 8, generator=_gen(31))
    corr = HessianStepCorrection("jvp", 1, only="first")
    with torch.no_grad():
        base = sample_dpm_solver(den, x, grid, order=2)
        den.nfe = 0
        out = sample_dpm_solver(den, x, grid, order=2, correction=corr)
    assert torch.isfinite(out).all() and out.dtype == torch.float32
    # each autodiff JVP is one (counted) network evaluation, counted apart from the forward passes
    assert den.evaluations == 2 + 1 and den.nfe == 2 and den.extra == {"jvp_x0": 1}
    assert float((out - base).norm() / base.norm()) > 1e-6


@pytest.mark.parametrize("method", ["lanczos", "nystrom"])
def test_projected_jvp_curvature_is_the_compressed_operator(method):
    den = _gmm(8)
    t = 400.0
    x = torch.randn(3, 8, generator=_gen(21), dtype=F64) * 6
    a, _ = den.schedule.alpha_sigma(torch.tensor([t]))
    n = x / x.norm(dim=1, keepdim=True)
    A = jvp_curvature(den, x, t, float(a), 7, method=method, start=torch.randn(3, 8, generator=_gen(22), dtype=F64),
                      generator=_gen(23), project=n)
    P = torch.eye(8, dtype=F64) - n[:, :, None] * n[:, None, :]
    assert float((A.U * n[:, :, None]).sum(1).abs().max()) < 1e-10  # eigenvectors orthogonal to n
    dense = A.U @ torch.diag_embed(A.s) @ A.U.transpose(1, 2)  # rank 7 = the whole complement of n
    torch.testing.assert_close(dense, P @ exact_curvature(den, x, t) @ P, rtol=1e-8, atol=1e-8)


def test_radial_exclude_leaves_the_radial_part_of_the_step_to_the_base_solver():
    den = CountingDenoiser(_gmm(80))
    grid = den.schedule.grid(6, "trailing", style="dpmsolver")
    x = _start(den, grid, 16, seed=7)
    seen = []

    class Spy(HessianStepCorrection):
        def __call__(self, p):
            out = super().__call__(p)
            seen.append((flat(p.x).clone(), flat(out - p.g).clone()))
            return out

    corr = Spy("jvp", 2, only="first", radial="exclude")
    out = sample_dpm_solver(den, x, grid, order=2, algorithm="dpmsolver++", correction=corr)
    base = sample_dpm_solver(den, x, grid, order=2, algorithm="dpmsolver++")
    assert torch.isfinite(out).all() and float((out - base).norm() / base.norm()) > 1e-4
    xs, change = seen[0]
    cos = (xs * change).sum(1) / (xs.norm(dim=1) * change.norm(dim=1))
    assert float(cos.abs().max()) < 1e-10 and float(change.norm()) > 0  # the change is orthogonal to x
    assert corr.jvp_calls == 2
    with pytest.raises(ValueError, match="radial"):
        HessianStepCorrection(radial="drop")
