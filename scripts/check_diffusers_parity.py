"""Run diffusers' own DDIM / DPM-Solver scheduler tests against the LML drop-ins.

diffusers' scheduler tests (``tests/schedulers/test_scheduler_ddim.py``,
``tests/schedulers/test_scheduler_dpm_multi.py``) are not part of its wheel; given a diffusers source
checkout, this script runs them twice, each time in a fresh process with the *installed* diffusers:

* ``stock``: as they are;
* ``lml``: with ``diffusers.DDIMScheduler`` and ``diffusers.DPMSolverMultistepScheduler`` (the names the
  test files import, ``from diffusers import DDIMScheduler``) replaced, before the test modules are
  imported, by :class:`~hessdiff.samplers.diffusers.schedulers.LMLDDIMScheduler` and
  :class:`~hessdiff.samplers.diffusers.schedulers.LMLDPMSolverMultistepScheduler`, so that every use in
  those files (``scheduler_classes``, ``from_config`` switches, full loops) gets the drop-in.

It prints pass / fail / skip / error counts per file for both runs and the tests whose outcome differs,
and exits 0 when every test that passes with the stock class passes with the drop-in (apart from the
drop-ins' documented refusals, :data:`DOCUMENTED`, listed separately), 1 otherwise, 2 when the runs could
not be made.

Usage::

    python scripts/check_diffusers_parity.py ~/src/diffusers
    python scripts/check_diffusers_parity.py ~/src/diffusers --lml precision=float64 --json parity.json
    python -m hessdiff.scripts.check_diffusers_parity ~/src/diffusers -k full_loop

``--lml KEY=VALUE`` changes the drop-ins' defaults (``lamb``, ``kappa``, ``precision``, ``lml_variant``,
``saturated``): with the published defaults (``precision="float32"``, ``lamb=1e-3``) the drop-in adds the
published map's float32 rounding noise, which diffusers' pinned sums may or may not absorb;
``precision=float64`` checks the structure (with ``kappa=0`` the exact operator is the identity).

diffusers' ``tests/conftest.py`` puts the checkout's ``src/`` on ``sys.path``; the worker imports the
installed diffusers before pytest starts, so the installed version is the one tested (use a checkout of
the same version: ``git checkout v$(python -c 'import diffusers; print(diffusers.__version__)')``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

DEFAULT_FILES = ("test_scheduler_ddim.py", "test_scheduler_dpm_multi.py")
#: diffusers name -> hessdiff drop-in
SWAPS = {"DDIMScheduler": "LMLDDIMScheduler", "DPMSolverMultistepScheduler": "LMLDPMSolverMultistepScheduler"}
OUTCOMES = ("passed", "failed", "skipped", "error")
#: failures that are the drop-ins' documented refusals, not parity bugs (reported apart, not in the exit code)
DOCUMENTED = {
    r"unsupported algorithm_type 'sde-": "the SDE variants of DPM-Solver are not corrected (the released code "
                                         "does not correct them); the drop-in refuses them at construction",
}


# ---------------------------------------------------------------------------------------------- worker
def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _lml_options(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--lml takes KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = _parse_value(v.strip())
    return out


def _swap_in_drop_ins(options: dict[str, Any]) -> dict[str, str]:
    """Replace the diffusers names the test files import by the drop-ins (with ``options`` as defaults)."""
    import diffusers
    import diffusers.schedulers

    from hessdiff.samplers.diffusers import schedulers as S

    unknown = sorted(set(options) - set(S.LML_CONFIG_DEFAULTS))
    if unknown:
        raise SystemExit(f"unknown --lml option(s) {unknown}; expected {sorted(S.LML_CONFIG_DEFAULTS)}")
    swapped = {}
    for name, lml_name in SWAPS.items():
        lml_cls = getattr(S, lml_name)
        if options:  # same class name, other defaults: the drop-in's own __init__ machinery, re-run
            stock = next(b for b in lml_cls.__mro__ if b.__name__ == name)
            init = S._lml_init(stock, {**S.LML_CONFIG_DEFAULTS, **options})
            lml_cls = type(lml_name, (lml_cls,), {"__init__": init, "__module__": lml_cls.__module__,
                                                  "__qualname__": lml_cls.__qualname__})
        for mod in (diffusers, diffusers.schedulers):
            setattr(mod, name, lml_cls)
        swapped[name] = f"{lml_cls.__module__}.{lml_name}"
    return swapped


class _Collector:
    """pytest plugin: one outcome per test (``error`` for setup / teardown / collection failures)."""

    def __init__(self) -> None:
        self.results: dict[str, dict[str, str]] = {}

    def _set(self, nodeid: str, outcome: str, report: Any) -> None:
        msg = ""
        if outcome in ("failed", "error"):
            text = str(getattr(report, "longreprtext", "") or report.longrepr or "").splitlines()
            errors = [ln[2:].strip() for ln in text if ln.startswith("E ")]
            msg = " ".join(e for e in (errors[:3] or text[-1:]) if e)[:300]
        elif outcome == "skipped" and isinstance(report.longrepr, tuple):
            msg = str(report.longrepr[2])[:300]
        prev = self.results.get(nodeid, {}).get("outcome")
        if prev in ("failed", "error") and outcome == "passed":
            return
        self.results[nodeid] = {"outcome": outcome, "message": msg}

    def pytest_runtest_logreport(self, report: Any) -> None:
        if report.when == "call":
            self._set(report.nodeid, "passed" if report.passed else ("skipped" if report.skipped else "failed"),
                      report)
        elif report.failed:
            self._set(report.nodeid, "error", report)
        elif report.skipped and report.when == "setup":
            self._set(report.nodeid, "skipped", report)

    def pytest_collectreport(self, report: Any) -> None:
        if report.failed:
            self._set(f"{report.nodeid}::<collection>", "error", report)


def _worker(args: argparse.Namespace) -> int:
    import diffusers  # the installed one, before diffusers' conftest puts the checkout's src/ on sys.path
    import pytest

    info: dict[str, Any] = {"mode": args._worker, "diffusers": diffusers.__version__,
                            "diffusers_file": diffusers.__file__}
    if args._worker == "lml":
        info["swapped"] = _swap_in_drop_ins(_lml_options(args.lml))
    src = Path(args.src).resolve()
    paths = [str(src / "tests" / "schedulers" / f) for f in args.file]
    pytest_args = [*paths, "-q", "-p", "no:cacheprovider", "-o", "addopts=", "--rootdir", str(src),
                   "-W", "ignore::DeprecationWarning"]
    if args.k:
        pytest_args += ["-k", args.k]
    collector = _Collector()
    info["exit_code"] = int(pytest.main(pytest_args, plugins=[collector]))
    info["results"] = collector.results
    Path(args._out).write_text(json.dumps(info, indent=1))
    return 0


# ---------------------------------------------------------------------------------------------- driver
def _checkout_version(src: Path) -> str | None:
    for f in (src / "src" / "diffusers" / "__init__.py", src / "setup.py"):
        if f.is_file():
            m = re.search(r"""(?:__version__\s*=|version=)\s*["']([^"']+)["']""", f.read_text(errors="replace"))
            if m:
                return m.group(1)
    return None


def _run(mode: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    # -m: sys.path[0] is the checkout (diffusers' tests are the package ``tests``), not this folder
    cmd = [sys.executable, "-m", "hessdiff.scripts.check_diffusers_parity", "--_worker", mode, "--_out", str(out),
           str(args.src)]
    for f in args.file:
        cmd += ["--file", f]
    for item in args.lml:
        cmd += ["--lml", item]
    if args.k:
        cmd += ["-k", args.k]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1", "DIFFUSERS_VERBOSITY": "error"}
    proc = subprocess.run(cmd, cwd=str(args.src), env=env, capture_output=True, text=True, timeout=args.timeout)
    if not out.is_file():
        raise RuntimeError(f"the {mode} run produced no results (exit {proc.returncode}):\n"
                           f"{(proc.stdout + proc.stderr)[-3000:]}")
    info = json.loads(out.read_text())
    info["output_tail"] = (proc.stdout + proc.stderr)[-3000:]
    return info


def _counts(results: dict[str, dict[str, str]]) -> dict[str, Counter]:
    per_file: dict[str, Counter] = {}
    for nodeid, r in results.items():
        f = nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
        per_file.setdefault(f, Counter())[r["outcome"]] += 1
    return per_file


def compare(stock: dict[str, Any], lml: dict[str, Any]) -> dict[str, Any]:
    """Counts per file and run, and the tests whose outcome differs between the runs."""
    s, m = stock["results"], lml["results"]
    lost = sorted(k for k in s if s[k]["outcome"] == "passed" and m.get(k, {}).get("outcome") != "passed")

    def why(k: str) -> str | None:
        msg = m.get(k, {}).get("message", "")
        return next((text for pat, text in DOCUMENTED.items() if re.search(pat, msg)), None)

    documented = {k: why(k) for k in lost if why(k)}
    regressions = [k for k in lost if k not in documented]
    fixed = sorted(k for k in m if m[k]["outcome"] == "passed" and s.get(k, {}).get("outcome") != "passed")
    return {"counts": {"stock": _counts(s), "lml": _counts(m)}, "regressions": regressions, "documented": documented,
            "fixed": fixed, "only_stock": sorted(set(s) - set(m)), "only_lml": sorted(set(m) - set(s))}


def report(stock: dict[str, Any], lml: dict[str, Any], cmp: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [f"diffusers {stock['diffusers']} ({stock['diffusers_file']}); tests from {args.src} "
             f"(checkout version {_checkout_version(Path(args.src)) or 'unknown'})",
             "drop-ins: " + ", ".join(f"{k} -> {v}" for k, v in lml.get("swapped", {}).items())
             + (f"; options {dict(_lml_options(args.lml))}" if args.lml else "; published defaults"), ""]
    files = sorted(set(cmp["counts"]["stock"]) | set(cmp["counts"]["lml"]))
    lines.append(f"{'file':34s} {'run':6s} " + " ".join(f"{o:>8s}" for o in OUTCOMES))
    for f in files:
        for run in ("stock", "lml"):
            c = cmp["counts"][run].get(f, Counter())
            lines.append(f"{f:34s} {run:6s} " + " ".join(f"{c.get(o, 0):8d}" for o in OUTCOMES))
    tot = {run: sum((cmp["counts"][run].get(f, Counter()) for f in files), Counter()) for run in ("stock", "lml")}
    for run in ("stock", "lml"):
        lines.append(f"{'total':34s} {run:6s} " + " ".join(f"{tot[run].get(o, 0):8d}" for o in OUTCOMES))
    lines.append("")
    lines.append(f"pass with the stock class, not with the drop-in: {len(cmp['regressions'])}")
    for k in cmp["regressions"]:
        r = lml["results"].get(k, {"outcome": "missing", "message": ""})
        lines.append(f"  {k}  [{r['outcome']}] {r['message']}")
    lines.append(f"fail with the drop-in by design (documented refusals): {len(cmp['documented'])}")
    for k, text in cmp["documented"].items():
        lines.append(f"  {k}  -- {text}")
    bad_stock = sorted(k for k, r in stock["results"].items() if r["outcome"] in ("failed", "error"))
    lines.append(f"fail with the stock class too (the checkout or this environment): {len(bad_stock)}")
    for k in bad_stock:
        lines.append(f"  {k}  [{stock['results'][k]['outcome']}] {stock['results'][k]['message'][:160]}")
    lines.append(f"pass with the drop-in, not with the stock class: {len(cmp['fixed'])}")
    for k in cmp["fixed"]:
        lines.append(f"  {k}  [stock: {stock['results'].get(k, {}).get('outcome', 'missing')}]")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="check_diffusers_parity", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="a diffusers source checkout (the folder holding tests/schedulers/)")
    p.add_argument("--file", action="append", default=None,
                   help=f"test file under tests/schedulers/ (repeatable; default {', '.join(DEFAULT_FILES)})")
    p.add_argument("--lml", action="append", default=[], metavar="KEY=VALUE",
                   help="drop-in default to change, e.g. precision=float64 or lamb=1e-2 (repeatable)")
    p.add_argument("-k", default=None, help="pytest -k expression, applied to both runs")
    p.add_argument("--json", default=None, help="write both runs' outcomes and the comparison to this file")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per run (default 3600)")
    p.add_argument("--_worker", choices=("stock", "lml"), help=argparse.SUPPRESS)
    p.add_argument("--_out", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.file = args.file or list(DEFAULT_FILES)
    if args._worker:
        return _worker(args)
    src = Path(args.src).expanduser().resolve()
    args.src = str(src)
    missing = [f for f in args.file if not (src / "tests" / "schedulers" / f).is_file()]
    if missing:
        print(f"error: {src} is not a diffusers source checkout with tests/schedulers/{missing[0]} "
              "(clone https://github.com/huggingface/diffusers at the installed version)", file=sys.stderr)
        return 2
    from hessdiff.samplers.diffusers.schedulers import LML_CONFIG_DEFAULTS

    unknown = sorted(set(_lml_options(args.lml)) - set(LML_CONFIG_DEFAULTS))  # fail early, before two runs
    if unknown:
        print(f"error: unknown --lml option(s) {unknown}; expected {sorted(LML_CONFIG_DEFAULTS)}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="hessdiff-parity-") as tmp:
        try:
            stock = _run("stock", args, Path(tmp) / "stock.json")
            lml = _run("lml", args, Path(tmp) / "lml.json")
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    cmp = compare(stock, lml)
    print(report(stock, lml, cmp, args))
    if args.json:
        Path(args.json).write_text(json.dumps({"stock": stock, "lml": lml, "comparison": {
            **cmp, "counts": {r: {f: dict(c) for f, c in v.items()} for r, v in cmp["counts"].items()}}}, indent=1))
    return 1 if cmp["regressions"] else 0


if __name__ == "__main__":
    sys.exit(main())
