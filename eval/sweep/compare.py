"""Paired comparisons of two methods of a finished sweep: per model and task, the mean difference of a
paired metric over the items both methods finished (same image, same seed), with a 95 % interval.

``hessdiff sweep CONFIG --out DIR --resume --compare mmps@20:dps@100`` prints them (markdown) after the
sweep; ``--against OTHER`` takes the second method from another sweep's folder or results file (paired by
task, image and seed); ``--with SHARD`` joins another shard's rows with ``--out``'s (a run of the same sweep
over other images of the order, ``[data] skip``); :func:`paired_comparison` returns the rows. A method is
``LABEL@STEPS`` (``LABEL`` alone for methods without steps, e.g. ``pinv``), ``LABEL`` being the ``[[methods]]``
label.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

from hessdiff.eval.sweep.summary import load_results

__all__ = ["paired_comparison", "format_comparison", "parse_pair"]

#: two-sided 95 % Student-t quantiles for 1..30 degrees of freedom (beyond: the normal 1.96)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def _t975(df: int) -> float:
    return _T975[df - 1] if 1 <= df <= len(_T975) else 1.96


def _split(spec: str) -> tuple[str, int]:
    label, _, steps = spec.strip().partition("@")
    if not label:
        raise ValueError(f"bad method {spec!r} in --compare: expected LABEL@STEPS or LABEL")
    try:
        return label, int(steps) if steps else 0
    except ValueError:
        raise ValueError(f"bad step count in {spec!r} (--compare): expected an integer after '@'") from None


def parse_pair(text: str) -> tuple[tuple[str, int], tuple[str, int]]:
    """``"mmps@20:dps@100"`` -> ``(("mmps", 20), ("dps", 100))``."""
    a, sep, b = text.partition(":")
    if not sep:
        raise ValueError(f"bad --compare {text!r}: expected A:B, e.g. mmps@20:dps@100")
    return _split(a), _split(b)


def _values(recs: Sequence[dict[str, Any]], method: tuple[str, int],
            metric: str) -> dict[tuple[str, str], dict[tuple[Any, Any], float]]:
    """``{(model, task): {(image id, seed): value}}`` of one method's finite values."""
    by: dict[tuple[str, str], dict[tuple[Any, Any], float]] = {}
    for r in recs:
        parts = r["config_label"].split("/")  # model/task/method/steps
        if (parts[2], int(parts[3])) != method:
            continue
        v = r["metrics"].get(metric)
        if v is None or not math.isfinite(v):
            continue
        img = (r.get("image") or {}).get("id")
        by.setdefault((parts[0], parts[1]), {})[(img, r.get("seed"))] = float(v)
    return by


Paths = str | os.PathLike | Sequence[str | os.PathLike]


def _joined(paths: Paths) -> list[dict[str, Any]]:
    """The records of one sweep folder / results file, or of several (shards of one sweep, e.g. runs over
    ``[data] skip`` ranges) joined; an item present in two of them must have the same metrics in both."""
    if isinstance(paths, (str, os.PathLike)):
        return load_results(paths)
    seen: dict[tuple[Any, ...], tuple[dict[str, Any], str]] = {}
    out: list[dict[str, Any]] = []
    for p in paths:
        for r in load_results(p):
            key = (r.get("config_label"), (r.get("image") or {}).get("id"), r.get("seed"))
            if key in seen:
                first, where = seen[key]
                if first.get("metrics") != r.get("metrics"):
                    raise ValueError(f"item {key[0]} image {key[1]} seed {key[2]} is in {where} and {p} with "
                                     "different metrics: not shards of one sweep")
                continue
            seen[key] = (r, str(p))
            out.append(r)
    return out


def paired_comparison(out: Paths, a: tuple[str, int], b: tuple[str, int],
                      metric: str = "psnr", against: Paths | None = None) -> list[dict[str, Any]]:
    """Rows ``{model, task, n, a, b, diff, ci, sd}`` (``diff`` = mean of ``a - b`` over the pairs, ``ci``
    the half-width of its 95 % Student-t interval) for every model and task where both ran.

    With ``against`` (another sweep folder, or its ``results.jsonl``, gzipped or not), ``b`` is read from
    there: items pair by task label, image id and seed, across models too (a latent model's rows against a
    pixel model's on the same images and measurements; ``model`` is then ``"A-model vs B-model"``). The
    measurements are the same only where both sweeps used the same data, task parameters and seeds:
    comparing ``pinv`` with itself across the two (a difference of exactly zero) checks that.
    ``out`` and ``against`` may each be a list of folders / files: shards of one sweep, joined."""
    recs_a = _joined(out)
    va_all = _values(recs_a, a, metric)
    vb_all = _values(recs_a if against is None else _joined(against), b, metric)
    rows = []
    for (model, task), va in va_all.items():
        for (model_b, task_b), vb in vb_all.items():
            if task_b != task or (against is None and model_b != model):
                continue
            common = sorted(set(va) & set(vb), key=str)
            if not common:
                continue
            d = [va[k] - vb[k] for k in common]
            n = len(d)
            mean = sum(d) / n
            sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1)) if n > 1 else float("nan")
            rows.append({"model": model if model_b == model else f"{model} vs {model_b}", "task": task, "n": n,
                         "metric": metric, "a": sum(va[k] for k in common) / n,
                         "b": sum(vb[k] for k in common) / n, "diff": mean, "sd": sd,
                         "ci": _t975(n - 1) * sd / math.sqrt(n) if n > 1 else float("nan")})
    if not rows:
        where = f"{out}" if against is None else f"{out} and {against}"
        raise ValueError(f"no items where both {a[0]}@{a[1]} and {b[0]}@{b[1]} have {metric!r} in {where}")
    return rows


def format_comparison(rows: Sequence[dict[str, Any]], a: tuple[str, int], b: tuple[str, int]) -> str:
    """Markdown table of :func:`paired_comparison` rows."""
    na, nb = (f"{x[0]}@{x[1]}" if x[1] else x[0] for x in (a, b))
    metric = rows[0]["metric"]
    lines = [f"| model | task | n | {na} {metric} | {nb} {metric} | {na} - {nb} (95 % CI) | beyond the CI |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        sig = "yes" if math.isfinite(r["ci"]) and abs(r["diff"]) > r["ci"] else "no"
        lines.append(f"| {r['model']} | {r['task']} | {r['n']} | {r['a']:.3f} | {r['b']:.3f} | "
                     f"{r['diff']:+.3f} ± {r['ci']:.3f} | {sig} |")
    return "\n".join(lines)
