"""diffusers integration of the posterior samplers: :class:`PosteriorSamplingPipeline` and
:class:`VAEAutoencoder`.

The pipeline takes an existing pipeline's components (``from_pipe(StableDiffusionPipeline)``,
``from_pipe(DDPMPipeline)``, or a UNet + scheduler + optional VAE / text encoder) and runs one of
:data:`~hessdiff.samplers.guidance.POSTERIOR_SAMPLERS` -- the samplers own their loops (they take
gradients through the network); only the scheduler's *config* is used, to build the noise schedule.

Dtype: the UNet and VAE may be fp16/bf16; states, guidance gradients and all sampler arithmetic are
float32 (the adapters cast to the model dtype for the forward pass only and upcast the outputs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel, UNet2DModel, VQModel
from diffusers.utils import BaseOutput
from torch import Tensor

from ..api import fill_sigma_y
from ..defaults import DEFAULTS, method_defaults, model_family
from ..denoiser import UNetDenoiser
from ..guidance import LATENT_METHODS, POSTERIOR_SAMPLERS, Cost
from ..solvers import randn_like

try:  # text encoders need the optional ``transformers`` (``pip install "hessdiff[text]"``)
    from transformers import CLIPTextModel, CLIPTokenizer
except ImportError:  # the annotations diffusers reads from __init__ must still resolve
    CLIPTextModel = CLIPTokenizer = Any  # type: ignore[misc,assignment]

__all__ = ["PosteriorSamplingPipeline", "PosteriorSamplingOutput", "VAEAutoencoder", "DEFAULT_STEPS",
           "DEFAULT_METHOD_OPTIONS"]

#: default ``num_inference_steps`` per method: the defaults table's published rows
#: (:mod:`hessdiff.samplers.defaults`, shared with ``hessdiff restore`` and :func:`hessdiff.restore`)
DEFAULT_STEPS: dict[str, int] = {m: int(method_defaults(m, row="published")["steps"]) for m in DEFAULTS}
#: options the pipeline passes unless overridden in ``method_kwargs``: the same published rows (with their
#: per-task entries on top when the task is known: a ``Measurement`` or a ``Task``)
DEFAULT_METHOD_OPTIONS: dict[str, dict[str, Any]] = {
    m: {k: v for k, v in method_defaults(m, row="published").items() if k != "steps"} for m in DEFAULTS
}


class VAEAutoencoder:
    """A diffusers ``AutoencoderKL`` or ``VQModel`` as ``decode(z) -> x`` / ``encode(x) -> z``.

    ``z`` is in the diffusion model's latent scale: ``decode(z) = vae.decode(z / scaling_factor +
    shift_factor)``, ``encode(x) = (E(x) - shift_factor) * scaling_factor`` with ``E(x)`` the posterior
    mean of an ``AutoencoderKL`` (or a draw from it with ``sample=True`` and ``generator``; PSLD's
    released code draws) or a ``VQModel``'s pre-quantisation latents. A ``VQModel`` decodes through
    its quantiser as diffusers' pipelines do (the quantiser passes gradients straight through).
    Images are in ``[-1, 1]``; outputs are upcast to float32 (float64 inputs stay float64).

    gradient_checkpointing: wrap the decoder call in ``torch.utils.checkpoint`` (activations are
      recomputed during the backward pass): bounds memory at 512² at the price of one extra decoder
      forward per backward.
    """

    def __init__(self, vae: Any, *, scaling_factor: float | None = None, shift_factor: float | None = None,
                 sample: bool = False, generator: torch.Generator | None = None,
                 gradient_checkpointing: bool = False) -> None:
        if not (callable(getattr(vae, "decode", None)) and callable(getattr(vae, "encode", None))):
            raise TypeError(f"expected a diffusers AutoencoderKL or VQModel, got {type(vae).__name__}")
        self.vae = vae
        cfg = vae.config
        sf = scaling_factor if scaling_factor is not None else cfg.get("scaling_factor", 1.0)
        self.scaling_factor = float(sf if sf is not None else 1.0)
        sh = shift_factor if shift_factor is not None else cfg.get("shift_factor", None)
        self.shift_factor = float(sh) if sh is not None else 0.0
        self.sample, self.generator = bool(sample), generator
        self.gradient_checkpointing = bool(gradient_checkpointing)
        self.scale = 2 ** (len(cfg.block_out_channels) - 1)
        self.latent_channels = int(cfg.latent_channels)
        self.image_channels = int(cfg.get("out_channels", cfg.get("in_channels", 3)))

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def data_shape(self, latent_shape: Sequence[int]) -> tuple[int, ...]:
        b, _, h, w = latent_shape
        return (b, self.image_channels, h * self.scale, w * self.scale)

    def latent_shape(self, image_shape: Sequence[int]) -> tuple[int, ...]:
        b, _, h, w = image_shape
        return (b, self.latent_channels, h // self.scale, w // self.scale)

    def _decode(self, z: Tensor) -> Tensor:
        h = (z / self.scaling_factor + self.shift_factor).to(self.dtype)
        return self.vae.decode(h).sample

    def decode(self, z: Tensor) -> Tensor:
        out_dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
        if self.gradient_checkpointing and torch.is_grad_enabled() and z.requires_grad:
            from torch.utils.checkpoint import checkpoint

            x = checkpoint(self._decode, z, use_reentrant=False)
        else:
            x = self._decode(z)
        return x.to(out_dtype)

    def encode(self, x: Tensor) -> Tensor:
        out_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        enc = self.vae.encode(x.to(self.dtype))
        if hasattr(enc, "latent_dist"):
            dist = enc.latent_dist
            h = dist.sample(self.generator) if self.sample else dist.mean
        else:
            h = enc.latents
        return ((h.to(out_dtype) - self.shift_factor) * self.scaling_factor).to(out_dtype)


@dataclass
class PosteriorSamplingOutput(BaseOutput):
    """``images``: PIL list, ``np.ndarray`` ``[B, H, W, C]`` in ``[0, 1]``, a ``[B, C, H, W]`` tensor in
    ``[-1, 1]`` (``"pt"``) or the final latents (``"latent"``); ``cost``: the run's :class:`Cost`."""

    images: Any
    cost: Cost


class PosteriorSamplingPipeline(DiffusionPipeline):
    r"""Posterior sampling (DPS, latent DPS, PSLD, STSL, MMPS, TMPD, ΠGDM, DiffPIR, DAPS) with a diffusers model.

    Build it from components or from another pipeline::

        pipe = PosteriorSamplingPipeline.from_pipe(StableDiffusionPipeline.from_pretrained(...))
        out = pipe(y, operator, method="stsl", num_inference_steps=50, generator=torch.Generator().manual_seed(0))
        out.images, out.cost

    ``vae`` present: the latent methods (``latent_dps``, ``psld``) and those of either space; absent: ``dps``
    and those of either space (``stsl``, ``mmps``, ``tmpd``, ``pigdm``, ``diffpir``, ``daps``, which act
    through the decoder in latent space). A ``UNet2DConditionModel`` is conditioned on ``prompt`` (default ``""``, the
    null prompt the PSLD / STSL papers use) through ``text_encoder`` / ``tokenizer``, or on
    ``prompt_embeds``.
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["vae", "text_encoder", "tokenizer"]

    def __init__(
        self,
        unet: UNet2DModel | UNet2DConditionModel,
        scheduler: Any,
        vae: AutoencoderKL | VQModel | None = None,
        text_encoder: CLIPTextModel | None = None,
        tokenizer: CLIPTokenizer | None = None,
    ) -> None:
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                              tokenizer=tokenizer)

    # ------------------------------------------------------------------------------------ helpers
    @property
    def vae_scale_factor(self) -> int:
        vae = getattr(self, "vae", None)
        return 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1

    def _unet_multiple(self) -> int:
        return 2 ** (len(self.unet.config.block_out_channels) - 1)

    def _image_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        ss = self.unet.config.sample_size
        ss = (ss, ss) if isinstance(ss, int) else tuple(ss)
        f = self.vae_scale_factor
        h = int(height) if height is not None else ss[0] * f
        w = int(width) if width is not None else ss[1] * f
        need = f * self._unet_multiple()
        if h < 1 or w < 1 or h % need or w % need:
            raise ValueError(
                f"image size {h}x{w} cannot be taken by this model: height and width must be positive multiples "
                f"of {need} (VAE factor {f} x UNet down-sampling {self._unet_multiple()})")
        return h, w

    def _encode_prompt(self, prompt: str | list[str] | None, batch: int, device: torch.device) -> Tensor:
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError("this UNet is text-conditioned: give prompt_embeds, or build the pipeline with a "
                             "text_encoder and tokenizer")
        prompts = [prompt or ""] * batch if prompt is None or isinstance(prompt, str) else list(prompt)
        if len(prompts) != batch:
            raise ValueError(f"got {len(prompts)} prompts for a batch of {batch}")
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(device)
        with torch.no_grad():
            return self.text_encoder(ids)[0]

    @staticmethod
    def _resolve_task(measurement: Any, task: Any) -> tuple[Tensor, Any]:
        y = measurement
        if hasattr(measurement, "y") and hasattr(measurement, "operator") and not isinstance(measurement, Tensor):
            y, task = measurement.y, task if task is not None else measurement.operator
        op = task
        if op is not None and not callable(getattr(op, "adjoint", None)) and hasattr(op, "operator"):
            op = op.operator  # a hessdiff Task with a fixed operator
            if not callable(getattr(op, "adjoint", None)):
                raise ValueError("this task draws its operator per image; pass the Measurement returned by "
                                 "task.measure(x, seed) instead")
        if op is None or not callable(op) or not callable(getattr(op, "adjoint", None)):
            raise TypeError(f"task must be a measurement operator with __call__ and adjoint (e.g. from "
                            f"hessdiff.tasks), got {type(task).__name__}")
        if not isinstance(y, Tensor):
            raise TypeError(f"the measurement must be a torch.Tensor, got {type(y).__name__}")
        return y, op

    def _conditioning(self, prompt: Any, negative_prompt: Any, prompt_embeds: Tensor | None, guidance_scale: float,
                      batch: int, device: torch.device) -> dict[str, Any]:
        """The text conditioning of a ``UNet2DConditionModel`` (the null prompt by default) and CFG."""
        cond: dict[str, Any] = {}
        if isinstance(self.unet, UNet2DConditionModel):
            ehs = prompt_embeds if prompt_embeds is not None else self._encode_prompt(prompt, batch, device)
            cond["encoder_hidden_states"] = ehs
            if guidance_scale != 1.0:
                cond["negative_encoder_hidden_states"] = self._encode_prompt(negative_prompt, batch, device)
                cond["guidance_scale"] = guidance_scale
        elif prompt is not None or prompt_embeds is not None:
            raise ValueError("prompt / prompt_embeds given but this UNet is not text-conditioned")
        return cond

    def _format(self, result: Any, output_type: str) -> Any:
        if output_type == "latent":
            return result.samples
        images = result.images.float()
        if output_type == "pt":
            return images
        arr = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        return arr if output_type == "np" else self.numpy_to_pil(np.asarray(arr))

    # ------------------------------------------------------------------------------------ call
    def __call__(
        self,
        measurement: Tensor | Any,
        task: Any = None,
        method: str = "stsl",
        num_inference_steps: int | None = None,
        *,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_samples: int | None = None,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: Tensor | None = None,
        guidance_scale: float = 1.0,
        height: int | None = None,
        width: int | None = None,
        spacing: str | None = None,
        gradient_checkpointing: bool = False,
        method_kwargs: dict[str, Any] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        progress: bool = True,
    ) -> PosteriorSamplingOutput | tuple[Any, Cost]:
        """Sample the posterior given ``measurement = A x + n``.

        Args:
            measurement: ``y`` shaped like ``task(x)`` for the image batch (batch 1 is shared by all
                samples), or a :class:`hessdiff.tasks.Measurement` (then ``task`` may be omitted).
            task: the operator ``A`` (``A(x)``, true ``A.adjoint(y)``; e.g. :mod:`hessdiff.tasks`), or
                a :class:`hessdiff.tasks.Task` with a fixed operator.
            method: ``"dps"`` (pixel), ``"latent_dps"``, ``"psld"`` (latent), ``"stsl"``, ``"mmps"``,
                ``"tmpd"``, ``"pigdm"``, ``"diffpir"``, ``"daps"`` (either).
            num_inference_steps: default: the method's row of the defaults table (``hessdiff.samplers.defaults``).
            generator: one ``torch.Generator`` or one per sample.
            num_samples: batch size (default: the measurement's batch).
            prompt / negative_prompt / prompt_embeds / guidance_scale: text conditioning of a
                ``UNet2DConditionModel`` (default: the null prompt, no classifier-free guidance).
            height, width: image size (default: the UNet's ``sample_size`` times the VAE factor).
            spacing: timestep spacing of the grid (default: the scheduler config's).
            gradient_checkpointing: checkpoint the VAE decoder inside the guidance gradient.
            method_kwargs: options of the sampler, over :data:`DEFAULT_METHOD_OPTIONS`.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
        """
        if method not in POSTERIOR_SAMPLERS:
            raise ValueError(f"unknown method {method!r}; available: {', '.join(POSTERIOR_SAMPLERS)}")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"unknown output_type {output_type!r}; expected pil, np, pt or latent")
        latent = self.vae is not None
        if method in LATENT_METHODS and not latent:
            raise ValueError(f"{method} is a latent-space method and this pipeline has no VAE; use dps or stsl, "
                             "or build the pipeline with a vae")
        if method == "dps" and latent:
            raise ValueError("dps works in pixel space but this pipeline's UNet is a latent model (it has a VAE); "
                             "use latent_dps, psld or stsl")
        y, op = self._resolve_task(measurement, task)
        if not bool(torch.isfinite(y).all()):
            raise ValueError("the measurement contains NaN or Inf")
        # the defaults table's row for this model (the embedded models' own rows when loaded from their folders)
        task_name = next((n for n in (getattr(measurement, "task", None), getattr(task, "name", None))
                          if isinstance(n, str)), None)
        defaults = method_defaults(method, model_family(getattr(self, "name_or_path", None)), task=task_name)
        default_steps = int(defaults.pop("steps"))
        steps = default_steps if num_inference_steps is None else int(num_inference_steps)
        batch = int(num_samples) if num_samples is not None else int(y.shape[0])
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for {batch} samples")
        device = self._execution_device
        h, w = self._image_size(height, width)
        f = self.vae_scale_factor
        shape = (batch, self.unet.config.in_channels, h // f, w // f)

        cond = self._conditioning(prompt, negative_prompt, prompt_embeds, guidance_scale, batch, device)
        denoiser = UNetDenoiser.from_unet_and_scheduler(self.unet, self.scheduler, **cond)
        if denoiser.schedule.kind != "vp":
            raise ValueError("the posterior samplers run on VP (DDPM-family) schedules; this scheduler is "
                             f"{type(self.scheduler).__name__}")
        grid = denoiser.schedule.grid(steps, spacing, final="diffusers")
        x = float(grid.sigma[0]) * randn_like(torch.empty(shape, dtype=torch.float32, device=device), generator)

        opts = {**defaults, **(method_kwargs or {})}
        fill_sigma_y(method, opts, measurement)
        fn = POSTERIOR_SAMPLERS[method]
        args: list[Any] = [denoiser, op, y.to(device=device, dtype=torch.float32), x, grid]
        if latent:
            args.append(VAEAutoencoder(self.vae, gradient_checkpointing=gradient_checkpointing,
                                       generator=generator if isinstance(generator, torch.Generator) else None))
        result = fn(*args, generator=generator, progress=progress, **opts)

        images = self._format(result, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, result.cost
        return PosteriorSamplingOutput(images=images, cost=result.cost)
