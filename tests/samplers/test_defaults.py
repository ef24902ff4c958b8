"""The defaults table: one row per method and model family, with per-task entries where the papers set
options per task."""

from __future__ import annotations

import pytest

from hessdiff.samplers.api import accepted_options
from hessdiff.samplers.defaults import DEFAULTS, TASK_GROUPS, method_defaults, task_overrides
from hessdiff.tasks import TASKS


def test_every_per_task_entry_names_a_task_and_an_option_of_its_method():
    grouped = {t for names in TASK_GROUPS.values() for t in names}
    assert grouped <= set(TASKS)
    for method, rows in DEFAULTS.items():
        accepted = set(accepted_options(method)) | {"steps"}
        for row, values in rows.items():
            assert set(values) - {"tasks"} <= accepted, (method, row)
            for key, extra in values.get("tasks", {}).items():
                assert key in TASKS or key in TASK_GROUPS, (method, row, key)
                assert extra and set(extra) <= accepted, (method, row, key)


def test_task_entries_apply_group_then_task_and_leave_other_tasks_alone():
    base = method_defaults("diffpir")
    assert "tasks" not in base
    random = method_defaults("diffpir", task="random_inpainting")
    assert (random["steps"], random["lam"], random["zeta"]) == (20, 0.25, 1.0)  # the inpainting script's values
    assert method_defaults("diffpir", task="gaussian_blur") == base == method_defaults("diffpir", task=None)
    assert method_defaults("diffpir", task="super_resolution") == {**base, "zeta": 0.25}
    # a task's own entry is applied after its group's
    assert task_overrides("daps", "box_inpainting") == {"lr": 5e-5}
    assert task_overrides("daps", "random_inpainting") == {}
    assert method_defaults("dps", task="box_inpainting")["zeta"] == 0.5
    assert method_defaults("dps", task="super_resolution")["zeta"] == 0.3
    # a family row without task entries is the same on every task
    assert method_defaults("dps", "mnist", task="box_inpainting") == method_defaults("dps", "mnist")


def test_the_measurement_task_selects_the_entries_in_restore():
    import torch

    from hessdiff.samplers.api import method_options
    from hessdiff.tasks import make_task

    m = make_task("random_inpainting", drop=0.5, sigma_y=0.05).measure(torch.zeros(1, 1, 8, 8), seed=0)
    opts, steps = method_options("diffpir", {}, None, task=m.task)
    assert (steps, opts["lam"], opts["zeta"]) == (20, 0.25, 1.0)
    opts, steps = method_options("diffpir", {"zeta": 0.7}, None, task=m.task)
    assert opts["zeta"] == 0.7 and opts["lam"] == 0.25


@pytest.mark.parametrize("method", sorted(DEFAULTS))
def test_unknown_rows_and_methods_are_errors(method):
    with pytest.raises(ValueError, match="no defaults row"):
        method_defaults(method, row="nope")
    with pytest.raises(ValueError, match="unknown method"):
        task_overrides("nope", "box_inpainting")
