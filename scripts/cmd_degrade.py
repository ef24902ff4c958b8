"""``hessdiff degrade``: make a reproducible measurement of an image with a task and a seed.

Writes ``OUT/measurement.png`` (the measurement as a picture: the low-resolution, blurred or masked
image) and ``OUT/measurement.pt`` (the exact ``y`` tensor, the task name and parameters, the
operator with its kernel / mask tensors, the noise model and the seed), which
``hessdiff.tasks.load_measurement`` turns back into the operator and ``y``. Both files are written
atomically; existing files are never overwritten unless ``--overwrite`` is given.
"""

from __future__ import annotations

import argparse

from hessdiff.scripts.cli import CLIError

EPILOG = """examples:
  hessdiff degrade face.png --task gaussian_blur --param kernel_size=61 --param std=3.0 --seed 0 --out runs/blur
  hessdiff degrade face.png --preset dps-256 --task motion_blur --seed 7 --out runs/motion
  hessdiff degrade face.png --task random_inpainting --param drop=0.92 --param sigma_y=0 --out runs/rand
  hessdiff degrade --list                   # tasks with their parameters, presets with their entries
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "degrade",
        help="degrade an image with a task and a seed; write the measurement (PNG + exact tensor file)",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("image", nargs="?", help="clean image file (PNG, JPEG, ...); grey images stay one channel")
    p.add_argument("--task", help="task name (see --list), or the entry name within --preset")
    p.add_argument("--preset", help="paper protocol preset (dps-256, psld-512, stsl-512) or a preset .json file")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="task parameter (repeatable); VALUE is read as JSON when it parses (numbers, lists, "
                        "true/false/null), otherwise as a string")
    p.add_argument("--seed", type=int, default=0, help="seed of the image's mask / kernel / noise (default 0)")
    p.add_argument("--out", help="output folder (created if missing)")
    p.add_argument("--overwrite", action="store_true", help="replace existing measurement files in --out")
    p.add_argument("--list", action="store_true", help="list tasks and presets, then exit")
    p.set_defaults(func=run)


def _listing() -> str:
    import inspect

    from hessdiff.tasks import TASKS, list_presets, load_preset, task_parameters

    lines = ["tasks (hessdiff degrade IMAGE --task NAME --param KEY=VALUE ...):"]
    for name in TASKS:
        params = task_parameters(name)
        shown = ", ".join(k if v is inspect.Parameter.empty else f"{k}={v!r}" for k, v in params.items())
        lines.append(f"  {name}: {shown}")
    lines.append("presets (hessdiff degrade IMAGE --preset NAME --task ENTRY):")
    for name in list_presets():
        preset = load_preset(name)
        lines.append(f"  {name}: {', '.join(preset.entries())}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from hessdiff.tasks import load_preset, make_task
    from hessdiff.utils.files import atomic_write_many
    from hessdiff.utils.images import load_image, to_uint8_array

    if args.list:
        print(_listing())
        return 0
    if not args.image:
        raise CLIError("give the IMAGE to degrade (or --list)")
    if not args.task:
        raise CLIError("give --task NAME (see hessdiff degrade --list)")
    if not args.out:
        raise CLIError("give --out DIR, the folder for measurement.png and measurement.pt")
    if args.seed < 0:
        raise CLIError(f"--seed must be non-negative; got {args.seed}")
    out = Path(args.out)
    targets = [out / "measurement.pt", out / "measurement.png"]
    if not args.overwrite:
        existing = [str(t) for t in targets if t.exists()]
        if existing:
            raise CLIError(f"refusing to overwrite {', '.join(existing)}; choose another --out or pass --overwrite")
    from hessdiff.scripts._common import check_output_folder, parse_key_values, png_writer, task_name

    check_output_folder(out)

    params = parse_key_values(args.param, "--param")
    try:
        if args.preset:
            task = load_preset(args.preset).task(args.task, **params)
        else:
            task = make_task(task_name(args.task), **params)
        x = load_image(args.image)
        m = task.measure(x, seed=args.seed)
    except RuntimeError as exc:
        raise CLIError(str(exc)) from exc

    y = m.y
    if y.ndim != 4 or y.shape[1] not in (1, 3):
        raise CLIError(f"the measurement of task {task.name!r} has shape {list(y.shape)}, not an image")
    picture = to_uint8_array(y)
    data = m.to_dict()
    data["image"] = str(args.image)

    def write_pt(tmp: Path) -> None:
        torch.save(data, tmp)

    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write_many({targets[0]: write_pt, targets[1]: png_writer(picture)}, overwrite=args.overwrite)
    except (FileExistsError, IsADirectoryError) as exc:
        if created and not any(out.iterdir()):
            out.rmdir()
        raise CLIError(str(exc)) from exc
    except BaseException:
        if created and not any(out.iterdir()):
            out.rmdir()
        raise
    label = m.label or m.task
    print(f"{label}: {list(m.x_shape)} -> {list(y.shape)}, seed {args.seed}, noise {m.noise!r}")
    print(f"wrote {targets[1]} and {targets[0]}")
    return 0
