"""Tasks: an operator, a noise model, and how to make a reproducible measurement from a clean image.

A :class:`Task` is built by name from the registry :data:`TASKS` (``make_task("gaussian_blur",
kernel_size=61, std=3.0)``) or from a named preset of a paper's protocol (``load_preset("dps-256")
.task("gaussian_blur")``). ``task.measure(x, seed)`` returns a :class:`Measurement`: the noisy ``y``,
the operator that produced it (with any random mask / kernel drawn for each image), the noise model,
and the task name, parameters and per-image seeds, so that ``save`` / :func:`load_measurement`
reproduce the operator and ``y`` exactly elsewhere.

Randomness: image ``i``'s mask / kernel and then its noise are drawn from its own generator
(``seed + i`` for an int seed, or the ``i``-th of a list of seeds / generators), so image ``i`` does
not depend on the batch size. Draws are made on the CPU in float64.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hessdiff.utils.files import atomic_write

from . import _random as rnd
from .kernels import gaussian_kernel, load_kernel, motion_blur_kernel
from .masks import box_mask, freeform_mask, png_mask, random_mask
from .noise import GaussianNoise, NoiseModel, NoNoise, PoissonNoise, from_scale, noise_from_config
from .operators import (
    Blur,
    Identity,
    Inpainting,
    LinearOperator,
    SuperResolution,
    operator_from_config,
)

__all__ = [
    "Task",
    "Measurement",
    "TASKS",
    "make_task",
    "task_parameters",
    "Preset",
    "load_preset",
    "list_presets",
    "load_measurement",
    "MEASUREMENT_FORMAT",
]

#: ``factory(image_shape, generators) -> LinearOperator``; draws per-image parameters from ``generators[i]``
OperatorFactory = Callable[[tuple[int, ...], list[torch.Generator]], LinearOperator]

MEASUREMENT_FORMAT = "hessdiff.measurement"
_MEASUREMENT_VERSION = 1


@dataclass
class Measurement:
    """A measurement ``y = noise(A x)`` with everything needed to reproduce it.

    ``y``: the noisy measurement; ``operator``: ``A`` (with the masks / kernels drawn for these
    images); ``noise``: the noise model; ``task``: task name; ``params``: the task's parameters;
    ``seeds``: per-image seeds (``None`` when generators were passed instead); ``x_shape``: shape of
    the clean images; ``label``: e.g. ``"dps-256:gaussian_blur"`` for a preset entry.
    """

    y: Tensor
    operator: LinearOperator
    noise: NoiseModel
    task: str
    params: dict[str, Any]
    seeds: list[int] | None
    x_shape: tuple[int, ...]
    label: str = ""

    @property
    def sigma_y(self) -> float | None:
        """Gaussian noise std on the ``[-1, 1]`` scale (0 for noise-free, ``None`` for non-Gaussian noise)."""
        return getattr(self.noise, "sigma", None)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (tensors, numbers, strings, lists, dicts) as stored by :meth:`save`."""
        return {
            "format": MEASUREMENT_FORMAT,
            "version": _MEASUREMENT_VERSION,
            "y": self.y.detach().cpu(),
            "operator": self.operator.get_config(),
            "noise": self.noise.get_config(),
            "task": self.task,
            "label": self.label,
            "params": _plain(self.params),
            "seeds": None if self.seeds is None else [int(s) for s in self.seeds],
            "x_shape": [int(s) for s in self.x_shape],
        }

    def save(self, path: str | Path, overwrite: bool = False) -> None:
        """Write to ``path`` (``torch.save`` of :meth:`to_dict`), atomically; refuses to overwrite unless asked."""
        data = self.to_dict()
        atomic_write(path, lambda tmp: torch.save(data, tmp), overwrite=overwrite)


def load_measurement(path: str | Path, map_location: str | torch.device = "cpu") -> Measurement:
    """Read a measurement written by :meth:`Measurement.save` (or ``hessdiff degrade``).

    Rebuilds the operator (masks and kernels included) and returns ``y`` exactly as stored. Uses
    ``torch.load(weights_only=True)``, so no code is executed from the file.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"measurement file not found: {p}")
    try:
        data = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not a measurement file"
        raise ValueError(f"cannot read a measurement from {p}: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != MEASUREMENT_FORMAT:
        raise ValueError(f"{p} is not a hessdiff measurement file")
    if int(data.get("version", 0)) > _MEASUREMENT_VERSION:
        raise ValueError(f"{p} has measurement format version {data['version']}; this hessdiff reads up to "
                         f"{_MEASUREMENT_VERSION}")
    op = operator_from_config(data["operator"]).to(map_location)
    return Measurement(
        y=data["y"],
        operator=op,
        noise=noise_from_config(data["noise"]),
        task=data["task"],
        params=dict(data["params"]),
        seeds=data["seeds"],
        x_shape=tuple(data["x_shape"]),
        label=data.get("label", ""),
    )


def _plain(v: Any) -> Any:
    """Parameters in storable form: Paths -> str, tuples -> lists, tensors kept."""
    if isinstance(v, dict):
        return {str(k): _plain(u) for k, u in v.items()}
    if isinstance(v, list | tuple):
        return [_plain(u) for u in v]
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, Tensor):
        return v.detach().cpu()
    return v


@dataclass
class Task:
    """An inverse problem: a (possibly random) operator and a noise model.

    ``operator`` is either a fixed :class:`LinearOperator` or an :data:`OperatorFactory` that draws
    per-image parameters (masks, kernels) from one generator per image. ``params`` records how the
    task was made (for reproduction); ``label`` names a preset entry.
    """

    name: str
    operator: LinearOperator | OperatorFactory
    noise: NoiseModel = field(default_factory=NoNoise)
    params: dict[str, Any] = field(default_factory=dict)
    label: str = ""

    @property
    def is_random(self) -> bool:
        """Whether the operator is drawn per image (masks / kernels from the seeds)."""
        return not isinstance(self.operator, LinearOperator)

    def _build(self, shape: tuple[int, ...], gens: list[torch.Generator]) -> LinearOperator:
        if isinstance(self.operator, LinearOperator):
            return self.operator
        return self.operator(shape, gens)

    def build_operator(self, shape: Sequence[int], seed: rnd.SeedLike = None) -> LinearOperator:
        """The operator ``measure`` would use for clean images of ``shape`` and the same ``seed``."""
        shape = tuple(int(s) for s in shape)
        if len(shape) < 1:
            raise ValueError("shape must include a batch dimension")
        gens, _ = rnd.generators_for_batch(seed, shape[0])
        return self._build(shape, gens)

    def measure(self, x: Tensor, seed: rnd.SeedLike = None) -> Measurement:
        """``y = noise(A x)`` for clean images ``x`` (``[B, C, H, W]`` in ``[-1, 1]``; any batch size).

        ``seed``: ``None`` (= 0), an int (image ``i`` uses ``seed + i``), a list of ``B`` ints, or
        CPU generator(s) (see :func:`hessdiff.tasks._random.generators_for_batch`). For each image its
        operator parameters are drawn first, then its noise.
        """
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise ValueError(f"task {self.name!r}: the clean image must be a floating-point tensor")
        if x.ndim < 2:
            raise ValueError(f"task {self.name!r}: the clean image needs a batch dimension; got shape {list(x.shape)}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"task {self.name!r}: the clean image contains NaN or Inf values")
        gens, seeds = rnd.generators_for_batch(seed, x.shape[0])
        op = self._build(tuple(x.shape), gens).to(x.device)
        with torch.no_grad():
            y = self.noise(op(x), gens)
        return Measurement(y=y, operator=op, noise=self.noise, task=self.name, params=dict(self.params),
                           seeds=seeds, x_shape=tuple(x.shape), label=self.label)


# ====================================================================== registry
_NOISE_KEYS = ("noise", "sigma_y", "sigma_scale", "poisson_rate")
_NOISE_DEFAULTS: dict[str, Any] = {"noise": "gaussian", "sigma_y": 0.05, "sigma_scale": "[-1,1]", "poisson_rate": 1.0}


def _make_noise(noise: str, sigma_y: float, sigma_scale: str, poisson_rate: float) -> NoiseModel:
    if noise == "gaussian":
        if not isinstance(sigma_y, int | float) or isinstance(sigma_y, bool):
            raise ValueError(f"sigma_y must be a number; got {sigma_y!r}")
        if sigma_y < 0 or not math.isfinite(sigma_y):
            raise ValueError(f"sigma_y must be a finite non-negative number; got {sigma_y}")
        return GaussianNoise(from_scale(sigma_y, sigma_scale))
    if noise == "poisson":
        return PoissonNoise(poisson_rate)
    if noise == "none":
        return NoNoise()
    raise ValueError(f"unknown noise {noise!r}; choose gaussian, poisson or none")


def _image_hw(shape: tuple[int, ...], task: str) -> tuple[int, int, int]:
    if len(shape) != 4:
        raise ValueError(f"task {task!r} works on [B, C, H, W] images; got shape {list(shape)}")
    return shape[1], shape[2], shape[3]


def _denoising() -> LinearOperator:
    return Identity()


def _super_resolution(scale: int = 4, filter: str = "bicubic", boundary: str = "reflect") -> LinearOperator:
    return SuperResolution(scale, filter=filter, boundary=boundary)


def _gaussian_blur(kernel_size: int = 61, std: float = 3.0, truncate: float | None = None,
                   padding: str = "reflect", method: str = "auto") -> LinearOperator:
    return Blur(gaussian_kernel(kernel_size, std, truncate=truncate), padding=padding, method=method)


def _motion_blur(kernel_size: int = 61, intensity: float = 0.5, padding: str = "reflect", method: str = "auto",
                 kernel_seed: int | None = None) -> LinearOperator | OperatorFactory:
    if kernel_seed is not None:
        g = torch.Generator().manual_seed(rnd.check_seed(kernel_seed))
        return Blur(motion_blur_kernel(kernel_size, intensity, g), padding=padding, method=method)
    # validate eagerly so a bad size fails at task creation, not at the first measurement
    motion_blur_kernel(kernel_size, intensity, torch.Generator().manual_seed(0))
    Blur(torch.ones(1, 1, dtype=torch.float64), padding=padding, method=method)

    def factory(shape: tuple[int, ...], gens: list[torch.Generator]) -> LinearOperator:
        ks = [motion_blur_kernel(kernel_size, intensity, g) for g in gens]
        return Blur(torch.stack(ks), padding=padding, method=method)

    return factory


def _kernel_blur(kernel: str | Path | Tensor | Sequence[Sequence[float]], padding: str = "reflect",
                 method: str = "auto", normalize: bool = True) -> LinearOperator:
    if isinstance(kernel, str | Path):
        k = load_kernel(kernel, normalize=normalize)
    else:
        k = torch.as_tensor(kernel, dtype=torch.float64)
        if k.ndim != 2:
            raise ValueError(f"kernel_blur: kernel must be 2-D; got shape {list(k.shape)}")
        if normalize:
            s = float(k.sum())
            if not s > 0:
                raise ValueError(f"kernel_blur: kernel sums to {s}; cannot normalise")
            k = k / s
    return Blur(k, padding=padding, method=method)


def _box_inpainting(box_size: int | Sequence[int] = 128, position: str = "center",
                    margin: int = 0) -> OperatorFactory:
    if position not in ("center", "random"):
        raise ValueError(f"box_inpainting: position must be 'center' or 'random'; got {position!r}")

    def factory(shape: tuple[int, ...], gens: list[torch.Generator]) -> LinearOperator:
        _, h, w = _image_hw(shape, "box_inpainting")
        if position == "center":
            return Inpainting(box_mask(h, w, box_size, "center", margin))
        return Inpainting(torch.stack([box_mask(h, w, box_size, "random", margin, g) for g in gens]))

    return factory


def _random_inpainting(drop: float | Sequence[float] = 0.92, shared_channels: bool = True) -> OperatorFactory:
    random_mask(2, 2, drop, 1, True, torch.Generator().manual_seed(0))  # validate eagerly

    def factory(shape: tuple[int, ...], gens: list[torch.Generator]) -> LinearOperator:
        c, h, w = _image_hw(shape, "random_inpainting")
        return Inpainting(torch.stack([random_mask(h, w, drop, c, shared_channels, g) for g in gens]))

    return factory


def _freeform_inpainting(coverage: Sequence[float] = (0.1, 0.3), max_vertices: int = 8,
                         brush_width: Sequence[float] = (0.04, 0.1),
                         stroke_length: Sequence[float] = (0.1, 0.3)) -> OperatorFactory:
    def factory(shape: tuple[int, ...], gens: list[torch.Generator]) -> LinearOperator:
        _, h, w = _image_hw(shape, "freeform_inpainting")
        return Inpainting(torch.stack([
            freeform_mask(h, w, coverage, g, max_vertices, brush_width, stroke_length) for g in gens
        ]))

    return factory


def _mask_inpainting(mask_path: str | Path, keep: str = "white", threshold: int = 128) -> OperatorFactory:
    mask = png_mask(mask_path, keep=keep, threshold=threshold)  # read (and fail) at task creation

    def factory(shape: tuple[int, ...], gens: list[torch.Generator]) -> LinearOperator:
        _, h, w = _image_hw(shape, "mask_inpainting")
        if mask.shape[-2:] != (h, w):
            raise ValueError(f"mask {mask_path} is {mask.shape[-2]}x{mask.shape[-1]} but the image is {h}x{w}; "
                             "resize the mask or the image so that they match")
        return Inpainting(mask)

    return factory


_BUILDERS: dict[str, tuple[Callable[..., LinearOperator | OperatorFactory], str]] = {
    "denoising": (_denoising, "identity operator (denoising)"),
    "super_resolution": (_super_resolution, "downsampling by scale (antialiased bicubic or average pooling)"),
    "gaussian_blur": (_gaussian_blur, "Gaussian blur (kernel_size odd, std; reflect/circular/zero padding)"),
    "motion_blur": (_motion_blur, "random-trajectory motion blur, one kernel per image seed (or kernel_seed)"),
    "kernel_blur": (_kernel_blur, "blur with a user kernel (file: .npy/.pt/PNG, or a 2-D array)"),
    "box_inpainting": (_box_inpainting, "box hole (box_size; centred or random position with margin)"),
    "random_inpainting": (_random_inpainting, "random missing pixels (drop fraction or range)"),
    "freeform_inpainting": (_freeform_inpainting, "free-form brush-stroke holes (coverage range)"),
    "mask_inpainting": (_mask_inpainting, "holes from a mask image (mask_path; keep='white' observed)"),
}


def task_parameters(name: str) -> dict[str, Any]:
    """Accepted parameters of task ``name`` with their defaults (``inspect.Parameter.empty`` if required)."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(_BUILDERS))}")
    sig = inspect.signature(_BUILDERS[name][0])
    out = {k: p.default for k, p in sig.parameters.items()}
    out.update(_NOISE_DEFAULTS)
    return out


#: the image side the geometric task defaults (box 128, x4, 61-pixel kernels) were chosen for
DEFAULTS_RESOLUTION = 256


def resolution_defaults(name: str, resolution: int) -> dict[str, Any]:
    """Geometric default parameters of task ``name`` scaled to ``resolution`` x ``resolution`` images.

    The signature defaults are those of the 256x256 papers (box 128 = half the side, x4
    super-resolution, 61-pixel blur kernels with std 3); for other resolutions the box stays half
    the side, super-resolution is x2 below 256 (x4 from 256 on) and blur kernels scale with the
    side (odd, at least 5 pixels; std at least 1). Returns only the parameters that differ from
    the signature defaults (an empty dict at 256).
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(_BUILDERS))}")
    r = int(resolution)
    if r <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    if r == DEFAULTS_RESOLUTION:
        return {}
    f = r / DEFAULTS_RESOLUTION
    if name == "box_inpainting":
        return {"box_size": max(1, r // 2)}
    if name == "super_resolution":
        return {"scale": 4 if r >= DEFAULTS_RESOLUTION else 2}
    if name in ("gaussian_blur", "motion_blur"):
        k = max(5, int(round(61 * f)))
        k += 1 - k % 2  # odd
        out: dict[str, Any] = {"kernel_size": k}
        if name == "gaussian_blur":
            out["std"] = max(1.0, round(3.0 * f, 3))
        return out
    return {}


def make_task(name: str, label: str = "", **params: Any) -> Task:
    """Build the task ``name`` from :data:`TASKS` with keyword ``params``.

    Every task accepts the noise parameters ``noise`` (``"gaussian"`` | ``"poisson"`` | ``"none"``,
    default Gaussian), ``sigma_y`` (default 0.05, the papers' level), ``sigma_scale`` (the scale
    ``sigma_y`` is stated on: ``"[-1,1]"`` (default), ``"[0,1]"`` or ``"0-255"``) and ``poisson_rate``.
    Unknown parameters raise ``ValueError`` listing the accepted ones.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(_BUILDERS))}")
    builder = _BUILDERS[name][0]
    sig = inspect.signature(builder)
    accepted = list(sig.parameters) + list(_NOISE_KEYS)
    unknown = [k for k in params if k not in accepted]
    if unknown:
        raise ValueError(f"unknown parameter(s) {', '.join(map(repr, unknown))} for task {name!r}; "
                         f"accepted: {', '.join(accepted)}")
    op_params = {k: v for k, v in params.items() if k not in _NOISE_KEYS}
    missing = [k for k, p in sig.parameters.items() if p.default is inspect.Parameter.empty and k not in op_params]
    if missing:
        raise ValueError(f"task {name!r} needs parameter(s) {', '.join(missing)}")
    noise_params = {k: params.get(k, _NOISE_DEFAULTS[k]) for k in _NOISE_KEYS}
    noise = _make_noise(**noise_params)
    operator = builder(**op_params)
    full = {k: p.default for k, p in sig.parameters.items() if p.default is not inspect.Parameter.empty}
    full.update(op_params)
    full.update(noise_params)
    return Task(name=name, operator=operator, noise=noise, params=_plain(full), label=label)


def _factory_for(name: str) -> Callable[..., Task]:
    def factory(**params: Any) -> Task:
        return make_task(name, **params)

    factory.__name__ = name
    factory.__qualname__ = name
    factory.__doc__ = f"Task {name!r}: {_BUILDERS[name][1]}. Parameters: see task_parameters({name!r})."
    return factory


#: named tasks: ``TASKS[name](**params) -> Task``
TASKS: dict[str, Callable[..., Task]] = {name: _factory_for(name) for name in _BUILDERS}


# ====================================================================== presets
@dataclass(frozen=True)
class Preset:
    """A paper's measurement protocol: named task entries with their parameters (stored in ``assets/presets``)."""

    name: str
    description: str
    image_size: int | None
    source: str
    tasks: dict[str, dict[str, Any]]
    notes: str = ""

    def entries(self) -> list[str]:
        return list(self.tasks)

    def params(self, entry: str) -> tuple[str, dict[str, Any]]:
        """``(task name, parameters)`` of an entry."""
        if entry not in self.tasks:
            raise ValueError(f"preset {self.name!r} has no task {entry!r}; it has: {', '.join(self.tasks)}")
        spec = self.tasks[entry]
        return spec["task"], dict(spec.get("params", {}))

    def task(self, entry: str, **overrides: Any) -> Task:
        """Build the entry's task; ``overrides`` replace individual parameters."""
        name, params = self.params(entry)
        params.update(overrides)
        return make_task(name, label=f"{self.name}:{entry}", **params)


def _preset_dir() -> Any:
    return resources.files("hessdiff.assets").joinpath("presets")


def list_presets() -> list[str]:
    """Names of the presets shipped in ``hessdiff/assets/presets``."""
    d = _preset_dir()
    return sorted(p.name[:-5] for p in d.iterdir() if p.name.endswith(".json"))


def load_preset(name: str | Path) -> Preset:
    """Load a preset by name (``"dps-256"``, ``"psld-512"``, ``"stsl-512"``) or from a JSON file path."""
    p = Path(name)
    if p.suffix == ".json" and p.is_file():
        text = p.read_text()
        where = str(p)
    else:
        f = _preset_dir().joinpath(f"{name}.json")
        if not f.is_file():
            raise ValueError(f"unknown preset {str(name)!r}; shipped presets: {', '.join(list_presets())} "
                             "(or give the path of a preset .json file)")
        text = f.read_text()
        where = f"hessdiff/assets/presets/{name}.json"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"preset {where} is not valid JSON: {exc}") from exc
    for key in ("name", "tasks"):
        if key not in data:
            raise ValueError(f"preset {where} lacks the {key!r} entry")
    tasks = data["tasks"]
    for entry, spec in tasks.items():
        if "task" not in spec or spec["task"] not in _BUILDERS:
            raise ValueError(f"preset {where}: entry {entry!r} names no known task")
    noise = data.get("noise", {})
    merged = {e: {"task": s["task"], "params": {**noise, **s.get("params", {})}, **{k: v for k, v in s.items()
              if k not in ("task", "params")}} for e, s in tasks.items()}
    return Preset(name=data["name"], description=data.get("description", ""), image_size=data.get("image_size"),
                  source=data.get("source", ""), tasks=merged, notes=data.get("notes", ""))
