"""Running a sweep: :func:`run_sweep` computes the pending batches (on one process or several) and
rebuilds the summaries; see :mod:`hessdiff.eval.sweep` for the folder layout and the guarantees."""

from __future__ import annotations

import datetime as _dt
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hessdiff.eval.sweep.config import (
    SweepConfig,
    SweepConfigError,
    TaskEntry,
    check_models,
    config_hash,
    load_config,
)
from hessdiff.eval.sweep.images import (
    _ImageSet,
    _npy_bytes,
    _to_metric_space,
    _to_model_space,
    sampler_seed,
)
from hessdiff.eval.sweep.processes import _Dist
from hessdiff.eval.sweep.store import (
    _RUN_KEY,
    ITEM_FORMAT,
    LOCK_FILE,
    SWEEP_FILE,
    SweepError,
    SweepMismatchError,
    _FolderLock,
    _prepare_folder,
    _read_json,
    write_json,
)
from hessdiff.eval.sweep.summary import _finalize
from hessdiff.eval.sweep.work import NO_MODEL, _build_work, _Item, _item_done, _Unit
from hessdiff.utils.files import atomic_write, is_temp_file, remove_temp_files
from hessdiff.utils.images import save_image

__all__ = ["SweepReport", "run_sweep"]


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
            from hessdiff.eval.sweep.methods import SweepModel

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
                from hessdiff.eval.metrics.weights import MissingWeightsError
                from hessdiff.eval.sweep.methods import make_feature_extractor

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
        """Run one batch of a configuration; write the records (and images / features) of its ``pending``
        items. Returns how many were written."""
        t_start = time.perf_counter()
        if unit.kind == "reference":
            return self._reference_batch(unit, items, pending, ref)
        res, channels = self.image_space(unit.model)
        b = len(items)
        clean_u8, measurement, image_seeds = self._inputs(unit, items, images, res, channels)
        gens = [torch.Generator().manual_seed(sampler_seed(s_img, it.seed))
                for s_img, it in zip(image_seeds, items, strict=True)]
        result, method_s = self._call_method(unit, measurement, gens, (b, channels, *res))
        try:
            fake_u8 = _to_metric_space(result.images)
        except ValueError as err:
            raise ValueError(f"{unit.label}: {err} (items {[it.key for it in items]})") from err
        paired = self._paired_metrics(fake_u8, clean_u8, res)
        feats = None
        if self.extractor is not None:
            with torch.no_grad():
                feats = torch.as_tensor(self.extractor(fake_u8.to(self.dist.device))).detach().cpu().double().numpy()
        timing = {"method_s": method_s / b, "item_s": (time.perf_counter() - t_start) / b, "batch_index": batch_index}
        return self._write_items(unit, items, pending, images, image_seeds, result, fake_u8, channels, paired,
                                 feats, timing)

    def _inputs(self, unit: _Unit, items: list[_Item], images: _ImageSet | None, res: tuple[int, int],
                channels: int) -> tuple[torch.Tensor | None, Any, list[int | None]]:
        """``(clean uint8 images as the metrics see them, the task's measurement, per-image seeds)``; all
        ``None`` for unconditional generation."""
        if images is None:
            return None, None, [None] * len(items)
        clean_u8 = torch.stack([images.load(it.image, res) for it in items])
        x = _to_model_space(clean_u8, channels)
        clean_u8 = _to_metric_space(x)  # the clean image as the metrics see it (grey models: grey)
        image_seeds: list[int | None] = [images.seeds[it.image] for it in items]
        return clean_u8, self.task(unit.task).measure(x.to(self.dist.device), seed=image_seeds), image_seeds

    def _call_method(self, unit: _Unit, measurement: Any, gens: list[torch.Generator],
                     shape: tuple[int, ...]) -> tuple[Any, float]:
        """Run the configuration's method on one batch; ``(its result, seconds)`` (CUDA synchronised)."""
        from hessdiff.eval.sweep.methods import METHODS, MethodCall

        call = MethodCall(model=self.model(unit.model), measurement=measurement, shape=shape,
                          steps=unit.steps, generators=gens, options=dict(unit.method.options),
                          device=self.dist.device)
        if self.dist.device.type == "cuda":
            torch.cuda.synchronize(self.dist.device)
        t0 = time.perf_counter()
        try:
            result = METHODS[unit.method.name].fn(call)
        except ValueError as err:  # e.g. a run that diverged to NaN: name the configuration it happened in
            raise ValueError(f"{unit.label}: {err}") from err
        if self.dist.device.type == "cuda":
            torch.cuda.synchronize(self.dist.device)
        method_s = time.perf_counter() - t0
        if tuple(result.images.shape) != tuple(shape):
            raise ValueError(f"method {unit.method.name!r} returned images of shape {list(result.images.shape)}, "
                             f"expected {list(shape)}")
        return result, method_s

    def _paired_metrics(self, fake_u8: torch.Tensor, clean_u8: torch.Tensor | None,
                        res: tuple[int, int]) -> dict[str, torch.Tensor]:
        """Per-image paired metrics against the clean images; a metric that cannot run on these images is
        dropped from the suite (and recorded as missing) with a warning."""
        paired: dict[str, torch.Tensor] = {}
        if clean_u8 is None or not self.cfg.metrics.paired:
            return paired
        for name, metric in list(self.suite.metrics.items()):
            try:
                with torch.no_grad():
                    paired[name] = metric(fake_u8, clean_u8).detach().cpu()
            except (RuntimeError, ValueError) as err:  # e.g. images too small for the network
                del self.suite.metrics[name]
                self.suite.missing[name] = f"{type(err).__name__} on {res[0]}x{res[1]} images: {err}"
                warnings.warn(f"metric {name} is skipped: {self.suite.missing[name]}", stacklevel=3)
        return paired

    def _write_items(self, unit: _Unit, items: list[_Item], pending: set[int], images: _ImageSet | None,
                     image_seeds: list[int | None], result: Any, fake_u8: torch.Tensor, channels: int,
                     paired: dict[str, torch.Tensor], feats: np.ndarray | None, timing: dict[str, Any]) -> int:
        """Each pending item's image, features and record (the record last: it marks the item done)."""
        missing = dict(self.suite.missing) if self.cfg.metrics.paired else {}
        written = 0
        for j, it in enumerate(items):
            if it.index not in pending:
                continue
            files: dict[str, str | None] = {"image": None, "features": None}
            if self.cfg.save_images:
                save_image(fake_u8[j, :1] if channels == 1 else fake_u8[j], self.out / f"{it.stem}.png",
                           overwrite=True, mkdir=True)
                files["image"] = f"{it.stem}.png"
            if feats is not None:
                atomic_write(self.out / f"{it.stem}.npy", _npy_bytes(feats[j]), overwrite=True, mkdir=True)
                files["features"] = f"{it.stem}.npy"
            metrics: dict[str, float | None] = {name: float(v[j]) for name, v in paired.items()}
            for name in missing:
                metrics[name] = None
            rec = {
                "format": ITEM_FORMAT,
                "sweep_hash": self.sweep_hash,
                "key": it.key,
                "reuse": it.reuse,
                "index": it.index,
                "config_label": unit.label,
                "config_hash": unit.config_hash,
                "config": unit.config,
                "image": None if images is None else {"id": images.ids[it.image], "file": images.files[it.image],
                                                       "index": images.skip + it.image,
                                                       "seed": images.seeds[it.image]},
                "seed": it.seed,
                "sampler_seed": sampler_seed(image_seeds[j], it.seed),
                "nfe": int(result.nfe),
                "cost": result.cost,
                "metrics": metrics,
                "missing": missing,
                "features_missing": self.features_missing,
                "files": files,
                _RUN_KEY: {
                    **timing,
                    "rank": self.dist.rank,
                    "world_size": self.dist.world,
                    "device": str(self.dist.device),
                    "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                },
            }
            write_json(self.out / f"{it.stem}.json", rec)
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
            atomic_write(self.out / f"{it.stem}.npy", _npy_bytes(feats[j]), overwrite=True, mkdir=True)
            write_json(self.out / f"{it.stem}.json", {
                "format": ITEM_FORMAT, "sweep_hash": self.sweep_hash, "key": it.key, "reuse": it.reuse,
                "index": it.index,
                "image": {"id": ref.ids[it.image], "file": ref.files[it.image]},
                "features_name": getattr(ext, "name", None), "files": {"features": f"{it.stem}.npy"},
            })
            written += 1
        return written


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
    dist_timeout: float = 30.0,
) -> SweepReport:
    """Run (or continue) a sweep in ``out`` and rebuild its summaries.

    Args:
        config: a :class:`~hessdiff.eval.sweep.config.SweepConfig` or the path of a TOML file.
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
        dist_timeout: with several processes (``torchrun``), minutes a process waits for the others at
            the start, and the longest rank 0 waits at the end without any other process finishing an
            item, before it stops with a :class:`SweepError` (finished items are kept; ``resume``
            continues). Raise it when one batch takes longer.

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
    check_models(cfg)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SweepError(f"the output folder {out} is a file, not a folder; choose another --out")
    above = out
    missing_dirs: list[Path] = []
    while not above.exists() and above.parent != above:
        missing_dirs.append(above)
        above = above.parent
    if above.exists() and not above.is_dir():
        raise SweepError(f"cannot create the output folder {out}: {above} is a file, not a folder")
    # what this call creates, so that a run failing before its first item leaves the folder as it found it
    made_meta = not (out / SWEEP_FILE).exists()
    old_meta = None if made_meta else _read_bytes(out / SWEEP_FILE)  # an extended sweep's file, put back on failure
    made_lock = not (out / LOCK_FILE).exists()
    dist = _Dist(device, dist_timeout)
    lock = _FolderLock(out / LOCK_FILE)
    try:
        return _run_sweep(cfg, out, dist, lock, resume=resume, limit=limit, progress=progress,
                          feature_extractor=feature_extractor, plots=plots, say=say, t_begin=t_begin)
    except BaseException:
        if dist.main and made_meta:
            lock.release()
            _undo_new_folder(out, made_lock, missing_dirs)
        elif dist.main and old_meta is not None and _read_bytes(out / SWEEP_FILE) != old_meta:
            atomic_write(out / SWEEP_FILE, old_meta, overwrite=True)  # items keep their own identities
        raise
    finally:
        lock.release()
        dist.close()


def _wait_for_items(out: Path, waiting: list[tuple[int, _Item]], sweep_hash: str, timeout_minutes: float,
                    say: Callable[[str], None], poll_s: float = 2.0) -> None:
    """Rank 0: wait until every ``(rank, item)`` of ``waiting`` is on disk. The timeout is on progress:
    a :class:`SweepError` naming the ranks comes when no item has appeared for ``timeout_minutes``."""
    left = list(waiting)
    last = time.monotonic()
    if left:
        say(f"waiting for {len(left)} item(s) of rank(s) {sorted({r for r, _ in left})}")
    while left:
        still = [(r, it) for r, it in left if not _item_done(out, it, sweep_hash)]
        if len(still) < len(left):
            last = time.monotonic()
        left = still
        if not left:
            return
        if time.monotonic() - last > timeout_minutes * 60:
            ranks = sorted({r for r, _ in left})
            raise SweepError(f"rank(s) {', '.join(map(str, ranks))} finished no item for {timeout_minutes:g} min "
                             f"({len(left)} item(s) outstanding): a process stopped, froze or died. The finished "
                             "items are kept: run again with --resume to compute the rest, or raise --dist-timeout "
                             "(minutes) if one batch takes longer")
        time.sleep(min(poll_s, max(timeout_minutes * 60 / 10, 0.01)))


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _undo_new_folder(out: Path, made_lock: bool, missing_dirs: list[Path]) -> None:
    """Remove what a failed first run put into ``out`` (it was empty or absent: see ``_prepare_folder``)."""
    import contextlib

    if not out.is_dir():
        return
    kept = [p for p in out.rglob("*") if p.is_file() and p.name not in (SWEEP_FILE, LOCK_FILE)
            and not is_temp_file(p.name)]
    if kept:  # items (or reference features) were written: keep the sweep, --resume continues it
        return
    wrote_meta = (out / SWEEP_FILE).is_file()  # then the folder was empty before this run
    with contextlib.suppress(OSError):
        (out / SWEEP_FILE).unlink()
    if made_lock:
        with contextlib.suppress(OSError):
            (out / LOCK_FILE).unlink()
    if wrote_meta:
        remove_temp_files(out)
        for d in sorted((p for p in out.rglob("*") if p.is_dir() and not p.is_symlink()),
                        key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                d.rmdir()  # only empty folders
    for d in missing_dirs:  # deepest first
        with contextlib.suppress(OSError):
            d.rmdir()


def _image_sets(cfg: SweepConfig) -> tuple[_ImageSet | None, _ImageSet | None]:
    """The sweep's images and the FID reference set (the same object when the reference is the data)."""
    data = None
    if cfg.data is not None:
        d = cfg.data
        data = _ImageSet("data", folder=d.folder, embedded=d.embedded, first_n=d.first_n, skip=d.skip,
                         resize=d.resize, order=d.order, recursive=d.recursive, base_seed=d.base_seed, check=d.check)
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
    return data, ref


def _identity(cfg: SweepConfig, data: _ImageSet | None, ref: _ImageSet | None,
              feature_extractor: Any | None) -> tuple[dict[str, Any], dict[str, Any], str, dict[str, Any]]:
    """``(resolved config, identity, sweep hash, info)``: what ``sweep.json`` records (deterministic on every
    rank, computed before the folder is touched)."""
    m = cfg.metrics
    resolved = cfg.resolved()
    if feature_extractor is not None and m.needs_features:
        resolved["metrics"]["features"] = f"custom:{getattr(feature_extractor, 'name', 'unnamed')}"
    identity = {"config": resolved, "data": data.describe() if data else None,
                "reference": ref.describe() if ref is not None and ref is not data else None}
    info = {
        "config_file": str(cfg.source) if cfg.source else None,
        "data_folder": str(cfg.data.folder) if cfg.data and cfg.data.folder else None,
        "reference_folder": m.reference if ref is not None and ref.folder is not None and ref is not data else None,
        "skipped_files": [list(s) for s in (data.skipped if data else [])],
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    return resolved, identity, config_hash(identity), info


def _plan(out: Path, items: list[_Item], batches: list[Any], sweep_hash: str, has_features: bool,
          limit: int | None) -> dict[str, list[int]]:
    """Rank 0: the pending item indices and the batches to run (at most about ``limit`` sample items; pending
    reference batches are always included, and only when there is a feature extractor)."""
    pset = {it.index for it in items if not _item_done(out, it, sweep_hash)}
    todo = [j for j, (u, its) in enumerate(batches)
            if (has_features or u.kind == "sample") and any(it.index in pset for it in its)]
    if limit is not None:
        kept, count = [], 0
        for j in todo:
            if batches[j][0].kind == "sample":
                if count >= limit:
                    continue
                count += sum(it.index in pset for it in batches[j][1])
            kept.append(j)
        todo = kept
    return {"pending": sorted(pset), "batches": todo}


def _compute(mine: Sequence[int], batches: list[Any], runner: _Runner, pending: set[int], data: _ImageSet | None,
             ref: _ImageSet | None, bar: Any | None) -> tuple[int, float, int]:
    """Run this rank's batches; ``(items computed, seconds in sample batches, sample items in them)``."""
    computed, sample_time, sample_count = 0, 0.0, 0
    try:
        for j in mine:
            unit, its = batches[j]
            t0 = time.perf_counter()
            n = runner.run_batch(unit, its, pending, ref if unit.kind == "reference" else data, ref, j)
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
    return computed, sample_time, sample_count


def _run_sweep(cfg: SweepConfig, out: Path, dist: _Dist, lock: _FolderLock, *, resume: bool, limit: int | None,
               progress: bool, feature_extractor: Any | None, plots: bool, say: Callable[[str], None],
               t_begin: float) -> SweepReport:
    data, ref = _image_sets(cfg)
    resolved, identity, sweep_hash, info = _identity(cfg, data, ref, feature_extractor)
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    # -- folder checks (rank 0 decides, everyone follows) --
    err, note = _prepare_folder(out, identity, sweep_hash, info, resume) if dist.main else (None, None)
    if note:
        say(note)
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
    has_features = cfg.metrics.needs_features and runner.extractor is not None
    items, batches = _build_work(cfg, data, ref, resolved["metrics"]["features"])
    sample_items = [it for it in items if it.unit.kind == "sample"]

    # -- pending work (rank 0 scans, broadcasts) --
    plan = None
    if dist.main:
        removed = remove_temp_files(out)
        if removed:
            say(f"removed {removed} temporary file(s) left by an interrupted run")
        plan = _plan(out, items, batches, sweep_hash, has_features, limit)
    plan = dist.broadcast(plan)
    pending = set(plan["pending"])
    mine = plan["batches"][dist.rank::dist.world]
    n_sample_done_before = sum(it.index not in pending for it in sample_items)
    total_mine = sum(sum(it.index in pending for it in batches[j][1]) for j in mine)
    if dist.main:
        n_todo = [sum(it.index in pending for it in batches[j][1]) for j in plan["batches"]]
        n_ref = sum(n for j, n in zip(plan["batches"], n_todo, strict=True) if batches[j][0].kind != "sample")
        say(f"sweep {cfg.name!r} ({sweep_hash}): {len(sample_items)} items, {n_sample_done_before} already "
            f"done, {sum(n_todo) - n_ref} to compute"
            + (f" (and {n_ref} reference images' features)" if n_ref else "")
            + (f" on {dist.world} processes" if dist.world > 1 else "")
            + (f"; skipped {len(data.skipped)} unreadable file(s)" if data and data.skipped else ""))

    bar = None
    if progress and dist.main and total_mine:
        from tqdm.auto import tqdm

        desc = "sweep" if dist.world == 1 else f"sweep (rank 0 of {dist.world})"
        bar = tqdm(total=total_mine, desc=desc, unit="img", dynamic_ncols=True, smoothing=0.1)
    computed, sample_time, sample_count = _compute(mine, batches, runner, pending, data, ref, bar)
    if dist.main and dist.world > 1:  # the others' items, as they appear (not a barrier with a fixed timeout)
        others = [(r, it) for r in range(1, dist.world) for j in plan["batches"][r::dist.world]
                  for it in batches[j][1] if it.index in pending and (has_features or it.unit.kind == "sample")]
        _wait_for_items(out, others, sweep_hash, dist.timeout_minutes, say)

    report = SweepReport(out=out, sweep_hash=sweep_hash, num_items=len(sample_items), num_done=0,
                         num_computed=computed, seconds=0.0,
                         seconds_per_image=sample_time / sample_count if sample_count else None,
                         rank=dist.rank, world_size=dist.world,
                         skipped_files=list(data.skipped) if data else [])
    if dist.main:
        summary, files, n_done = _finalize(cfg, out, items, sweep_hash, runner, plots, data)
        report.summary, report.files, report.num_done = summary, files, n_done
    report.seconds = time.perf_counter() - t_begin
    return report
