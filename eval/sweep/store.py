"""The sweep's output folder: JSON records, the folder lock and ``sweep.json``.

Every file is written atomically with :mod:`hessdiff.utils.files` (a synced temporary file in the same
folder, renamed into place, the folder synced); leftover temporary files of a killed run are removed at
the next start (:func:`hessdiff.utils.files.remove_temp_files`). The folder is locked (``fcntl.flock``)
while a sweep runs in it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hessdiff.utils.files import atomic_write, is_temp_file

ITEM_FORMAT = "hessdiff.sweep.item/1"
SWEEP_FILE = "sweep.json"
LOCK_FILE = ".lock"
_RUN_KEY = "run"
"""Key of the run-dependent fields of an item record (timing, rank, device); everything else is a
function of the configuration only."""


class SweepError(RuntimeError):
    """A sweep cannot run in the given output folder (locked, not a sweep folder, needs --resume)."""


class SweepMismatchError(SweepError):
    """The output folder holds results of a different sweep configuration."""


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


def write_json(path: Path, obj: Any, *, indent: int | None = None) -> None:
    """Write ``obj`` as JSON (non-finite floats as strings, sorted keys) atomically, replacing ``path``."""
    atomic_write(path, _dumps(obj, indent=indent) + "\n", overwrite=True, mkdir=True)


def _read_json(path: Path) -> Any | None:
    """The parsed file, or None if it is absent or not valid JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


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


def _short(v: Any, limit: int = 70) -> str:
    """``v`` as JSON, shortened at a value boundary: a long dict or list shows its first entries and
    how many more there are; a long string ends in ``...``."""
    text = json.dumps(v, sort_keys=True)
    if len(text) <= limit:
        return text
    if isinstance(v, dict):
        name = v.get("label", v.get("name"))
        head = f"label {json.dumps(name)}, " if name is not None else ""
        return "{" + head + f"{len(v)} keys: " + ", ".join(sorted(v)[:6]) + (", ..." if len(v) > 6 else "") + "}"
    if isinstance(v, list):
        shown = []
        for e in v:
            piece = _short(e, limit // 2)
            if len(", ".join(shown + [piece])) > limit:
                break
            shown.append(piece)
        return "[" + ", ".join(shown) + (f", ... ({len(v) - len(shown)} more)" if len(shown) < len(v) else "") + "]"
    return text[: limit - 3] + "..."


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    """Human-readable differences between two JSON values: dicts key by key, lists entry by entry
    (entries added or removed at the end are named), each value shown whole or cut at a value boundary."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{path}.{k}" if path else k)
        return out
    if isinstance(a, list) and isinstance(b, list) and a != b:
        out = []
        for k in range(min(len(a), len(b))):
            out += _diff(a[k], b[k], f"{path}[{k}]")
        out += [f"{path}[{k}]: added {_short(b[k])}" for k in range(len(a), len(b))]
        out += [f"{path}[{k}]: removed {_short(a[k])}" for k in range(len(b), len(a))]
        return out
    if a != b:
        return [f"{path}: {_short(a)} -> {_short(b)}"]
    return []


def _differences(old: Any, new: Any) -> str:
    diffs = _diff(old, new)
    return "; ".join(diffs[:8]) + (f"; and {len(diffs) - 8} more" if len(diffs) > 8 else "") if diffs else "unknown"


def _prepare_folder(out: Path, identity: dict[str, Any], sweep_hash: str, info: dict[str, Any],
                    resume: bool) -> tuple[str | None, str | None]:
    """Rank 0: check / create ``sweep.json``. Returns ``(error, note)``.

    A folder holding a *different* configuration is extended with ``resume``: ``sweep.json`` takes the
    new identity (the earlier hashes are listed under ``extended_from``), finished items whose result
    identity is unchanged are reused (:func:`~hessdiff.eval.sweep.work._item_done`), the others are
    computed; items of configurations no longer in the sweep stay on disk but leave the summaries."""
    meta_path = out / SWEEP_FILE
    if meta_path.exists():
        meta = _read_json(meta_path)
        if not isinstance(meta, dict) or "sweep_hash" not in meta:
            return f"{meta_path} is not a readable sweep file; refusing to write into {out}", None
        if meta["sweep_hash"] != sweep_hash:
            shown = _differences(meta.get("identity", {}), identity)
            if not resume:
                return (f"{out} holds results of a different sweep configuration (hash {meta['sweep_hash']}, this "
                        f"configuration is {sweep_hash}). Differences: {shown}. Pass --resume (resume=True) to "
                        "extend it: finished items with the same model, task, method options, steps, image and "
                        "seed are reused and the rest is computed; or use another --out folder."), None
            history = list(meta.get("extended_from") or []) + [meta["sweep_hash"]]
            created = (meta.get("info") or {}).get("created", info.get("created"))
            write_json(meta_path, {"format": "hessdiff.sweep/1", "sweep_hash": sweep_hash, "identity": identity,
                                   "info": {**info, "created": created, "extended": info.get("created")},
                                   "extended_from": history}, indent=2)
            return None, (f"configuration changed since the last run in {out} ({meta['sweep_hash']} -> {sweep_hash}): "
                          f"{shown}; finished items whose result does not depend on the change are reused")
        if not resume:
            return (f"{out} already holds this sweep (hash {sweep_hash}); pass --resume (resume=True) to continue "
                    "it: finished items are kept and skipped"), None
        return None, None
    others = [p.name for p in out.iterdir() if p.name != LOCK_FILE and not is_temp_file(p.name)]
    if others:
        return (f"{out} is not empty and is not a sweep folder (found {', '.join(sorted(others)[:5])}); "
                "use a new or empty --out folder"), None
    write_json(meta_path, {"format": "hessdiff.sweep/1", "sweep_hash": sweep_hash, "identity": identity,
                                  "info": info}, indent=2)
    return None, None
