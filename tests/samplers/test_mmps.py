"""MMPS against exact Gaussian oracles, and the Krylov solvers against dense solves."""

import math

import pytest
import torch

from hessdiff.samplers.guidance import MMPSDenoiser, get_posterior_sampler, sample_mmps
from hessdiff.samplers.guidance.krylov import cg, gmres
from hessdiff.samplers.loop import sample
from hessdiff.samplers.oracles.gmm import GaussianMixture, GMMDenoiser
from hessdiff.samplers.solvers import DDIM, DPMSolver
from hessdiff.tasks.operators import MatrixOperator

DT = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("solver", [cg, gmres])
def test_krylov_with_m_iterations_is_the_dense_solve(solver):
    g = _gen(0)
    B, m = 3, 7
    L = torch.randn(B, m, m, generator=g, dtype=DT)
    M = L @ L.transpose(1, 2) + 0.5 * torch.eye(m, dtype=DT)  # SPD (CG needs it; GMRES does not)
    if solver is gmres:
        M = M + 0.3 * torch.randn(B, m, m, generator=g, dtype=DT)  # not symmetric
    b = torch.randn(B, m, generator=g, dtype=DT)
    u = solver(lambda v: (M @ v[:, :, None])[:, :, 0], b, m)
    torch.testing.assert_close(u, torch.linalg.solve(M, b), rtol=1e-8, atol=1e-8)
    one = solver(lambda v: (M @ v[:, :, None])[:, :, 0], b, 1)  # one iteration: a step along b
    if solver is gmres:  # GMRES minimises the residual over the Krylov space
        res = ((M @ one[:, :, None])[:, :, 0] - b).norm(dim=1)
        assert bool((res < b.norm(dim=1)).all())
    else:  # CG minimises the error in the M-norm
        e1, e0 = torch.linalg.solve(M, b) - one, torch.linalg.solve(M, b)
        energy = lambda e: (e[:, None, :] @ M @ e[:, :, None]).flatten()  # noqa: E731
        assert bool((energy(e1) < energy(e0)).all())


def test_cg_stops_a_sample_at_non_positive_curvature_and_solves_the_others():
    """An indefinite system (a trained Jacobian need not make ``M`` positive definite): that sample stops at
    the direction of non-positive curvature with a finite iterate; the SPD samples of the batch are solved."""
    g = _gen(3)
    m = 6
    L = torch.randn(2, m, m, generator=g, dtype=DT)
    M = L @ L.transpose(1, 2) + 0.5 * torch.eye(m, dtype=DT)
    M[1] = torch.diag(torch.tensor([2.0, -1.0, 1.0, -3.0, 0.5, 1.5], dtype=DT))  # indefinite
    b = torch.randn(2, m, generator=g, dtype=DT)
    b[1] = torch.tensor([1.0, 1.0, 0.0, 0.2, 0.0, 0.0], dtype=DT)

    def mv(v):
        return (M @ v[:, :, None])[:, :, 0]

    p, curv = b[1], float(b[1] @ M[1] @ b[1])
    assert curv > 0  # the first direction still has positive curvature: one step is taken, then it stops
    u = cg(mv, b, m)
    assert bool(torch.isfinite(u).all())
    torch.testing.assert_close(u[0], torch.linalg.solve(M[0], b[0]), rtol=1e-8, atol=1e-8)
    r1 = b[1] - M[1] @ u[1]
    p2 = r1 + float(r1 @ r1) / float(p @ p) * p
    assert float(p2 @ M[1] @ p2) <= 0  # the second direction has non-positive curvature
    torch.testing.assert_close(u[1], float(p @ p) / curv * p)  # the one step taken
    with_tol = cg(mv, b, m, tol=1e-12)
    torch.testing.assert_close(with_tol, u)


def test_gmres_keeps_a_diverged_sample_non_finite_and_solves_the_others():
    """A sample whose matvec overflows (a diverged run) gives a NaN solution; the batch's other samples are
    solved as before (LAPACK's least squares used to fail for the whole batch on a non-finite entry)."""
    g = _gen(1)
    B, m = 3, 5
    M = torch.randn(B, m, m, generator=g, dtype=DT) + 3 * torch.eye(m, dtype=DT)
    b = torch.randn(B, m, generator=g, dtype=DT)

    def matvec(v):
        out = (M @ v[:, :, None])[:, :, 0]
        return torch.cat([out[:1] * float("inf"), out[1:]])

    u = gmres(matvec, b, m)
    assert not bool(torch.isfinite(u[0]).any())
    torch.testing.assert_close(u[1:], torch.linalg.solve(M[1:], b[1:]), rtol=1e-8, atol=1e-8)


def _gaussian_problem(d=16, m=8, sigma_y=0.2, seed=0):
    g = _gen(seed)
    L = torch.randn(d, d, generator=g, dtype=DT) / math.sqrt(d)
    prior = GaussianMixture(torch.ones(1, dtype=DT), torch.randn(1, d, generator=g, dtype=DT),
                            (L @ L.T + 0.1 * torch.eye(d, dtype=DT))[None])
    A = torch.randn(m, d, generator=g, dtype=DT) / math.sqrt(d)
    y = prior.sample(1, g) @ A.T + sigma_y * torch.randn(1, m, generator=g, dtype=DT)
    return prior, A, y, prior.posterior(A, y[0], sigma_y)


def _errors(s, post):
    pm, pc = post.mean(), post.covariance()
    return float((s.mean(0) - pm).norm() / pm.norm()), float((torch.cov(s.T) - pc).norm() / pc.norm())


@pytest.mark.parametrize("solver_name", ["dpm++2m", "ddim-eta1"])
def test_mmps_reaches_the_exact_gaussian_posterior_at_50_steps(solver_name):
    """Gaussian prior + linear A: the moment-matched likelihood is exact, so with enough Krylov
    iterations MMPS samples the posterior: on DPM-Solver++(2M) mean and covariance within 2x the
    Monte-Carlo error of exact draws of the same size; on DDIM eta = 1 (the paper's loop) the mean."""
    n, sy = 1000, 0.2
    prior, A, y, post = _gaussian_problem(sigma_y=sy)
    den = GMMDenoiser(prior)
    grid = den.schedule.grid(50, "trailing")
    x = float(grid.sigma[0]) * torch.randn(n, 16, generator=_gen(1), dtype=DT)
    method = DPMSolver(2) if solver_name == "dpm++2m" else DDIM(1.0)
    guided = MMPSDenoiser(den, MatrixOperator(A), y, sy, iterations=8, solver="gmres")
    res = sample(guided, x, grid, method, generator=_gen(2))
    mean_err, cov_err = _errors(res.samples, post)
    exact_mean, exact_cov = _errors(post.sample(n, _gen(3)), post)
    mc_mean = math.sqrt(float(torch.diagonal(post.covariance()).sum()) / n) / float(post.mean().norm())
    assert mean_err <= 2 * mc_mean, (mean_err, mc_mean)
    if solver_name == "dpm++2m":  # the ODE solver is also exact in covariance at 50 steps
        assert cov_err <= 2 * exact_cov, (cov_err, exact_cov)
    else:  # the ancestral (DDPM-like) step keeps a discretisation bias in the covariance at 50 steps
        assert cov_err > 2 * exact_cov
    assert exact_mean <= 2 * mc_mean  # the yardstick itself is the Monte-Carlo error


def test_sample_mmps_counts_vjps_and_one_iteration_is_worse():
    prior, A, y, post = _gaussian_problem()
    den = GMMDenoiser(prior)
    grid = den.schedule.grid(20, "trailing")
    x = float(grid.sigma[0]) * torch.randn(500, 16, generator=_gen(1), dtype=DT)
    res = sample_mmps(den, MatrixOperator(A), y, x, grid, sigma_y=0.2, iterations=3, generator=_gen(2))
    assert res.cost.network_forward == 20 and res.cost.network_backward == 20 * (3 + 1)
    assert res.cost.nfe == 20 * 5
    assert get_posterior_sampler("mmps") is sample_mmps
    one = sample_mmps(den, MatrixOperator(A), y, x, grid, sigma_y=0.2, iterations=1, solver="cg", generator=_gen(2))
    assert _errors(res.samples, post)[0] < _errors(one.samples, post)[0]


def test_latent_mmps_matches_the_exact_latent_posterior_mean(latent_gaussian):
    prior, ae, A, y, post, sy = latent_gaussian()
    (d_x, d_z), m = ae.W.shape, A.shape[0]
    den = GMMDenoiser(prior)
    grid = den.schedule.grid(30, "trailing")
    z = float(grid.sigma[0]) * torch.randn(1000, d_z, generator=_gen(5), dtype=DT)
    res = sample_mmps(den, MatrixOperator(A), y, z, grid, ae, sigma_y=sy, iterations=m, solver="cg",
                      ddim_eta=0.0)
    mc = math.sqrt(float(torch.diagonal(post.covariance()).sum()) / 1000) / float(post.mean().norm())
    assert _errors(res.samples, post)[0] <= 2 * mc
    assert res.images.shape == (1000, d_x) and res.cost.decoder_backward == 30 * (m + 1)


def test_gated_mmps_is_exact_on_a_unit_gaussian_prior_without_vjps():
    """Above the gate MMPS takes Cov[x0 | x_t] = r_t^2 I, which is exact for a N(0, I) prior: with the gate at
    0 (every step gated) it reaches the exact posterior mean within 2x the Monte-Carlo error, without a single
    network VJP; with a gate above every level it is MMPS, bit for bit; on a correlated prior the gated run is off."""
    d, m, sy, n = 16, 8, 0.2, 1000
    g = _gen(7)
    prior = GaussianMixture(torch.ones(1, dtype=DT), torch.zeros(1, d, dtype=DT), torch.eye(d, dtype=DT)[None])
    A = torch.randn(m, d, generator=g, dtype=DT) / math.sqrt(d)
    y = prior.sample(1, g) @ A.T + sy * torch.randn(1, m, generator=g, dtype=DT)
    post = prior.posterior(A, y[0], sy)
    den = GMMDenoiser(prior)
    grid = den.schedule.grid(50, "trailing")
    x = float(grid.sigma[0]) * torch.randn(n, d, generator=_gen(1), dtype=DT)
    res = sample_mmps(den, MatrixOperator(A), y, x, grid, sigma_y=sy, iterations=m, solver="cg", ddim_eta=0.0,
                      gate_sigma=0.0)
    mc = math.sqrt(float(torch.diagonal(post.covariance()).sum()) / n) / float(post.mean().norm())
    assert _errors(res.samples, post)[0] <= 2 * mc
    assert res.cost.network_backward == 0 and res.cost.network_forward == 50
    plain = sample_mmps(den, MatrixOperator(A), y, x, grid, sigma_y=sy, iterations=3, generator=_gen(2))
    inf = sample_mmps(den, MatrixOperator(A), y, x, grid, sigma_y=sy, iterations=3, generator=_gen(2),
                      gate_sigma=1e30)
    assert torch.equal(plain.samples, inf.samples) and inf.cost.network_backward == plain.cost.network_backward

    prior2, A2, y2, post2 = _gaussian_problem(sigma_y=sy)  # covariance L L^T + 0.1 I: r_t^2 I is not its own
    den2 = GMMDenoiser(prior2)
    x2 = float(grid.sigma[0]) * torch.randn(n, d, generator=_gen(1), dtype=DT)
    gated = sample_mmps(den2, MatrixOperator(A2), y2, x2, grid, sigma_y=sy, iterations=m, solver="cg",
                        ddim_eta=0.0, gate_sigma=0.0)
    mc2 = math.sqrt(float(torch.diagonal(post2.covariance()).sum()) / n) / float(post2.mean().norm())
    assert _errors(gated.samples, post2)[0] > 2 * mc2
    # a gate in the middle of the schedule: VJPs only at the steps below it
    half = sample_mmps(den2, MatrixOperator(A2), y2, x2, grid, sigma_y=sy, iterations=3, gate_sigma=1.0)
    a, s = den2.schedule.alpha_sigma(grid.t[:-1].to(DT))
    below = int((s <= a).sum())
    assert 0 < below < 50 and half.cost.network_backward == below * 4


def test_mmps_bad_input():
    prior, A, y, _ = _gaussian_problem()
    den = GMMDenoiser(prior)
    with pytest.raises(ValueError, match="Krylov solver"):
        MMPSDenoiser(den, MatrixOperator(A), y, 0.2, solver="bicg")
    with pytest.raises(ValueError, match="sigma_y"):
        MMPSDenoiser(den, MatrixOperator(A), y, -1.0)
    with pytest.raises(ValueError, match="iterations"):
        MMPSDenoiser(den, MatrixOperator(A), y, 0.2, iterations=0)
    with pytest.raises(ValueError, match="gate_sigma"):
        MMPSDenoiser(den, MatrixOperator(A), y, 0.2, gate_sigma=-1.0)
    grid = den.schedule.grid(5)
    with pytest.raises(ValueError, match="measurement"):
        sample_mmps(den, MatrixOperator(A), y[:, :3], torch.zeros(2, 16, dtype=DT), grid, sigma_y=0.2)


# ---------------------------------------------------------------- STSL with the moment-matched likelihood
@pytest.mark.parametrize("data_norm", ["squared", "unsquared"])
def test_stsl_moment_matched_term_is_the_dense_quadratic_form(data_norm):
    """STSL's moment-matched data term: value ``q = rᵀ C⁻¹ r`` (or ``sqrt(q)``) and gradient that of ``q``
    with ``C = Sigma_y + (sigma^2/alpha) A J Aᵀ`` held fixed, against a dense solve with the exact Jacobian."""
    from hessdiff.samplers.guidance.stsl import STSL, STSLOptions
    from hessdiff.samplers.loop import Run

    sy = 0.2
    prior, A, y, _ = _gaussian_problem(sigma_y=sy)
    den = GMMDenoiser(prior)
    grid = den.schedule.grid(20, "trailing")
    run = Run(den, grid, generator=_gen(6))
    method = STSL(MatrixOperator(A), y, STSLOptions(lam=1.0, eta=0.0, likelihood="moment-matched", sigma_y=sy,
                                                    iterations=8, data_norm=data_norm, init="noise"))
    x = float(grid.sigma[0]) * torch.randn(3, 16, generator=_gen(7), dtype=DT)
    method.start(run, x)
    i = 6
    t, a, s, _, _ = run.point(i)
    z = (0.5 * x).requires_grad_(True)
    loss = method.loss(run, z, i)
    (grad,) = torch.autograd.grad(loss.sum(), z)
    for b in range(3):
        zb = z[b:b + 1].detach()
        J = torch.autograd.functional.jacobian(lambda v: den(v, t).x0, zb).reshape(16, 16)
        r = y[0] - A @ den(zb, t).x0[0]
        C = sy**2 * torch.eye(8, dtype=DT) + (s * s / a) * A @ J @ A.T
        u = torch.linalg.solve(C, r)
        q = r @ u
        want_value, want_grad = (q, -2 * J.T @ A.T @ u) if data_norm == "squared" else \
            (q.sqrt(), -(J.T @ A.T @ u) / q.sqrt())
        assert float(loss[b].detach()) == pytest.approx(float(want_value), rel=1e-8)
        torch.testing.assert_close(grad[b], want_grad, rtol=1e-7, atol=1e-9)


def test_stsl_moment_matched_counts_vjps_needs_sigma_y_and_moves_the_result():
    from hessdiff.samplers.api import fill_sigma_y
    from hessdiff.samplers.guidance import sample_stsl

    prior, A, y, post = _gaussian_problem()
    den = GMMDenoiser(prior)
    grid = den.schedule.grid(10, "trailing")
    x = float(grid.sigma[0]) * torch.randn(200, 16, generator=_gen(1), dtype=DT)
    common = dict(lam=0.02, eta=0.0, inner_steps=2, init="noise", ddim_eta=1.0)
    mm = sample_stsl(den, MatrixOperator(A), y, x, grid, likelihood="moment-matched", sigma_y=0.2, iterations=3,
                     generator=_gen(2), **common)
    assert mm.cost.network_forward == 10 * (2 + 1)  # 2 inner steps and the DDIM step's fresh call
    assert mm.cost.network_backward == 10 * 2 * (3 + 1)  # 3 Krylov VJPs and the gradient per inner step
    plain = sample_stsl(den, MatrixOperator(A), y, x, grid, generator=_gen(2), **common)
    assert plain.cost.network_backward == 10 * 2
    assert float((mm.samples - plain.samples).abs().max()) > 1e-2  # the covariance changes the result
    with pytest.raises(ValueError, match="noise level"):
        sample_stsl(den, MatrixOperator(A), y, x, grid, likelihood="moment-matched", **common)
    # the CLI / sweep fill sigma_y only for the options that use it; a bare tensor is fine without it
    opts = {"likelihood": "moment-matched", "sigma_y": None}  # None (a table's unset default) is not given
    fill_sigma_y("stsl", opts, type("M", (), {"sigma_y": 0.05})())
    assert opts["sigma_y"] == 0.05
    opts = {}
    fill_sigma_y("stsl", opts, torch.zeros(1))
    assert opts == {}
    with pytest.raises(ValueError, match="noise level"):
        fill_sigma_y("stsl", {"likelihood": "moment-matched"}, torch.zeros(1))


def test_latent_stsl_moment_matched_term_goes_through_the_decoder(latent_gaussian):
    """In latent space the measurement is ``A D(z0_hat)``: the term is the dense form with ``A W`` (a linear
    decoder ``D(z) = W z + b``), and each Krylov matvec is one decoder JVP plus one VJP."""
    from hessdiff.samplers.guidance.stsl import STSL, STSLOptions
    from hessdiff.samplers.loop import Run

    prior, ae, A, y, _, sy = latent_gaussian()
    d_z, m = ae.W.shape[1], A.shape[0]
    den = GMMDenoiser(prior)
    grid = den.schedule.grid(10, "trailing")
    run = Run(den, grid, autoencoder=ae)
    method = STSL(MatrixOperator(A), y, STSLOptions(lam=1.0, eta=0.0, likelihood="moment-matched", sigma_y=sy,
                                                    iterations=m, solver="cg", init="noise"))
    z = float(grid.sigma[0]) * torch.randn(2, d_z, generator=_gen(5), dtype=DT)
    method.start(run, z)
    t, a, s, _, _ = run.point(4)
    zr = z.requires_grad_(True)
    loss = method.loss(run, zr, 4)
    (grad,) = torch.autograd.grad(loss.sum(), zr)
    AW = A @ ae.W
    for b in range(2):
        zb = zr[b:b + 1].detach()
        J = torch.autograd.functional.jacobian(lambda v: den(v, t).x0, zb).reshape(d_z, d_z)
        r = y[0] - A @ ae.decode(den(zb, t).x0)[0]
        u = torch.linalg.solve(sy**2 * torch.eye(m, dtype=DT) + (s * s / a) * AW @ J @ AW.T, r)
        assert float(loss[b].detach()) == pytest.approx(float(r @ u), rel=1e-8)
        torch.testing.assert_close(grad[b], -2 * J.T @ AW.T @ u, rtol=1e-7, atol=1e-9)
    assert run.cost.decoder_backward == m + 1  # the Krylov VJPs and the gradient pass through the decoder
