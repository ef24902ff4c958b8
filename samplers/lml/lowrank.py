"""Low-rank symmetric operators for second-order diffusion sampling.

Everything here is batched over samples: a batch of ``B`` flattened vectors ``[B, d]`` and, per
sample, one symmetric ``d x d`` operator that is never formed. The central object is
:class:`LowRankSym`, the *low-rank-plus-identity* eigen-form

    S = U diag(s) U^T + s0 (I - U U^T)          U: [B, d, k] orthonormal columns, s: [B, k], s0: [B]

(``s0 = 0`` is a plain rank-``k`` matrix). In this form every spectral function is exact and costs
``O(d k)`` per sample: ``f(S) v = U diag(f(s)) U^T v + f(s0) (v - U U^T v)`` -- inverse, square root,
inverse square root, damped inverses ``(S + lam I)^{-1}``. Zero columns of ``U`` are allowed (they
stand for unused rank).

Builders:

* :func:`lowrank_eig` -- the eigen-form of ``V V^T`` for any ``V`` ``[B, d, k]`` (thin QR, then a
  ``k x k`` eigen-decomposition).
* :func:`nystrom` -- a PSD operator ``A`` from probes ``Omega`` and responses ``Y = A Omega``
  (``A ~ Y (Omega^T Y)^+ Y^T``, the Nystrom approximation; robust to indefinite ``Omega^T Y`` by
  keeping its positive part). With random probes this is the randomised single-pass Nystrom
  method; with secant pairs (steps ``Omega``, response differences ``Y``) it is the symmetric
  rank-``k`` quasi-Newton matrix that satisfies the secant conditions.
* :func:`lanczos` -- ``k`` steps of Lanczos with full reorthogonalisation from a start vector; the
  Ritz pairs give a rank-``k`` eigen-form whose spectral functions applied to the start vector are
  the Lanczos (Krylov) approximation of ``f(A) v``.

Also :func:`woodbury_solve` (``(c I + V V^T)^{-1} b`` for a general, non-orthonormal ``V``) and
:func:`sherman_morrison_solve` (the rank-one case used by the published LML correction).

Conventions: vectors are ``[B, d]``; a single operator for the whole batch is not special-cased
(broadcast ``U`` yourself). Arithmetic runs in the dtype of the inputs; callers choose float64 where
cancellation matters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "LowRankSym",
    "lowrank_eig",
    "nystrom",
    "lanczos",
    "random_probes",
    "woodbury_solve",
    "sherman_morrison_solve",
    "flat",
]


def flat(v: Tensor) -> Tensor:
    """``[B, ...] -> [B, d]`` (a view when possible)."""
    if v.ndim < 1:
        raise ValueError("expected a batch of vectors [B, ...], got a scalar")
    return v.reshape(v.shape[0], -1)


def _check_vec(v: Tensor, B: int, d: int, name: str = "v") -> Tensor:
    f = flat(v)
    if f.shape != (B, d):
        raise ValueError(f"{name} must be [B={B}, d={d}] (or reshape to it), got {tuple(v.shape)}")
    return f


@dataclass
class LowRankSym:
    """``S = U diag(s) U^T + s0 (I - U U^T)`` per sample (see the module docstring).

    Attributes:
        U: ``[B, d, k]`` with orthonormal (or zero) columns.
        s: ``[B, k]`` eigenvalues on the columns of ``U``.
        s0: ``[B]`` the eigenvalue on the orthogonal complement of ``span(U)``.
    """

    U: Tensor
    s: Tensor
    s0: Tensor

    def __post_init__(self) -> None:
        if self.U.ndim != 3:
            raise ValueError(f"U must be [B, d, k], got shape {tuple(self.U.shape)}")
        B, _, k = self.U.shape
        if self.s.shape != (B, k):
            raise ValueError(f"s must be [B={B}, k={k}], got {tuple(self.s.shape)}")
        s0 = torch.as_tensor(self.s0, dtype=self.s.dtype, device=self.s.device)
        self.s0 = s0.expand(B).clone() if s0.ndim == 0 or s0.numel() == 1 else s0.reshape(B)

    # -- shape -------------------------------------------------------------------------------------
    @property
    def batch(self) -> int:
        return self.U.shape[0]

    @property
    def dim(self) -> int:
        return self.U.shape[1]

    @property
    def rank(self) -> int:
        return self.U.shape[2]

    @property
    def dtype(self) -> torch.dtype:
        return self.U.dtype

    @classmethod
    def scalar(cls, s0: Tensor | float, B: int, d: int, *, dtype: torch.dtype = torch.float64,
               device: torch.device | str | None = None) -> LowRankSym:
        """``s0 I`` (rank-0 eigen-form)."""
        U = torch.zeros(B, d, 0, dtype=dtype, device=device)
        return cls(U, torch.zeros(B, 0, dtype=dtype, device=device),
                   torch.as_tensor(s0, dtype=dtype, device=device))

    # -- algebra -----------------------------------------------------------------------------------
    def map(self, fn: Callable[[Tensor], Tensor]) -> LowRankSym:
        """``f(S)`` for an elementwise eigenvalue map ``fn`` (same eigenvectors)."""
        return LowRankSym(self.U, fn(self.s), fn(self.s0))

    def apply(self, v: Tensor, fn: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """``f(S) v`` (``S v`` when ``fn`` is None) for ``v`` ``[B, ...]``; returns ``v``'s shape."""
        vf = _check_vec(v, self.batch, self.dim).to(self.dtype)
        s, s0 = (self.s, self.s0) if fn is None else (fn(self.s), fn(self.s0))
        if self.rank == 0:
            return (s0[:, None] * vf).reshape(v.shape)
        c = torch.einsum("bdk,bd->bk", self.U, vf)  # U^T v
        uc = torch.einsum("bdk,bk->bd", self.U, c)  # U U^T v
        out = torch.einsum("bdk,bk->bd", self.U, s * c) + s0[:, None] * (vf - uc)
        return out.reshape(v.shape)

    def matvec(self, v: Tensor) -> Tensor:
        return self.apply(v)

    def solve(self, v: Tensor, damping: float | Tensor = 0.0) -> Tensor:
        """``(S + damping I)^{-1} v``; raises if an eigenvalue of ``S + damping I`` is not positive.

        Positivity (not just invertibility) is required because every use here is a metric or a
        preconditioner; clamp the spectrum first (``S.map(lambda e: e.clamp(min=...))``) for indefinite ``S``.
        """
        lam = torch.as_tensor(damping, dtype=self.dtype, device=self.U.device)
        lam_b = lam if lam.ndim == 0 else lam.reshape(-1)
        shifted_s = self.s + (lam_b[:, None] if lam_b.ndim else lam_b)
        shifted_0 = self.s0 + lam_b
        if bool((shifted_0 <= 0).any()) or bool((shifted_s <= 0).any()):
            raise ValueError("LowRankSym.solve: S + damping I is not positive definite; increase the damping or "
                             "clamp the spectrum")
        return LowRankSym(self.U, shifted_s, shifted_0).apply(v, torch.reciprocal)

    def sqrt_apply(self, v: Tensor) -> Tensor:
        """``S^{1/2} v`` (principal square root; the spectrum must be nonnegative)."""
        self._check_psd("sqrt_apply")
        return self.apply(v, torch.sqrt)

    def inv_sqrt_apply(self, v: Tensor) -> Tensor:
        """``S^{-1/2} v`` (the spectrum must be positive)."""
        if bool((self.s0 <= 0).any()) or (self.rank and bool((self.s <= 0).any())):
            raise ValueError("LowRankSym.inv_sqrt_apply: the spectrum must be positive")
        return self.apply(v, torch.rsqrt)

    def _check_psd(self, what: str) -> None:
        if bool((self.s0 < 0).any()) or (self.rank and bool((self.s < 0).any())):
            raise ValueError(f"LowRankSym.{what}: negative eigenvalue; clamp the spectrum first")

    def dense(self) -> Tensor:
        """The full ``[B, d, d]`` matrix (tests and small ``d`` only)."""
        eye = torch.eye(self.dim, dtype=self.dtype, device=self.U.device)
        P = self.U @ self.U.transpose(1, 2)
        return (self.U * self.s[:, None, :]) @ self.U.transpose(1, 2) + self.s0[:, None, None] * (eye - P)

    def to(self, dtype: torch.dtype) -> LowRankSym:
        return LowRankSym(self.U.to(dtype), self.s.to(dtype), self.s0.to(dtype))


def lowrank_eig(V: Tensor, s0: Tensor | float = 0.0, *, rtol: float = 1e-12) -> LowRankSym:
    """The eigen-form of ``V V^T + s0 (I - P)`` where ``P`` projects on ``span(V)``.

    ``V`` is ``[B, d, k]`` (any columns, linearly dependent or zero allowed). Cost ``O(d k^2)``:
    thin QR ``V = Q R``, then ``R R^T = W diag(e) W^T``, ``U = Q W``. Directions with
    ``e <= rtol * max(e)`` are returned as zero columns of ``U`` (so they fall into the complement).
    """
    if V.ndim != 3:
        raise ValueError(f"V must be [B, d, k], got shape {tuple(V.shape)}")
    B, d, k = V.shape
    if k == 0:
        return LowRankSym.scalar(s0, B, d, dtype=V.dtype, device=V.device)
    if k > d:
        raise ValueError(f"rank {k} exceeds the dimension {d}")
    Q, R = torch.linalg.qr(V, mode="reduced")
    e, W = torch.linalg.eigh(R @ R.transpose(1, 2))
    e = e.flip(-1)
    W = W.flip(-1)
    keep = e > rtol * e.amax(-1, keepdim=True).clamp(min=torch.finfo(V.dtype).tiny)
    U = (Q @ W) * keep[:, None, :]
    return LowRankSym(U, torch.where(keep, e, torch.zeros_like(e)), torch.as_tensor(s0, dtype=V.dtype))


def random_probes(B: int, d: int, k: int, *, generator: torch.Generator | None = None,
                  dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> Tensor:
    """``k`` orthonormal Gaussian probe vectors per sample, ``[B, d, k]`` (from ``generator``)."""
    if k < 1 or k > d:
        raise ValueError(f"need 1 <= k <= d, got k={k}, d={d}")
    gen_device = generator.device if generator is not None else device
    G = torch.randn(B, d, k, generator=generator, dtype=dtype, device=gen_device)
    if device is not None:
        G = G.to(device)
    Q, _ = torch.linalg.qr(G, mode="reduced")
    return Q


def nystrom(Omega: Tensor, Y: Tensor, *, s0: Tensor | float = 0.0, rtol: float = 1e-10) -> LowRankSym:
    """Rank-``k`` Nystrom approximation ``A ~ Y (Omega^T Y)^+ Y^T`` of a PSD operator.

    ``Omega`` ``[B, d, k]`` are probe directions (any, not necessarily orthonormal) and ``Y = A Omega``
    their images (JVPs, or secant differences). The core ``Omega^T Y`` is symmetrised and only its
    positive eigen-directions (``> rtol * max``) are kept, so an indefinite or noisy core (a learned
    denoiser is not exactly symmetric; secant pairs are not exactly consistent) degrades gracefully
    to a lower rank instead of failing. The result reproduces ``A`` on ``span(Omega)`` exactly when
    ``A`` is PSD and the core is positive definite. ``s0`` is the value assigned to the complement.
    """
    if Omega.shape != Y.shape or Omega.ndim != 3:
        raise ValueError(f"Omega and Y must both be [B, d, k]; got {tuple(Omega.shape)} and {tuple(Y.shape)}")
    B, d, k = Omega.shape
    if k == 0:
        return LowRankSym.scalar(s0, B, d, dtype=Y.dtype, device=Y.device)
    Q, R = torch.linalg.qr(Omega, mode="reduced")
    # express in orthonormal probes: Y_q = A Q = Y R^{-1}; columns with a tiny R diagonal are dropped
    diag = torch.diagonal(R, dim1=1, dim2=2).abs()
    ok = diag > 1e-12 * diag.amax(-1, keepdim=True).clamp(min=torch.finfo(R.dtype).tiny)
    Rs = R + torch.diag_embed((~ok).to(R.dtype))  # keep R invertible; dropped columns zeroed below
    Yq = torch.linalg.solve_triangular(Rs, Y, upper=True, left=False)  # Y R^{-1}
    Yq = Yq * ok[:, None, :]
    core = Q.transpose(1, 2) @ Yq
    core = 0.5 * (core + core.transpose(1, 2))
    lam, W = torch.linalg.eigh(core)
    keep = lam > rtol * lam.amax(-1, keepdim=True).clamp(min=torch.finfo(Y.dtype).tiny)
    inv_sqrt = torch.where(keep, lam.clamp(min=torch.finfo(Y.dtype).tiny).rsqrt(), torch.zeros_like(lam))
    F = Yq @ (W * inv_sqrt[:, None, :])  # A ~ F F^T
    return lowrank_eig(F, s0)


def lanczos(matvec: Callable[[Tensor], Tensor], v0: Tensor, k: int, *,
            generator: torch.Generator | None = None, s0: Tensor | float = 0.0,
            breakdown_tol: float = 1e-10, project: Callable[[Tensor], Tensor] | None = None) -> LowRankSym:
    """``k`` Lanczos steps on the symmetric operator ``matvec`` (``[B, d] -> [B, d]``) from ``v0``.

    Full reorthogonalisation (``k`` is small). Returns the Ritz eigen-form ``(Q W) diag(theta)
    (Q W)^T`` with the complement value ``s0``; for the start vector, ``f(result) v0`` is the Lanczos
    approximation ``|v0| Q f(T) e_1`` of ``f(A) v0`` (exact once the Krylov space is invariant). On a
    breakdown (the Krylov space of a sample became invariant before ``k`` steps) the iteration
    continues from a random vector orthogonal to the basis (from ``generator``) with a zero
    coupling, so the basis stays orthonormal and the start-vector approximation stays exact.
    ``matvec`` is called exactly ``k`` times. ``project`` (optional, ``[B, d] -> [B, d]``) maps the random
    restart vectors into the subspace the operator works on (e.g. the complement of a direction).
    """
    v0 = flat(v0)
    B, d = v0.shape
    if k < 1 or k > d:
        raise ValueError(f"need 1 <= k <= d for Lanczos, got k={k}, d={d}")
    dt = v0.dtype
    nrm = v0.norm(dim=1, keepdim=True)
    if bool((nrm == 0).any()):
        # a zero start vector: start from a random direction instead
        r = torch.randn(B, d, generator=generator, dtype=dt,
                        device=generator.device if generator is not None else v0.device).to(v0.device)
        v0 = torch.where(nrm == 0, r, v0)
        nrm = v0.norm(dim=1, keepdim=True)
    Q = torch.zeros(B, d, k, dtype=dt, device=v0.device)
    T = torch.zeros(B, k, k, dtype=dt, device=v0.device)
    q = v0 / nrm
    scale = torch.zeros(B, dtype=dt, device=v0.device)
    for j in range(k):
        Q[:, :, j] = q
        w = flat(matvec(q)).to(dt)
        alpha = (w * q).sum(1)
        T[:, j, j] = alpha
        # full reorthogonalisation against the whole basis (twice is enough), within the subspace
        for _ in range(2):
            if project is not None:
                w = project(w)
            w = w - torch.einsum("bdk,bk->bd", Q[:, :, : j + 1], torch.einsum("bdk,bd->bk", Q[:, :, : j + 1], w))
        if j + 1 == k:
            break
        beta = w.norm(dim=1)
        scale = torch.maximum(scale, alpha.abs()).maximum(beta)
        broke = beta <= breakdown_tol * scale.clamp(min=torch.finfo(dt).tiny)
        if bool(broke.any()):
            r = torch.randn(B, d, generator=generator, dtype=dt,
                            device=generator.device if generator is not None else v0.device).to(v0.device)
            for _ in range(2):
                if project is not None:
                    r = project(r)
                r = r - torch.einsum("bdk,bk->bd", Q[:, :, : j + 1], torch.einsum("bdk,bd->bk", Q[:, :, : j + 1], r))
            w = torch.where(broke[:, None], r, w)
            beta_eff = torch.where(broke, torch.zeros_like(beta), beta)
        else:
            beta_eff = beta
        T[:, j, j + 1] = beta_eff
        T[:, j + 1, j] = beta_eff
        q = w / w.norm(dim=1, keepdim=True).clamp(min=torch.finfo(dt).tiny)
    theta, W = torch.linalg.eigh(T)
    return LowRankSym(Q @ W, theta, torch.as_tensor(s0, dtype=dt))


def woodbury_solve(c: Tensor | float, V: Tensor, b: Tensor) -> Tensor:
    """``(c I + V V^T)^{-1} b`` per sample by the Woodbury identity, ``O(d k^2)``.

    ``(cI + VV^T)^{-1} = (1/c) (I - V (c I_k + V^T V)^{-1} V^T)``; ``c > 0`` (scalar or ``[B]``),
    ``V`` ``[B, d, k]`` arbitrary, ``b`` ``[B, ...]``.
    """
    if V.ndim != 3:
        raise ValueError(f"V must be [B, d, k], got shape {tuple(V.shape)}")
    B, d, k = V.shape
    bf = _check_vec(b, B, d, "b").to(V.dtype)
    c = torch.as_tensor(c, dtype=V.dtype, device=V.device)
    c = c.expand(B) if c.ndim == 0 else c.reshape(B)
    if bool((c <= 0).any()):
        raise ValueError("woodbury_solve needs c > 0")
    eye = torch.eye(k, dtype=V.dtype, device=V.device)
    core = c[:, None, None] * eye + V.transpose(1, 2) @ V
    L = torch.linalg.cholesky(core)
    rhs = torch.einsum("bdk,bd->bk", V, bf)[..., None]
    sol = torch.cholesky_solve(rhs, L)[..., 0]
    out = (bf - torch.einsum("bdk,bk->bd", V, sol)) / c[:, None]
    return out.reshape(b.shape)


def sherman_morrison_solve(lam: float | Tensor, u: Tensor, g: Tensor) -> Tensor:
    """``lam (lam I + u u^T)^{-1} g = g - u <u, g> / (lam + |u|^2)`` per sample (the rank-one case)."""
    uf, gf = flat(u), flat(g)
    if uf.shape != gf.shape:
        raise ValueError(f"u and g must have the same shape, got {tuple(u.shape)} and {tuple(g.shape)}")
    ip = (gf * uf).sum(1, keepdim=True)
    return (gf - uf * ip / (lam + (uf * uf).sum(1, keepdim=True))).reshape(g.shape)
