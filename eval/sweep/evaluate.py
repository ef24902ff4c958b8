"""Folder-to-folder evaluation (``hessdiff eval``): paired metrics by file name, FID / KID by features."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from hessdiff.eval.sweep.images import _ImageSet
from hessdiff.utils.images import load_image, to_uint8

__all__ = ["EVAL_METRICS", "evaluate_folders"]


EVAL_METRICS = ("psnr", "ssim", "lpips", "fid", "kid")


def _pair_files(real: Any, fake: Any) -> list[tuple[int, int]]:
    """Pairs (real index, fake index): a fake file pairs with the real file of the same relative name
    (without extension), or whose name it extends with ``_s<seed>`` (sweep outputs)."""
    by_name = {f.rsplit(".", 1)[0]: i for i, f in enumerate(real.files)}
    by_id = {item_id: i for i, item_id in enumerate(real.ids)}
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


def _paired_metrics(rset: _ImageSet, fset: _ImageSet, load: Callable[[_ImageSet, int], torch.Tensor],
                    names: Sequence[str], dev: torch.device, progress: bool
                    ) -> tuple[dict[str, Any], dict[str, str]]:
    """Means and sds of the paired metrics ``names`` over the files of ``fset`` paired with ``rset``'s,
    with ``num_pairs``, and the metrics whose weights are missing (name -> reason)."""
    from hessdiff.eval.metrics import MetricSuite

    pairs = _pair_files(rset, fset)
    suite = MetricSuite(paired=list(names), device=dev)
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
    res = suite.compute()
    out: dict[str, Any] = {"num_pairs": len(pairs)}
    for n in names:
        out[n] = res.get(n)
        out[f"{n}_std"] = res.get(f"{n}_std")
    return out, res.get("missing", {})


def _features(name: str, s: _ImageSet, load: Callable[[_ImageSet, int], torch.Tensor], ext: Any,
              dev: torch.device, batch_size: int) -> torch.Tensor:
    """Features (float64, CPU) of every image of ``s``, ``batch_size`` at a time."""
    chunks = []
    for k in range(0, len(s), batch_size):
        batch = [load(s, i) for i in range(k, min(k + batch_size, len(s)))]
        shapes = {tuple(b.shape) for b in batch}
        if len(shapes) > 1:
            raise ValueError(f"{name} images have different sizes {sorted(shapes)[:3]}; pass --resolution")
        with torch.no_grad():
            chunks.append(torch.as_tensor(ext(torch.stack(batch).to(dev))).double().cpu())
    return torch.cat(chunks)


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
    :data:`hessdiff.eval.sweep.methods.FEATURE_EXTRACTORS`). Images are read as RGB uint8 (resized
    to ``resolution`` if given, else they must have equal sizes within a pair). Unreadable files are
    skipped with a warning and counted. Returns a flat dict of values and counts; a metric whose
    weights are missing is ``None`` with the reason under ``"missing"``.
    """
    from hessdiff.eval.metrics.fid import FeatureStats, fid_from_stats, kernel_inception_distance
    from hessdiff.eval.metrics.weights import MissingWeightsError
    from hessdiff.eval.sweep.methods import make_feature_extractor

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
        return to_uint8(load_image(s._abs[i], channels=3))[0]

    paired_names = [n if n != "lpips" else f"lpips_{lpips_net}" for n in metrics if n in ("psnr", "ssim", "lpips")]
    if paired_names:
        values, missing = _paired_metrics(rset, fset, load, paired_names, dev, progress)
        out.update(values)
        out["missing"].update(missing)
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
        feats = {name: _features(name, s, load, ext, dev, batch_size) for name, s in (("real", rset), ("fake", fset))}
        if "fid" in metrics:
            out["fid"] = fid_from_stats(FeatureStats().update(feats["fake"]), FeatureStats().update(feats["real"]))
        if "kid" in metrics:
            out["kid"], out["kid_std"] = kernel_inception_distance(feats["real"], feats["fake"],
                                                                   num_subsets=kid_subsets,
                                                                   max_subset_size=kid_subset_size)
    return out
