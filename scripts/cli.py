"""The ``hessdiff`` command.

Each sub-command lives in its own module under ``hessdiff.scripts`` exposing
``register(subparsers)``, which adds its parser and sets ``func`` (called with the parsed
arguments, returning an exit code). Heavy imports happen inside ``func``, so ``hessdiff --help``
stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

#: sub-command modules, in the order ``--help`` lists them
COMMAND_MODULES: tuple[str, ...] = (
    "hessdiff.scripts.cmd_bench",
    "hessdiff.scripts.cmd_degrade",
    "hessdiff.scripts.cmd_sweep",
    "hessdiff.scripts.cmd_eval",
    "hessdiff.scripts.cmd_restore",
    "hessdiff.scripts.cmd_sample",
)

EPILOG = """examples:
  hessdiff restore assets/examples/mnist_test_150_digit3.png --task box-inpainting --param box_size=10 --out runs/digit3
  hessdiff sample --sampler dpm++ --steps 20 --seeds 0-15 --out runs/samples
  hessdiff degrade photo.png --preset dps-256 --task gaussian_blur --seed 0 --out runs/blurred
  hessdiff bench gmm-prior --quick          # solver error vs NFE on exact Gaussian-mixture priors
  hessdiff sweep mnist-quick --out runs/sweep
  hessdiff <command> --help                 # options of one command
"""


class CLIError(Exception):
    """An error the user can fix; printed without a traceback, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hessdiff",
        description="Second-order diffusion sampling and diffusion posterior sampling.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (CLIError, ValueError, FileNotFoundError, PermissionError) as exc:
        print(f"hessdiff {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
