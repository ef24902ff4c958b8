"""A few Krylov iterations for batched linear systems ``M u = b`` (one system per sample).

``matvec`` maps ``[B, m]`` float64 to ``[B, m]`` float64; every inner product and the small least-squares
problem run in float64 whatever the network's dtype. No convergence test: a fixed number of
iterations, as MMPS uses them (1--5 iterations are an implicit damping of a trained Jacobian); :func:`cg`
takes an optional per-sample tolerance (DiffPIR's data step uses it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["cg", "gmres", "KRYLOV_SOLVERS"]

MatVec = Callable[[Tensor], Tensor]
_TINY = 1e-300


def cg(matvec: MatVec, b: Tensor, iterations: int, tol: float | None = None) -> Tensor:
    """Conjugate gradients from ``u = 0`` (``M`` symmetric positive definite).

    ``tol`` (optional; default: none, a fixed number of iterations): a sample stops once its residual
    ``|b - M u| <= tol |b|`` (all stop early once every sample has); this keeps iterations past
    convergence from resolving the rounding noise of a low-precision ``matvec`` in directions of tiny
    eigenvalues, where it is amplified by their inverse.

    A sample whose search direction meets non-positive (or non-finite) curvature ``p^T M p`` stops there
    and keeps its last iterate, as truncated CG does: with a trained network ``M = Sigma_y + c A J A^T``
    need not be positive definite, and a step along such a direction would be unbounded.
    """
    u = torch.zeros_like(b)
    r, p = b.clone(), b.clone()
    rs = (r * r).sum(1)
    stop = None if tol is None else tol * tol * rs
    active = torch.ones_like(rs, dtype=torch.bool)
    for _ in range(iterations):
        if stop is not None:
            active = active & (rs > stop)
        if not bool(active.any()):
            break
        Mp = matvec(p)
        curv = (p * Mp).sum(1)
        active = active & (curv > 0) & torch.isfinite(curv)
        step = torch.where(active, rs / curv.clamp(min=_TINY), torch.zeros_like(rs))
        u = u + step[:, None] * p
        r = torch.where(active[:, None], r - step[:, None] * Mp, r)
        rs_new = (r * r).sum(1)
        p = torch.where(active[:, None], r + (rs_new / rs.clamp(min=_TINY))[:, None] * p, p)
        rs = rs_new
    return u


def gmres(matvec: MatVec, b: Tensor, iterations: int) -> Tensor:
    """GMRES from ``u = 0`` without restart (``M`` need not be symmetric): Arnoldi with modified
    Gram--Schmidt, then the ``(k + 1) x k`` least-squares problem per sample."""
    B, k = b.shape[0], iterations
    beta = b.norm(dim=1)
    V = [b / beta.clamp(min=_TINY)[:, None]]
    H = torch.zeros(B, k + 1, k, dtype=b.dtype, device=b.device)
    for j in range(k):
        w = matvec(V[j])
        for i in range(j + 1):
            H[:, i, j] = (w * V[i]).sum(1)
            w = w - H[:, i, j, None] * V[i]
        H[:, j + 1, j] = w.norm(dim=1)
        V.append(w / H[:, j + 1, j].clamp(min=_TINY)[:, None])
    e1 = torch.zeros(B, k + 1, 1, dtype=b.dtype, device=b.device)
    e1[:, 0, 0] = beta
    # a diverged sample (non-finite Arnoldi entries) stays non-finite instead of failing LAPACK for the batch
    bad = ~(torch.isfinite(H).flatten(1).all(1) & torch.isfinite(beta))
    any_bad = bool(bad.any())
    if any_bad:
        H, e1 = torch.where(bad[:, None, None], 0.0, H), torch.where(bad[:, None, None], 0.0, e1)
    coef = torch.linalg.lstsq(H, e1).solution[:, :, 0]  # [B, k]
    if any_bad:
        coef = torch.where(bad[:, None], float("nan"), coef)
    return sum(coef[:, j, None] * V[j] for j in range(k))


#: name -> solver
KRYLOV_SOLVERS: dict[str, Callable[[MatVec, Tensor, int], Tensor]] = {"cg": cg, "gmres": gmres}
