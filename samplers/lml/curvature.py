"""Curvature of the diffusion prior from the denoiser: ``A = d x0_hat / d y = I - sigma^2 H``.

With ``y = x_t / alpha_t`` and ``rho = sigma_t / alpha_t``, ``A = alpha_t d x0_hat / d x_t`` (symmetric,
``Cov[x0 | x_t] / rho^2``) carries the Hessian ``H_t = -grad^2 log p_t``. Its low-rank-plus-identity
approximations (:class:`~hessdiff.samplers.lml.lowrank.LowRankSym`) come from ``k`` Jacobian-vector
products (:func:`jvp_curvature`: Lanczos from a direction, or randomised Nystrom) or, at zero extra
evaluations, from the states a solver visits (:class:`SecantCurvature`). The curvature *sources*
(:class:`JVPSource`, :class:`SecantSource`) are the small objects a Hessian step asks for an estimate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..autodiff import forward_jvp, math_attention
from .lowrank import LowRankSym, flat, lanczos, nystrom, random_probes

__all__ = [
    "denoiser_jvp", "jvp_curvature", "exact_curvature", "hessian_from_curvature", "SecantCurvature",
    "transport", "secant_to_level", "floor_value", "JVPSource", "SecantSource", "DataCovarianceSource",
    "GatedSource", "StatsSource", "estimate_model_stats",
]

def denoiser_jvp(denoiser: Any, x: Tensor, t: Tensor | float, v: Tensor) -> Tensor:
    """``(d x0_hat / d x_t) v`` for any denoiser (same shape as ``x``).

    Uses the denoiser's own ``jvp_x0(x, t, v)`` when it has one (the exact Gaussian-mixture
    oracle), otherwise forward-mode autodiff (``torch.func.jvp``) through ``denoiser(x, t).x0``,
    falling back to the double-backward trick (``J v = d/du <J^T u, v>``) for models whose operators
    lack forward-mode rules. One call costs about one network evaluation (forward mode) or three
    (double backward). The result is in ``x``'s compute dtype.
    """
    if v.shape != x.shape:
        raise ValueError(f"v must have x's shape {tuple(x.shape)}, got {tuple(v.shape)}")
    oracle = getattr(denoiser, "jvp_x0", None)
    if callable(oracle):
        return oracle(x, t, v.to(x.dtype))
    v = v.to(x.dtype)

    def f(z: Tensor) -> Tensor:
        return denoiser(z, t).x0

    try:
        with torch.enable_grad():
            return forward_jvp(f, x.detach(), v).detach()
    except (RuntimeError, NotImplementedError, TypeError):
        pass
    # fused attention kernels have no double-backward rule either: the math backend again
    with math_attention(), torch.enable_grad():
        xr = x.detach().requires_grad_(True)
        out = f(xr)
        u = torch.zeros_like(out, requires_grad=True)
        (jtu,) = torch.autograd.grad(out, xr, grad_outputs=u, create_graph=True)
        (jv,) = torch.autograd.grad(jtu, u, grad_outputs=v.to(jtu.dtype))
    return jv.detach().to(x.dtype)


def floor_value(A: LowRankSym, floor: str | float) -> Tensor:
    if isinstance(floor, int | float) and not isinstance(floor, bool):
        return torch.full_like(A.s0, float(floor))
    if floor == "zero":
        return torch.zeros_like(A.s0)
    if floor == "min":
        if A.rank == 0:
            return torch.zeros_like(A.s0)
        used = A.U.norm(dim=1) > 0.5
        big = torch.full_like(A.s, float("inf"))
        m = torch.where(used, A.s, big).amin(1)
        return torch.where(torch.isfinite(m), m, torch.zeros_like(m)).clamp(min=0.0)
    raise ValueError(f"unknown floor {floor!r}; expected 'zero', 'min' or a number")


def jvp_curvature(
    denoiser: Any,
    x: Tensor,
    t: Tensor | float,
    alpha: float,
    k: int,
    *,
    method: str = "lanczos",
    start: Tensor | None = None,
    generator: torch.Generator | None = None,
    floor: str | float = "zero",
    dtype: torch.dtype = torch.float64,
    project: Tensor | None = None,
) -> LowRankSym:
    """A rank-``k`` eigen-form of ``A = alpha d x0_hat/d x_t`` at ``(x, t)`` from ``k`` JVPs.

    method: ``"lanczos"`` (Krylov space of ``start``; best for ``f(A) start``) or ``"nystrom"``
      (``k`` random orthonormal probes from ``generator``; a global approximation).
    floor: the eigenvalue given to the orthogonal complement: ``"zero"`` (data near a
      ``k``-dimensional set, ``H = I / sigma^2`` off it), ``"min"`` (the smallest estimated
      eigenvalue, for a low-rank-plus-identity ``A``) or a number.
    project: unit vectors ``[B, d]`` (one per sample) to leave out: the estimate is then of
      ``P A P`` with ``P = I - n n^T`` (start and probes projected, every product projected), so its
      eigenvectors are orthogonal to ``n``.
    """
    B = x.shape[0]
    d = flat(x).shape[1]
    if not 1 <= k <= d:
        raise ValueError(f"rank k must be in [1, {d}], got {k}")
    n = None if project is None else flat(project).to(dtype)

    def proj(v: Tensor) -> Tensor:
        return v if n is None else v - n * (n * v).sum(1, keepdim=True)

    def matvec(v: Tensor) -> Tensor:
        jv = denoiser_jvp(denoiser, x, t, proj(v).reshape(x.shape).to(x.dtype))
        return proj(alpha * flat(jv).to(dtype))

    if method == "lanczos":
        v0 = flat(start).to(dtype) if start is not None else \
            torch.randn(B, d, generator=generator, dtype=dtype,
                        device=generator.device if generator is not None else x.device).to(x.device)
        A = lanczos(matvec, proj(v0), k, generator=generator, project=proj)
    elif method == "nystrom":
        Om = random_probes(B, d, k, generator=generator, dtype=dtype, device=x.device)
        if n is not None:  # probes in the complement of n, re-orthonormalised
            Om = torch.linalg.qr(Om - n[:, :, None] * (n[:, :, None] * Om).sum(1, keepdim=True))[0]
        Y = torch.stack([matvec(Om[:, :, j]) for j in range(k)], dim=2)
        A = nystrom(Om, Y)
    else:
        raise ValueError(f"unknown method {method!r}; expected 'lanczos' or 'nystrom'")
    return LowRankSym(A.U, A.s, floor_value(A, floor))


def exact_curvature(denoiser: Any, x: Tensor, t: Tensor | float) -> Tensor:
    """The exact ``A = I + sigma^2 grad^2 log p_t`` ``[B, d, d]`` from an oracle with ``hessian``."""
    hess = getattr(denoiser, "hessian", None)
    if not callable(hess):
        raise TypeError(f"{type(denoiser).__name__} has no exact hessian(x, t); use GMMDenoiser")
    Hl = hess(x, t)
    tt = torch.as_tensor(t, dtype=torch.float64)
    _, s = denoiser.schedule.alpha_sigma(tt.reshape(-1)[:1])
    eye = torch.eye(Hl.shape[-1], dtype=Hl.dtype, device=Hl.device)
    return eye + float(s) ** 2 * Hl


def hessian_from_curvature(A: LowRankSym, sigma: float) -> LowRankSym:
    """``H = (I - A) / sigma^2`` in the same eigen-form."""
    if sigma <= 0:
        raise ValueError("the Hessian of log p_t needs sigma > 0")
    return A.map(lambda a: (1.0 - a) / sigma**2)


class SecantCurvature:
    """Zero-NFE secant estimate of ``A`` from the states a solver visits.

    Derivation (``y = x / alpha``, ``rho = sigma / alpha``, ``y = x0 + rho eps``): differentiating
    Tweedie's ``x0_hat(y, rho) = E[x0 | y]`` in ``rho`` at fixed ``y`` gives
    ``d_rho x0_hat = 2 A (x0_hat - y) / rho + T / rho^3`` with ``T = E[(x0 - x0_hat) |x0 - x0_hat|^2 | y]``
    (zero for a Gaussian posterior). Along the probability-flow ODE ``dy/drho = eps_hat =
    (y - x0_hat) / rho``, so ``d x0_hat / drho = A eps_hat - 2 A eps_hat + T/rho^3 = -A dy/drho + T/rho^3``:
    **along the trajectory** ``d x0_hat = -A dy`` (not ``+A dy``: the explicit noise-level dependence
    flips the sign). Consecutive states therefore give secant pairs ``(dy, -d x0_hat)``.

    For a Gaussian direction of data variance ``c`` the exact secant ratio between noise levels
    ``rho_1, rho_2`` is ``m = c / sqrt((c + rho_1^2)(c + rho_2^2))``; each estimated eigenvalue ``m``
    is converted to ``c`` and transported to the current level, ``a = c / (c + rho^2)``.
    The estimate is the rank-``k`` Nystrom/quasi-Newton matrix of the last ``k`` pairs; used inside a
    solver, the current state is pushed first, so the newest pair ends at the current state (this
    measured clearly better than using only pairs of earlier states).
    """

    def __init__(self, rank: int = 1, floor: str | float = "min") -> None:
        if rank < 1:
            raise ValueError(f"secant rank must be >= 1, got {rank}")
        self.rank = int(rank)
        self.floor = floor
        self.reset()

    def reset(self) -> None:
        self.states: list[tuple[Tensor, Tensor, float]] = []

    def push(self, y: Tensor, x0: Tensor, rho: float) -> None:
        """Record a visited state (``y``, ``x0_hat`` flattened float64 ``[B, d]``, ``rho``)."""
        if self.states and self.states[-1][0].shape != y.shape:
            self.reset()
        self.states.append((y, x0, float(rho)))
        self.states = self.states[-(self.rank + 1):]

    @property
    def ready(self) -> bool:
        return len(self.states) >= 2

    def estimate(self, rho_now: float) -> LowRankSym | None:
        """The transported estimate of ``A`` at noise level ``rho_now`` (``None`` before 2 states)."""
        if not self.ready:
            return None
        S = torch.stack([self.states[j + 1][0] - self.states[j][0] for j in range(len(self.states) - 1)], 2)
        Y = torch.stack([-(self.states[j + 1][1] - self.states[j][1]) for j in range(len(self.states) - 1)], 2)
        Am = nystrom(S, Y)
        r1, r2 = self.states[-2][2], self.states[-1][2]
        m = Am.s.clamp(0.0, 1.0 - 1e-9)
        a = secant_to_level(m, r1, r2, rho_now)
        A = LowRankSym(Am.U, a, torch.zeros_like(Am.s0))
        return LowRankSym(A.U, A.s, floor_value(A, self.floor))


def transport(A: LowRankSym, rho_from: float, rho_to: float) -> LowRankSym:
    """Move an estimate of ``A`` between noise levels as a Gaussian would: each eigenvalue ``a`` is a
    data variance ``c = rho^2 a / (1 - a)`` seen at ``rho``; at ``rho_to`` it reads ``c / (c + rho_to^2)``."""
    def mv(a: Tensor) -> Tensor:
        a = a.clamp(0.0, 1.0 - 1e-12)
        c = rho_from**2 * a / (1 - a)
        return c / (c + rho_to**2)
    return A.map(mv)


def secant_to_level(m: Tensor, r1: float, r2: float, rho: float) -> Tensor:
    """Solve ``m = c / sqrt((c + r1^2)(c + r2^2))`` for ``c >= 0`` and return ``c / (c + rho^2)``."""
    m2 = m * m
    p, q = r1 * r1 + r2 * r2, (r1 * r2) ** 2
    disc = (m2 * p) ** 2 + 4 * (1 - m2) * m2 * q
    c = (m2 * p + disc.clamp(min=0).sqrt()) / (2 * (1 - m2))
    return c / (c + rho * rho)


# ---------------------------------------------------------------------------------------- sources
class SecantSource:
    """Zero-NFE curvature: the secant estimate of the states the solver visits (:class:`SecantCurvature`).
    Needs one previous step, so the first step gets no estimate."""

    jvp_calls = 0

    def __init__(self, rank: int = 1, floor: str | float = "min") -> None:
        self.secant = SecantCurvature(rank, floor)

    def reset(self) -> None:
        self.secant.reset()

    def observe(self, y: Tensor, x0: Tensor, rho: float) -> None:
        self.secant.push(y, x0, rho)  # the newest pair joins the previous state and this one

    def estimate(self, ctx: Any, eps: Tensor, rho: float, project: Tensor | None) -> LowRankSym | None:
        return self.secant.estimate(rho)


class JVPSource:
    """``rank`` JVPs of the denoiser per estimate (:func:`jvp_curvature`, Lanczos started at the update
    direction or random Nystrom probes). ``refresh="first"`` (or every ``refresh`` steps) computes it
    once and transports it to later levels as a Gaussian would; ``hold`` limits for how many steps."""

    def __init__(self, rank: int = 2, *, method: str = "lanczos", floor: str | float = "min",
                 generator: torch.Generator | None = None, refresh: str | int = "every", hold: int | None = None,
                 dtype: torch.dtype = torch.float64) -> None:
        if not (refresh in ("every", "first") or (isinstance(refresh, int) and refresh >= 1)):
            raise ValueError(f"refresh must be 'every', 'first' or a positive integer, got {refresh!r}")
        if hold is not None and (not isinstance(hold, int) or hold < 1):
            raise ValueError(f"hold must be None or a positive integer, got {hold!r}")
        self.rank, self.method, self.floor, self.generator = rank, method, floor, generator
        self.refresh, self.hold, self.dtype = refresh, hold, dtype
        self.jvp_calls = 0
        self.reset()

    def reset(self) -> None:
        self._held: tuple[LowRankSym, float] | None = None
        self._since = 0

    def observe(self, y: Tensor, x0: Tensor, rho: float) -> None:
        pass

    def estimate(self, ctx: Any, eps: Tensor, rho: float, project: Tensor | None) -> LowRankSym | None:
        fresh = self.refresh == "every" or self._held is None or \
            (isinstance(self.refresh, int) and self._since >= self.refresh)
        if not fresh:
            self._since += 1
            if self.hold is not None and self._since > self.hold:
                return None
            A0, rho0 = self._held
            return transport(A0, rho0, rho)
        self.jvp_calls += self.rank
        A = jvp_curvature(ctx.denoiser, ctx.x, ctx.t, ctx.alpha, self.rank, method=self.method, start=eps,
                          generator=self.generator, floor=self.floor, dtype=self.dtype, project=project)
        self._held, self._since = (A, rho), 1
        return A


def _compress(A: LowRankSym, project: Tensor | None) -> LowRankSym:
    """``A`` with its eigenvectors projected off the unit vectors ``project`` (the radial exclusion of a
    prior's curvature); ``A`` itself when ``project`` is None."""
    if project is None:
        return A
    n = project.to(A.U.dtype)
    U = A.U - n[:, :, None] * (n[:, :, None] * A.U).sum(1, keepdim=True)
    return LowRankSym(torch.linalg.qr(U)[0], A.s, A.s0)


def _save_tensors(path: str | Any, tensors: dict[str, Tensor], metadata: dict[str, Any], overwrite: bool) -> Any:
    """The tensors (contiguous) and string metadata to a safetensors file, atomically (no silent overwrite)."""
    from safetensors.torch import save_file

    from hessdiff.utils.files import atomic_write

    meta = {str(k): str(v) for k, v in metadata.items()}
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta or None), overwrite=overwrite)


def _load_tensors(path: str | Any, names: Sequence[str], what: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """``names`` from a safetensors file and its metadata; a file without them is not ``what``."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        missing = set(names) - set(f.keys())
        if missing:
            raise ValueError(f"{path}: not {what} (missing {sorted(missing)})")
        return {k: f.get_tensor(k) for k in names}, dict(f.metadata() or {})


class DataCovarianceSource:
    """Curvature of a Gaussian with the data's covariance (a model-free prior): with
    ``Sigma = V diag(c) V^T + c0 (I - V V^T)``, ``A = Sigma (Sigma + rho^2 I)^{-1}`` has eigenvalues
    ``c / (c + rho^2)`` and ``c0 / (c0 + rho^2)`` on the complement -- exact at every noise level when the
    data are Gaussian, and free (no network evaluation). Build it with :meth:`from_data`."""

    jvp_calls = 0

    def __init__(self, V: Tensor, c: Tensor, c0: float, metadata: dict[str, str] | None = None) -> None:
        if V.ndim != 2 or c.shape != (V.shape[1],):
            raise ValueError(f"V must be [d, k] and c [k], got {tuple(V.shape)} and {tuple(c.shape)}")
        if not (bool(torch.isfinite(c).all()) and bool((c >= 0).all()) and math.isfinite(c0) and c0 >= 0):
            raise ValueError("data variances c and c0 must be finite and nonnegative")
        self.V, self.c, self.c0 = V.to(torch.float64), c.to(torch.float64), float(c0)
        self.metadata: dict[str, str] = dict(metadata or {})

    @property
    def dim(self) -> int:
        return int(self.V.shape[0])

    def save(self, path: str | Any, overwrite: bool = False, metadata: dict[str, str] | None = None) -> Any:
        """Write ``V, c, c0`` (float64) and the metadata to a safetensors file (``lml_cov.safetensors`` next to
        a model is where the drop-ins' ``lml_variant="cov"`` looks), atomically; an existing file is refused
        unless ``overwrite``."""
        return _save_tensors(path, {"V": self.V, "c": self.c, "c0": torch.tensor([self.c0], dtype=torch.float64)},
                             {**self.metadata, **(metadata or {})}, overwrite)

    @classmethod
    def load(cls, path: str | Any) -> DataCovarianceSource:
        t, meta = _load_tensors(path, ("V", "c", "c0"), "an LML data-covariance file")
        return cls(t["V"], t["c"], float(t["c0"].reshape(-1)[0]), metadata=meta)

    def __repr__(self) -> str:
        return f"DataCovarianceSource(rank={int(self.c.numel())}, dim={self.dim}, c0={self.c0:.3g})"

    @classmethod
    def from_data(cls, x: Tensor, rank: int = 32) -> DataCovarianceSource:
        """The top-``rank`` principal directions of the data ``x`` ``[N, ...]`` and the mean variance of
        the rest."""
        X = flat(x).to(torch.float64)
        X = X - X.mean(0, keepdim=True)
        n, d = X.shape
        _, S, Vh = torch.linalg.svd(X, full_matrices=False)
        var = S**2 / max(n - 1, 1)
        k = min(rank, var.numel())
        rest = (var.sum() - var[:k].sum()) / max(d - k, 1)
        return cls(Vh[:k].T.contiguous(), var[:k], float(rest))

    def reset(self) -> None:
        pass

    def observe(self, y: Tensor, x0: Tensor, rho: float) -> None:
        pass

    def at(self, rho: float, batch: int) -> LowRankSym:
        r2 = rho * rho
        U = self.V.expand(batch, *self.V.shape)
        s = (self.c / (self.c + r2)).expand(batch, -1)
        s0 = torch.full((batch,), self.c0 / (self.c0 + r2), dtype=torch.float64, device=self.V.device)
        return LowRankSym(U, s, s0)

    def estimate(self, ctx: Any, eps: Tensor, rho: float, project: Tensor | None) -> LowRankSym | None:
        if eps.ndim >= 1 and flat(eps).shape[1] != self.dim:
            raise ValueError(f"this data covariance is for dimension {self.dim}, the sample has "
                             f"{flat(eps).shape[1]} (the covariance of another model's data?)")
        return _compress(self.at(rho, eps.shape[0]), project)


class GatedSource:
    """Model curvature where it can be trusted, a prior above a noise level: ``low`` (e.g. a
    :class:`JVPSource` or :class:`SecantSource` of the network) for ``rho = sigma / alpha < gate``, ``high``
    (e.g. :class:`DataCovarianceSource`) at ``rho >= gate``. Trained networks' Jacobians are wrong at high
    noise (Peng et al. 2024 use the model statistic only for sigma < 0.2; Free Hunch updates only for
    1 < sigma < 10); both sources see every state."""

    def __init__(self, low: Any, high: Any, gate: float = 1.0) -> None:
        if not gate > 0:
            raise ValueError(f"gate must be positive, got {gate}")
        self.low, self.high, self.gate = low, high, float(gate)

    @property
    def jvp_calls(self) -> int:
        return self.low.jvp_calls + self.high.jvp_calls

    def reset(self) -> None:
        self.low.reset()
        self.high.reset()

    def observe(self, y: Tensor, x0: Tensor, rho: float) -> None:
        self.low.observe(y, x0, rho)
        self.high.observe(y, x0, rho)

    def estimate(self, ctx: Any, eps: Tensor, rho: float, project: Tensor | None) -> LowRankSym | None:
        return (self.low if rho < self.gate else self.high).estimate(ctx, eps, rho, project)


class StatsSource:
    """Zero-NFE curvature from per-noise-level statistics of one model (DPM-Solver-v3's idea of empirical
    model statistics): at each stored level ``rho_k`` a low-rank-plus-identity estimate of the mean
    ``E[A(x_t)]`` over data (:func:`estimate_model_stats`); at sampling time the nearest level's estimate is
    transported to ``rho`` as a Gaussian would (:func:`transport`). Stats belong to a model: load them from
    ``lml_stats.safetensors`` next to it (:meth:`load`; ``python -m hessdiff.scripts.lml_stats MODEL`` writes
    it). ``metadata``: string key/values stored in the file's header (model fingerprint, how it was made)."""

    jvp_calls = 0

    def __init__(self, rhos: Tensor, U: Tensor, s: Tensor, s0: Tensor, metadata: dict[str, str] | None = None) -> None:
        if not (U.ndim == 3 and s.shape == U.shape[::2] and s0.shape == rhos.shape == U.shape[:1]):
            raise ValueError(f"stats shapes do not fit: rhos {tuple(rhos.shape)}, U {tuple(U.shape)}, "
                             f"s {tuple(s.shape)}, s0 {tuple(s0.shape)}")
        if not bool((rhos > 0).all()) or not bool(torch.isfinite(rhos).all()):
            raise ValueError("stats noise levels rhos must be positive and finite")
        self.rhos, self.U, self.s, self.s0 = (t.to(torch.float64) for t in (rhos, U, s, s0))
        self.metadata: dict[str, str] = dict(metadata or {})

    @property
    def rank(self) -> int:
        return int(self.U.shape[2])

    @property
    def dim(self) -> int:
        return int(self.U.shape[1])

    def reset(self) -> None:
        pass

    def observe(self, y: Tensor, x0: Tensor, rho: float) -> None:
        pass

    def estimate(self, ctx: Any, eps: Tensor, rho: float, project: Tensor | None) -> LowRankSym | None:
        if eps.ndim >= 1 and flat(eps).shape[1] != self.dim:
            raise ValueError(f"these model statistics are for dimension {self.dim}, the sample has "
                             f"{flat(eps).shape[1]} (stats of another model?)")
        k = int(torch.argmin((self.rhos.log() - math.log(rho)).abs()))
        B = eps.shape[0]
        dev = eps.device
        A = LowRankSym(self.U[k].to(dev).expand(B, -1, -1), self.s[k].to(dev).expand(B, -1),
                       self.s0[k].to(dev).expand(B))
        return _compress(transport(A, float(self.rhos[k]), rho), project)

    def save(self, path: str | Any, overwrite: bool = False, metadata: dict[str, str] | None = None) -> Any:
        """Write ``rhos, U, s, s0`` (float64) and the metadata (``self.metadata`` updated by ``metadata``)
        to a safetensors file, atomically; an existing file is refused unless ``overwrite``."""
        return _save_tensors(path, {"rhos": self.rhos, "U": self.U, "s": self.s, "s0": self.s0},
                             {**self.metadata, **(metadata or {})}, overwrite)

    @classmethod
    def load(cls, path: str | Any) -> StatsSource:
        t, meta = _load_tensors(path, ("rhos", "U", "s", "s0"), "an LML statistics file")
        return cls(t["rhos"], t["U"], t["s"], t["s0"], metadata=meta)

    def __repr__(self) -> str:
        return (f"StatsSource(levels={self.rhos.numel()}, rank={self.rank}, dim={self.dim}, "
                f"rho={float(self.rhos.min()):.3g}..{float(self.rhos.max()):.3g})")


def estimate_model_stats(denoiser: Any, data: Tensor, rhos: Sequence[float], rank: int = 8, *, oversample: int = 4,
                         iterations: int = 1, generator: torch.Generator | None = None,
                         batch_size: int | None = None, fd_step: float | None = None,
                         on_level: Any = None) -> StatsSource:
    """Per-level statistics for :class:`StatsSource`: at each ``rho`` in ``rhos``, ``x_t = alpha x0 +
    sigma eps`` for the data batch, and randomised subspace iteration on the data-averaged
    ``E[A(x_t)] = E[alpha d x0_hat / d x_t]`` with ``rank + oversample`` probes (``(iterations + 1) x
    (rank + oversample)`` batched JVPs per level); ``s0`` is the mean remaining eigenvalue from a
    Hutchinson trace of the same average (4 more JVPs).

    batch_size: images per network call (default: all at once); the result does not depend on it.
    fd_step: ``None`` (default): JVPs (:func:`denoiser_jvp`: an oracle's closed form, else forward-mode
      autodiff, about 3-4 network evaluations each); a number ``h``: central differences
      ``(x0_hat(x + h sigma v) - x0_hat(x - h sigma v)) / (2 h sigma)`` along unit probes ``v`` (2 network
      evaluations, no autodiff; truncation error ``O(h^2)``, float32 rounding ``~1e-7 / h``).
    on_level: called as ``on_level(k, rho, seconds)`` after each level (progress).
    """
    import time

    if rank < 1 or oversample < 0 or iterations < 0:
        raise ValueError(f"need rank >= 1, oversample >= 0, iterations >= 0; got {rank}, {oversample}, {iterations}")
    if fd_step is not None and not fd_step > 0:
        raise ValueError(f"fd_step must be positive, got {fd_step}")
    sched = denoiser.schedule
    X = data.to(torch.float64)
    n = X.shape[0]
    d = flat(X).shape[1]
    if rank > d:
        raise ValueError(f"rank {rank} exceeds the data dimension {d}")
    m = min(rank + oversample, d)
    bs = n if batch_size is None else max(1, int(batch_size))
    gen_dev = generator.device if generator is not None else torch.device("cpu")
    Us, ss, s0s = [], [], []
    for k, rho in enumerate(rhos):
        t0 = time.perf_counter()
        t = sched.t_from_lambda(torch.tensor(-math.log(rho), dtype=torch.float64))
        a, s = (float(v) for v in sched.alpha_sigma(t.reshape(1)))
        eps = torch.randn(X.shape, generator=generator, dtype=torch.float64, device=gen_dev).to(X.device)
        xt = (a * X + s * eps).to(data.dtype)

        def col(v: Tensor, xt: Tensor = xt, t: Tensor = t, a: float = a, s: float = s) -> Tensor:  # [d] -> [d]
            total = torch.zeros(d, dtype=torch.float64, device=xt.device)
            for xb in xt.split(bs):
                vb = v.reshape(1, *data.shape[1:]).expand_as(xb).to(xb.dtype)
                if fd_step is None:
                    jv = flat(denoiser_jvp(denoiser, xb, t, vb)).to(torch.float64)
                else:
                    h = float(fd_step) * s
                    with torch.no_grad():
                        hi = flat(denoiser(xb + h * vb, t).x0).to(torch.float64)
                        lo = flat(denoiser(xb - h * vb, t).x0).to(torch.float64)
                    jv = (hi - lo) / (2 * h)
                total += a * jv.sum(0)
            return total / n

        def mean_A(V: Tensor) -> Tensor:  # [d, m] -> [d, m]
            if fd_step is None:
                return torch.stack([col(V[:, j]) for j in range(V.shape[1])], 1)
            norms = V.norm(dim=0).clamp(min=1e-300)  # differences along unit vectors, rescaled
            return torch.stack([col(V[:, j] / norms[j]) * norms[j] for j in range(V.shape[1])], 1)

        G = torch.randn(d, m, generator=generator, dtype=torch.float64, device=gen_dev).to(X.device)
        Q = torch.linalg.qr(G)[0]
        for _ in range(iterations):
            Q = torch.linalg.qr(mean_A(Q))[0]
        AQ = mean_A(Q)
        Tm = Q.T @ AQ
        w, Z = torch.linalg.eigh(0.5 * (Tm + Tm.T))
        idx = torch.argsort(w, descending=True)[:rank]
        U, sv = Q @ Z[:, idx], w[idx].clamp(0.0, 1.0)
        probe = torch.randn(d, 4, generator=generator, dtype=torch.float64, device=gen_dev).to(X.device)
        trace = float((probe * mean_A(probe)).sum(0).mean())
        s0 = min(max((trace - float(sv.sum())) / max(d - rank, 1), 0.0), 1.0)
        Us.append(U)
        ss.append(sv)
        s0s.append(s0)
        if on_level is not None:
            on_level(k, float(rho), time.perf_counter() - t0)
    return StatsSource(torch.tensor(list(rhos), dtype=torch.float64), torch.stack(Us), torch.stack(ss),
                       torch.tensor(s0s, dtype=torch.float64))
