"""Methods and feature extractors that benchmark sweeps can name.

Methods
-------
A *method* turns one batch of work into images. It is a callable ``fn(call: MethodCall) ->
MethodResult`` registered in :data:`METHODS` under a name, with the options it accepts (and their
defaults) declared up front, so that a sweep configuration with an unknown or mistyped option fails
before any work starts:

* ``call.model``: the :class:`SweepModel` (diffusers components, the denoiser contract, the
  schedule), or ``None`` for model-free methods;
* ``call.measurement``: the batch's :class:`hessdiff.tasks.Measurement` (``y``, the operator with
  each image's mask / kernel, the noise model), or ``None`` for unconditional generation;
* ``call.shape``: ``(B, C, H, W)`` of the images to return (the model's image space);
* ``call.steps``: the step count (0 for methods that take none);
* ``call.generators``: one CPU ``torch.Generator`` per image, seeded from that item's seed only;
  every random draw must come from them (sample ``i`` from ``generators[i]``), so that an image does
  not depend on the batch it was computed in or on the number of processes;
* ``call.options``: the resolved options (declared defaults updated with the configuration's);
* ``call.device``: where to compute.

The result holds ``images`` (``[B, C, H, W]`` float in ``[-1, 1]``; values outside are clipped when
the images are quantised), ``nfe`` (network evaluations per image, as the method's paper counts
them) and ``cost`` (further counters, JSON-able).

Registering a method (e.g. from a plugin module or a new sampler)::

    from hessdiff.eval.sweep.methods import MethodResult, register_method

    @register_method("my_sampler", options={"zeta": 1.0, "eta": 0.0}, needs_model=True,
                     needs_measurement=True, uses_steps=True, description="...")
    def my_sampler(call):
        ...
        return MethodResult(images, nfe=call.steps)

``hessdiff.samplers.guidance``'s samplers (DPS, latent DPS, PSLD, STSL) are registered
automatically under their :data:`~hessdiff.samplers.guidance.POSTERIOR_SAMPLERS` names, their
options read from the functions' keyword arguments; a keyword without a default (STSL's ``lam``)
is a required option.

Built-in methods: ``pinv`` (the pseudo-inverse ``A⁺y``, closed form or CGLS; a model-free
restoration baseline), ``adjoint`` (``Aᵀy``), and unconditional sampling with the base solvers
``ddim``, ``dpm``, ``dpm++`` and ``euler`` (the measurement, if any, is ignored), which also take an
LML correction by name (``correction = "published"``, ``correction_options = {...}``).

Feature extractors
------------------
:data:`FEATURE_EXTRACTORS` maps the ``[metrics] features`` names to factories ``f(device) ->
extractor`` (``extractor(uint8 [B, 3, H, W]) -> [B, F]`` with a ``name``; see
:mod:`hessdiff.eval.metrics.fid`): ``domain`` (the embedded MNIST classifier, 128-d), ``domain-fashion``
(the Fashion-MNIST one), ``inception`` (clean-fid's Inception-v3; raises
:class:`~hessdiff.eval.metrics.weights.MissingWeightsError` without its weights), ``pixels`` (8x8
average-pooled pixels in [0, 1], 192-d; weight-free, for smoke tests only).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "MethodCall",
    "MethodResult",
    "MethodSpec",
    "METHODS",
    "register_method",
    "SweepModel",
    "FEATURE_EXTRACTORS",
    "make_feature_extractor",
]


# ----------------------------------------------------------------------------------------------
# contract
# ----------------------------------------------------------------------------------------------


@dataclass
class MethodCall:
    """One batch of work handed to a method (see the module docstring)."""

    model: SweepModel | None
    measurement: Any | None
    shape: tuple[int, int, int, int]
    steps: int
    generators: list[torch.Generator]
    options: dict[str, Any]
    device: torch.device


@dataclass
class MethodResult:
    """Images ``[B, C, H, W]`` in ``[-1, 1]``, network evaluations per image, other JSON-able costs."""

    images: Tensor
    nfe: int = 0
    cost: dict[str, Any] = field(default_factory=dict)


_REQUIRED = inspect.Parameter.empty


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its function and what it needs.

    ``options`` maps each accepted option to its default (:data:`inspect.Parameter.empty` marks a
    required one); ``choices`` optionally restricts string options.
    """

    name: str
    fn: Callable[[MethodCall], MethodResult]
    options: Mapping[str, Any]
    needs_model: bool
    needs_measurement: bool
    uses_steps: bool
    description: str = ""
    choices: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    validate: Callable[[dict[str, Any]], None] | None = None

    def resolve_options(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults updated with ``given``; raises ValueError naming an unknown / mistyped / missing option."""
        known = list(self.options)
        for key in given:
            if key not in self.options:
                from hessdiff.utils.suggest import did_you_mean

                raise ValueError(f"unknown option {key!r} for method {self.name!r} "
                                 f"(known: {', '.join(known) if known else 'none'}){did_you_mean(key, known)}")
        out: dict[str, Any] = {}
        for key, default in self.options.items():
            if key not in given:
                if default is _REQUIRED:
                    raise ValueError(f"method {self.name!r} needs option {key!r} (options = {{ {key} = ... }})")
                out[key] = default
                continue
            out[key] = _check_option(self.name, key, given[key], default, self.choices.get(key))
        if self.validate is not None:
            self.validate(out)
        return out


def _check_option(method: str, key: str, value: Any, default: Any, choices: tuple[Any, ...] | None) -> Any:
    def bad(kind: str) -> ValueError:
        return ValueError(f"option {key!r} of method {method!r} must be {kind}, got {value!r}")

    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad("true or false")
    elif isinstance(default, int) and default is not _REQUIRED:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad("a number")
        value = float(value)
    elif isinstance(default, str):
        if not isinstance(value, str):
            raise bad("a string")
    elif isinstance(default, dict):
        if not isinstance(value, Mapping):
            raise bad("a table")
        value = dict(value)
    if choices is not None and value not in choices:
        raise ValueError(f"option {key!r} of method {method!r} must be one of {', '.join(map(repr, choices))}, "
                         f"got {value!r}")
    return value


METHODS: dict[str, MethodSpec] = {}
"""Registered methods by name (see the module docstring)."""


def register_method(
    name: str,
    fn: Callable[[MethodCall], MethodResult] | None = None,
    *,
    options: Mapping[str, Any] | None = None,
    needs_model: bool = True,
    needs_measurement: bool = True,
    uses_steps: bool = True,
    description: str = "",
    choices: Mapping[str, tuple[Any, ...]] | None = None,
    validate: Callable[[dict[str, Any]], None] | None = None,
    replace: bool = False,
) -> Any:
    """Register ``fn`` under ``name`` in :data:`METHODS` (usable as a decorator when ``fn`` is omitted).

    ``options`` maps each accepted option to its default (``inspect.Parameter.empty``: required);
    ``choices`` restricts values of some options; ``validate(options)`` may raise ``ValueError`` for
    combinations that are invalid (called when a configuration is read, before any work).

    Raises:
        ValueError: ``name`` is already registered and ``replace`` is false.
    """

    def deco(f: Callable[[MethodCall], MethodResult]) -> Callable[[MethodCall], MethodResult]:
        if name in METHODS and not replace:
            raise ValueError(f"method {name!r} is already registered (pass replace=True to override it)")
        METHODS[name] = MethodSpec(name, f, dict(options or {}), needs_model, needs_measurement, uses_steps,
                                   description, dict(choices or {}), validate)
        return f

    return deco(fn) if fn is not None else deco


# ----------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------


class SweepModel:
    """A loaded diffusion model as methods see it.

    Attributes:
        label: the configuration's label; ``source``: what was loaded.
        diffusion: the :class:`hessdiff.samplers.models.DiffusionModel` (diffusers components).
        device: where it runs.
    """

    def __init__(self, label: str, source: str, diffusion: Any, device: torch.device) -> None:
        self.label, self.source, self.diffusion, self.device = label, source, diffusion, device

    @classmethod
    def load(cls, label: str, source: str, device: torch.device) -> SweepModel:
        """Load ``source`` with :func:`hessdiff.samplers.models.load_model` and move it to ``device``."""
        from hessdiff.samplers.models import load_model

        m = load_model(source)
        m.unet.to(device)
        if m.vae is not None:
            m.vae.to(device)
        return cls(label, source, m, device)

    @property
    def channels(self) -> int:
        return int(self.diffusion.channels)

    @property
    def resolution(self) -> tuple[int, int]:
        r = self.diffusion.resolution
        return (int(r), int(r)) if isinstance(r, int) else (int(r[0]), int(r[1]))

    @property
    def is_latent(self) -> bool:
        return bool(self.diffusion.is_latent)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the space the network denoises (latents for latent models)."""
        return tuple(self.diffusion.sample_shape)

    @cached_property
    def denoiser(self) -> Any:
        """The network behind the denoiser contract (:class:`hessdiff.samplers.UNetDenoiser`)."""
        from hessdiff.samplers.denoiser import UNetDenoiser

        return UNetDenoiser.from_unet_and_scheduler(self.diffusion.unet, self.diffusion.scheduler)

    @property
    def schedule(self) -> Any:
        return self.denoiser.schedule

    def grid(self, steps: int, spacing: str = "default") -> Any:
        """The schedule's :class:`TimeGrid` of ``steps`` steps (``spacing="default"``: the scheduler's own)."""
        return self.schedule.grid(steps, None if spacing in ("", "default") else spacing)

    def initial_noise(self, shape: tuple[int, ...], generators: list[torch.Generator], sigma: float) -> Tensor:
        """``sigma * eps`` of the given per-sample shape, sample ``i`` drawn on the CPU from ``generators[i]``."""
        z = torch.cat([torch.randn((1, *shape), generator=g, dtype=torch.float32) for g in generators])
        return (float(sigma) * z).to(self.device)

    def decode(self, z: Tensor) -> Tensor:
        return self.diffusion.decode(z) if self.is_latent else z

    def encode(self, x: Tensor) -> Tensor:
        return self.diffusion.encode(x) if self.is_latent else x


class _Autoencoder:
    """``encode`` / ``decode`` of a latent :class:`SweepModel` for the latent posterior samplers."""

    def __init__(self, model: SweepModel) -> None:
        self.model = model

    def encode(self, x: Tensor) -> Tensor:
        return self.model.diffusion.encode(x)

    def decode(self, z: Tensor) -> Tensor:
        return self.model.diffusion.decode(z).to(z.dtype)


# ----------------------------------------------------------------------------------------------
# built-in methods
# ----------------------------------------------------------------------------------------------


@register_method("pinv", options={"cg_iters": 100, "cg_tol": 1e-6}, needs_model=False, uses_steps=False,
                 description="pseudo-inverse A⁺y (closed form where the operator has one, else CGLS)")
def _pinv(call: MethodCall) -> MethodResult:
    m = call.measurement
    op, y = m.operator.to(call.device), m.y.to(call.device, torch.float64)
    with torch.no_grad():
        if getattr(op, "has_pinv", False):
            x = op.pinv(y)
        else:
            x = op.pinv_cg(y, max_iter=call.options["cg_iters"], tol=call.options["cg_tol"])
    return MethodResult(x.to(torch.float32), nfe=0)


@register_method("adjoint", options={}, needs_model=False, uses_steps=False, description="adjoint Aᵀy")
def _adjoint(call: MethodCall) -> MethodResult:
    m = call.measurement
    with torch.no_grad():
        x = m.operator.to(call.device).adjoint(m.y.to(call.device, torch.float64))
    return MethodResult(x.to(torch.float32), nfe=0)


def _solver_method(solver: str, extra: dict[str, Any]) -> Callable[[MethodCall], MethodResult]:
    def run(call: MethodCall) -> MethodResult:
        from hessdiff.samplers.loop import CountingDenoiser
        from hessdiff.samplers.solvers import get_solver

        model = call.model
        opts = dict(call.options)
        grid = model.grid(call.steps, opts.pop("spacing"))
        correction = None
        name, cargs = opts.pop("correction"), opts.pop("correction_options")
        if name != "none":
            from hessdiff.samplers.lml import make_correction

            correction = make_correction(name, **cargs)
        den = CountingDenoiser(model.denoiser)
        x = model.initial_noise(model.sample_shape, call.generators, float(grid.sigma[0]))
        with torch.no_grad():
            out = get_solver(solver)(den, x, grid, generator=call.generators, correction=correction, **opts)
            images = model.decode(out)
        return MethodResult(images.float(), nfe=den.evaluations, cost={k: v for k, v in den.extra.items()})

    run.__name__ = f"sample_{solver}"
    return run


_COMMON_SOLVER_OPTIONS = {"spacing": "default", "correction": "none", "correction_options": {}}


def _check_correction(options: dict[str, Any]) -> None:
    """Build the named correction once so that a bad name or argument fails when the config is read."""
    name, cargs = options["correction"], options["correction_options"]
    if name == "none":
        if cargs:
            raise ValueError("correction_options are given but correction = 'none'")
        return
    from hessdiff.samplers.lml import make_correction

    try:
        make_correction(name, **cargs)
    except TypeError as exc:
        raise ValueError(f"correction_options {cargs} do not fit correction {name!r}: {exc}") from exc
    except ValueError as exc:
        raise ValueError(f"option 'correction' / 'correction_options': {exc}") from exc
for _solver, _extra, _desc in (
    ("ddim", {"eta": 0.0}, "unconditional DDIM sampling (eta: 0 deterministic, 1 DDPM-like)"),
    ("dpm", {"order": 3}, "unconditional multistep DPM-Solver (noise prediction)"),
    ("dpm++", {"order": 2, "solver_type": "midpoint", "lower_order_final": True},
     "unconditional multistep DPM-Solver++ (data prediction)"),
    ("euler", {}, "unconditional flow-matching Euler"),
):
    register_method(_solver, _solver_method(_solver, _extra), options={**_COMMON_SOLVER_OPTIONS, **_extra},
                    needs_model=True, needs_measurement=False, uses_steps=True, description=_desc,
                    choices={"solver_type": ("midpoint", "heun"), "order": (1, 2, 3)}, validate=_check_correction)


def _posterior_method(name: str, fn: Callable[..., Any], latent: bool) -> Callable[[MethodCall], MethodResult]:
    def run(call: MethodCall) -> MethodResult:
        model = call.model
        opts = dict(call.options)
        grid = model.grid(call.steps, opts.pop("spacing"))
        m = call.measurement
        from hessdiff.samplers.api import fill_sigma_y

        fill_sigma_y(name, opts, m)
        op = m.operator.to(call.device)
        y = m.y.to(call.device, torch.float32)
        x = model.initial_noise(model.sample_shape, call.generators, float(grid.sigma[0]))
        args: list[Any] = [model.denoiser, op, y, x, grid]
        if latent:
            args.append(_Autoencoder(model))
        elif model.is_latent and "autoencoder" in inspect.signature(fn).parameters:
            opts["autoencoder"] = _Autoencoder(model)
        elif model.is_latent:
            raise ValueError(f"method {name!r} works in pixel space but model {model.label!r} is a latent model")
        res = fn(*args, generator=call.generators, **opts)
        cost = {k: v for k, v in res.cost.as_dict().items() if k not in ("wall_time_s", "peak_memory_bytes")}
        return MethodResult(res.images.detach().float(), nfe=int(res.cost.nfe), cost=cost)

    run.__name__ = f"sample_{name}"
    return run


def _check_sampler_ranges(name: str) -> Callable[[dict[str, Any]], None]:
    """:func:`hessdiff.samplers.api.check_option_ranges` for method ``name``, when a configuration is read (so that
    ``hessdiff sweep --check`` refuses what the samplers would refuse at the first item)."""
    from hessdiff.samplers.api import check_option_ranges

    return lambda opts: check_option_ranges(name, opts)


def _register_posterior_samplers() -> None:
    try:
        from hessdiff.samplers import guidance as posterior
    except Exception:  # noqa: BLE001 - optional: the module may be absent or broken in a checkout
        return
    latent_names = set(getattr(posterior, "LATENT_METHODS", ()))
    skip = {"generator", "callback", "progress", "autoencoder"}
    for name, fn in getattr(posterior, "POSTERIOR_SAMPLERS", {}).items():
        if name in METHODS:
            continue
        options: dict[str, Any] = {"spacing": "default"}
        for p in inspect.signature(fn).parameters.values():
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in skip:
                options[p.name] = p.default
        doc = (inspect.getdoc(fn) or "").split("\n")[0]
        register_method(name, _posterior_method(name, fn, name in latent_names), options=options,
                        needs_model=True, needs_measurement=True, uses_steps=True, description=doc,
                        validate=_check_sampler_ranges(name))


_register_posterior_samplers()


# ----------------------------------------------------------------------------------------------
# feature extractors
# ----------------------------------------------------------------------------------------------


class PixelFeatures:
    """Weight-free features: the image in ``[0, 1]`` average-pooled to ``size x size`` per channel.

    ``uint8 [B, 3, H, W] -> float64 [B, 3 * size * size]``. A fast stand-in for tests and smoke
    runs; FIDs computed on it are not comparable to Inception FIDs.
    """

    def __init__(self, size: int = 8) -> None:
        self.size = int(size)
        self.name = f"pixels-avgpool{self.size}"

    def __call__(self, images: Tensor) -> Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise TypeError(f"PixelFeatures expects uint8 [B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        x = images.to(torch.float64) / 255
        return torch.nn.functional.adaptive_avg_pool2d(x, self.size).flatten(1)


class DomainFeatures:
    """An embedded classifier's penultimate features (128-d) of uint8 ``[B, 3, 32, 32]`` images: the
    MNIST classifier (``family="mnist"``) or the Fashion-MNIST one (``family="fashion"``)."""

    def __init__(self, device: torch.device | str = "cpu", family: str = "mnist") -> None:
        from hessdiff.samplers.models import load_classifier

        self.name = f"{family}-classifier-128"
        self.classifier = load_classifier(f"hessdiff/{family}-classifier").to(device)

    def __call__(self, images: Tensor) -> Tensor:
        from hessdiff.samplers.models import domain_features
        from hessdiff.utils.images import from_uint8

        return domain_features(from_uint8(images), self.classifier)


def _inception(device: torch.device) -> Any:
    from hessdiff.eval.metrics.fid import CleanFIDInception

    return CleanFIDInception(device, download=True)


FEATURE_EXTRACTORS: dict[str, Callable[[torch.device], Any]] = {
    "pixels": lambda device: PixelFeatures(8),
    "domain": lambda device: DomainFeatures(device),
    "domain-fashion": lambda device: DomainFeatures(device, "fashion"),
    "inception": _inception,
}
"""Feature-extractor factories by ``[metrics] features`` name."""


def make_feature_extractor(name: str, device: torch.device | str = "cpu") -> Any:
    """Build the named extractor (may raise :class:`~hessdiff.eval.metrics.weights.MissingWeightsError`)."""
    if name not in FEATURE_EXTRACTORS:
        raise ValueError(f"unknown feature extractor {name!r} (known: {', '.join(FEATURE_EXTRACTORS)})")
    return FEATURE_EXTRACTORS[name](torch.device(device))
