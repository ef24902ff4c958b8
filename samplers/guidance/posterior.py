"""Diffusion posterior samplers that take gradients through the denoiser: DPS, latent DPS, PSLD, STSL.

Problem: sample ``x0 ~ p(x0 | y)`` for ``y = A x0 + n`` with a diffusion prior. Each sampler owns its
loop (the published updates are gradient steps on ``x_t``, which a scheduler's ``step`` cannot carry)
and follows its paper / released code line by line; the comments cite the equations.

Conventions shared by every sampler here:

* ``denoiser(x_t, t) -> Prediction(eps, x0)`` is the hessdiff denoiser contract; ``grid`` a
  :class:`~hessdiff.samplers.schedule.TimeGrid` (``n`` steps, noisiest point first).
* ``operator`` is any linear measurement map with ``operator(x)`` and ``operator.adjoint(y)`` (true
  adjoint), optionally ``operator.pinv(y)`` and ``operator.output_shape(shape)`` -- e.g. the
  operators of :mod:`hessdiff.tasks.operators` (``MatrixOperator`` for the Gaussian-mixture oracles).
* ``y`` is the measurement, shaped like ``operator(x)`` for the data batch, or with batch size 1
  (then it is shared by every sample).
* ``x`` is the state at grid point 0 with the batch shape of the run (latent shape for the latent
  methods). For a VP grid starting near pure noise pass ``sigma_0 * randn``.
* Latent methods take an ``autoencoder`` with ``decode(z) -> x`` and ``encode(x) -> z``
  (:class:`~hessdiff.samplers.oracles.gmm.LinearAutoencoder`, or
  :class:`~hessdiff.samplers.diffusers.pipeline.VAEAutoencoder` for a diffusers VAE).
* Norms are per sample (the released DPS/PSLD code takes ``torch.linalg.norm`` over the whole batch
  and runs batch size 1, where the two coincide); losses are summed over the batch before
  ``torch.autograd.grad``, so samples never interact.
* ``generator`` is a ``torch.Generator`` or one per sample (see
  :func:`~hessdiff.samplers.solvers.randn_like`); it drives DDIM/DDPM noise and STSL's probes.
* Arithmetic runs in float32 (float64 for float64 inputs) whatever the network's dtype.

Every run returns a :class:`PosteriorResult` with the samples and a :class:`Cost` record.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..denoiser import Prediction, compute_dtype
from ..schedule import TimeGrid
from ..loop import check_inputs as _check_inputs, progress_range as _progress, randn_like
from ..solvers import ddim_step

__all__ = [
    "Cost",
    "PosteriorResult",
    "CostTracker",
    "sample_dps",
    "sample_latent_dps",
    "sample_psld",
    "sample_stsl",
    "hutchinson_trace_fd",
    "prepare_measurement",
    "POSTERIOR_SAMPLERS",
    "LATENT_METHODS",
    "get_posterior_sampler",
]

GeneratorArg = torch.Generator | Sequence[torch.Generator] | None
Callback = Callable[[int, Tensor, Tensor, Prediction], None]
StepSchedule = str | Callable[[int, int, float, float], float]

DPS_NORMS = ("code", "paper", "squared")
DATA_NORMS = ("squared", "unsquared")
GLUING_MODES = ("adjoint", "pinv")
PLACEMENTS = ("after", "before")
STSL_INITS = ("adjoint", "pinv", "noise")
STSL_INIT_MODES = ("stochastic", "inversion")
STEP_SCHEDULES = ("constant", "sigma", "sigma2")
_FIRST_ORDER_NFE = ("sampling steps, as the DPS/PSLD papers count (one network forward + backward each; "
                    "placement='before' adds a second forward per step)")


# ================================================================================ cost accounting
@dataclass
class Cost:
    """What a posterior-sampling run spent.

    * ``network_forward`` / ``network_backward``: denoiser network evaluations and vector-Jacobian
      products through it (one per batched call, whatever the batch size; a classifier-free-guidance
      pair inside the denoiser counts once).
    * ``decoder_*`` / ``encoder_*``: the same for the autoencoder (latent methods). With decoder
      gradient checkpointing each decoder backward also recomputes one decoder forward, which is
      not added to ``decoder_forward``.
    * ``nfe``: network function evaluations *as the method's paper counts them*; ``nfe_convention``
      says how (DPS/PSLD: one per sampling step; STSL: one per inner gradient step, the count behind
      the paper's "250 NFE" for 50 DDIM steps x 5 inner steps, although each inner step runs two
      network forwards). DDIM-inversion evaluations of the initialisation are included.
    * ``wall_time_s``: wall clock of the sampling loop, initialisation and final decode (CUDA synchronised
      at both ends; argument checks excluded).
    * ``peak_memory_bytes`` / ``memory_measure``: on CUDA, ``torch.cuda.max_memory_allocated``
      during the run (the peak counter is reset at the start); on CPU, the process's peak resident
      set size (``getrusage(...).ru_maxrss``) at the end of the run -- a high-water mark since the
      process started, not the run's own peak; ``None`` where neither is available.
    """

    network_forward: int = 0
    network_backward: int = 0
    decoder_forward: int = 0
    decoder_backward: int = 0
    encoder_forward: int = 0
    encoder_backward: int = 0
    nfe: int = 0
    nfe_convention: str = ""
    wall_time_s: float = 0.0
    peak_memory_bytes: int | None = None
    memory_measure: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PosteriorResult:
    """``samples``: final states in the model's space (latents for latent methods), compute dtype
    cast back to the input's; ``images``: the decoded samples (``samples`` itself for pixel methods);
    ``cost``: the :class:`Cost` of the run."""

    samples: Tensor
    images: Tensor
    cost: Cost
    info: dict[str, Any] = field(default_factory=dict)


class _CountBackward(torch.autograd.Function):
    """Identity whose backward increments ``cost.<field>``: placed on a network's input, it runs
    once per backward pass through that call (autograd sums every path before calling it)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, cost: Cost, name: str) -> Tensor:  # type: ignore[override]
        ctx.cost, ctx.name = cost, name
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        setattr(ctx.cost, ctx.name, getattr(ctx.cost, ctx.name) + 1)
        return g, None, None


class CostTracker:
    """Wraps a denoiser and an optional autoencoder, counting forward and backward passes into a
    :class:`Cost`."""

    def __init__(self, denoiser: Any, autoencoder: Any | None = None, cost: Cost | None = None) -> None:
        self.denoiser = denoiser
        self.autoencoder = autoencoder
        self.cost = cost if cost is not None else Cost()

    def _mark(self, x: Tensor, name: str) -> Tensor:
        return _CountBackward.apply(x, self.cost, name) if x.requires_grad else x

    def denoise(self, x: Tensor, t: Tensor | float) -> Prediction:
        self.cost.network_forward += 1
        p = self.denoiser(self._mark(x, "network_backward"), t)
        return Prediction(eps=p.eps.to(x.dtype), x0=p.x0.to(x.dtype))

    def decode(self, z: Tensor) -> Tensor:
        if self.autoencoder is None:
            return z
        self.cost.decoder_forward += 1
        return self.autoencoder.decode(self._mark(z, "decoder_backward"))

    def encode(self, x: Tensor, like: Tensor) -> Tensor:
        """Encode ``x``; the result is cast to ``like``'s dtype (pixel methods: identity)."""
        if self.autoencoder is None:
            return x
        self.cost.encoder_forward += 1
        return self.autoencoder.encode(self._mark(x, "encoder_backward")).to(like.dtype)


@contextmanager
def _measure(cost: Cost, device: torch.device):
    cuda = device.type == "cuda" and torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    try:
        yield
    finally:
        if cuda:
            torch.cuda.synchronize(device)
            cost.peak_memory_bytes = int(torch.cuda.max_memory_allocated(device))
            cost.memory_measure = "cuda_max_memory_allocated"
        else:
            try:
                import resource

                rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                cost.peak_memory_bytes = int(rss if sys.platform == "darwin" else rss * 1024)
                cost.memory_measure = "process_max_rss"
            except ImportError:  # pragma: no cover - non-POSIX
                cost.peak_memory_bytes, cost.memory_measure = None, "unavailable"
        cost.wall_time_s = time.perf_counter() - t0


# ================================================================================ input checks
def _choice(value: Any, choices: Sequence[str], what: str) -> str:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(map(repr, choices))}")
    return value


def _operator_output_shape(operator: Any, shape: tuple[int, ...], dtype: torch.dtype,
                           device: torch.device) -> tuple[int, ...]:
    if hasattr(operator, "output_shape"):
        try:
            return tuple(operator.output_shape(shape))
        except ValueError as exc:
            raise ValueError(f"the operator cannot take images of shape {list(shape)}: {exc}") from exc
    with torch.no_grad():
        probe = torch.zeros((1,) + tuple(shape[1:]), dtype=dtype, device=device)
        try:
            out = operator(probe)
        except Exception as exc:  # noqa: BLE001 - any failure means the shapes do not fit
            raise ValueError(f"the operator cannot take images of shape {list(shape)}: {exc}") from exc
    return (shape[0],) + tuple(out.shape[1:])


def prepare_measurement(operator: Any, y: Tensor, data_shape: Sequence[int], dtype: torch.dtype,
                        device: torch.device) -> Tensor:
    """Check ``y`` against the operator's output for data of ``data_shape`` and return it with the
    batch expanded, in ``dtype`` on ``device``. Raises ``ValueError`` on NaN/Inf or a shape mismatch."""
    if not isinstance(y, Tensor):
        raise TypeError(f"the measurement must be a torch.Tensor, got {type(y).__name__}")
    if not torch.is_floating_point(y):
        raise ValueError(f"the measurement must be a floating-point tensor, got {y.dtype}")
    if not bool(torch.isfinite(y).all()):
        raise ValueError("the measurement contains NaN or Inf")
    shape = tuple(int(s) for s in data_shape)
    expected = _operator_output_shape(operator, shape, dtype, device)
    if tuple(y.shape) != expected:
        if y.ndim == len(expected) and y.shape[0] == 1 and tuple(y.shape[1:]) == expected[1:]:
            y = y.expand(expected)
        else:
            raise ValueError(
                f"measurement shape {list(y.shape)} does not match the operator's output {list(expected)} "
                f"for data of shape {list(shape)} (the batch may also be 1)"
            )
    return y.to(device=device, dtype=dtype)


def _data_shape(tracker: CostTracker, z: Tensor) -> tuple[int, ...]:
    ae = tracker.autoencoder
    if ae is None:
        return tuple(z.shape)
    if hasattr(ae, "data_shape"):
        return tuple(ae.data_shape(tuple(z.shape)))
    if hasattr(ae, "data_dim"):
        return (z.shape[0], int(ae.data_dim))
    with torch.no_grad():
        return (z.shape[0],) + tuple(tracker.decode(z[:1]).shape[1:])


def _require_autoencoder(autoencoder: Any, method: str, needs_encode: bool) -> None:
    if autoencoder is None:
        raise ValueError(f"{method} is a latent-space method and needs an autoencoder (decode/encode, e.g. a "
                         "diffusers VAE); for a pixel-space model use dps, or stsl without an autoencoder")
    if not callable(getattr(autoencoder, "decode", None)):
        raise ValueError(f"{method}: the autoencoder has no decode(z) method")
    if needs_encode and not callable(getattr(autoencoder, "encode", None)):
        raise ValueError(f"{method}: the autoencoder has no encode(x) method")


def _start(x: Tensor, grid: TimeGrid) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    _check_inputs(x, grid)
    return x.detach().to(compute_dtype(x.dtype))


def _check_nonneg(**kw: float) -> None:
    for k, v in kw.items():
        if not (isinstance(v, int | float) and math.isfinite(v) and v >= 0):
            raise ValueError(f"{k} must be a finite nonnegative number, got {v!r}")


# ================================================================================ shared pieces
def _grad(loss: Tensor, x: Tensor) -> Tensor:
    """``d loss / d x``; zero where ``loss`` does not depend on ``x``."""
    if not loss.requires_grad:
        return torch.zeros_like(x)
    (g,) = torch.autograd.grad(loss, x, allow_unused=True)
    return torch.zeros_like(x) if g is None else g


def _norm(r: Tensor) -> Tensor:
    """Per-sample Euclidean norm, ``[B]`` (gradient 0 at 0)."""
    return torch.linalg.vector_norm(r.reshape(r.shape[0], -1), dim=1)


def _sqnorm(r: Tensor) -> Tensor:
    return r.reshape(r.shape[0], -1).pow(2).sum(1)


def _clipped(pred: Prediction, x: Tensor, alpha: float, sigma: float, clip: float | None) -> tuple[Tensor, Tensor]:
    """``(x0, eps)``; with ``clip``, ``x0`` is clamped to ``[-clip, clip]`` and ``eps`` recomputed from it
    (as guided-diffusion's ``clip_denoised`` / diffusers' ``clip_sample`` do)."""
    if clip is None:
        return pred.x0, pred.eps
    x0 = pred.x0.clamp(-clip, clip)
    return x0, (x - alpha * x0) / sigma


def _gluing(tracker: CostTracker, operator: Any, x: Tensor, z0: Tensor, y_back: Tensor, mode: str) -> Tensor:
    """PSLD's gluing residual ``E(Aᵀy + (I - AᵀA) x) - z0`` (``mode="adjoint"``, true adjoint) or with the
    orthogonal projector ``E(A⁺y + (I - A⁺A) x) - z0`` (``mode="pinv"``); ``y_back`` is ``Aᵀy`` / ``A⁺y``."""
    back = operator.adjoint(operator(x)) if mode == "adjoint" else operator.pinv(operator(x))
    return tracker.encode(y_back + x - back, z0) - z0


def _back_project(operator: Any, y: Tensor, mode: str) -> Tensor:
    if mode == "adjoint":
        return operator.adjoint(y)
    if not callable(getattr(operator, "pinv", None)):
        raise ValueError(f"the operator {type(operator).__name__} has no pinv(y); use the adjoint instead")
    return operator.pinv(y)


def _step_factor(schedule: StepSchedule, i: int, n: int, alpha: float, sigma: float, sigma0: float) -> float:
    if callable(schedule):
        return float(schedule(i, n, alpha, sigma))
    if schedule == "constant":
        return 1.0
    if schedule == "sigma":
        return sigma / sigma0
    return (sigma / sigma0) ** 2  # "sigma2"


def _finish(tracker: CostTracker, z: Tensor, x_in: Tensor, info: dict[str, Any] | None = None) -> PosteriorResult:
    z = z.detach()
    with torch.no_grad():
        images = tracker.decode(z) if tracker.autoencoder is not None else z
    return PosteriorResult(samples=z.to(x_in.dtype), images=images.detach(), cost=tracker.cost, info=info or {})


# ================================================================================ DPS family
def _run_first_order(
    tracker: CostTracker,
    loss_fn: Callable[[Tensor, Tensor, int], Tensor],
    x: Tensor,
    x_in: Tensor,
    grid: TimeGrid,
    *,
    ddim_eta: float,
    clip_x0: float | None,
    placement: str,
    generator: GeneratorArg,
    callback: Callback | None,
    progress: bool,
    name: str,
) -> PosteriorResult:
    """The run shared by DPS, latent DPS and PSLD: the loop below, timed and measured, then the result
    with NFE counted as those papers count it (one per step).

    ``placement="after"`` (DPS Alg. 1 / PSLD Alg. 2, the released code): one network call at ``x_i``,
    the DDIM/DDPM step ``x'_{i-1}`` from it, then ``x_{i-1} = x'_{i-1} - grad_{x_i} loss(x0_hat(x_i))``.
    ``placement="before"``: ``x_i <- x_i - grad loss`` first, then a DDIM step from the moved point
    (a second network call) -- the first-order form of STSL's update.
    ``loss_fn(x0_hat, x_i, i)`` returns the per-sample objective, step size included.
    """
    with _measure(tracker.cost, x.device):
        x = _first_order_loop(tracker, loss_fn, x, grid, ddim_eta=ddim_eta, clip_x0=clip_x0, placement=placement,
                              generator=generator, callback=callback, progress=progress, name=name)
        result = _finish(tracker, x, x_in)
    tracker.cost.nfe = grid.num_steps
    tracker.cost.nfe_convention = _FIRST_ORDER_NFE
    return result


def _first_order_loop(
    tracker: CostTracker,
    loss_fn: Callable[[Tensor, Tensor, int], Tensor],
    x: Tensor,
    grid: TimeGrid,
    *,
    ddim_eta: float,
    clip_x0: float | None,
    placement: str,
    generator: GeneratorArg,
    callback: Callback | None,
    progress: bool,
    name: str,
) -> Tensor:
    """The sampling loop of :func:`_run_first_order` (returns the final state)."""
    n = grid.num_steps
    for i in _progress(n, progress, name):
        t = grid.t[i]
        a, s = float(grid.alpha[i]), float(grid.sigma[i])
        an, sn = float(grid.alpha[i + 1]), float(grid.sigma[i + 1])
        x = x.detach().requires_grad_(True)
        pred = tracker.denoise(x, t)
        x0, eps = _clipped(pred, x, a, s, clip_x0)
        if placement == "after":
            # x'_{i-1}: DDPM ancestral step (DPS eq. 10 / Alg. 1 line 6) or DDIM step (PSLD Alg. 2)
            x_next = ddim_step(x0.detach(), eps.detach(), a, s, an, sn, eta=ddim_eta, generator=generator)
            # x_{i-1} = x'_{i-1} - grad_{x_i} loss (DPS Alg. 1 line 7; PSLD Alg. 2 lines 8-10)
            x = x_next - _grad(loss_fn(x0, x, i).sum(), x)
        else:
            x = (x - _grad(loss_fn(x0, x, i).sum(), x)).detach()
            with torch.no_grad():
                pred = tracker.denoise(x, t)
                x0, eps = _clipped(pred, x, a, s, clip_x0)
                x = ddim_step(x0, eps, a, s, an, sn, eta=ddim_eta, generator=generator)
        x = x.detach()
        if callback is not None:
            callback(i, t, x, pred)
    return x


def _dps_term(r: Tensor, zeta: float, norm: str) -> Tensor:
    """DPS's data objective whose gradient is the step: ``code``: ``zeta |r|`` (released code,
    ``norm_grad * scale``); ``paper``: ``(zeta / |r|) |r|^2`` with ``|r|`` held constant, i.e. the paper's
    ``zeta_i = zeta' / |y - A(x0_hat)|`` times the gradient of the squared norm (Alg. 1, = 2x ``code``);
    ``squared``: ``zeta |r|^2``."""
    if norm == "code":
        return zeta * _norm(r)
    sq = _sqnorm(r)
    if norm == "squared":
        return zeta * sq
    nd = sq.detach().sqrt()
    return zeta * torch.where(nd > 0, sq / nd.clamp_min(torch.finfo(nd.dtype).tiny), torch.zeros_like(sq))


def sample_dps(
    denoiser: Any,
    operator: Any,
    y: Tensor,
    x: Tensor,
    grid: TimeGrid,
    *,
    zeta: float = 0.3,
    norm: str = "code",
    ddim_eta: float = 1.0,
    clip_x0: float | None = None,
    placement: str = "after",
    generator: GeneratorArg = None,
    callback: Callback | None = None,
    progress: bool = False,
) -> PosteriorResult:
    """Diffusion posterior sampling (Chung et al., ICLR 2023), pixel space.

    Per step ``i`` (Alg. 1): ``x0_hat = x0(x_i)``; ``x'_{i-1}`` = ancestral step (``ddim_eta=1`` on the
    training grid is DDPM with the posterior variance ``beta_tilde``, the paper's 1000-step loop;
    ``ddim_eta=0`` a DDIM step); ``x_{i-1} = x'_{i-1} - grad_{x_i} zeta * data(y - A x0_hat)``.

    zeta: 0.3 is the published value for super-resolution and blur, 0.5 for inpainting (1000 steps,
      images in [-1, 1]).
    norm: ``"code"`` (released code: gradient of the unsquared norm), ``"paper"`` (Alg. 1: ``zeta/|r|``
      times the gradient of ``|r|^2``, twice ``code``) or ``"squared"``; see :func:`_dps_term`.
    clip_x0: clamp ``x0_hat`` to ``[-c, c]`` for the step and the loss, as the released code does with
      ``c = 1``; ``None`` (default) disables it -- it must stay off for priors not inside ``[-1, 1]``.
    placement: ``"after"`` (DPS) or ``"before"`` (gradient step first, then a DDIM step; 2 NFE/step).
    """
    _choice(norm, DPS_NORMS, "DPS norm")
    _choice(placement, PLACEMENTS, "placement")
    _check_nonneg(zeta=zeta, ddim_eta=ddim_eta)
    if clip_x0 is not None and not clip_x0 > 0:
        raise ValueError(f"clip_x0 must be positive or None, got {clip_x0}")
    x_in = x
    x = _start(x, grid)
    tracker = CostTracker(denoiser)
    yb = prepare_measurement(operator, y, x.shape, x.dtype, x.device)

    def loss(x0: Tensor, xt: Tensor, i: int) -> Tensor:
        return _dps_term(yb - operator(x0), zeta, norm)

    return _run_first_order(tracker, loss, x, x_in, grid, ddim_eta=ddim_eta, clip_x0=clip_x0, placement=placement,
                            generator=generator, callback=callback, progress=progress, name="dps")


def sample_latent_dps(
    denoiser: Any,
    operator: Any,
    y: Tensor,
    z: Tensor,
    grid: TimeGrid,
    autoencoder: Any,
    *,
    zeta: float = 1.0,
    norm: str = "code",
    ddim_eta: float = 0.0,
    placement: str = "after",
    generator: GeneratorArg = None,
    callback: Callback | None = None,
    progress: bool = False,
) -> PosteriorResult:
    """Latent DPS: DPS through the decoder on a DDIM loop (the PSLD paper's LDPS baseline = PSLD with
    ``gamma = 0``, ``omega = zeta``):
    ``z_{i-1} = DDIM(z_i) - grad_{z_i} zeta * data(y - A D(z0_hat(z_i)))``.

    With ``placement="before"``, ``norm="squared"`` and ``zeta = lam`` this is STSL with ``eta = 0`` and
    one inner step (:func:`sample_stsl`).
    """
    _require_autoencoder(autoencoder, "latent_dps", needs_encode=False)
    _choice(norm, DPS_NORMS, "DPS norm")
    _choice(placement, PLACEMENTS, "placement")
    _check_nonneg(zeta=zeta, ddim_eta=ddim_eta)
    z_in = z
    z = _start(z, grid)
    tracker = CostTracker(denoiser, autoencoder)
    yb = prepare_measurement(operator, y, _data_shape(tracker, z), z.dtype, z.device)

    def loss(z0: Tensor, zt: Tensor, i: int) -> Tensor:
        return _dps_term(yb - operator(tracker.decode(z0)), zeta, norm)

    return _run_first_order(tracker, loss, z, z_in, grid, ddim_eta=ddim_eta, clip_x0=None, placement=placement,
                            generator=generator, callback=callback, progress=progress, name="latent-dps")


def sample_psld(
    denoiser: Any,
    operator: Any,
    y: Tensor,
    z: Tensor,
    grid: TimeGrid,
    autoencoder: Any,
    *,
    gamma: float = 0.1,
    omega: float = 1.0,
    gluing: str = "adjoint",
    ddim_eta: float = 0.0,
    measurement_noise: float = 0.0,
    generator: GeneratorArg = None,
    callback: Callback | None = None,
    progress: bool = False,
) -> PosteriorResult:
    """PSLD (Rout et al., NeurIPS 2023; released ``psld.py::p_sample_ddim``), latent space.

    Per step: ``z0_hat = z0(z_i)``, ``z'_{i-1} = DDIM(z_i)``, ``x = D(z0_hat)``, then (Alg. 2 / eq. 8)
    ``z_{i-1} = z'_{i-1} - grad_{z_i}[ omega |A x - y| + gamma |E(Aᵀy + (I - AᵀA) x) - z0_hat| ]``
    with both norms unsquared.

    gamma, omega: published defaults 0.1 and 1 (box inpainting: 0.01 and 0.1), 1000 DDIM steps.
    gluing: ``"adjoint"`` uses the operator's true adjoint in the gluing term (the paper's formula;
      the released operators use the identity as the blur "transpose"); ``"pinv"`` uses the
      orthogonal projector ``A⁺A`` instead.
    measurement_noise: the released code passes ``A x`` through its noiser (adds fresh Gaussian noise
      of this standard deviation, from ``generator``) before the norm; 0 (default) follows the paper.
    """
    _require_autoencoder(autoencoder, "psld", needs_encode=True)
    _choice(gluing, GLUING_MODES, "gluing")
    _check_nonneg(gamma=gamma, omega=omega, ddim_eta=ddim_eta, measurement_noise=measurement_noise)
    z_in = z
    z = _start(z, grid)
    tracker = CostTracker(denoiser, autoencoder)
    yb = prepare_measurement(operator, y, _data_shape(tracker, z), z.dtype, z.device)
    y_back = _back_project(operator, yb, gluing)

    def loss(z0: Tensor, zt: Tensor, i: int) -> Tensor:
        x = tracker.decode(z0)
        ax = operator(x)
        if measurement_noise > 0:
            ax = ax + measurement_noise * randn_like(ax, generator)
        out = omega * _norm(ax - yb)
        if gamma > 0:
            out = out + gamma * _norm(_gluing(tracker, operator, x, z0, y_back, gluing))
        return out

    return _run_first_order(tracker, loss, z, z_in, grid, ddim_eta=ddim_eta, clip_x0=None, placement="after",
                            generator=generator, callback=callback, progress=progress, name="psld")


# ================================================================================ STSL
def hutchinson_trace_fd(
    denoise: Callable[[Tensor, Tensor | float], Prediction],
    z: Tensor,
    t: Tensor | float,
    sigma: float,
    *,
    num_probes: int = 1,
    probe_scale: float = 1.0,
    generator: GeneratorArg = None,
    pred: Prediction | None = None,
) -> Tensor:
    """STSL's finite-difference Hutchinson estimate of ``tr(grad^2 log p_t)(z)``, per sample ``[B]``:
    the mean over ``num_probes`` probes ``e ~ N(0, I)`` of ``(1/c) eᵀ(s(z + c e) - s(z))`` with
    ``s = -eps_hat / sigma_t`` and ``c = probe_scale``.

    ``c = 1`` is the paper's estimator (unit-variance probe, no step size); its expectation is the
    trace of the Hessian of ``log p_t`` smoothed by ``N(0, I)``, and its gradient's expectation is
    ``E_e[grad tr(grad^2 log p_t)(z + e)]`` (Stein's lemma). As ``c -> 0`` both tend to the exact
    trace and its gradient, with an ``O(c^2)`` bias. Differentiable in ``z``; ``pred`` (the
    denoiser's answer at ``z``) saves one evaluation.
    """
    if num_probes < 1:
        raise ValueError(f"num_probes must be >= 1, got {num_probes}")
    if not probe_scale > 0:
        raise ValueError(f"probe_scale must be positive, got {probe_scale}")
    if pred is None:
        pred = denoise(z, t)
    s_z = -pred.eps / sigma
    total = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
    for _ in range(num_probes):
        e = randn_like(z, generator)
        s_ze = -denoise(z + probe_scale * e, t).eps / sigma
        total = total + (e * (s_ze - s_z)).reshape(z.shape[0], -1).sum(1) / probe_scale
    return total / num_probes


def _ddim_inversion(tracker: CostTracker, z0: Tensor, grid: TimeGrid) -> Tensor:
    """Deterministic DDIM inversion of a clean ``z0`` up to grid point 0 (diffusers'
    ``DDIMInverseScheduler``: the network is evaluated at the *target* time with the current point,
    ``x0_hat`` uses the current level, which starts at ``alpha = 1, sigma = 0``)."""
    n = grid.num_steps
    z = z0
    a_cur, s_cur = float(grid.alpha[n]), float(grid.sigma[n])
    with torch.no_grad():
        for j in range(n - 1, -1, -1):
            aj, sj = float(grid.alpha[j]), float(grid.sigma[j])
            eps = tracker.denoise(z, grid.t[j]).eps
            x0 = (z - s_cur * eps) / a_cur
            z = aj * x0 + sj * eps
            a_cur, s_cur = aj, sj
    return z


def sample_stsl(
    denoiser: Any,
    operator: Any,
    y: Tensor,
    x: Tensor,
    grid: TimeGrid,
    autoencoder: Any | None = None,
    *,
    lam: float,
    eta: float = 0.02,
    inner_steps: int = 5,
    num_probes: int = 1,
    probe_scale: float = 1.0,
    gamma: float = 0.0,
    gluing: str = "adjoint",
    data_norm: str = "squared",
    step_schedule: StepSchedule = "constant",
    init: str = "adjoint",
    init_mode: str = "stochastic",
    ddim_eta: float = 0.0,
    generator: GeneratorArg = None,
    callback: Callback | None = None,
    progress: bool = False,
) -> PosteriorResult:
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

    Pixel space when ``autoencoder`` is None (``D`` = identity), latent space otherwise.

    lam: data weight, step size folded in; the paper gives only "O(1/sigma_y^2)" (no published value;
      TMPD's GMM runs used 0.05).
    eta: trace weight; 0.02 is the paper's best (ablation) and TMPD's value.
    inner_steps: ``K``; 5 in the paper (ablation: 1, 2), 3 in TMPD's GMM runs.
    probe_scale: ``c``; 1 is the paper's unit-variance probe.
    gamma, gluing: PSLD's gluing term (off by default, as in the paper's reported loss).
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
    _choice(data_norm, DATA_NORMS, "data_norm")
    _choice(gluing, GLUING_MODES, "gluing")
    _choice(init, STSL_INITS, "init")
    _choice(init_mode, STSL_INIT_MODES, "init_mode")
    if not callable(step_schedule):
        _choice(step_schedule, STEP_SCHEDULES, "step_schedule")
    _check_nonneg(lam=lam, eta=eta, gamma=gamma, ddim_eta=ddim_eta)
    if not (isinstance(inner_steps, int) and inner_steps >= 1):
        raise ValueError(f"inner_steps must be a positive integer, got {inner_steps!r}")
    if not (isinstance(num_probes, int) and num_probes >= 1):
        raise ValueError(f"num_probes must be a positive integer, got {num_probes!r}")
    if not probe_scale > 0:
        raise ValueError(f"probe_scale must be positive, got {probe_scale}")
    if init == "noise" and init_mode == "inversion":
        raise ValueError("init='noise' has nothing to invert; use init_mode='stochastic' (or init='adjoint'/'pinv')")
    if autoencoder is not None:
        _require_autoencoder(autoencoder, "stsl", needs_encode=init != "noise" or gamma > 0)
    x_in = x
    z = _start(x, grid)
    tracker = CostTracker(denoiser, autoencoder)
    yb = prepare_measurement(operator, y, _data_shape(tracker, z), z.dtype, z.device)
    d = z[0].numel()
    n = grid.num_steps
    sigma0 = float(grid.sigma[0])
    y_back = _back_project(operator, yb, gluing) if gamma > 0 else None

    with _measure(tracker.cost, z.device):
        # initialisation: E(Aᵀy) or E(A⁺y) pushed to the first noise level
        if init != "noise":
            with torch.no_grad():
                z_clean = tracker.encode(_back_project(operator, yb, "adjoint" if init == "adjoint" else "pinv"), z)
                if tuple(z_clean.shape) != tuple(z.shape):
                    raise ValueError(f"the encoded initialisation has shape {list(z_clean.shape)}, "
                                     f"x has {list(z.shape)}")
                if init_mode == "stochastic":
                    z = float(grid.alpha[0]) * z_clean + z
                else:
                    z = _ddim_inversion(tracker, z_clean, grid)
        inversion_nfe = tracker.cost.network_forward

        for i in _progress(n, progress, "stsl"):
            t = grid.t[i]
            a, s = float(grid.alpha[i]), float(grid.sigma[i])
            an, sn = float(grid.alpha[i + 1]), float(grid.sigma[i + 1])
            f = _step_factor(step_schedule, i, n, a, s, sigma0)
            for _ in range(inner_steps):
                z = z.detach().requires_grad_(True)
                pred = tracker.denoise(z, t)
                x = tracker.decode(pred.x0)
                r = yb - operator(x)
                loss = lam * (_sqnorm(r) if data_norm == "squared" else _norm(r))
                if eta > 0:  # (eta/d) eᵀ(s(z+e) - s(z)): one-probe Hutchinson trace of grad^2 log p_t
                    loss = loss + (eta / d) * hutchinson_trace_fd(
                        tracker.denoise, z, t, s, num_probes=num_probes, probe_scale=probe_scale,
                        generator=generator, pred=pred)
                if gamma > 0:
                    loss = loss + gamma * _norm(_gluing(tracker, operator, x, pred.x0, y_back, gluing))
                z = (z - f * _grad(loss.sum(), z)).detach()
            with torch.no_grad():  # the DDIM step from the moved point (a fresh network call)
                pred = tracker.denoise(z, t)
                z = ddim_step(pred.x0, pred.eps, a, s, an, sn, eta=ddim_eta, generator=generator)
            if callback is not None:
                callback(i, t, z, pred)
        result = _finish(tracker, z, x_in, {"inversion_nfe": inversion_nfe})
    tracker.cost.nfe = n * inner_steps + inversion_nfe
    tracker.cost.nfe_convention = ("inner gradient steps x DDIM steps, as the STSL paper counts (each inner step "
                                   f"runs {1 + (num_probes if eta > 0 else 0)} network forwards; each DDIM step "
                                   "one more), plus DDIM-inversion evaluations")
    return result


# ================================================================================ registry
#: name -> sampler; latent methods take ``autoencoder`` as their sixth argument
POSTERIOR_SAMPLERS: dict[str, Callable[..., PosteriorResult]] = {
    "dps": sample_dps,
    "latent_dps": sample_latent_dps,
    "psld": sample_psld,
    "stsl": sample_stsl,
}
#: methods that need an autoencoder
LATENT_METHODS = ("latent_dps", "psld")


def get_posterior_sampler(name: str) -> Callable[..., PosteriorResult]:
    try:
        return POSTERIOR_SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown posterior sampler {name!r}; available: {', '.join(POSTERIOR_SAMPLERS)}") from None
