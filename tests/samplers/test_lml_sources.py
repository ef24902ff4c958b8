"""Curvature sources for trained networks: the data-covariance prior and the noise-level gate."""

from functools import partial

import pytest
import torch

from hessdiff.samplers.lml import HessianStepCorrection
from hessdiff.samplers.lml.curvature import DataCovarianceSource, GatedSource, JVPSource
from hessdiff.samplers.oracles.gmm import GaussianMixture, GMMDenoiser, cifar_like_spectrum
from hessdiff.samplers.solvers import sample_dpm_solver
from hessdiff.scripts.bench.gmm import gaussian_prior_w2

F64 = torch.float64


@pytest.mark.parametrize("nfe", [3, 5, 10])
def test_gaussian_step_with_the_data_covariance_is_exact_on_gaussian_data(nfe):
    """For Gaussian data the local-Gaussian step with the true covariance is the exact ODE map: W2 to
    the target law at rounding level at any NFE (the base solver's error is 1e-2 to 1e-1 here)."""
    c = cifar_like_spectrum(8)
    src = DataCovarianceSource(torch.eye(8, dtype=F64), c, 0.0)

    def method(den, x, grid):
        return sample_dpm_solver(den, x, grid, order=1, correction=HessianStepCorrection(src, adaptive=False))

    assert gaussian_prior_w2(method, nfe, c, spacing="logsnr", final="first") < 1e-12
    assert gaussian_prior_w2(partial(sample_dpm_solver, order=2), nfe, c, spacing="logsnr", final="first") > 1e-3


def test_from_data_recovers_the_covariance():
    g = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=F64))[0]
    var = torch.tensor([9.0, 4.0, 1.0, 0.5, 0.5, 0.5], dtype=F64)
    x = (torch.randn(20000, 6, generator=g, dtype=F64) * var.sqrt()) @ Q.T + 3.0
    src = DataCovarianceSource.from_data(x, rank=3)
    torch.testing.assert_close(src.c, var[:3], rtol=0.05, atol=0)
    assert abs(src.c0 - 0.5) < 0.03
    A = src.at(2.0, batch=1)
    dense = A.U[0] @ torch.diag(A.s[0]) @ A.U[0].T + A.s0[0] * (torch.eye(6, dtype=F64) - A.U[0] @ A.U[0].T)
    cov = Q @ torch.diag(var) @ Q.T
    torch.testing.assert_close(dense, cov @ torch.linalg.inv(cov + 4.0 * torch.eye(6, dtype=F64)), rtol=0.05,
                               atol=0.02)
    with pytest.raises(ValueError, match="V must be"):
        DataCovarianceSource(torch.zeros(6), torch.zeros(2), 0.0)


def test_gate_uses_the_network_only_below_the_noise_level():
    g = torch.Generator().manual_seed(1)
    prior = GaussianMixture(torch.ones(2, dtype=F64), 2.0 * torch.randn(2, 8, generator=g, dtype=F64), 0.5)
    den = GMMDenoiser(prior)
    grid = den.schedule.grid(8, "trailing")
    x = float(grid.sigma[0]) * torch.randn(16, 8, generator=g, dtype=F64)
    rhos = (grid.sigma[:-1] / grid.alpha[:-1]).tolist()
    gate = 1.0
    src = GatedSource(JVPSource(2), DataCovarianceSource.from_data(prior.sample(4000, g), rank=8), gate=gate)
    corr = HessianStepCorrection(src, adaptive=False)
    out = sample_dpm_solver(den, x, grid, order=2, correction=corr)
    assert torch.isfinite(out).all()
    assert corr.jvp_calls == 2 * sum(1 for r in rhos if r < gate) > 0
    with pytest.raises(ValueError, match="gate"):
        GatedSource(JVPSource(2), src.high, gate=0.0)


def test_model_stats_of_an_exact_gaussian_denoiser_give_the_exact_step(tmp_path):
    """The per-level statistics of an exact Gaussian denoiser are its (state-independent) curvature;
    the zero-NFE step that uses them, transported between levels, is the exact ODE map; save / load
    round-trips them."""
    from hessdiff.samplers.lml.curvature import StatsSource, estimate_model_stats

    c = cifar_like_spectrum(8)
    cache = {}

    def method(den, x, grid):
        if "src" not in cache:
            data = den.prior.sample(64, torch.Generator().manual_seed(0))
            rhos = torch.logspace(-2, 2.5, 12, dtype=F64).tolist()
            cache["src"] = estimate_model_stats(den, data, rhos, rank=8, oversample=0,
                                                generator=torch.Generator().manual_seed(1))
        return sample_dpm_solver(den, x, grid, order=1, correction=HessianStepCorrection(cache["src"], adaptive=False))

    assert gaussian_prior_w2(method, 5, c, spacing="logsnr", final="first") < 1e-9
    src = cache["src"]
    src.save(tmp_path / "lml_stats.safetensors")
    back = StatsSource.load(tmp_path / "lml_stats.safetensors")
    assert torch.equal(back.U, src.U) and torch.equal(back.s0, src.s0) and torch.equal(back.rhos, src.rhos)
    with pytest.raises(ValueError, match="stats shapes"):
        StatsSource(src.rhos, src.U, src.s[:, :3], src.s0)
