"""Oracle problems shared by the posterior-sampler tests."""

import math
from typing import NamedTuple

import pytest
import torch

from hessdiff.samplers.oracles.gmm import GaussianMixture, LinearAutoencoder

DT = torch.float64


class LatentGaussian(NamedTuple):
    prior: GaussianMixture
    ae: LinearAutoencoder
    A: torch.Tensor
    y: torch.Tensor
    post: GaussianMixture
    sigma_y: float


def build_latent_gaussian(kind: str = "diagonal", sigma_y: float = 0.1) -> LatentGaussian:
    """A Gaussian prior on ``z`` (d_z 4), a random orthonormal linear decoder to d_x 10, and ``y = A D(z*) + n``
    with 3 measurements. ``kind`` "diagonal" draws a mean and a diagonal covariance, "normal" is N(0, I).
    ``post`` is the exact latent posterior, ``prior.posterior(A W, y, sigma_y)``."""
    g = torch.Generator().manual_seed(4)
    d_z, d_x, m = 4, 10, 3
    if kind == "normal":
        prior = GaussianMixture(torch.ones(1, dtype=DT), torch.zeros(1, d_z, dtype=DT))
    elif kind == "diagonal":
        prior = GaussianMixture(torch.ones(1, dtype=DT), torch.randn(1, d_z, generator=g, dtype=DT),
                                0.5 + torch.rand(1, d_z, generator=g, dtype=DT))
    else:
        raise ValueError(f"kind must be 'diagonal' or 'normal', got {kind!r}")
    ae = LinearAutoencoder.random(d_x, d_z, generator=g)
    A = torch.randn(m, d_x, generator=g, dtype=DT) / math.sqrt(d_x)
    y = ae.decode(prior.sample(1, g)) @ A.T + sigma_y * torch.randn(1, m, generator=g, dtype=DT)
    return LatentGaussian(prior, ae, A, y, prior.posterior(A @ ae.W, y[0], sigma_y), sigma_y)


@pytest.fixture
def latent_gaussian():
    """The builder :func:`build_latent_gaussian` (call it with ``kind`` / ``sigma_y``)."""
    return build_latent_gaussian
