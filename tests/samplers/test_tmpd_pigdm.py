"""TMPD and ΠGDM against exact Gaussian oracles where their covariance approximations are exact:
TMPD's diagonal of ``A J Aᵀ`` under a diagonal prior seen through a mask, ΠGDM's ``r_t² I`` under a
standard normal prior (``Cov[x0 | x_t] = sigma_t² / (alpha_t² + sigma_t²) I``)."""

import math

import pytest
import torch

from hessdiff.samplers.guidance import (
    MMPSDenoiser,
    PiGDMDenoiser,
    TMPDDenoiser,
    get_posterior_sampler,
    sample_pigdm,
    sample_tmpd,
)
from hessdiff.samplers.loop import sample
from hessdiff.samplers.oracles.gmm import GaussianMixture, GMMDenoiser
from hessdiff.samplers.solvers import DPMSolver
from hessdiff.samplers.solvers.ddim import ddim_step
from hessdiff.tasks.operators import MatrixOperator

DT = torch.float64
D, M = 16, 8


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _mask_problem(sigma_y=0.2, seed=0):
    """A diagonal (non-isotropic) Gaussian prior and a mask keeping M of D coordinates: A J Aᵀ is diagonal."""
    g = _gen(seed)
    prior = GaussianMixture(torch.ones(1, dtype=DT), torch.randn(1, D, generator=g, dtype=DT),
                            (0.2 + 1.5 * torch.rand(1, D, generator=g, dtype=DT)))
    keep = torch.randperm(D, generator=g)[:M]
    A = torch.eye(D, dtype=DT)[keep]
    y = prior.sample(1, g) @ A.T + sigma_y * torch.randn(1, M, generator=g, dtype=DT)
    return prior, A, y, prior.posterior(A, y[0], sigma_y)


def _normal_problem(sigma_y=0.2, seed=0, d=D, m=M):
    """Standard normal data (then Cov[x0 | x_t] = r_t² I exactly) and a dense random A."""
    g = _gen(seed)
    prior = GaussianMixture(torch.ones(1, dtype=DT), torch.zeros(1, d, dtype=DT))
    A = torch.randn(m, d, generator=g, dtype=DT) / math.sqrt(d)
    y = prior.sample(1, g) @ A.T + sigma_y * torch.randn(1, m, generator=g, dtype=DT)
    return prior, A, y, prior.posterior(A, y[0], sigma_y)


def _errors(s, post):
    pm, pc = post.mean(), post.covariance()
    return float((s.mean(0) - pm).norm() / pm.norm()), float((torch.cov(s.T) - pc).norm() / pc.norm())


def _mc(post, n):
    """The relative Monte-Carlo error of the mean of n exact draws."""
    return math.sqrt(float(torch.diagonal(post.covariance()).sum()) / n) / float(post.mean().norm())


def test_r2_is_the_exact_posterior_variance_of_standard_normal_data():
    """x0 ~ N(0, I), x_t = alpha x0 + sigma e: Cov[x0 | x_t] = (sigma²/alpha) J = sigma²/(alpha² + sigma²) I."""
    prior, *_ = _normal_problem()
    den = GMMDenoiser(prior)
    x = torch.randn(3, D, generator=_gen(1), dtype=DT)
    for t in (10.0, 300.0, 900.0):
        a, s = (float(v[0]) for v in den.alpha_sigma(x, t))
        v = torch.randn(3, D, generator=_gen(2), dtype=DT)
        torch.testing.assert_close(s * s / a * den.jvp_x0(x, t, v), s * s / (a * a + s * s) * v)


def test_tmpd_and_pigdm_are_mmps_where_their_covariances_are_exact():
    """One call: TMPD equals the converged MMPS when A J Aᵀ is diagonal; ΠGDM ("tweedie") equals it on
    standard normal data (dense A, enough CG iterations), and its pseudo-inverse form for sigma_y = 0 equals
    the CG solve."""
    x = 3.0 * torch.randn(5, D, generator=_gen(1), dtype=DT)
    for t in (50.0, 500.0, 950.0):
        prior, A, y, _ = _mask_problem()
        den = GMMDenoiser(prior)
        want = MMPSDenoiser(den, MatrixOperator(A), y, 0.2, iterations=M, solver="cg")(x, t)
        got = TMPDDenoiser(den, MatrixOperator(A), y, 0.2)(x, t)
        torch.testing.assert_close(got.x0, want.x0, rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(got.eps, want.eps, rtol=1e-8, atol=1e-8)
        prior, A, y, _ = _normal_problem()
        den = GMMDenoiser(prior)
        want = MMPSDenoiser(den, MatrixOperator(A), y, 0.2, iterations=M, solver="cg")(x, t)
        got = PiGDMDenoiser(den, MatrixOperator(A), y, 0.2, cg_iterations=M)(x, t)
        torch.testing.assert_close(got.x0, want.x0, rtol=1e-7, atol=1e-7)
        pinv = PiGDMDenoiser(den, MatrixOperator(A), y, 0.0)(x, t)
        cg = PiGDMDenoiser(den, _NoPinv(MatrixOperator(A)), y, 0.0, cg_iterations=M)(x, t)
        torch.testing.assert_close(pinv.x0, cg.x0, rtol=1e-6, atol=1e-6)


class _NoPinv:
    """An operator without ``pinv`` (forces ΠGDM's CG solve for sigma_y = 0)."""

    def __init__(self, op):
        self.op = op

    def __call__(self, x):
        return self.op(x)

    def adjoint(self, y):
        return self.op.adjoint(y)


def test_pigdm_released_scaling_is_the_released_update():
    """scaling="released" returns x0 = x0_hat + alpha_t J^T A^+ (y - A x0_hat) (sigma_y = 0) with the network's
    eps, so a DDIM step moves x_{t-1} by alpha_{t-1} alpha_t J^T A^+ r over the unguided step (RED-diff
    ``algos/pgdm.py``, azula ``PGDMSampler.step``, mmps-benchmark ``PseudoinverseGuided``)."""
    g = _gen(0)
    prior = GaussianMixture(torch.ones(1, dtype=DT), torch.randn(1, D, generator=g, dtype=DT),
                            0.5 + torch.rand(1, D, generator=g, dtype=DT))
    A = torch.randn(M, D, generator=g, dtype=DT) / math.sqrt(D)
    y = prior.sample(1, g) @ A.T
    den = GMMDenoiser(prior)
    x = 2.0 * torch.randn(4, D, generator=_gen(1), dtype=DT)
    t = 400.0
    a = float(den.alpha_sigma(x, t)[0][0])
    p = den(x, t)
    got = PiGDMDenoiser(den, MatrixOperator(A), y, 0.0, scaling="released")(x, t)
    want = p.x0 + a * den.jvp_x0(x, t, (y - p.x0 @ A.T) @ torch.linalg.pinv(A).T)  # J symmetric
    torch.testing.assert_close(got.x0, want, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(got.eps, p.eps)
    an, sn = 0.9, 0.3  # any DDIM target: the step is alpha_next x0 + sqrt(sigma_next^2 - v) eps (+ noise)
    torch.testing.assert_close(ddim_step(got.x0, got.eps, a, 0.0, an, sn) - ddim_step(p.x0, p.eps, a, 0.0, an, sn),
                               an * (want - p.x0))


@pytest.mark.parametrize("solver_name", ["dpm++2m", "ddim-eta1"])
def test_tmpd_reaches_the_exact_posterior_with_a_diagonal_a_j_at(solver_name):
    n, sy = 1000, 0.2
    prior, A, y, post = _mask_problem(sigma_y=sy)
    den = GMMDenoiser(prior)
    grid = den.schedule.grid(50, "trailing")
    x = float(grid.sigma[0]) * torch.randn(n, D, generator=_gen(1), dtype=DT)
    if solver_name == "dpm++2m":
        res = sample(TMPDDenoiser(den, MatrixOperator(A), y, sy), x, grid, DPMSolver(2), generator=_gen(2))
    else:
        res = sample_tmpd(den, MatrixOperator(A), y, x, grid, sigma_y=sy, generator=_gen(2))
    mean_err, cov_err = _errors(res.samples, post)
    assert mean_err <= 2 * _mc(post, n), (mean_err, _mc(post, n))
    if solver_name == "dpm++2m":
        exact_cov = _errors(post.sample(n, _gen(3)), post)[1]
        assert cov_err <= 2 * exact_cov, (cov_err, exact_cov)
    # a dense A J Aᵀ (the same prior, a random A): the diagonal is an approximation, visibly off
    prior2, A2, y2, post2 = _mask_problem(sigma_y=sy)
    A2 = torch.randn(M, D, generator=_gen(7), dtype=DT) / math.sqrt(D)
    post2 = prior2.posterior(A2, y2[0], sy)
    res2 = sample(TMPDDenoiser(den, MatrixOperator(A2), y2, sy), x, grid, DPMSolver(2), generator=_gen(2))
    assert _errors(res2.samples, post2)[0] > 2 * _mc(post2, n)


@pytest.mark.parametrize("sigma_y", [0.2, 0.0])
@pytest.mark.parametrize("solver_name", ["dpm++2m", "ddim-eta1"])
def test_pigdm_reaches_the_exact_posterior_of_standard_normal_data(solver_name, sigma_y):
    n = 1000
    prior, A, y, post = _normal_problem(sigma_y=sigma_y)
    den = GMMDenoiser(prior)
    grid = den.schedule.grid(50, "trailing")
    x = float(grid.sigma[0]) * torch.randn(n, D, generator=_gen(1), dtype=DT)
    if solver_name == "dpm++2m":
        res = sample(PiGDMDenoiser(den, MatrixOperator(A), y, sigma_y, cg_iterations=M), x, grid, DPMSolver(2),
                     generator=_gen(2))
    else:
        res = sample_pigdm(den, MatrixOperator(A), y, x, grid, sigma_y=sigma_y, cg_iterations=M, generator=_gen(2))
    mean_err, cov_err = _errors(res.samples, post)
    assert mean_err <= 2 * _mc(post, n), (mean_err, _mc(post, n))
    if solver_name == "dpm++2m" and sigma_y > 0:
        exact_cov = _errors(post.sample(n, _gen(3)), post)[1]
        assert cov_err <= 2 * exact_cov, (cov_err, exact_cov)
    if solver_name == "ddim-eta1":  # the released update (not exact here) still lands near the posterior mean
        rel = sample_pigdm(den, MatrixOperator(A), y, x, grid, sigma_y=sigma_y, cg_iterations=M, scaling="released",
                           generator=_gen(2))
        assert _errors(rel.samples, post)[0] <= 2 * _mc(post, n)
        assert not torch.allclose(rel.samples, res.samples)


def test_costs_per_step():
    prior, A, y, _ = _mask_problem()
    den = GMMDenoiser(prior)
    grid = den.schedule.grid(20, "trailing")
    x = float(grid.sigma[0]) * torch.randn(50, D, generator=_gen(1), dtype=DT)
    res = sample_tmpd(den, MatrixOperator(A), y, x, grid, sigma_y=0.2, generator=_gen(2))
    assert res.cost.network_forward == 20 and res.cost.network_backward == 2 * 20 and res.cost.nfe == 3 * 20
    assert "1 + 2 per step" in res.cost.nfe_convention
    res = sample_pigdm(den, MatrixOperator(A), y, x, grid, sigma_y=0.2, cg_iterations=3, generator=_gen(2))
    assert res.cost.network_forward == 20 and res.cost.network_backward == 20 and res.cost.nfe == 2 * 20
    assert "1 + 1 per step" in res.cost.nfe_convention
    assert get_posterior_sampler("tmpd") is sample_tmpd and get_posterior_sampler("pigdm") is sample_pigdm


def test_latent_runs_through_the_decoder(latent_gaussian):
    n, steps, sy = 1000, 30, 0.1
    # TMPD: A J_D J J_D^T A^T is dense here, so the diagonal is an approximation: closer than the prior
    prior, ae, A, y, post, _ = latent_gaussian("diagonal", sy)
    den = GMMDenoiser(prior)
    grid = den.schedule.grid(steps, "trailing")
    z = float(grid.sigma[0]) * torch.randn(n, 4, generator=_gen(5), dtype=DT)
    res = sample_tmpd(den, MatrixOperator(A), y, z, grid, ae, sigma_y=sy, generator=_gen(6))
    err = _errors(res.samples, post)[0]
    prior_err = float((prior.mean() - post.mean()).norm() / post.mean().norm())
    assert err < 0.1 * prior_err, (err, prior_err)
    assert res.images.shape == (n, 10)
    assert res.cost.network_backward == 2 * steps and res.cost.decoder_backward == 2 * steps
    # ΠGDM on standard normal latents: r_t² I is the exact latent covariance, so the latent posterior is reached
    prior, ae, A, y, post, _ = latent_gaussian("normal", sy)
    den = GMMDenoiser(prior)
    res = sample_pigdm(den, MatrixOperator(A), y, z, grid, ae, sigma_y=sy, cg_iterations=3, ddim_eta=0.0)
    assert _errors(res.samples, post)[0] <= 2 * _mc(post, n)
    assert res.cost.network_backward == steps and res.cost.decoder_backward == steps * (3 + 1)


def test_latent_autoencoder_with_only_encode_and_decode(latent_gaussian):
    # an autoencoder that says nothing of its data shape (as the sweeps' wrapper of a latent model): the shape
    # is read from one decode, and the run equals the one with the oracle's own autoencoder
    from hessdiff.samplers.guidance import sample_mmps

    class Plain:
        def __init__(self, ae):
            self.ae = ae

        def encode(self, x):
            return self.ae.encode(x)

        def decode(self, z):
            return self.ae.decode(z)

    prior, ae, A, y, _, _ = latent_gaussian("diagonal", 0.1)
    den = GMMDenoiser(prior)
    grid = den.schedule.grid(5, "trailing")
    z = float(grid.sigma[0]) * torch.randn(20, 4, generator=_gen(5), dtype=DT)
    for fn, opts in ((sample_mmps, {}), (sample_tmpd, {}), (sample_pigdm, {"cg_iterations": 3})):
        ref = fn(den, MatrixOperator(A), y, z, grid, ae, sigma_y=0.1, generator=_gen(6), **opts)
        res = fn(den, MatrixOperator(A), y, z, grid, Plain(ae), sigma_y=0.1, generator=_gen(6), **opts)
        assert torch.allclose(res.samples, ref.samples, rtol=0, atol=1e-12), fn.__name__
        assert res.images.shape == ref.images.shape == (20, 10)


def test_float32_runs_stay_float32_and_finite():
    prior, A, y, post = _mask_problem(sigma_y=0.0)
    den = GMMDenoiser(prior)
    grid = den.schedule.grid(20, "trailing")
    x = (float(grid.sigma[0]) * torch.randn(200, D, generator=_gen(1))).float()
    for fn in (sample_tmpd, sample_pigdm):
        res = fn(den, MatrixOperator(A), y.float(), x, grid, sigma_y=0.0, clip_x0=10.0, generator=_gen(2))
        assert res.samples.dtype == torch.float32 and bool(torch.isfinite(res.samples).all())
        assert _errors(res.samples.double(), post)[0] < 0.1  # sigma_y = 0: the TMPD floor and ΠGDM's pinv form


def test_bad_options():
    prior, A, y, _ = _mask_problem()
    den, op = GMMDenoiser(prior), MatrixOperator(A)
    with pytest.raises(ValueError, match="sigma_y"):
        TMPDDenoiser(den, op, y, -1.0)
    with pytest.raises(ValueError, match="variance_floor"):
        TMPDDenoiser(den, op, y, 0.2, variance_floor=0.0)
    with pytest.raises(ValueError, match="clip_x0"):
        TMPDDenoiser(den, op, y, 0.2, clip_x0=0.0)
    with pytest.raises(ValueError, match="scaling"):
        PiGDMDenoiser(den, op, y, 0.2, scaling="paper")
    with pytest.raises(ValueError, match="cg_iterations"):
        PiGDMDenoiser(den, op, y, 0.2, cg_iterations=0)
    with pytest.raises(ValueError, match="sigma_y"):
        PiGDMDenoiser(den, op, y, float("nan"))
    grid = den.schedule.grid(5)
    for fn in (sample_tmpd, sample_pigdm):
        with pytest.raises(ValueError, match="measurement"):
            fn(den, op, y[:, :3], torch.zeros(2, D, dtype=DT), grid, sigma_y=0.2)
        with pytest.raises(ValueError, match="ddim_eta"):
            fn(den, op, y, torch.zeros(2, D, dtype=DT), grid, sigma_y=0.2, ddim_eta=-1.0)


def _latent_selection_problem(sigma_y=0.2, seed=0, d_z=6, d_x=20, m=4):
    """A diagonal latent Gaussian prior, a dense random decoder ``x = W z + b`` and a dense ``A`` (``d_x`` pixels)
    whose composition ``A W`` keeps (and scales) ``m`` of the ``d_z`` latent coordinates: ``A J_D J J_Dᵀ Aᵀ``
    is diagonal at every noise level although neither ``A`` nor the decoder is."""
    g = _gen(seed)
    prior = GaussianMixture(torch.ones(1, dtype=DT), torch.randn(1, d_z, generator=g, dtype=DT),
                            0.3 + 1.2 * torch.rand(1, d_z, generator=g, dtype=DT))
    W = torch.randn(d_x, d_z, generator=g, dtype=DT) / math.sqrt(d_z)  # dense, not orthonormal
    b = 0.1 * torch.randn(d_x, generator=g, dtype=DT)
    keep = torch.randperm(d_z, generator=g)[:m]
    B = torch.eye(d_z, dtype=DT)[keep] * (0.5 + torch.rand(m, 1, generator=g, dtype=DT))
    A = B @ torch.linalg.pinv(W)  # A W = B (W has full column rank)
    from hessdiff.samplers.oracles.gmm import LinearAutoencoder

    ae = LinearAutoencoder(W, b)
    y = ae.decode(prior.sample(1, g)) @ A.T + sigma_y * torch.randn(1, m, generator=g, dtype=DT)
    # y = A (W z + b) + n: the latent posterior of z given y - A b under the linear map A W
    return prior, ae, A, y, prior.posterior(A @ W, (y - b @ A.T)[0], sigma_y)


@pytest.mark.parametrize("method", ["tmpd", "mmps"])
def test_latent_methods_reach_the_exact_posterior_through_a_dense_decoder(method):
    """Latent TMPD's diagonal (one VJP through network and decoder, one decoder JVP) is exact when
    ``A W Cov[z0 | z_t] Wᵀ Aᵀ`` is diagonal, whatever ``A`` and ``W`` are; MMPS is exact with any ``A W``."""
    from hessdiff.samplers.guidance import sample_mmps

    n, sy, steps = 1000, 0.2, 50
    prior, ae, A, y, post = _latent_selection_problem(sigma_y=sy)
    assert (A.abs() > 1e-3).float().mean() > 0.9 and (ae.W.abs() > 1e-3).float().mean() > 0.9  # both dense
    den = GMMDenoiser(prior)
    grid = den.schedule.grid(steps, "trailing")
    z = float(grid.sigma[0]) * torch.randn(n, 6, generator=_gen(11), dtype=DT)
    if method == "tmpd":
        res = sample_tmpd(den, MatrixOperator(A), y, z, grid, ae, sigma_y=sy, generator=_gen(12))
        assert res.cost.network_backward == 2 * steps and res.cost.decoder_backward == 2 * steps
    else:
        res = sample_mmps(den, MatrixOperator(A), y, z, grid, ae, sigma_y=sy, generator=_gen(12))
    mean_err = _errors(res.samples, post)[0]
    assert mean_err <= 2 * _mc(post, n), (mean_err, _mc(post, n))
    assert res.images.shape == (n, 20)
    if method == "tmpd":
        # the same prior and decoder with a dense A W: the row sums are no diagonal and the mean is visibly off
        A2 = torch.randn(4, 20, generator=_gen(13), dtype=DT) / math.sqrt(20)
        post2 = prior.posterior(A2 @ ae.W, (y - ae.b @ A2.T)[0], sy)
        res2 = sample_tmpd(den, MatrixOperator(A2), y, z, grid, ae, sigma_y=sy, generator=_gen(12))
        assert _errors(res2.samples, post2)[0] > 2 * _mc(post2, n)
