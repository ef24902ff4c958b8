"""The work list of a sweep: every item in its fixed order, and the fixed batches."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hessdiff.eval.sweep.config import MethodEntry, SweepConfig, TaskEntry, config_hash
from hessdiff.eval.sweep.images import _ImageSet
from hessdiff.eval.sweep.store import _read_json
from hessdiff.utils.seeds import format_seeds

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
    reuse: str = ""  # what the result depends on (see _reuse_hash): a finished item with the same is reused


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


def _image_identity(images: _ImageSet | None, i: int | None) -> dict[str, Any] | None:
    """What an item's result depends on of its clean image: content, the per-image (measurement) seed and
    the resize rule -- not its position in the folder or how many images the sweep has."""
    if images is None or i is None:
        return None
    return {"content": images.content[i], "seed": images.seeds[i], "resize": images.resize}


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json")


def _model_fingerprint(source: str) -> str | None:
    """A content hash of a local model folder's weight and config files (an embedded model retrained
    in place must not reuse old results); None for a hub id (its name is its identity)."""
    import hashlib

    from hessdiff.samplers.models import ModelLoadError, _resolve_local

    try:
        folder = _resolve_local(source)
    except ModelLoadError:
        return None
    if folder is None:
        return None
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if (not p.is_file() or p.suffix not in _WEIGHT_SUFFIXES or "checkpoint" in rel.parts
                or p.name.startswith("lml_stats")):  # sampler statistics, not the network's weights
            continue
        h.update(str(rel).encode() + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda f=f: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _reuse_hash(cfg: SweepConfig, model: dict | None, task: TaskEntry | None, method: dict | None, steps: int,
                image: dict | None, seed: int | None, features: str | None = None) -> str:
    """The identity of one item's result: model, task, method options, steps, image and seed, and the
    per-item outputs asked for (paired metrics, features, images). The batch size, the seed list, the
    other images and the sweep's name do not enter it (results do not depend on them: per-sample
    generators), so a finished item is reused when a sweep is extended (:func:`_item_done`)."""
    m = cfg.metrics
    outputs = {"paired": list(m.paired), "features": (features or m.features) if m.needs_features else None,
               "images": cfg.save_images}
    return config_hash({"model": model, "task": task.resolved() if task else None, "method": method,
                        "steps": steps, "image": image, "seed": seed, "outputs": outputs})


def _build_work(cfg: SweepConfig, data: _ImageSet | None, ref: _ImageSet | None,
                features: str | None = None) -> tuple[list[_Item], list[tuple[_Unit, list[_Item]]]]:
    """All items in their fixed order and the fixed batches (reference batches first). ``features``:
    the name of the feature extractor in use when it is not the configured one."""
    models = [m.label for m in cfg.models] or [NO_MODEL]
    items: list[_Item] = []
    batches: list[tuple[_Unit, list[_Item]]] = []
    fingerprints: dict[str, str | None] = {}

    def add_unit(unit: _Unit, pairs: Iterable[tuple[int | None, int | None, str, str]]) -> None:
        unit_items = []
        model_entry = next(({**e.resolved(), "weights": fingerprints.setdefault(e.source, _model_fingerprint(e.source))}
                            for e in cfg.models if e.label == unit.model), None)
        method_entry = None if unit.method is None else \
            {k: v for k, v in unit.method.resolved().items() if k not in ("steps", "label", "models")}
        for image, seed, key, stem in pairs:
            images = ref if unit.kind == "reference" else data
            reuse = _reuse_hash(cfg, model_entry, unit.task, method_entry, unit.steps,
                                _image_identity(images, image), seed, features)
            it = _Item(len(items), unit, image, seed, key, stem, reuse)
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
            for entry in cfg.methods:
                if not entry.runs_on(model):
                    continue
                method = entry.for_task(task.task_name if task else None)
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
    return items, (_interleaved(batches) if cfg.interleave else batches)


def _interleaved(batches: list[tuple[_Unit, list[_Item]]]) -> list[tuple[_Unit, list[_Item]]]:
    """The batches in turn: for each model and task, the k-th batch of every (method, steps) unit (the same
    images), the units' order rotated by k, so that every method meets the same machine load."""
    out = [b for b in batches if b[0].kind != "sample"]
    groups: dict[tuple[str, str], dict[str, list[tuple[_Unit, list[_Item]]]]] = {}
    for b in batches:
        if b[0].kind == "sample":
            unit = b[0]
            key = (unit.model, unit.task.label if unit.task else UNCONDITIONAL)
            groups.setdefault(key, {}).setdefault(unit.label, []).append(b)
    for units in groups.values():
        lists = list(units.values())
        for k in range(max(len(u) for u in lists)):
            for r in range(len(lists)):
                unit_batches = lists[(k + r) % len(lists)]
                if k < len(unit_batches):
                    out.append(unit_batches[k])
    return out


def _record_current(rec: Any, item: _Item, sweep_hash: str) -> bool:
    """Whether ``rec`` (an item file's JSON) is the result of ``item``: same key, and the same result
    identity (``reuse``; records written before it existed: the same sweep hash)."""
    if not isinstance(rec, dict) or rec.get("key") != item.key:
        return False
    if "reuse" in rec:
        return rec["reuse"] == item.reuse
    return rec.get("sweep_hash") == sweep_hash


def _item_done(out: Path, item: _Item, sweep_hash: str) -> bool:
    rec = _read_json(out / f"{item.stem}.json")
    if not _record_current(rec, item, sweep_hash):
        return False
    files = rec.get("files") or {}
    return all((out / p).is_file() for p in files.values() if p)
