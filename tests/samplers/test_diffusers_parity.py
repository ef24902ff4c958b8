"""diffusers' own DDIM / DPM-Solver scheduler tests, run against the LML drop-ins.

They are not shipped in diffusers' wheel: set ``HESSDIFF_DIFFUSERS_SRC`` to a diffusers source checkout
(ideally at the installed version) and run ``pytest -m slow tests/samplers/test_diffusers_parity.py``.
The script behind it is ``scripts/check_diffusers_parity.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ENV = "HESSDIFF_DIFFUSERS_SRC"


def _checkout() -> Path:
    src = os.environ.get(ENV)
    if not src:
        pytest.skip(f"{ENV} is not set: point it to a diffusers source checkout (git clone "
                    "https://github.com/huggingface/diffusers; its tests/schedulers/ are not in the wheel) to run "
                    "diffusers' DDIM and DPM-Solver scheduler tests against the LML drop-ins")
    path = Path(src).expanduser()
    from hessdiff.scripts.check_diffusers_parity import DEFAULT_FILES

    missing = [f for f in DEFAULT_FILES if not (path / "tests" / "schedulers" / f).is_file()]
    if missing:
        pytest.skip(f"{ENV}={src} has no tests/schedulers/{missing[0]}; it must be a diffusers source checkout")
    return path


@pytest.mark.slow
@pytest.mark.parametrize("options", [["precision=float64"], []], ids=["float64", "published"])
def test_diffusers_scheduler_tests_with_the_lml_drop_ins(options, tmp_path, capsys):
    """Every diffusers test that passes with the stock class passes with the drop-in, apart from the
    documented refusals (the SDE variants of DPM-Solver): with ``precision="float64"`` (the exact
    operator, the identity for ``kappa = 0``) and with the published float32 defaults, where the drop-in
    adds the published map's rounding noise (about 3.4e-8 |g|^2 / lamb per step; on diffusers' small
    dummy samples the pinned sums absorb it -- a ``full_loop`` mismatch there is reported, not failed)."""
    from hessdiff.scripts.check_diffusers_parity import main

    src = _checkout()
    out = tmp_path / "parity.json"
    args = [str(src), "--json", str(out)]
    for o in options:
        args += ["--lml", o]
    rc = main(args)
    text = capsys.readouterr().out
    assert rc in (0, 1), text
    data = json.loads(out.read_text())
    stock, cmp = data["stock"]["results"], data["comparison"]
    assert sum(r["outcome"] == "passed" for r in stock.values()) > 0, text  # the checkout's tests did run
    regressions = cmp["regressions"]
    if not options:
        regressions = [k for k in regressions if "full_loop" not in k]
    assert regressions == [], text
