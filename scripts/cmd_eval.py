"""``hessdiff eval``: metrics of a folder of generated / restored images against a folder of real ones.

Paired metrics (PSNR, SSIM, LPIPS) match files by name: ``x.png`` in --fake pairs with ``x.png``
(any extension) in --real, and so does ``x_s<seed>.png`` (the sweep's output names). FID and KID
compare the feature statistics of the two folders. Unreadable files are skipped with a warning and
counted. A metric whose weights are missing is reported as missing with the path where to put them.
"""

from __future__ import annotations

import argparse
import sys

EPILOG = """examples:
  hessdiff eval --real data/ffhq-val --fake runs/x/items/m/sr4/dps/steps-100 --metrics psnr,ssim,lpips
  hessdiff eval --real data/ffhq-val --fake samples/ --metrics fid,kid --resolution 256
  hessdiff eval --real digits/ --fake samples/ --metrics fid --features domain --json out.json
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="metrics (FID, KID, LPIPS, PSNR, SSIM) of an image folder against a reference folder",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--real", required=True, help="folder of reference images")
    p.add_argument("--fake", required=True, help="folder of generated / restored images")
    p.add_argument("--metrics", default="fid", help="comma-separated: fid, kid, lpips, psnr, ssim (default fid)")
    p.add_argument("--features", default="inception", choices=("inception", "domain", "pixels"),
                   help="FID/KID features: inception (clean-fid), domain (embedded MNIST classifier), "
                        "pixels (weight-free smoke test)")
    p.add_argument("--resolution", type=int, default=None, help="resize both folders to this size (centre crop)")
    p.add_argument("--lpips-net", default="alex", choices=("alex", "vgg"), help="LPIPS backbone (default alex)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1 ...")
    p.add_argument("--json", dest="json_out", default=None, help="also write the results to this JSON file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


#: below these numbers of images FID / KID are strongly biased (FID needs more images than feature dims)
FID_MIN_IMAGES = 2048
KID_MIN_IMAGES = 100


def _check_json_target(path_text: str, overwrite: bool) -> None:
    """Refuse a --json target that cannot be written, before anything is computed."""
    from pathlib import Path

    from hessdiff.scripts.cli import CLIError

    path = Path(path_text)
    if path.is_dir():
        raise CLIError(f"--json {path} is a folder; give a file name such as {path / 'metrics.json'}")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise CLIError(f"refusing to overwrite {path}; choose another --json file or pass --overwrite")
    p = path.parent
    while not p.exists() and p.parent != p:
        p = p.parent
    if p.exists() and not p.is_dir():
        raise CLIError(f"cannot write --json {path}: {p} is a file, not a folder")


def run(args: argparse.Namespace) -> int:
    from hessdiff.scripts._common import parse_device
    from hessdiff.scripts.cli import CLIError

    metrics = [m.strip().lower() for m in args.metrics.split(",") if m.strip()]
    from hessdiff.eval.sweep import EVAL_METRICS, evaluate_folders

    bad = [m for m in metrics if m not in EVAL_METRICS]
    if bad or not metrics:
        raise CLIError(f"--metrics: unknown metric(s) {bad or metrics}; choose from {', '.join(EVAL_METRICS)}")
    # ---- everything that can be checked before computing
    device = parse_device(args.device)
    if args.json_out:
        _check_json_target(args.json_out, args.overwrite)
    res = evaluate_folders(args.real, args.fake, metrics=metrics, features=args.features,
                           resolution=args.resolution, lpips_net=args.lpips_net, device=str(device),
                           progress=not args.no_progress)
    for key in ("skipped_real", "skipped_fake"):
        if res.get(key):
            print(f"warning: {res[key]} unreadable file(s) skipped in --{key.split('_')[1]}", file=sys.stderr)
    missing = res.get("missing", {})
    for name, reason in missing.items():
        print(f"warning: {name} is missing: {reason}", file=sys.stderr)
    computed = [m for m in metrics if res.get(m if m != "lpips" else f"lpips_{args.lpips_net}") is not None]
    if not computed:
        reasons = "; ".join(f"{k}: {v}" for k, v in missing.items()) or "no value"
        raise CLIError(f"no requested metric could be computed ({reasons})")
    n = min(res.get("num_real", 0), res.get("num_fake", 0))
    for name, least in (("fid", FID_MIN_IMAGES), ("kid", KID_MIN_IMAGES)):
        if name in computed and n < least:
            print(f"warning: {name} from {n} images per folder is strongly biased and not comparable to "
                  f"published values (use at least {least})", file=sys.stderr)
    shown = {k: v for k, v in res.items() if k != "missing"}
    width = max(len(k) for k in shown)
    for k, v in shown.items():
        print(f"{k:<{width}}  {v:.6g}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    if args.json_out:
        from pathlib import Path

        from hessdiff.eval.sweep.store import _dumps
        from hessdiff.utils.files import atomic_write

        try:
            atomic_write(Path(args.json_out), _dumps(res, indent=2) + "\n", overwrite=args.overwrite, mkdir=True)
        except (FileExistsError, IsADirectoryError) as exc:
            raise CLIError(str(exc)) from exc
        print(f"written {args.json_out}", file=sys.stderr)
    return 0
