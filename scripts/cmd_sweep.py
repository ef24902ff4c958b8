"""``hessdiff sweep``: run a benchmark sweep from a TOML configuration, resumable and multi-process.

Computes every item (model x task x method x steps x image x seed) of the configuration that is not
done yet, writing one PNG, one result file and (for FID/KID) one feature file per item atomically,
then rebuilds ``results.jsonl``, ``summary.csv``, ``summary.md``, ``summary.json`` and
``plots/*.png`` in the output folder. A killed run loses nothing already finished: run the same
command with ``--resume``. The same command under ``torchrun --nproc_per_node N`` shares the work
between N processes (gloo on CPU, nccl on GPU) and gives the same results. See
``hessdiff.eval.sweep`` and ``hessdiff.eval.sweep.config`` for the file layout and the schema.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

EPILOG = """examples:
  hessdiff sweep mnist-quick --out runs/quick                # a shipped example (assets/sweeps/*.toml)
  hessdiff sweep my.toml --out runs/ffhq --resume            # continue after an interruption
  torchrun --nproc_per_node 4 -m hessdiff.scripts.cli sweep my.toml --out runs/ffhq --resume
  hessdiff sweep --list-methods                              # methods with their options
  hessdiff sweep my.toml --out runs/x --check                # validate the configuration only
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sweep",
        help="benchmark sweep (samplers x tasks x steps x seeds) from a TOML file; resumable, multi-process",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", nargs="?", help="sweep configuration (TOML file, or the name of a shipped example: "
                                             "mnist-quick, mnist-generation, mnist-restoration)")
    p.add_argument("--out", help="output folder (new or empty, or holding this same sweep with --resume)")
    p.add_argument("--resume", action="store_true", help="continue the sweep already in --out (done items are kept)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="compute at most about N more items (whole batches), then write partial summaries")
    p.add_argument("--device", default="auto", help="auto (default: cuda:LOCAL_RANK if available), cpu, cuda, cuda:1")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads per process (default: PyTorch's; torchrun sets 1)")
    p.add_argument("--dist-timeout", type=float, default=30.0, metavar="MINUTES",
                   help="with torchrun: how long a process waits for the others at the start, and rank 0 at the "
                        "end without another process finishing an item, before stopping (default: 30)")
    p.add_argument("--compare", action="append", default=[], metavar="A:B",
                   help="after the run, print paired differences of two methods per model and task, e.g. "
                        "mmps@20:dps@100 (LABEL@STEPS, LABEL for methods without steps; repeatable)")
    p.add_argument("--against", action="append", default=None, metavar="OTHER",
                   help="with --compare: read the second method from another sweep (its --out folder, or its "
                        "results.jsonl, .gz allowed), paired by task label, image id and seed; repeat it to join "
                        "shards of that sweep")
    p.add_argument("--with", dest="with_", action="append", default=[], metavar="SHARD",
                   help="with --compare: join the rows of another shard of this sweep (a folder or results file "
                        "of a run over other images, e.g. [data] skip) with --out's; repeatable")
    p.add_argument("--metric", default="psnr", help="the paired metric of --compare (default: psnr)")
    p.add_argument("--compare-only", action="store_true",
                   help="print the --compare tables from the results already in --out, without running or "
                        "loading anything (CONFIG may be omitted)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plots", action="store_true", help="do not write plots/*.png")
    p.add_argument("--check", action="store_true", help="validate the configuration, print it resolved, and exit")
    p.add_argument("--list-methods", action="store_true", help="list the available methods and their options")
    p.set_defaults(func=run)


def _list_methods() -> str:
    import inspect

    from hessdiff.eval.sweep.methods import METHODS

    lines = ["methods ([[methods]] name = ...; options = { ... }):"]
    for name, spec in sorted(METHODS.items()):
        needs = []
        if spec.needs_model:
            needs.append("model")
        if spec.needs_measurement:
            needs.append("task")
        if not spec.uses_steps:
            needs.append("no steps")
        opts = ", ".join(k if v is inspect.Parameter.empty else f"{k}={v!r}" for k, v in spec.options.items())
        lines.append(f"  {name} [{', '.join(needs) or '-'}]: {spec.description}")
        lines.append(f"      options: {opts or 'none'}")
    return "\n".join(lines)


def shipped_configs() -> dict[str, Path]:
    """Example sweep configurations shipped in ``hessdiff/assets/sweeps``, by name."""
    from importlib import resources

    folder = Path(str(resources.files("hessdiff.assets"))) / "sweeps"
    return {p.stem: p for p in sorted(folder.glob("*.toml"))} if folder.is_dir() else {}


def _config_path(name: str) -> Path:
    """A configuration file path, or the name of a shipped example (``mnist-quick``)."""
    p = Path(name)
    if p.is_file():
        return p
    shipped = shipped_configs()
    if name in shipped:
        return shipped[name]
    from hessdiff.scripts.cli import CLIError

    raise CLIError(f"sweep configuration {name} not found (shipped examples: {', '.join(shipped) or 'none'})")


def _comparison_pairs(args: argparse.Namespace) -> list[tuple[tuple[str, int], tuple[str, int]]]:
    """The parsed ``--compare`` pairs, with ``--against`` checked (bad input fails before anything runs)."""
    from hessdiff.eval.sweep.compare import parse_pair
    from hessdiff.scripts.cli import CLIError

    pairs = [parse_pair(c) for c in args.compare]
    if args.against is not None and not pairs:
        raise CLIError("--against needs --compare A:B (B is read from OTHER)")
    if args.with_ and not pairs:
        raise CLIError("--with needs --compare A:B (it adds rows to --out's)")
    for flag, paths in (("--against", args.against or []), ("--with", args.with_)):
        for path in paths:
            if not Path(path).exists():
                raise CLIError(f"{flag} {path}: no such sweep folder or results file")
    return pairs


def _print_comparisons(out: Any, pairs: list[tuple[tuple[str, int], tuple[str, int]]],
                       args: argparse.Namespace) -> None:
    from hessdiff.eval.sweep.compare import format_comparison, paired_comparison

    rows_of = [out, *args.with_] if args.with_ else out
    for k, (a, b) in enumerate(pairs):
        print(("\n" if k else "") + format_comparison(
            paired_comparison(rows_of, a, b, args.metric, against=args.against), a, b))


def _compare_only(args: argparse.Namespace) -> int:
    """``--compare-only``: the paired tables of a sweep folder's ``results.jsonl`` (nothing is run or loaded)."""
    from hessdiff.scripts.cli import CLIError

    if not args.out or not args.compare:
        raise CLIError("--compare-only needs --out DIR (a sweep folder or its results file) and at least one "
                       "--compare A:B")
    pairs = _comparison_pairs(args)
    if not (Path(args.out).is_file() or (Path(args.out) / "results.jsonl").is_file()):
        raise CLIError(f"{args.out} has no results.jsonl (run the sweep first)")
    _print_comparisons(args.out, pairs, args)
    return 0


def run(args: argparse.Namespace) -> int:
    from hessdiff.scripts.cli import CLIError

    if args.list_methods:
        print(_list_methods())
        return 0
    if args.compare_only:
        return _compare_only(args)
    if not args.config:
        raise CLIError("give a sweep configuration file (see hessdiff sweep --help)")
    import json

    from hessdiff.eval.sweep import SweepError, run_sweep
    from hessdiff.eval.sweep.config import check_models, load_config
    from hessdiff.samplers.models import ModelLoadError

    cfg = load_config(_config_path(args.config))
    check_models(cfg)  # a missing model fails here, for --check and before a run touches --out
    if args.check:
        print(json.dumps(cfg.resolved(), indent=2))
        print(f"configuration OK ({sum(len(m.steps) for m in cfg.methods)} method x steps entries, "
              f"{len(cfg.seeds)} seed(s))", file=sys.stderr)
        return 0
    if not args.out:
        raise CLIError("--out is required (the folder for images, results and summaries)")
    pairs = _comparison_pairs(args)  # bad specs fail before the run
    if args.threads is not None:
        import torch

        if args.threads < 1:
            raise CLIError(f"--threads must be positive, got {args.threads}")
        torch.set_num_threads(args.threads)
    rank = int(os.environ.get("RANK", "0"))
    t0 = time.perf_counter()
    try:
        report = run_sweep(cfg, args.out, resume=args.resume, limit=args.limit, device=args.device,
                           progress=not args.no_progress, plots=not args.no_plots, dist_timeout=args.dist_timeout,
                           log=(lambda s: print(s, file=sys.stderr, flush=True)) if rank == 0 else None)
    except (SweepError, ModelLoadError) as err:
        raise CLIError(str(err)) from err
    if rank != 0:
        return 0
    wall = time.perf_counter() - t0
    per = report.seconds_per_image
    timing = f"{wall:.1f} s" + (f", {per:.3g} s per image on rank 0" if per is not None else "")
    state = "complete" if report.complete else f"partial: {report.num_done} of {report.num_items} items done"
    if report.skipped_files:
        print(f"skipped {len(report.skipped_files)} unreadable image file(s) (listed in {report.out}/sweep.json)",
              file=sys.stderr)
    files = report.files
    where = ", ".join(str(files[k]) for k in ("results", "csv", "markdown") if k in files)
    if "plots" in files:
        where += f", plots in {files['plots']}/"
    print(f"sweep {state} ({timing}); results: {where}")
    if pairs:
        print()
        _print_comparisons(report.out, pairs, args)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m hessdiff.scripts.cmd_sweep CONFIG --out DIR ...``: the sweep command on its own."""
    from hessdiff.eval.sweep.config import SweepConfigError
    from hessdiff.scripts.cli import CLIError

    parser = argparse.ArgumentParser(prog="hessdiff sweep")
    sub = parser.add_subparsers(dest="command")
    register(sub)
    args = parser.parse_args(["sweep", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.func(args) or 0)
    except (CLIError, SweepConfigError, ValueError, FileNotFoundError, PermissionError) as exc:
        print(f"hessdiff sweep: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
