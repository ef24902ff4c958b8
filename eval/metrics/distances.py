"""Distances between sample sets and exact Gaussian(-mixture) laws.

* :func:`sliced_wasserstein` -- sliced Wasserstein-1 between two empirical measures, with
  ``num_projections`` random unit directions drawn from a fixed seed (exact 1-D W1 per direction,
  unequal sample sizes allowed).
* :func:`gaussian_w2` -- closed-form Wasserstein-2 between two Gaussians (full or diagonal
  covariances).
* :func:`component_tv` -- total variation between a mixture's component weights and the component
  masses of a sample set (mean responsibilities, an unbiased estimate of the weights).
* :func:`posterior_mean_error` -- Euclidean error of the sample mean against an exact mean.

Inputs are ``[n, d]`` (any trailing shape is flattened); arithmetic is float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "sliced_wasserstein",
    "wasserstein1_1d",
    "gaussian_w2",
    "component_tv",
    "posterior_mean_error",
    "random_directions",
]


def _flat64(x: Tensor, name: str) -> Tensor:
    x = torch.as_tensor(x)
    if x.ndim < 2:
        raise ValueError(f"{name} must be [n, d] (or [n, ...]), got shape {tuple(x.shape)}")
    x = x.reshape(x.shape[0], -1).to(torch.float64)
    if x.shape[0] < 1:
        raise ValueError(f"{name} is empty")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return x


def random_directions(dim: int, num: int, seed: int = 0) -> Tensor:
    """``num`` unit vectors in ``R^dim`` from a generator seeded with ``seed``, ``[num, dim]``."""
    g = torch.Generator().manual_seed(int(seed))
    v = torch.randn(num, dim, generator=g, dtype=torch.float64)
    return v / v.norm(dim=1, keepdim=True)


def wasserstein1_1d(u: Tensor, v: Tensor) -> Tensor:
    """Exact W1 between 1-D empirical measures, batched over the first axis: ``u`` ``[P, n]``,
    ``v`` ``[P, m]`` -> ``[P]``. Computes ``int |F_u - F_v|``."""
    u, _ = torch.sort(u, dim=1)
    v, _ = torch.sort(v, dim=1)
    n, m = u.shape[1], v.shape[1]
    if n == m:
        return (u - v).abs().mean(1)
    allv, _ = torch.sort(torch.cat([u, v], dim=1), dim=1)
    deltas = allv[:, 1:] - allv[:, :-1]
    pts = allv[:, :-1].contiguous()
    fu = torch.searchsorted(u.contiguous(), pts, right=True).to(torch.float64) / n
    fv = torch.searchsorted(v.contiguous(), pts, right=True).to(torch.float64) / m
    return ((fu - fv).abs() * deltas).sum(1)


def sliced_wasserstein(x: Tensor, y: Tensor, num_projections: int = 10_000, seed: int = 0,
                       chunk: int = 1000) -> float:
    """Sliced W1: mean over fixed-seed unit directions ``theta`` of ``W1(theta.x, theta.y)``."""
    x, y = _flat64(x, "x"), _flat64(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"dimension mismatch: x has {x.shape[1]}, y has {y.shape[1]}")
    dirs = random_directions(x.shape[1], num_projections, seed).to(x.device)
    total = torch.zeros((), dtype=torch.float64)
    for k in range(0, num_projections, chunk):
        d = dirs[k : k + chunk]
        total = total + wasserstein1_1d(d @ x.T, d @ y.T).sum().cpu()
    return float(total / num_projections)


def _sqrtm_psd(c: Tensor) -> Tensor:
    e, q = torch.linalg.eigh(0.5 * (c + c.T))
    return (q * e.clamp(min=0).sqrt()) @ q.T


def gaussian_w2(m1: Tensor, c1: Tensor, m2: Tensor, c2: Tensor) -> float:
    """``W2(N(m1, C1), N(m2, C2))``; covariances ``[d, d]`` or diagonals ``[d]`` (both of one kind).

    ``W2^2 = |m1 - m2|^2 + tr(C1 + C2 - 2 (C1^{1/2} C2 C1^{1/2})^{1/2})``.
    """
    m1, m2 = (torch.as_tensor(v, dtype=torch.float64).flatten() for v in (m1, m2))
    c1, c2 = (torch.as_tensor(v, dtype=torch.float64) for v in (c1, c2))
    if m1.shape != m2.shape:
        raise ValueError(f"mean shapes differ: {tuple(m1.shape)} vs {tuple(m2.shape)}")
    mean_term = ((m1 - m2) ** 2).sum()
    if c1.ndim == 1 and c2.ndim == 1:
        if bool((c1 < 0).any()) or bool((c2 < 0).any()):
            raise ValueError("variances must be nonnegative")
        cov_term = ((c1.sqrt() - c2.sqrt()) ** 2).sum()
    elif c1.ndim == 2 and c2.ndim == 2:
        s1 = _sqrtm_psd(c1)
        cross = _sqrtm_psd(s1 @ c2 @ s1)
        cov_term = torch.trace(c1) + torch.trace(c2) - 2 * torch.trace(cross)
    else:
        raise ValueError("covariances must both be [d, d] or both be diagonals [d]")
    return float((mean_term + cov_term).clamp(min=0).sqrt())


def component_tv(samples: Tensor, mixture: object) -> float:
    """``0.5 sum_k |w_k - mean_i r_k(x_i)|`` for a :class:`~hessdiff.samplers.oracles.gmm.GaussianMixture`."""
    x = _flat64(samples, "samples")
    r = mixture.responsibilities(x.to(mixture.means.device))  # type: ignore[attr-defined]
    return float(0.5 * (r.mean(0) - mixture.weights).abs().sum())  # type: ignore[attr-defined]


def posterior_mean_error(samples: Tensor, mean: Tensor) -> float:
    """``|mean(samples) - mean|_2``."""
    x = _flat64(samples, "samples")
    m = torch.as_tensor(mean, dtype=torch.float64).flatten()
    if m.numel() != x.shape[1]:
        raise ValueError(f"mean has {m.numel()} entries, samples have dimension {x.shape[1]}")
    return float((x.mean(0) - m).norm())
