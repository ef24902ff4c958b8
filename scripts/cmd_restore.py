"""``hessdiff restore``: degrade an image with a task, restore it with a diffusion posterior sampler.

Reads IMAGE, converts it to the model's channel count (grey or RGB) and size, makes the measurement
``y = noise(A x)`` of the task with ``--seed``, runs the method (STSL, DPS, latent DPS, PSLD) on the model
and writes, all at once and only after the run succeeded:

* ``OUT/measurement.png`` and ``OUT/measurement.pt`` (exact ``y``, operator, noise and seed;
  ``hessdiff.tasks.load_measurement`` reads it back);
* ``OUT/restored.png``, the restoration;
* ``OUT/comparison.png``, input | measurement | restoration side by side, enlarged with nearest
  neighbour so that small images stay visible;
* ``OUT/metrics.json``, the metrics against the input, the cost and the settings.

It prints PSNR / SSIM (and LPIPS when its weights are on disk) against the input image and the cost
(network evaluations, forward / backward passes, wall time).

Image size: an image whose size differs from the model's resolution is centre-cropped to a square and
resized (PIL bicubic, ``hessdiff.eval.images.resize_image`` mode ``center-crop``) with a printed note;
``--no-resize`` refuses it instead.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hessdiff.samplers.defaults import DEFAULTS, default_method, method_defaults
from hessdiff.scripts.cli import CLIError

if TYPE_CHECKING:  # torch, numpy and the samplers are imported when a command runs, not for --help
    from torch import Tensor

    from hessdiff.samplers.api import RestoreResult

__all__ = ["register", "run", "restore_image", "method_options", "DEFAULT_STEPS",
           "METHOD_DEFAULTS", "default_method"]

EPILOG = """examples:
  hessdiff restore --example 4 --task box-inpainting --param box_size=10   # a shipped digit (--example list)
  hessdiff restore assets/examples/mnist_test_150_digit3.png --task box-inpainting --param box_size=10 --out runs/digit3
  hessdiff restore digit.png --task super-resolution --param scale=2 --method dps --steps 100 --seed 3
  hessdiff restore digit.png --task random-inpainting --param drop=0.7 --method stsl --option lam=0.5
  hessdiff restore face.png --model google/ddpm-celebahq-256 --task gaussian-blur --param kernel_size=31 --device cuda
  hessdiff restore photo.png --model stable-diffusion-v1-5/stable-diffusion-v1-5 --method psld \\
      --task box-inpainting --param box_size=192 --dtype float16 --device cuda
  hessdiff restore face.png --model ./my-ddpm-folder --preset dps-256 --task super_resolution_x4
  hessdiff degrade --list                     # tasks and their parameters
"""

#: default --max-pixels: larger images are refused before decoding (PIL's bomb limit is ~89 MP)
DEFAULT_MAX_PIXELS = 40_000_000

#: default number of sampling steps
DEFAULT_STEPS = 50  # the embedded models' rows; other models take their method's published steps

#: options each method starts from (``--option`` overrides them; everything else is the sampler's own default).
#: Chosen on 16 held-out digits of the embedded models, box inpainting (12x12), 50 steps: the ancestral step
#: (``ddim_eta = 1``) beats the deterministic one for every method, and STSL's squared data term with a
#: constant step diverges at the first, noisiest steps (its gradient carries 1/alpha_t), so the CLI uses the
#: unsquared (normalised) data term as DPS does.
#: the options each method runs with on the embedded models (the defaults table's "mnist" rows)
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    m: {k: v for k, v in method_defaults(m, "mnist").items() if k != "steps"} for m in DEFAULTS
}

#: the option that sets each method's step size (named in the divergence hint)
_STEP_OPTION = {"dps": "--option zeta=...", "latent_dps": "--option zeta=...", "psld": "--option omega=...",
                "stsl": "--option lam=...", "mmps": "--option iterations=...",
                "diffpir": "--option lam=...", "daps": "--option lr=...",
                "tmpd": "a larger --option variance_floor=..., or --option clip_x0=1",
                "pigdm": "--option scaling=tweedie, or --option clip_x0=1"}

#: options the command sets itself (not accepted from --option)
_RESERVED = ("generator", "callback", "progress", "autoencoder")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "restore",
        help="degrade an image with a task and restore it with a diffusion posterior sampler",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("image", nargs="?", help="clean image file (PNG, JPEG, ...); or use --example N")
    p.add_argument("--example", metavar="N",
                   help="use the N-th shipped example image instead of IMAGE (works outside a clone); "
                        "--example list prints them")
    p.add_argument("--task",
                   help="task name, e.g. box-inpainting, random-inpainting, super-resolution, gaussian-blur, "
                        "motion-blur, denoising (see `hessdiff degrade --list`); with --preset, the preset's entry")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="task parameter (repeatable), e.g. box_size=14, scale=2, sigma_y=0.05; VALUE is read as "
                        "JSON when it parses")
    p.add_argument("--preset", help="paper protocol preset (dps-256, psld-512, stsl-512) or a preset .json file")
    p.add_argument("--method", help="posterior sampler: dps (default), mmps, tmpd, pigdm, diffpir, daps or stsl for "
                                    "pixel-space models; stsl (default), mmps, psld or latent_dps for latent models")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="method option (repeatable), forwarded to the sampler, e.g. zeta=1.0, lam=0.5, inner_steps=5")
    p.add_argument("--model", default="mnist",
                   help="embedded name (mnist [default], mnist-ldm, fashion, fashion-ldm), a local diffusers "
                        "folder, or a Hugging Face hub id such as google/ddpm-celebahq-256")
    p.add_argument("--prompt", default="", help="text prompt for text-conditional models (default: empty)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"sampling steps (default: the method's defaults row: {DEFAULT_STEPS} on the embedded "
                        "models, the paper's count (e.g. DPS 1000) on others)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the measurement (mask / kernel / noise) and of the sampler (default 0)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help=f"refuse images with more than N pixels (default {DEFAULT_MAX_PIXELS:_}, "
                        f"{DEFAULT_MAX_PIXELS // 10**6} MP; checked before decoding)")
    p.add_argument("--no-resize", action="store_true",
                   help="refuse an image whose size differs from the model's resolution instead of resizing it")
    p.add_argument("--out", default="runs/restore", help="output folder (default runs/restore; created if missing)")
    p.add_argument("--overwrite", action="store_true", help="replace existing files in --out")
    p.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="float32",
                   help="network dtype: float32 (default), float16, bfloat16; guidance arithmetic stays float32")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: 1 for the embedded models, where it is "
                                                 "2-4x faster than 2; torch's own choice for others)")
    p.add_argument("--quiet", action="store_true", help="no progress bar and notes; print only the last line")
    p.set_defaults(func=run)


# ================================================================================ library part
def method_options(method: str, given: dict[str, Any], family: str | None = "mnist",
                   task: str | None = None) -> dict[str, Any]:
    """The options of ``method`` from the defaults table (:mod:`hessdiff.samplers.defaults`; with ``task``,
    its per-task entries) updated with ``given``; unknown names raise :class:`CLIError` listing the
    accepted ones."""
    from hessdiff.samplers.api import method_options as _options

    try:
        return _options(method, given, family, task=task)[0]
    except ValueError as exc:
        raise CLIError(str(exc)) from exc


def restore_image(
    model: Any,
    measurement: Any,
    *,
    method: str | None = None,
    steps: int | None = None,
    seed: int = 0,
    options: dict[str, Any] | None = None,
    denoiser: Any | None = None,
    progress: bool = False,
) -> RestoreResult:
    """:func:`hessdiff.restore` with a progress bar, the CLI's checks and its errors (:class:`CLIError`)."""
    import torch

    from hessdiff.samplers.api import check_method, restore
    from hessdiff.samplers.defaults import method_defaults, model_family
    from hessdiff.scripts._common import StepProgress, make_denoiser

    method = method or default_method(model.is_latent)
    try:
        check_method(method, model.is_latent, model.source or "the model")
        method_options(method, dict(options or {}), model_family(model.source))
    except ValueError as exc:
        raise CLIError(str(exc)) from exc
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise CLIError(f"--steps must be a positive integer, got {steps!r}")
    if seed < 0:
        raise CLIError(f"--seed must be non-negative, got {seed}")
    den = denoiser if denoiser is not None else make_denoiser(model)
    diverged = CLIError(f"{method} diverged (NaN or Inf values appeared); lower its step size "
                        f"({_STEP_OPTION.get(method, 'see --option')}) or use more --steps")
    n = steps if steps is not None else int(method_defaults(method, model_family(model.source),
                                                            task=getattr(measurement, "task", None))["steps"])
    with StepProgress(n, method, enabled=progress) as bar:
        try:
            res = restore(model, measurement, method=method, steps=steps, seed=seed, options=options, denoiser=den,
                          callback=bar)
        except ValueError as exc:
            if "NaN" in str(exc):  # an operator or the sampler met a non-finite state
                raise diverged from exc
            raise
    if not bool(torch.isfinite(res.restored).all()):
        raise diverged
    return res


# ================================================================================ command
def _task_name(name: str) -> str:
    from hessdiff.scripts._common import task_name

    return task_name(name)


def example_images() -> list[Path]:
    """The shipped example PNGs (``hessdiff.assets/examples``), sorted by name; ``--example N`` indexes them."""
    from importlib import resources

    folder = Path(str(resources.files("hessdiff.assets"))) / "examples"
    return sorted(folder.glob("*.png")) if folder.is_dir() else []


def _example_listing() -> str:
    return "\n".join(f"  {i}  {p.name}" for i, p in enumerate(example_images())) or "  (none shipped)"


def _fit_image(x: Tensor, resolution: int, no_resize: bool, source: str) -> tuple[Tensor, str | None]:
    """``x`` at ``resolution x resolution`` (centre crop + bicubic resize) and the note to print, or an error."""
    h, w = int(x.shape[-2]), int(x.shape[-1])
    if (h, w) == (resolution, resolution):
        return x, None
    if no_resize:
        raise CLIError(f"the image is {h}x{w} (HxW) but {source} takes {resolution}x{resolution} images; "
                       "resize it, or leave out --no-resize to let hessdiff centre-crop and resize it")
    import numpy as np
    import torch
    from PIL import Image

    from hessdiff.eval.images import resize_image
    from hessdiff.utils.images import from_uint8, to_uint8_array

    pil = Image.fromarray(to_uint8_array(x))
    arr = torch.from_numpy(np.asarray(resize_image(pil, resolution, "center-crop")).copy())
    arr = arr[..., None] if arr.ndim == 2 else arr
    out = from_uint8(arr.permute(2, 0, 1)[None]).contiguous()
    note = (f"note: the image is {h}x{w}; centre-cropped and resized (bicubic) to {resolution}x{resolution}, "
            f"the resolution of {source} (--no-resize refuses instead)")
    return out, note


def _metrics(restored: Tensor, reference: Tensor) -> dict[str, Any]:
    """PSNR / SSIM (and LPIPS-alex if its weights are on disk) of one image against the reference."""
    from hessdiff.eval.metrics import psnr, ssim
    from hessdiff.eval.metrics.weights import MissingWeightsError

    def rgb(t: Tensor) -> Tensor:
        t = t.detach().float().cpu()
        return t.repeat(1, 3, 1, 1) if t.shape[1] == 1 else t

    a, b = rgb(restored), rgb(reference)
    out: dict[str, Any] = {"psnr": float(psnr(a, b)[0]), "missing": {}}
    try:
        out["ssim"] = float(ssim(a, b)[0])
    except ValueError as exc:  # images smaller than the SSIM window
        out["ssim"] = None
        out["missing"]["ssim"] = str(exc)
    try:
        from hessdiff.eval.metrics import LPIPS

        out["lpips_alex"] = float(LPIPS("alex", download=False)(a, b)[0])
    except MissingWeightsError as exc:
        out["lpips_alex"] = None
        out["missing"]["lpips_alex"] = f"weights missing: place {exc.filename} at {exc.path}"
    except ImportError as exc:
        out["lpips_alex"] = None
        out["missing"]["lpips_alex"] = f"the lpips package is not installed ({exc})"
    return out


def _fmt(v: float | None, spec: str) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _example_image(args: argparse.Namespace, say: Callable[..., None]) -> str:
    """The path of shipped example ``--example N`` (refused together with IMAGE, or out of range)."""
    if args.image:
        raise CLIError("give either IMAGE or --example N, not both")
    examples = example_images()
    try:
        k = int(args.example)
    except ValueError:
        k = -1
    if not 0 <= k < len(examples):
        raise CLIError(f"--example {args.example}: choose N from 0 to {len(examples) - 1} "
                       f"(hessdiff restore --example list); shipped: "
                       + ", ".join(f"{i}={p.name}" for i, p in enumerate(examples)))
    say(f"example {k}: {examples[k].name}")
    return str(examples[k])


def _say_results(say: Callable[..., None], scores: dict[str, Any], base: dict[str, Any] | None, cost: Any,
                 method: str, t_start: float) -> None:
    """The metrics against the input (and the measurement's, when it is image-shaped) and the cost."""
    lp = scores["lpips_alex"]
    lp_text = _fmt(lp, ".4f") if lp is not None else f"n/a ({scores['missing'].get('lpips_alex', 'missing')})"
    say(f"restored vs input:    PSNR {_fmt(scores['psnr'], '.2f')} dB  SSIM {_fmt(scores['ssim'], '.4f')}  "
        f"LPIPS {lp_text}")
    if base is not None:
        say(f"measurement vs input: PSNR {_fmt(base['psnr'], '.2f')} dB  SSIM {_fmt(base['ssim'], '.4f')}")
    backward = f", {cost.network_backward} backward" if cost.network_backward else ""
    vae = ""
    if cost.decoder_forward or cost.encoder_forward:
        vae = f", decoder {cost.decoder_forward} fwd / {cost.decoder_backward} bwd, encoder {cost.encoder_forward} fwd"
    say(f"cost: NFE {cost.nfe} (as the {method} paper counts), network {cost.network_forward} forward{backward}"
        f"{vae}; sampling {cost.wall_time_s:.1f} s, total {time.perf_counter() - t_start:.1f} s")


def _write_outputs(out: Any, x: Any, m: Any, restored: Any, method: str, report: dict[str, Any],
                   image: str) -> list[Path]:
    """The five files of a restore run, written together by the :class:`OutputDir` (all or none)."""
    import torch

    from hessdiff.scripts._common import labelled_row, png_writer, to_rgb_uint8
    from hessdiff.utils.images import to_uint8_array

    comparison = labelled_row([to_rgb_uint8(x), to_rgb_uint8(m.y), to_rgb_uint8(restored)],
                              ["input", "measurement", f"restored ({method})"])
    return out.write({
        "restored.png": png_writer(to_uint8_array(restored)),
        "comparison.png": png_writer(comparison),
        "measurement.png": png_writer(to_uint8_array(m.y.detach().cpu())),
        "measurement.pt": lambda tmp: torch.save({**m.to_dict(), "image": image}, tmp),
        "metrics.json": lambda tmp: tmp.write_text(json.dumps(report, indent=2, default=str) + "\n"),
    })


def run(args: argparse.Namespace) -> int:
    import torch

    from hessdiff.samplers.api import check_method
    from hessdiff.samplers.defaults import method_defaults, model_family
    from hessdiff.scripts._common import (
        OutputDir,
        load_model_for_cli,
        make_denoiser,
        parse_device,
        parse_dtype,
        parse_key_values,
        set_threads,
    )
    from hessdiff.tasks import load_preset, make_task
    from hessdiff.tasks.task import resolution_defaults
    from hessdiff.utils.images import load_image

    t_start = time.perf_counter()
    say = (lambda *a: None) if args.quiet else print
    if args.example is not None and args.example.strip().lower() == "list":
        print("shipped example images (hessdiff restore --example N --task ...):\n" + _example_listing())
        return 0
    if args.example is not None:
        args.image = _example_image(args, say)
    if not args.image:
        raise CLIError("give the IMAGE to restore, or --example N (hessdiff restore --example list)")
    if not args.task:
        raise CLIError("give --task NAME (see hessdiff degrade --list)")
    # ---- cheap checks first: arguments, image, task, output folder
    if args.steps is not None and args.steps < 1:
        raise CLIError(f"--steps must be a positive integer, got {args.steps}")
    if args.seed < 0:
        raise CLIError(f"--seed must be non-negative, got {args.seed}")
    set_threads(args.threads, args.model)
    device, dtype = parse_device(args.device), parse_dtype(args.dtype)
    params = parse_key_values(args.param, "--param")
    options = parse_key_values(args.option, "--option")
    from hessdiff.samplers.guidance import POSTERIOR_SAMPLERS

    method = args.method.replace("-", "_") if args.method else None
    if method is not None and method not in POSTERIOR_SAMPLERS:
        raise CLIError(f"unknown method {args.method!r}; available: {', '.join(POSTERIOR_SAMPLERS)}")
    if method is not None:
        method_options(method, options, model_family(args.model))
    if args.preset:
        task = load_preset(args.preset).task(args.task, **params)
    else:
        task = make_task(_task_name(args.task), **params)
    if args.max_pixels < 1:
        raise CLIError(f"--max-pixels must be a positive integer, got {args.max_pixels}")
    from hessdiff.utils.images import ImageTooLargeError

    try:
        x_file = load_image(args.image, max_pixels=args.max_pixels)  # missing / unreadable files raise with the path
    except ImageTooLargeError as exc:
        raise CLIError(f"{exc}; pass --max-pixels N to allow larger images (or downscale the image)") from exc

    names = ["measurement.png", "measurement.pt", "restored.png", "comparison.png", "metrics.json"]
    out = OutputDir(args.out, names, overwrite=args.overwrite)
    out.prepare()
    try:
        model = load_model_for_cli(args.model, device, dtype)
        source = args.model
        method = method or default_method(model.is_latent)
        try:
            check_method(method, model.is_latent, source)
        except ValueError as exc:
            raise CLIError(str(exc)) from exc
        x = load_image(args.image, channels=1 if model.channels == 1 else 3, max_pixels=args.max_pixels) \
            if x_file.shape[1] != model.channels \
            else x_file
        x, note = _fit_image(x, int(model.resolution), args.no_resize, source)
        if note:
            say(note)
        if not args.preset:  # geometric defaults (box, scale, kernel) follow the model's resolution
            scaled = {k: v for k, v in resolution_defaults(task.name, int(model.resolution)).items()
                      if k not in params}
            if scaled:
                task = make_task(task.name, **{**scaled, **params})
        m = task.measure(x, seed=args.seed)
        if m.y.ndim != 4 or m.y.shape[1] not in (1, 3):
            raise CLIError(f"the measurement of task {task.name!r} has shape {list(m.y.shape)}, not an image")
        kind = "latent" if model.is_latent else "pixel"
        shown_params = ", ".join(f"{k}={v}" for k, v in m.params.items())
        say(f"model {source} ({kind} space, images {model.channels}x{model.resolution}x{model.resolution}) "
            f"on {device.type} {str(dtype).replace('torch.', '')}")
        say(f"task {m.label or m.task} ({shown_params}), seed {args.seed}: {list(x.shape)} -> {list(m.y.shape)}")
        den = make_denoiser(model, prompt=args.prompt)
        family = model_family(source)
        opts_shown = ", ".join(f"{k}={v}" for k, v in method_options(method, options, family, m.task).items())
        steps = args.steps if args.steps is not None else int(method_defaults(method, family, task=m.task)["steps"])
        say(f"method {method} ({opts_shown}), {steps} steps")
        try:
            res = restore_image(model, m, method=method, steps=steps, seed=args.seed, options=options,
                                denoiser=den, progress=not args.quiet)
        except RuntimeError as exc:
            if dtype == torch.float32:
                raise
            raise CLIError(f"{method} failed with the network in {args.dtype} on {device.type}: {exc} "
                           "(try --dtype float32)") from exc

        restored = res.restored
        scores = _metrics(restored, x)
        base = _metrics(m.y.cpu(), x) if tuple(m.y.shape) == tuple(x.shape) else None
        cost = res.cost
        report = {
            "image": str(args.image), "model": source, "space": kind, "method": method, "options": res.options,
            "steps": steps, "seed": args.seed, "task": m.task, "label": m.label, "params": m.params,
            "device": str(device), "dtype": str(dtype).replace("torch.", ""), "metrics_vs_input": scores,
            "measurement_metrics_vs_input": base, "cost": cost.as_dict(),
        }
        written = _write_outputs(out, x, m, restored, method, report, str(args.image))
    except BaseException:
        out.discard()
        raise

    _say_results(say, scores, base, cost, method, t_start)
    order = ["restored.png", "comparison.png", "measurement.png", "measurement.pt", "metrics.json"]
    paths = {p.name: p for p in written}
    print("wrote " + ", ".join(str(paths[n]) for n in order))
    return 0
