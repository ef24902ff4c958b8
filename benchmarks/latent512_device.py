"""Per-step time and peak memory of latent posterior samplers with Stable-Diffusion-sized models (random init).

The prepared device check of the posterior-sampling benchmarks: a ``UNet2DConditionModel`` and an ``AutoencoderKL``
with the Stable Diffusion 1.x configurations (860 M and 84 M parameters; random weights, so the images are noise:
only time and memory are measured), a DDIM scheduler with SD's betas, the null prompt as zero embeddings (no text
encoder), and a 512 x 512 RGB measurement (SR x4 by default). Each method runs once with one step (warm-up:
kernels, allocator), then with ``--steps`` steps; per-step time is the wall time of the second run over its steps
(CUDA synchronised), peak memory is ``torch.cuda.max_memory_allocated`` over that run (the loop resets it), and
the cost counters (forwards, VJPs, decoder passes) come from the run's :class:`hessdiff.samplers.guidance.Cost`.
The JSON is rewritten after every method, so a run cut short keeps what it finished.

    python benchmarks/latent512_device.py --out $OUT/latent512.json              # on a GPU (fp16 weights)
    python benchmarks/latent512_device.py --tiny --device cpu --out /tmp/t.json  # seconds-long CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

# Stable Diffusion 1.x (runwayml / CompVis v1-5 model_index): the UNet is diffusers' UNet2DConditionModel default
SD_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
               block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
               down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
               up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
              block_out_channels=(128, 256, 512, 512), scaling_factor=0.18215,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    clip_sample=False, set_alpha_to_one=False, steps_offset=1)
# the same structure, small enough for a CPU test
TINY_UNET = dict(SD_UNET, sample_size=8, layers_per_block=1, block_out_channels=(16, 32), cross_attention_dim=16,
                 attention_head_dim=4, norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
TINY_VAE = dict(SD_VAE, layers_per_block=1, sample_size=32, block_out_channels=(8, 16), norm_num_groups=4,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)

METHODS = ("mmps", "stsl", "psld", "latent_dps")


def build_pipeline(tiny: bool, device: torch.device, dtype: torch.dtype):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    from hessdiff.samplers.diffusers.pipeline import PosteriorSamplingPipeline

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**(TINY_UNET if tiny else SD_UNET))
        vae = AutoencoderKL(**(TINY_VAE if tiny else SD_VAE))
    for m in (unet, vae):
        if dtype != torch.float32:
            m.to(dtype)
        m.eval().requires_grad_(False)
    pipe = PosteriorSamplingPipeline(unet=unet, scheduler=DDIMScheduler(**SD_SCHEDULER), vae=vae)
    return pipe.to(device)


def measurement(task: str, size: int, device: torch.device):
    from hessdiff.tasks.operators import Inpainting, SuperResolution

    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device) * 2 - 1
    if task == "sr4":
        op = SuperResolution(4, filter="bicubic")
    elif task == "box":
        mask = torch.ones(1, 1, size, size, device=device)
        mask[..., size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 0
        op = Inpainting(mask)
    else:
        raise SystemExit(f"unknown task {task!r}: sr4 or box")
    y = op(x)
    return op, y + 0.05 * torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(device)


def run_method(pipe, op, y, method: str, steps: int, embeds: torch.Tensor, checkpointing: bool, size: int) -> dict:
    dev = y.device

    def once(n: int):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        out = pipe(y, op, method=method, num_inference_steps=n, height=size, width=size,
                   generator=torch.Generator().manual_seed(0), prompt_embeds=embeds,
                   gradient_checkpointing=checkpointing, output_type="pt", progress=False,
                   method_kwargs={"sigma_y": 0.05} if method == "mmps" else None)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return out, time.perf_counter() - t0

    once(1)  # warm-up
    out, wall = once(steps)
    cost = out.cost.as_dict()
    return {"method": method, "steps": steps, "wall_s": wall, "s_per_step": wall / steps,
            "peak_memory_gib": (cost.get("peak_memory_bytes") or 0) / 2**30,
            "memory_measure": cost.get("memory_measure"),
            "finite": bool(torch.isfinite(out.images).all()), "cost": cost}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--steps", type=int, default=4, help="steps of the timed run (default 4)")
    ap.add_argument("--task", default="sr4", choices=("sr4", "box"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=("float16", "bfloat16", "float32"),
                    help="weights' dtype (default: float16 on CUDA, float32 on CPU)")
    ap.add_argument("--checkpointing", action="store_true", help="checkpoint the VAE decoder in the guidance gradient")
    ap.add_argument("--size", type=int, default=None,
                    help="image side (default: the configuration's, 512; a multiple of 64, e.g. 64 for a CPU check "
                         "of the full configurations)")
    ap.add_argument("--tiny", action="store_true", help="small configurations of the same structure (CPU smoke run)")
    a = ap.parse_args(argv)
    methods = [m for m in a.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    problem = (f"unknown method(s) {unknown} (choose from {', '.join(METHODS)})" if unknown
               else "--steps must be >= 1" if a.steps < 1
               else f"--size {a.size} is not a positive multiple of 64"
               if a.size is not None and not a.tiny and (a.size < 64 or a.size % 64) else None)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    dev = torch.device(a.device)
    dtype = getattr(torch, a.dtype or ("float16" if dev.type == "cuda" else "float32"))
    pipe = build_pipeline(a.tiny, dev, dtype)
    size = a.size or pipe.unet.config.sample_size * pipe.vae_scale_factor
    op, y = measurement(a.task, size, dev)
    embeds = torch.zeros(1, 77, pipe.unet.config.cross_attention_dim, device=dev, dtype=dtype)
    report = {"size": size, "task": a.task, "dtype": str(dtype).replace("torch.", ""), "device": str(dev),
              "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor(),
              "torch": torch.__version__, "tiny": a.tiny, "checkpointing": a.checkpointing,
              "unet_params": sum(p.numel() for p in pipe.unet.parameters()),
              "vae_params": sum(p.numel() for p in pipe.vae.parameters()), "rows": []}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for m in methods:
        row = run_method(pipe, op, y, m, a.steps, embeds, a.checkpointing, size)
        report["rows"].append(row)
        print(f"{m:>10}: {row['s_per_step']:.3f} s/step, peak {row['peak_memory_gib']:.2f} GiB, "
              f"forwards {row['cost'].get('network_forward')}, VJPs {row['cost'].get('network_backward')}", flush=True)
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(json.dumps(report, indent=1))
        os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
