"""``hessdiff sample``: unconditional samples of a diffusion model, one PNG per seed and a grid.

Samplers: ``ddim`` (``--eta``), ``dpm`` (DPM-Solver-3, noise prediction), ``dpm++`` (DPM-Solver++(2M)),
``unipc`` (UniPC-2, bh2), ``ipndm`` (iPNDM-4), ``deis`` (DEIS-tAB3), ``euler`` (flow-matching models), and
``lml-<correction>``: a base solver (``--solver``, default ``dpm++``, ``euler`` for flow models) with an
LML correction from ``hessdiff.samplers.lml.make_correction``: ``lml-published`` (the published
Levenberg-Marquardt-Langevin map; ``lamb`` default 1e-3), ``lml-hessian-step`` (damped low-rank Hessian
preconditioning of each step), ``lml-matched-noise`` (the control: a random perturbation of the published
map's size), ``lml-stats`` (the zero-NFE Gaussian step with the model's per-noise-level statistics,
``lml_stats.safetensors`` in the model folder, written by ``python -m hessdiff.scripts.lml_stats MODEL``; the
drop-ins' ``lml_variant="stats"``), ``lml-cov`` (the same step with the data covariance,
``lml_cov.safetensors``, written in seconds by ``python -m hessdiff.scripts.lml_stats MODEL --covariance``;
``lml_variant="cov"``). ``--lml-option KEY=VALUE`` sets the correction's arguments (e.g. ``lamb=5e-3``,
``rank=2``; ``stats=PATH`` for ``lml-stats`` / ``lml-cov``).

Image ``i`` depends only on seed ``i`` (its starting noise and any sampler noise come from its own
generator), whatever ``--seeds`` and ``--batch-size`` are. Writes ``OUT/seed0000.png`` ... (one per
seed) and ``OUT/grid.png`` all at once, only after every sample succeeded; prints the network
evaluations per image and the time.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hessdiff.scripts.cli import CLIError

if TYPE_CHECKING:  # torch is imported when the command runs, not for --help
    from torch import Tensor

__all__ = ["register", "run", "sample_images", "SAMPLERS", "LML_VARIANTS", "DEFAULT_STEPS", "seed_filename"]

EPILOG = """examples:
  hessdiff sample --seeds 0-15 --out runs/samples           # 16 digits of the embedded model, DPM-Solver++ 25 steps
  hessdiff sample --sampler ddim --steps 50 --eta 1.0 --seeds 0-7
  hessdiff sample --sampler unipc --steps 8 --seeds 0-15        # UniPC-2 (bh2), or ipndm (iPNDM-4), deis (DEIS-tAB3)
  hessdiff sample --sampler lml-published --solver dpm --steps 10 --lml-option lamb=8e-4 --seeds 0,3,5-9
  hessdiff sample --sampler lml-hessian-step --steps 10 --seeds 0-15 --out runs/lml
  hessdiff sample --model fashion --sampler lml-cov --solver unipc --steps 5 --seeds 0-15   # zero extra NFE
  hessdiff sample --model fashion --sampler auto --steps 6 --seeds 0-15   # the defaults table's choice (lml-cov)
  hessdiff sample --model google/ddpm-cifar10-32 --sampler dpm --steps 10 --seeds 0-63 --device cuda
  hessdiff sample --model stable-diffusion-v1-5/stable-diffusion-v1-5 --prompt "a photo of a cat" \\
      --steps 25 --seeds 0-3 --dtype float16 --device cuda
"""

DEFAULT_STEPS = 25

#: base solvers (``hessdiff.samplers.solvers.SOLVERS``)
SAMPLERS = ("ddim", "dpm", "dpm++", "euler", "unipc", "ipndm", "deis")
#: ``lml-<name>`` -> the ``make_correction`` name
LML_VARIANTS = {"lml-published": "published", "lml-hessian-step": "hessian-step",
                "lml-matched-noise": "matched-noise", "lml-stats": "stats", "lml-cov": "cov"}


#: correction arguments the command starts from (``--lml-option`` overrides them): the Hessian step leaves the
#: radial direction to the base solver, as on a trained network the step that trusts the network's Jacobian
#: along x destroys the samples (``hessdiff bench lml --parts embedded``, BENCHMARKS.md)
LML_DEFAULTS: dict[str, dict[str, Any]] = {"hessian-step": {"radial": "exclude"}}


def seed_filename(seed: int) -> str:
    """File name of one seed's image: ``seed0007.png``."""
    return f"seed{seed:04d}.png"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sample",
        help="unconditional samples (DDIM, DPM-Solver(++), flow Euler, with or without LML): one PNG per seed "
             "and a grid",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--sampler", help=f"{', '.join(SAMPLERS)}, or {', '.join(LML_VARIANTS)}, or auto (the "
                                     "defaults table's recommendation for the model and step count: "
                                     "hessdiff.recommended_sampler) (default: dpm++, euler for flow-matching models)")
    p.add_argument("--solver", help="base solver of an lml-* sampler (default dpm++, euler for flow models)")
    p.add_argument("--lml-option", action="append", default=[], metavar="KEY=VALUE",
                   help="argument of the LML correction (repeatable), e.g. lamb=1e-3, kappa=0.5, rank=2")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"sampling steps (default {DEFAULT_STEPS})")
    p.add_argument("--eta", type=float, help="DDIM stochasticity (0: deterministic [default], 1: DDPM-like)")
    p.add_argument("--seeds", default="0-15", help="seeds, one image each: 0-15 (default), 7, 0,3,5-9")
    p.add_argument("--batch-size", type=int, default=16, help="images per network call (default 16)")
    p.add_argument("--model", default="mnist",
                   help="embedded name (mnist [default], mnist-ldm, fashion, fashion-ldm), a local diffusers "
                        "folder, or a Hugging Face hub id such as google/ddpm-cifar10-32")
    p.add_argument("--prompt", default="", help="prompt for text-conditional models (Stable Diffusion)")
    p.add_argument("--negative-prompt", default="", help="negative prompt for classifier-free guidance")
    p.add_argument("--guidance-scale", type=float,
                   help="classifier-free guidance scale of text-conditional models (default 7.5 for them)")
    p.add_argument("--out", default="runs/sample", help="output folder (default runs/sample; created if missing)")
    p.add_argument("--overwrite", action="store_true", help="replace existing files in --out")
    p.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="float32",
                   help="network dtype: float32 (default), float16, bfloat16; solver arithmetic stays float32")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: 1 for the embedded models, where it is "
                                                 "2-4x faster than 2; torch's own choice for others)")
    p.add_argument("--quiet", action="store_true", help="no progress bar; print only the last line")
    p.set_defaults(func=run)


def _resolve_sampler(sampler: str | None, solver: str | None, flow: bool) -> tuple[str, str | None]:
    """``(base solver, correction name or None)``."""
    base_default = "euler" if flow else "dpm++"
    if sampler is None:
        sampler = base_default
    if sampler in SAMPLERS:
        if solver is not None and solver != sampler:
            raise CLIError(f"--solver is for lml-* samplers; --sampler {sampler} is a base solver already")
        base, correction = sampler, None
    elif sampler in LML_VARIANTS:
        base, correction = solver or base_default, LML_VARIANTS[sampler]
        if base not in SAMPLERS:
            raise CLIError(f"unknown --solver {base!r}; choose one of {', '.join(SAMPLERS)}")
    else:
        raise CLIError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS + tuple(LML_VARIANTS))}")
    if base == "euler" and not flow:
        raise CLIError("the euler sampler is for flow-matching models; this model has a VP (DDPM) schedule: "
                       "use ddim, dpm or dpm++")
    return base, correction


def _stats_correction(model: Any, opts: dict[str, Any], kind: str = "stats") -> tuple[Any, dict[str, Any]]:
    """``lml-stats`` / ``lml-cov``: the zero-NFE Gaussian step with the model's per-level statistics or with the
    data covariance, as the drop-ins' ``lml_variant="stats"`` / ``"cov"`` (gain-ratio damping, float64, radial
    part kept). The file: ``--lml-option stats=PATH``, else ``lml_stats.safetensors`` / ``lml_cov.safetensors``
    in the model's folder."""
    from hessdiff.samplers.diffusers.schedulers import LML_VARIANT_FILES
    from hessdiff.samplers.lml import HessianStepCorrection
    from hessdiff.samplers.lml.curvature import DataCovarianceSource, StatsSource
    from hessdiff.samplers.models import ModelLoadError, _resolve_local

    name, command = LML_VARIANT_FILES[kind]
    opts = dict(opts)
    given = opts.pop("stats", None)
    if given is not None:
        path = Path(str(given)).expanduser()
    else:
        try:
            folder = _resolve_local(model.source) if model.source else None
        except ModelLoadError:
            folder = None
        path = folder / name if folder is not None else Path(name)
    what = "LML statistics" if kind == "stats" else "data covariance"
    if not path.is_file():
        cost = "minutes to an hour on a CPU" if kind == "stats" else "seconds"
        raise CLIError(f"no {what} at {path}: compute it with `{command.replace('MODEL', model.source or 'MODEL')}` "
                       f"({cost}) or give a file with --lml-option stats=PATH")
    try:
        source = (StatsSource if kind == "stats" else DataCovarianceSource).load(path)
    except (OSError, ValueError, KeyError) as exc:
        raise CLIError(f"{path}: not a readable {what} file ({exc})") from None
    kw = {"adaptive": True, "precision": "float64", "radial": "keep", **opts}
    return HessianStepCorrection(source, **kw), {"stats": str(path), **kw}


def sample_images(
    model: Any,
    seeds: list[int],
    *,
    sampler: str | None = None,
    solver: str | None = None,
    steps: int = DEFAULT_STEPS,
    eta: float | None = None,
    lml_options: dict[str, Any] | None = None,
    batch_size: int = 16,
    denoiser: Any | None = None,
    progress: bool = False,
) -> tuple[Tensor, dict[str, Any]]:
    """Sample one image per seed from ``model`` (a :class:`~hessdiff.samplers.models.DiffusionModel`).

    Returns images ``[N, C, H, W]`` float32 on the CPU in [-1, 1] (not clipped), in the order of
    ``seeds``, and a report (``nfe`` network evaluations per image, ``extra`` counted calls such as JVPs,
    ``wall_time_s``, the resolved sampler). Sample ``i`` starts from ``sigma_0 * randn`` drawn on the CPU
    from ``torch.Generator().manual_seed(seeds[i])``, which also drives its sampler noise.
    """
    import torch

    from hessdiff.samplers.loop import CountingDenoiser
    from hessdiff.samplers.solvers import get_solver
    from hessdiff.scripts._common import StepProgress, make_autoencoder, make_denoiser

    if not seeds:
        raise CLIError("no seeds given")
    if not isinstance(steps, int) or steps < 1:
        raise CLIError(f"--steps must be a positive integer, got {steps!r}")
    if batch_size < 1:
        raise CLIError(f"--batch-size must be a positive integer, got {batch_size}")
    den = denoiser if denoiser is not None else make_denoiser(model)
    flow = getattr(den.schedule, "kind", "vp") == "flow"
    auto = sampler == "auto"
    if auto:
        sampler, solver = _auto_sampler(model, steps, flow, solver)
    base, corr_name = _resolve_sampler(sampler, solver, flow)
    kwargs: dict[str, Any] = {}
    if eta is not None:
        if base != "ddim":
            raise CLIError(f"--eta is a DDIM option; the {base} solver does not take it")
        if not (math.isfinite(eta) and eta >= 0):  # NaN compares false: it would pass `eta < 0`
            raise CLIError(f"--eta must be a finite non-negative number, got {eta}")
        kwargs["eta"] = float(eta)
    if lml_options and corr_name is None:
        raise CLIError("--lml-option needs an lml-* sampler")
    correction = None
    if corr_name is not None:
        from hessdiff.samplers.lml import make_correction

        try:
            opts = {**LML_DEFAULTS.get(corr_name, {}), **dict(lml_options or {})}
            if corr_name in ("stats", "cov"):
                correction, opts = _stats_correction(model, opts, corr_name)
            else:
                correction = make_correction(corr_name, **opts)
        except TypeError as exc:
            raise CLIError(f"bad --lml-option for {corr_name}: {exc}") from exc
    fn = get_solver(base)
    autoencoder = make_autoencoder(model) if model.is_latent else None
    grid = den.schedule.grid(steps)
    device = next(model.unet.parameters()).device
    counter = CountingDenoiser(den)
    chunks = [seeds[i:i + batch_size] for i in range(0, len(seeds), batch_size)]
    images = []
    t0 = time.perf_counter()
    label = base if corr_name is None else f"{base}+lml-{corr_name}"
    with StepProgress(steps * len(chunks), label, enabled=progress) as bar:
        for chunk in chunks:
            gens = [torch.Generator().manual_seed(int(s)) for s in chunk]
            x = torch.cat([torch.randn((1, *model.sample_shape), generator=g, dtype=torch.float32) for g in gens])
            x = (float(grid.sigma[0]) * x).to(device)
            with torch.no_grad():
                z = fn(counter, x, grid, generator=gens, correction=correction, callback=bar, **kwargs)
                img = autoencoder.decode(z) if autoencoder is not None else z
            images.append(img.detach().float().cpu())
    wall = time.perf_counter() - t0
    out = torch.cat(images)
    if not bool(torch.isfinite(out).all()):
        raise CLIError(f"the {label} sampler produced NaN or Inf values; try more --steps or another sampler")
    shown = None
    if correction is not None:
        shown = repr(correction) if type(correction).__repr__ is not object.__repr__ else (
            f"{type(correction).__name__}({', '.join(f'{k}={v!r}' for k, v in opts.items())})")
    report = {"sampler": base, "correction": corr_name, "correction_repr": shown,
              "nfe": counter.nfe // len(chunks), "extra": dict(counter.extra), "wall_time_s": wall,
              "steps": steps, "eta": kwargs.get("eta"), "auto": auto}
    return out, report


def _auto_sampler(model: Any, steps: int, flow: bool, solver: str | None) -> tuple[str, str | None]:
    """``sampler="auto"``: the defaults table's ``(sampler, solver)`` for this model at ``steps`` steps
    (:func:`hessdiff.recommended_sampler`; flow-matching models: ``euler``)."""
    from hessdiff.samplers.defaults import recommended_sampler

    _check_auto_solver("auto", solver)
    return ("euler", None) if flow else recommended_sampler(getattr(model, "source", None), steps)


def _check_auto_solver(sampler: str | None, solver: str | None) -> None:
    """``--solver`` with ``--sampler auto`` is an error (auto chooses the solver)."""
    if sampler == "auto" and solver is not None:
        raise CLIError("--solver is chosen by --sampler auto (the defaults table's recommendation); give an "
                       "explicit --sampler to set it")


def _seed_text(seeds: list[int]) -> str:
    if seeds == list(range(seeds[0], seeds[0] + len(seeds))) and len(seeds) > 1:
        return f"{seeds[0]}-{seeds[-1]}"
    return ",".join(map(str, seeds))


def run(args: argparse.Namespace) -> int:
    import torch

    from hessdiff.scripts._common import (
        OutputDir,
        image_grid,
        load_model_for_cli,
        make_denoiser,
        parse_device,
        parse_dtype,
        parse_key_values,
        parse_seeds,
        png_writer,
        set_threads,
        to_rgb_uint8,
    )
    from hessdiff.utils.images import to_uint8_array

    t_start = time.perf_counter()
    say = (lambda *a: None) if args.quiet else print
    if args.steps < 1:
        raise CLIError(f"--steps must be a positive integer, got {args.steps}")
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be a positive integer, got {args.batch_size}")
    if args.eta is not None and not (math.isfinite(args.eta) and args.eta >= 0):
        raise CLIError(f"--eta must be a finite non-negative number, got {args.eta}")
    known = SAMPLERS + tuple(LML_VARIANTS) + ("auto",)
    _check_auto_solver(args.sampler, args.solver)  # before the output folder is touched
    if args.sampler is not None and args.sampler not in known:
        raise CLIError(f"unknown sampler {args.sampler!r}; choose one of {', '.join(known)}")
    if args.solver is not None and args.solver not in SAMPLERS:
        raise CLIError(f"unknown --solver {args.solver!r}; choose one of {', '.join(SAMPLERS)}")
    set_threads(args.threads, args.model)
    device, dtype = parse_device(args.device), parse_dtype(args.dtype)
    seeds = parse_seeds(args.seeds)
    lml_options = parse_key_values(args.lml_option, "--lml-option")

    names = ["grid.png"] + [seed_filename(s) for s in seeds]
    out = OutputDir(args.out, names, overwrite=args.overwrite)
    out.prepare()
    try:
        model = load_model_for_cli(args.model, device, dtype)
        text = getattr(model.unet.config, "cross_attention_dim", None) is not None
        scale = args.guidance_scale if args.guidance_scale is not None else (7.5 if text else 1.0)
        den = make_denoiser(model, prompt=args.prompt, negative_prompt=args.negative_prompt, guidance_scale=scale)
        kind = "latent" if model.is_latent else "pixel"
        say(f"model {args.model} ({kind} space, images {model.channels}x{model.resolution}x{model.resolution}) "
            f"on {device.type} {str(dtype).replace('torch.', '')}")
        try:
            images, rep = sample_images(model, seeds, sampler=args.sampler, solver=args.solver, steps=args.steps,
                                        eta=args.eta, lml_options=lml_options, batch_size=args.batch_size,
                                        denoiser=den, progress=not args.quiet)
        except RuntimeError as exc:
            if dtype == torch.float32:
                raise
            raise CLIError(f"sampling failed with the network in {args.dtype} on {device.type}: {exc} "
                           "(try --dtype float32)") from exc
        pictures = [to_rgb_uint8(img) for img in images]
        writers = {seed_filename(s): png_writer(to_uint8_array(img)) for s, img in zip(seeds, images, strict=True)}
        writers["grid.png"] = png_writer(image_grid(pictures))
        written = out.write(writers)
    except BaseException:
        out.discard()
        raise

    name = rep["sampler"] if rep["correction"] is None else f"{rep['sampler']} + {rep['correction_repr']}"
    if rep["auto"]:
        name += f" (auto: the defaults table's choice for {args.model} at {args.steps} steps)"
    extra = "".join(f", {v} {k} calls" for k, v in rep["extra"].items())
    say(f"sampler {name}, {args.steps} steps, {len(seeds)} image(s) (seeds {_seed_text(seeds)}): "
        f"NFE {rep['nfe']} per image{extra}; sampling {rep['wall_time_s']:.1f} s, "
        f"total {time.perf_counter() - t_start:.1f} s")
    grid_path = written[-1]
    first, last = written[0], written[-2]
    per_seed = f"{first}" if len(seeds) == 1 else f"{first} ... {last} ({len(seeds)} per-seed PNGs)"
    print(f"wrote {grid_path}, {per_seed}")
    return 0
