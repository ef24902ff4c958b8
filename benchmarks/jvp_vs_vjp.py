"""Jacobian products of ``x0_hat`` on the embedded models: reverse mode (VJPs) against forward mode (JVPs).

MMPS, TMPD and PiGDM apply ``J = d x0_hat / d x_t`` to vectors. Per call they need one forward pass and
``k`` products (MMPS: ``k`` = Krylov iterations + 1). Timed here, per call, for ``k`` products:

- ``vjp``: one forward pass that records the graph, then ``k`` VJPs through it (``retain_graph``; what the
  samplers do);
- ``jvp``: ``k`` forward-mode JVPs (``torch.func.jvp``), each carrying its own primal pass (no graph kept);
- ``forward``: the forward pass alone (no graph), the unit.

(``torch.func.linearize``, one primal pass for all ``k`` JVPs, cannot trace the denoiser: its
time conversion reads a tensor value.) The forward-mode runs use PyTorch's math attention backend
(the fused CPU kernel has no forward-mode rule; ``hessdiff.samplers.lml.curvature.denoiser_jvp`` does
the same); the VJP runs use the default kernels.

Runs are interleaved (every mode once per round), the median of ``--repeats`` rounds is reported.

    python benchmarks/jvp_vs_vjp.py --models mnist fashion mnist-ldm --batch 8 --products 1 3 6 --repeats 7
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hessdiff.samplers.autodiff import math_attention


def _modes(den, x, t, k):
    v = torch.randn(k, *x.shape, generator=torch.Generator().manual_seed(1))

    def forward():
        with torch.no_grad():
            den(x, t)

    def vjp():
        xr = x.detach().requires_grad_(True)
        with torch.enable_grad():
            x0 = den(xr, t).x0
            for i in range(k):
                torch.autograd.grad(x0, xr, grad_outputs=v[i], retain_graph=i < k - 1)

    def f(z):
        return den(z, t).x0

    def jvp():
        with math_attention():  # the fused CPU attention kernel has no forward-mode rule
            for i in range(k):
                torch.func.jvp(f, (x,), (v[i],))

    return {"forward": forward, "vjp": vjp, "jvp": jvp}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["mnist", "fashion", "mnist-ldm"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--products", type=int, nargs="+", default=[1, 3, 6])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--t", type=float, default=500.0, help="diffusion time of the evaluation point")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from hessdiff.samplers.denoiser import UNetDenoiser
    from hessdiff.samplers.models import load_model

    print(f"batch {a.batch}, t = {a.t:g}, {a.threads} thread(s), torch {torch.__version__}, median of {a.repeats}\n")
    print("| model | products k | forward (ms) | forward + k VJPs (ms) | k JVPs (ms) | JVPs / VJPs |")
    print("|---|---|---|---|---|---|")
    for name in a.models:
        m = load_model(name)
        den = UNetDenoiser.from_unet_and_scheduler(m.unet, m.scheduler)
        x = torch.randn(a.batch, *m.sample_shape, generator=torch.Generator().manual_seed(0))
        for k in a.products:
            modes = _modes(den, x, a.t, k)
            times = {n: [] for n in modes}
            for fn in modes.values():  # warm-up
                fn()
            for _ in range(a.repeats):
                for n, fn in modes.items():
                    t0 = time.perf_counter()
                    fn()
                    times[n].append(1000 * (time.perf_counter() - t0))
            med = {n: statistics.median(v) for n, v in times.items()}
            print(f"| {name} | {k} | {med['forward']:.1f} | {med['vjp']:.1f} | {med['jvp']:.1f} | "
                  f"{med['jvp'] / med['vjp']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
