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
