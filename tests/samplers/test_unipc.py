"""UniPC and iPNDM: parity with diffusers' UniPCMultistepScheduler and convergence orders on the
exact-W2 Gaussian (PAPERS.md 7; measured orders in the module docstring of hessdiff.samplers.solvers.unipc)."""

from functools import partial

import pytest
import torch
from diffusers import UniPCMultistepScheduler

from hessdiff.samplers.oracles.gmm import GaussianMixture, GMMDenoiser, cifar_like_spectrum
from hessdiff.samplers.schedule import DiscreteVPSchedule
from hessdiff.samplers.solvers import IPNDM, UniPC, make_solver, sample_dpm_solver, sample_ipndm, sample_unipc
from hessdiff.scripts.bench.gmm import convergence_order, gaussian_prior_w2

CFG = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}
F64 = torch.float64


@pytest.fixture(scope="module")
def gmm():
    g = torch.Generator().manual_seed(0)
    prior = GaussianMixture(torch.rand(3, generator=g, dtype=F64) + 0.2,
                            2.0 * torch.randn(3, 6, generator=g, dtype=F64),
                            torch.rand(3, 6, generator=g, dtype=F64) + 0.1)
    return GMMDenoiser(prior, DiscreteVPSchedule.from_config(CFG))


CASES = [(v, o, px0, n, sp, fin) for v in ("bh1", "bh2") for o in (1, 2, 3) for px0 in (True, False)
         for n, sp, fin in ((10, "leading", "sigma_min"), (8, "trailing", "sigma_min"))] + \
        [("bh2", o, True, 10, "trailing", "zero") for o in (1, 2, 3)]


@pytest.mark.parametrize("variant, order, predict_x0, n, spacing, final", CASES)
def test_unipc_matches_diffusers(gmm, variant, order, predict_x0, n, spacing, final):
    ds = UniPCMultistepScheduler(**CFG, solver_order=order, solver_type=variant, predict_x0=predict_x0,
                                 timestep_spacing=spacing, final_sigmas_type=final)
    ds.set_timesteps(n)
    grid = gmm.schedule.grid(n, spacing, style="dpmsolver", final="zero" if final == "zero" else "first")
    assert torch.equal(grid.t[:-1].long(), ds.timesteps)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1), dtype=F64)
    theirs = x.clone()
    for t in ds.timesteps:
        theirs = ds.step(gmm(theirs, t).eps, t, theirs).prev_sample
    ours = sample_unipc(gmm, x, grid, order=order, variant=variant, predict_x0=predict_x0)
    assert (ours - theirs.double()).abs().max().item() <= 1e-5


def test_unipc_lands_on_sigma_zero_where_diffusers_gives_nan(gmm):
    """bh1 / noise prediction with a final step to sigma = 0: diffusers computes 0 * inf; we take the limit."""
    grid = gmm.schedule.grid(10, "trailing", style="dpmsolver", final="zero")
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1), dtype=F64)
    for kw in ({"variant": "bh1"}, {"predict_x0": False}):
        out = sample_unipc(gmm, x, grid, order=2, **kw)
        assert torch.isfinite(out).all()
        ref = sample_unipc(gmm, x, gmm.schedule.grid(200, "trailing", style="dpmsolver", final="zero"), order=2, **kw)
        assert float((out - ref).norm() / ref.norm()) < 0.05


NFES = (20, 40, 80, 160, 320)


@pytest.fixture(scope="module")
def errors():
    c = cifar_like_spectrum(8)
    methods = {"dpm++2m": partial(sample_dpm_solver, order=2), "unipc-2": partial(sample_unipc, order=2),
               "unipc-bh1-2": partial(sample_unipc, order=2, variant="bh1"), "ipndm-4": sample_ipndm}
    return {k: [gaussian_prior_w2(m, n, c, spacing="logsnr", final="first") for n in (5, *NFES)]
            for k, m in methods.items()}


@pytest.mark.parametrize("name", ["unipc-2", "unipc-bh1-2"])
def test_unipc_2_is_third_order(errors, name):
    """UniPC-p with its corrector is of order p + 1 (Zhao et al. 2023, Thm 3.3)."""
    p = convergence_order(NFES[2:], errors[name][3:])
    assert 2.8 <= p <= 3.3, p
    assert all(a < b for a, b in zip(errors[name][2:], errors["dpm++2m"][2:], strict=True))


def test_ipndm_order_and_low_nfe(errors):
    """iPNDM's fixed Adams--Bashforth coefficients on a non-uniform log-SNR grid: second order
    asymptotically, but the smallest error of all at NFE 5 (as in the low-NFE literature)."""
    p = convergence_order(NFES[2:], errors["ipndm-4"][3:])
    assert 1.9 <= p <= 2.1, p
    assert errors["ipndm-4"][0] < min(e[0] for k, e in errors.items() if k != "ipndm-4")


def test_registry_and_bad_input(gmm):
    assert isinstance(make_solver("unipc"), UniPC) and isinstance(make_solver("ipndm", order=3), IPNDM)
    with pytest.raises(ValueError, match="variant"):
        UniPC(variant="bh3")
    with pytest.raises(ValueError, match="order"):
        IPNDM(5)
