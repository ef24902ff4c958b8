"""``hessdiff bench lml``: the LML benchmark (see :mod:`hessdiff.scripts.bench.lml`).

Parts (``--parts``, default all): ``identity`` (the published correction in float64 vs the base
sampler, and its float32 deviation vs the rounding law), ``hessian`` (curvature estimates vs the
exact mixture Hessian), ``quality`` (sample error vs NFE with and without each correction, through
:func:`hessdiff.scripts.bench.gmm.run_prior_benchmark`, plus the >= 10 % goal summary), ``overhead``
(wall clock per step on a small ``UNet2DModel`` on CPU), ``embedded`` (domain FID and PSNR / SSIM to the
converged ODE solution on the embedded models; not part of the default set). Tables are printed; ``--out`` appends the
raw rows as JSON lines; ``--write-benchmarks FILE`` replaces the ``<!-- bench:lml -->`` section of
a Markdown file (nothing outside the markers is touched).

Registered by :mod:`hessdiff.scripts.cmd_bench` as a sub-benchmark; imports stay lazy.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import shlex
import time
from pathlib import Path
from typing import Any

from hessdiff.scripts.cli import CLIError

PARTS = ("identity", "hessian", "quality", "overhead", "embedded")
DEFAULT_PARTS = ("identity", "hessian", "quality", "overhead")
EMBEDDED_TITLE = "### The embedded models: domain FID and distance to the converged ODE solution\n\n"
MARK_BEGIN = "<!-- bench:lml -->"
MARK_END = "<!-- /bench:lml -->"

FULL: dict[str, Any] = {"nfe": [5, 6, 8, 10, 15, 20, 50], "seeds": 5, "n_samples": 2000, "dims": [8, 80, 800],
                        "gaussian_dim": 3072, "projections": 1000, "hessian_dims": [8, 80, 800], "repeats": 7}
QUICK: dict[str, Any] = {"nfe": [5, 10], "seeds": 2, "n_samples": 300, "dims": [8], "gaussian_dim": 0,
                         "projections": 200, "hessian_dims": [8], "repeats": 3}

EPILOG = """examples:
  hessdiff bench lml --quick                                   # a few minutes, all parts, small sizes
  hessdiff bench lml --parts quality --threads 1 --out runs/lml.jsonl
  hessdiff bench lml --threads 1 --write-benchmarks BENCHMARKS.md   # the full benchmark (hours on 1 core)
"""


def register_lml(sub: argparse._SubParsersAction) -> None:
    """Add the ``lml`` parser to ``hessdiff bench``'s sub-parsers."""
    g = sub.add_parser("lml", help="LML corrections: identity check, Hessian errors, quality vs NFE, overhead",
                       description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("--parts", nargs="+", choices=PARTS,
                   help=f"which parts to run (default: {' '.join(DEFAULT_PARTS)})")
    g.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    g.add_argument("--nfe", type=int, nargs="+", help=f"NFE budgets (default {FULL['nfe']})")
    g.add_argument("--seeds", type=int, help=f"number of seeds (default {FULL['seeds']})")
    g.add_argument("--first-seed", type=int, default=0,
                   help="seeds are first-seed .. first-seed + N - 1 (to split a long run, or, in the embedded "
                        "part, to tune on other start noises than the reported ones; default 0)")
    g.add_argument("--n-samples", type=int, help=f"draws per run (default {FULL['n_samples']})")
    g.add_argument("--dims", type=int, nargs="*", help=f"grid-mixture dimensions (default {FULL['dims']})")
    g.add_argument("--gaussian-dim", type=int, help=f"CIFAR-like Gaussian dimension, 0 to skip "
                                                    f"(default {FULL['gaussian_dim']})")
    g.add_argument("--hessian-dims", type=int, nargs="*", help=f"dimensions of the Hessian-error part "
                                                               f"(default {FULL['hessian_dims']})")
    g.add_argument("--variants", nargs="+", help="LML variants of the quality part (default: all; 'none': the "
                                                 "bases only; see hessdiff.scripts.bench.lml.VARIANTS)")
    g.add_argument("--bases", nargs="+", help="base solvers (default: ddim dpm-3 dpm++2m dpm++3m; also unipc-2 "
                                              "unipc-3 ipndm-4 deis-3)")
    g.add_argument("--spacing", default="trailing", help="grid spacing (default trailing)")
    g.add_argument("--projections", type=int, help=f"sliced-W1 directions (default {FULL['projections']})")
    g.add_argument("--repeats", type=int, help=f"timing repeats of the overhead part (default {FULL['repeats']})")
    g.add_argument("--models", nargs="+", default=["mnist", "mnist-ldm"],
                   help="models of the embedded part (default: mnist mnist-ldm)")
    g.add_argument("--embedded-samples", type=int, default=200,
                   help="samples per configuration in the embedded part (default 200)")
    g.add_argument("--embedded-nfe", type=int, nargs="+", default=[5, 8, 10, 15, 20],
                   help="NFE budgets of the embedded part (default 5 8 10 15 20)")
    g.add_argument("--reference-steps", type=int, default=100,
                   help="DPM-Solver++(2M) steps of the converged reference in the embedded part (default 100)")
    g.add_argument("--embedded-methods", nargs="+", metavar="METHOD",
                   help="methods of the embedded part, as named in the tables (e.g. dpm++2m unipc-2 "
                        "unipc-2+stats8-ad; default: the bases ddim dpm-3 dpm++2m and a fixed LML set)")
    g.add_argument("--embedded-blocks", type=int, default=1,
                   help="seed blocks of --embedded-samples each in the embedded part: per-block FIDs give the "
                        "spread and paired differences, and the pooled FID is over all blocks (default 1)")
    g.add_argument("--reference-blocks", type=int,
                   help="blocks whose images are also compared with the converged reference (default: all)")
    g.add_argument("--resume", action="store_true",
                   help="embedded part: skip the (model, method, NFE) cells already complete in the --out "
                        "rows with the same sample, block and reference settings (the method list may differ)")
    g.add_argument("--overhead-model", metavar="MODEL",
                   help="overhead part: time this model (an embedded name or a model folder, with its "
                        "lml_stats.safetensors) instead of a random-init 3x32x32 UNet")
    g.add_argument("--overhead-methods", nargs="+", metavar="METHOD",
                   help="overhead part: these methods (names as in the tables) instead of the default set")
    g.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    g.add_argument("--out", help="append raw rows (JSON lines, with a 'part' key) to this file")
    g.add_argument("--write-benchmarks", metavar="FILE", help="replace (or add) the <!-- bench:lml --> section")
    g.add_argument("--progress", action="store_true", help="one line per quality run on stderr")
    g.add_argument("--render", nargs="+", metavar="ROWS", help="do not run: format the rows saved with --out "
                                                              "(JSON lines, or gzipped: .gz) and print / write them")
    g.add_argument("--notes", metavar="FILE", help="Markdown inserted after the section header with --render "
                                                   "(a summary of the tables)")
    g.set_defaults(func=run_lml)


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    base = QUICK if args.quick else FULL
    s = {k: (getattr(args, k) if getattr(args, k, None) is not None else v) for k, v in base.items()}
    if any(n < 1 for n in s["nfe"]) or not s["nfe"]:
        raise CLIError(f"--nfe needs positive integers, got {s['nfe']}")
    for key in ("seeds", "projections", "repeats"):
        if s[key] < 1:
            raise CLIError(f"--{key} must be positive, got {s[key]}")
    if args.first_seed < 0:
        raise CLIError(f"--first-seed must be nonnegative, got {args.first_seed}")
    if s["n_samples"] < 2:
        raise CLIError(f"--n-samples must be at least 2, got {s['n_samples']}")
    if any(d < 1 for d in s["dims"] + s["hessian_dims"]):
        raise CLIError("dimensions must be positive integers")
    if args.threads is not None and args.threads < 1:
        raise CLIError(f"--threads must be positive, got {args.threads}")
    return s


def _command(args: argparse.Namespace, s: dict[str, Any], parts: list[str]) -> str:
    p = ["hessdiff", "bench", "lml", "--parts", *parts, "--nfe", *map(str, s["nfe"]), "--seeds", str(s["seeds"]),
         *(["--first-seed", str(args.first_seed)] if args.first_seed else []),
         "--n-samples", str(s["n_samples"]), "--dims", *map(str, s["dims"]), "--gaussian-dim",
         str(s["gaussian_dim"]), "--hessian-dims", *map(str, s["hessian_dims"]), "--projections",
         str(s["projections"]), "--repeats", str(s["repeats"]), "--spacing", args.spacing]
    if "embedded" in parts:
        p += ["--models", *args.models, "--embedded-samples", str(args.embedded_samples), "--embedded-nfe",
              *map(str, args.embedded_nfe), "--reference-steps", str(args.reference_steps)]
        if args.embedded_methods:
            p += ["--embedded-methods", *args.embedded_methods]
        if args.embedded_blocks != 1:
            p += ["--embedded-blocks", str(args.embedded_blocks)]
        if args.reference_blocks is not None:
            p += ["--reference-blocks", str(args.reference_blocks)]
    if args.variants:
        p += ["--variants", *args.variants]
    if args.bases:
        p += ["--bases", *args.bases]
    if "overhead" in parts and args.overhead_model:
        p += ["--overhead-model", args.overhead_model]
    if "overhead" in parts and args.overhead_methods:
        p += ["--overhead-methods", *args.overhead_methods]
    if args.threads is not None:
        p += ["--threads", str(args.threads)]
    return " ".join(shlex.quote(x) for x in p)


def _quality_section(rows: list[dict[str, Any]], BL: Any, BG: Any) -> str:
    goal = BL.goal_rows(rows)
    goal0 = BL.goal_rows(rows, include=BL.zero_nfe)
    gauss = BL.goal_rows(rows, metric="w2_lb")  # the Gaussian problems: every method has the sample bound
    return ("### Goal: best LML method vs best base solver at NFE <= 10 (JVPs counted)\n\n" + BL.format_goal(goal)
            + "\nThe same, zero-extra-evaluation LML methods only:\n\n" + BL.format_goal(goal0)
            + ("\nOn the Gaussian problems (`w2_lb`, the same draws for every method):\n\n"
               + BL.format_goal(gauss, metric="w2_lb") if gauss else "")
            + "\n### Sample quality vs NFE\n\n" + BG.format_markdown(rows))


def _render(paths: list[str]) -> tuple[str, list[str]]:
    """The report of saved rows (``--out`` files): every part found, in the usual order."""
    from hessdiff.scripts.bench import gmm as BG
    from hessdiff.scripts.bench import lml as BL

    parts: dict[str, list[dict[str, Any]]] = {}
    commands: list[str] = []
    for path in paths:
        p = Path(path)
        if not p.exists():
            raise CLIError(f"no such rows file: {path} (write one with --out)")
        if p.suffix == ".gz":  # the committed rows (benchmarks/data/*.jsonl.gz)
            import gzip

            text = gzip.decompress(p.read_bytes()).decode("utf-8")
        else:
            text = p.read_text(encoding="utf-8")
        for line in text.splitlines():
            if line.strip():
                r = json.loads(line)
                parts.setdefault(r.get("part", "quality"), []).append(r)
                if r.get("command") and r["command"] not in commands:
                    commands.append(r["command"])
    if "embedded" in parts:  # a resumed run repeats the floor rows: keep the last of each cell
        last = {(r["model"], r["method"], r["nfe"], r.get("block", 0)): r for r in parts["embedded"]}
        parts["embedded"] = list(last.values())
    if "quality" in parts:  # rows of split runs may overlap: keep the first of each cell
        seen: set[tuple[Any, ...]] = set()
        uniq = []
        for r in parts["quality"]:
            key = (r["problem"], r["method"], r["nfe"], r["seed"], r["metric"], r.get("spacing"))
            if key not in seen:
                seen.add(key)
                uniq.append(r)
        parts["quality"] = uniq
    out = []
    if "identity" in parts:
        out.append("### The published correction: float64 identity and float32 rounding law\n\n"
                   + BL.format_identity(parts["identity"]))
    if "hessian" in parts:
        out.append("### Hessian approximation error along a 10-step DPM-Solver++(1) trajectory\n\n"
                   + BL.format_hessian(parts["hessian"]))
    if "quality" in parts:
        out.append(_quality_section(parts["quality"], BL, BG))
    if "embedded" in parts:
        out.append(EMBEDDED_TITLE + BL.format_embedded(parts["embedded"]))
    if "overhead" in parts:
        for model in dict.fromkeys(r.get("model", "small-unet") for r in parts["overhead"]):
            rs = [r for r in parts["overhead"] if r.get("model", "small-unet") == model]
            out.append(_overhead_title(rs) + BL.format_overhead(rs))
    if not out:
        raise CLIError(f"no benchmark rows in {', '.join(paths)}")
    return "\n".join(out), commands


def run_lml(args: argparse.Namespace) -> int:
    if args.render:
        return _run_render(args)
    s = _settings(args)
    import torch

    from hessdiff.scripts.bench import gmm as BG
    from hessdiff.scripts.bench import lml as BL
    from hessdiff.scripts.cmd_bench import machine_description

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    parts = list(args.parts or DEFAULT_PARTS)
    if "embedded" in parts and (args.embedded_samples < 2 or args.reference_steps < 1
                                or any(n < 1 for n in args.embedded_nfe)):
        raise CLIError("--embedded-samples must be >= 2, --reference-steps and --embedded-nfe positive")
    if args.embedded_blocks < 1 or (args.reference_blocks is not None and args.reference_blocks < 0):
        raise CLIError("--embedded-blocks must be >= 1 and --reference-blocks >= 0")
    if args.resume and not args.out:
        raise CLIError("--resume needs --out (the rows file to resume)")
    try:
        if args.overhead_methods:
            BL.parse_method_names(args.overhead_methods)
        emb_bases, emb_triples = (BL.parse_method_names(args.embedded_methods) if args.embedded_methods
                                  else (BL.EMBEDDED_BASES, BL.EMBEDDED_SET))
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    bases = tuple(args.bases) if args.bases else BL.BASES
    try:
        BL.lml_methods(args.variants, bases=bases)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    command = _command(args, s, parts)
    out_file = None
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        out_file = open(args.out, "a", encoding="utf-8")  # noqa: SIM115 -- closed in finally

    def save(part: str, rows: list[dict[str, Any]]) -> None:
        if out_file is not None:
            for r in rows:
                out_file.write(json.dumps({**r, "part": part, "command": command}) + "\n")
            out_file.flush()

    sections: list[str] = []
    t_all = time.perf_counter()
    try:
        if "identity" in parts:
            t0 = time.perf_counter()
            rows = BL.identity_rows(s["dims"], nfe=10)
            save("identity", rows)
            sections.append("### The published correction: float64 identity and float32 rounding law\n\n"
                            + BL.format_identity(rows) + f"\n({time.perf_counter() - t0:.0f} s)\n")
        if "hessian" in parts:
            t0 = time.perf_counter()
            rows = BL.hessian_error_rows(s["hessian_dims"])
            save("hessian", rows)
            sections.append("### Hessian approximation error along a 10-step DPM-Solver++(1) trajectory\n\n"
                            + BL.format_hessian(rows) + f"\n({time.perf_counter() - t0:.0f} s)\n")
        if "quality" in parts:
            t0 = time.perf_counter()

            def on_row(row: dict[str, Any]) -> None:
                save("quality", [row])
                if args.progress and row["metric"] in ("sw1", "w2", "w2_lb"):
                    print(f"  {row['problem']:>13s} {row['method']:>28s} nfe={row['nfe']:<3d} seed={row['seed']} "
                          f"{row['metric']}={row['value']:.4g}", flush=True)

            triples = None if (args.variants or args.bases) else BL.DEFAULT_SET
            rows = BL.quality_rows(args.variants, s["nfe"], s["dims"], s["gaussian_dim"] or None,
                                   list(range(args.first_seed, args.first_seed + s["seeds"])), s["n_samples"],
                                   spacing=args.spacing, bases=bases,
                                   triples=triples, num_projections=s["projections"], on_row=on_row)
            sections.append(_quality_section(rows, BL, BG) + f"\n({time.perf_counter() - t0:.0f} s)\n")
        if "embedded" in parts:
            t0 = time.perf_counter()

            def on_emb(row: dict[str, Any]) -> None:
                save("embedded", [row])
                if args.progress:
                    psnr = f" psnr={row['psnr']:.2f}" if "psnr" in row else ""
                    print(f"  {row['model']:>10s} {row['method']:>28s} nfe={row['nfe']:<3d} "
                          f"block={row.get('block', 0)} fid={row['fid']:.3f}{psnr}", flush=True)

            done = _complete_cells(args.out, args) if args.resume else set()
            asked = set(args.embedded_methods) if args.embedded_methods else None  # not the bases of the triples
            rows = BL.embedded_rows(args.models, args.embedded_nfe, args.embedded_samples,
                                    reference_steps=args.reference_steps, spacing=args.spacing,
                                    first_seed=args.first_seed,
                                    bases=emb_bases, triples=emb_triples, blocks=args.embedded_blocks,
                                    reference_blocks=args.reference_blocks, on_row=on_emb,
                                    skip=lambda m, k, n: (m, k, n) in done or (asked is not None and k not in asked))
            sections.append(EMBEDDED_TITLE + BL.format_embedded(rows) + f"\n({time.perf_counter() - t0:.0f} s)\n")
        if "overhead" in parts:
            t0 = time.perf_counter()
            rows = BL.overhead_rows(repeats=s["repeats"], model=args.overhead_model, methods=args.overhead_methods)
            save("overhead", rows)
            sections.append(_overhead_title(rows) + BL.format_overhead(rows)
                            + f"\n({time.perf_counter() - t0:.0f} s)\n")
    finally:
        if out_file is not None:
            out_file.close()
    wall = time.perf_counter() - t_all
    text = "\n".join(sections)
    print(text)
    print(f"[{wall:.1f} s] {command}")
    if args.write_benchmarks:
        header = (f"## LML benchmark (`hessdiff bench lml`)\n\nCommand: `{command}`  \n"
                  f"Machine: {machine_description()}; torch {torch.__version__}, {torch.get_num_threads()} "
                  f"thread(s); {_dt.date.today().isoformat()}; wall time {wall:.0f} s.\n\n")
        _write_section(args.write_benchmarks, header + text)
        print(f"wrote the lml section of {args.write_benchmarks}")
    return 0


def _overhead_title(rows: list[dict[str, Any]]) -> str:
    r = rows[0]
    what = ("small UNet2DModel, 32x32" if r.get("model", "small-unet") == "small-unet"
            else f"{r['model']}, {r['size']}x{r['size']}")
    return f"### Wall-clock overhead per step ({what}, batch {r['batch']}, {r['steps']} steps, CPU)\n\n"


def _complete_cells(path: str, args: argparse.Namespace) -> set[tuple[str, str, int]]:
    """(model, method, NFE) cells of the embedded part already complete in the rows file ``path`` for the
    settings of ``args`` (sample and block counts, first seed, spacing, reference steps): every block row,
    and the pooled row when there are blocks. The method list and the other parts may differ."""
    p = Path(path)
    if not p.exists():
        return set()
    want = {"n_samples": args.embedded_samples, "blocks": args.embedded_blocks, "first_seed": args.first_seed,
            "spacing": args.spacing, "reference_steps": args.reference_steps}
    seen: dict[tuple[str, str, int], set[Any]] = {}
    for line in p.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        if r.get("part") != "embedded" or r["method"] == "real":
            continue
        if any(k in r and r[k] != v for k, v in want.items()) or r.get("blocks", 1) != args.embedded_blocks:
            continue
        seen.setdefault((r["model"], r["method"], int(r["nfe"])), set()).add(r.get("block", 0))
    need = {"pooled", *range(args.embedded_blocks)} if args.embedded_blocks > 1 else {0}
    return {k for k, v in seen.items() if need <= v}


def _run_render(args: argparse.Namespace) -> int:
    import torch

    from hessdiff.scripts.cmd_bench import machine_description

    text, commands = _render(args.render)
    if args.notes:
        notes = Path(args.notes)
        if not notes.exists():
            raise CLIError(f"no such notes file: {args.notes}")
        text = notes.read_text(encoding="utf-8").strip() + "\n\n" + text
    print(text)
    if args.write_benchmarks:
        cmds = "\n".join(f"    {c}" for c in commands)
        header = ("## LML benchmark (`hessdiff bench lml`)\n\nCommands (rows saved with `--out`, rendered with "
                  f"`--render`):\n\n{cmds}\n\nMachine: {machine_description()}; torch {torch.__version__}; "
                  f"rendered {_dt.date.today().isoformat()}.\n\n")
        _write_section(args.write_benchmarks, header + text)
        print(f"wrote the lml section of {args.write_benchmarks}")
    return 0


def _write_section(path: str, body: str) -> None:
    from hessdiff.scripts.cmd_bench import write_benchmarks

    write_benchmarks(path, body, MARK_BEGIN, MARK_END)
