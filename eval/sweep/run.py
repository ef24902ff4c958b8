"""Benchmark sweeps: models x tasks x methods x step counts x images x seeds, resumable and multi-process.

A sweep (configured by a TOML file, see :mod:`hessdiff.eval.sweep_config`) is a fixed, ordered list of
*items*. A sample item is one image produced by one configuration (model, task, method, step count)
for one clean image (restoration sweeps) and one seed; a reference item is the feature vector of one
reference image (for FID / KID). :func:`run_sweep` computes the items that are not done yet and then
rebuilds the summaries from everything on disk.

Output folder (``out``)::

    sweep.json                     resolved configuration, data digests and the sweep hash
    items/<model>/<task>/<method>/steps-<k>/<image-id>_s<seed>.png    the image (seed<seed>.png when generating)
                                   ... .json   per-item result (the record of completion)
                                   ... .npy    per-item features (when FID/KID are computed)
    reference/<model>/<image-id>.npy / .json   reference features
    results.jsonl                  one line per finished sample item, in item order
    summary.csv / summary.md / summary.json    per-configuration mean ± sd, FID / KID, NFE, time
    plots/<metric>.png             each metric against NFE, one line per method (per model and task)

Determinism
-----------
* Image ``i`` of the data set has seed ``s_i = base_seed + i``; its measurement (mask / kernel /
  noise) is drawn from ``s_i`` only, so every method, step count and seed sees the same ``y``.
* The method's generator of item (image ``i``, seed ``s``) is seeded with :func:`sampler_seed` of
  ``(s_i, s)`` (with ``s`` itself when generating without data).
* Items are grouped into batches of ``batch_size`` items of one configuration in the fixed item
  order; a batch is always computed whole (also when some of its items are already done, which are
  then not rewritten). Results therefore do not depend on the order of work, on interruptions or on
  the number of processes; with ``batch_size = 1`` no two images ever share a computation.

Crash safety
------------
Every file is written to a temporary file in the same folder, flushed with ``fsync`` and renamed into
place (``os.replace``), and the folder is synced. An item's ``.json`` is written last and is the
only record of completion: an item counts as done when its ``.json`` parses, belongs to this sweep
and its image / features files exist. A kill at any moment therefore leaves finished items intact
and unfinished ones absent; a restart (``resume=True``) computes exactly the missing items. The
summaries are rebuilt from the per-item files, never appended to. Leftover temporary files of a
killed run are removed at the next start. The folder is locked (``fcntl.flock``) while a sweep runs
in it, and a folder holding another configuration's results is refused (:class:`SweepMismatchError`).

Several processes
-----------------
Under ``torchrun --nproc_per_node N`` (``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` in the
environment) the process group is initialised with ``gloo`` on CPU and ``nccl`` on CUDA (each rank
on ``cuda:LOCAL_RANK``). Rank 0 checks the folder, finds the pending batches and broadcasts them;
rank ``r`` computes pending batches ``r, r + N, ...``. The output folder must be on a file system
shared by all ranks (checked at start). After a barrier, rank 0 reads every item's features from
disk and computes FID / KID once from all of them, in item order, so the numbers equal those of a
single process (never an average of per-rank FIDs).
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import hashlib
import io
import json
import math
import os
import re
import secrets
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hessdiff.eval.sweep_config import (
    MethodEntry,
    SweepConfig,
    SweepConfigError,
    TaskEntry,
    canonical_json,
    config_hash,
    format_seeds,
    load_config,
)

__all__ = [
    "SweepError",
    "SweepMismatchError",
    "SweepReport",
    "run_sweep",
    "sampler_seed",
    "load_results",
    "strip_run_fields",
    "evaluate_folders",
]

ITEM_FORMAT = "hessdiff.sweep.item/1"
SWEEP_FILE = "sweep.json"
LOCK_FILE = ".lock"
_TMP_RE = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")
_RUN_KEY = "run"
"""Key of the run-dependent fields of an item record (timing, rank, device); everything else is a
function of the configuration only."""


class SweepError(RuntimeError):
    """A sweep cannot run in the given output folder (locked, not a sweep folder, needs --resume)."""


class SweepMismatchError(SweepError):
    """The output folder holds results of a different sweep configuration."""


# ----------------------------------------------------------------------------------------------
# atomic files
# ----------------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a synced temporary file and ``os.replace`` (crash-safe)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def _json_value(v: Any) -> Any:
    """JSON-able form: non-finite floats become the strings "inf", "-inf", "nan"."""
    if isinstance(v, Mapping):
        return {str(k): _json_value(u) for k, u in v.items()}
    if isinstance(v, list | tuple):
        return [_json_value(u) for u in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, Path):
        return str(v)
    return v


def _number(v: Any) -> float | None:
    """A metric value read back from JSON (None, a number, or "inf"/"-inf"/"nan")."""
    if v is None:
        return None
    if isinstance(v, str):
        return float(v)
    return float(v)


def _dumps(obj: Any, *, indent: int | None = None) -> str:
    return json.dumps(_json_value(obj), sort_keys=True, indent=indent, ensure_ascii=False, allow_nan=False)


def atomic_write_json(path: Path, obj: Any, *, indent: int | None = None) -> None:
    atomic_write_bytes(path, (_dumps(obj, indent=indent) + "\n").encode())


def _read_json(path: Path) -> Any | None:
    """The parsed file, or None if it is absent or not valid JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------------------------
# processes
# ----------------------------------------------------------------------------------------------


class _Dist:
    """This process's place in a (possibly single-process) run."""

    def __init__(self, device: str) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.owns_group = False
        if device == "auto":
            device = f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"
        elif device == "cuda" and self.world > 1:
            device = f"cuda:{self.local_rank}"
        try:
            self.device = torch.device(device)
        except RuntimeError as err:
            raise SweepError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from err
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise SweepError(f"device {device!r} requested but no CUDA device is available; use --device cpu")
            torch.cuda.set_device(self.device)
        self.backend: str | None = None
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_available():
                raise SweepError("WORLD_SIZE > 1 but torch.distributed is not available in this PyTorch build")
            if dist.is_initialized():
                self.backend = str(dist.get_backend())
            else:
                self.backend = "nccl" if self.device.type == "cuda" else "gloo"
                dist.init_process_group(self.backend, timeout=_dt.timedelta(hours=2))
                self.owns_group = True
            if dist.get_world_size() != self.world or dist.get_rank() != self.rank:
                raise SweepError("RANK / WORLD_SIZE disagree with the initialised process group")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            if self.backend == "nccl":
                dist.barrier(device_ids=[self.device.index or 0])
            else:
                dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj if self.main else None]
        dist.broadcast_object_list(box, src=0, device=self.device if self.backend == "nccl" else None)
        return box[0]

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


class _FolderLock:
    """An exclusive ``flock`` on ``<out>/.lock`` (released by the OS when the process dies)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - non-POSIX: no locking
            return
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            self.fd = None
            raise SweepError(f"{self.path.parent} is in use by another running sweep (lock file {self.path}); "
                             "wait for it to finish or use another output folder") from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# ----------------------------------------------------------------------------------------------
# images
# ----------------------------------------------------------------------------------------------


def _image_id(name: str) -> str:
    stem = name.rsplit(".", 1)[0] if "." in Path(name).name else name
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", stem.replace("/", "__")).strip("._") or "image"


class _ImageSet:
    """Clean images: ids, per-image seeds, a digest of the file list, and uint8 loading at a resolution."""

    def __init__(self, kind: str, *, folder: Path | None = None, embedded: str | None = None,
                 first_n: int | None = None, resize: str = "center-crop", order: str = "path",
                 recursive: bool = True, base_seed: int = 0, check: str = "verify") -> None:
        self.kind = kind
        self.folder, self.embedded = folder, embedded
        self.resize = resize
        self.base_seed = base_seed
        self.skipped: list[tuple[str, str]] = []
        self._datasets: dict[Any, Any] = {}
        if folder is not None:
            from hessdiff.eval.data import ImageFolderDataset

            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                ds = ImageFolderDataset(folder, None, first_n=first_n, resize=resize, recursive=recursive,
                                        order=order, base_seed=base_seed, check=check)
            self.skipped = [(str(p), r) for p, r in ds.skipped]
            if self.skipped:
                warnings.warn(
                    f"{kind}: skipped {len(self.skipped)} unreadable image file(s) in {folder}; first: "
                    f"{self.skipped[0][0]} ({self.skipped[0][1]}); all are listed in sweep.json",
                    stacklevel=3,
                )
            for w in caught:
                if "unreadable" not in str(w.message):
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            self.files = [ds.relative_name(i) for i in range(len(ds))]
            self._abs = list(ds.files)
            sizes = [p.stat().st_size for p in ds.files]
            self.digest = hashlib.sha256(canonical_json([[f, s] for f, s in zip(self.files, sizes,
                                                                                strict=True)]).encode()).hexdigest()
            self._check, self._recursive = check, recursive
        else:
            from hessdiff.eval.images import to_uint8
            from hessdiff.samplers.models import embedded_dataset

            x = embedded_dataset("test")
            if first_n is not None:
                if first_n > x.shape[0]:
                    raise ValueError(f"first_n={first_n} but embedded:{embedded} has only {x.shape[0]} images")
                x = x[:first_n]
            u = to_uint8(x)
            self._uint8 = u.expand(-1, 3, -1, -1).contiguous() if u.shape[1] == 1 else u
            self.files = [f"{embedded}/{i:05d}" for i in range(u.shape[0])]
            self.digest = hashlib.sha256(self._uint8.numpy().tobytes()).hexdigest()
        ids = [_image_id(f) for f in self.files]
        if len(set(ids)) != len(ids):  # e.g. a.png and a.jpg: keep the extensions
            ids = [re.sub(r"[^A-Za-z0-9_.=+-]+", "_", f.replace("/", "__")) for f in self.files]
        self.ids = ids
        self.seeds = [base_seed + i for i in range(len(self.files))]

    def __len__(self) -> int:
        return len(self.files)

    def describe(self) -> dict[str, Any]:
        return {"num_images": len(self), "num_skipped": len(self.skipped), "digest": self.digest}

    def load(self, i: int, resolution: tuple[int, int]) -> torch.Tensor:
        """Image ``i`` as uint8 ``[3, H, W]`` at ``resolution``."""
        if self.folder is None:
            u = self._uint8[i]
            if tuple(u.shape[1:]) != tuple(resolution):
                raise ValueError(f"embedded:{self.embedded} images are {u.shape[1]}x{u.shape[2]}, the model needs "
                                 f"{resolution[0]}x{resolution[1]}")
            return u
        ds = self._datasets.get(resolution)
        if ds is None:
            from hessdiff.eval.data import ImageFolderDataset

            ds = ImageFolderDataset(self.folder, tuple(resolution), files=self._abs, resize=self.resize,
                                    base_seed=self.base_seed, check=self._check)
            self._datasets[resolution] = ds
        u = ds.load_uint8(i)
        if u.shape[0] == 1:
            u = u.expand(3, -1, -1)
        return u


def _to_model_space(u: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` -> float32 ``[B, channels, H, W]`` in [-1, 1] (grey = channel mean)."""
    from hessdiff.eval.images import from_uint8

    x = from_uint8(u)
    if channels == 1:
        return x.mean(dim=1, keepdim=True)
    if channels == 3:
        return x
    raise ValueError(f"models with {channels} image channels are not supported (1 or 3)")


def _to_metric_space(x: torch.Tensor) -> torch.Tensor:
    """float ``[B, C, H, W]`` (C = 1 or 3) in [-1, 1] -> uint8 ``[B, 3, H, W]`` (what is saved as PNG)."""
    from hessdiff.eval.images import to_uint8

    if not bool(torch.isfinite(x).all()):
        raise ValueError("the method returned NaN or infinite pixel values")
    u = to_uint8(x.detach().cpu())
    if u.shape[1] == 1:
        return u.expand(-1, 3, -1, -1).contiguous()
    if u.shape[1] != 3:
        raise ValueError(f"images must have 1 or 3 channels, got {u.shape[1]}")
    return u


def _png_bytes(u: torch.Tensor, grey: bool) -> bytes:
    from PIL import Image

    arr = u.permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[..., 0], mode="L") if grey else Image.fromarray(arr, mode="RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a, dtype=np.float64), allow_pickle=False)
    return buf.getvalue()


def sampler_seed(image_seed: int | None, seed: int) -> int:
    """Seed of an item's generator: ``seed`` when generating, else a 63-bit mix of ``(image_seed, seed)``
    (``numpy.random.SeedSequence([image_seed, seed])``), so that different images get unrelated noise."""
    if image_seed is None:
        return int(seed)
    state = np.random.SeedSequence([int(image_seed), int(seed)]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & (2**63 - 1)


# ----------------------------------------------------------------------------------------------
# work list
# ----------------------------------------------------------------------------------------------

NO_MODEL = "no-model"
UNCONDITIONAL = "unconditional"


@dataclass(frozen=True)
class _Unit:
    """One configuration: every item of a unit differs only by image and seed."""

    kind: str  # "sample" or "reference"
    model: str
    task: TaskEntry | None
    method: MethodEntry | None
    steps: int
    label: str
    folder: str
    config: dict[str, Any]
    config_hash: str


@dataclass(frozen=True)
class _Item:
    index: int
    unit: _Unit
    image: int | None
    seed: int | None
    key: str
    stem: str


def _unit_config(cfg: SweepConfig, model: str, task: TaskEntry | None, method: MethodEntry, steps: int) -> dict:
    m = next((e.resolved() for e in cfg.models if e.label == model), None)
    meth = {k: v for k, v in method.resolved().items() if k != "steps"}
    return {
        "sweep": cfg.name,
        "model": m,
        "task": task.resolved() if task else None,
        "method": meth,
        "steps": steps,
        "seeds": format_seeds(cfg.seeds),
        "batch_size": cfg.batch_size,
        "data": cfg.data.resolved() if cfg.data else None,
        "metrics": cfg.metrics.resolved(),
    }


def _build_work(cfg: SweepConfig, data: _ImageSet | None,
                ref: _ImageSet | None) -> tuple[list[_Item], list[tuple[_Unit, list[_Item]]]]:
    """All items in their fixed order and the fixed batches (reference batches first)."""
    models = [m.label for m in cfg.models] or [NO_MODEL]
    items: list[_Item] = []
    batches: list[tuple[_Unit, list[_Item]]] = []

    def add_unit(unit: _Unit, pairs: Iterable[tuple[int | None, int | None, str, str]]) -> None:
        unit_items = []
        for image, seed, key, stem in pairs:
            it = _Item(len(items), unit, image, seed, key, stem)
            items.append(it)
            unit_items.append(it)
        for j in range(0, len(unit_items), cfg.batch_size):
            batches.append((unit, unit_items[j: j + cfg.batch_size]))

    if ref is not None:
        for model in models:
            folder = f"reference/{model}"
            unit = _Unit("reference", model, None, None, 0, f"{model}/reference", folder,
                         {"model": model, "features": cfg.metrics.features}, "")
            add_unit(unit, ((i, None, f"reference/{model}/{ref.ids[i]}", f"{folder}/{ref.ids[i]}")
                            for i in range(len(ref))))
    tasks: list[TaskEntry | None] = list(cfg.tasks) or [None]
    for model in models:
        for task in tasks:
            tlabel = task.label if task else UNCONDITIONAL
            for method in cfg.methods:
                if not method.runs_on(model):
                    continue
                for steps in method.steps:
                    label = f"{model}/{tlabel}/{method.label}/{steps}"
                    folder = f"items/{model}/{tlabel}/{method.label}/steps-{steps}"
                    conf = _unit_config(cfg, model if model != NO_MODEL else "", task, method, steps)
                    unit = _Unit("sample", model, task, method, steps, label, folder, conf, config_hash(conf))
                    if data is None:
                        pairs = ((None, s, f"{label}/seed{s}", f"{folder}/seed{s:06d}") for s in cfg.seeds)
                    else:
                        pairs = ((i, s, f"{label}/{data.ids[i]}/s{s}", f"{folder}/{data.ids[i]}_s{s}")
                                 for i in range(len(data)) for s in cfg.seeds)
                    add_unit(unit, pairs)
    return items, batches


def _item_done(out: Path, item: _Item, sweep_hash: str) -> bool:
    rec = _read_json(out / f"{item.stem}.json")
    if not isinstance(rec, dict) or rec.get("sweep_hash") != sweep_hash or rec.get("key") != item.key:
        return False
    files = rec.get("files") or {}
    return all((out / p).is_file() for p in files.values() if p)


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------


@dataclass
class SweepReport:
    """What a :func:`run_sweep` call did.

    ``num_items``: sample items in the sweep; ``num_done``: finished sample items now on disk;
    ``num_computed``: items (sample and reference) computed by this process in this call;
    ``seconds``: wall time of this call; ``seconds_per_image``: this process's computing time per
    sample image (``None`` if it computed none); ``files``: the summary files (rank 0 only).
    """

    out: Path
    sweep_hash: str
    num_items: int
    num_done: int
    num_computed: int
    seconds: float
    seconds_per_image: float | None
    rank: int = 0
    world_size: int = 1
    files: dict[str, Path] = field(default_factory=dict)
    summary: list[dict[str, Any]] = field(default_factory=list)
    skipped_files: list[tuple[str, str]] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.num_done == self.num_items


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------


class _Runner:
    def __init__(self, cfg: SweepConfig, out: Path, dist: _Dist, feature_extractor: Any | None) -> None:
        self.cfg, self.out, self.dist = cfg, out, dist
        self.models: dict[str, Any] = {}
        self.tasks: dict[str, Any] = {}
        self._extractor_override = feature_extractor
        self._extractor: Any | None = None
        self.features_missing: str | None = None
        self._suite: Any | None = None

    # ---- lazily built resources -------------------------------------------------------------
    def model(self, label: str) -> Any:
        if label == NO_MODEL:
            return None
        if label not in self.models:
            from hessdiff.eval.sweep_methods import SweepModel

            entry = next(m for m in self.cfg.models if m.label == label)
            self.models[label] = SweepModel.load(label, entry.source, self.dist.device)
        return self.models[label]

    def image_space(self, label: str) -> tuple[tuple[int, int], int]:
        """``((H, W), channels)`` of the images of model ``label``."""
        data = self.cfg.data
        model = self.model(label)
        res = data.resolution if data and data.resolution else None
        ch = data.channels if data and data.channels else None
        if model is not None:
            if res is not None and tuple(res) != model.resolution:
                raise SweepConfigError(f"[data] resolution {list(res)} differs from model {label!r}'s "
                                       f"{list(model.resolution)}")
            if ch is not None and ch != model.channels:
                raise SweepConfigError(f"[data] channels {ch} differs from model {label!r}'s {model.channels}")
            return model.resolution, model.channels
        return tuple(res), ch or 3

    def task(self, entry: TaskEntry) -> Any:
        if entry.label not in self.tasks:
            self.tasks[entry.label] = entry.build()
        return self.tasks[entry.label]

    @property
    def extractor(self) -> Any | None:
        if self._extractor is None and self.features_missing is None and self.cfg.metrics.needs_features:
            if self._extractor_override is not None:
                self._extractor = self._extractor_override
            else:
                from hessdiff.eval.sweep_methods import make_feature_extractor
                from hessdiff.eval.weights import MissingWeightsError

                try:
                    self._extractor = make_feature_extractor(self.cfg.metrics.features, self.dist.device)
                except (MissingWeightsError, OSError) as err:
                    self.features_missing = str(err)
                    warnings.warn(f"FID/KID are skipped: {err}", stacklevel=2)
        return self._extractor

    @property
    def suite(self) -> Any:
        if self._suite is None:
            from hessdiff.eval.metrics import MetricSuite

            with warnings.catch_warnings():
                if not self.dist.main:
                    warnings.simplefilter("ignore")
                self._suite = MetricSuite(paired=self.cfg.metrics.paired, device=self.dist.device)
        return self._suite

    # ---- one batch --------------------------------------------------------------------------
    def run_batch(self, unit: _Unit, items: list[_Item], pending: set[int], images: _ImageSet | None,
                  ref: _ImageSet | None, batch_index: int) -> int:
        t_start = time.perf_counter()
        if unit.kind == "reference":
            return self._reference_batch(unit, items, pending, ref)
        res, channels = self.image_space(unit.model)
        b = len(items)
        clean_u8 = None
        measurement = None
        if images is not None:
            clean_u8 = torch.stack([images.load(it.image, res) for it in items])
            x = _to_model_space(clean_u8, channels)
            clean_u8 = _to_metric_space(x)  # the clean image as the metrics see it (grey models: grey)
            image_seeds = [images.seeds[it.image] for it in items]
            measurement = self.task(unit.task).measure(x.to(self.dist.device), seed=image_seeds)
        else:
            image_seeds = [None] * b
        gens = [torch.Generator().manual_seed(sampler_seed(s_img, it.seed))
                for s_img, it in zip(image_seeds, items, strict=True)]
        from hessdiff.eval.sweep_methods import METHODS, MethodCall

        spec = METHODS[unit.method.name]
        call = MethodCall(model=self.model(unit.model), measurement=measurement, shape=(b, channels, *res),
                          steps=unit.steps, generators=gens, options=dict(unit.method.options),
                          device=self.dist.device)
        if self.dist.device.type == "cuda":
            torch.cuda.synchronize(self.dist.device)
        t0 = time.perf_counter()
        result = spec.fn(call)
        if self.dist.device.type == "cuda":
            torch.cuda.synchronize(self.dist.device)
        method_s = time.perf_counter() - t0
        out_images = result.images
        if tuple(out_images.shape) != (b, channels, *res):
            raise ValueError(f"method {unit.method.name!r} returned images of shape {list(out_images.shape)}, "
                             f"expected {[b, channels, *res]}")
        try:
            fake_u8 = _to_metric_space(out_images)
        except ValueError as err:
            raise ValueError(f"{unit.label}: {err} (items {[it.key for it in items]})") from err
        paired: dict[str, torch.Tensor] = {}
        if clean_u8 is not None and self.cfg.metrics.paired:
            for name, metric in list(self.suite.metrics.items()):
                try:
                    with torch.no_grad():
                        paired[name] = metric(fake_u8, clean_u8).detach().cpu()
                except (RuntimeError, ValueError) as err:  # e.g. images too small for the network
                    del self.suite.metrics[name]
                    self.suite.missing[name] = f"{type(err).__name__} on {res[0]}x{res[1]} images: {err}"
                    warnings.warn(f"metric {name} is skipped: {self.suite.missing[name]}", stacklevel=2)
        feats = None
        if self.extractor is not None:
            with torch.no_grad():
                feats = torch.as_tensor(self.extractor(fake_u8.to(self.dist.device))).detach().cpu().double().numpy()
        missing = dict(self.suite.missing) if self.cfg.metrics.paired else {}
        item_s = (time.perf_counter() - t_start) / b
        written = 0
        for j, it in enumerate(items):
            if it.index not in pending:
                continue
            files: dict[str, str | None] = {"image": None, "features": None}
            if self.cfg.save_images:
                atomic_write_bytes(self.out / f"{it.stem}.png", _png_bytes(fake_u8[j], grey=channels == 1))
                files["image"] = f"{it.stem}.png"
            if feats is not None:
                atomic_write_bytes(self.out / f"{it.stem}.npy", _npy_bytes(feats[j]))
                files["features"] = f"{it.stem}.npy"
            metrics = {name: float(v[j]) for name, v in paired.items()}
            for name in missing:
                metrics[name] = None
            rec = {
                "format": ITEM_FORMAT,
                "sweep_hash": self.sweep_hash,
                "key": it.key,
                "index": it.index,
                "config_label": unit.label,
                "config_hash": unit.config_hash,
                "config": unit.config,
                "image": None if images is None else {"id": images.ids[it.image], "file": images.files[it.image],
                                                       "index": it.image, "seed": images.seeds[it.image]},
                "seed": it.seed,
                "sampler_seed": sampler_seed(image_seeds[j], it.seed),
                "nfe": int(result.nfe),
                "cost": result.cost,
                "metrics": metrics,
                "missing": missing,
                "features_missing": self.features_missing,
                "files": files,
                _RUN_KEY: {
                    "method_s": method_s / b,
                    "item_s": item_s,
                    "batch_index": batch_index,
                    "rank": self.dist.rank,
                    "world_size": self.dist.world,
                    "device": str(self.dist.device),
                    "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                },
            }
            atomic_write_json(self.out / f"{it.stem}.json", rec)
            written += 1
        return written

    def _reference_batch(self, unit: _Unit, items: list[_Item], pending: set[int], ref: _ImageSet) -> int:
        res, channels = self.image_space(unit.model)
        u = torch.stack([ref.load(it.image, res) for it in items])
        u = _to_metric_space(_to_model_space(u, channels))
        ext = self.extractor
        if ext is None:
            return 0
        with torch.no_grad():
            feats = torch.as_tensor(ext(u.to(self.dist.device))).detach().cpu().double().numpy()
        written = 0
        for j, it in enumerate(items):
            if it.index not in pending:
                continue
            atomic_write_bytes(self.out / f"{it.stem}.npy", _npy_bytes(feats[j]))
            atomic_write_json(self.out / f"{it.stem}.json", {
                "format": ITEM_FORMAT, "sweep_hash": self.sweep_hash, "key": it.key, "index": it.index,
                "image": {"id": ref.ids[it.image], "file": ref.files[it.image]},
                "features_name": getattr(ext, "name", None), "files": {"features": f"{it.stem}.npy"},
            })
            written += 1
        return written


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    """Human-readable differences between two JSON values (at most a few)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{path}.{k}" if path else k)
        return out
    if a != b:
        return [f"{path}: {json.dumps(a)[:60]} -> {json.dumps(b)[:60]}"]
    return []


def _clean_temp_files(out: Path) -> int:
    n = 0
    for root, _dirs, files in os.walk(out):
        for name in files:
            if _TMP_RE.match(name):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(root, name))
                    n += 1
    return n


def _prepare_folder(out: Path, identity: dict[str, Any], sweep_hash: str, info: dict[str, Any],
                    resume: bool) -> str | None:
    """Rank 0: check / create ``sweep.json``. Returns an error message or None."""
    meta_path = out / SWEEP_FILE
    if meta_path.exists():
        meta = _read_json(meta_path)
        if not isinstance(meta, dict) or "sweep_hash" not in meta:
            return f"{meta_path} is not a readable sweep file; refusing to write into {out}"
        if meta["sweep_hash"] != sweep_hash:
            diffs = _diff(meta.get("identity", {}), identity)
            shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
            return (f"{out} holds results of a different sweep configuration (hash {meta['sweep_hash']}, this "
                    f"configuration is {sweep_hash}); refusing to mix results. Differences: {shown or 'unknown'}. "
                    "Use another --out folder (or remove the old one yourself).")
        if not resume:
            return (f"{out} already holds this sweep (hash {sweep_hash}); pass --resume (resume=True) to continue "
                    "it: finished items are kept and skipped")
        return None
    others = [p.name for p in out.iterdir() if p.name != LOCK_FILE and not _TMP_RE.match(p.name)]
    if others:
        return (f"{out} is not empty and is not a sweep folder (found {', '.join(sorted(others)[:5])}); "
                "use a new or empty --out folder")
    atomic_write_json(meta_path, {"format": "hessdiff.sweep/1", "sweep_hash": sweep_hash, "identity": identity,
                                  "info": info}, indent=2)
    return None


def run_sweep(
    config: SweepConfig | str | os.PathLike,
    out: str | os.PathLike,
    *,
    resume: bool = False,
    limit: int | None = None,
    device: str = "auto",
    progress: bool = False,
    feature_extractor: Any | None = None,
    plots: bool = True,
    log: Callable[[str], None] | None = None,
) -> SweepReport:
    """Run (or continue) a sweep in ``out`` and rebuild its summaries.

    Args:
        config: a :class:`~hessdiff.eval.sweep_config.SweepConfig` or the path of a TOML file.
        out: output folder (created if missing; must be empty, or hold this same sweep).
        resume: continue a sweep already started in ``out`` (finished items are skipped). Without
            it, a folder that already holds this sweep is refused.
        limit: compute at most about ``limit`` more sample items in this call (rounded up to whole
            batches; pending reference features are always computed), then write the (partial) summaries.
        device: ``"auto"`` (``cuda:LOCAL_RANK`` if available, else CPU), ``"cpu"``, ``"cuda"``...
        progress: show a tqdm progress bar with ETA (rank 0).
        feature_extractor: use this FID/KID extractor instead of ``[metrics] features`` (its
            ``name`` replaces the configured one in the sweep's identity).
        plots: write ``plots/<metric>.png`` (needs matplotlib).
        log: where to send one-line messages (default: nothing).

    Raises:
        SweepConfigError: invalid configuration; SweepMismatchError: ``out`` holds another sweep;
        SweepError: ``out`` is locked, not a sweep folder, or needs ``resume``;
        ValueError / FileNotFoundError: bad data (e.g. a folder without readable images).
    """
    t_begin = time.perf_counter()
    cfg = config if isinstance(config, SweepConfig) else load_config(config)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of items, got {limit}")
    say = log or (lambda s: None)
    out = Path(out)
    dist = _Dist(device)
    lock = _FolderLock(out / LOCK_FILE)
    try:
        if dist.main:
            out.mkdir(parents=True, exist_ok=True)
            lock.acquire()
        # -- data and identity (every rank, deterministic) --
        data = None
        if cfg.data is not None:
            d = cfg.data
            data = _ImageSet("data", folder=d.folder, embedded=d.embedded, first_n=d.first_n, resize=d.resize,
                             order=d.order, recursive=d.recursive, base_seed=d.base_seed, check=d.check)
        ref = None
        m = cfg.metrics
        if m.needs_features:
            if m.reference == "data":
                ref = data
            elif m.reference.startswith("embedded:"):
                ref = _ImageSet("reference", embedded=m.reference.split(":", 1)[1],
                                first_n=m.reference_first_n or None)
            else:
                ref = _ImageSet("reference", folder=Path(m.reference), first_n=m.reference_first_n or None)
        resolved = cfg.resolved()
        if feature_extractor is not None and m.needs_features:
            resolved["metrics"]["features"] = f"custom:{getattr(feature_extractor, 'name', 'unnamed')}"
        identity = {"config": resolved, "data": data.describe() if data else None,
                    "reference": ref.describe() if ref is not None and ref is not data else None}
        sweep_hash = config_hash(identity)
        info = {
            "config_file": str(cfg.source) if cfg.source else None,
            "data_folder": str(cfg.data.folder) if cfg.data and cfg.data.folder else None,
            "reference_folder": m.reference if ref is not None and ref.folder is not None and ref is not data else None,
            "skipped_files": [list(s) for s in (data.skipped if data else [])],
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        # -- folder checks (rank 0 decides, everyone follows) --
        err = _prepare_folder(out, identity, sweep_hash, info, resume) if dist.main else None
        err = dist.broadcast(err)
        if err:
            if "different sweep" in err:
                raise SweepMismatchError(err)
            raise SweepError(err)
        dist.barrier()
        meta = _read_json(out / SWEEP_FILE)
        if not isinstance(meta, dict) or meta.get("sweep_hash") != sweep_hash:
            raise SweepError(f"rank {dist.rank} cannot see {out / SWEEP_FILE} written by rank 0: the output "
                             "folder must be on a file system shared by all processes")

        runner = _Runner(cfg, out, dist, feature_extractor)
        runner.sweep_hash = sweep_hash
        has_features = m.needs_features and runner.extractor is not None
        items, batches = _build_work(cfg, data, ref)
        sample_items = [it for it in items if it.unit.kind == "sample"]

        # -- pending work (rank 0 scans, broadcasts) --
        plan = None
        if dist.main:
            removed = _clean_temp_files(out)
            if removed:
                say(f"removed {removed} temporary file(s) left by an interrupted run")
            pending_idx = [it.index for it in items if not _item_done(out, it, sweep_hash)]
            pset = set(pending_idx)
            # without a feature extractor (missing weights) reference items stay pending
            todo = [j for j, (u, its) in enumerate(batches)
                    if (has_features or u.kind == "sample") and any(it.index in pset for it in its)]
            if limit is not None:  # counts sample items; pending reference batches are always included
                kept, count = [], 0
                for j in todo:
                    if batches[j][0].kind == "sample":
                        if count >= limit:
                            continue
                        count += sum(it.index in pset for it in batches[j][1])
                    kept.append(j)
                todo = kept
            plan = {"pending": pending_idx, "batches": todo}
        plan = dist.broadcast(plan)
        pending = set(plan["pending"])
        mine = plan["batches"][dist.rank::dist.world]
        n_sample_done_before = sum(it.index not in pending for it in sample_items)
        total_mine = sum(sum(it.index in pending for it in batches[j][1]) for j in mine)
        if dist.main:
            say(f"sweep {cfg.name!r} ({sweep_hash}): {len(sample_items)} items, {n_sample_done_before} already "
                f"done, {sum(len(batches[j][1]) for j in plan['batches'])} to compute"
                + (f" on {dist.world} processes" if dist.world > 1 else "")
                + (f"; skipped {len(data.skipped)} unreadable file(s)" if data and data.skipped else ""))

        bar = None
        if progress and dist.main and total_mine:
            from tqdm.auto import tqdm

            desc = "sweep" if dist.world == 1 else f"sweep (rank 0 of {dist.world})"
            bar = tqdm(total=total_mine, desc=desc, unit="img", dynamic_ncols=True, smoothing=0.1)
        computed = 0
        sample_time = 0.0
        sample_count = 0
        try:
            for j in mine:
                unit, its = batches[j]
                t0 = time.perf_counter()
                images = ref if unit.kind == "reference" else data
                n = runner.run_batch(unit, its, pending, images, ref, j)
                if unit.kind == "sample":
                    sample_time += time.perf_counter() - t0
                    sample_count += len(its)
                computed += n
                if bar is not None:
                    bar.set_postfix_str(unit.label, refresh=False)
                    bar.update(n)
        finally:
            if bar is not None:
                bar.close()
        dist.barrier()

        report = SweepReport(out=out, sweep_hash=sweep_hash, num_items=len(sample_items), num_done=0,
                             num_computed=computed, seconds=0.0,
                             seconds_per_image=sample_time / sample_count if sample_count else None,
                             rank=dist.rank, world_size=dist.world,
                             skipped_files=list(data.skipped) if data else [])
        if dist.main:
            summary, files, n_done = _finalize(cfg, out, items, sweep_hash, runner, plots)
            report.summary, report.files, report.num_done = summary, files, n_done
        report.seconds = time.perf_counter() - t_begin
        return report
    finally:
        lock.release()
        dist.close()


# ----------------------------------------------------------------------------------------------
# summaries
# ----------------------------------------------------------------------------------------------


def strip_run_fields(record: Mapping[str, Any]) -> dict[str, Any]:
    """An item record without its run-dependent fields (timing, rank, device): what must be identical
    between an interrupted and an uninterrupted run, or between one and several processes."""
    return {k: v for k, v in record.items() if k != _RUN_KEY}


def load_results(out: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of ``out/results.jsonl`` (metric values "inf" / "nan" turned back into floats)."""
    path = Path(out) / "results.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (has the sweep finished once?)")
    recs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            rec = json.loads(line)
            rec["metrics"] = {k: _number(v) for k, v in rec.get("metrics", {}).items()}
            recs.append(rec)
    return recs


def _mean_sd(values: Sequence[float]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    a = np.asarray(vals, dtype=np.float64)
    if not np.isfinite(a).all():
        finite = a[np.isfinite(a)]
        return (float("inf") if np.isposinf(a).any() and not np.isneginf(a).any() else float("nan")), (
            float(finite.std(ddof=1)) if finite.size > 1 else None)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def _finalize(cfg: SweepConfig, out: Path, items: list[_Item], sweep_hash: str, runner: _Runner,
              with_plots: bool) -> tuple[list[dict[str, Any]], dict[str, Path], int]:
    from hessdiff.eval.fid import FeatureStats, fid_from_stats, kernel_inception_distance
    from hessdiff.eval.sweep_methods import METHODS

    m = cfg.metrics
    records: dict[int, dict[str, Any]] = {}
    ref_feats: dict[str, list[np.ndarray]] = {}
    ref_missing: dict[str, int] = {}
    for it in items:
        rec = _read_json(out / f"{it.stem}.json")
        ok = isinstance(rec, dict) and rec.get("sweep_hash") == sweep_hash and rec.get("key") == it.key
        if it.unit.kind == "reference":
            if ok:
                ref_feats.setdefault(it.unit.model, []).append(np.load(out / f"{it.stem}.npy"))
            else:
                ref_missing[it.unit.model] = ref_missing.get(it.unit.model, 0) + 1
        elif ok:
            records[it.index] = rec
    sample_items = [it for it in items if it.unit.kind == "sample"]

    # results.jsonl: every finished sample item, in item order
    lines = [_dumps(records[it.index]) for it in sample_items if it.index in records]
    atomic_write_bytes(out / "results.jsonl", ("\n".join(lines) + ("\n" if lines else "")).encode())

    units: dict[str, tuple[_Unit, list[_Item]]] = {}
    for it in sample_items:
        units.setdefault(it.unit.label, (it.unit, []))[1].append(it)
    summary: list[dict[str, Any]] = []
    for label, (unit, its) in units.items():
        recs = [records[it.index] for it in its if it.index in records]
        row: dict[str, Any] = {
            "config": label,
            "config_hash": unit.config_hash,
            "model": unit.model,
            "task": unit.task.label if unit.task else UNCONDITIONAL,
            "method": unit.method.label,
            "method_name": unit.method.name,
            "uses_steps": METHODS[unit.method.name].uses_steps,
            "steps": unit.steps,
            "n": len(recs),
            "n_expected": len(its),
            "nfe": float(np.mean([r["nfe"] for r in recs])) if recs else None,
            "seconds_per_image": float(np.mean([r[_RUN_KEY]["item_s"] for r in recs])) if recs else None,
            "method_seconds_per_image": float(np.mean([r[_RUN_KEY]["method_s"] for r in recs])) if recs else None,
        }
        costs = [r.get("cost") or {} for r in recs]
        row["cost"] = {k: float(np.mean([c.get(k, 0) for c in costs])) for k in COST_KEYS
                       if any(isinstance(c.get(k), int | float) for c in costs)}
        missing: dict[str, str] = {}
        for r in recs:
            missing.update(r.get("missing") or {})
        for name in m.paired:
            mean, sd = _mean_sd([_number(r["metrics"].get(name)) for r in recs])
            row[name], row[f"{name}_sd"] = mean, sd
        if m.fid or m.kid:
            fid = kid = kid_sd = None
            reason = runner.features_missing
            feats = [out / r["files"]["features"] for r in recs if (r.get("files") or {}).get("features")]
            ref = ref_feats.get(unit.model, [])
            if reason is None:
                if len(feats) < len(recs):
                    reason = f"{len(recs) - len(feats)} item(s) have no features"
                elif ref_missing.get(unit.model):
                    reason = f"{ref_missing[unit.model]} reference image(s) have no features yet"
                elif len(recs) < 2 or len(ref) < 2:
                    reason = f"FID/KID need at least 2 images per set (have {len(recs)} and {len(ref)})"
            if reason is None:
                fake = np.stack([np.load(p) for p in feats])
                real = np.stack(ref)
                if m.fid:
                    fid = fid_from_stats(FeatureStats().update(fake), FeatureStats().update(real))
                if m.kid:
                    kid, kid_sd = kernel_inception_distance(real, fake, num_subsets=m.kid_subsets,
                                                            max_subset_size=m.kid_subset_size, seed=m.kid_seed)
            else:
                for name in ("fid", "kid"):
                    if getattr(m, name):
                        missing[name] = reason
            if m.fid:
                row["fid"] = fid
            if m.kid:
                row["kid"], row["kid_sd"] = kid, kid_sd
            row["n_reference"] = len(ref)
            row["features"] = m.features
        row["missing"] = missing
        summary.append(row)

    files = {
        "results": out / "results.jsonl",
        "csv": out / "summary.csv",
        "markdown": out / "summary.md",
        "json": out / "summary.json",
    }
    n_done = len(records)
    meta = {"sweep": cfg.name, "sweep_hash": sweep_hash, "num_items": len(sample_items), "num_done": n_done,
            "complete": n_done == len(sample_items), "configurations": summary}
    atomic_write_json(files["json"], meta, indent=2)
    metric_names = _metric_columns(cfg)
    atomic_write_bytes(files["csv"], _csv_text(summary, metric_names).encode())
    atomic_write_bytes(files["markdown"], _markdown(cfg, sweep_hash, summary, metric_names, n_done,
                                                    len(sample_items)).encode())
    plots = _plots(out / "plots", summary, metric_names) if with_plots else []
    if plots:
        files["plots"] = out / "plots"
    return summary, files, n_done


#: counted passes of a method's cost record that the summaries average per image
COST_KEYS = ("network_forward", "network_backward", "decoder_forward", "decoder_backward", "encoder_forward",
             "encoder_backward")


def _metric_columns(cfg: SweepConfig) -> list[str]:
    cols = list(cfg.metrics.paired)
    if cfg.metrics.fid:
        cols.append("fid")
    if cfg.metrics.kid:
        cols.append("kid")
    return cols


def _sd_key(name: str) -> str:
    return f"{name}_sd"


def _csv_text(summary: list[dict[str, Any]], metrics: list[str]) -> str:
    buf = io.StringIO()
    cols = ["model", "task", "method", "method_name", "steps", "nfe", "n", "n_expected"]
    for name in metrics:
        cols += [name, _sd_key(name)] if name != "fid" else [name]
    cols += ["seconds_per_image", "method_seconds_per_image", "config_hash"]
    cost_cols = [k for k in COST_KEYS if any(k in (r.get("cost") or {}) for r in summary)]
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols + cost_cols)
    for row in summary:
        vals = []
        for c in cols + cost_cols:
            v = row.get(c) if c in cols else (row.get("cost") or {}).get(c)
            vals.append("" if v is None else (repr(v) if isinstance(v, float) else v))
        w.writerow(vals)
    return buf.getvalue()


def _fmt(v: float | None, digits: int = 4) -> str:
    if v is None:
        return "—"
    if not math.isfinite(v):
        return "inf" if v > 0 else ("-inf" if v < 0 else "nan")
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
        return f"{v:.3g}"
    return f"{v:.{digits}g}"


def _markdown(cfg: SweepConfig, sweep_hash: str, summary: list[dict[str, Any]], metrics: list[str], n_done: int,
              n_items: int) -> str:
    lines = [f"# Sweep `{cfg.name}`", "",
             f"configuration hash `{sweep_hash}`; {n_done} of {n_items} items done"
             + ("" if n_done == n_items else " (**partial results**)") + "; mean ± sd over images and seeds.", ""]
    with_cost = any(r.get("cost") for r in summary)
    header = ["model", "task", "method", "steps", "NFE", "n", *metrics, "s / image"]
    if with_cost:
        header += ["network fwd / bwd", "decoder fwd / bwd"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] * 3 + ["---:"] * (len(header) - 3)) + "|")
    notes: dict[str, str] = {}
    for row in summary:
        cells = [row["model"], row["task"], row["method"], str(row["steps"]) if row["uses_steps"] else "—",
                 _fmt(row["nfe"]), f"{row['n']}" + ("" if row["n"] == row["n_expected"] else f"/{row['n_expected']}")]
        for name in metrics:
            v = row.get(name)
            if v is None and name in row.get("missing", {}):
                notes[name] = row["missing"][name]
                cells.append("— (missing)")
            elif name in ("fid",) or row.get(_sd_key(name)) is None:
                cells.append(_fmt(v))
            else:
                cells.append(f"{_fmt(v)} ± {_fmt(row[_sd_key(name)], 2)}")
        cells.append(_fmt(row["seconds_per_image"], 3))
        if with_cost:
            c = row.get("cost") or {}
            for a, b in (("network_forward", "network_backward"), ("decoder_forward", "decoder_backward")):
                cells.append(f"{_fmt(c.get(a, 0.0))} / {_fmt(c.get(b, 0.0))}" if c else "—")
        lines.append("| " + " | ".join(cells) + " |")
    if notes:
        lines += ["", "Missing metrics:"]
        lines += [f"- **{k}**: {v}" for k, v in sorted(notes.items())]
    if with_cost:
        lines += ["", "Cost per image: NFE as each method's paper counts it; network / decoder passes as counted "
                  "per image (a pass on a batch counts once for each image in it; mean over items)."]
    if any("fid" in r or "kid" in r for r in summary):
        feats = next((r.get("features") for r in summary if r.get("features")), None)
        nref = next((r.get("n_reference") for r in summary if r.get("n_reference") is not None), None)
        lines += ["", f"FID / KID: features `{feats}`, {nref} reference images; computed once from all "
                  "items' features."]
    return "\n".join(lines) + "\n"


def _plots(folder: Path, summary: list[dict[str, Any]], metrics: list[str]) -> list[Path]:
    """One PNG per metric: metric vs NFE, a panel per (model, task), a line per method."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed; no plots are written (pip install matplotlib)", stacklevel=3)
        return []
    written = []
    panels = list(dict.fromkeys((r["model"], r["task"]) for r in summary))  # in configuration order
    for name in metrics:
        if not any(isinstance(r.get(name), float) and math.isfinite(r[name]) for r in summary):
            continue
        ncols = min(3, len(panels))
        nrows = math.ceil(len(panels) / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows), squeeze=False)
        for ax, (model, task) in zip(axes.flat, panels, strict=False):
            rows = [r for r in summary if (r["model"], r["task"]) == (model, task)]
            methods = list(dict.fromkeys(r["method"] for r in rows))
            nfes = [r["nfe"] for r in rows if r["uses_steps"] and r["nfe"]]
            for k, meth in enumerate(methods):
                mr = [r for r in rows if r["method"] == meth and isinstance(r.get(name), float)
                      and math.isfinite(r[name])]
                if not mr:
                    continue
                if not mr[0]["uses_steps"]:
                    ax.axhline(mr[0][name], linestyle="--", linewidth=1.2, color=f"C{k % 10}", label=f"{meth} (NFE 0)")
                    continue
                mr.sort(key=lambda r: r["nfe"])
                x = [r["nfe"] for r in mr]
                y = [r[name] for r in mr]
                sd = [r.get(_sd_key(name)) or 0.0 for r in mr] if name != "fid" else None
                ax.errorbar(x, y, yerr=sd, marker="o", markersize=4, capsize=2, color=f"C{k % 10}", label=meth)
            if nfes and max(nfes) / max(min(nfes), 1e-9) >= 10:
                from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

                ax.set_xscale("log")
                ax.xaxis.set_major_locator(FixedLocator(sorted(set(nfes))))
                ax.xaxis.set_minor_locator(NullLocator())
                ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.set_title(f"{model} / {task}", fontsize=9)
            ax.set_xlabel("NFE")
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(panels):]:
            ax.set_visible(False)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        path = folder / f"{name}.png"
        atomic_write_bytes(path, buf.getvalue())
        written.append(path)
    return written


# ----------------------------------------------------------------------------------------------
# folder-to-folder evaluation
# ----------------------------------------------------------------------------------------------

EVAL_METRICS = ("psnr", "ssim", "lpips", "fid", "kid")


def _pair_files(real: Any, fake: Any) -> list[tuple[int, int]]:
    """Pairs (real index, fake index): a fake file pairs with the real file of the same relative name
    (without extension), or whose name it extends with ``_s<seed>`` (sweep outputs)."""
    by_name = {f.rsplit(".", 1)[0]: i for i, f in enumerate(real.files)}
    by_id = {_image_id(f): i for i, f in enumerate(real.files)}
    pairs, unmatched = [], []
    for j, f in enumerate(fake.files):
        stem = f.rsplit(".", 1)[0]
        base = Path(stem).name
        m = re.fullmatch(r"(.+)_s\d+", base)
        cands = [stem, base] + ([m.group(1)] if m else [])
        i = next((by_name[c] for c in cands if c in by_name), None)
        if i is None:
            i = next((by_id[c] for c in cands if c in by_id), None)
        if i is None:
            unmatched.append(f)
        else:
            pairs.append((i, j))
    if unmatched:
        raise ValueError(f"{len(unmatched)} fake image(s) have no real image of the same name, e.g. "
                         f"{', '.join(unmatched[:3])} (paired metrics match names, or <name>_s<seed>)")
    return pairs


def evaluate_folders(
    real: str | os.PathLike,
    fake: str | os.PathLike,
    *,
    metrics: Sequence[str] = ("fid",),
    features: str = "inception",
    resolution: int | None = None,
    lpips_net: str = "alex",
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    device: str = "cpu",
    batch_size: int = 50,
    feature_extractor: Any | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Metrics of the images in folder ``fake`` against folder ``real``.

    Paired metrics (PSNR, SSIM, LPIPS) pair files by name (see :func:`_pair_files`) and average over
    pairs; FID / KID compare the two sets' features (extractor ``features``, see
    :data:`hessdiff.eval.sweep_methods.FEATURE_EXTRACTORS`). Images are read as RGB uint8 (resized
    to ``resolution`` if given, else they must have equal sizes within a pair). Unreadable files are
    skipped with a warning and counted. Returns a flat dict of values and counts; a metric whose
    weights are missing is ``None`` with the reason under ``"missing"``.
    """
    from hessdiff.eval.fid import FeatureStats, fid_from_stats, kernel_inception_distance
    from hessdiff.eval.metrics import MetricSuite
    from hessdiff.eval.sweep_methods import make_feature_extractor
    from hessdiff.eval.weights import MissingWeightsError

    unknown = [x for x in metrics if x not in EVAL_METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {', '.join(EVAL_METRICS)}")
    if not metrics:
        raise ValueError("no metrics requested")
    res = (resolution, resolution) if resolution else None
    rset = _ImageSet("real", folder=Path(real))
    fset = _ImageSet("fake", folder=Path(fake))
    out: dict[str, Any] = {"num_real": len(rset), "num_fake": len(fset), "skipped_real": len(rset.skipped),
                           "skipped_fake": len(fset.skipped), "missing": {}}
    dev = torch.device(device)

    def load(s: _ImageSet, i: int) -> torch.Tensor:
        if res is not None:
            return s.load(i, res)
        from hessdiff.eval.images import load_image

        return load_image(s._abs[i])

    paired_names = [n if n != "lpips" else f"lpips_{lpips_net}" for n in metrics if n in ("psnr", "ssim", "lpips")]
    if paired_names:
        pairs = _pair_files(rset, fset)
        suite = MetricSuite(paired=paired_names, device=dev)
        it: Iterable[tuple[int, int]] = pairs
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(pairs, desc="paired metrics", unit="img")
        for i, j in it:
            a, b = load(rset, i), load(fset, j)
            if a.shape != b.shape:
                raise ValueError(f"{rset.files[i]} is {tuple(a.shape[1:])} but {fset.files[j]} is "
                                 f"{tuple(b.shape[1:])}; pass --resolution to resize both")
            suite.update(b[None], a[None])
        res_suite = suite.compute()
        for n in paired_names:
            out[n] = res_suite.get(n)
            out[f"{n}_std"] = res_suite.get(f"{n}_std")
        out["num_pairs"] = len(pairs)
        out["missing"].update(res_suite.get("missing", {}))
    if "fid" in metrics or "kid" in metrics:
        try:
            ext = feature_extractor or make_feature_extractor(features, dev)
        except MissingWeightsError as err:
            for n in ("fid", "kid"):
                if n in metrics:
                    out[n] = None
                    out["missing"][n] = str(err)
            return out
        out["feature_extractor"] = getattr(ext, "name", features)
        feats = {}
        for name, s in (("real", rset), ("fake", fset)):
            chunks = []
            idx = range(len(s))
            for k in range(0, len(s), batch_size):
                batch = [load(s, i) for i in idx[k: k + batch_size]]
                shapes = {tuple(b.shape) for b in batch}
                if len(shapes) > 1:
                    raise ValueError(f"{name} images have different sizes {sorted(shapes)[:3]}; pass --resolution")
                with torch.no_grad():
                    chunks.append(torch.as_tensor(ext(torch.stack(batch).to(dev))).double().cpu())
            feats[name] = torch.cat(chunks)
        if "fid" in metrics:
            out["fid"] = fid_from_stats(FeatureStats().update(feats["fake"]), FeatureStats().update(feats["real"]))
        if "kid" in metrics:
            out["kid"], out["kid_std"] = kernel_inception_distance(feats["real"], feats["fake"],
                                                                   num_subsets=kid_subsets,
                                                                   max_subset_size=kid_subset_size)
    return out


def _main() -> int:  # pragma: no cover - convenience: python -m hessdiff.eval.sweep CONFIG OUT
    from hessdiff.scripts.cli import main

    return main(["sweep", *sys.argv[1:]])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(_main())
