"""Wall clock of posterior samplers in one process, interleaved: ``method@steps`` specs run in turn on the same
batches of the same measurements, so that every method sees the same machine load.

Each round takes the next ``--batch`` images of the embedded model's class-balanced held-out set, measures
them (measurement seed = image index, as the sweeps do) and runs every spec on that batch; the order of the
specs rotates from round to round. Reported per spec: seconds per image (median and range over rounds), the
ratio to the first spec, and PSNR (mean over all images) as a check that the runs restore anything.

    python benchmarks/interleaved_wallclock.py --model fashion --task motion_blur --specs dps@1000 mmps@20 \\
        --rounds 3 --batch 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

TASKS = {  # the tasks of the posterior sweeps (sigma_y = 0.05 on [-1, 1])
    "box_inpainting": {"box_size": 10},
    "random_inpainting": {"drop": 0.7},
    "gaussian_blur": {"kernel_size": 9, "std": 1.5},
    "motion_blur": {"kernel_size": 9, "intensity": 0.5, "kernel_seed": 0},
    "super_resolution": {"scale": 4},
}


def _rgb(x: torch.Tensor) -> torch.Tensor:  # the metrics take 3 channels (as the sweeps feed them)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def parse_spec(spec: str) -> tuple[str, int]:
    method, sep, steps = spec.partition("@")
    if not sep or not steps.isdigit() or int(steps) < 1:
        raise SystemExit(f"spec {spec!r}: expected method@steps, e.g. dps@1000")
    return method, int(steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="fashion")
    ap.add_argument("--task", default="motion_blur", choices=sorted(TASKS))
    ap.add_argument("--specs", nargs="+", default=["dps@1000", "mmps@20"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--first", type=int, default=0, help="index of the first image of the held-out order")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    specs = [parse_spec(s) for s in a.specs]
    torch.set_num_threads(a.threads)

    import hessdiff
    from hessdiff.eval.metrics import psnr
    from hessdiff.samplers.models import embedded_dataset, load_model
    from hessdiff.tasks import make_task

    model = load_model(a.model)
    family = "fashion" if "fashion" in a.model else "mnist"
    data = embedded_dataset("test", family=family)
    task = make_task(a.task, sigma_y=0.05, **TASKS[a.task])
    times: dict[str, list[float]] = {s: [] for s in a.specs}
    scores: dict[str, list[float]] = {s: [] for s in a.specs}
    for r in range(a.rounds):
        lo = a.first + r * a.batch
        x = data[lo:lo + a.batch]
        meas = task.measure(x, seed=list(range(lo, lo + a.batch)))
        order = list(range(len(specs)))
        order = order[r % len(order):] + order[:r % len(order)]
        for i in order:
            spec, (method, steps) = a.specs[i], specs[i]
            t0 = time.perf_counter()
            res = hessdiff.restore(model, meas, method=method, steps=steps, seed=lo)
            times[spec].append((time.perf_counter() - t0) / a.batch)
            scores[spec].extend(float(v) for v in psnr(_rgb(res.restored), _rgb(x)))
        print(f"round {r + 1}/{a.rounds}: " + ", ".join(f"{s} {times[s][-1]:.2f} s/image" for s in a.specs),
              flush=True)

    base = statistics.median(times[a.specs[0]])
    print(f"\n{a.model}, {a.task}, {a.rounds} rounds x {a.batch} images, {a.threads} thread(s), "
          f"torch {torch.__version__}\n")
    print(f"| spec | s / image (median) | range | / {a.specs[0]} | PSNR (mean) |")
    print("|---|---:|---:|---:|---:|")
    for s in a.specs:
        med = statistics.median(times[s])
        print(f"| {s} | {med:.2f} | {min(times[s]):.2f}–{max(times[s]):.2f} | {med / base:.3f} | "
              f"{statistics.fmean(scores[s]):.2f} |")


if __name__ == "__main__":
    main()
