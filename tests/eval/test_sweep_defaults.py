"""Sweeps take a method's defaults from the one defaults table, like ``hessdiff restore`` and the pipeline."""

from __future__ import annotations

from hessdiff.eval.sweep.config import parse_config
from hessdiff.samplers.defaults import method_defaults


def _cfg(models: list[dict], methods: list[dict]) -> dict:
    return {
        "sweep": {"name": "t", "seeds": [0]},
        "models": models,
        "data": {"embedded": "mnist-test", "first_n": 2},
        "tasks": [{"name": "box_inpainting", "params": {"box_size": 8}}],
        "methods": methods,
        "metrics": {"paired": ["psnr"], "fid": False},
    }


def _options(cfg: dict) -> list[dict]:
    return [m["options"] for m in parse_config(cfg, name="s.toml").resolved()["methods"]]


def test_embedded_family_rows_and_explicit_options_win():
    dps = {k: v for k, v in method_defaults("dps", "mnist").items() if k != "steps"}
    opts = _options(_cfg([{"name": "mnist"}], [{"name": "dps", "steps": 5},
                                               {"name": "dps", "label": "z", "steps": 5, "options": {"zeta": 0.7}}]))
    assert {k: opts[0][k] for k in dps} == dps  # what hessdiff restore runs on this model
    assert opts[1]["zeta"] == 0.7 and opts[1]["ddim_eta"] == dps["ddim_eta"]


def test_models_without_a_family_get_the_published_row(tmp_path):
    published = {k: v for k, v in method_defaults("stsl", None).items() if k != "steps"}
    folder = tmp_path / "my-model"
    folder.mkdir()
    opts = _options(_cfg([{"name": "mnist-ldm"}, {"name": str(folder), "label": "mine"}],
                         [{"name": "stsl", "steps": 5}]))
    assert {k: opts[0][k] for k in published} == published  # two families: no shared recommendation


def _work_options(cfg: dict) -> dict[tuple[str, str], dict]:
    """(task label, method label) -> the options each unit of the sweep runs with."""
    from hessdiff.eval.sweep.work import _build_work

    _, batches = _build_work(parse_config(cfg, name="s.toml"), None, None)
    return {(u.task.label, u.method.label): dict(u.method.options) for u, _ in batches}


def test_per_task_rows_reach_each_task_and_explicit_options_still_win(tmp_path):
    folder = tmp_path / "my-model"  # no family: the published rows, which carry DiffPIR's per-task settings
    folder.mkdir()
    cfg = _cfg([{"name": str(folder), "label": "mine"}],
               [{"name": "diffpir", "steps": 5, "options": {"sigma_y": 0.05}},
                {"name": "diffpir", "label": "z", "steps": 5, "options": {"sigma_y": 0.05, "zeta": 0.5}}])
    cfg["tasks"] = [{"name": "box_inpainting", "label": "box", "params": {"box_size": 8}},
                    {"name": "gaussian_blur", "label": "blur", "params": {"kernel_size": 5, "std": 1.0}}]
    got = _work_options(cfg)
    inpaint = method_defaults("diffpir", None, task="box_inpainting")
    blur = method_defaults("diffpir", None, task="gaussian_blur")
    assert (inpaint["lam"], inpaint["zeta"]) != (blur["lam"], blur["zeta"])  # the table sets them per task
    assert (got["box", "diffpir"]["lam"], got["box", "diffpir"]["zeta"]) == (inpaint["lam"], inpaint["zeta"])
    assert (got["blur", "diffpir"]["lam"], got["blur", "diffpir"]["zeta"]) == (blur["lam"], blur["zeta"])
    assert got["box", "z"]["zeta"] == 0.5 and got["box", "z"]["lam"] == inpaint["lam"]  # given: kept on every task
    assert got["blur", "z"]["zeta"] == 0.5


def test_methods_without_per_task_rows_keep_their_configuration_hash():
    """A sweep whose methods have no per-task entries resolves exactly as before (finished folders resume)."""
    resolved = parse_config(_cfg([{"name": "mnist"}], [{"name": "dps", "steps": 5}]), name="s.toml").resolved()
    assert "task_options" not in resolved["methods"][0]
