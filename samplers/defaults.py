"""One defaults table per method, used by every entry point (``hessdiff restore``, the
:class:`~hessdiff.samplers.diffusers.pipeline.PosteriorSamplingPipeline`, :func:`hessdiff.restore`).

Each method has a ``published`` row (the paper's values, or the released code's where the paper gives
none) and ``recommended`` rows per model family (what our measurements chose, with where they come
from). :func:`method_defaults` picks the recommended row of the model's family when there is one and the
published row otherwise, so the same model, image and method give the same result from every entry
point. ``steps`` is the default number of sampling steps; the other keys are the sampler's options.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DEFAULTS", "EMBEDDED_FAMILIES", "method_defaults", "model_family"]

#: method -> row -> options (+ ``steps``); a row named after a model family is that family's recommendation
DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "dps": {
        # Chung et al. 2023, 1000 DDPM steps, images in [-1, 1]; zeta 0.3 for super-resolution and blur
        # (0.5 for inpainting); the released code clamps x0_hat to [-1, 1]
        "published": {"steps": 1000, "zeta": 0.3, "clip_x0": 1.0, "ddim_eta": 1.0},
        # a small search on 16 held-out digits, 12x12 box inpainting, 50 steps (README, BENCHMARKS.md)
        "mnist": {"steps": 50, "zeta": 2.0, "ddim_eta": 1.0},
    },
    "latent_dps": {
        # the PSLD paper's LDPS baseline (PSLD with gamma = 0), 1000 DDIM steps
        "published": {"steps": 1000, "zeta": 1.0, "ddim_eta": 0.0},
        "mnist": {"steps": 50, "zeta": 2.0, "ddim_eta": 1.0},
    },
    "psld": {
        # Rout et al. 2023: gamma 0.1, omega 1 (box inpainting: 0.01 and 0.1), 1000 DDIM steps
        "published": {"steps": 1000, "gamma": 0.1, "omega": 1.0, "ddim_eta": 0.0},
        "mnist": {"steps": 50, "gamma": 0.1, "omega": 1.0, "ddim_eta": 1.0},
    },
    "stsl": {
        # Rout et al. 2024: eta 0.02, K = 5 inner steps, 50 DDIM steps; lam has no published value
        # ("O(1/sigma_y^2)" with the step size folded in): 1.0 is a placeholder to tune per task
        "published": {"steps": 50, "lam": 1.0, "eta": 0.02, "inner_steps": 5},
        # the squared data term with a constant step diverges in the first, noisiest steps on the
        # embedded models; the unsquared one with 2 inner steps and ancestral steps measured best
        "mnist": {"steps": 50, "lam": 1.0, "inner_steps": 2, "data_norm": "unsquared", "ddim_eta": 1.0},
    },
    "mmps": {
        # Rozet et al. 2024 (mmps-benchmark): DDIM eta = 1, 5 GMRES iterations, x0_hat clamped to [-1, 1];
        # 10 steps was their best on SR x4 and motion deblur, 100 steps the second table row
        "published": {"steps": 100, "iterations": 5, "solver": "gmres", "ddim_eta": 1.0, "clip_x0": 1.0},
    },
}

#: embedded model name -> family (hub ids and folders have no family: their rows are the published ones)
#: (the embedded Fashion-MNIST models are the same size and image format: they use the rows tuned on MNIST)
EMBEDDED_FAMILIES: dict[str, str] = {"mnist": "mnist", "mnist-ddpm": "mnist", "mnist-ldm": "mnist",
                                     "fashion": "mnist", "fashion-ddpm": "mnist", "fashion-ldm": "mnist"}


def model_family(source: str | None) -> str | None:
    """The family of a model named ``source``: an embedded name (with or without ``hessdiff/``), or the
    path of an embedded model's folder (as a pipeline loaded from it records in ``name_or_path``)."""
    if not source:
        return None
    name = str(source).removeprefix("hessdiff/")
    if name in EMBEDDED_FAMILIES:
        return EMBEDDED_FAMILIES[name]
    from pathlib import Path

    from .models import assets_path

    try:
        path = Path(name).resolve()
        inside = path.parent == (assets_path() / "models").resolve()
    except (OSError, ValueError):
        return None
    return EMBEDDED_FAMILIES.get(path.name) if inside else None


def method_defaults(method: str, family: str | None = None, row: str | None = None) -> dict[str, Any]:
    """The defaults of ``method``: ``row`` if given (``"published"`` or a family name), else the
    family's recommended row when it has one, else the published row. Returns a new dict with
    ``steps`` and the sampler options."""
    if method not in DEFAULTS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(DEFAULTS)}")
    rows = DEFAULTS[method]
    key = row if row is not None else (family if family in rows else "published")
    if key not in rows:
        raise ValueError(f"method {method!r} has no defaults row {key!r}; rows: {', '.join(rows)}")
    return dict(rows[key])
