"""``hessdiff bench``: benchmarks that later samplers are compared against.

``hessdiff bench gmm-prior``: sampling error against NFE of the base solvers (DDIM, DPM-Solver-3,
DPM-Solver++ 2M / 3M) on exactly known priors -- the 25-component grid Gaussian mixture in
``d = 8, 80, 800`` (sliced W1 and component TV against exact draws) and a Gaussian with a
CIFAR-like spectrum (``d = 3072``, exact W2). The exact denoiser stands in for the network, so the
numbers measure the solvers alone. See :mod:`hessdiff.scripts.bench.gmm` for the protocol.

The table is printed; ``--out`` appends the raw rows as JSON lines; ``--write-benchmarks`` replaces
the marked section ``<!-- bench:gmm-prior --> ... <!-- /bench:gmm-prior -->`` of a Markdown file
(creating the file or appending the section if needed; nothing outside the markers is touched).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from hessdiff.scripts.cli import CLIError

EPILOG = """examples:
  hessdiff bench gmm-prior --quick                       # ~10 s: d = 8 and the Gaussian, 3 NFEs, 1 seed
  hessdiff bench gmm-prior --threads 1 --out runs/bench.jsonl --write-benchmarks BENCHMARKS.md
  hessdiff bench gmm-prior --dims 8 80 --nfe 5 10 20 --seeds 5 --spacing logsnr
"""

#: full-run defaults; ``--quick`` replaces the ones it names, explicit options override both
FULL = {"nfe": [5, 6, 8, 10, 15, 20, 50], "seeds": 3, "n_samples": 2000, "dims": [8, 80, 800],
        "gaussian_dim": 3072, "projections": 1000, "spacing": ["trailing", "logsnr"]}
QUICK = {"nfe": [5, 10, 20], "seeds": 1, "n_samples": 500, "dims": [8], "gaussian_dim": 3072,
         "projections": 200, "spacing": ["trailing", "logsnr"]}

BENCHMARKS = ("gmm-prior", "posterior", "lml")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench",
        help="benchmarks on exact priors (gmm-prior: solver error vs NFE)",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    g = sub.add_parser(
        "gmm-prior",
        help="base solvers: error vs NFE on grid Gaussian mixtures and a CIFAR-like Gaussian",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g.add_argument("--quick", action="store_true",
                   help="small configuration for a smoke run (d = 8 mixture + Gaussian, NFE 5 10 20, 1 seed, "
                        "n = 500, 200 directions)")
    g.add_argument("--nfe", type=int, nargs="+", help=f"numbers of function evaluations (default {FULL['nfe']})")
    g.add_argument("--seeds", type=int, help=f"number of seeds, 0..N-1 (default {FULL['seeds']})")
    g.add_argument("--n-samples", type=int, help=f"draws per run (default {FULL['n_samples']})")
    g.add_argument("--dims", type=int, nargs="*", help=f"grid-mixture dimensions (default {FULL['dims']}; "
                                                       "none: skip the mixtures)")
    g.add_argument("--gaussian-dim", type=int,
                   help=f"dimension of the CIFAR-like Gaussian (default {FULL['gaussian_dim']}; 0: skip)")
    g.add_argument("--spacing", nargs="+", help=f"grid spacings (default {FULL['spacing']}; also leading, "
                                                "linspace, karras, uniform)")
    g.add_argument("--methods", nargs="+",
                   help="methods (default: ddim dpm-3 dpm++2m dpm++3m; also unipc-2 unipc-3 ipndm-4 deis-3)")
    g.add_argument("--projections", type=int,
                   help=f"random directions of the sliced W1 (default {FULL['projections']})")
    g.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    g.add_argument("--out", help="append the raw rows to this JSON-lines file")
    g.add_argument("--write-benchmarks", metavar="FILE",
                   help="replace (or add) the <!-- bench:gmm-prior --> section of this Markdown file")
    g.add_argument("--progress", action="store_true", help="print one line per finished run to stderr")
    g.set_defaults(func=run_gmm_prior)
    _register_posterior(sub)
    from hessdiff.scripts.cmd_bench_lml import register_lml  # the LML sub-benchmark lives in its own module

    register_lml(sub)
    p.set_defaults(func=lambda args: _missing_benchmark(p))


def _missing_benchmark(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    raise CLIError(f"name a benchmark: {', '.join(BENCHMARKS)}")


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    base = QUICK if args.quick else FULL
    s = {k: (getattr(args, k) if getattr(args, k, None) is not None else v) for k, v in base.items()}
    if not s["nfe"] or any(n < 1 for n in s["nfe"]):
        raise CLIError(f"--nfe needs positive integers, got {s['nfe']}")
    if s["seeds"] < 1:
        raise CLIError(f"--seeds must be at least 1, got {s['seeds']}")
    if s["n_samples"] < 2:
        raise CLIError(f"--n-samples must be at least 2, got {s['n_samples']}")
    if s["projections"] < 1:
        raise CLIError(f"--projections must be positive, got {s['projections']}")
    if any(d < 1 for d in s["dims"]):
        raise CLIError(f"--dims needs positive integers, got {s['dims']}")
    if s["gaussian_dim"] < 0:
        raise CLIError(f"--gaussian-dim must be nonnegative, got {s['gaussian_dim']}")
    if not s["dims"] and not s["gaussian_dim"]:
        raise CLIError("nothing to run: no --dims and --gaussian-dim 0")
    from hessdiff.samplers.schedule import SPACINGS

    bad = [sp for sp in s["spacing"] if sp not in SPACINGS]
    if bad:
        raise CLIError(f"unknown spacing {bad[0]!r}; expected one of {', '.join(SPACINGS)}")
    if args.threads is not None and args.threads < 1:
        raise CLIError(f"--threads must be positive, got {args.threads}")
    return s


def canonical_command(args: argparse.Namespace, s: dict[str, Any]) -> str:
    """The full command with every setting spelled out (reproduces the run)."""
    parts = ["hessdiff", "bench", "gmm-prior", "--nfe", *map(str, s["nfe"]), "--seeds", str(s["seeds"]),
             "--n-samples", str(s["n_samples"]), "--dims", *map(str, s["dims"]), "--gaussian-dim",
             str(s["gaussian_dim"]), "--spacing", *s["spacing"], "--projections", str(s["projections"])]
    if args.methods:
        parts += ["--methods", *args.methods]
    if args.threads is not None:
        parts += ["--threads", str(args.threads)]
    return " ".join(shlex.quote(p) for p in parts)


def machine_description() -> str:
    """``"<n>-core CPU (<model>), <GPU or no GPU>"`` from ``nproc`` and ``/proc/cpuinfo``."""
    try:
        ncpu = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        ncpu = os.cpu_count() or 1
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    model = model or platform.processor() or platform.machine()
    import torch

    gpu = f"GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU"
    return f"{ncpu}-core CPU ({model}), {gpu}"


MARK_BEGIN = "<!-- bench:gmm-prior -->"
MARK_END = "<!-- /bench:gmm-prior -->"


def replace_section(text: str, section: str, begin: str = MARK_BEGIN, end: str = MARK_END) -> str:
    """``text`` with the block between ``begin`` and ``end`` (markers included) replaced by
    ``begin + section + end``, or with that block appended if the markers are absent."""
    block = f"{begin}\n{section.strip()}\n{end}"
    i, j = text.find(begin), text.find(end)
    if i < 0 and j < 0:
        if not text.strip():
            return block + "\n"
        sep = "" if text.endswith("\n\n") else ("\n" if text.endswith("\n") else "\n\n")
        return f"{text}{sep}{block}\n"
    if i < 0 or j < 0 or j < i:
        raise CLIError(f"malformed benchmark section: need {begin!r} followed by {end!r}; fix the file by hand")
    if text.find(begin, i + 1) >= 0:
        raise CLIError(f"the file has more than one {begin!r} section; fix it by hand")
    return text[:i] + block + text[j + len(end):]


def write_benchmarks(path: str | os.PathLike[str], section: str, begin: str = MARK_BEGIN, end: str = MARK_END) -> None:
    """Update the marked section of a Markdown file atomically (the rest is kept byte for byte)."""
    from hessdiff.utils.files import atomic_write

    p = Path(path)
    text = p.read_text(encoding="utf-8") if p.exists() else "# Benchmarks\n\n"
    atomic_write(p, replace_section(text, section, begin, end), overwrite=True, mkdir=True)


def render_section(tables: str, command: str, machine: str, settings: dict[str, Any], wall_s: float,
                   threads: int) -> str:
    import torch

    lines = [
        "## Prior benchmark: base solvers on exact priors (`hessdiff bench gmm-prior`)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine}; torch {torch.__version__}, {threads} thread(s); "
        f"{_dt.date.today().isoformat()}; total wall time {wall_s:.0f} s.",
        "",
        "Protocol (details in `hessdiff.scripts.bench.gmm`): the exact denoiser of each prior replaces the network, "
        "so only the solver errs. DDPM linear schedule (1000 steps, betas 1e-4..0.02). A grid of NFE steps "
        "(one network evaluation each) starts at t = 999 (`trailing`: diffusers' integer grid; `logsnr`: "
        "NFE + 1 points uniform in log-SNR from t = 999 to t = 0) and lands on clean data: the last step, from "
        "the grid's lowest noise level to sigma = 0, is the Tweedie denoising step in every solver. Each seed "
        "starts from exact draws of the noised prior at the first grid point, shared by all methods and NFEs. "
        "Methods: `ddim` (eta = 0), `dpm-3` (multistep DPM-Solver-3, noise prediction, the LML paper's base), "
        "`dpm++2m`, `dpm++3m` (multistep DPM-Solver++), with diffusers' defaults (lower_order_final, midpoint). "
        f"Mixtures: n = {settings['n_samples']} draws per run, sliced W1 with {settings['projections']} fixed-seed "
        "directions against n exact prior draws, component TV; cells are mean ± sd over seeds, and `floor` is "
        "the same metric for a second set of n exact draws (the Monte-Carlo noise level: differences below it "
        "are not resolved). Within a seed all methods share the start and reference draws, so most of the ± is "
        "common to all rows and overstates the uncertainty of a difference between two methods. "
        "Gaussian (CIFAR-like spectrum c_i = 0.25/(i+1)): exact W2, no sampling; `exact-ode` "
        "integrates the ODE exactly down to the grid's last network time and then takes the same final "
        "denoising step -- the error no solver on that grid can remove.",
        "",
        tables.strip(),
    ]
    return "\n".join(lines) + "\n"


def run_gmm_prior(args: argparse.Namespace) -> int:
    s = _settings(args)
    import torch

    from hessdiff.scripts.bench import gmm as B

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    methods = B.default_methods()
    if args.methods:
        known = {**methods, **B.low_nfe_methods()}
        unknown = [m for m in args.methods if m not in known]
        if unknown:
            raise CLIError(f"unknown method {unknown[0]!r}; available: {', '.join(known)}")
        methods = {k: known[k] for k in args.methods}
    problems = B.default_problems(dims=s["dims"], gaussian_dim=s["gaussian_dim"] or None)
    command = canonical_command(args, s)

    out_file = None
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        out_file = open(args.out, "a", encoding="utf-8")  # noqa: SIM115 -- closed in finally

    def on_row(row: dict[str, Any]) -> None:
        if out_file is not None:
            out_file.write(json.dumps({**row, "command": command}) + "\n")
            out_file.flush()
        if args.progress and row["metric"] in ("sw1", "w2", "w2_lb"):
            print(f"  {row['spacing']:>8s} {row['problem']:>14s} {row['method']:>9s} nfe={row['nfe']:<3d} "
                  f"seed={row['seed']} {row['metric']}={row['value']:.4g}", file=sys.stderr)

    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    try:
        for spacing in s["spacing"]:
            rows += B.run_prior_benchmark(
                methods, s["nfe"], problems, list(range(s["seeds"])), s["n_samples"],
                spacing=spacing, num_projections=s["projections"], on_row=on_row,
            )
    finally:
        if out_file is not None:
            out_file.close()
    wall = time.perf_counter() - t0
    tables = B.format_markdown(rows)
    print(tables)
    print(f"[{wall:.1f} s] {command}")
    if args.write_benchmarks:
        section = render_section(tables, command, machine_description(), s, wall, torch.get_num_threads())
        write_benchmarks(args.write_benchmarks, section)
        print(f"wrote the gmm-prior section of {args.write_benchmarks}")
    return 0


def _register_posterior(sub: argparse._SubParsersAction) -> None:
    """``hessdiff bench posterior``: the grid-GMM posterior benchmark (see :mod:`hessdiff.scripts.bench.posterior`)."""
    q = sub.add_parser("posterior", help="posterior samplers (DPS, latent DPS, PSLD, STSL) on grid-GMM posteriors",
                       description="Grid-GMM posterior benchmark (PAPERS.md 5.2); protocol in "
                                   "hessdiff.scripts.bench.posterior. Rows go to --out (resumable).")
    q.add_argument("--dims", default="8,80,800", help="d_x values (default 8,80,800)")
    q.add_argument("--measurement-dims", default="1,2,4", help="d_y values (default 1,2,4)")
    q.add_argument("--prior", choices=("grid", "anisotropic"), default="grid",
                   help="grid: the published 25-component grid problems (default); anisotropic: random means and "
                        "diagonal covariances (10 components, variances 0.05-5), a prior per d_x and replicate")
    q.add_argument("--sigmas", default="0.01,0.1,1.0", help="sigma_y values (default 0.01,0.1,1.0)")
    q.add_argument("--replicates", default="0-19", help="replicate indices, e.g. 0-19 or 0,3,5 (default 0-19)")
    q.add_argument("--steps", default="20,50,100,1000", help="step counts (default 20,50,100,1000)")
    q.add_argument("--methods", default="dps,latent_dps,psld,stsl",
                   help="comma-separated methods, each a name or name[key=value;...], e.g. psld[omega=0.1]")
    q.add_argument("--samples", type=int, default=1000, help="sampler and exact draws per problem (default 1000)")
    q.add_argument("--projections", type=int, default=1000, help="sliced-W1 directions (default 1000)")
    q.add_argument("--dtype", choices=("float32", "float64"), default="float64", help="dtype of the sampler runs")
    q.add_argument("--out", default="bench_posterior.jsonl", help="JSON-lines rows; rows already there are skipped")
    q.add_argument("--report-only", action="store_true", help="format the rows in --out without running anything")
    q.add_argument("--timing", action="store_true", help="also time STSL against PSLD at 1000 steps, interleaved")
    q.add_argument("--timing-pipeline", action="store_true",
                   help="also time PSLD and STSL through the diffusers pipeline (random-init latent model)")
    q.add_argument("--write-benchmarks", metavar="FILE", help="replace the <!-- bench:posterior --> section")
    q.add_argument("--notes", metavar="FILE", help="Markdown inserted after the section's protocol paragraph")
    q.add_argument("--compare", help="paired comparisons base@steps:other@steps,... "
                                     "(default psld@1000:stsl@20,psld@1000:stsl@50)")
    q.add_argument("--tuning", metavar="FILE", help="also summarise the rows of a (held-out) tuning run")
    q.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    q.add_argument("--quick", action="store_true", help="seconds-long smoke run (d_x 8, d_y 1, 2 replicates, "
                                                        "5 and 10 steps, 200 samples)")
    q.set_defaults(func=run_posterior)


def run_posterior(args: argparse.Namespace) -> int:
    from hessdiff.scripts.bench.posterior import run_from_args

    return run_from_args(args)

