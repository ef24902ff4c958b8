"""The prepared device check benchmarks/latent512_device.py, run on CPU with its tiny configurations."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "latent512_device.py"


def _load():
    spec = importlib.util.spec_from_file_location("latent512_device", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tiny_run_writes_time_memory_and_counts(tmp_path):
    mod = _load()
    out = tmp_path / "r.json"
    assert mod.main(["--tiny", "--device", "cpu", "--steps", "2", "--methods", "mmps,latent_dps",
                     "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["tiny"] and rep["size"] == 16 and rep["dtype"] == "float32"
    rows = {r["method"]: r for r in rep["rows"]}
    assert set(rows) == {"mmps", "latent_dps"}
    for r in rows.values():
        assert r["finite"] and r["s_per_step"] > 0 and r["steps"] == 2
        assert r["cost"]["network_forward"] == 2
    # MMPS: one VJP per Krylov iteration (5) plus the final one, per step; latent DPS: one
    assert rows["mmps"]["cost"]["network_backward"] == 12
    assert rows["latent_dps"]["cost"]["network_backward"] == 2


@pytest.mark.parametrize("args", [["--methods", "mmps,nope"], ["--steps", "0"], ["--size", "100"]])
def test_bad_arguments_exit_2_before_building(tmp_path, args, capsys):
    mod = _load()
    out = tmp_path / "r.json"
    assert mod.main(["--device", "cpu", "--out", str(out), *args]) == 2
    assert "error:" in capsys.readouterr().err and not out.exists()


def test_full_configurations_are_stable_diffusion_sized():
    from diffusers import AutoencoderKL, UNet2DConditionModel

    mod = _load()
    with __import__("torch").device("meta"):
        unet = UNet2DConditionModel(**mod.SD_UNET)
        vae = AutoencoderKL(**mod.SD_VAE)
    assert 855e6 < sum(p.numel() for p in unet.parameters()) < 866e6  # SD 1.x UNet: 859.5 M
    assert 80e6 < sum(p.numel() for p in vae.parameters()) < 86e6  # SD VAE: 83.7 M
