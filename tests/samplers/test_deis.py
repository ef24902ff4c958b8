"""DEIS (tAB-DEIS, Zhang & Chen 2023): its coefficients against a direct quadrature, tAB0 = DDIM, parity
with diffusers' (log-rho) DEISMultistepScheduler where the two are the same method, convergence orders
on the exact-W2 Gaussian, the low-NFE grids of PAPERS.md 7, and the registry / CLI."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from diffusers import DEISMultistepScheduler

from hessdiff.samplers.loop import sample
from hessdiff.samplers.oracles.gmm import GaussianMixture, GMMDenoiser, cifar_like_spectrum
from hessdiff.samplers.schedule import ContinuousVPSchedule, DiscreteVPSchedule, FlowMatchingSchedule
from hessdiff.samplers.solvers import DEIS, SOLVERS, make_solver, sample_ddim, sample_deis, tab_coefficients
from hessdiff.scripts.bench.gmm import convergence_order, gaussian_prior_w2

CFG = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}
F64 = torch.float64
DISCRETE = DiscreteVPSchedule.from_config(CFG)
VP_LINEAR = ContinuousVPSchedule.linear()


def _loglinear_schedule(lmax: float = 6.0, lmin: float = -5.0) -> ContinuousVPSchedule:
    """log-SNR affine in the model time, ``lambda(t) = lmax - (lmax - lmin) t``: ``log rho`` is affine in ``t``."""
    def lam(t):
        return lmax - (lmax - lmin) * t
    return ContinuousVPSchedule(lambda t: torch.sigmoid(2 * lam(t)).sqrt(), lambda t: torch.sigmoid(-2 * lam(t)).sqrt(),
                                t_min=0.0, t_max=1.0, name="loglinear")


def _prior() -> GaussianMixture:
    g = torch.Generator().manual_seed(0)
    return GaussianMixture(torch.rand(3, generator=g, dtype=F64) + 0.2, 2.0 * torch.randn(3, 6, generator=g, dtype=F64),
                           torch.rand(3, 6, generator=g, dtype=F64) + 0.1)


def _start(grid, seed: int = 1) -> torch.Tensor:
    return float(grid.sigma[0]) * torch.randn(5, 6, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _rho_np(schedule):
    return lambda t: schedule.rho(torch.from_numpy(t)).numpy()


# ------------------------------------------------------------------------------------------ coefficients
@pytest.mark.parametrize("schedule, t_nodes, t_next", [
    (VP_LINEAR, [0.5, 0.62, 0.75, 0.93], 0.41),
    (DISCRETE, [400.3, 480.0, 600.7, 760.2], 330.5),  # rho has kinks at the integer times
])
def test_coefficients_match_a_direct_quadrature(schedule, t_nodes, t_next):
    """C_j = int l_j(tau) rho'(tau) dtau, the integrand deis and diff-sampler sum (here: a 2e5-point midpoint
    rule with rho' by autograd), against ours (by parts, Gauss--Legendre); and sum_j C_j = rho_next - rho."""
    n = 200_000
    tau = torch.linspace(t_nodes[0], t_next, n + 1, dtype=F64)
    mid = (0.5 * (tau[1:] + tau[:-1])).requires_grad_(True)
    drho = torch.autograd.grad(schedule.rho(mid).sum(), mid)[0].detach()
    mid, dtau = mid.detach(), (t_next - t_nodes[0]) / n
    rho_ends = schedule.rho(torch.tensor([t_nodes[0], t_next], dtype=F64))
    for p in range(1, len(t_nodes) + 1):
        nodes = t_nodes[:p]
        breaks = np.arange(331.0, 401.0) if isinstance(schedule, DiscreteVPSchedule) else ()
        ours = tab_coefficients(_rho_np(schedule), nodes, t_next, breaks=breaks)
        for j in range(p):
            lj = torch.ones_like(mid)
            for k in range(p):
                if k != j:
                    lj = lj * (mid - nodes[k]) / (nodes[j] - nodes[k])
            ref = float((lj * drho).sum() * dtau)
            assert ours[j] == pytest.approx(ref, rel=1e-7, abs=1e-10), (p, j)
        assert sum(ours) == pytest.approx(float(rho_ends[1] - rho_ends[0]), rel=1e-12)


def test_coefficients_integrate_polynomials_in_t_exactly():
    """With r + 1 nodes, sum_j C_j q(t_j) = int q(tau) drho(tau) for every q of degree <= r."""
    sch, nodes, t_next = VP_LINEAR, [0.3, 0.36, 0.45, 0.6], 0.22
    C = tab_coefficients(_rho_np(sch), nodes, t_next)
    x, w = np.polynomial.legendre.leggauss(64)
    tau = torch.tensor(0.5 * (t_next - nodes[0]) * x + 0.5 * (t_next + nodes[0]), dtype=F64).requires_grad_(True)
    drho = torch.autograd.grad(sch.rho(tau).sum(), tau)[0].detach().numpy()
    tau = tau.detach().numpy()
    for k in range(4):
        exact = float(np.sum(0.5 * (t_next - nodes[0]) * w * tau**k * drho))
        assert sum(c * t**k for c, t in zip(C, nodes, strict=True)) == pytest.approx(exact, rel=1e-12)


def test_discrete_rho_agrees_with_alpha_sigma():
    t = torch.tensor([0.0, 0.25, 1.0, 17.5, 500.0, 998.75, 999.0], dtype=F64)
    a, s = DISCRETE.alpha_sigma(t)
    torch.testing.assert_close(DISCRETE.rho(t), s / a, rtol=1e-11, atol=0)
    tc = torch.tensor([0.001, 0.3, 1.0], dtype=F64)
    a, s = VP_LINEAR.alpha_sigma(tc)
    assert torch.equal(VP_LINEAR.rho(tc), s / a)


# ------------------------------------------------------------------------------------------ tAB0 = DDIM
@pytest.mark.parametrize("schedule, n, spacing, final", [
    (DISCRETE, 10, "trailing", "zero"), (DISCRETE, 7, "logsnr", "first"), (DISCRETE, 9, "quadratic", "zero"),
    (VP_LINEAR, 9, "quadratic", "end"), (VP_LINEAR, 6, "karras", "zero"),
])
def test_tab0_is_ddim(schedule, n, spacing, final):
    """tAB0 (degree-0 extrapolation, the exponential integrator of order 1) is DDIM to float64 rounding. (The
    paper's tAB-r has degree r: tAB1 is the linear, two-evaluation method, not DDIM.)"""
    den = GMMDenoiser(_prior(), schedule)
    grid = schedule.grid(n, spacing, final=final)
    x = _start(grid)
    ours, ddim = sample_deis(den, x, grid, order=0), sample_ddim(den, x, grid)
    assert (ours - ddim).abs().max().item() <= 1e-13 * ddim.abs().max().item()


def test_warm_start_and_last_step_to_sigma_zero():
    den = GMMDenoiser(_prior(), DISCRETE)
    grid = DISCRETE.grid(8, "quadratic", final="zero")
    x = _start(grid)
    preds = []
    res = sample(den, x, grid, DEIS(3), callback=lambda i, t, z, p: preds.append(p))
    assert res.info["orders"] == [0, 1, 2, 3, 3, 3, 3, 0]  # warm start; the step to sigma = 0 is Tweedie's
    torch.testing.assert_close(res.samples, preds[-1].x0, rtol=0, atol=1e-12)
    assert sample(den, x, grid, DEIS(3, lower_order_final=True)).info["orders"] == [0, 1, 2, 3, 3, 3, 1, 0]
    first = DISCRETE.grid(8, "quadratic", final="first")
    assert sample(den, x, first, DEIS(2)).info["orders"] == [0, 1, 2, 2, 2, 2, 2, 2]
    # DEIS(3) is DEIS(r) while its history holds r + 1 evaluations at most (steps 0..r), then departs
    states = {}
    for r in (1, 2, 3):
        states[r] = []
        sample(den, x, first, DEIS(r), callback=lambda i, t, z, p, r=r: states[r].append(z))
    for r in (1, 2):
        assert all(torch.equal(a, b) for a, b in zip(states[r][: r + 1], states[3][: r + 1], strict=True))
        assert not torch.equal(states[r][r + 1], states[3][r + 1])


# ------------------------------------------------------------------------------------------ diffusers
def _diffusers_deis(den, grid, x, solver_order):
    """diffusers' DEISMultistepScheduler stepped on our grid: its sigmas are set to our ``sigma / alpha``."""
    ds = DEISMultistepScheduler(num_train_timesteps=1000, solver_order=solver_order)
    ds.set_timesteps(grid.num_steps)
    ds.sigmas = (grid.sigma / grid.alpha).clone()
    for k, t in enumerate(ds.timesteps):
        x = ds.step(den(x, grid.t[k]).eps, t, x).prev_sample
    return x


@pytest.mark.parametrize("n", [8, 12, 20])
@pytest.mark.parametrize("order", [0, 1, 2])
def test_matches_diffusers_where_the_methods_coincide(n, order):
    """diffusers' DEIS is the log-rho variant (Lagrange basis in log rho); tAB uses the basis in the model time.
    They are the same method when t is affine in log rho: a schedule whose log-SNR is linear in t. diffusers'
    ``solver_order`` counts evaluations (= tAB degree + 1) and lowers the last two steps for n < 15."""
    sch = _loglinear_schedule()
    den = GMMDenoiser(_prior(), sch)
    grid = sch.grid(n, "uniform", final="end", t_end=0.02)
    x = _start(grid)
    theirs = _diffusers_deis(den, grid, x, order + 1)
    ours = sample_deis(den, x, grid, order=order, lower_order_final=True)
    assert (ours - theirs).abs().max().item() <= 1e-12


def test_differs_from_diffusers_on_the_ddpm_schedule():
    """On the DDPM schedule (t not affine in log rho) tAB and diffusers' log-rho DEIS are different methods:
    no parity is asserted there, only that they differ by far more than rounding."""
    den = GMMDenoiser(_prior(), DISCRETE)
    grid = DISCRETE.grid(10, "logsnr", final="first")
    x = _start(grid)
    for order in (1, 2):
        ours = sample_deis(den, x, grid, order=order, lower_order_final=True)
        assert (ours - _diffusers_deis(den, grid, x, order + 1)).abs().max().item() > 1e-2


# ------------------------------------------------------------------------------------------ orders
NFES = (80, 160, 320)


@pytest.fixture(scope="module")
def errors():
    """Exact W2 on N(0, diag(cifar_like_spectrum(8))) (as tests/samplers/test_unipc.py), log-SNR grids: the
    smooth VP-SDE linear schedule (continuous time, landing on t_min) and the DDPM one (landing on t = 0)."""
    c = cifar_like_spectrum(8)
    setups = {"vp-linear": dict(schedule=VP_LINEAR, final="end"), "ddpm": dict(schedule=DISCRETE, final="first")}
    return {(s, r): [gaussian_prior_w2(partial(sample_deis, order=r), n, c, spacing="logsnr", **kw) for n in NFES]
            for s, kw in setups.items() for r in (1, 2, 3)}


@pytest.mark.parametrize("r", [1, 2, 3])
def test_convergence_order_on_a_smooth_schedule(errors, r):
    """tAB-r is of order r + 1 (measured 1.96 / 2.91 / 3.85 over NFE 80-320); slack 0.25."""
    p = convergence_order(NFES, errors["vp-linear", r])
    assert r + 1 - 0.25 <= p <= r + 1 + 0.3, p


@pytest.mark.parametrize("r, slack", [(1, 0.25), (2, 0.25), (3, 0.75)])
def test_convergence_order_on_the_ddpm_schedule(errors, r, slack):
    """On the discrete DDPM schedule log(sigma/alpha) is interpolated linearly between integer times, so eps
    along the trajectory is only piecewise smooth in t and the degree-3 interpolant loses accuracy once steps
    are a few integer times long (measured 1.96 / 2.90 / 3.47 over NFE 80-320): slack 0.75 for tAB3."""
    p = convergence_order(NFES, errors["ddpm", r])
    assert r + 1 - slack <= p <= r + 1 + 0.3, p


def test_higher_degree_helps_at_low_nfe():
    """On DEIS's quadratic time grid at NFE 5-10 (exact W2, d = 8, landing on t = 0) each degree lowers the error."""
    c = cifar_like_spectrum(8)
    for n in (5, 6, 8, 10):
        e = [gaussian_prior_w2(partial(sample_deis, order=r), n, c, spacing="quadratic", final="first")
             for r in (0, 1, 2, 3)]
        assert all(a > b for a, b in zip(e, e[1:], strict=False)), (n, e)


# ------------------------------------------------------------------------------------------ low-NFE grids
@pytest.mark.parametrize("schedule", [DISCRETE, VP_LINEAR], ids=["ddpm", "vp-linear"])
def test_low_nfe_grids(schedule):
    """PAPERS.md 7: EDM's polynomial (rho = 7) spacing of sigma/alpha, uniform log-SNR, uniform time and DEIS's
    quadratic time, each from t_max; a discrete grid's n network times are the first n of the n + 1 points
    that end at t = 0 (then sigma = 0), a continuous grid's end at t_min."""
    n = 9
    disc = isinstance(schedule, DiscreteVPSchedule)
    lo, hi = schedule.t_min, schedule.t_max
    rho_lo, rho_hi = (float(v) for v in schedule.rho(torch.tensor([lo, hi], dtype=F64)))

    def points(spacing, **kw):
        g = schedule.grid(n, spacing, final="zero", **kw)
        assert g.num_steps == n and float(g.sigma[-1]) == 0.0 and float(g.t[0]) == hi
        t, rho = g.t[:-1], (g.sigma / g.alpha)[:-1]
        if disc:  # append the point the grid ends at
            t, rho = torch.cat([t, torch.tensor([lo], dtype=F64)]), torch.cat([rho, torch.tensor([rho_lo], dtype=F64)])
        assert abs(float(t[-1]) - lo) < 1e-9 and float(rho[-1]) == pytest.approx(rho_lo, rel=1e-9)
        return t, rho

    def uniform(v, tol):
        d = torch.diff(v)
        torch.testing.assert_close(d, d.mean().expand_as(d), rtol=tol, atol=tol * float(d.abs().mean()))

    t, rho = points("karras", rho=7.0)
    uniform(rho ** (1 / 7), 1e-8)
    assert float(rho[0]) == pytest.approx(rho_hi, rel=1e-12)
    t, rho = points("logsnr")
    uniform(torch.log(rho), 1e-8)
    t, _ = points("uniform")
    uniform(t, 1e-12)
    t, _ = points("quadratic")
    uniform(t.sqrt(), 1e-12)
    with pytest.raises(ValueError, match="unknown spacing"):
        schedule.grid(n, "cubic")


# ------------------------------------------------------------------------------------------ plumbing
def test_registry_cli_name_and_bad_input():
    from hessdiff.scripts.cmd_sample import SAMPLERS

    assert "deis" in SAMPLERS and "deis" in SOLVERS
    m = make_solver("deis")
    assert isinstance(m, DEIS) and m.order == 3 and m.name == "deis-tab3"
    assert make_solver("deis", order=1).name == "deis-tab1"
    with pytest.raises(ValueError, match="order must be 0, 1, 2 or 3"):
        DEIS(4)
    den = GMMDenoiser(_prior(), DISCRETE)
    other = DiscreteVPSchedule.from_config({**CFG, "beta_end": 0.012}).grid(6, "trailing")
    with pytest.raises(ValueError, match="must come from the schedule"):
        sample_deis(den, _start(other), other)
    flow = FlowMatchingSchedule().grid(6)
    with pytest.raises(ValueError, match="alpha > 0"):
        sample_deis(GMMDenoiser(_prior(), FlowMatchingSchedule()), _start(flow), flow)


def test_correction_hook_acts_on_the_combined_noise():
    den = GMMDenoiser(_prior(), DISCRETE)
    grid = DISCRETE.grid(6, "quadratic")
    x = _start(grid)
    calls = []

    def identity(p):
        calls.append(p)
        return p.g

    identity.reset = lambda: None
    base = sample_deis(den, x, grid)
    assert torch.equal(sample_deis(den, x, grid, correction=identity), base)
    assert len(calls) == 6 and torch.equal(calls[0].g, calls[0].pred.eps)  # step 0: the DDIM step
    p = calls[3]
    torch.testing.assert_close(p.offset, (p.alpha_next / p.alpha) * p.x, rtol=0, atol=0)
    assert p.scale == pytest.approx(p.sigma_next - p.alpha_next * p.sigma / p.alpha, rel=1e-14)
    assert torch.equal(p.first_order(p.pred.x0, p.pred.eps), p.pred.eps)


def test_cli_sample_with_deis(tmp_path):
    """``hessdiff sample --sampler deis`` on a tiny random DDPM pipeline."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    from hessdiff.scripts import cli

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(4, 8), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "m")
    out = tmp_path / "s"
    assert cli.main(["sample", "--model", str(tmp_path / "m"), "--sampler", "deis", "--steps", "5", "--seeds", "0-1",
                     "--device", "cpu", "--quiet", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "seed0000.png", "seed0001.png"]
