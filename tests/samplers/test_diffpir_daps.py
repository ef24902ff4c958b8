"""DiffPIR and DAPS (no network VJP) against dense solves and exact Gaussian oracles.

With a Gaussian prior every part of both methods is affine in the state plus zero-mean noise, so the
expected output of a run has a closed form: the same recursion on the mean with the noise dropped
(:func:`_diffpir_mean`, :func:`_daps_mean`). The sample means must match it within Monte-Carlo error
(this pins the implementation), and the methods' own bias against the exact posterior mean is then a
property of the algorithm: measured (seed 0, ``sigma_y = 0.2``, prior mean error 0.61 relative), DiffPIR
(``lam = 1.75``, ``zeta = 0.3``) 0.14 / 0.09 at 50 / 200 steps; DAPS with converged Langevin chains 0.071 /
0.031 at 50 / 200 levels (the annealing's discretisation bias, shrinking with the number of levels); the
converged-Langevin DAPS mean is exactly DiffPIR's with ``lam = 1, zeta = 1`` and the data step at the end.
"""

import math

import pytest
import torch

from hessdiff.samplers.guidance import DAPS, DiffPIR, get_posterior_sampler, sample_daps, sample_diffpir
from hessdiff.samplers.guidance.diffpir import diffpir_prox
from hessdiff.samplers.guidance.krylov import cg
from hessdiff.samplers.oracles.gmm import GaussianMixture, GMMDenoiser
from hessdiff.tasks.operators import Inpainting, MatrixOperator

DT = torch.float64
D, M, SY = 16, 8, 0.2


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _gaussian_problem(d=D, m=M, sigma_y=SY, seed=0):
    """As in test_mmps.py: one Gaussian prior component, a random 8x16 A, one measurement."""
    g = _gen(seed)
    L = torch.randn(d, d, generator=g, dtype=DT) / math.sqrt(d)
    prior = GaussianMixture(torch.ones(1, dtype=DT), torch.randn(1, d, generator=g, dtype=DT),
                            (L @ L.T + 0.1 * torch.eye(d, dtype=DT))[None])
    A = torch.randn(m, d, generator=g, dtype=DT) / math.sqrt(d)
    y = prior.sample(1, g) @ A.T + sigma_y * torch.randn(1, m, generator=g, dtype=DT)
    return prior, A, y, prior.posterior(A, y[0], sigma_y)


# ------------------------------------------------------------------------------------ exact mean recursions
def _tweedie(prior, a, s):
    mu, S = prior.means[0], prior.covariances()[0]
    G = a * S @ torch.linalg.inv(a * a * S + s * s * torch.eye(mu.numel(), dtype=DT))
    return lambda m: mu + G @ (m - a * mu)


def _levels(grid, i):
    return (float(v) for v in (grid.alpha[i], grid.sigma[i], grid.alpha[i + 1], grid.sigma[i + 1]))


def _diffpir_mean(prior, A, y, grid, m, lam, zeta, last=False):
    n, eye = grid.num_steps, torch.eye(m.numel(), dtype=DT)
    for i in range(n):
        a, s, an, sn = _levels(grid, i)
        x0 = _tweedie(prior, a, s)(m)
        if i + 1 < n or last:
            rho = lam * SY**2 * (a / s) ** 2
            x0 = torch.linalg.solve(A.T @ A + rho * eye, A.T @ y + rho * x0)
        m = an * x0 + sn * math.sqrt(1 - zeta) * (m - a * x0) / s
    return m


def _daps_mean(prior, A, y, grid, m, steps, lr, ratio, sy=SY):
    """``steps=None``: the Langevin chains converged (the mean of their Gaussian target)."""
    n, eye = grid.num_steps, torch.eye(m.numel(), dtype=DT)
    for i in range(n):
        a, s, an, _ = _levels(grid, i)
        x0h = _tweedie(prior, a, s)(m)
        P, b = A.T @ A / sy**2 + (a / s) ** 2 * eye, A.T @ y / sy**2 + (a / s) ** 2 * x0h
        if steps is None:
            z = torch.linalg.solve(P, b)
        else:
            z, step = x0h, lr * (1 + i / n * (ratio - 1))
            for _ in range(steps):
                z = z + step * (b - P @ z)
        m = an * z
    return m


def _rel(v, ref):
    return float((v - ref).norm() / ref.norm())


def _mc(samples):
    """The standard error of the sample mean in norm, ``sqrt(tr Cov / n)``."""
    return math.sqrt(float(torch.cov(samples.T).trace()) / samples.shape[0])


# ------------------------------------------------------------------------------------ (a) the proximal step
@pytest.mark.parametrize("rho", [0.0, 1e-3, 0.7, 50.0])
def test_diffpir_prox_is_the_dense_solve(rho):
    g = _gen(0)
    A = torch.randn(M, D, generator=g, dtype=DT)
    x0 = torch.randn(3, D, generator=g, dtype=DT)
    y = torch.randn(3, M, generator=g, dtype=DT)
    op = MatrixOperator(A)
    got = diffpir_prox(op, y, x0, rho, iterations=D, solver="cg", tol=0.0)
    if rho > 0:  # (A^T A + rho I) x = A^T y + rho x0
        want = torch.linalg.solve(A.T @ A + rho * torch.eye(D, dtype=DT), (y @ A + rho * x0).T).T
    else:  # rho = 0: the projection of x0 onto {A x = y}
        want = x0 + (y - x0 @ A.T) @ torch.linalg.pinv(A).T
        torch.testing.assert_close(got @ A.T, y, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-8)
    few = diffpir_prox(op, y, x0, rho, iterations=2, solver="cg")  # a truncated CG is not the solution
    assert float((few - want).norm()) > 1e-6


def test_cg_tolerance_stops_each_sample_once_converged():
    g = _gen(2)
    B, m = 3, 40
    Q, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=DT))
    M = Q @ torch.diag(torch.logspace(-3, 0, m, dtype=DT)) @ Q.T  # condition number 1e3
    b = torch.randn(B, m, generator=g, dtype=DT)
    b[1] = b[1] * 1e-8  # scale does not matter: the tolerance is relative
    calls = []

    def matvec(v):
        calls.append(1)
        return v @ M

    u = cg(matvec, b, 500, tol=1e-4)
    res = (b - u @ M).norm(dim=1) / b.norm(dim=1)
    assert bool((res <= 1e-4).all()) and len(calls) < 500, (res, len(calls))
    calls.clear()
    cg(matvec, b, 7)  # without a tolerance: exactly the iterations asked for
    assert len(calls) == 7


@pytest.mark.parametrize("rho", [0.0, 0.3])
def test_diffpir_prox_closed_form_for_masks_matches_cg(rho):
    g = _gen(1)
    mask = (torch.rand(1, 1, 6, 6, generator=g) > 0.5).double()
    op = Inpainting(mask)
    x0 = torch.randn(2, 3, 6, 6, generator=g, dtype=DT)
    y = op(torch.randn(2, 3, 6, 6, generator=g, dtype=DT))
    closed = diffpir_prox(op, y, x0, rho, solver="auto")
    torch.testing.assert_close(closed, diffpir_prox(op, y, x0, rho, iterations=5, solver="cg"), rtol=1e-10,
                               atol=1e-10)
    # the released code's inpainting step: (mask * y + rho * x0) / (mask + rho), x0 kept where unobserved
    want = torch.where(mask > 0, (y + rho * x0) / (1 + rho), x0)
    torch.testing.assert_close(closed, want, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------ (b) Gaussian posterior
def _run(method, steps, n=1000, seed=0, **kw):
    prior, A, y, post = _gaussian_problem(seed=seed)
    den = GMMDenoiser(prior)
    grid = den.schedule.grid(steps, "trailing")
    x = float(grid.sigma[0]) * torch.randn(n, D, generator=_gen(seed + 1), dtype=DT)
    res = method(den, MatrixOperator(A), y, x, grid, sigma_y=SY, generator=_gen(seed + 2), **kw)
    return prior, A, y[0], post.mean(), grid, x.mean(0), res


@pytest.mark.parametrize("seed", [0, 1])
def test_diffpir_on_a_gaussian_prior_is_its_exact_recursion_and_beats_the_prior_mean(seed):
    prior, A, y, pm, grid, m0, res = _run(sample_diffpir, 50, seed=seed, lam=1.75, zeta=0.3)
    mean = res.samples.mean(0)
    expected = _diffpir_mean(prior, A, y, grid, m0, 1.75, 0.3)
    assert float((mean - expected).norm()) <= 2 * _mc(res.samples)  # 0.57..1.16x over problem seeds 0..7
    err, prior_err = _rel(mean, pm), _rel(prior.mean(), pm)
    assert err < 0.3 and err < prior_err / 2.5, (err, prior_err)  # measured: seed 0 0.15 vs 0.61; seed 1 0.27 vs 0.80
    assert res.cost.network_forward == 50 and res.cost.network_backward == 0 and res.cost.nfe == 50


@pytest.mark.parametrize("seed", [0, 1])
def test_daps_on_a_gaussian_prior_is_its_exact_recursion_and_near_the_posterior(seed):
    kw = dict(ode_steps=1, langevin_steps=100, lr=1e-2, lr_min_ratio=0.01)
    prior, A, y, pm, grid, m0, res = _run(sample_daps, 50, n=600, seed=seed, **kw)
    mean = res.samples.mean(0)
    expected = _daps_mean(prior, A, y, grid, m0, 100, 1e-2, 0.01)
    mc = _mc(res.samples)
    assert float((mean - expected).norm()) <= 2 * mc, (float((mean - expected).norm()), mc)  # 0.8..1.1x, seeds 0..7
    err, prior_err = _rel(mean, pm), _rel(prior.mean(), pm)
    # measured: seed 0 0.08 (recursion 0.076) vs 0.61; seed 1 0.16 (0.155) vs 0.80
    assert err < 0.2 and err < prior_err / 4, (err, prior_err)
    # the converged chain: DAPS's own bias, 0.071 / 0.121 at 50 levels, 0.031 / 0.053 at 200
    limit50 = _rel(_daps_mean(prior, A, y, grid, m0, None, 0, 0), pm)
    grid200 = GMMDenoiser(prior).schedule.grid(200, "trailing")
    limit200 = _rel(_daps_mean(prior, A, y, grid200, m0, None, 0, 0), pm)
    assert limit200 < 0.6 * limit50 and limit200 < 0.06  # ratio 0.43..0.56 over problem seeds 0..7
    # ... which is DiffPIR with lam = 1 (rho = tau^2 / r^2), zeta = 1 and the data step at the last level
    torch.testing.assert_close(_diffpir_mean(prior, A, y, grid, m0, 1.0, 1.0, last=True),
                               _daps_mean(prior, A, y, grid, m0, None, 0, 0), rtol=1e-9, atol=1e-9)
    assert res.cost.network_forward == 50 and res.cost.network_backward == 0


def test_daps_inner_ode_counts_its_forwards_and_is_the_ode_solution():
    prior, A, y, post = _gaussian_problem()
    den = GMMDenoiser(prior)
    grid = den.schedule.grid(10, "trailing")
    x = float(grid.sigma[0]) * torch.randn(200, D, generator=_gen(1), dtype=DT)
    res = sample_daps(den, MatrixOperator(A), y, x, grid, sigma_y=SY, ode_steps=4, langevin_steps=5, lr=1e-3,
                      generator=_gen(2))
    assert res.cost.network_forward == 10 * 4 and res.cost.network_backward == 0 and res.cost.nfe == 40
    assert bool(torch.isfinite(res.samples).all())
    # the inner ODE with many Euler steps approaches the exact probability-flow map of the Gaussian prior,
    # x0 = mu + (S^(1/2) (a^2 S + s^2 I)^(-1/2)) (x - a mu) (the Gaussian's optimal-transport map)
    from hessdiff.samplers.loop import Run

    a, s = float(grid.alpha[0]), float(grid.sigma[0])
    xs = x[:5]
    mu, S = prior.means[0], prior.covariances()[0]
    ev, Q = torch.linalg.eigh(S)
    T = Q @ torch.diag(ev.sqrt() / (a * a * ev + s * s).sqrt()) @ Q.T
    exact = mu + (xs - a * mu) @ T.T
    errs = []
    for k in (2, 8, 32, 128):
        daps = DAPS(MatrixOperator(A), y, sigma_y=SY, ode_steps=k, ode_sigma_min=1e-3)
        errs.append(float((daps._x0_hat(Run(den, grid), xs, grid.t[0], a, s) - exact).norm() / exact.norm()))
    # first order in the step: measured 0.78, 0.27, 0.070, 0.018
    assert errs[3] < errs[2] < errs[1] < errs[0] and errs[3] < 0.03 and errs[2] / errs[3] > 3, errs


def test_latent_daps_uses_the_decoder_vjp_not_the_network(latent_gaussian):
    prior, ae, A, y, post, sy = latent_gaussian()
    d_x, d_z = ae.W.shape
    den = GMMDenoiser(prior)
    grid = den.schedule.grid(30, "trailing")
    z = float(grid.sigma[0]) * torch.randn(400, d_z, generator=_gen(5), dtype=DT)
    res = sample_daps(den, MatrixOperator(A), y, z, grid, ae, sigma_y=sy, ode_steps=1, langevin_steps=50, lr=5e-3,
                      generator=_gen(6))
    assert res.images.shape == (400, d_x)
    c = res.cost
    assert c.network_forward == 30 and c.network_backward == 0
    assert c.decoder_backward == 30 * 50 and c.decoder_forward == 30 * 50 + 1  # + the final decode
    # the decoder is linear (x = W z): the pixel-space recursion with A W
    expected = _daps_mean(prior, A @ ae.W, y[0], grid, z.mean(0), 50, 5e-3, 0.01, sy=sy)
    mean = res.samples.mean(0)
    assert float((mean - expected).norm()) <= 2 * _mc(res.samples), (float((mean - expected).norm()), _mc(res.samples))
    err, prior_err = _rel(mean, post.mean()), _rel(prior.mean(), post.mean())
    assert err < prior_err / 2, (err, prior_err)
    with pytest.raises(ValueError, match="pixel space"):
        sample_diffpir(den, MatrixOperator(A), y, z, grid, ae, sigma_y=sy)


# ------------------------------------------------------------------------------------ (d) seeds and batches
@pytest.mark.parametrize("name", ["diffpir", "daps"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_seed_gives_the_same_sample_in_any_batch(name, dtype):
    prior, A, y, _ = _gaussian_problem()
    den = GMMDenoiser(prior)
    grid = den.schedule.grid(8, "trailing")
    x = (float(grid.sigma[0]) * torch.randn(4, D, generator=_gen(1), dtype=DT)).to(dtype)
    kw = dict(langevin_steps=5, lr=1e-3, ode_steps=2) if name == "daps" else dict(zeta=0.5)
    fn = get_posterior_sampler(name)
    four = fn(den, MatrixOperator(A), y, x, grid, sigma_y=SY, generator=[_gen(10 + i) for i in range(4)], **kw)
    one = fn(den, MatrixOperator(A), y, x[2:3], grid, sigma_y=SY, generator=[_gen(12)], **kw)
    assert four.samples.dtype == dtype
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(one.samples[0], four.samples[2], rtol=tol, atol=tol)
    again = fn(den, MatrixOperator(A), y, x, grid, sigma_y=SY, generator=[_gen(10 + i) for i in range(4)], **kw)
    torch.testing.assert_close(again.samples, four.samples, rtol=0, atol=0)
    other = fn(den, MatrixOperator(A), y, x[2:3], grid, sigma_y=SY, generator=[_gen(99)], **kw)
    assert float((other.samples - one.samples).abs().max()) > 1e-3


def test_diffpir_noiseless_measurement_is_matched_at_the_end():
    """sigma_y = 0 with sigma_y_min = 0: every data step is the exact projection onto {A x = y}."""
    prior, A, _, _ = _gaussian_problem()
    den = GMMDenoiser(prior)
    y = prior.sample(1, _gen(3)) @ A.T
    grid = den.schedule.grid(20, "trailing")
    x = float(grid.sigma[0]) * torch.randn(50, D, generator=_gen(1), dtype=DT)
    res = sample_diffpir(den, MatrixOperator(A), y, x, grid, sigma_y=0.0, sigma_y_min=0.0, zeta=1.0,
                         data_step_last=True, cg_iterations=D, generator=_gen(2))
    torch.testing.assert_close(res.samples @ A.T, y.expand(50, -1), rtol=1e-7, atol=1e-7)
    floored = sample_diffpir(den, MatrixOperator(A), y, x, grid, sigma_y=0.0, zeta=1.0, data_step_last=True,
                             cg_iterations=D, generator=_gen(2))  # the code's floor: near, not exact
    resid = float((floored.samples @ A.T - y).norm(dim=1).max())
    assert 1e-9 < resid < 1e-2


# ------------------------------------------------------------------------------------ (e) bad options
@pytest.mark.parametrize("kw, match", [
    (dict(zeta=1.5), "zeta"), (dict(lam=-1.0), "lam"), (dict(cg_iterations=0), "cg_iterations"),
    (dict(solver="lu"), "DiffPIR solver"), (dict(clip_x0=0.0), "clip_x0"), (dict(sigma_y=float("nan")), "sigma_y"),
    (dict(sigma_y_min=-1.0), "sigma_y_min"), (dict(data_step_last=1), "data_step_last"),
    (dict(cg_tol=-1e-3), "cg_tol"),
])
def test_diffpir_bad_options(kw, match):
    prior, A, y, _ = _gaussian_problem()
    opts = {"sigma_y": SY, **kw}
    with pytest.raises(ValueError, match=match):
        DiffPIR(MatrixOperator(A), y, **opts)


@pytest.mark.parametrize("kw, match", [
    (dict(lr=0.0), "lr"), (dict(lr=float("inf")), "lr"), (dict(langevin_steps=0), "langevin_steps"),
    (dict(ode_steps=1.5), "ode_steps"), (dict(ode_steps=True), "ode_steps"), (dict(tau=0.0), "tau"),
    (dict(sigma_y=0.0), "tau > 0"), (dict(lr_min_ratio=-0.1), "lr_min_ratio"),
    (dict(ode_sigma_min=0.0), "ode_sigma_min"), (dict(sigma_y=-1.0), "sigma_y"),
])
def test_daps_bad_options(kw, match):
    prior, A, y, _ = _gaussian_problem()
    opts = {"sigma_y": SY, **kw}
    with pytest.raises(ValueError, match=match):
        DAPS(MatrixOperator(A), y, **opts)


@pytest.mark.parametrize("fn", [sample_diffpir, sample_daps])
def test_bad_measurement_shape(fn):
    prior, A, y, _ = _gaussian_problem()
    den = GMMDenoiser(prior)
    with pytest.raises(ValueError, match="measurement"):
        fn(den, MatrixOperator(A), y[:, :3], torch.zeros(2, D, dtype=DT), den.schedule.grid(3), sigma_y=SY)


def test_daps_tau_zero_noise_is_allowed_with_an_explicit_tau():
    prior, A, y, _ = _gaussian_problem()
    den = GMMDenoiser(prior)
    grid = den.schedule.grid(3)
    res = sample_daps(den, MatrixOperator(A), y, torch.zeros(2, D, dtype=DT), grid, sigma_y=0.0, tau=0.5,
                      langevin_steps=2, ode_steps=1, generator=_gen(0))
    assert bool(torch.isfinite(res.samples).all())
