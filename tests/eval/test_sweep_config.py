"""Sweep configuration: strict schema (errors name the key), defaults, seeds, hashing, method options."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hessdiff.eval.sweep.config import (
    SweepConfigError,
    config_hash,
    load_config,
    parse_config,
    parse_seeds,
)
from hessdiff.eval.sweep.methods import METHODS, register_method
from hessdiff.utils.seeds import format_seeds


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    d = tmp_path / "imgs"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray((rng.random((12, 12, 3)) * 255).astype(np.uint8)).save(d / f"{i}.png")
    return d


def base(folder: Path) -> dict:
    return {
        "sweep": {"name": "t", "seeds": [0, 1]},
        "data": {"folder": str(folder), "resolution": 12},
        "tasks": [{"name": "random_inpainting", "params": {"drop": 0.5}}],
        "methods": [{"name": "pinv"}],
        "metrics": {"paired": ["psnr"], "fid": False},
    }


def test_valid_config_is_resolved_with_defaults(folder):
    cfg = parse_config(base(folder), name="s.toml")
    r = cfg.resolved()
    assert r["seeds"] == "0-1"
    assert r["tasks"][0]["params"]["sigma_y"] == 0.05  # the task's default, filled in
    assert r["methods"][0]["options"] == {"cg_iters": 100, "cg_tol": 1e-6}
    assert r["methods"][0]["steps"] == [0]
    assert r["metrics"]["features"] == "none"
    assert "imgs" not in str(r)  # the folder's location is not part of the identity


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda c: c["methods"][0].update(stepz=3), "[[methods]] entry 1: unknown key 'stepz'"),
        (lambda c: c["sweep"].update(seedz=3), "[sweep]: unknown key 'seedz' (known: name, seeds"),
        (lambda c: c.update(modelz=[]), "unknown key 'modelz'"),
        (lambda c: c["tasks"][0].update(parms={}), "[[tasks]] entry 1: unknown key 'parms'"),
        (lambda c: c["data"].update(fodler="x"), "[data]: unknown key 'fodler'"),
        (lambda c: c["metrics"].update(fidd=True), "[metrics]: unknown key 'fidd'"),
        (lambda c: c["methods"].append({"name": "pinv", "label": "p2", "options": {"cg_iter": 3}}),
         "[[methods]] entry 2 ('pinv'): unknown option 'cg_iter'"),
        (lambda c: c["methods"].append({"name": "pinv", "label": "p2", "options": {"cg_iters": "many"}}),
         "option 'cg_iters' of method 'pinv' must be an integer"),
        (lambda c: c["methods"].append({"name": "ddpm_magic"}), "unknown method 'ddpm_magic'"),
        (lambda c: c["methods"].append({"name": "pinv"}), "label 'pinv' is used twice"),
        (lambda c: c["methods"][0].update(steps=[10]), "takes no steps"),
        (lambda c: c["tasks"][0].update(name="super_resolutoin"), "did you mean 'super_resolution'"),
        (lambda c: c["tasks"][0]["params"].update(dorp=0.3), "unknown parameter(s) 'dorp'"),
        (lambda c: c["sweep"].update(seeds="3-1"), "is empty"),
        (lambda c: c["sweep"].update(seeds=[1, 1]), "duplicate seed"),
        (lambda c: c["sweep"].update(batch_size=0), "batch_size must be >= 1"),
        (lambda c: c["data"].update(resize="squash"), "resize = 'squash' is not one of"),
        (lambda c: c["data"].update(folder="/nonexistent/x"), "does not exist"),
        (lambda c: c["metrics"].update(paired=["psnr", "fidelity"]), "unknown metric 'fidelity'"),
        (lambda c: c["metrics"].update(features="vgg"), "features = 'vgg' is not one of"),
        (lambda c: c["tasks"][0].update(label="a/b"), "cannot be used in file names"),
        (lambda c: c.pop("methods"), "no [[methods]]"),
        (lambda c: c.pop("tasks"), "needs at least one [[tasks]]"),
        (lambda c: c["methods"].append({"name": "ddim", "steps": [5]}), "needs a diffusion model"),
        (lambda c: c.update(models=[{"name": "mnist"}]) or c["methods"].append(
            {"name": "ddim", "steps": [5], "options": {"correction": "magic"}}), "unknown correction 'magic'"),
        (lambda c: c.update(models=[{"name": "mnist"}]) or c["methods"].append(
            {"name": "ddim", "steps": [5], "options": {"correction": "published", "correction_options": {"lam": 1}}}),
         "do not fit correction 'published'"),
    ],
)
def test_bad_configs_name_the_problem(folder, edit, needle):
    raw = copy.deepcopy(base(folder))
    edit(raw)
    with pytest.raises(SweepConfigError) as exc:
        parse_config(raw, name="s.toml")
    assert needle in str(exc.value)
    assert str(exc.value).startswith("s.toml")


def test_generation_config_rules(tmp_path):
    gen = {"models": [{"name": "mnist"}], "methods": [{"name": "ddim", "steps": 4}], "metrics": {"fid": False}}
    cfg = parse_config(gen, name="g.toml")
    assert cfg.is_generation and cfg.metrics.paired == () and cfg.methods[0].steps == (4,)
    with pytest.raises(SweepConfigError, match="needs 'reference'"):
        parse_config({**gen, "metrics": {}}, name="g.toml")
    with pytest.raises(SweepConfigError, match="need clean images"):
        parse_config({**gen, "metrics": {"fid": False, "paired": ["psnr"]}}, name="g.toml")
    with pytest.raises(SweepConfigError, match="restores measurements"):
        parse_config({**gen, "methods": [{"name": "pinv"}]}, name="g.toml")
    cfg = parse_config({**gen, "metrics": {"reference": "embedded:mnist-test"}}, name="g.toml")
    assert cfg.metrics.features == "domain"  # "auto" resolves to the embedded classifier for mnist models
    with pytest.raises(SweepConfigError, match="unknown embedded data set"):
        parse_config({**gen, "metrics": {"reference": "embedded:cifar"}}, name="g.toml")


def test_seeds_parsing_and_canonical_form():
    assert parse_seeds("0-3,7, 10-11") == (0, 1, 2, 3, 7, 10, 11)
    assert parse_seeds([5, 2]) == (2, 5)
    assert parse_seeds(4) == (4,)
    assert format_seeds((0, 1, 2, 3, 7, 10, 11)) == "0-3,7,10-11"
    for bad in ("a-b", -1, [0.5], True, "", []):
        with pytest.raises(SweepConfigError):
            parse_seeds(bad)


def test_hash_is_stable_and_sensitive(folder):
    a = parse_config(base(folder), name="s.toml")
    raw = base(folder)
    raw["sweep"]["seeds"] = "0-1"  # same seeds written differently
    raw["tasks"][0]["params"]["sigma_y"] = 0.05  # the default, written out
    b = parse_config(raw, name="s.toml")
    assert a.hash() == b.hash()
    raw["tasks"][0]["params"]["drop"] = 0.6
    assert parse_config(raw, name="s.toml").hash() != a.hash()
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})


def test_toml_file_paths_are_relative_to_the_file(folder, tmp_path):
    p = tmp_path / "sub" / "s.toml"
    p.parent.mkdir()
    p.write_text('[data]\nfolder = "../imgs"\nresolution = 12\n[[tasks]]\nname = "denoising"\n'
                 '[[methods]]\nname = "pinv"\n[metrics]\nfid = false\n')
    cfg = load_config(p)
    assert cfg.data.folder == folder.resolve()
    p.write_text("[data\nfolder=1")
    with pytest.raises(SweepConfigError, match="s.toml: not valid TOML"):
        load_config(p)
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.toml")


def test_registered_method_options_are_validated():
    @register_method("_test_double", options={"gain": 2.0, "mode": "a", "req": inspect_empty()},
                     needs_model=False, uses_steps=False, choices={"mode": ("a", "b")}, replace=True)
    def _double(call):  # pragma: no cover - never run
        raise AssertionError

    try:
        spec = METHODS["_test_double"]
        assert spec.resolve_options({"gain": 3, "req": [1]}) == {"gain": 3.0, "mode": "a", "req": [1]}
        with pytest.raises(ValueError, match="needs option 'req'"):
            spec.resolve_options({})
        with pytest.raises(ValueError, match="must be one of 'a', 'b'"):
            spec.resolve_options({"req": 1, "mode": "c"})
        with pytest.raises(ValueError, match="must be a number"):
            spec.resolve_options({"req": 1, "gain": "x"})
        with pytest.raises(ValueError, match="already registered"):
            register_method("_test_double", _double)
    finally:
        METHODS.pop("_test_double")


def inspect_empty():
    import inspect

    return inspect.Parameter.empty


def test_every_method_satisfies_the_contract():
    for name, spec in METHODS.items():
        assert spec.name == name and callable(spec.fn)
        assert isinstance(spec.options, dict)
        for key in spec.options:
            assert isinstance(key, str)


def test_shipped_example_configs_are_valid(tmp_path):
    from hessdiff.scripts.cmd_sweep import shipped_configs

    shipped = shipped_configs()
    assert {"mnist-quick", "mnist-generation", "mnist-restoration", "ffhq-template"} <= set(shipped)
    for name, path in shipped.items():
        text = path.read_text()
        if "/path/to/" in text:  # a template: point it at a real folder
            (tmp_path / "imgs").mkdir(exist_ok=True)
            text = text.replace("/path/to/ffhq-val", str(tmp_path / "imgs"))
            path = tmp_path / f"{name}.toml"
            path.write_text(text)
        cfg = load_config(path)
        assert cfg.methods and cfg.hash()


def test_methods_can_be_restricted_to_models():
    from hessdiff.eval.sweep.work import _build_work

    gen = {"models": [{"name": "mnist"}, {"name": "mnist-ldm"}],
           "methods": [{"name": "ddim", "steps": 4}, {"name": "dpm++", "steps": [3, 5], "models": ["mnist-ldm"]}],
           "metrics": {"fid": False}}
    cfg = parse_config(gen, name="g.toml")
    assert cfg.methods[0].models == () and cfg.methods[1].models == ("mnist-ldm",)
    assert "models" not in cfg.methods[0].resolved()  # unrestricted entries keep their old hash
    assert cfg.methods[1].resolved()["models"] == ["mnist-ldm"]
    _, batches = _build_work(cfg, None, None)
    units = sorted({u.label for u, _ in batches})
    assert units == ["mnist-ldm/unconditional/ddim/4", "mnist-ldm/unconditional/dpm++/3",
                     "mnist-ldm/unconditional/dpm++/5",
                     "mnist/unconditional/ddim/4"]
    for bad, needle in ((["mnist-xl"], "unknown model label 'mnist-xl'"), ([], "non-empty list"), ([3], "list of")):
        raw = {**gen, "methods": [{"name": "ddim", "steps": 4, "models": bad}]}
        with pytest.raises(SweepConfigError, match=needle):
            parse_config(raw, name="g.toml")
    assert parse_config({**gen, "methods": [{"name": "ddim", "steps": 4, "models": "mnist"}]},
                        name="g.toml").methods[0].models == ("mnist",)


def test_fashion_sweeps_get_fashion_data_and_fashion_domain_features():
    from hessdiff.eval.sweep.images import _ImageSet
    from hessdiff.eval.sweep.methods import make_feature_extractor

    raw = {"sweep": {"name": "f"}, "models": [{"name": "fashion"}], "data": {"embedded": "fashion-test", "first_n": 20},
           "tasks": [{"name": "denoising"}], "methods": [{"name": "pinv"}], "metrics": {"fid": True}}
    cfg = parse_config(raw, name="f.toml")
    assert cfg.metrics.features == "domain-fashion"
    ext = make_feature_extractor("domain-fashion")
    assert ext.name == "fashion-classifier-128"
    s = _ImageSet("data", embedded="fashion-test", first_n=20)
    from hessdiff.samplers.models import embedded_dataset

    x, labels = embedded_dataset("test", family="fashion", with_labels=True)
    assert len(s) == 20 and sorted(labels[:20].tolist()) == sorted(list(range(10)) * 2)  # balanced first_n
    assert torch.equal(s.load(0, (32, 32))[0], ((x[0, 0] + 1) * 127.5).round().to(torch.uint8))
    feats = ext(s.load(0, (32, 32))[None])
    assert feats.shape == (1, 128) and bool(torch.isfinite(torch.as_tensor(feats)).all())
    mnist = parse_config({**raw, "models": [{"name": "mnist"}], "data": {"embedded": "mnist-test"}}, name="m.toml")
    assert mnist.metrics.features == "domain"


@pytest.mark.parametrize("family, n_test, n_tune", [("mnist", 500, 100), ("fashion", 1000, 200)])
def test_tune_sets_are_the_balanced_tail_disjoint_from_reported_first_n(family, n_test, n_tune):
    from hessdiff.eval.sweep.images import _ImageSet
    from hessdiff.samplers.models import embedded_dataset

    x, labels = embedded_dataset("test", family=family, with_labels=True)
    assert x.shape[0] == n_test
    tune = _ImageSet("data", embedded=f"{family}-tune")
    assert len(tune) == n_tune
    first = _ImageSet("data", embedded=f"{family}-test", first_n=n_test - n_tune)
    assert not set(tune.content) & set(first.content)  # no tuning image among the reportable ones
    assert torch.equal(tune.load(0, (32, 32))[0], ((x[n_test - n_tune, 0] + 1) * 127.5).round().to(torch.uint8))
    counts = torch.bincount(labels[n_test - n_tune:], minlength=10)
    assert counts.tolist() == [n_tune // 10] * 10  # class-balanced
    cfg = parse_config({"sweep": {"name": "t"}, "models": [{"name": family}],
                        "data": {"embedded": f"{family}-tune", "first_n": 10},
                        "tasks": [{"name": "denoising"}], "methods": [{"name": "pinv"}]}, name="t.toml")
    assert cfg.data.embedded == f"{family}-tune"


def test_interleave_runs_the_methods_in_turn_on_the_same_batches():
    from hessdiff.eval.sweep.work import _build_work

    gen = {"sweep": {"seeds": "0-5", "batch_size": 2}, "models": [{"name": "mnist"}],
           "methods": [{"name": "ddim", "steps": 4}, {"name": "dpm++", "steps": [3, 5]}], "metrics": {"fid": False}}
    plain = parse_config(gen, name="g.toml")
    mixed = parse_config({**gen, "sweep": {**gen["sweep"], "interleave": True}}, name="g.toml")
    assert "interleave" not in plain.resolved() and mixed.resolved()["interleave"] is True
    items_p, batches_p = _build_work(plain, None, None)
    items_m, batches_m = _build_work(mixed, None, None)
    assert [it.key for it in items_m] == [it.key for it in items_p]  # the same items, only their order differs
    assert sorted(tuple(it.key for it in b) for _, b in batches_m) == sorted(tuple(it.key for it in b)
                                                                           for _, b in batches_p)
    short = [(u.label.split("/", 2)[2], tuple(it.seed for it in b)) for u, b in batches_m]
    assert short == [("ddim/4", (0, 1)), ("dpm++/3", (0, 1)), ("dpm++/5", (0, 1)),
                     ("dpm++/3", (2, 3)), ("dpm++/5", (2, 3)), ("ddim/4", (2, 3)),
                     ("dpm++/5", (4, 5)), ("ddim/4", (4, 5)), ("dpm++/3", (4, 5))]
    with pytest.raises(SweepConfigError, match="interleave"):
        parse_config({**gen, "sweep": {"interleave": "yes"}}, name="g.toml")
