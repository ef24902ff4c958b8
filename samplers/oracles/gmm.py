"""Exact Gaussian-mixture oracles.

For a prior ``p0 = sum_k w_k N(mu_k, Sigma_k)`` and ``x_t = alpha_t x0 + sigma_t eps``, the
marginal ``p_t`` is the mixture of ``N(alpha_t mu_k, alpha_t^2 Sigma_k + sigma_t^2 I)``, so its
score, Tweedie's ``x0`` estimate, the denoiser Jacobian and the Hessian of ``log p_t`` are closed
form. For ``y = A x0 + n``, ``n ~ N(0, sigma_y^2 I)``, the posterior is again a Gaussian mixture.
With a linear decoder ``x = W z`` the same holds in a latent space.

Covariances are stored by eigen-decomposition, ``Sigma_k = Q_k diag(e_k) Q_k^T``; isotropic and
diagonal covariances skip ``Q`` (then every operation is O(K d) per sample).
All arithmetic defaults to float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..denoiser import Prediction, broadcast_time
from ..schedule import DiscreteVPSchedule, NoiseSchedule

__all__ = [
    "GaussianMixture",
    "GMMDenoiser",
    "LinearAutoencoder",
    "GMMProblem",
    "grid_gmm_means",
    "grid_gmm_prior",
    "grid_gmm_problem",
    "grid_gmm_seed",
    "cifar_like_spectrum",
    "GRID_DIMS",
    "ANISOTROPIC_SEED_BASE",
    "anisotropic_gmm_prior",
    "anisotropic_gmm_problem",
    "GRID_MEASUREMENT_DIMS",
]

GRID_DIMS = (8, 80, 800)
GRID_MEASUREMENT_DIMS = (1, 2, 4)


class GaussianMixture:
    """``sum_k w_k N(mu_k, Sigma_k)`` in ``R^d``.

    Args:
        weights: ``[K]`` nonnegative (normalised here).
        means: ``[K, d]``.
        covs: ``None`` (identity), a scalar or ``[K]`` (isotropic variances), ``[K, d]`` (diagonal)
            or ``[K, d, d]`` (full, symmetric positive semi-definite).
    """

    def __init__(self, weights: Tensor, means: Tensor, covs: Tensor | float | None = None,
                 *, dtype: torch.dtype = torch.float64) -> None:
        means = torch.as_tensor(means, dtype=dtype)
        if means.ndim != 2:
            raise ValueError(f"means must be [K, d], got shape {tuple(means.shape)}")
        K, d = means.shape
        weights = torch.as_tensor(weights, dtype=dtype, device=means.device).flatten()
        if weights.numel() != K:
            raise ValueError(f"got {weights.numel()} weights for {K} components")
        if bool((weights < 0).any()) or not float(weights.sum()) > 0:
            raise ValueError("weights must be nonnegative with a positive sum")
        self.weights = weights / weights.sum()
        self.means = means
        self.Q: Tensor | None = None
        if covs is None:
            e = torch.ones(K, d, dtype=dtype, device=means.device)
        else:
            c = torch.as_tensor(covs, dtype=dtype, device=means.device)
            if c.ndim == 0:
                e = c.expand(K, d).clone()
            elif c.shape == (K,):
                e = c[:, None].expand(K, d).clone()
            elif c.shape == (K, d):
                e = c.clone()
            elif c.shape == (K, d, d):
                if not torch.allclose(c, c.transpose(-1, -2), atol=1e-10 * float(c.abs().max())):
                    raise ValueError("full covariances must be symmetric")
                e, self.Q = torch.linalg.eigh(c)
            else:
                raise ValueError(f"covs of shape {tuple(c.shape)} fit none of scalar, [K], [K, d], [K, d, d] "
                                 f"with K={K}, d={d}")
            if bool((e < -1e-9 * e.abs().max().clamp(min=1)).any()):
                raise ValueError("covariances must be positive semi-definite")
            e = e.clamp(min=0)
        self.eig = e  # [K, d]

    # -- basic properties -------------------------------------------------------------------------
    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.means.dtype

    def covariances(self) -> Tensor:
        """Dense ``[K, d, d]`` covariances (for small d)."""
        if self.Q is None:
            return torch.diag_embed(self.eig)
        return self.Q @ torch.diag_embed(self.eig) @ self.Q.transpose(-1, -2)

    def mean(self) -> Tensor:
        return self.weights @ self.means

    def covariance(self) -> Tensor:
        """Covariance of the whole mixture, ``[d, d]``."""
        m = self.mean()
        dm = self.means - m
        return (self.weights[:, None, None] * (self.covariances() + dm[:, :, None] * dm[:, None, :])).sum(0)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> GaussianMixture:
        g = object.__new__(GaussianMixture)
        g.weights = self.weights.to(device=device, dtype=dtype)
        g.means = self.means.to(device=device, dtype=dtype)
        g.eig = self.eig.to(device=device, dtype=dtype)
        g.Q = None if self.Q is None else self.Q.to(device=device, dtype=dtype)
        return g

    # -- sampling and density -------------------------------------------------------------------
    def sample(self, n: int, generator: torch.Generator | None = None, *, return_components: bool = False
               ) -> Tensor | tuple[Tensor, Tensor]:
        """``n`` exact draws ``[n, d]`` (component indices first, then Gaussian noise)."""
        dev = self.means.device
        k = torch.multinomial(self.weights.to(torch.float64).cpu(), n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64).to(dev, self.dtype)
        k = k.to(dev)
        z = z * self.eig[k].sqrt()
        if self.Q is not None:
            z = torch.einsum("nij,nj->ni", self.Q[k], z)
        x = self.means[k] + z
        return (x, k) if return_components else x

    def _rotate(self, x: Tensor) -> Tensor:
        """``[B, K, d]`` coordinates of ``x - mu_k`` style differences in each component's eigenbasis."""
        if self.Q is None:
            return x
        return torch.einsum("kji,bkj->bki", self.Q, x)

    def _unrotate(self, u: Tensor) -> Tensor:
        if self.Q is None:
            return u
        return torch.einsum("kij,bkj->bki", self.Q, u)

    def component_log_prob(self, x: Tensor, alpha: Tensor | float = 1.0, sigma: Tensor | float = 0.0) -> Tensor:
        """``log N(x; alpha mu_k, alpha^2 Sigma_k + sigma^2 I)`` for every component, ``[B, K]``."""
        a, s = _per_sample(alpha, x), _per_sample(sigma, x)
        var = a[:, None, None] ** 2 * self.eig[None] + s[:, None, None] ** 2  # [B, K, d]
        diff = self._rotate(x[:, None, :] - a[:, None, None] * self.means[None])
        return -0.5 * ((diff**2 / var).sum(-1) + var.log().sum(-1) + self.dim * math.log(2 * math.pi))

    def log_prob(self, x: Tensor, alpha: Tensor | float = 1.0, sigma: Tensor | float = 0.0) -> Tensor:
        """``log p_t(x)`` of the noised mixture (``alpha=1, sigma=0``: the mixture itself)."""
        return torch.logsumexp(self.component_log_prob(x, alpha, sigma) + self.weights.log(), dim=-1)

    def responsibilities(self, x: Tensor, alpha: Tensor | float = 1.0, sigma: Tensor | float = 0.0) -> Tensor:
        """Posterior component probabilities ``r_k(x)``, ``[B, K]``."""
        return torch.softmax(self.component_log_prob(x, alpha, sigma) + self.weights.log(), dim=-1)

    # -- exact quantities of the noised marginal --------------------------------------------------
    def _score_parts(self, x: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Responsibilities ``[B, K]``, component scores ``[B, K, d]`` and inverse variances
        ``[B, K, d]`` (in each component's eigenbasis)."""
        a, s = _per_sample(alpha, x), _per_sample(sigma, x)
        var = a[:, None, None] ** 2 * self.eig[None] + s[:, None, None] ** 2
        diff = self._rotate(x[:, None, :] - a[:, None, None] * self.means[None])
        logn = -0.5 * ((diff**2 / var).sum(-1) + var.log().sum(-1))
        r = torch.softmax(logn + self.weights.log(), dim=-1)
        sk = self._unrotate(-diff / var)
        return r, sk, 1.0 / var

    def score(self, x: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> Tensor:
        """``grad log p_t(x)``, ``[B, d]``."""
        if self.Q is None and bool((self.eig == self.eig[:, :1]).all()):
            return self._isotropic_score(x, _per_sample(alpha, x), _per_sample(sigma, x))
        r, sk, _ = self._score_parts(x, _per_sample(alpha, x), _per_sample(sigma, x))
        return (r[..., None] * sk).sum(1)

    def _isotropic_score(self, x: Tensor, a: Tensor, s: Tensor) -> Tensor:
        """The score when every ``Sigma_k = e_k I``: with ``v_k = a^2 e_k + s^2``,
        ``log N_k = -(|x|^2 - 2a x.mu_k + a^2 |mu_k|^2) / (2 v_k) - d/2 log v_k`` and
        ``score = sum_k r_k (a mu_k - x) / v_k``; the ``x.mu_k`` products are one matmul, so no
        ``[B, K, d]`` tensor is formed (float64: the expanded square loses ~1e-16 |x|^2 absolutely)."""
        v = a[:, None] ** 2 * self.eig[None, :, 0] + s[:, None] ** 2  # [B, K]
        sq = (x * x).sum(-1, keepdim=True) - 2 * a[:, None] * (x @ self.means.T) \
            + a[:, None] ** 2 * (self.means**2).sum(-1)[None]
        r = torch.softmax(self.weights.log() - 0.5 * (sq / v + self.dim * v.log()), dim=-1)
        rv = r / v
        return a[:, None] * (rv @ self.means) - x * rv.sum(-1, keepdim=True)

    def hessian_vp(self, x: Tensor, v: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> Tensor:
        """``(grad^2 log p_t)(x) v`` for a batch of vectors ``v`` ``[B, d]`` (never forms the matrix)."""
        r, sk, ivar = self._score_parts(x, _per_sample(alpha, x), _per_sample(sigma, x))
        s = (r[..., None] * sk).sum(1)
        vk = self._rotate(v[:, None, :].expand_as(sk))
        cinv_v = self._unrotate(ivar * vk)  # C_k^{-1} v
        skv = (sk * v[:, None, :]).sum(-1)  # [B, K]
        out = (r[..., None] * (-cinv_v + sk * skv[..., None])).sum(1)
        return out - s * (s * v).sum(-1, keepdim=True)

    def hessian(self, x: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> Tensor:
        """Dense ``grad^2 log p_t(x)``, ``[B, d, d]`` (small ``d`` only)."""
        r, sk, ivar = self._score_parts(x, _per_sample(alpha, x), _per_sample(sigma, x))
        s = (r[..., None] * sk).sum(1)
        if self.Q is None:
            cinv = torch.diag_embed(ivar)
        else:
            cinv = self.Q[None] @ torch.diag_embed(ivar) @ self.Q[None].transpose(-1, -2)
        outer = sk[..., :, None] * sk[..., None, :]
        h = (r[..., None, None] * (outer - cinv)).sum(1)
        return h - s[:, :, None] * s[:, None, :]

    # -- transforms ---------------------------------------------------------------------------------
    def noised(self, alpha: float, sigma: float) -> GaussianMixture:
        """The exact law of ``alpha x0 + sigma eps``."""
        g = object.__new__(GaussianMixture)
        g.weights = self.weights.clone()
        g.means = alpha * self.means
        g.eig = alpha**2 * self.eig + sigma**2
        g.Q = None if self.Q is None else self.Q.clone()
        return g

    def linear_map(self, W: Tensor, b: Tensor | None = None) -> GaussianMixture:
        """The law of ``W x + b`` (full covariances in the output space)."""
        W = torch.as_tensor(W, dtype=self.dtype, device=self.means.device)
        means = self.means @ W.T + (0 if b is None else torch.as_tensor(b, dtype=self.dtype))
        covs = W @ self.covariances() @ W.T
        return GaussianMixture(self.weights, means, 0.5 * (covs + covs.transpose(-1, -2)), dtype=self.dtype)

    def posterior(self, A: Tensor, y: Tensor, sigma_y: float | Tensor) -> GaussianMixture:
        """The exact posterior ``p(x0 | y)`` for ``y = A x0 + n``, ``n ~ N(0, sigma_y^2 I)``.

        Per component (Kalman form, valid for singular ``Sigma_k`` and ``sigma_y > 0``):
        ``S_k = sigma_y^2 I + A Sigma_k A^T``, gain ``G_k = Sigma_k A^T S_k^{-1}``,
        ``m_k = mu_k + G_k (y - A mu_k)``, ``P_k = Sigma_k - G_k A Sigma_k``,
        weights ``∝ w_k N(y; A mu_k, S_k)``.
        """
        A = torch.as_tensor(A, dtype=self.dtype, device=self.means.device)
        if A.ndim != 2 or A.shape[1] != self.dim:
            raise ValueError(f"A must be [d_y, {self.dim}], got {tuple(A.shape)}")
        y = torch.as_tensor(y, dtype=self.dtype, device=self.means.device).flatten()
        if y.numel() != A.shape[0]:
            raise ValueError(f"y has {y.numel()} entries, A has {A.shape[0]} rows")
        if not torch.isfinite(y).all():
            raise ValueError("measurement y contains NaN or Inf")
        sy = torch.as_tensor(sigma_y, dtype=self.dtype)
        if float(sy) < 0:
            raise ValueError(f"sigma_y must be nonnegative, got {float(sy)}")
        covs = self.covariances()  # [K, d, d]
        SA = covs @ A.T  # [K, d, dy]
        S = A @ SA + (sy**2) * torch.eye(A.shape[0], dtype=self.dtype, device=A.device)
        L = torch.linalg.cholesky(S)
        resid = y[None] - self.means @ A.T  # [K, dy]
        sol = torch.cholesky_solve(resid[..., None], L)[..., 0]
        means = self.means + (SA @ sol[..., None])[..., 0]
        gain_t = torch.cholesky_solve(SA.transpose(-1, -2), L)  # S^{-1} A Sigma  [K, dy, d]
        P = covs - SA @ gain_t
        P = 0.5 * (P + P.transpose(-1, -2))
        logdet = 2 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
        maha = (resid * sol).sum(-1)
        logw = self.weights.log() - 0.5 * (maha + logdet)
        return GaussianMixture(torch.softmax(logw, 0), means, P, dtype=self.dtype)


def _per_sample(v: Tensor | float, x: Tensor) -> Tensor:
    v = torch.as_tensor(v, dtype=x.dtype, device=x.device)
    if v.ndim == 0:
        return v.expand(x.shape[0])
    return v.reshape(-1).expand(x.shape[0]) if v.numel() == 1 else v.reshape(-1)


class GMMDenoiser:
    """The exact denoiser of a Gaussian-mixture prior, behind the denoiser contract.

    Inputs may have any event shape (``[B, d]`` or ``[B, C, H, W]`` with ``C*H*W = d``); they are
    flattened for the mixture algebra and reshaped back. Extra exact quantities for tests and for
    second-order methods: :meth:`score`, :meth:`jvp_x0`, :meth:`hessian`, :meth:`log_prob`.
    """

    def __init__(self, prior: GaussianMixture, schedule: NoiseSchedule | None = None) -> None:
        self.prior = prior
        self.schedule = schedule if schedule is not None else default_gmm_schedule()

    def _flat(self, x: Tensor) -> tuple[Tensor, torch.Size]:
        if x.ndim < 2:
            raise ValueError(f"expected a batch [B, ...], got shape {tuple(x.shape)}")
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] != self.prior.dim:
            raise ValueError(f"input has {flat.shape[1]} features per sample, the prior has dimension {self.prior.dim}")
        return flat.to(self.prior.dtype), x.shape

    def alpha_sigma(self, x: Tensor, t: Tensor | float) -> tuple[Tensor, Tensor]:
        tt = broadcast_time(t, x)
        a, s = self.schedule.alpha_sigma(tt)
        return a.to(self.prior.means.device), s.to(self.prior.means.device)

    def score(self, x: Tensor, t: Tensor | float) -> Tensor:
        f, shape = self._flat(x)
        a, s = self.alpha_sigma(x, t)
        return self.prior.score(f, a.to(f.dtype), s.to(f.dtype)).reshape(shape).to(x.dtype)

    def __call__(self, x: Tensor, t: Tensor | float) -> Prediction:
        f, shape = self._flat(x)
        a, s = (v.to(f.dtype) for v in self.alpha_sigma(x, t))
        sc = self.prior.score(f, a, s)
        eps = -s[:, None] * sc
        x0 = (f + s[:, None] ** 2 * sc) / a[:, None]
        return Prediction(eps=eps.reshape(shape).to(x.dtype), x0=x0.reshape(shape).to(x.dtype))

    def jvp_x0(self, x: Tensor, t: Tensor | float, v: Tensor) -> Tensor:
        """``(d x0_hat / d x_t) v = (v + sigma^2 (grad^2 log p_t) v) / alpha``."""
        f, shape = self._flat(x)
        vf = v.reshape(f.shape).to(f.dtype)
        a, s = (w.to(f.dtype) for w in self.alpha_sigma(x, t))
        hv = self.prior.hessian_vp(f, vf, a, s)
        return ((vf + s[:, None] ** 2 * hv) / a[:, None]).reshape(shape).to(x.dtype)

    def hessian_vp(self, x: Tensor, t: Tensor | float, v: Tensor) -> Tensor:
        """``(grad^2 log p_t)(x) v``."""
        f, shape = self._flat(x)
        a, s = (w.to(f.dtype) for w in self.alpha_sigma(x, t))
        return self.prior.hessian_vp(f, v.reshape(f.shape).to(f.dtype), a, s).reshape(shape).to(x.dtype)

    def hessian(self, x: Tensor, t: Tensor | float) -> Tensor:
        """Dense ``grad^2 log p_t(x)``, ``[B, d, d]``."""
        f, _ = self._flat(x)
        a, s = (w.to(f.dtype) for w in self.alpha_sigma(x, t))
        return self.prior.hessian(f, a, s)

    def log_prob(self, x: Tensor, t: Tensor | float) -> Tensor:
        f, _ = self._flat(x)
        a, s = (w.to(f.dtype) for w in self.alpha_sigma(x, t))
        return self.prior.log_prob(f, a, s)

    def marginal(self, t: float) -> GaussianMixture:
        """The exact law of ``x_t``."""
        a, s = self.schedule.alpha_sigma(torch.tensor(float(t)))
        return self.prior.noised(float(a), float(s))


def default_gmm_schedule() -> DiscreteVPSchedule:
    """The DDPM linear schedule (1000 steps, betas 1e-4..0.02) used for the GMM benchmarks."""
    return DiscreteVPSchedule.from_config(
        {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}
    )


class LinearAutoencoder:
    """A linear decoder ``x = W z + b`` with the least-squares encoder ``z = W^+ (x - b)``.

    Puts a Gaussian-mixture prior on latents ``z`` in a latent space; the image-space prior is the
    push-forward ``prior.linear_map(W, b)`` and every posterior stays exact.
    """

    def __init__(self, W: Tensor, b: Tensor | None = None) -> None:
        self.W = torch.as_tensor(W, dtype=torch.float64)
        if self.W.ndim != 2:
            raise ValueError(f"W must be [d_x, d_z], got {tuple(self.W.shape)}")
        self.b = None if b is None else torch.as_tensor(b, dtype=torch.float64).flatten()
        self.W_pinv = torch.linalg.pinv(self.W)

    @property
    def latent_dim(self) -> int:
        return self.W.shape[1]

    @property
    def data_dim(self) -> int:
        return self.W.shape[0]

    def decode(self, z: Tensor) -> Tensor:
        x = z.reshape(z.shape[0], -1).to(self.W.dtype) @ self.W.T
        return (x if self.b is None else x + self.b).to(z.dtype)

    def encode(self, x: Tensor) -> Tensor:
        f = x.reshape(x.shape[0], -1).to(self.W.dtype)
        if self.b is not None:
            f = f - self.b
        return (f @ self.W_pinv.T).to(x.dtype)

    @classmethod
    def random(cls, data_dim: int, latent_dim: int, generator: torch.Generator | None = None) -> LinearAutoencoder:
        """A random decoder with orthonormal columns (so ``encode(decode(z)) = z``)."""
        g = torch.randn(data_dim, latent_dim, generator=generator, dtype=torch.float64)
        q, _ = torch.linalg.qr(g)
        return cls(q)


# ----------------------------------------------------------------------------------------------------
# The published grid-GMM posterior benchmark (PAPERS.md 5.2)
# ----------------------------------------------------------------------------------------------------
def grid_gmm_means(dim: int, spacing: float = 8.0) -> Tensor:
    """The 25 means ``mu_ij = (-8i, -8j, -8i, -8j, ...)``, ``i, j in {-2..2}``, i outer, j inner."""
    if dim < 1:
        raise ValueError("dim must be positive")
    rows = []
    for i in range(-2, 3):
        for j in range(-2, 3):
            pair = torch.tensor([-spacing * i, -spacing * j], dtype=torch.float64)
            rows.append(pair.repeat((dim + 1) // 2)[:dim])
    return torch.stack(rows)


def grid_gmm_prior(dim: int, weights: str = "uniform", seed: int = 0) -> GaussianMixture:
    """The 25-component grid prior with identity covariances.

    weights: ``"uniform"`` (TMPD) or ``"mcgdiff"``: ``w ∝ z^2``, ``z ~ N(0, I_25)`` drawn from a
    generator seeded with ``seed``.
    """
    means = grid_gmm_means(dim)
    if weights == "uniform":
        w = torch.full((25,), 1 / 25, dtype=torch.float64)
    elif weights == "mcgdiff":
        g = torch.Generator().manual_seed(int(seed))
        w = torch.randn(25, generator=g, dtype=torch.float64) ** 2
    else:
        raise ValueError(f"unknown weights {weights!r}; expected 'uniform' or 'mcgdiff'")
    return GaussianMixture(w, means)


def grid_gmm_seed(d_x: int, d_y: int, replicate: int) -> int:
    """``2^ind_dim * 3^ind_ptg + i`` as in the published benchmark."""
    if d_x not in GRID_DIMS or d_y not in GRID_MEASUREMENT_DIMS:
        raise ValueError(f"grid benchmark dimensions are d_x in {GRID_DIMS}, d_y in {GRID_MEASUREMENT_DIMS}")
    return 2 ** GRID_DIMS.index(d_x) * 3 ** GRID_MEASUREMENT_DIMS.index(d_y) + int(replicate)


@dataclass
class GMMProblem:
    """A posterior problem ``y = A x* + sigma_y n`` on a mixture prior, with its exact answer."""

    prior: GaussianMixture
    A: Tensor
    y: Tensor
    sigma_y: float
    x_true: Tensor
    seed: int

    def posterior(self) -> GaussianMixture:
        return self.prior.posterior(self.A, self.y, self.sigma_y)


def grid_gmm_problem(d_x: int, d_y: int, replicate: int, *, sigma_y: float | None = None,
                     weights: str = "uniform") -> GMMProblem:
    """One instance of the published grid benchmark.

    Seeding (PAPERS.md 5.2): a generator seeded with :func:`grid_gmm_seed` draws, in this order,
    ``A0 = randn(d_y, d_x)``; ``U, s0, V = svd(A0)``; ``s = sort(rand_like(s0), descending)``;
    ``A = U diag(s) V[:d_y]``; ``x*`` = one prior draw (component index, then Gaussian noise);
    if ``sigma_y`` is None, ``sigma_y = rand(1) * max(s)`` (MCGdiff); then ``y = A x* + sigma_y randn``.
    Draws are float32 as in the published code, then promoted to float64. ``weights="mcgdiff"`` draws
    the mixture weights from a separate generator with the same seed.
    """
    seed = grid_gmm_seed(d_x, d_y, replicate)
    g = torch.Generator().manual_seed(seed)
    prior = grid_gmm_prior(d_x, weights=weights, seed=seed)
    A0 = torch.randn(d_y, d_x, generator=g)
    U, s0, Vh = torch.linalg.svd(A0, full_matrices=True)
    s = torch.sort(torch.rand(s0.shape, generator=g), descending=True).values
    A = (U @ torch.diag(s) @ Vh[:d_y]).to(torch.float64)
    k = torch.multinomial(prior.weights.float(), 1, replacement=True, generator=g)
    x_true = (prior.means[k] + torch.randn(1, d_x, generator=g).to(torch.float64))[0]
    if sigma_y is None:
        sigma_y = float(torch.rand(1, generator=g) * s.max())
    if sigma_y < 0:
        raise ValueError(f"sigma_y must be nonnegative, got {sigma_y}")
    y = A @ x_true + sigma_y * torch.randn(d_y, generator=g).to(torch.float64)
    return GMMProblem(prior=prior, A=A, y=y, sigma_y=float(sigma_y), x_true=x_true, seed=seed)


#: seed offset of :func:`anisotropic_gmm_problem` (far from the grid benchmark's seeds, which stay below 2^20)
ANISOTROPIC_SEED_BASE = 7_000_000


def anisotropic_gmm_prior(dim: int, replicate: int, *, components: int = 10, spread: float = 8.0,
                          var_range: tuple[float, float] = (0.05, 5.0)) -> GaussianMixture:
    """A random mixture with anisotropic (diagonal) covariances: ``components`` means uniform in
    ``[-spread, spread]^dim``, per-component per-coordinate variances log-uniform in ``var_range``
    (a 100-fold anisotropy by default), weights ``∝`` Exp(1) draws (a flat Dirichlet). Drawn, in this
    order, from a generator seeded with ``ANISOTROPIC_SEED_BASE + 1000 * dim + replicate``: the prior
    depends on the dimension and the replicate only, not on the measurement."""
    if dim < 1 or components < 1 or replicate < 0:
        raise ValueError("dim and components must be positive and replicate nonnegative")
    lo, hi = (float(v) for v in var_range)
    if not 0 < lo <= hi:
        raise ValueError(f"var_range must satisfy 0 < low <= high, got {var_range}")
    g = torch.Generator().manual_seed(ANISOTROPIC_SEED_BASE + 1000 * int(dim) + int(replicate))
    means = spread * (2 * torch.rand(components, dim, generator=g, dtype=torch.float64) - 1)
    logv = math.log(lo) + (math.log(hi) - math.log(lo)) * torch.rand(components, dim, generator=g,
                                                                     dtype=torch.float64)
    w = -torch.log(torch.rand(components, generator=g, dtype=torch.float64))
    return GaussianMixture(w, means, logv.exp())


def anisotropic_gmm_problem(d_x: int, d_y: int, replicate: int, *, sigma_y: float,
                            components: int = 10) -> GMMProblem:
    """A posterior problem on :func:`anisotropic_gmm_prior` (``d_x``, ``replicate``): ``A`` is drawn as in
    :func:`grid_gmm_problem` (``U diag(s) V[:d_y]``, ``s`` uniform in [0, 1], sorted), ``x*`` is one prior
    draw and ``y = A x* + sigma_y n``, from a generator seeded with ``ANISOTROPIC_SEED_BASE + 1000 * d_x
    + 100 * d_y + replicate`` (``A``, ``x*`` and ``n`` are shared by the ``sigma_y`` values of one
    replicate, as in the grid benchmark)."""
    if not sigma_y > 0:
        raise ValueError(f"sigma_y must be positive, got {sigma_y}")
    if not 1 <= d_y <= d_x:
        raise ValueError(f"need 1 <= d_y <= d_x, got d_y={d_y}, d_x={d_x}")
    prior = anisotropic_gmm_prior(d_x, replicate, components=components)
    seed = ANISOTROPIC_SEED_BASE + 1000 * int(d_x) + 100 * int(d_y) + int(replicate)
    g = torch.Generator().manual_seed(seed)
    A0 = torch.randn(d_y, d_x, generator=g, dtype=torch.float64)
    U, s0, Vh = torch.linalg.svd(A0, full_matrices=True)
    s = torch.sort(torch.rand(s0.shape, generator=g, dtype=torch.float64), descending=True).values
    A = U @ torch.diag(s) @ Vh[:d_y]
    k = int(torch.multinomial(prior.weights, 1, generator=g))
    x_true = prior.means[k] + prior.eig[k].sqrt() * torch.randn(d_x, generator=g, dtype=torch.float64)
    y = A @ x_true + float(sigma_y) * torch.randn(d_y, generator=g, dtype=torch.float64)
    return GMMProblem(prior=prior, A=A, y=y, sigma_y=float(sigma_y), x_true=x_true, seed=seed)


def cifar_like_spectrum(dim: int = 3 * 32 * 32, decay: float = 1.0, top: float = 0.25) -> Tensor:
    """Eigenvalues of a Gaussian with a natural-image-like (power-law) spectrum.

    ``c_i = top * (i + 1)^(-decay)``: images' principal-component variances fall off roughly as
    ``1/i`` (the 1/f^2 power spectrum of natural images); ``top`` is the first variance on the
    [-1, 1] scale. An analytic stand-in for a Gaussian fitted to CIFAR-10.
    """
    i = torch.arange(dim, dtype=torch.float64)
    return top * (i + 1) ** (-decay)
