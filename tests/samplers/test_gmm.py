"""Exact Gaussian-mixture oracle: closed forms against autograd and brute force."""

import math

import pytest
import torch

from hessdiff.samplers.oracles.gmm import (
    GaussianMixture,
    GMMDenoiser,
    LinearAutoencoder,
    cifar_like_spectrum,
    default_gmm_schedule,
    grid_gmm_means,
    grid_gmm_problem,
    grid_gmm_seed,
)


@pytest.fixture(autouse=True)
def _float64_default():
    """These oracle tests build tensors in float64; restore the default afterwards."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _mixture(kind: str, d: int = 4, K: int = 3, seed: int = 0) -> GaussianMixture:
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(K, generator=g) + 0.1
    mu = 2 * torch.randn(K, d, generator=g)
    if kind == "iso":
        covs = torch.rand(K, generator=g) + 0.2
    elif kind == "diag":
        covs = torch.rand(K, d, generator=g) + 0.2
    else:
        B = torch.randn(K, d, d, generator=g)
        covs = B @ B.transpose(-1, -2) / d + 0.1 * torch.eye(d)
    return GaussianMixture(w, mu, covs)


def _logp(prior, x, a, s):
    """log p_t by brute force from dense covariances (independent of the eigen code path)."""
    covs = prior.covariances()
    out = []
    for k in range(prior.num_components):
        C = a**2 * covs[k] + s**2 * torch.eye(prior.dim)
        dist = torch.distributions.MultivariateNormal(a * prior.means[k], covariance_matrix=C)
        out.append(dist.log_prob(x) + prior.weights[k].log())
    return torch.logsumexp(torch.stack(out, -1), -1)


@pytest.mark.parametrize("kind", ["iso", "diag", "full"])
@pytest.mark.parametrize("t", [5.0, 300.0, 900.0])
def test_score_x0_jvp_hessian_match_autograd(kind, t):
    prior = _mixture(kind)
    den = GMMDenoiser(prior)
    g = torch.Generator().manual_seed(1)
    x = 1.5 * torch.randn(5, prior.dim, generator=g)
    a, s = (float(v) for v in den.schedule.alpha_sigma(torch.tensor(t)))

    torch.testing.assert_close(den.log_prob(x, t), _logp(prior, x, a, s), rtol=1e-10, atol=1e-10)

    xr = x.clone().requires_grad_(True)
    score_ag = torch.autograd.grad(_logp(prior, xr, a, s).sum(), xr)[0]
    torch.testing.assert_close(den.score(x, t), score_ag, rtol=1e-6, atol=1e-6)

    hess_ag = torch.stack([torch.autograd.functional.hessian(lambda z: _logp(prior, z[None], a, s).sum(), xi)
                           for xi in x])
    torch.testing.assert_close(den.hessian(x, t), hess_ag, rtol=1e-6, atol=1e-6)

    v = torch.randn(5, prior.dim, generator=g)
    torch.testing.assert_close(den.hessian_vp(x, t, v), torch.einsum("bij,bj->bi", hess_ag, v), rtol=1e-6, atol=1e-6)

    pred = den(x, t)
    x0_ag = (x + s**2 * score_ag) / a  # Tweedie
    torch.testing.assert_close(pred.x0, x0_ag, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a * pred.x0 + s * pred.eps, x, rtol=1e-10, atol=1e-10)

    # JVP of x0_hat against autograd of the denoiser itself
    _, jvp_ag = torch.autograd.functional.jvp(lambda z: den(z, t).x0, x, v)
    torch.testing.assert_close(den.jvp_x0(x, t, v), jvp_ag, rtol=1e-6, atol=1e-6)


def test_x0_is_posterior_mean_by_quadrature_1d():
    """E[x0 | x_t] by brute-force quadrature over x0 in one dimension."""
    prior = GaussianMixture(torch.tensor([0.3, 0.7]), torch.tensor([[-2.0], [1.5]]), torch.tensor([0.25, 0.5]))
    den = GMMDenoiser(prior)
    t = 400.0
    a, s = (float(v) for v in den.schedule.alpha_sigma(torch.tensor(t)))
    x0 = torch.linspace(-12, 12, 200001)[:, None]
    logprior = prior.log_prob(x0)
    for xt in (-1.0, 0.3, 2.0):
        loglik = -0.5 * ((xt - a * x0[:, 0]) / s) ** 2
        w = torch.softmax(logprior + loglik, 0)
        mean = (w * x0[:, 0]).sum()
        assert float(den(torch.tensor([[xt]]), t).x0) == pytest.approx(float(mean), abs=1e-7)


def test_marginal_is_the_law_of_x_t():
    prior = _mixture("full", d=3)
    den = GMMDenoiser(prior)
    t = 250.0
    a, s = (float(v) for v in den.schedule.alpha_sigma(torch.tensor(t)))
    x = torch.randn(7, 3, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(den.marginal(t).log_prob(x), den.log_prob(x, t), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(den.marginal(t).log_prob(x), _logp(prior, x, a, s), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("d", [1, 2])
def test_posterior_matches_brute_force(d):
    """p(x0|y) ∝ p(x0) N(y; A x0, sy^2) on a grid, in 1 and 2 dimensions."""
    prior = _mixture("full" if d == 2 else "diag", d=d, K=3, seed=3)
    A = torch.tensor([[0.8]]) if d == 1 else torch.tensor([[0.6, -0.9]])
    y = torch.tensor([0.7])
    sy = 0.4
    post = prior.posterior(A, y, sy)
    n = 2001 if d == 1 else 401
    axes = [torch.linspace(-10, 10, n)] * d
    pts = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, d)
    logp = prior.log_prob(pts) - 0.5 * (((pts @ A.T) - y) ** 2).sum(-1) / sy**2
    w = torch.softmax(logp, 0)
    mean_bf = w @ pts
    cov_bf = (w[:, None] * (pts - mean_bf)).T @ (pts - mean_bf)
    torch.testing.assert_close(post.mean(), mean_bf, rtol=0, atol=2e-6)
    torch.testing.assert_close(post.covariance(), cov_bf, rtol=0, atol=2e-5)
    # pointwise density
    post_bf = logp - torch.logsumexp(logp, 0) - d * math.log(20 / (n - 1))
    idx = torch.argsort(-post_bf)[:50]
    torch.testing.assert_close(post.log_prob(pts[idx]), post_bf[idx], rtol=0, atol=1e-4)


def test_posterior_latent_linear_decoder():
    """Latent prior + linear decoder: posterior over z for y = A W z + n equals conditioning the
    image-space push-forward prior and mapping back (the decoder is injective)."""
    g = torch.Generator().manual_seed(4)
    prior_z = _mixture("diag", d=3, K=2, seed=5)
    ae = LinearAutoencoder.random(5, 3, generator=g)
    A = torch.randn(2, 5, generator=g)
    y = torch.randn(2, generator=g)
    post_z = prior_z.posterior(A @ ae.W, y, 0.3)
    torch.testing.assert_close(ae.encode(ae.decode(post_z.means)), post_z.means)
    prior_x = prior_z.linear_map(ae.W)
    # image-space prior is degenerate (rank 3 in R^5): conditioning still works in Kalman form
    post_x = prior_x.posterior(A, y, 0.3)
    torch.testing.assert_close(post_x.weights, post_z.weights, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(post_x.means, ae.decode(post_z.means), rtol=1e-8, atol=1e-8)


def test_sampling_moments_and_generator():
    prior = _mixture("full", d=3)
    a = prior.sample(20000, torch.Generator().manual_seed(0))
    b = prior.sample(20000, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    torch.testing.assert_close(a.mean(0), prior.mean(), rtol=0, atol=0.06)
    torch.testing.assert_close(torch.cov(a.T), prior.covariance(), rtol=0, atol=0.15)


def test_grid_benchmark_instance():
    means = grid_gmm_means(8)
    assert means.shape == (25, 8)
    assert means[0].tolist() == [16.0, 16.0] * 4  # i = j = -2
    assert means[1].tolist() == [16.0, 8.0] * 4  # j inner
    assert grid_gmm_seed(80, 4, 3) == 2 * 9 + 3
    p = grid_gmm_problem(8, 2, 0)
    q = grid_gmm_problem(8, 2, 0)
    assert torch.equal(p.A, q.A) and torch.equal(p.y, q.y) and p.sigma_y == q.sigma_y
    sv = torch.linalg.svdvals(p.A)
    assert bool((sv > 0).all()) and bool((sv < 1).all())  # singular values ~ U[0, 1]
    assert 0 <= p.sigma_y <= float(sv.max())
    assert p.A.shape == (2, 8) and p.y.shape == (2,)
    r = grid_gmm_problem(800, 1, 5, sigma_y=0.1)
    assert r.sigma_y == 0.1 and r.A.shape == (1, 800)
    post = r.posterior()
    assert post.num_components == 25 and abs(float(post.weights.sum()) - 1) < 1e-12


def test_cifar_like_spectrum():
    c = cifar_like_spectrum(3072)
    assert c.shape == (3072,) and bool((c[:-1] > c[1:]).all()) and float(c[0]) == 0.25


def test_shapes_are_flattened_and_checked():
    prior = _mixture("iso", d=12)
    den = GMMDenoiser(prior, default_gmm_schedule())
    x = torch.randn(2, 3, 2, 2)
    p = den(x, 100)
    assert p.eps.shape == x.shape and p.x0.shape == x.shape
    with pytest.raises(ValueError, match="prior has dimension 12"):
        den(torch.randn(2, 5), 100)
    with pytest.raises(ValueError, match="out of range"):
        den(torch.randn(2, 12), 1e6)


def test_bad_mixture_inputs():
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture(torch.tensor([1.0, -1.0]), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="fit none of"):
        GaussianMixture(torch.ones(2), torch.zeros(2, 3), torch.ones(4, 4))
    prior = _mixture("iso", d=3)
    with pytest.raises(ValueError, match="A must be"):
        prior.posterior(torch.ones(2, 4), torch.ones(2), 0.1)
    with pytest.raises(ValueError, match="NaN"):
        prior.posterior(torch.ones(1, 3), torch.tensor([float("nan")]), 0.1)
    with pytest.raises(ValueError, match="sigma_y"):
        prior.posterior(torch.ones(1, 3), torch.ones(1), -0.1)
