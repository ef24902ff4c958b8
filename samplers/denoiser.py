"""The denoiser contract ``denoiser(x_t, t) -> Prediction(eps, x0)`` and its adapters.

Inside hessdiff a model is any callable with a ``schedule`` attribute (a
:class:`~hessdiff.samplers.schedule.NoiseSchedule`) that maps a noisy batch ``x_t`` and model
time ``t`` (a scalar or one value per sample) to a :class:`Prediction` holding both the noise
``eps`` and the clean-data estimate ``x0``, related by ``x_t = alpha_t x0 + sigma_t eps``.
Samplers never look at the network's prediction type: the adapters here convert.

Dtype rule: networks may run in fp16/bf16; the adapters upcast the network output to the
*compute dtype* (float32, or float64 when ``x_t`` is float64) before any conversion, so that solver
and correction arithmetic never runs in half precision.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from .schedule import NoiseSchedule, schedule_from_config

__all__ = [
    "Prediction",
    "Denoiser",
    "PREDICTION_TYPES",
    "convert_prediction",
    "compute_dtype",
    "broadcast_time",
    "UNetDenoiser",
    "CallableDenoiser",
]

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow_prediction")


@dataclass
class Prediction:
    """A denoiser's answer at ``(x_t, t)``: the noise estimate and Tweedie's ``x0`` estimate."""

    eps: Tensor
    x0: Tensor


@runtime_checkable
class Denoiser(Protocol):
    """``denoiser(x_t, t) -> Prediction``; ``t`` is a model time, scalar or shape ``[B]``."""

    schedule: NoiseSchedule

    def __call__(self, x: Tensor, t: Tensor | float) -> Prediction: ...


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype solver arithmetic uses for data of ``dtype``: float64 stays, all else -> float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def broadcast_time(t: Tensor | float, x: Tensor) -> Tensor:
    """``t`` as a float64 vector of length ``x.shape[0]``; raises on a length mismatch."""
    t = torch.as_tensor(t, dtype=torch.float64)
    if t.ndim == 0:
        return t.expand(x.shape[0]).clone()
    t = t.flatten()
    if t.numel() == 1:
        return t.expand(x.shape[0]).clone()
    if t.numel() != x.shape[0]:
        raise ValueError(f"got {t.numel()} timesteps for a batch of {x.shape[0]}")
    return t


def _bshape(v: Tensor, x: Tensor) -> Tensor:
    return v.to(device=x.device, dtype=x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))


def convert_prediction(
    output: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor, prediction_type: str
) -> Prediction:
    """Turn a network output into ``Prediction(eps, x0)``.

    ``alpha``/``sigma`` are per-sample vectors (shape ``[B]``). ``epsilon``: output is ``eps``;
    ``sample``: output is ``x0``; ``v_prediction``: ``v = alpha eps - sigma x0`` (VP schedules);
    ``flow_prediction``: ``v = eps - x0`` (rectified flow, ``alpha = 1 - sigma``).
    Arithmetic runs in ``x``'s compute dtype.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
    dt = compute_dtype(x.dtype)
    x = x.to(dt)
    out = output.to(dt)
    if out.shape != x.shape:
        raise ValueError(f"model output shape {tuple(out.shape)} does not match input shape {tuple(x.shape)}")
    a, s = _bshape(alpha, x), _bshape(sigma, x)
    if prediction_type == "epsilon":
        eps = out
        x0 = (x - s * eps) / a
    elif prediction_type == "sample":
        x0 = out
        eps = (x - a * x0) / s
    elif prediction_type == "v_prediction":
        r = a * a + s * s  # = 1 on VP schedules; kept general
        x0 = (a * x - s * out) / r
        eps = (s * x + a * out) / r
    else:  # flow_prediction
        x0 = x - s * out
        eps = x + a * out
    return Prediction(eps=eps, x0=x0)


class CallableDenoiser:
    """Wrap ``fn(x_t, t) -> Tensor`` (a raw network) with a schedule and a prediction type."""

    def __init__(self, fn: Callable[[Tensor, Tensor], Tensor], schedule: NoiseSchedule,
                 prediction_type: str = "epsilon") -> None:
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
        self.fn, self.schedule, self.prediction_type = fn, schedule, prediction_type

    def __call__(self, x: Tensor, t: Tensor | float) -> Prediction:
        tt = broadcast_time(t, x)
        a, s = self.schedule.alpha_sigma(tt)
        return convert_prediction(self.fn(x, tt.to(x.device)), x, a, s, self.prediction_type)


class UNetDenoiser(nn.Module):
    """A diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` (or any model with the same call)
    behind the denoiser contract.

    Args:
        unet: the network; called as ``unet(x, t, **cond).sample`` (``t`` shape ``[B]``).
        schedule: its noise schedule (e.g. ``schedule_from_config(pipe.scheduler.config)``).
        prediction_type: ``epsilon``, ``sample``, ``v_prediction`` or ``flow_prediction``.
        encoder_hidden_states: conditioning for a ``UNet2DConditionModel`` (shape ``[1 or B, L, D]``).
        negative_encoder_hidden_states: the null / negative conditioning for classifier-free guidance.
        guidance_scale: CFG scale ``w``: ``out = uncond + w (cond - uncond)``; 1 disables CFG.
        added_cond_kwargs / cross_attention_kwargs: passed through to the UNet.

    The input is cast to the UNet's dtype for the forward pass only; the output is upcast to the
    compute dtype (float32, float64 for float64 inputs) before CFG and conversion.
    """

    def __init__(
        self,
        unet: nn.Module,
        schedule: NoiseSchedule,
        prediction_type: str = "epsilon",
        *,
        encoder_hidden_states: Tensor | None = None,
        negative_encoder_hidden_states: Tensor | None = None,
        guidance_scale: float = 1.0,
        added_cond_kwargs: dict[str, Tensor] | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
        if guidance_scale != 1.0 and (encoder_hidden_states is None or negative_encoder_hidden_states is None):
            raise ValueError("classifier-free guidance needs both encoder_hidden_states and "
                             "negative_encoder_hidden_states")
        self.unet = unet
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.encoder_hidden_states = encoder_hidden_states
        self.negative_encoder_hidden_states = negative_encoder_hidden_states
        self.guidance_scale = float(guidance_scale)
        self.added_cond_kwargs = added_cond_kwargs
        self.cross_attention_kwargs = cross_attention_kwargs

    @classmethod
    def from_pipeline(cls, pipe: Any, **kwargs: Any) -> UNetDenoiser:
        """Build from a diffusers pipeline's ``unet`` (or ``transformer``) and ``scheduler``."""
        net = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
        if net is None:
            raise ValueError(f"{type(pipe).__name__} has neither a unet nor a transformer")
        return cls.from_unet_and_scheduler(net, pipe.scheduler, **kwargs)

    @classmethod
    def from_unet_and_scheduler(cls, unet: nn.Module, scheduler: Any, **kwargs: Any) -> UNetDenoiser:
        cfg = scheduler.config if hasattr(scheduler, "config") else scheduler
        schedule = schedule_from_config(cfg)
        pt = kwargs.pop("prediction_type", None) or cfg.get("prediction_type", None)
        if pt is None:
            pt = "flow_prediction" if schedule.kind == "flow" else "epsilon"
        return cls(unet, schedule, pt, **kwargs)

    @property
    def model_dtype(self) -> torch.dtype:
        try:
            return next(self.unet.parameters()).dtype
        except StopIteration:
            return torch.float32

    def _net(self, x: Tensor, t: Tensor, ehs: Tensor | None) -> Tensor:
        kw: dict[str, Any] = {}
        if ehs is not None:
            kw["encoder_hidden_states"] = ehs.to(self.model_dtype)
        if self.added_cond_kwargs is not None:
            kw["added_cond_kwargs"] = self.added_cond_kwargs
        if self.cross_attention_kwargs is not None:
            kw["cross_attention_kwargs"] = self.cross_attention_kwargs
        out = self.unet(x.to(self.model_dtype), t, **kw)
        out = out.sample if hasattr(out, "sample") else (out[0] if isinstance(out, tuple) else out)
        if out.shape[1] == 2 * x.shape[1]:  # learned variance: keep the mean part
            out = out[:, : x.shape[1]]
        return out

    def forward(self, x: Tensor, t: Tensor | float) -> Prediction:  # noqa: D401
        if x.ndim < 2:
            raise ValueError(f"expected a batch [B, C, H, W], got shape {tuple(x.shape)}")
        tt = broadcast_time(t, x)
        a, s = self.schedule.alpha_sigma(tt)
        t_net = tt.to(device=x.device, dtype=torch.float32)
        dt = compute_dtype(x.dtype)
        B = x.shape[0]

        def expand(c: Tensor) -> Tensor:
            return c if c.shape[0] == B else c.expand(B, *c.shape[1:])

        if self.guidance_scale != 1.0:
            cond = expand(self.encoder_hidden_states)
            unc = expand(self.negative_encoder_hidden_states)
            out = self._net(torch.cat([x, x]), torch.cat([t_net, t_net]), torch.cat([unc, cond])).to(dt)
            o_unc, o_cond = out.chunk(2)
            out = o_unc + self.guidance_scale * (o_cond - o_unc)
        else:
            ehs = None if self.encoder_hidden_states is None else expand(self.encoder_hidden_states)
            out = self._net(x, t_net, ehs).to(dt)
        return convert_prediction(out, x, a, s, self.prediction_type)
