"""diffusers drop-in schedulers with the published LML correction.

Three subclasses of diffusers' own schedulers; the correction math lives in
:func:`hessdiff.samplers.lml.lm_correct` and nothing of diffusers' solver code is copied:

* :class:`LMLDDIMScheduler` (``DDIMScheduler``): the noise estimate of the direction term is
  corrected, ``x_prev = sqrt(abar_prev) x0_hat + c eps' (+ noise)``; the stock ``step`` runs
  unchanged and ``c (eps' - eps)`` is added to its result, with
  ``c = sqrt(1 - abar_prev - std^2)`` (``x0_hat`` stays uncorrected, as in the released code).
* :class:`LMLDPMSolverMultistepScheduler` (``DPMSolverMultistepScheduler``, ``algorithm_type``
  ``"dpmsolver"`` or ``"dpmsolver++"``, orders 1--3): the stock update functions are called twice,
  once with zero model outputs (giving the exact ``(sigma_t/sigma_s) x`` or ``(alpha_t/alpha_s) x``
  part) and once with a zero sample (giving the exact increment); the result is
  ``base + LML(increment)``, the released arithmetic.
* :class:`LMLFlowMatchEulerDiscreteScheduler` (``FlowMatchEulerDiscreteScheduler``): the velocity
  is corrected before the stock ``step``, ``x_next = x + dt LML(v)``.

Each adds three config entries, registered through diffusers' ``register_to_config`` so that
``LMLDDIMScheduler.from_config(pipe.scheduler.config, lamb=1e-3)``, ``save_pretrained`` /
``from_pretrained`` and ``compatibles`` work as for the stock class:

* ``lamb`` (> 0): the damping ``lambda`` (default ``1e-3``, the published Stable Diffusion value);
* ``kappa`` (in ``[0, 1]``): the history weight (published: 0);
* ``precision``: ``"float32"`` (the published arithmetic) or ``"float64"`` (the exact operator);
* ``lml_variant``: ``"published"`` (default: the rank-one map above) or ``"secant"``: the zero-NFE
  second-order variant of :class:`~hessdiff.samplers.lml.HessianStepCorrection` (secant curvature of
  consecutive steps, local-Gaussian step, gain-ratio damping, radial direction left to the base
  solver; float64; deterministic steps only). Measured on the embedded MNIST DDPM it is close to the
  base solver (worse at NFE 5, slightly better PSNR to the converged solution at NFE 10; BENCHMARKS.md).
  ``lamb``/``kappa``/``precision`` only concern the published map.

The correction history is reset by ``set_timesteps`` (once per sampling run). The correction always
runs in float32 or float64, whatever the model's dtype (the released DDIM/DPM code computes in the
model's dtype, which in float16 destroys the sample; hessdiff upcasts).

What the published correction does (see :class:`~hessdiff.samplers.lml.LMLCorrection`): with
``kappa = 0`` it is the identity in exact arithmetic, and in float32 it adds rounding noise of
relative size about ``3.4e-8 |g|^2 / lamb`` per step.

Checked against diffusers 0.42.1 (the update-function signatures ``fn(model_output(s), *,
sample, noise)`` exist since diffusers 0.22).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.configuration_utils import register_to_config
from torch import Tensor

from ..denoiser import Prediction
from ..lml import PRECISIONS, HessianStepCorrection, LMLCorrection
from ..lml import check_lamb_kappa as _check_lamb_kappa
from ..loop import Proposal

__all__ = [
    "LMLDDIMScheduler",
    "LMLDPMSolverMultistepScheduler",
    "LMLFlowMatchEulerDiscreteScheduler",
    "LML_SCHEDULERS",
    "lml_scheduler_from",
    "LML_CONFIG_DEFAULTS",
    "LML_VARIANTS",
]

#: the config entries every LML scheduler adds to its base class's
LML_CONFIG_DEFAULTS: dict[str, Any] = {"lamb": 1e-3, "kappa": 0.0, "precision": "float32", "lml_variant": "published"}

#: ``lml_variant`` values: the published rank-one map, or the zero-NFE secant Gaussian step
LML_VARIANTS = ("published", "secant")


def _lml_init(base: type, defaults: dict[str, Any]) -> Callable[..., None]:
    """An ``__init__`` with the base class's signature plus ``defaults`` (keyword-only), decorated
    with ``register_to_config`` so the extra entries land in the config next to the base's."""
    raw = getattr(base.__init__, "__wrapped__", base.__init__)  # undecorated: register once, here
    sig = inspect.signature(raw)

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        extra = {k: kwargs.pop(k, v) for k, v in defaults.items()}
        raw(self, *args, **kwargs)
        self._lml_setup(**extra)

    params = [p for p in sig.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    var_kw = [p for p in sig.parameters.values() if p.kind == inspect.Parameter.VAR_KEYWORD]
    params += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v) for k, v in defaults.items()]
    __init__.__signature__ = sig.replace(parameters=params + var_kw)  # type: ignore[attr-defined]
    __init__.__doc__ = f"{base.__name__}'s arguments plus the LML entries {sorted(defaults)}."
    return register_to_config(__init__)


class _LMLMixin:
    """Shared state: one :class:`LMLCorrection` per scheduler, reset in ``set_timesteps``."""

    config: Any
    _lml: LMLCorrection

    def _lml_setup(self, lamb: float, kappa: float, precision: str, lml_variant: str = "published") -> None:
        _check_lamb_kappa(lamb, kappa)
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
        if lml_variant not in LML_VARIANTS:
            raise ValueError(f"unknown lml_variant {lml_variant!r}; expected one of {LML_VARIANTS}")
        self._lml = LMLCorrection(float(lamb), float(kappa), precision)
        # radial="exclude": on a trained network the Hessian-step variants that trust the Jacobian along x
        # destroy the samples (hessdiff bench lml --parts embedded); the drop-ins only ever run networks
        self._secant = HessianStepCorrection("secant", 1, adaptive=True, precision="float64", radial="exclude") \
            if lml_variant == "secant" else None

    def _secant_step(self, g: Tensor, scale: float, x: Tensor, x0: Tensor, eps: Tensor, alpha: float, sigma: float,
                     alpha_next: float, sigma_next: float) -> Tensor:
        """The secant Gaussian-step correction of the update ``g`` of the step ``base + scale * g``
        (``lml_variant="secant"``), in float64."""
        assert self._secant is not None
        i = int(getattr(self, "step_index", None) or 0)  # DDIMScheduler keeps no step index
        f64 = torch.float64
        prop = Proposal(i, len(self.timesteps), torch.tensor(float(i)), alpha, sigma, alpha_next, sigma_next,
                        x.to(f64), Prediction(eps=eps.to(f64), x0=x0.to(f64)), g=g.to(f64), scale=scale)
        return self._secant(prop)

    @property
    def lml_dtype(self) -> torch.dtype:
        """The dtype the correction runs in."""
        return torch.float64 if self._lml.precision == "float64" else torch.float32

    def _lml_apply(self, g: Tensor) -> Tensor:
        """The correction of ``g`` in :attr:`lml_dtype` (the result stays in that dtype)."""
        return self._lml(g.to(self.lml_dtype))

    def set_timesteps(self, *args: Any, **kwargs: Any) -> Any:
        out = super().set_timesteps(*args, **kwargs)  # type: ignore[misc]
        self._lml.reset()
        if self._secant is not None:
            self._secant.reset()
        return out


class LMLDDIMScheduler(_LMLMixin, DDIMScheduler):
    """``DDIMScheduler`` with the published LML correction of the noise estimate (see module doc).

    Works with every ``prediction_type`` DDIM supports (``epsilon``, ``sample``, ``v_prediction``),
    with ``eta > 0``, clipping and ``use_clipped_model_output`` (the corrected quantity is the
    ``pred_epsilon`` that diffusers' DDIM puts in the direction term).
    """

    __init__ = _lml_init(DDIMScheduler, LML_CONFIG_DEFAULTS)

    def _lml_setup(self, lamb: float, kappa: float, precision: str, lml_variant: str = "published") -> None:
        pt = self.config.prediction_type
        if pt not in ("epsilon", "sample", "v_prediction"):
            raise ValueError(f"LMLDDIMScheduler: unsupported prediction_type {pt!r}; DDIM supports "
                             "'epsilon', 'sample', 'v_prediction'")
        super()._lml_setup(lamb, kappa, precision, lml_variant)

    def step(
        self,
        model_output: Tensor,
        timestep: int | Tensor,
        sample: Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: torch.Generator | None = None,
        variance_noise: Tensor | None = None,
        return_dict: bool = True,
    ) -> Any:
        out = super().step(model_output, timestep, sample, eta=eta, use_clipped_model_output=use_clipped_model_output,
                           generator=generator, variance_noise=variance_noise, return_dict=True)
        dt = self.lml_dtype
        abar = self.alphas_cumprod[timestep].to(dt)
        beta = 1 - abar
        x0 = out.pred_original_sample
        pt = self.config.prediction_type
        if use_clipped_model_output:
            eps = (sample.to(dt) - abar**0.5 * x0.to(dt)) / beta**0.5
        elif pt == "epsilon":
            eps = model_output
        elif pt == "sample":
            eps = (sample.to(dt) - abar**0.5 * model_output.to(dt)) / beta**0.5
        else:  # v_prediction
            eps = abar**0.5 * model_output.to(dt) + beta**0.5 * sample.to(dt)
        prev_t = timestep - self.config.num_train_timesteps // self.num_inference_steps
        abar_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        std = eta * self._get_variance(timestep, prev_t) ** 0.5
        coef = (1 - torch.as_tensor(abar_prev, dtype=dt) - torch.as_tensor(std, dtype=dt) ** 2) ** 0.5
        eps = eps.to(dt)
        if self._secant is None:
            delta = coef * (self._lml_apply(eps) - eps)
        else:
            if eta > 0:
                raise ValueError("lml_variant='secant' needs deterministic DDIM (eta = 0)")
            a2 = float(abar)
            an2 = float(abar_prev)
            sn = max(1 - an2, 0.0) ** 0.5
            eps_c = self._secant_step(eps, sn, sample, x0, eps, a2**0.5, (1 - a2) ** 0.5, an2**0.5, sn)
            delta = coef * (eps_c.to(dt) - eps)
        prev = (out.prev_sample.to(dt) + delta).to(out.prev_sample.dtype)
        if not return_dict:
            return (prev, x0)
        out.prev_sample = prev
        return out


class LMLDPMSolverMultistepScheduler(_LMLMixin, DPMSolverMultistepScheduler):
    """``DPMSolverMultistepScheduler`` with the published LML correction of the solver increment.

    ``algorithm_type="dpmsolver"`` (noise prediction; the LML paper's CIFAR-10 base with
    ``solver_order=3``) and ``"dpmsolver++"``, orders 1--3, midpoint or heun; the SDE variants are
    not supported (the released code does not correct them).
    """

    __init__ = _lml_init(DPMSolverMultistepScheduler, LML_CONFIG_DEFAULTS)

    def _lml_setup(self, lamb: float, kappa: float, precision: str, lml_variant: str = "published") -> None:
        algo = self.config.algorithm_type
        if algo not in ("dpmsolver", "dpmsolver++"):
            raise ValueError(f"LMLDPMSolverMultistepScheduler: unsupported algorithm_type {algo!r}; the LML "
                             "correction is defined for 'dpmsolver' and 'dpmsolver++'")
        super()._lml_setup(lamb, kappa, precision, lml_variant)

    def _lml_split(self, fn: Callable[..., Tensor], outputs: Any, args: tuple, sample: Tensor | None,
                   noise: Tensor | None, kwargs: dict[str, Any]) -> Tensor:
        if sample is None and len(args) > 2:  # legacy positional (timestep, prev_timestep, sample)
            sample, args = args[2], args[:2]
        if sample is None:
            raise ValueError("missing `sample` as a required keyword argument")
        if isinstance(outputs, list | tuple):
            zeros = [None if m is None else torch.zeros_like(m) for m in outputs]
        else:
            zeros = torch.zeros_like(outputs)
        base = fn(zeros, *args, sample=sample, noise=noise, **dict(kwargs))
        inc = fn(outputs, *args, sample=torch.zeros_like(sample), noise=noise, **dict(kwargs))
        if self._secant is None:
            return (base.to(self.lml_dtype) + self._lml_apply(inc)).to(base.dtype)
        i = int(self.step_index)
        a_s, s_s = (float(v) for v in self._sigma_to_alpha_sigma_t(self.sigmas[i]))
        a_t, s_t = (float(v) for v in self._sigma_to_alpha_sigma_t(self.sigmas[i + 1]))
        m = self.model_outputs[-1].to(torch.float64)
        x = sample.to(torch.float64)
        if self.config.algorithm_type == "dpmsolver++":
            x0, eps = m, (x - a_s * m) / s_s
        else:
            x0, eps = (x - s_s * m) / a_s, m
        inc_c = self._secant_step(inc, 1.0, x, x0, eps, a_s, s_s, a_t, s_t)
        return (base.to(torch.float64) + inc_c).to(base.dtype)

    def dpm_solver_first_order_update(self, model_output: Tensor, *args: Any, sample: Tensor | None = None,
                                      noise: Tensor | None = None, **kwargs: Any) -> Tensor:
        return self._lml_split(super().dpm_solver_first_order_update, model_output, args, sample, noise, kwargs)

    def multistep_dpm_solver_second_order_update(self, model_output_list: list[Tensor], *args: Any,
                                                 sample: Tensor | None = None, noise: Tensor | None = None,
                                                 **kwargs: Any) -> Tensor:
        return self._lml_split(super().multistep_dpm_solver_second_order_update, model_output_list, args, sample,
                               noise, kwargs)

    def multistep_dpm_solver_third_order_update(self, model_output_list: list[Tensor], *args: Any,
                                                sample: Tensor | None = None, noise: Tensor | None = None,
                                                **kwargs: Any) -> Tensor:
        return self._lml_split(super().multistep_dpm_solver_third_order_update, model_output_list, args, sample,
                               noise, kwargs)


class LMLFlowMatchEulerDiscreteScheduler(_LMLMixin, FlowMatchEulerDiscreteScheduler):
    """``FlowMatchEulerDiscreteScheduler`` with the published LML correction of the velocity
    (the released FLUX setting used ``lamb = 1e-2``). The output keeps the model output's dtype,
    as the stock scheduler does."""

    __init__ = _lml_init(FlowMatchEulerDiscreteScheduler, LML_CONFIG_DEFAULTS)
    _compatibles = ["FlowMatchEulerDiscreteScheduler"]

    def step(self, model_output: Tensor, timestep: Any, sample: Tensor, *args: Any, return_dict: bool = True,
             **kwargs: Any) -> Any:
        if self._secant is None:
            corrected = self._lml_apply(model_output)
        else:
            if self.step_index is None:
                self._init_step_index(timestep)
            i = int(self.step_index)
            sig, sig_n = float(self.sigmas[i]), float(self.sigmas[i + 1])
            v = model_output.to(torch.float64)
            x = sample.to(torch.float64)
            corrected = self._secant_step(v, sig_n - sig, x, x - sig * v, x + (1 - sig) * v, 1 - sig, sig, 1 - sig_n,
                                          sig_n).to(torch.float32)
        out = super().step(corrected, timestep, sample, *args, return_dict=True, **kwargs)
        prev = out.prev_sample
        if kwargs.get("per_token_timesteps") is None:
            prev = prev.to(model_output.dtype)
        if not return_dict:
            return (prev,)
        out.prev_sample = prev
        return out


#: stock diffusers scheduler class name -> LML drop-in
LML_SCHEDULERS: dict[str, type] = {
    "DDIMScheduler": LMLDDIMScheduler,
    "DPMSolverMultistepScheduler": LMLDPMSolverMultistepScheduler,
    "FlowMatchEulerDiscreteScheduler": LMLFlowMatchEulerDiscreteScheduler,
}


def lml_scheduler_from(scheduler: Any, **lml_kwargs: Any) -> Any:
    """The LML drop-in for a stock scheduler (object or config), with ``lml_kwargs``
    (``lamb``, ``kappa``, ``precision``) added: ``pipe.scheduler = lml_scheduler_from(pipe.scheduler, lamb=1e-3)``.

    Raises ``ValueError`` for schedulers without an LML version.
    """
    cfg = scheduler.config if hasattr(scheduler, "config") else scheduler
    name = type(scheduler).__name__ if hasattr(scheduler, "config") else str(cfg.get("_class_name", ""))
    if not name:
        raise ValueError("this scheduler config has no _class_name; pass the scheduler object itself")
    for stock, lml_cls in LML_SCHEDULERS.items():
        if name == stock or name == lml_cls.__name__:
            return lml_cls.from_config(cfg, **lml_kwargs)
    raise ValueError(f"no LML version of scheduler {name!r}; supported: {', '.join(LML_SCHEDULERS)}")
