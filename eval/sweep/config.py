"""Sweep configuration files: schema, strict validation, resolution and hashing.

A sweep is described by a TOML file (:func:`load_config`) or a dict of the same shape
(:func:`parse_config`). Every key is checked; an unknown key or a bad value raises
:class:`SweepConfigError` naming the file, the section / entry and the key, e.g.
``sweep.toml: [[methods]] entry 2: unknown key 'stepz' (known: name, label, steps, options)``.

Schema (all sections but ``[[methods]]`` are optional)::

    [sweep]
    name = "ffhq-restoration"     # free text, shown in summaries
    seeds = "0-3"                 # int, list of ints, or "0-3,7,10-12" (EDM style); default [0]
    batch_size = 1                # items processed together (same configuration); default 1
    save_images = true            # write one PNG per item; default true
    interleave = false            # run the methods' batches in turn on the same images (fair wall clock)

    [[models]]                    # diffusion models (omit for model-free methods such as "pinv")
    name = "mnist"                # embedded name, local diffusers folder (relative to this file) or hub id
    label = "mnist"               # name in paths and tables (default: derived from name)

    [data]                        # clean images (restoration sweeps); omit for unconditional generation
    folder = "images/"            # image folder (relative to this file) ...
    embedded = "mnist-test"       # ... or a data set shipped with hessdiff (exactly one of the two)
    first_n = 200                 # use the first N readable images (file order)
    skip = 0                      # ... after the first `skip` ones: a shard of the order (ids, seeds unchanged)
    resolution = 64               # target size (default: the models' resolution); int or [h, w]
    channels = 3                  # 1 or 3 (default: the models' image channels)
    resize = "center-crop"        # see hessdiff.eval.images.RESIZE_MODES
    order = "path"                # "path" or "name"
    recursive = true
    base_seed = 0                 # image i gets seed base_seed + i
    check = "verify"              # "verify" or "decode" (how unreadable files are screened)

    [[tasks]]                     # inverse problems (needs [data])
    name = "super_resolution"     # hessdiff.tasks.TASKS name (or the entry of `preset`)
    label = "sr4"                 # default: name
    preset = "dps-256"            # optional paper preset; `name` is then the preset's entry
    params = { scale = 4, sigma_y = 0.05 }

    [[methods]]                   # samplers / restoration methods (hessdiff.eval.sweep.methods.METHODS)
    name = "ddim"
    label = "ddim"                # default: name; must be unique
    steps = [10, 20, 50]          # int or list; methods that take no steps (pinv) must omit it
    options = { eta = 0.0 }       # method options (unknown options are errors)
    models = ["mnist-ldm"]        # optional: run only on these [[models]] labels (default: every model)

    [metrics]
    paired = ["psnr", "ssim", "lpips_alex"]   # default for restoration sweeps; [] for generation
    fid = true                    # per-configuration FID against the reference set
    kid = false
    features = "auto"             # auto | domain | domain-fashion | inception | pixels | none
    reference = "data"            # "data" (the clean images), a folder, or "embedded:mnist-test"
    reference_first_n = 0         # 0: all reference images
    kid_subsets = 100
    kid_subset_size = 1000
    kid_seed = 0

Resolution fills in every default (task parameters, method options, the feature extractor behind
``"auto"``), so that the resolved configuration (:meth:`SweepConfig.resolved`) states everything
the results depend on; :func:`config_hash` is the SHA-256 of its canonical JSON form. File paths
are resolved relative to the configuration file; the data folder's *path* is not part of the hash
(its file list is, see :mod:`hessdiff.eval.sweep`), so a moved data folder still matches.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hessdiff.eval.sweep._values import (
    SweepConfigError,
    _bool,
    _channels,
    _check_keys,
    _entries,
    _int,
    _label,
    _parse_steps,
    _plain,
    _resolution,
    _resolve_path,
    _slug,
    _str,
    _unique,
    canonical_json,
    config_hash,
    parse_seeds,
)
from hessdiff.utils.seeds import format_seeds
from hessdiff.utils.suggest import did_you_mean

__all__ = [
    "SweepConfigError",
    "ModelEntry",
    "DataEntry",
    "TaskEntry",
    "MethodEntry",
    "MetricsEntry",
    "SweepConfig",
    "load_config",
    "parse_config",
    "parse_seeds",
    "canonical_json",
    "config_hash",
    "EMBEDDED_DATA",
    "TUNE_SIZE",
    "FEATURE_CHOICES",
]

EMBEDDED_DATA = {"mnist-test": "the 500 held-out MNIST digits shipped with hessdiff (1x32x32, class-balanced order)",
                 "fashion-test": "the 1,000 held-out Fashion-MNIST images shipped with hessdiff (1x32x32, "
                                 "class-balanced order)",
                 "mnist-tune": "the last 100 of the mnist-test digits (10 per class), kept for tuning",
                 "fashion-tune": "the last 200 of the fashion-test images (20 per class), kept for tuning"}
"""Data sets shipped with hessdiff, usable as ``[data] embedded = NAME`` or ``reference = "embedded:NAME"``.
The ``*-tune`` sets are the tail of the class-balanced order: a sweep that reports on ``*-test`` with
``first_n`` ≤ 400 (MNIST) / ≤ 800 (Fashion-MNIST) never sees a digit that settings were tuned on."""

#: family -> number of held-out images at the end of the class-balanced order kept for tuning
TUNE_SIZE = {"mnist": 100, "fashion": 200}

FEATURE_CHOICES = ("auto", "domain", "domain-fashion", "inception", "pixels", "none")
"""``[metrics] features`` values: ``domain`` = the embedded MNIST classifier's 128-d features,
``domain-fashion`` = the embedded Fashion-MNIST classifier's,
``inception`` = clean-fid's Inception-v3 (weights needed), ``pixels`` = 8x8 average-pooled pixels
(weight-free smoke-test proxy, not comparable to published FID), ``auto`` = ``domain`` when every
model is an embedded MNIST model, ``domain-fashion`` when every model is an embedded Fashion-MNIST
model, else ``inception``."""

_TOP_KEYS = ("sweep", "models", "data", "tasks", "methods", "metrics")
_SWEEP_KEYS = ("name", "seeds", "batch_size", "save_images", "interleave")
_MODEL_KEYS = ("name", "label")
_DATA_KEYS = ("folder", "embedded", "first_n", "skip", "resolution", "channels", "resize", "order", "recursive",
              "base_seed", "check")
_TASK_KEYS = ("name", "label", "preset", "params")
_METHOD_KEYS = ("name", "label", "steps", "options", "models")
_METRIC_KEYS = ("paired", "fid", "kid", "features", "reference", "reference_first_n", "kid_subsets",
                "kid_subset_size", "kid_seed")
FORMAT = "hessdiff.sweep/1"


# ----------------------------------------------------------------------------------------------
# entries
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelEntry:
    """A diffusion model: ``source`` (embedded name, folder or hub id) shown as ``label``."""

    label: str
    source: str

    def resolved(self) -> dict[str, Any]:
        return {"label": self.label, "source": self.source}


@dataclass(frozen=True)
class DataEntry:
    """Where the clean images come from and how they are prepared (see the module docstring)."""

    folder: Path | None = None
    embedded: str | None = None
    first_n: int | None = None
    skip: int = 0
    resolution: tuple[int, int] | None = None
    channels: int | None = None
    resize: str = "center-crop"
    order: str = "path"
    recursive: bool = True
    base_seed: int = 0
    check: str = "verify"

    def resolved(self) -> dict[str, Any]:
        """Hashed description; the folder's location is deliberately left out (see module docstring).
        ``skip`` appears only when set, so that the hashes of sweeps written before it existed stay valid."""
        return {
            "source": "folder" if self.folder is not None else f"embedded:{self.embedded}",
            "first_n": self.first_n,
            **({"skip": self.skip} if self.skip else {}),
            "resolution": list(self.resolution) if self.resolution else None,
            "channels": self.channels,
            "resize": self.resize,
            "order": self.order,
            "recursive": self.recursive,
            "base_seed": self.base_seed,
            "check": self.check,
        }


@dataclass(frozen=True)
class TaskEntry:
    """An inverse problem: registry ``name`` (or preset entry), resolved ``params``, shown as ``label``."""

    label: str
    name: str
    params: dict[str, Any]
    preset: str | None = None
    task_name: str = ""

    def resolved(self) -> dict[str, Any]:
        return {"label": self.label, "name": self.name, "task": self.task_name, "preset": self.preset,
                "params": self.params}

    def build(self) -> Any:
        """The :class:`hessdiff.tasks.Task`."""
        from hessdiff.tasks import load_preset, make_task

        if self.preset:
            return load_preset(self.preset).task(self.name, **self.params)
        return make_task(self.name, label=self.label, **self.params)


@dataclass(frozen=True)
class MethodEntry:
    """A method from :data:`hessdiff.eval.sweep.methods.METHODS` with resolved options and step counts.

    ``steps`` is ``(0,)`` for methods that take no steps; ``models`` (labels) restricts the method to
    those models, empty for every model. ``task_options``: task name -> the defaults table's per-task
    entries for the options the configuration does not set (:meth:`for_task` applies them).
    """

    label: str
    name: str
    steps: tuple[int, ...]
    options: dict[str, Any]
    models: tuple[str, ...] = ()
    task_options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def resolved(self) -> dict[str, Any]:
        out = {"label": self.label, "name": self.name, "steps": list(self.steps), "options": self.options}
        if self.models:  # only when set, so that configurations without it keep their hashes
            out["models"] = list(self.models)
        if self.task_options:
            out["task_options"] = self.task_options
        return out

    def for_task(self, task: str | None) -> MethodEntry:
        """This entry as it runs on the task named ``task``: its options with that task's entries on top."""
        extra = self.task_options.get(task or "", {})
        return replace(self, options={**self.options, **extra}, task_options={})

    def runs_on(self, model: str) -> bool:
        """Whether this method runs on the model with label ``model``."""
        return not self.models or model in self.models


@dataclass(frozen=True)
class MetricsEntry:
    """Which metrics are computed and how (see the module docstring)."""

    paired: tuple[str, ...] = ()
    fid: bool = False
    kid: bool = False
    features: str = "none"
    reference: str | None = None
    reference_first_n: int = 0
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    kid_seed: int = 0

    @property
    def needs_features(self) -> bool:
        return self.fid or self.kid

    def resolved(self) -> dict[str, Any]:
        ref = self.reference
        if ref is not None and ref not in ("data",) and not ref.startswith("embedded:"):
            ref = "folder"  # the folder's files enter the hash through the reference digest
        return {
            "paired": list(self.paired),
            "fid": self.fid,
            "kid": self.kid,
            "features": self.features,
            "reference": ref,
            "reference_first_n": self.reference_first_n,
            "kid_subsets": self.kid_subsets if self.kid else None,
            "kid_subset_size": self.kid_subset_size if self.kid else None,
            "kid_seed": self.kid_seed if self.kid else None,
        }


@dataclass(frozen=True)
class SweepConfig:
    """A validated sweep configuration with every default filled in."""

    name: str
    seeds: tuple[int, ...]
    batch_size: int
    save_images: bool
    models: tuple[ModelEntry, ...]
    data: DataEntry | None
    tasks: tuple[TaskEntry, ...]
    methods: tuple[MethodEntry, ...]
    metrics: MetricsEntry
    interleave: bool = False
    source: Path | None = field(default=None, compare=False)

    @property
    def is_generation(self) -> bool:
        """True for unconditional generation sweeps (no data, no tasks)."""
        return self.data is None

    def resolved(self) -> dict[str, Any]:
        """The resolved configuration as plain JSON data (what :func:`config_hash` hashes)."""
        return {
            "format": FORMAT,
            "name": self.name,
            "seeds": format_seeds(self.seeds),
            "batch_size": self.batch_size,
            "save_images": self.save_images,
            "models": [m.resolved() for m in self.models],
            "data": self.data.resolved() if self.data else None,
            "tasks": [t.resolved() for t in self.tasks],
            "methods": [m.resolved() for m in self.methods],
            "metrics": self.metrics.resolved(),
            # only when set: the batch order is not part of any result, and older sweeps keep their hash
            **({"interleave": True} if self.interleave else {}),
        }

    def hash(self) -> str:
        return config_hash(self.resolved())


# ----------------------------------------------------------------------------------------------
# parsing
# ----------------------------------------------------------------------------------------------


def _parse_models(name: str, raw: Any, base: Path | None) -> tuple[ModelEntry, ...]:
    out: list[ModelEntry] = []
    for i, entry in enumerate(_entries(f"{name}: [[models]]", raw, "models"), 1):
        where = f"{name}: [[models]] entry {i}"
        t = _check_keys(where, entry, _MODEL_KEYS)
        if "name" not in t:
            raise SweepConfigError(f"{where}: missing key 'name' (an embedded model such as 'mnist', a folder "
                                   "or a hub id)")
        src = _str(where, "name", t["name"])
        # a relative folder is resolved against the configuration file's folder
        if base is not None and not Path(src).is_absolute():
            cand = base / src
            if cand.is_dir():
                src = str(cand.resolve())
        label = _label(where, "label", t["label"]) if "label" in t else _slug(Path(t["name"]).name or t["name"])
        out.append(ModelEntry(label=label, source=src))
    _unique(name, "[[models]]", [m.label for m in out])
    return tuple(out)


def _parse_data(name: str, raw: Any, base: Path | None) -> DataEntry:
    from hessdiff.eval.images import RESIZE_MODES

    where = f"{name}: [data]"
    t = _check_keys(where, raw, _DATA_KEYS)
    if ("folder" in t) == ("embedded" in t):
        raise SweepConfigError(f"{where}: give exactly one of 'folder' (an image folder) or 'embedded' "
                               f"({', '.join(EMBEDDED_DATA)})")
    folder = embedded = None
    if "folder" in t:
        folder = _resolve_path(base, _str(where, "folder", t["folder"]))
        if not folder.is_dir():
            raise SweepConfigError(f"{where}: folder {folder} does not exist or is not a folder")
        folder = folder.resolve()
    else:
        embedded = _str(where, "embedded", t["embedded"], choices=tuple(EMBEDDED_DATA))
    return DataEntry(
        folder=folder,
        embedded=embedded,
        first_n=_int(where, "first_n", t["first_n"], minimum=1) if "first_n" in t else None,
        skip=_int(where, "skip", t.get("skip", 0), minimum=0),
        resolution=_resolution(where, t["resolution"]) if "resolution" in t else None,
        channels=_channels(where, t["channels"]) if "channels" in t else None,
        resize=_str(where, "resize", t.get("resize", "center-crop"), choices=tuple(RESIZE_MODES)),
        order=_str(where, "order", t.get("order", "path"), choices=("path", "name")),
        recursive=_bool(where, "recursive", t.get("recursive", True)),
        base_seed=_int(where, "base_seed", t.get("base_seed", 0), minimum=0),
        check=_str(where, "check", t.get("check", "verify"), choices=("verify", "decode")),
    )


def _parse_tasks(name: str, raw: Any) -> tuple[TaskEntry, ...]:
    from hessdiff.tasks import TASKS, load_preset, make_task

    out: list[TaskEntry] = []
    for i, entry in enumerate(_entries(f"{name}: [[tasks]]", raw, "tasks"), 1):
        where = f"{name}: [[tasks]] entry {i}"
        t = _check_keys(where, entry, _TASK_KEYS)
        if "name" not in t:
            raise SweepConfigError(f"{where}: missing key 'name' (one of {', '.join(TASKS)})")
        tname = _str(where, "name", t["name"])
        where = f"{where} ({tname!r})"
        params = t.get("params", {})
        if not isinstance(params, Mapping):
            raise SweepConfigError(f"{where}: params must be a table, e.g. params = {{ scale = 4 }}")
        params = _plain(params, where)
        preset = _str(where, "preset", t["preset"]) if "preset" in t else None
        try:
            if preset:
                p = load_preset(preset)
                task_name = p.params(tname)[0]
                task = p.task(tname, **params)
            else:
                if tname not in TASKS:
                    raise SweepConfigError(f"{where}: unknown task {tname!r} (known: {', '.join(TASKS)})"
                                           f"{did_you_mean(tname, TASKS)}")
                task_name = tname
                task = make_task(tname, **params)
        except SweepConfigError:
            raise
        except (ValueError, TypeError, FileNotFoundError) as exc:
            raise SweepConfigError(f"{where}: {exc}") from exc
        label = _label(where, "label", t["label"]) if "label" in t else _slug(tname)
        out.append(TaskEntry(label=label, name=tname, params=_plain(task.params, where), preset=preset,
                             task_name=task_name))
    _unique(name, "[[tasks]]", [t.label for t in out])
    return tuple(out)


def _table_defaults(mname: str, spec: Any, sources: Sequence[str]) -> dict[str, Any]:
    """The method's row of the defaults table (:mod:`hessdiff.samplers.defaults`) for the family the
    entry's models share (the published row otherwise), restricted to the method's options, so that a
    sweep runs what ``hessdiff restore`` and the pipeline run on the same model."""
    from hessdiff.samplers.defaults import DEFAULTS, method_defaults

    if mname not in DEFAULTS:
        return {}
    return {k: v for k, v in method_defaults(mname, _family(sources)).items() if k in spec.options}


def _family(sources: Sequence[str]) -> str | None:
    """The model family an entry's models share (None when they do not share one)."""
    from hessdiff.samplers.defaults import model_family

    families = {model_family(str(src)) for src in sources}
    return families.pop() if len(families) == 1 else None


def _table_task_options(mname: str, spec: Any, sources: Sequence[str], given: Mapping[str, Any]
                        ) -> dict[str, dict[str, Any]]:
    """Task name -> the defaults table's per-task entries of the method's row for the options that the
    configuration does not set (a sweep runs on each task what ``hessdiff restore`` runs on it)."""
    from hessdiff.samplers.defaults import DEFAULTS, task_overrides
    from hessdiff.tasks import TASKS

    if mname not in DEFAULTS:
        return {}
    out = {}
    for task in sorted(TASKS):
        extra = {k: v for k, v in task_overrides(mname, task, _family(sources)).items()
                 if k in spec.options and k not in given}
        if extra:
            out[task] = extra
    return out


def _parse_methods(name: str, raw: Any, methods: Mapping[str, Any], model_labels: Sequence[str] = (),
                   model_sources: Mapping[str, str] | None = None) -> tuple[MethodEntry, ...]:
    out: list[MethodEntry] = []
    for i, entry in enumerate(_entries(f"{name}: [[methods]]", raw, "methods"), 1):
        where = f"{name}: [[methods]] entry {i}"
        t = _check_keys(where, entry, _METHOD_KEYS)
        if "name" not in t:
            raise SweepConfigError(f"{where}: missing key 'name' (one of {', '.join(sorted(methods))})")
        mname = _str(where, "name", t["name"])
        if mname not in methods:
            raise SweepConfigError(f"{where}: unknown method {mname!r} (known: {', '.join(sorted(methods))})"
                                   f"{did_you_mean(mname, methods)}")
        spec = methods[mname]
        where = f"{where} ({mname!r})"
        if spec.uses_steps:
            if "steps" not in t:
                raise SweepConfigError(f"{where}: missing key 'steps' (e.g. steps = [10, 20, 50])")
            steps = _parse_steps(where, t["steps"])
        else:
            if "steps" in t:
                raise SweepConfigError(f"{where}: method {mname!r} takes no steps; remove 'steps'")
            steps = (0,)
        opts = t.get("options", {})
        if not isinstance(opts, Mapping):
            raise SweepConfigError(f"{where}: options must be a table, e.g. options = {{ eta = 0.0 }}")
        entry_models = t.get("models") or model_labels
        entry_models = [entry_models] if isinstance(entry_models, str) else entry_models
        sources = [str((model_sources or {}).get(lb, lb)) for lb in entry_models if isinstance(lb, str)]
        try:
            options = spec.resolve_options({**_table_defaults(mname, spec, sources), **dict(opts)})
            task_options = _table_task_options(mname, spec, sources, opts)
        except ValueError as exc:
            raise SweepConfigError(f"{where}: {exc}") from exc
        label = _label(where, "label", t["label"]) if "label" in t else _slug(mname)
        mlabels: tuple[str, ...] = ()
        if "models" in t:
            raw_models = t["models"]
            if isinstance(raw_models, str):
                raw_models = [raw_models]
            if (not isinstance(raw_models, list) or not raw_models
                    or not all(isinstance(v, str) for v in raw_models)):
                raise SweepConfigError(f"{where}: models must be a non-empty list of [[models]] labels, "
                                       f"e.g. models = [\"mnist\"]; got {t['models']!r}")
            unknown = [v for v in raw_models if v not in model_labels]
            if unknown:
                raise SweepConfigError(f"{where}: models: unknown model label {unknown[0]!r} (the [[models]] "
                                       f"labels are: {', '.join(model_labels) or 'none'})")
            mlabels = tuple(dict.fromkeys(raw_models))
        out.append(MethodEntry(label=label, name=mname, steps=steps, options=_plain(options, where), models=mlabels,
                               task_options={k: _plain(v, where) for k, v in task_options.items()}))
    _unique(name, "[[methods]]", [m.label for m in out])
    return tuple(out)


def _auto_features(models: Sequence[ModelEntry]) -> str:
    from hessdiff.samplers.models import EMBEDDED_MODELS

    for family, features in (("mnist", "domain"), ("fashion", "domain-fashion")):
        if models and all(EMBEDDED_MODELS.get(m.source, "").startswith(family) for m in models):
            return features
    return "inception"


def _parse_metrics(name: str, raw: Any, *, has_data: bool, models: Sequence[ModelEntry],
                   base: Path | None) -> MetricsEntry:
    from hessdiff.eval.metrics import METRICS

    where = f"{name}: [metrics]"
    t = _check_keys(where, raw, _METRIC_KEYS)
    default_paired = ["psnr", "ssim", "lpips_alex"] if has_data else []
    paired = t.get("paired", default_paired)
    if not isinstance(paired, list) or not all(isinstance(p, str) for p in paired):
        raise SweepConfigError(f"{where}: paired must be a list of metric names ({', '.join(METRICS)})")
    for p in paired:
        if p not in METRICS:
            raise SweepConfigError(f"{where}: paired: unknown metric {p!r} (known: {', '.join(METRICS)})")
    if len(set(paired)) != len(paired):
        raise SweepConfigError(f"{where}: paired lists a metric twice: {paired}")
    if paired and not has_data:
        raise SweepConfigError(f"{where}: paired metrics {paired} need clean images; add a [data] section "
                               "or set paired = [] for a generation sweep")
    fid = _bool(where, "fid", t.get("fid", True))
    kid = _bool(where, "kid", t.get("kid", False))
    features = _str(where, "features", t.get("features", "auto"), choices=FEATURE_CHOICES)
    if features == "auto":
        features = _auto_features(models) if (fid or kid) else "none"
    if features == "none" and (fid or kid):
        raise SweepConfigError(f"{where}: features = 'none' but fid/kid are requested; choose a feature extractor")
    if not (fid or kid):
        features = "none"
    reference: str | None = None
    if fid or kid:
        ref = t.get("reference", "data" if has_data else None)
        if ref is None:
            raise SweepConfigError(f"{where}: FID/KID of a generation sweep needs 'reference' (an image folder "
                                   f"or 'embedded:{next(iter(EMBEDDED_DATA))}'), or set fid = false")
        ref = _str(where, "reference", ref)
        if ref == "data":
            if not has_data:
                raise SweepConfigError(f"{where}: reference = 'data' but there is no [data] section")
        elif ref.startswith("embedded:"):
            if ref.split(":", 1)[1] not in EMBEDDED_DATA:
                raise SweepConfigError(f"{where}: reference {ref!r}: unknown embedded data set "
                                       f"(known: {', '.join('embedded:' + k for k in EMBEDDED_DATA)})")
        else:
            path = _resolve_path(base, ref)
            if not path.is_dir():
                raise SweepConfigError(f"{where}: reference folder {path} does not exist")
            ref = str(path.resolve())
        reference = ref
    elif "reference" in t:
        reference = None
    return MetricsEntry(
        paired=tuple(paired),
        fid=fid,
        kid=kid,
        features=features,
        reference=reference,
        reference_first_n=_int(where, "reference_first_n", t.get("reference_first_n", 0), minimum=0),
        kid_subsets=_int(where, "kid_subsets", t.get("kid_subsets", 100), minimum=1),
        kid_subset_size=_int(where, "kid_subset_size", t.get("kid_subset_size", 1000), minimum=2),
        kid_seed=_int(where, "kid_seed", t.get("kid_seed", 0), minimum=0),
    )


def parse_config(raw: Mapping[str, Any], *, name: str = "sweep config", base_dir: str | os.PathLike | None = None,
                 methods: Mapping[str, Any] | None = None, source: Path | None = None) -> SweepConfig:
    """Validate a configuration given as a dict (the TOML file's content) and fill in defaults.

    Args:
        name: how the configuration is named in error messages (the file name).
        base_dir: folder that relative paths are resolved against (default: the current folder).
        methods: method registry (default :data:`hessdiff.eval.sweep.methods.METHODS`).

    Raises:
        SweepConfigError: unknown key, bad value, missing section (the message names them).
    """
    if methods is None:
        from hessdiff.eval.sweep.methods import METHODS as methods  # noqa: N811
    base = Path(base_dir) if base_dir is not None else None
    top = _check_keys(name, raw, _TOP_KEYS)
    sweep = _check_keys(f"{name}: [sweep]", top.get("sweep", {}), _SWEEP_KEYS)
    w = f"{name}: [sweep]"
    sname = _str(w, "name", sweep["name"]) if "name" in sweep else (source.stem if source else "sweep")
    seeds = parse_seeds(sweep.get("seeds", [0]), f"{w} seeds")
    batch_size = _int(w, "batch_size", sweep.get("batch_size", 1), minimum=1)
    save_images = _bool(w, "save_images", sweep.get("save_images", True))
    interleave = _bool(w, "interleave", sweep.get("interleave", False))

    models = _parse_models(name, top["models"], base) if "models" in top else ()
    data = _parse_data(name, top["data"], base) if "data" in top else None
    if "methods" not in top:
        raise SweepConfigError(f"{name}: no [[methods]] given; add at least one, e.g.\n"
                               "[[methods]]\nname = \"ddim\"\nsteps = [10, 20]")
    mlist = _parse_methods(name, top["methods"], methods, [m.label for m in models],
                           {m.label: m.source for m in models})
    if "tasks" in top:
        if data is None:
            raise SweepConfigError(f"{name}: [[tasks]] need clean images: add a [data] section")
        tasks = _parse_tasks(name, top["tasks"])
    else:
        tasks = ()
    if data is not None and not tasks:
        raise SweepConfigError(f"{name}: a [data] section needs at least one [[tasks]] entry (e.g. name = "
                               "\"super_resolution\"); for unconditional generation remove [data]")
    for i, m in enumerate(mlist, 1):
        spec = methods[m.name]
        if spec.needs_model and not models:
            raise SweepConfigError(f"{name}: [[methods]] entry {i} ({m.name!r}) needs a diffusion model; "
                                   "add a [[models]] entry (e.g. name = \"mnist\")")
        if spec.needs_measurement and data is None:
            raise SweepConfigError(f"{name}: [[methods]] entry {i} ({m.name!r}) restores measurements; add "
                                   "[data] and [[tasks]] sections")
    if not models and data is not None and (data.resolution is None):
        raise SweepConfigError(f"{name}: [data]: without [[models]] the image size must be given: resolution = ...")
    metrics = _parse_metrics(name, top.get("metrics", {}), has_data=data is not None, models=models, base=base)
    return SweepConfig(name=sname, seeds=seeds, batch_size=batch_size, save_images=save_images, models=models,
                       data=data, tasks=tasks, methods=mlist, metrics=metrics, interleave=interleave,
                       source=source)


def check_models(cfg: SweepConfig) -> None:
    """Refuse a configuration whose models cannot be found (not embedded, no such folder, not a hub id),
    before anything is computed or written: :class:`SweepConfigError` naming the entry."""
    from hessdiff.samplers.models import ModelLoadError, _resolve_local

    where = f"{cfg.source.name}: " if cfg.source else ""
    for m in cfg.models:
        try:
            _resolve_local(m.source)
        except ModelLoadError as exc:
            raise SweepConfigError(f"{where}[[models]] {m.label!r}: {exc}") from exc


def load_config(path: str | os.PathLike, *, methods: Mapping[str, Any] | None = None) -> SweepConfig:
    """Read and validate a TOML sweep configuration (relative paths are resolved against its folder).

    Raises:
        FileNotFoundError: the file does not exist.
        SweepConfigError: the file is not valid TOML or does not follow the schema.
    """
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError as exc:
            raise ImportError("reading TOML sweep files on Python 3.10 needs the tomli package "
                              "(pip install tomli); Python 3.11+ has it built in") from exc

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"sweep configuration {p} not found")
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise SweepConfigError(f"{p.name}: not valid TOML: {exc}") from exc
    return parse_config(raw, name=p.name, base_dir=p.resolve().parent, methods=methods, source=p.resolve())
