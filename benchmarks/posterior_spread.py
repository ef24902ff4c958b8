"""Posterior spread on the embedded models: is a method's PSNR that of a posterior *sampler* or of a mean?

PSNR against the clean image rewards the posterior mean: for an exact posterior sampler, one draw has
about twice the mean's squared error (E|x - x*|^2 = |E x - x*|^2 + tr Cov, with tr Cov ~ the mean's
error where the measurement leaves the image uncertain). A method that collapses toward the mean
(under-dispersed) scores a higher single-draw PSNR than an exact sampler. This script draws ``--draws``
restorations of each image with every method (the same measurement: one mask / kernel / noise draw per
image, ``--draws`` starting noises) and reports, per method and task:

- ``psnr``: the mean single-draw PSNR (what the sweeps report);
- ``psnr_mean``: the PSNR of the average of the draws (an estimate of the method's posterior mean);
- ``spread``: the root-mean-square per-pixel standard deviation across draws (on the [-1, 1] scale);
- ``gain``: psnr_mean - psnr; for an exact sampler with K draws, about 10 log10(2K / (K + 1)) dB where the
  draws' spread dominates the error (2.0 dB for K = 4), near 0 for a collapsed one;
- ``residual``: |y - A x| / (sigma_y sqrt(m)) of the draws (1 for a draw as consistent as the clean image).

Paired differences between methods (per image, 95 % Student-t intervals) are printed for ``psnr`` and
``psnr_mean``.

    python benchmarks/posterior_spread.py --images tune --n 20 --draws 4 \
        --methods dps@100 mmps@20 --out runs/posterior-spread.jsonl --threads 1

``--images tune`` are the held-out digits reserved for tuning (the last 100 of the class-balanced order,
10 per class; the reporting sweeps use the first ``first_n``), the first ``--n`` of them
(class-balanced). Rows are appended to ``--out`` as they finish; a rerun skips the (method, task, image)
rows it finds.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

TASKS = {  # the mnist-mmps sweep's tasks (assets/sweeps/mnist-mmps.toml)
    "box10": ("box_inpainting", {"box_size": 10, "sigma_y": 0.05}),
    "random70": ("random_inpainting", {"drop": 0.7, "sigma_y": 0.05}),
    "blur": ("gaussian_blur", {"kernel_size": 9, "std": 1.5, "sigma_y": 0.05}),
    "motion": ("motion_blur", {"kernel_size": 9, "intensity": 0.5, "kernel_seed": 0, "sigma_y": 0.05}),
    "sr4": ("super_resolution", {"scale": 4, "sigma_y": 0.05}),
}


def ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % Student-t interval (the sweeps' ``--compare`` quantiles)."""
    from hessdiff.eval.sweep.compare import _t975

    m = statistics.fmean(values)
    if len(values) < 2:
        return m, float("nan")
    return m, _t975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def parse_method(spec: str) -> tuple[str, int, dict]:
    """``name@steps[:key=value,...]`` (values parsed as JSON when they parse)."""
    head, _, opts = spec.partition(":")
    name, _, steps = head.partition("@")
    options = {}
    for kv in filter(None, opts.split(",")):
        k, _, v = kv.partition("=")
        try:
            options[k] = json.loads(v)
        except json.JSONDecodeError:
            options[k] = v
    return name, int(steps), options


def images(which: str, n: int, family: str) -> tuple[torch.Tensor, list[int]]:
    from hessdiff.samplers.models import embedded_dataset

    x = embedded_dataset("test", family=family)
    if which == "tune":
        from hessdiff.eval.sweep.config import TUNE_SIZE

        start = x.shape[0] - TUNE_SIZE[family]
    elif which == "report":
        start = 0
    else:
        raise SystemExit(f"--images must be 'tune' or 'report', got {which!r}")
    idx = list(range(start, start + n))
    if idx[-1] >= x.shape[0]:
        raise SystemExit(f"--n {n} is more than the {x.shape[0] - start} {which} images")
    return x[idx], idx


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    """The sweeps' PSNR (dB; :func:`hessdiff.eval.metrics.paired.psnr`) of one grey image ``x`` against ``ref``."""
    from hessdiff.eval.metrics.paired import psnr as paired_psnr

    return float(paired_psnr(x.expand(-1, 3, -1, -1), ref.expand(-1, 3, -1, -1))[0])


def run(args: argparse.Namespace) -> list[dict]:
    from hessdiff.samplers.api import restore
    from hessdiff.samplers.models import load_model
    from hessdiff.tasks import make_task

    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    family = "fashion" if args.model.startswith("fashion") else "mnist"
    x, idx = images(args.images, args.n, family)
    out = Path(args.out)
    done = set()
    rows: list[dict] = []
    if out.is_file():
        for line in out.read_text().splitlines():
            r = json.loads(line)
            if r["model"] == args.model and r["draws"] == args.draws:
                done.add((r["method"], r["task"], r["image"]))
                rows.append(r)
    out.parent.mkdir(parents=True, exist_ok=True)
    k = args.draws
    for label in args.tasks:
        name, params = TASKS[label]
        task = make_task(name, label=label, **params)
        for spec in args.methods:
            method, steps, options = parse_method(spec)
            for j, i in enumerate(idx):
                if (spec, label, i) in done:
                    continue
                xi = x[j:j + 1].expand(k, -1, -1, -1).contiguous()
                meas = task.measure(xi, seed=[args.seed + i] * k)  # one operator and noise draw, k copies
                t0 = time.perf_counter()
                res = restore(model, meas, method=method, steps=steps, seed=args.seed + i, options=options)
                wall = time.perf_counter() - t0
                r = res.restored.double().clamp(-1, 1)
                ref = xi[:1].double()
                single = [psnr(r[d:d + 1], ref) for d in range(k)]
                mean_img = r.mean(0, keepdim=True)
                a = meas.operator.to(torch.float64)
                resid = (meas.y.double() - a(r)).flatten(1).norm(dim=1)
                m = meas.y[0].numel()
                row = {
                    "model": args.model, "method": spec, "task": label, "image": i, "draws": k,
                    "psnr": statistics.fmean(single), "psnr_draws": single,
                    "psnr_mean": psnr(mean_img, ref),
                    "spread": float(r.std(0).pow(2).mean().sqrt()),
                    "residual": float(resid.mean()) / (params["sigma_y"] * math.sqrt(m)),
                    "wall_s": round(wall, 3), "nfe": int(res.cost.nfe),
                }
                rows.append(row)
                with out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"{spec:>12} {label:>9} image {i}: psnr {row['psnr']:.2f} mean-of-{k} {row['psnr_mean']:.2f} "
                      f"spread {row['spread']:.3f} residual {row['residual']:.2f} ({wall:.1f} s)", flush=True)
    return rows


def render(rows: list[dict], methods: list[str], tasks: list[str]) -> str:
    lines = ["| task | method | n | PSNR (one draw) | PSNR (mean of draws) | gain | spread | residual | s / image |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    by = {}
    for r in rows:
        by.setdefault((r["task"], r["method"]), {})[r["image"]] = r
    for t in tasks:
        for m in methods:
            rs = list(by.get((t, m), {}).values())
            if not rs:
                continue
            p, pm = ci([r["psnr"] for r in rs]), ci([r["psnr_mean"] for r in rs])
            g = ci([r["psnr_mean"] - r["psnr"] for r in rs])
            lines.append(f"| {t} | {m} | {len(rs)} | {p[0]:.2f} ± {p[1]:.2f} | {pm[0]:.2f} ± {pm[1]:.2f} | "
                         f"{g[0]:+.2f} ± {g[1]:.2f} | {statistics.fmean(r['spread'] for r in rs):.3f} | "
                         f"{statistics.fmean(r['residual'] for r in rs):.2f} | "
                         f"{statistics.fmean(r['wall_s'] for r in rs):.2f} |")
    if len(methods) >= 2:
        a, b = methods[0], methods[1]
        lines += ["", f"Paired differences {b} − {a} (per image, 95 % intervals):", "",
                  "| task | PSNR (one draw) | PSNR (mean of draws) | spread |", "|---|---:|---:|---:|"]
        for t in tasks:
            ra, rb = by.get((t, a), {}), by.get((t, b), {})
            common = sorted(set(ra) & set(rb))
            if len(common) < 2:
                continue
            d1 = ci([rb[i]["psnr"] - ra[i]["psnr"] for i in common])
            d2 = ci([rb[i]["psnr_mean"] - ra[i]["psnr_mean"] for i in common])
            d3 = ci([rb[i]["spread"] - ra[i]["spread"] for i in common])
            lines.append(f"| {t} | {d1[0]:+.2f} ± {d1[1]:.2f} | {d2[0]:+.2f} ± {d2[1]:.2f} | "
                         f"{d3[0]:+.3f} ± {d3[1]:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mnist")
    p.add_argument("--images", default="tune", help="tune (the last 100 / 200 held-out images) or report")
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--draws", type=int, default=4)
    p.add_argument("--methods", nargs="+", default=["dps@100", "mmps@20"])
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/posterior-spread.jsonl")
    p.add_argument("--render", action="store_true", help="only print the tables of the rows in --out")
    args = p.parse_args(argv)
    if args.draws < 2:
        raise SystemExit("--draws must be >= 2")
    if args.render:
        rows = [json.loads(s) for s in Path(args.out).read_text().splitlines()]
    else:
        rows = run(args)
    print(render(rows, args.methods, args.tasks))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
