"""Summaries of a sweep, always rebuilt from the per-item files: ``results.jsonl``, ``summary.csv`` /
``summary.md`` / ``summary.json`` (per-configuration mean ± sd, FID / KID, NFE, time) and the plots."""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hessdiff.eval.sweep.config import SweepConfig
from hessdiff.eval.sweep.store import _RUN_KEY, _dumps, _number, _read_json, write_json
from hessdiff.eval.sweep.work import UNCONDITIONAL, _Item, _record_current, _Unit
from hessdiff.utils.files import atomic_write

if TYPE_CHECKING:
    from hessdiff.eval.sweep.run import _Runner

__all__ = ["COST_KEYS", "load_results", "strip_run_fields"]


def strip_run_fields(record: Mapping[str, Any]) -> dict[str, Any]:
    """An item record without its run-dependent fields (timing, rank, device): what must be identical
    between an interrupted and an uninterrupted run, or between one and several processes."""
    return {k: v for k, v in record.items() if k != _RUN_KEY}


def load_results(out: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of ``out/results.jsonl`` (metric values "inf" / "nan" turned back into floats); ``out`` may
    also be such a results file itself (gzipped when its name ends in ``.gz``, as the committed rows are)."""
    path = Path(out)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found (has the sweep finished once? expected a sweep folder or a "
                                "results.jsonl[.gz] file)")
    if path.is_dir():
        path = path / "results.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (has the sweep finished once?)")
    try:
        text = gzip.decompress(path.read_bytes()).decode("utf-8") if path.suffix == ".gz" else \
            path.read_text(encoding="utf-8")
        recs = [json.loads(line) for line in text.splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a results file of a sweep ({err})") from None
    for rec in recs:
        rec["metrics"] = {k: _number(v) for k, v in rec.get("metrics", {}).items()}
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


def _read_records(out: Path, items: list[_Item], sweep_hash: str) -> tuple[
        dict[int, dict[str, Any]], dict[str, list[np.ndarray]], dict[str, int]]:
    """The current records of the finished sample items (by item index), the reference features per
    model, and per model the number of reference items without features yet."""
    records: dict[int, dict[str, Any]] = {}
    ref_feats: dict[str, list[np.ndarray]] = {}
    ref_missing: dict[str, int] = {}
    for it in items:
        rec = _read_json(out / f"{it.stem}.json")
        ok = _record_current(rec, it, sweep_hash)
        if it.unit.kind == "reference":
            if ok:
                ref_feats.setdefault(it.unit.model, []).append(np.load(out / f"{it.stem}.npy"))
            else:
                ref_missing[it.unit.model] = ref_missing.get(it.unit.model, 0) + 1
        elif ok:
            records[it.index] = rec
    return records, ref_feats, ref_missing


def _distribution_metrics(m: Any, out: Path, recs: list[dict[str, Any]], ref: list[np.ndarray],
                          n_ref_missing: int, features_missing: str | None,
                          missing: dict[str, str]) -> dict[str, Any]:
    """FID / KID of one configuration's samples against its model's reference features (the row keys
    ``fid``, ``kid``, ``kid_sd``, ``n_reference``, ``features``); why not, in ``missing``, when they cannot be
    computed yet."""
    from hessdiff.eval.metrics.fid import FeatureStats, fid_from_stats, kernel_inception_distance

    fid = kid = kid_sd = None
    reason = features_missing
    feats = [out / r["files"]["features"] for r in recs if (r.get("files") or {}).get("features")]
    if reason is None:
        if len(feats) < len(recs):
            reason = f"{len(recs) - len(feats)} item(s) have no features"
        elif n_ref_missing:
            reason = f"{n_ref_missing} reference image(s) have no features yet"
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
    row: dict[str, Any] = {}
    if m.fid:
        row["fid"] = fid
    if m.kid:
        row["kid"], row["kid_sd"] = kid, kid_sd
    row["n_reference"] = len(ref)
    row["features"] = m.features
    return row


def _summary_row(m: Any, out: Path, label: str, unit: _Unit, its: list[_Item], records: dict[int, dict[str, Any]],
                 ref_feats: dict[str, list[np.ndarray]], ref_missing: dict[str, int],
                 features_missing: str | None) -> dict[str, Any]:
    """One configuration's summary: counts, NFE, time, mean costs, paired metrics (mean, sd), FID / KID."""
    from hessdiff.eval.sweep.methods import METHODS

    recs = [records[it.index] for it in its if it.index in records]

    def mean_of(get: Any) -> float | None:
        return float(np.mean([get(r) for r in recs])) if recs else None

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
        "nfe": mean_of(lambda r: r["nfe"]),
        "seconds_per_image": mean_of(lambda r: r[_RUN_KEY]["item_s"]),
        "method_seconds_per_image": mean_of(lambda r: r[_RUN_KEY]["method_s"]),
    }
    costs = [r.get("cost") or {} for r in recs]
    row["cost"] = {k: float(np.mean([c.get(k, 0) for c in costs])) for k in COST_KEYS
                   if any(isinstance(c.get(k), int | float) for c in costs)}
    missing: dict[str, str] = {}
    for r in recs:
        missing.update(r.get("missing") or {})
    for name in m.paired:
        row[name], row[f"{name}_sd"] = _mean_sd([_number(r["metrics"].get(name)) for r in recs])
    if m.fid or m.kid:
        row.update(_distribution_metrics(m, out, recs, ref_feats.get(unit.model, []),
                                         ref_missing.get(unit.model, 0), features_missing, missing))
    row["missing"] = missing
    return row


def _finalize(cfg: SweepConfig, out: Path, items: list[_Item], sweep_hash: str, runner: _Runner,
              with_plots: bool, data: Any | None = None) -> tuple[list[dict[str, Any]], dict[str, Path], int]:
    """Write ``results.jsonl`` (every finished sample item, in item order), the summaries (JSON, CSV,
    Markdown), the plots and the pictures; return ``(summary rows, files, number of finished items)``."""
    records, ref_feats, ref_missing = _read_records(out, items, sweep_hash)
    sample_items = [it for it in items if it.unit.kind == "sample"]
    lines = [_dumps(records[it.index]) for it in sample_items if it.index in records]
    atomic_write(out / "results.jsonl", "\n".join(lines) + ("\n" if lines else ""), overwrite=True, mkdir=True)

    units: dict[str, tuple[_Unit, list[_Item]]] = {}
    for it in sample_items:
        units.setdefault(it.unit.label, (it.unit, []))[1].append(it)
    summary = [_summary_row(cfg.metrics, out, label, unit, its, records, ref_feats, ref_missing,
                            runner.features_missing) for label, (unit, its) in units.items()]

    files = {
        "results": out / "results.jsonl",
        "csv": out / "summary.csv",
        "markdown": out / "summary.md",
        "json": out / "summary.json",
    }
    n_done = len(records)
    meta = {"sweep": cfg.name, "sweep_hash": sweep_hash, "num_items": len(sample_items), "num_done": n_done,
            "complete": n_done == len(sample_items), "configurations": summary}
    write_json(files["json"], meta, indent=2)
    metric_names = _metric_columns(cfg)
    atomic_write(files["csv"], _csv_text(summary, metric_names), overwrite=True, mkdir=True)
    atomic_write(files["markdown"], _markdown(cfg, sweep_hash, summary, metric_names, n_done, len(sample_items)),
                 overwrite=True, mkdir=True)
    plots = _plots(out / "plots", summary, metric_names) if with_plots else []
    if plots:
        files["plots"] = out / "plots"
    if cfg.save_images and _pictures(out / "pictures", sample_items, records, runner, data, cfg.seeds[0]):
        files["pictures"] = out / "pictures"
    return summary, files, n_done


#: how many images (rows) the picture of each model and task shows
PICTURE_ROWS = 4


def _pictures(folder: Path, sample_items: list[_Item], records: dict[int, dict[str, Any]], runner: _Runner,
              data: Any | None, seed: int, rows: int = PICTURE_ROWS) -> list[Path]:
    """``pictures/<model>/<task>.png``: for the first ``rows`` images (first seed), clean | measurement |
    each method and step count, from the item PNGs (a grey tile where an item is not done yet). Without
    data (unconditional sweeps): one row per seed, the methods side by side."""
    from PIL import Image

    from hessdiff.eval.sweep.images import _to_model_space
    from hessdiff.utils.pictures import blank_tile, labelled_grid, to_rgb_uint8

    groups: dict[tuple[str, str], list[_Item]] = {}
    for it in sample_items:
        task = it.unit.task.label if it.unit.task else UNCONDITIONAL
        groups.setdefault((it.unit.model, task), []).append(it)
    written = []
    for (model, task), its in groups.items():
        units = list({it.unit.label: it.unit for it in its}.values())
        if data is not None:
            keys = list(dict.fromkeys(it.image for it in its if it.seed == seed))[:rows]
        else:
            keys = list(dict.fromkeys(it.seed for it in its))[:rows]
        by_key = {(it.unit.label, it.image if data is not None else it.seed): it for it in its
                  if data is None or it.seed == seed}
        res, channels = runner.image_space(model)
        h, w = res
        labels = [f"{u.method.label} {u.steps}" if u.steps else u.method.label for u in units]
        grid_rows = []
        for key in keys:
            row = []
            if data is not None:
                x = _to_model_space(data.load(key, res)[None], channels)
                row.append(to_rgb_uint8(x[0]))
                unit0 = units[0]
                if unit0.task is not None:
                    y = runner.task(unit0.task).measure(x, seed=[data.seeds[key]]).y
                    row.append(to_rgb_uint8(y[:1].clamp(-1, 1)) if y.ndim == 4 and y.shape[1] in (1, 3)
                               else blank_tile(h, w, "not an image"))
            for u in units:
                it = by_key.get((u.label, key))
                rec = records.get(it.index) if it is not None else None
                path = (rec.get("files") or {}).get("image") if rec else None
                if path and (folder.parent / path).is_file():
                    row.append(np.asarray(Image.open(folder.parent / path).convert("RGB")))
                else:
                    row.append(blank_tile(h, w, "pending" if it is not None else ""))
            grid_rows.append(row)
        if not grid_rows:
            continue
        head = (["clean", "measurement"] if data is not None and units[0].task is not None
                else ["clean"] if data is not None else [])
        picture = labelled_grid(grid_rows, head + labels)
        target = folder / model / f"{task}.png"
        buf = io.BytesIO()
        Image.fromarray(picture).save(buf, format="PNG")
        atomic_write(target, buf.getvalue(), overwrite=True, mkdir=True)
        written.append(target)
    return written


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
        atomic_write(path, buf.getvalue(), overwrite=True, mkdir=True)
        written.append(path)
    return written
