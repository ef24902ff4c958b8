"""How much block FIDs of the LML benchmark spread by chance: seed blocks against random partitions.

``hessdiff bench lml --parts embedded --embedded-blocks B`` reports the sd of B block FIDs (block b = seeds
b*n .. b*n + n - 1). This script draws the same samples (seeds 0 .. N-1, the benchmark's starts, one base solver of
:func:`hessdiff.scripts.bench.lml.lml_methods` at one NFE on an embedded pixel model), computes their domain
features once, and compares the sd of the consecutive seed blocks with that of random partitions of the same
samples into blocks of the same size: if the seed blocks' sd lies inside the random partitions' range, their spread
is the FID statistic's sampling noise, not a property of the seeds.

    python benchmarks/fid_block_spread.py --model fashion --method unipc-2 --nfe 8 --samples 5000 --sizes 200 1000 \\
        --features runs/fid-spread.pt
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch


def sample_features(model_name: str, method: str, nfe: int, n: int, batch: int = 50) -> torch.Tensor:
    from hessdiff.samplers.denoiser import UNetDenoiser
    from hessdiff.samplers.loop import CountingDenoiser
    from hessdiff.samplers.models import domain_features, load_classifier, load_model
    from hessdiff.scripts.bench.gmm import make_grid
    from hessdiff.scripts.bench.lml import _embedded_family, lml_methods

    model = load_model(model_name)
    if model.is_latent:
        raise SystemExit(f"{model_name} is a latent model; this script takes the pixel models")
    clf = load_classifier(f"hessdiff/{_embedded_family(model_name)}-classifier")
    den = CountingDenoiser(UNetDenoiser.from_unet_and_scheduler(model.unet, model.scheduler))
    fn = lml_methods(["none"], spacing="trailing", bases=[method])[method]
    grid = make_grid(den.schedule, nfe, "trailing")
    feats, t0 = [], time.perf_counter()
    for s0 in range(0, n, batch):
        seeds = range(s0, min(s0 + batch, n))
        noise = torch.cat([torch.randn((1, *model.sample_shape), generator=torch.Generator().manual_seed(s))
                           for s in seeds])
        with torch.no_grad():
            x = fn(den, float(grid.sigma[0]) * noise, grid).float().clamp(-1, 1)
        feats.append(domain_features(x, clf))
        print(f"{s0 + len(seeds)} / {n} samples, {time.perf_counter() - t0:.0f} s", flush=True)
    return torch.cat(feats)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="fashion")
    ap.add_argument("--method", default="unipc-2", help="a base solver of the LML benchmark")
    ap.add_argument("--nfe", type=int, default=8)
    ap.add_argument("--samples", type=int, default=5000)
    ap.add_argument("--sizes", type=int, nargs="+", default=[200, 1000], help="block sizes")
    ap.add_argument("--partitions", type=int, default=100, help="random partitions per block size")
    ap.add_argument("--features", default=None, help="cache file of the features (read if present, else written)")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from hessdiff.eval.metrics.fid import FeatureStats, fid_from_stats
    from hessdiff.samplers.models import domain_features, embedded_dataset, load_classifier
    from hessdiff.scripts.bench.lml import _embedded_family

    cache = Path(a.features) if a.features else None
    if cache is not None and cache.is_file():
        f = torch.load(cache)
    else:
        f = sample_features(a.model, a.method, a.nfe, a.samples)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save(f, cache)
    f, n = f.double(), f.shape[0]
    fam = _embedded_family(a.model)
    ref = FeatureStats().update(domain_features(embedded_dataset("test", family=fam),
                                                load_classifier(f"hessdiff/{fam}-classifier")))

    def fid(ix: torch.Tensor) -> float:
        return fid_from_stats(FeatureStats().update(f[ix]), ref)

    print(f"{a.model} {a.method} NFE {a.nfe}: {n} samples, pooled FID {fid(torch.arange(n)):.3f}")
    print("| block size | blocks | seed blocks: mean ± sd | random partitions: median sd (5-95 %) "
          "| share of partitions with sd >= the seed blocks' |\n|---:|---:|---|---|---:|")
    g = torch.Generator().manual_seed(0)
    for size in a.sizes:
        k = n // size
        seed = [fid(torch.arange(b * size, (b + 1) * size)) for b in range(k)]
        sd = statistics.stdev(seed)
        sds = []
        for _ in range(a.partitions):
            p = torch.randperm(n, generator=g)
            sds.append(statistics.stdev([fid(p[b * size:(b + 1) * size]) for b in range(k)]))
        q = sorted(sds)
        lo, hi = q[int(0.05 * (len(q) - 1))], q[int(0.95 * (len(q) - 1))]
        print(f"| {size} | {k} | {statistics.mean(seed):.3f} ± {sd:.3f} | {statistics.median(sds):.3f} "
              f"({lo:.3f}-{hi:.3f}) | {sum(s >= sd for s in sds) / len(sds):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
