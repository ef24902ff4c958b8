"""The plain entry point for restoration, shared by ``hessdiff restore``, sweeps and Python users:
:func:`restore` runs a posterior sampler on a :class:`~hessdiff.samplers.models.DiffusionModel` with the
method's defaults from :mod:`hessdiff.samplers.defaults`; :func:`model_from_pipeline` wraps an in-memory
diffusers pipeline. (Sampling itself is :func:`hessdiff.samplers.loop.sample`.)
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .defaults import default_method, method_defaults, model_family

__all__ = ["RestoreResult", "restore", "model_from_pipeline", "default_method", "method_options", "check_method",
           "accepted_options"]

#: sampler keywords that :func:`restore` sets itself
RESERVED = ("generator", "callback", "progress", "autoencoder")


@dataclass
class RestoreResult:
    """``restored``: the restoration ``[B, C, H, W]`` float32 on the CPU, in the image range [-1, 1] (not
    clipped); ``cost``: the run's :class:`~hessdiff.samplers.loop.Cost`; ``options`` / ``steps``: what ran."""

    restored: Tensor
    cost: Any
    method: str
    options: dict[str, Any]
    steps: int
    info: dict[str, Any] = field(default_factory=dict)


def check_method(method: str, is_latent: bool, source: str) -> None:
    """Raise ``ValueError`` when ``method`` is unknown or cannot run on a pixel / latent model."""
    from .guidance import LATENT_METHODS, POSTERIOR_SAMPLERS

    if method not in POSTERIOR_SAMPLERS:
        raise ValueError(f"unknown method {method!r}; available: {', '.join(POSTERIOR_SAMPLERS)}")
    if method in LATENT_METHODS and not is_latent:
        raise ValueError(f"method {method!r} works in the latent space of a VAE, but {source} is a pixel-space "
                         "model; use stsl or dps, or a latent model (mnist-ldm, Stable Diffusion)")
    if method == "dps" and is_latent:
        raise ValueError(f"method 'dps' works in pixel space, but {source} is a latent model; "
                         "use stsl, latent_dps or psld")


def fill_sigma_y(method: str, opts: dict[str, Any], measurement: Any) -> None:
    """Set ``opts["sigma_y"]`` from the measurement's Gaussian noise level when ``method`` takes one and
    it is not given (MMPS, TMPD, PiGDM, DiffPIR, DAPS; STSL with the moment-matched likelihood). A bare
    tensor has no noise level: one clear error."""
    if "sigma_y" not in accepted_options(method) or opts.get("sigma_y") is not None:
        return
    from .guidance import get_posterior_sampler

    needs = getattr(getattr(get_posterior_sampler(method), "options_class", None), "needs_sigma_y", None)
    if needs is not None and not needs(opts):  # an optional noise level these options do not use
        return
    s = getattr(measurement, "sigma_y", None)
    if s is None:
        s = (getattr(measurement, "params", None) or {}).get("sigma_y")
    if s is None:
        raise ValueError(f"{method} needs the measurement's noise level: pass a hessdiff Measurement "
                         "(task.measure(x, seed)) with Gaussian noise, or the option sigma_y=...")
    opts["sigma_y"] = float(s)


def accepted_options(method: str) -> list[str]:
    """The option names the sampler of ``method`` takes (its keyword-only parameters and, when it
    routes ``**options`` into an options dataclass, that dataclass's fields)."""
    from .guidance import get_posterior_sampler

    fn = get_posterior_sampler(method)
    params = inspect.signature(fn).parameters.values()
    names = [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in RESERVED]
    opts_cls = getattr(fn, "options_class", None)
    if opts_cls is not None and dataclasses.is_dataclass(opts_cls):
        names += [f.name for f in dataclasses.fields(opts_cls) if f.name not in names]
    return names


#: value ranges of the posterior samplers' numeric options (:func:`check_option_ranges`)
_NONNEGATIVE = ("zeta", "lam", "eta", "gamma", "omega", "ddim_eta", "measurement_noise", "sigma_y",
                "gate_sigma")
_POSITIVE = ("probe_scale", "clip_x0")
_POSITIVE_INT = ("inner_steps", "num_probes", "iterations")


def check_option_ranges(method: str, opts: dict[str, Any]) -> None:
    """``ValueError`` naming the first numeric option of ``opts`` out of its range (negative step sizes,
    damping or noise levels, non-positive clamps, iteration counts below 1), before anything runs."""
    for key, v in opts.items():
        if v is None or isinstance(v, bool) or not isinstance(v, int | float):
            continue
        if key in _POSITIVE_INT and not (isinstance(v, int) and v >= 1):
            raise ValueError(f"option {key!r} of method {method!r} must be a positive integer, got {v!r}")
        if key in _NONNEGATIVE and not (math.isfinite(v) and v >= 0):
            raise ValueError(f"option {key!r} of method {method!r} must be a finite non-negative number, got {v!r}")
        if key in _POSITIVE and not (math.isfinite(v) and v > 0):
            raise ValueError(f"option {key!r} of method {method!r} must be a finite positive number, got {v!r}")


def method_options(method: str, given: dict[str, Any], family: str | None = None,
                   row: str | None = None, task: str | None = None) -> tuple[dict[str, Any], int]:
    """``(options, steps)`` of ``method``: the defaults table's row (see
    :func:`~hessdiff.samplers.defaults.method_defaults`; with ``task``, its per-task entries) updated with
    ``given``; unknown names raise ``ValueError`` listing the accepted ones."""
    accepted = accepted_options(method)
    unknown = [k for k in given if k not in accepted]
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(map(repr, unknown))} for method {method!r}; "
                         f"accepted: {', '.join(accepted)}")
    check_option_ranges(method, given)
    opts = method_defaults(method, family, row, task)
    steps = int(opts.pop("steps"))
    opts.update(given)
    return opts, steps


def _autoencoder(model: Any) -> Any:
    from .diffusers.pipeline import VAEAutoencoder

    return VAEAutoencoder(model.vae, scaling_factor=model.vae_scaling_factor)


def restore(model: Any, measurement: Any, *, method: str | None = None, steps: int | None = None, seed: int = 0,
            options: dict[str, Any] | None = None, defaults: str | None = None, denoiser: Any | None = None,
            callback: Any | None = None, progress: bool = False) -> RestoreResult:
    """Restore the image(s) behind ``measurement`` (a :class:`hessdiff.tasks.Measurement`) with a posterior
    sampler on ``model`` (a :class:`~hessdiff.samplers.models.DiffusionModel`, e.g. ``load_model("mnist")``
    or :func:`model_from_pipeline`).

    ``method``: default :func:`default_method`; ``steps`` / ``options``: over the method's defaults row
    (``defaults``: ``"published"``, a family name, or ``None`` for the model family's recommendation);
    ``denoiser``: the model's UNet behind the denoiser contract (built from ``model`` when omitted; pass it
    for text conditioning). The starting noise is drawn on the CPU from ``torch.Generator().manual_seed(seed)``
    and the sampler takes the same generator, so the result depends only on the inputs and ``seed``.
    """
    from .denoiser import UNetDenoiser
    from .guidance import get_posterior_sampler

    method = method or default_method(model.is_latent)
    check_method(method, model.is_latent, model.source or "the model")
    opts, default_steps = method_options(method, dict(options or {}), model_family(model.source), defaults,
                                         getattr(measurement, "task", None))
    steps = default_steps if steps is None else steps
    fill_sigma_y(method, opts, measurement)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    device = next(model.unet.parameters()).device
    den = denoiser if denoiser is not None else UNetDenoiser.from_unet_and_scheduler(model.unet, model.scheduler)
    grid = den.schedule.grid(steps)
    gen = torch.Generator().manual_seed(int(seed))
    y = measurement.y.to(device=device, dtype=torch.float32)
    shape = (int(y.shape[0]), *model.sample_shape)
    x = (float(grid.sigma[0]) * torch.randn(shape, generator=gen, dtype=torch.float32)).to(device)
    args: list[Any] = [den, measurement.operator.to(device), y, x, grid]
    if model.is_latent:
        args.append(_autoencoder(model))
    res = get_posterior_sampler(method)(*args, generator=gen, callback=callback, progress=progress, **opts)
    images = res.images.detach().float().cpu()
    return RestoreResult(restored=images, cost=res.cost, method=method, options=opts, steps=steps, info=res.info)


def model_from_pipeline(pipe: Any, source: str = "pipeline") -> Any:
    """A :class:`~hessdiff.samplers.models.DiffusionModel` from an in-memory diffusers pipeline.

    Uses the pipeline's ``unet``, ``scheduler`` and, when present, ``vae`` (then the UNet works on
    ``vae.config.scaling_factor * z``); the image resolution is the UNet's sample size times the
    VAE's downsampling factor.
    """
    from .models import DiffusionModel

    unet = getattr(pipe, "unet", None)
    scheduler = getattr(pipe, "scheduler", None)
    if unet is None or scheduler is None:
        raise ValueError(f"{type(pipe).__name__} has no unet and scheduler; hessdiff needs both")
    vae = getattr(pipe, "vae", None)
    size = unet.config.sample_size
    side = int(size if isinstance(size, int) else size[0])
    if vae is not None:
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        return DiffusionModel(unet=unet.eval().requires_grad_(False), scheduler=scheduler,
                              vae=vae.eval().requires_grad_(False),
                              vae_scaling_factor=float(vae.config.scaling_factor), resolution=side * factor,
                              channels=int(vae.config.in_channels), source=source)
    return DiffusionModel(unet=unet.eval().requires_grad_(False), scheduler=scheduler, resolution=side,
                          channels=int(unet.config.in_channels), source=source)
