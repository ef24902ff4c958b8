import pytest
import scipy.linalg
import scipy.stats
import torch

from hessdiff.eval.metrics.distances import (
    component_tv,
    gaussian_w2,
    posterior_mean_error,
    sliced_wasserstein,
    wasserstein1_1d,
)
from hessdiff.samplers.oracles.gmm import GaussianMixture


def test_w1_1d_matches_scipy_equal_and_unequal_sizes():
    g = torch.Generator().manual_seed(0)
    for n, m in [(100, 100), (100, 37)]:
        u = torch.randn(3, n, generator=g, dtype=torch.float64)
        v = 0.5 + 2 * torch.randn(3, m, generator=g, dtype=torch.float64)
        ours = wasserstein1_1d(u, v)
        ref = [scipy.stats.wasserstein_distance(u[i].numpy(), v[i].numpy()) for i in range(3)]
        torch.testing.assert_close(ours, torch.tensor(ref, dtype=torch.float64), rtol=1e-10, atol=1e-12)


def test_sliced_w1_properties():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(500, 5, generator=g, dtype=torch.float64)
    assert sliced_wasserstein(x, x, num_projections=200) == 0.0
    shift = torch.zeros(5, dtype=torch.float64)
    shift[0] = 3.0
    # a translation by c moves every projection by <theta, c>: SW1 = E|theta_0| * 3
    sw = sliced_wasserstein(x, x + shift, num_projections=4000, seed=3)
    from hessdiff.eval.metrics.distances import random_directions

    expect = float(random_directions(5, 4000, 3)[:, 0].abs().mean() * 3)
    assert sw == pytest.approx(expect, rel=1e-10)
    assert sliced_wasserstein(x, x + shift, num_projections=100, seed=7) == sliced_wasserstein(
        x, x + shift, num_projections=100, seed=7)
    with pytest.raises(ValueError, match="dimension mismatch"):
        sliced_wasserstein(x, x[:, :3])
    with pytest.raises(ValueError, match="NaN"):
        sliced_wasserstein(x, torch.full((3, 5), float("nan")))


def test_gaussian_w2_against_scipy_sqrtm():
    g = torch.Generator().manual_seed(2)
    B1, B2 = torch.randn(4, 4, generator=g, dtype=torch.float64), torch.randn(4, 4, generator=g, dtype=torch.float64)
    C1, C2 = B1 @ B1.T + 0.1 * torch.eye(4), B2 @ B2.T + 0.1 * torch.eye(4)
    m1, m2 = torch.randn(4, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    s1 = scipy.linalg.sqrtm(C1.numpy())
    cross = scipy.linalg.sqrtm(s1 @ C2.numpy() @ s1).real
    ref = (((m1 - m2) ** 2).sum().item() + float(torch.trace(C1 + C2)) - 2 * cross.trace()) ** 0.5
    assert gaussian_w2(m1, C1, m2, C2) == pytest.approx(ref, rel=1e-9)
    d1, d2 = torch.rand(6, dtype=torch.float64), torch.rand(6, dtype=torch.float64)
    z = torch.zeros(6, dtype=torch.float64)
    assert gaussian_w2(z, d1, z, d2) == pytest.approx(gaussian_w2(z, torch.diag(d1), z, torch.diag(d2)), rel=1e-9)
    assert gaussian_w2(m1, C1, m1, C1) == pytest.approx(0.0, abs=1e-6)


def test_component_tv_and_mean_error():
    mix = GaussianMixture(torch.tensor([0.2, 0.8]), torch.tensor([[-20.0, 0.0], [20.0, 0.0]]))
    x = mix.sample(4000, torch.Generator().manual_seed(0))
    assert component_tv(x, mix) < 0.02
    assert component_tv(x[x[:, 0] > 0], mix) == pytest.approx(0.2, abs=1e-9)
    assert posterior_mean_error(x, mix.mean()) < 0.5
    assert posterior_mean_error(torch.zeros(3, 2), torch.tensor([3.0, 4.0])) == pytest.approx(5.0)
