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
