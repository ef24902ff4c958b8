"""What the posterior steps share: the measurement and its checks, norms, gradients, step-size
schedules and STSL's finite-difference Hutchinson trace."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..denoiser import Prediction
from ..loop import GeneratorArg, Run, randn_like

__all__ = ["prepare_measurement", "hutchinson_trace_fd", "StepSchedule"]

StepSchedule = str | Callable[[int, int, float, float], float]

DPS_NORMS = ("code", "paper", "squared")
DATA_NORMS = ("squared", "unsquared")
GLUING_MODES = ("adjoint", "pinv")
PLACEMENTS = ("after", "before")
STSL_INITS = ("adjoint", "pinv", "noise")
STSL_INIT_MODES = ("stochastic", "inversion")
STEP_SCHEDULES = ("constant", "sigma", "sigma2")


# ================================================================================ input checks
def _choice(value: Any, choices: Sequence[str], what: str) -> str:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(map(repr, choices))}")
    return value


def _check_nonneg(**kw: float) -> None:
    for k, v in kw.items():
        if not (isinstance(v, int | float) and math.isfinite(v) and v >= 0):
            raise ValueError(f"{k} must be a finite nonnegative number, got {v!r}")


class LikelihoodDenoiser:
    """What the covariance-aware denoiser transforms (MMPS, TMPD, ΠGDM) share: the prior ``denoiser``, the
    linear measurement ``y = A x + n`` (``operator``, ``y``, ``n ~ N(0, sigma_y^2 I)``), an optional
    ``autoencoder`` (latent space: the measurement is ``A(D(z0))``), ``clip_x0`` and the schedule; checks
    them and measures ``x0`` (:meth:`_measure`).

    ``clip_x0`` clamps a pixel-space ``x0_hat`` (the papers clamp the image to ``[-1, 1]``); with an
    ``autoencoder`` ``x0_hat`` is a latent, which has no such range, and the clamp is not applied."""

    def __init__(self, denoiser: Any, operator: Any, y: Any, sigma_y: float, *, autoencoder: Any | None = None,
                 clip_x0: float | None = None) -> None:
        _check_nonneg(sigma_y=sigma_y)
        if clip_x0 is not None and not clip_x0 > 0:
            raise ValueError(f"clip_x0 must be positive or None, got {clip_x0}")
        self.denoiser, self.operator, self.y = denoiser, operator, y
        self.sigma_y = float(sigma_y)
        self.autoencoder = autoencoder
        self.clip_x0 = clip_x0 if autoencoder is None else None  # an image range, not a latent one
        self.schedule = denoiser.schedule

    def _measure(self, x0: Any) -> Any:
        return self.operator(x0 if self.autoencoder is None else self.autoencoder.decode(x0))


def _require_autoencoder(autoencoder: Any, method: str, needs_encode: bool) -> None:
    if autoencoder is None:
        raise ValueError(f"{method} is a latent-space method and needs an autoencoder (decode/encode, e.g. a "
                         "diffusers VAE); for a pixel-space model use dps, or stsl without an autoencoder")
    if not callable(getattr(autoencoder, "decode", None)):
        raise ValueError(f"{method}: the autoencoder has no decode(z) method")
    if needs_encode and not callable(getattr(autoencoder, "encode", None)):
        raise ValueError(f"{method}: the autoencoder has no encode(x) method")


# ================================================================================ the measurement
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


def latent_data_shape(autoencoder: Any | None, z: Tensor, decode: Callable[[Tensor], Tensor] | None = None
                      ) -> tuple[int, ...]:
    """The data-space shape of the state ``z``: ``z``'s own without an autoencoder; otherwise the
    autoencoder's ``data_shape(latent_shape)`` / ``data_dim``, or the shape of one decode of ``z[:1]``
    (``decode``, e.g. a counted one; default the autoencoder's)."""
    if autoencoder is None:
        return tuple(z.shape)
    if hasattr(autoencoder, "data_shape"):
        return tuple(autoencoder.data_shape(tuple(z.shape)))
    if hasattr(autoencoder, "data_dim"):
        return (z.shape[0], int(autoencoder.data_dim))
    with torch.no_grad():
        return (z.shape[0],) + tuple((decode or autoencoder.decode)(z[:1]).shape[1:])


def _data_shape(run: Run, z: Tensor) -> tuple[int, ...]:
    """The data-space shape of the run's state ``z`` (:func:`latent_data_shape`, a counted decode)."""
    return latent_data_shape(run.autoencoder, z, run.decode)


def _measurement(run: Run, operator: Any, y: Tensor, z: Tensor) -> Tensor:
    """``y`` checked and expanded for the run's state ``z`` (see :func:`prepare_measurement`)."""
    return prepare_measurement(operator, y, _data_shape(run, z), z.dtype, z.device)


def _back_project(operator: Any, y: Tensor, mode: str) -> Tensor:
    """``Aᵀy`` (``mode="adjoint"``) or ``A⁺y`` (``"pinv"``)."""
    if mode == "adjoint":
        return operator.adjoint(y)
    if not callable(getattr(operator, "pinv", None)):
        raise ValueError(f"the operator {type(operator).__name__} has no pinv(y); use the adjoint instead")
    return operator.pinv(y)


# ================================================================================ norms and gradients
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


def _step_factor(schedule: StepSchedule, i: int, n: int, alpha: float, sigma: float, sigma0: float) -> float:
    """The factor of the whole gradient step at step ``i`` (``"constant"``, ``"sigma"``, ``"sigma2"`` or
    a callable ``f(i, n, alpha_i, sigma_i)``)."""
    if callable(schedule):
        return float(schedule(i, n, alpha, sigma))
    if schedule == "constant":
        return 1.0
    if schedule == "sigma":
        return sigma / sigma0
    return (sigma / sigma0) ** 2  # "sigma2"


# ================================================================================ STSL's trace term
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
