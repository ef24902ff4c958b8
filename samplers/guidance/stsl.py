"""STSL, the second-order Tweedie sampler from a surrogate loss (Rout et al., CVPR 2024), as a step of
the sampling loop: ``inner_steps`` gradient steps on the surrogate loss, then a DDIM step."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from ..denoiser import Prediction
from ..loop import Callback, GeneratorArg, Method, Result, Run
from ..schedule import TimeGrid
from ..solvers import ddim_step
from .krylov import KRYLOV_SOLVERS
from .measurement import (
    DATA_NORMS,
    GLUING_MODES,
    STEP_SCHEDULES,
    STSL_INIT_MODES,
    STSL_INITS,
    StepSchedule,
    _back_project,
    _check_nonneg,
    _choice,
    _grad,
    _measurement,
    _norm,
    _require_autoencoder,
    _sqnorm,
    _step_factor,
    hutchinson_trace_fd,
)
from .mmps import moment_matched_solve
from .psld import _gluing
from .result import run_posterior

__all__ = ["STSLOptions", "STSL", "sample_stsl"]


@dataclass(frozen=True)
class STSLOptions:
    """STSL's knobs (see :func:`sample_stsl`); checked on construction."""

    lam: float
    eta: float = 0.02
    inner_steps: int = 5
    num_probes: int = 1
    probe_scale: float = 1.0
    gamma: float = 0.0
    gluing: str = "adjoint"
    data_norm: str = "squared"
    step_schedule: StepSchedule = "constant"
    init: str = "adjoint"
    init_mode: str = "stochastic"
    ddim_eta: float = 0.0
    likelihood: str = "gaussian"
    sigma_y: float | None = None
    iterations: int = 5
    solver: str = "gmres"

    def __post_init__(self) -> None:
        _choice(self.data_norm, DATA_NORMS, "data_norm")
        _choice(self.gluing, GLUING_MODES, "gluing")
        _choice(self.init, STSL_INITS, "init")
        _choice(self.init_mode, STSL_INIT_MODES, "init_mode")
        _choice(self.likelihood, STSL_LIKELIHOODS, "likelihood")
        _choice(self.solver, tuple(KRYLOV_SOLVERS), "Krylov solver")
        if not callable(self.step_schedule):
            _choice(self.step_schedule, STEP_SCHEDULES, "step_schedule")
        _check_nonneg(lam=self.lam, eta=self.eta, gamma=self.gamma, ddim_eta=self.ddim_eta)
        if self.likelihood == "moment-matched":
            if self.sigma_y is None:
                raise ValueError("likelihood='moment-matched' needs the measurement's noise level: sigma_y=...")
            _check_nonneg(sigma_y=self.sigma_y)
        for k in ("inner_steps", "num_probes", "iterations"):
            v = getattr(self, k)
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"{k} must be a positive integer, got {v!r}")
        if not self.probe_scale > 0:
            raise ValueError(f"probe_scale must be positive, got {self.probe_scale}")
        if self.init == "noise" and self.init_mode == "inversion":
            raise ValueError("init='noise' has nothing to invert; use init_mode='stochastic' "
                             "(or init='adjoint'/'pinv')")


    @staticmethod
    def needs_sigma_y(options: dict[str, Any]) -> bool:
        """Whether options (a mapping of field values) use the measurement's noise level."""
        return options.get("likelihood", "gaussian") == "moment-matched"


#: STSL's data terms: the paper's Gaussian ``|y - A D(x0_hat)|`` and MMPS's moment-matched likelihood
STSL_LIKELIHOODS = ("gaussian", "moment-matched")

#: the option names ``sample_stsl`` takes in ``**options``
_OPTIONS = tuple(f.name for f in fields(STSLOptions) if f.name != "lam")


def _ddim_inversion(run: Run, z0: Tensor) -> Tensor:
    """Deterministic DDIM inversion of a clean ``z0`` up to grid point 0 (diffusers'
    ``DDIMInverseScheduler``: the network is evaluated at the *target* time with the current point,
    ``x0_hat`` uses the current level, which starts at ``alpha = 1, sigma = 0``)."""
    grid, n = run.grid, run.num_steps
    z = z0
    a_cur, s_cur = float(grid.alpha[n]), float(grid.sigma[n])
    with torch.no_grad():
        for j in range(n - 1, -1, -1):
            aj, sj = float(grid.alpha[j]), float(grid.sigma[j])
            eps = run.denoise(z, grid.t[j]).eps
            x0 = (z - s_cur * eps) / a_cur
            z = aj * x0 + sj * eps
            a_cur, s_cur = aj, sj
    return z


class STSL(Method):
    """STSL's step: ``inner_steps`` gradient steps ``z <- z - f_i grad_z L`` on the surrogate loss
    (:meth:`loss`), then a DDIM step from the moved ``z``. ``start`` prepares the measurement and
    initialises from ``E(Aᵀy)`` / ``E(A⁺y)`` (stochastically or by DDIM inversion)."""

    name = "stsl"

    def __init__(self, operator: Any, y: Tensor, options: STSLOptions) -> None:
        self.operator, self.y, self.o = operator, y, options

    @property
    def nfe_convention(self) -> str:  # type: ignore[override]
        o = self.o
        return ("inner gradient steps x DDIM steps, as the STSL paper counts (each inner step "
                f"runs {1 + (o.num_probes if o.eta > 0 else 0)} network forwards; each DDIM step "
                "one more), plus DDIM-inversion evaluations"
                + (f"; the moment-matched likelihood adds {o.iterations} VJPs per inner step (network backward)"
                   if o.likelihood == "moment-matched" else ""))

    def start(self, run: Run, z: Tensor) -> Tensor:
        o, st, z = self.o, run.state, z.detach()
        st["y"] = yb = _measurement(run, self.operator, self.y, z)
        st["d"], st["sigma0"] = z[0].numel(), float(run.grid.sigma[0])
        st["y_back"] = _back_project(self.operator, yb, o.gluing) if o.gamma > 0 else None
        if o.init != "noise":  # initialisation: E(Aᵀy) or E(A⁺y) pushed to the first noise level
            with torch.no_grad():
                z_clean = run.encode(_back_project(self.operator, yb, "adjoint" if o.init == "adjoint" else "pinv"), z)
                if tuple(z_clean.shape) != tuple(z.shape):
                    raise ValueError(f"the encoded initialisation has shape {list(z_clean.shape)}, "
                                     f"x has {list(z.shape)}")
                if o.init_mode == "stochastic":
                    z = float(run.grid.alpha[0]) * z_clean + z
                else:
                    z = _ddim_inversion(run, z_clean)
        st["inversion_nfe"] = run.cost.network_forward
        return z

    def loss(self, run: Run, z: Tensor, i: int) -> Tensor:
        """``L(y, z) = lam * data(y - A D(z0_hat(z))) + (eta/d) (1/c) eᵀ(s(z + c e) - s(z))
        [+ gamma |E(Aᵀy + (I - AᵀA) D(z0_hat)) - z0_hat|]`` per sample at grid point ``i`` (PAPERS.md 2.1)."""
        o, st = self.o, run.state
        t, a, s, _, _ = run.point(i)
        pred = run.denoise(z, t)
        x = run.decode(pred.x0)
        ax = self.operator(x)
        if o.likelihood == "moment-matched":
            loss = o.lam * self._moment_matched(run, z, a, s, pred, ax)
        else:
            r = st["y"] - ax
            loss = o.lam * (_sqnorm(r) if o.data_norm == "squared" else _norm(r))
        if o.eta > 0:  # (eta/d) eᵀ(s(z+e) - s(z)): one-probe Hutchinson trace of grad^2 log p_t
            loss = loss + (o.eta / st["d"]) * hutchinson_trace_fd(
                run.denoise, z, t, s, num_probes=o.num_probes, probe_scale=o.probe_scale,
                generator=run.generator, pred=pred)
        if o.gamma > 0:
            loss = loss + o.gamma * _norm(_gluing(run, self.operator, x, pred.x0, st["y_back"], o.gluing))
        return loss

    def _moment_matched(self, run: Run, z: Tensor, a: float, s: float, pred: Prediction, ax: Tensor) -> Tensor:
        """MMPS's likelihood as STSL's data term, per sample: ``q = rᵀ C⁻¹ r`` with ``r = y - A D(x0_hat)``
        and ``C = Sigma_y + (sigma_t^2/alpha_t) A J Aᵀ`` (``data_norm="squared"``) or ``sqrt(q)``
        (``"unsquared"``). ``C`` is held fixed under differentiation (as MMPS does) and ``C⁻¹ r`` comes from
        ``iterations`` Krylov steps, so the term's value is ``q`` and its gradient ``-2 Jᵀ Aᵀ u``
        (``sqrt``: ``-Jᵀ Aᵀ u / sqrt(q)``). Cost: ``iterations`` more VJPs per inner step."""
        o = self.o
        y = run.state["y"].to(dtype=ax.dtype, device=ax.device).expand_as(ax)
        B = ax.shape[0]
        u, _ = moment_matched_solve(ax, z, y, float(o.sigma_y), s * s / a, KRYLOV_SOLVERS[o.solver], o.iterations,
                                    measure=lambda v: self.operator(run.decode(v)), x0=pred.x0,
                                    through_decoder=run.autoencoder is not None)
        r = (y - ax.detach()).reshape(B, -1).to(torch.float64)
        q = (r * u).sum(1).clamp(min=0.0)
        # value q, gradient that of q with C fixed: d/dz [-2 uᵀ A D(x0_hat(z))]
        lin_term = (u.to(ax.dtype) * (ax.detach() - ax).reshape(B, -1)).sum(1)
        if o.data_norm == "squared":
            return q.to(ax.dtype) + 2 * lin_term
        root = q.sqrt().clamp(min=1e-12).to(ax.dtype)
        return root + lin_term / root

    def step(self, run: Run, z: Tensor, i: int) -> tuple[Tensor, Prediction]:
        t, a, s, an, sn = run.point(i)
        f = _step_factor(self.o.step_schedule, i, run.num_steps, a, s, run.state["sigma0"])
        for _ in range(self.o.inner_steps):
            z = z.detach().requires_grad_(True)
            z = (z - f * _grad(self.loss(run, z, i).sum(), z)).detach()
        with torch.no_grad():  # the DDIM step from the moved point (a fresh network call)
            pred = run.denoise(z, t)
            z = ddim_step(pred.x0, pred.eps, a, s, an, sn, eta=self.o.ddim_eta, generator=run.generator)
        return z, pred

    def nfe(self, run: Run) -> int:
        return run.num_steps * self.o.inner_steps + run.state["inversion_nfe"]

    def info(self, run: Run) -> dict[str, Any]:
        return {"inversion_nfe": run.state["inversion_nfe"]}


def sample_stsl(
    denoiser: Any,
    operator: Any,
    y: Tensor,
    x: Tensor,
    grid: TimeGrid,
    autoencoder: Any | None = None,
    *,
    lam: float,
    generator: GeneratorArg = None,
    callback: Callback | None = None,
    progress: bool = False,
    **options: Any,
) -> Result:
    """STSL, the second-order Tweedie sampler from a surrogate loss (Rout et al., CVPR 2024).

    Before each DDIM step at level ``t``, ``inner_steps`` gradient steps ``z <- z - f_i grad_z L``
    on the surrogate loss (PAPERS.md 2.1)

        ``L(y, z) = lam * data(y - A D(z0_hat(z))) + (eta/d) (1/c) eᵀ(s(z + c e) - s(z))
                    [+ gamma |E(Aᵀy + (I - AᵀA) D(z0_hat)) - z0_hat|]``,

    ``s = -eps_hat / sigma_t``, a fresh probe ``e ~ N(0, I)`` per inner step (``num_probes`` averaged),
    ``d`` the number of entries of one sample's ``z``; then a DDIM step (``ddim_eta``, 0 in the paper)
    from the moved ``z`` with a fresh network call. The trace term's gradient is the second-order drift
    ``-(eta/d) grad tr(grad^2 log p_t)`` (see :func:`hutchinson_trace_fd`); with ``eta = 0`` the update
    is first-order (latent DPS with the gradient step placed before the DDIM step).

    Pixel space when ``autoencoder`` is None (``D`` = identity), latent space otherwise. ``options``
    are the fields of :class:`STSLOptions` (the signature lists them):

    lam: data weight, step size folded in; the paper gives only "O(1/sigma_y^2)" (no published value;
      TMPD's GMM runs used 0.05).
    eta: trace weight; 0.02 is the paper's best (ablation) and TMPD's value.
    inner_steps: ``K``; 5 in the paper (ablation: 1, 2), 3 in TMPD's GMM runs.
    num_probes: probes averaged per inner step; probe_scale: ``c``; 1 is the paper's unit-variance probe.
    gamma, gluing: PSLD's gluing term (off by default, as in the paper's reported loss).
    likelihood: ``"gaussian"`` (the paper: the data term above) or ``"moment-matched"``: MMPS's
      likelihood ``N(y; A D(x0_hat), Sigma_y + (sigma_t^2/alpha_t) A J Aᵀ)`` instead, the data term
      ``rᵀ C⁻¹ r`` (``data_norm``: squared, or its square root) with ``C⁻¹ r`` from ``iterations``
      Krylov steps (``solver``: ``"gmres"`` or ``"cg"``) and ``C`` held fixed under differentiation;
      needs ``sigma_y`` (the measurement's Gaussian noise level).
    data_norm: ``"squared"`` (paper) or ``"unsquared"``.
    step_schedule: multiplies the whole gradient step at step ``i``: ``"constant"``, ``"sigma"``
      (``sigma_i / sigma_0``), ``"sigma2"`` or a callable ``f(i, n, alpha_i, sigma_i) -> float``.
    init: start from ``Aᵀy`` (``"adjoint"``, the paper), ``A⁺y`` (``"pinv"``), encoded by the
      autoencoder in latent space, or ``"noise"`` (``x`` itself).
    init_mode: ``"stochastic"``: ``z_0 = alpha_0 E(init) + x`` -- ``x`` is the noise part
      ``sigma_0 eps`` (so ``init="noise"`` gives ``z_0 = x``); ``"inversion"``: deterministic DDIM
      inversion of ``E(init)`` along the grid (``n`` extra network forwards; ``x`` only gives the shape;
      not with ``init="noise"``).
    """
    for name in options:
        if name not in _OPTIONS:
            raise TypeError(f"sample_stsl() got an unexpected keyword argument {name!r}")
    o = STSLOptions(lam=lam, **options)
    if autoencoder is not None:
        _require_autoencoder(autoencoder, "stsl", needs_encode=o.init != "noise" or o.gamma > 0)
    return run_posterior(STSL(operator, y, o), denoiser, x, grid, autoencoder, generator=generator,
                         callback=callback, progress=progress)


def _stsl_signature() -> inspect.Signature:
    """``sample_stsl``'s signature with the :class:`STSLOptions` fields as keyword-only parameters, in
    the order of the dataclass, before ``generator``: callers that list a sampler's options from its
    signature (the CLI, the sweep) see every option. ``sample_stsl.options_class`` names the dataclass."""
    sig = inspect.signature(sample_stsl)
    params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    at = [p.name for p in params].index("generator")
    opts = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=f.type, default=f.default)
            for f in fields(STSLOptions) if f.name in _OPTIONS]
    return sig.replace(parameters=params[:at] + opts + params[at:])


sample_stsl.__signature__ = _stsl_signature()  # type: ignore[attr-defined]
sample_stsl.options_class = STSLOptions  # type: ignore[attr-defined]
