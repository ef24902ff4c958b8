"""Helpers shared by the ``hessdiff`` sub-commands that run a diffusion model (``restore``, ``sample``).

* argument parsing: :func:`parse_device`, :func:`parse_dtype`, :func:`parse_seeds`, :func:`parse_key_values`;
* model loading with clear errors (:func:`load_model_for_cli`), from an embedded name, a local diffusers
  folder or a Hugging Face hub id; :func:`model_from_pipeline` wraps an in-memory diffusers pipeline;
  :func:`text_conditioning` encodes a prompt for text-conditional UNets (Stable Diffusion);
* output folders that are checked *before* any work and written all-or-nothing (:class:`OutputDir`,
  on top of :func:`hessdiff.utils.files.atomic_write_many`);
* pictures: :func:`to_rgb_uint8`, :func:`upscale_nearest`, :func:`image_grid`, :func:`labelled_row`;
* :class:`StepProgress`, a tqdm bar driven by a sampler's ``callback``.

Every user error raises :class:`~hessdiff.scripts.cli.CLIError` (exit code 2) with a message naming the
problem. Heavy libraries (diffusers, transformers, PIL, tqdm) are imported inside the functions.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hessdiff.scripts.cli import CLIError
from hessdiff.utils.pictures import image_grid, labelled_row, to_rgb_uint8, upscale_nearest  # noqa: F401 (re-exported)

__all__ = [
    "DTYPES",
    "parse_device",
    "parse_dtype",
    "parse_seeds",
    "parse_key_values",
    "set_threads",
    "load_model_for_cli",
    "model_from_pipeline",
    "text_conditioning",
    "make_denoiser",
    "make_autoencoder",
    "OutputDir",
    "png_writer",
    "to_rgb_uint8",
    "upscale_nearest",
    "image_grid",
    "labelled_row",
    "StepProgress",
]

#: ``--dtype`` names -> torch dtypes (the network's dtype; guidance and solver arithmetic stay float32)
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


# ================================================================================ arguments
def parse_device(name: str) -> torch.device:
    """``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` -> a usable device."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise CLIError(f"--device {name!r} is not a device name (use auto, cpu, cuda, cuda:1, mps)") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CLIError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif device.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise CLIError(f"--device {name}: MPS is not available on this machine (use --device cpu)")
    elif device.type != "cpu":
        raise CLIError(f"--device {name!r}: unsupported device type {device.type!r} (use auto, cpu, cuda, mps)")
    return device


def parse_dtype(name: str) -> torch.dtype:
    """``float32`` / ``float16`` / ``bfloat16`` (or ``fp32``, ``fp16``, ``half``, ``bf16``) -> torch dtype."""
    key = (name or "float32").strip().lower()
    if key not in DTYPES:
        raise CLIError(f"--dtype {name!r} is not supported; choose float32, float16 or bfloat16")
    return DTYPES[key]


def parse_seeds(text: str, *, limit: int = 100_000) -> list[int]:
    """``--seeds``: ``"0-15"``, ``"3"``, ``"0,4,7-9"`` -> the list of seeds (ranges inclusive, order kept, no
    repeats, at most ``limit``), parsed by :func:`hessdiff.utils.seeds.parse_seeds`; errors are :class:`CLIError`."""
    from hessdiff.utils.seeds import parse_seeds as _parse_seeds

    try:
        return _parse_seeds(str(text), limit=limit)
    except ValueError as exc:
        raise CLIError(f"--seeds {text!r}: {exc}") from None


def parse_key_values(items: Sequence[str], flag: str) -> dict[str, Any]:
    """``["k=v", ...]`` -> dict; a value is read as JSON when it parses (numbers, true/false/null, lists),
    otherwise kept as a string. ``flag`` names the option in error messages."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise CLIError(f"{flag} expects KEY=VALUE; got {item!r}")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out[key] = value
    return out


def set_threads(threads: int | None, model: str | None = None) -> None:
    """``torch.set_num_threads(threads)`` after checking it is positive. ``None``: one thread for the
    embedded models (2-4x faster than two on these small networks, measured), torch's choice otherwise."""
    if threads is None:
        from hessdiff.samplers.defaults import model_family

        if model is not None and model_family(model) is not None:
            torch.set_num_threads(1)
        return
    if threads < 1:
        raise CLIError(f"--threads must be a positive integer, got {threads}")
    torch.set_num_threads(int(threads))


# ================================================================================ models
def load_model_for_cli(name_or_path: str, device: torch.device, dtype: torch.dtype) -> Any:
    """:func:`hessdiff.samplers.models.load_model` with user-facing errors, moved to ``device`` / ``dtype``.

    An embedded name or a local folder never touches the network; a hub id without network access
    (``HF_HUB_OFFLINE=1`` or no connection) raises :class:`CLIError` saying so.
    """
    from hessdiff.samplers.models import ModelLoadError, load_model

    try:
        model = load_model(name_or_path)
    except ModelLoadError as exc:
        raise CLIError(f"--model {name_or_path}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - corrupt weights, bad configs: diffusers raises many types
        raise CLIError(f"--model {name_or_path}: cannot load the model: {type(exc).__name__}: {exc}") from exc
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()  # diffusers warns on every ``to(dtype=...)``, even a no-op one
    try:
        for net in (model.unet, model.vae):
            if net is not None:
                net.to(device)
                if dtype != torch.float32:
                    net.to(dtype)
    finally:
        dlogging.set_verbosity(level)
    return model


def model_from_pipeline(pipe: Any, source: str = "pipeline") -> Any:
    """:func:`hessdiff.model_from_pipeline` (kept here for the CLI's callers)."""
    from hessdiff.samplers.api import model_from_pipeline as _from_pipe

    return _from_pipe(pipe, source)


def _needs_text(model: Any) -> bool:
    return getattr(model.unet.config, "cross_attention_dim", None) is not None


def _model_root(source: str) -> Path:
    """Folder that holds the pipeline's sub-folders (local path, or the hub snapshot of the text parts)."""
    from hessdiff.samplers.models import _resolve_local

    local = _resolve_local(source)
    if local is not None:
        return local
    from huggingface_hub import snapshot_download

    patterns = ["model_index.json", "tokenizer/*", "text_encoder/config.json",
                "text_encoder/model.safetensors", "text_encoder/*.json"]
    return Path(snapshot_download(source, allow_patterns=patterns))


def text_conditioning(model: Any, prompt: str, negative_prompt: str = "") -> tuple[Tensor, Tensor] | None:
    """``(prompt, negative)`` text-encoder hidden states for a text-conditional UNet, or None.

    Reads ``tokenizer/`` and ``text_encoder/`` (a CLIP text model) from the model's folder or hub
    snapshot; both prompts are padded to the tokenizer's maximum length, as diffusers' Stable
    Diffusion pipelines do. Raises :class:`CLIError` when they are missing.
    """
    if not _needs_text(model):
        if prompt:
            raise CLIError(f"--prompt given, but {model.source or 'the model'} is not text-conditional")
        return None
    try:
        from hessdiff.samplers.models import ModelLoadError

        root = _model_root(model.source)
        try:
            from transformers import AutoTokenizer, CLIPTextModel
        except ImportError as exc:
            raise CLIError(f"{model.source} is text-conditional and needs the transformers package: "
                           'pip install "hessdiff[text]"') from exc

        tok_dir, enc_dir = root / "tokenizer", root / "text_encoder"
        if not tok_dir.is_dir() or not enc_dir.is_dir():
            raise CLIError(f"{model.source}: a text-conditional UNet needs tokenizer/ and text_encoder/ next to "
                           f"unet/ (looked in {root})")
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        encoder = CLIPTextModel.from_pretrained(str(enc_dir), local_files_only=True).eval()
    except CLIError:
        raise
    except ModelLoadError as exc:
        raise CLIError(str(exc)) from exc
    except Exception as exc:  # noqa: BLE001 - transformers / hub raise many types
        raise CLIError(f"{model.source}: cannot load the text encoder: {type(exc).__name__}: {exc}") from exc
    device = next(model.unet.parameters()).device
    encoder.to(device)

    def encode(text: str) -> Tensor:
        ids = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        with torch.no_grad():
            return encoder(ids)[0].float()

    return encode(prompt), encode(negative_prompt)


def make_denoiser(model: Any, *, prompt: str = "", negative_prompt: str = "", guidance_scale: float = 1.0) -> Any:
    """The model's UNet behind the denoiser contract (:class:`hessdiff.samplers.UNetDenoiser`).

    Text-conditional UNets get the prompt's hidden states (the empty prompt when none is given) and,
    with ``guidance_scale != 1``, classifier-free guidance against ``negative_prompt``.
    """
    from hessdiff.samplers.denoiser import UNetDenoiser

    cond = text_conditioning(model, prompt, negative_prompt)
    if cond is None:
        if guidance_scale != 1.0:
            raise CLIError("--guidance-scale needs a text-conditional model (e.g. Stable Diffusion)")
        return UNetDenoiser.from_unet_and_scheduler(model.unet, model.scheduler)
    pos, neg = cond
    if guidance_scale == 1.0:
        return UNetDenoiser.from_unet_and_scheduler(model.unet, model.scheduler, encoder_hidden_states=pos)
    return UNetDenoiser.from_unet_and_scheduler(model.unet, model.scheduler, encoder_hidden_states=pos,
                                                negative_encoder_hidden_states=neg, guidance_scale=guidance_scale)


def make_autoencoder(model: Any) -> Any:
    """The latent posterior samplers' ``autoencoder`` for a latent model:
    :class:`hessdiff.samplers.diffusers.pipeline.VAEAutoencoder` (float32 outputs whatever the VAE's dtype)."""
    if model.vae is None:
        raise ValueError(f"{model.source or 'this model'} is a pixel-space model and has no VAE")
    from hessdiff.samplers.diffusers.pipeline import VAEAutoencoder

    return VAEAutoencoder(model.vae, scaling_factor=model.vae_scaling_factor)


# ================================================================================ output folders
def task_name(name: str) -> str:
    """The registered task for a CLI task name: ``gaussian-blur`` and ``gaussian_blur`` are the same task."""
    from hessdiff.tasks import TASKS
    from hessdiff.utils.suggest import did_you_mean

    if name in TASKS:
        return name
    alt = name.replace("-", "_")
    if alt in TASKS:
        return alt
    known = [n.replace("_", "-") for n in TASKS]
    hint = did_you_mean(name.replace("_", "-"), known)
    raise CLIError(f"unknown task {name!r}; known tasks: {', '.join(known)}{hint}")


def check_output_folder(out: Path) -> None:
    """Refuse an output folder that is a file or lies under a file (before anything is computed)."""
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} exists and is not a folder")
    p = out
    while not p.exists() and p.parent != p:
        p = p.parent
    if p.exists() and not p.is_dir():
        raise CLIError(f"cannot create the output folder {out}: {p} is a file, not a folder")


class OutputDir:
    """An output folder checked before any work and written all-or-nothing.

    :meth:`prepare` refuses an ``--out`` that is a file, target files that already exist (unless
    ``overwrite``), and a folder that cannot be created or written (it creates the missing folders and
    writes and removes a probe file). :meth:`write` writes every file to a temporary name and renames
    them into place only when all succeeded (:func:`hessdiff.utils.files.atomic_write_many`; the files get
    the permissions of newly created files).
    :meth:`discard` removes the folders :meth:`prepare` created if they are still empty, so a failed
    run leaves nothing behind.
    """

    def __init__(self, path: str | os.PathLike, names: Iterable[str], *, overwrite: bool = False) -> None:
        self.path = Path(path)
        self.names = list(names)
        self.overwrite = overwrite
        self.created: list[Path] = []

    def target(self, name: str) -> Path:
        return self.path / name

    def prepare(self) -> None:
        out = self.path
        if out.exists() and not out.is_dir():
            raise CLIError(f"--out {out} exists and is not a folder")
        if not self.overwrite and out.is_dir():
            existing = [str(self.target(n)) for n in self.names if self.target(n).exists()]
            if existing:
                shown = ", ".join(existing[:4]) + (f" and {len(existing) - 4} more" if len(existing) > 4 else "")
                raise CLIError(f"refusing to overwrite {shown}; choose another --out or pass --overwrite")
        if out.is_dir():  # every target is checked before anything is written
            folders = [str(self.target(n)) for n in self.names if self.target(n).is_dir()]
            if folders:
                raise CLIError(f"cannot write {', '.join(folders)}: a folder of that name is in the way "
                               "(remove or rename it, or choose another --out)")
        # create the missing folders (remembered so that a failed run removes them again)
        missing: list[Path] = []
        p = out
        while not p.exists():
            missing.append(p)
            if p.parent == p:
                break
            p = p.parent
        if p.exists() and not p.is_dir():
            raise CLIError(f"cannot create the output folder {out}: {p} is a file, not a folder")
        for d in reversed(missing):
            try:
                d.mkdir()
            except OSError as exc:
                self.discard()
                raise CLIError(f"cannot create the output folder {out}: {exc.strerror or exc}") from exc
            self.created.append(d)
        if not os.access(out, os.W_OK | os.X_OK):
            self.discard()
            raise CLIError(f"the output folder {out} is not writable")
        try:
            fd, probe = tempfile.mkstemp(prefix=".hessdiff-write-test.", dir=out)
            os.close(fd)
            os.remove(probe)
        except OSError as exc:
            self.discard()
            raise CLIError(f"the output folder {out} is not writable: {exc.strerror or exc}") from exc

    def write(self, writers: dict[str, Callable[[Path], None]]) -> list[Path]:
        """Write ``{name: write(tmp_path)}`` into the folder atomically; returns the paths written."""
        from hessdiff.utils.files import atomic_write_many

        unknown = [n for n in writers if n not in self.names]
        if unknown:
            raise ValueError(f"OutputDir.write: {unknown} were not declared to prepare()")
        targets = {self.target(n): w for n, w in writers.items()}
        try:
            atomic_write_many(targets, overwrite=self.overwrite)
        except (FileExistsError, IsADirectoryError) as exc:
            raise CLIError(str(exc)) from exc
        return list(targets)

    def discard(self) -> None:
        """Remove the folders :meth:`prepare` created, deepest first, where they are empty."""
        for d in reversed(self.created):
            try:
                d.rmdir()
            except OSError:
                break
        self.created = []


def png_writer(picture: np.ndarray) -> Callable[[Path], None]:
    """A writer for :meth:`OutputDir.write`: the uint8 ``[H, W]`` or ``[H, W, 3]`` array as a PNG."""

    def write(tmp: Path) -> None:
        from PIL import Image

        Image.fromarray(picture).save(tmp, format="PNG")

    return write


# ================================================================================ progress
class StepProgress:
    """A tqdm bar over sampling steps, advanced by a sampler's ``callback(i, t, x, pred)``; silent when
    ``enabled`` is false. Writes to stderr, so that stdout keeps only the results."""

    def __init__(self, total: int, desc: str, enabled: bool = True) -> None:
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="step", leave=False, dynamic_ncols=True)

    def __call__(self, *args: Any) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> StepProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
