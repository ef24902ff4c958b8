"""Posterior samplers (DPS, latent DPS, PSLD, STSL) against exact Gaussian-mixture oracles."""

import math

import numpy as np
import pytest
import torch

from hessdiff.eval.metrics.distances import component_tv, posterior_mean_error, sliced_wasserstein
from hessdiff.samplers.guidance import (
    POSTERIOR_SAMPLERS,
    get_posterior_sampler,
    hutchinson_trace_fd,
    sample_dps,
    sample_latent_dps,
    sample_psld,
    sample_stsl,
)
from hessdiff.samplers.oracles.gmm import GaussianMixture, GMMDenoiser, LinearAutoencoder, grid_gmm_problem
from hessdiff.samplers.solvers import sample_ddim
from hessdiff.tasks.operators import MatrixOperator

DT = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _start(den: GMMDenoiser, grid, n: int, d: int, seed: int = 0) -> torch.Tensor:
    return float(grid.sigma[0]) * torch.randn(n, d, generator=_gen(seed), dtype=DT)


def _latent_problem(seed: int = 0, d_x: int = 10, d_z: int = 4, d_y: int = 2, sigma_y: float = 0.3):
    """A 3-component latent mixture, an orthonormal linear decoder ``x = W z`` (d_x > d_z), and
    ``y = A W z* + n``; the exact latent posterior is ``prior.posterior(A W, y, sigma_y)``."""
    g = _gen(seed)
    prior = GaussianMixture(torch.tensor([0.5, 0.3, 0.2]), 3.0 * torch.randn(3, d_z, generator=g, dtype=DT),
                            0.3 + torch.rand(3, generator=g, dtype=DT))
    ae = LinearAutoencoder.random(d_x, d_z, generator=g)
    A = torch.randn(d_y, d_x, generator=g, dtype=DT) / math.sqrt(d_x)
    z_true = prior.sample(1, g)
    y = (ae.decode(z_true) @ A.T + sigma_y * torch.randn(1, d_y, generator=g, dtype=DT))
    post = prior.posterior(A @ ae.W, y[0], sigma_y)
    return prior, ae, MatrixOperator(A), y, post


# ---------------------------------------------------------------------------------------------- plumbing
def test_gmm_denoiser_is_differentiable():
    """autograd through GMMDenoiser gives Jᵀv, and the x0-Jacobian is symmetric: Jᵀv = J v (jvp_x0)."""
    prob = grid_gmm_problem(8, 2, 0, sigma_y=0.1)
    den = GMMDenoiser(prob.prior)
    x = 2.0 * torch.randn(6, 8, generator=_gen(0), dtype=DT)
    v = torch.randn(6, 8, generator=_gen(1), dtype=DT)
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad((den(xr, 400.0).x0 * v).sum(), xr)
    torch.testing.assert_close(g, den.jvp_x0(x, 400.0, v), rtol=1e-9, atol=1e-9)


def test_registry_names():
    assert set(POSTERIOR_SAMPLERS) == {"dps", "latent_dps", "psld", "stsl", "mmps", "tmpd", "pigdm", "diffpir",
                                       "daps"}
    assert get_posterior_sampler("stsl") is sample_stsl
    with pytest.raises(ValueError, match="unknown posterior sampler"):
        get_posterior_sampler("p2l")


# ---------------------------------------------------------------------------------------------- trace term
def _exact_grad_trace(prior: GaussianMixture, x: torch.Tensor, a: float, s: float) -> torch.Tensor:
    """grad_x tr(grad^2 log p_t)(x) by autograd through the oracle's exact dense Hessian."""
    xr = x.clone().requires_grad_(True)
    tr = torch.diagonal(prior.hessian(xr, a, s), dim1=-2, dim2=-1).sum(-1)
    return torch.autograd.grad(tr.sum(), xr)[0]


def _probe_gradients(den: GMMDenoiser, z: torch.Tensor, t: float, s: float, n: int, c: float) -> torch.Tensor:
    """One gradient of the one-probe estimator per row (the same z repeated, a fresh probe per row)."""
    zr = z.expand(n, -1).clone().requires_grad_(True)
    est = hutchinson_trace_fd(den, zr, t, s, num_probes=1, probe_scale=c, generator=_gen(7))
    return torch.autograd.grad(est.sum(), zr)[0]


def _trace_prior() -> GaussianMixture:
    return GaussianMixture(torch.tensor([0.6, 0.4]), torch.tensor([[-1.0, 0.5], [1.5, -0.5]], dtype=DT),
                           torch.tensor([0.3, 0.5], dtype=DT))


def _assert_within_mc(grads: torch.Tensor, target: torch.Tensor, z_sigmas: float = 4.5) -> None:
    mean = grads.mean(0)
    se = grads.std(0) / math.sqrt(grads.shape[0])
    assert bool(((mean - target).abs() <= z_sigmas * se).all()), (mean, target, se)
    # the test has power: the target is resolved well beyond the Monte Carlo error
    assert float(target.norm()) > 10 * float(se.norm())


def test_trace_gradient_small_probe_matches_exact_hessian_trace_gradient():
    """E_e[grad (1/c) eᵀ(s(z+ce) - s(z))] -> grad tr(grad^2 log p_t)(z) as c -> 0 (bias O(c^2))."""
    prior = _trace_prior()
    den = GMMDenoiser(prior)
    t = 200.0
    a, s = (float(v) for v in den.schedule.alpha_sigma(torch.tensor(t)))
    z = torch.tensor([[0.2, 0.1]], dtype=DT)
    grads = _probe_gradients(den, z, t, s, 40_000, c=1e-3)
    _assert_within_mc(grads, _exact_grad_trace(prior, z, a, s)[0])


def test_trace_gradient_unit_probe_matches_smoothed_exact_gradient():
    """The paper's unit probe (c = 1): the expected gradient is E_e[grad tr(grad^2 log p_t)(z + e)]
    (Stein's lemma), computed here by 40x40 Gauss-Hermite quadrature of the exact gradient."""
    prior = _trace_prior()
    den = GMMDenoiser(prior)
    t = 600.0
    a, s = (float(v) for v in den.schedule.alpha_sigma(torch.tensor(t)))
    z = torch.tensor([[0.3, -0.2]], dtype=DT)
    nodes, weights = (torch.from_numpy(v) for v in np.polynomial.hermite_e.hermegauss(40))
    e1, e2 = torch.meshgrid(nodes, nodes, indexing="ij")
    w = (weights[:, None] * weights[None, :]).flatten() / (2 * math.pi)
    pts = z + torch.stack([e1.flatten(), e2.flatten()], -1)
    smoothed = (w[:, None] * _exact_grad_trace(prior, pts, a, s)).sum(0)
    grads = _probe_gradients(den, z, t, s, 40_000, c=1.0)
    _assert_within_mc(grads, smoothed)
    # and it differs from the unsmoothed gradient here, so the comparison is not vacuous
    assert float((smoothed - _exact_grad_trace(prior, z, a, s)[0]).norm()) > 0.05 * float(smoothed.norm())


# ---------------------------------------------------------------------------------------------- sanity
def test_stsl_with_eta_zero_equals_latent_dps_step_for_step():
    """eta = 0, one inner step: STSL's update is latent DPS with the gradient step before the DDIM step."""
    prior, ae, op, y, _ = _latent_problem()
    den = GMMDenoiser(prior)
    grid = den.schedule.grid(12, "trailing")
    z = _start(den, grid, 8, prior.dim)
    seq_a, seq_b = [], []
    ra = sample_stsl(den, op, y, z, grid, ae, lam=0.4, eta=0.0, inner_steps=1, init="noise",
                     callback=lambda i, t, x, p: seq_a.append(x.clone()))
    rb = sample_latent_dps(den, op, y, z, grid, ae, zeta=0.4, norm="squared", placement="before",
                           callback=lambda i, t, x, p: seq_b.append(x.clone()))
    assert len(seq_a) == len(seq_b) == 12
    for xa, xb in zip(seq_a, seq_b, strict=True):
        torch.testing.assert_close(xa, xb, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(ra.samples, sample_ddim(den, z, grid))  # the guidance did act
    # no probe evaluations when eta = 0: one forward per inner step + one per DDIM step
    assert ra.cost.network_forward == rb.cost.network_forward == 2 * 12
    assert ra.cost.network_backward == 12


def _zero_problem():
    prob = grid_gmm_problem(8, 2, 0, sigma_y=0.1)
    return prob.prior, MatrixOperator(torch.zeros(2, 8, dtype=DT)), torch.zeros(1, 2, dtype=DT)


@pytest.mark.parametrize("method", ["dps", "latent_dps", "psld", "stsl"])
def test_zero_operator_gives_the_unconditional_sampler(method):
    """A = 0: every guidance gradient vanishes exactly, so each method is its unconditional loop
    (DDPM for DPS, DDIM otherwise) sample for sample."""
    prior, op, y = _zero_problem()
    den = GMMDenoiser(prior)
    grid = den.schedule.grid(15, "trailing")
    x = _start(den, grid, 16, 8)
    ae = LinearAutoencoder(torch.eye(8))
    if method == "dps":
        out = sample_dps(den, op, y, x, grid, zeta=0.3, generator=_gen(3)).samples
        ref = sample_ddim(den, x, grid, eta=1.0, generator=_gen(3))
    else:
        kw = {"lam": 5.0, "eta": 0.0, "init": "noise"} if method == "stsl" else {}
        out = POSTERIOR_SAMPLERS[method](den, op, y, x, grid, ae, **kw).samples
        ref = sample_ddim(den, x, grid)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_zero_operator_stsl_with_trace_term_stays_near_the_prior():
    """With A = 0 STSL's data term vanishes but its trace drift (eta = 0.02) does not: it still
    samples the prior closely (sliced W1 within 3x the exact-draw floor)."""
    prior, op, y = _zero_problem()
    den = GMMDenoiser(prior)
    grid = den.schedule.grid(20, "trailing")
    x = _start(den, grid, 1000, 8)
    out = sample_stsl(den, op, y, x, grid, lam=0.05, eta=0.02, inner_steps=3, init="noise",
                      generator=_gen(5)).samples
    ref, other = prior.sample(1000, _gen(11)), prior.sample(1000, _gen(12))
    floor = sliced_wasserstein(other, ref, 500)
    base = sliced_wasserstein(sample_ddim(den, x, grid), ref, 500)
    got = sliced_wasserstein(out, ref, 500)
    assert got < 3 * max(floor, base), (got, floor, base)


# ---------------------------------------------------------------------------------------------- oracles
def _metrics(samples, post, ref):
    return (sliced_wasserstein(samples, ref, 500), component_tv(samples, post),
            posterior_mean_error(samples, post.mean()))


RUNS = {
    "dps": lambda den, op, y, x, grid, ae: sample_dps(den, op, y, x, grid, zeta=0.3, generator=_gen(1)),
    "latent_dps": lambda den, op, y, x, grid, ae: sample_latent_dps(den, op, y, x, grid, ae, zeta=1.0),
    "psld": lambda den, op, y, x, grid, ae: sample_psld(den, op, y, x, grid, ae, gamma=0.1, omega=1.0),
    "stsl": lambda den, op, y, x, grid, ae: sample_stsl(den, op, y, x, grid, ae, lam=0.05, eta=0.02,
                                                        inner_steps=3, generator=_gen(2)),
}


@pytest.mark.parametrize("method", ["dps", "latent_dps", "psld", "stsl"])
def test_pixel_gmm_posterior_is_approached(method):
    """Grid GMM (d_x = 8, d_y = 2, sigma_y = 0.1): each method lands far closer to the exact
    posterior than the prior is (sliced W1 and mean error below a quarter of the prior's)."""
    prob = grid_gmm_problem(8, 2, 0, sigma_y=0.1)
    den = GMMDenoiser(prob.prior)
    post = prob.posterior()
    grid = den.schedule.grid(100 if method == "dps" else 30, "trailing")  # DPS is a many-step DDPM method
    n = 500
    x = _start(den, grid, n, 8)
    ae = LinearAutoencoder(torch.eye(8))
    out = RUNS[method](den, MatrixOperator(prob.A), prob.y[None], x, grid, ae).samples
    ref = post.sample(n, _gen(21))
    sw, tv, me = _metrics(out, post, ref)
    sw0, tv0, me0 = _metrics(prob.prior.sample(n, _gen(22)), post, ref)
    assert sw < 0.25 * sw0 and me < 0.25 * me0, (sw, sw0, me, me0)
    assert tv < tv0


@pytest.mark.parametrize("method", ["latent_dps", "psld", "stsl"])
def test_latent_gmm_posterior_is_approached(method):
    """Latent mixture behind an orthonormal linear decoder (d_x = 10 > d_z = 4): the latent draws
    approach the exact latent posterior."""
    prior, ae, op, y, post = _latent_problem(seed=3)
    den = GMMDenoiser(prior)
    grid = den.schedule.grid(30, "trailing")
    n = 500
    x = _start(den, grid, n, prior.dim)
    res = RUNS[method](den, op, y, x, grid, ae)
    assert res.images.shape == (n, 10)
    torch.testing.assert_close(res.images, ae.decode(res.samples))
    ref = post.sample(n, _gen(31))
    sw, tv, me = _metrics(res.samples, post, ref)
    sw0, tv0, me0 = _metrics(prior.sample(n, _gen(32)), post, ref)
    assert sw < 0.5 * sw0 and me < 0.5 * me0, (sw, sw0, me, me0)
    assert tv < tv0


def test_stsl_inversion_initialisation_round_trips_without_guidance():
    """lam = eta = 0 and init = A⁺y by DDIM inversion: sampling retraces the inversion, so the output
    is A⁺y again (A = I here), up to the ODE discretisation error."""
    prior = GaussianMixture(torch.ones(1), torch.zeros(1, 3, dtype=DT), torch.tensor([[0.5, 1.0, 2.0]], dtype=DT))
    den = GMMDenoiser(prior)
    grid = den.schedule.grid(200, "trailing")
    x0 = torch.tensor([[0.3, -1.0, 1.5], [-0.5, 0.2, -2.0]], dtype=DT)
    op = MatrixOperator(torch.eye(3, dtype=DT))
    res = sample_stsl(den, op, x0, torch.zeros_like(x0), grid, lam=0.0, eta=0.0, inner_steps=1, init="pinv",
                      init_mode="inversion")
    assert res.info["inversion_nfe"] == 200
    torch.testing.assert_close(res.samples, x0, rtol=0, atol=2e-2)
    far = sample_stsl(den, op, x0, torch.zeros_like(x0), grid, lam=0.0, eta=0.0, inner_steps=1, init="noise")
    assert float((far.samples - x0).abs().max()) > 0.2  # the initialisation is what carries x0


def test_dps_step_size_conventions():
    """One deterministic step: the paper's zeta/|r| times grad |r|^2 moves twice as far as the released
    code's zeta grad |r|; both move along the same direction from the plain DDIM step."""
    prob = grid_gmm_problem(8, 2, 0, sigma_y=0.1)
    den = GMMDenoiser(prob.prior)
    grid = den.schedule.grid(1, "trailing")
    grid = den.schedule.grid_from_t(grid.t[:1], 300.0)
    x = _start(den, grid, 5, 8)
    op = MatrixOperator(prob.A)
    plain = sample_ddim(den, x, grid)
    run = {k: sample_dps(den, op, prob.y[None], x, grid, zeta=0.3, norm=k, ddim_eta=0.0).samples
           for k in ("code", "paper", "squared")}
    torch.testing.assert_close(run["paper"] - plain, 2 * (run["code"] - plain), rtol=1e-9, atol=1e-12)
    assert float((run["code"] - plain).norm()) > 0
    # squared: zeta grad |r|^2 = 2 zeta |r| grad |r| (per sample)
    r = (prob.y[None] - op(den(x, grid.t[0]).x0)).norm(dim=1, keepdim=True)
    torch.testing.assert_close(run["squared"] - plain, 2 * r * (run["code"] - plain), rtol=1e-9, atol=1e-12)
    clipped = sample_dps(den, op, prob.y[None], x, grid, zeta=0.3, clip_x0=1.0, ddim_eta=0.0).samples
    assert not torch.allclose(clipped, run["code"])  # the means reach +-16: clamping changes everything


# ---------------------------------------------------------------------------------------------- cost
def test_cost_counts():
    prior, ae, op, y, _ = _latent_problem()
    den = GMMDenoiser(prior)
    n = 6
    grid = den.schedule.grid(n, "trailing")
    z = _start(den, grid, 4, prior.dim)
    c = sample_psld(den, op, y, z, grid, ae).cost
    assert (c.network_forward, c.network_backward, c.nfe) == (n, n, n)
    assert (c.decoder_forward, c.decoder_backward) == (n + 1, n)  # + the final decode
    assert (c.encoder_forward, c.encoder_backward) == (n, n)
    K, P = 3, 2
    c = sample_stsl(den, op, y, z, grid, ae, lam=0.1, inner_steps=K, num_probes=P, generator=_gen(0)).cost
    assert c.network_forward == n * (K * (1 + P) + 1)
    assert c.network_backward == n * K * (1 + P)
    assert (c.decoder_forward, c.decoder_backward) == (n * K + 1, n * K)
    assert c.encoder_forward == 1 and c.encoder_backward == 0  # E(Aᵀy) for the initialisation
    assert c.nfe == n * K
    c = sample_stsl(den, op, y, z, grid, ae, lam=0.1, inner_steps=1, init="pinv", init_mode="inversion").cost
    assert c.nfe == n + n and c.network_forward == n + n * 3
    assert c.wall_time_s > 0 and c.peak_memory_bytes and c.peak_memory_bytes > 0
    assert c.memory_measure == "process_max_rss"


def test_per_sample_generators_make_samples_batch_independent():
    prob = grid_gmm_problem(8, 2, 0, sigma_y=0.1)
    den = GMMDenoiser(prob.prior)
    grid = den.schedule.grid(8, "trailing")
    op = MatrixOperator(prob.A)
    x = _start(den, grid, 3, 8)
    full = sample_stsl(den, op, prob.y[None], x, grid, lam=0.05, generator=[_gen(s) for s in (0, 1, 2)]).samples
    one = sample_stsl(den, op, prob.y[None], x[1:2], grid, lam=0.05, generator=[_gen(1)]).samples
    torch.testing.assert_close(full[1:2], one, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_clear_errors():
    prior, ae, op, y, _ = _latent_problem()
    den = GMMDenoiser(prior)
    grid = den.schedule.grid(3, "trailing")
    z = _start(den, grid, 4, prior.dim)
    with pytest.raises(ValueError, match="measurement shape"):
        sample_latent_dps(den, op, torch.zeros(4, 3, dtype=DT), z, grid, ae)
    with pytest.raises(ValueError, match="measurement shape"):
        sample_latent_dps(den, op, torch.zeros(2, 2, dtype=DT), z, grid, ae)  # batch neither 1 nor 4
    with pytest.raises(ValueError, match="NaN"):
        sample_psld(den, op, torch.full((1, 2), float("nan"), dtype=DT), z, grid, ae)
    with pytest.raises(ValueError, match="needs an autoencoder"):
        sample_psld(den, op, y, z, grid, None)
    with pytest.raises(ValueError, match="needs an autoencoder"):
        sample_latent_dps(den, op, y, z, grid, None)
    with pytest.raises(ValueError, match="cannot take"):  # pixel DPS on the latent-sized state
        sample_dps(den, op, y, z, grid)
    with pytest.raises(ValueError, match="unknown DPS norm"):
        sample_latent_dps(den, op, y, z, grid, ae, norm="l1")
    with pytest.raises(ValueError, match="inner_steps"):
        sample_stsl(den, op, y, z, grid, ae, lam=1.0, inner_steps=0)
    with pytest.raises(ValueError, match="lam must be"):
        sample_stsl(den, op, y, z, grid, ae, lam=-1.0)
    with pytest.raises(ValueError, match="unknown init_mode"):
        sample_stsl(den, op, y, z, grid, ae, lam=1.0, init_mode="ddpm")
    with pytest.raises(ValueError, match="nothing to invert"):
        sample_stsl(den, op, y, z, grid, ae, lam=1.0, init="noise", init_mode="inversion")
    with pytest.raises(ValueError, match="NaN or Inf"):
        sample_stsl(den, op, y, torch.full_like(z, float("nan")), grid, ae, lam=1.0)

    class NoPinv:
        def __init__(self, A):
            self.A = A

        def __call__(self, x):
            return x @ self.A.T

        def adjoint(self, v):
            return v @ self.A

    with pytest.raises(ValueError, match="no pinv"):
        sample_stsl(den, NoPinv(op.matrix), y, z, grid, ae, lam=1.0, init="pinv")
