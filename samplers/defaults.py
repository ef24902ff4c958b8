"""One defaults table per method, used by every entry point (``hessdiff restore``, the
:class:`~hessdiff.samplers.diffusers.pipeline.PosteriorSamplingPipeline`, :func:`hessdiff.restore`).

Each method has a ``published`` row (the paper's values, or the released code's where the paper gives
none) and ``recommended`` rows per model family (what our measurements chose, with where they come
from). :func:`method_defaults` picks the recommended row of the model's family when there is one and the
published row otherwise, so the same model, image and method give the same result from every entry
point. ``steps`` is the default number of sampling steps; the other keys are the sampler's options.

A row may also hold ``"tasks"``: per-task overrides where the paper (or its code) sets an option by task,
keyed by a task name of :data:`hessdiff.tasks.TASKS` or a group of them (:data:`TASK_GROUPS`); the group's
values apply first, then the task's own. They are applied when the task is known (``task=`` of
:func:`method_defaults`): ``hessdiff restore``, :func:`hessdiff.restore` (the measurement's task), the
pipeline and the sweeps.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DEFAULTS", "EMBEDDED_FAMILIES", "SAMPLER_DEFAULTS", "TASK_GROUPS", "default_method", "method_defaults",
           "model_family", "recommended_sampler", "task_overrides"]

#: groups of task names a row's ``"tasks"`` overrides may name (the papers set options per problem kind)
TASK_GROUPS: dict[str, tuple[str, ...]] = {
    "inpainting": ("box_inpainting", "random_inpainting", "freeform_inpainting", "mask_inpainting"),
    "deblurring": ("gaussian_blur", "motion_blur", "kernel_blur"),
}

#: method -> row -> options (+ ``steps``); a row named after a model family is that family's recommendation
DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "dps": {
        # Chung et al. 2023, 1000 DDPM steps, images in [-1, 1]; zeta 0.3 for super-resolution and blur,
        # 0.5 for inpainting (configs/*_config.yaml); the released code clamps x0_hat to [-1, 1]
        "published": {"steps": 1000, "zeta": 0.3, "clip_x0": 1.0, "ddim_eta": 1.0,
                      "tasks": {"inpainting": {"zeta": 0.5}}},
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
        "published": {"steps": 1000, "gamma": 0.1, "omega": 1.0, "ddim_eta": 0.0,
                      "tasks": {"box_inpainting": {"gamma": 0.01, "omega": 0.1}}},
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
        # 20 steps on the embedded models: on Fashion it matches or beats DPS at 100 steps at about the same
        # time (140 network passes against 200) and DPS at 1000 steps (40 images) at 1/13.5 of its time,
        # interleaved (fashion-posterior, fashion-mmps-dps1000 sweeps; BENCHMARKS.md)
        "mnist": {"steps": 20, "iterations": 5, "solver": "gmres", "ddim_eta": 1.0, "clip_x0": 1.0},
    },
    "tmpd": {
        # Boys et al. 2023 as run by mmps-benchmark (scripts/make_figures.sh, configs/diffusion_config.yaml): the
        # "TMPD 100" table row, DDIM eta = 1, x0_hat clamped to [-1, 1] (clip_denoised); the diagonal is azula's /
        # tmpdjax's A J A^T 1 (the benchmark's own variant solves with diag(J^T 1) in x space by 5 GMRES iterations)
        "published": {"steps": 100, "ddim_eta": 1.0, "clip_x0": 1.0},
    },
    "pigdm": {
        # Song et al. 2023 as run by mmps-benchmark (condition_methods.py::PseudoinverseGuided, from RED-diff
        # algos/pgdm.py): the "PiGDM 1000" table row, DDIM eta = 1, the released update (scaling="released":
        # + sqrt(abar_{t-1} abar_t) r_t^2 g on x_{t-1}), x0_hat clamped to [-1, 1] before the guidance, and 5
        # Krylov iterations of the measurement-space solve (GMRES there; CG here, the matrix is SPD)
        "published": {"steps": 1000, "ddim_eta": 1.0, "scaling": "released", "cg_iterations": 5, "clip_x0": 1.0},
    },
    "diffpir": {
        # Zhu et al. 2023, yuanzhi-zhu/DiffPIR: 100 steps (README table, FFHQ sigma 0.05), x0_hat clamped to
        # [-1, 1] (clip_denoised=True in utils/utils_model.py::model_fn); deblurring lambda = 7, zeta = 0.3
        # (main_ddpir_deblur.py / main_ddpir.py: lambda_ * 7, zeta * 3 over the configs' 1.0 and 0.1). The code's
        # lambda measures sigma_y on [0, 1] images, so on hessdiff's [-1, 1] scale lam = 7 / 4 (diffpir.py).
        # Inpainting (main_ddpir_inpainting.py): 20 steps, lambda 1, zeta 1; super-resolution
        # (main_ddpir_sisr.py): zeta 0.25 with lambda swept over 2..12 -- the deblurring 7 is in that range.
        "published": {"steps": 100, "lam": 7.0 / 4, "zeta": 0.3, "clip_x0": 1.0,
                      "tasks": {"inpainting": {"steps": 20, "lam": 1.0 / 4, "zeta": 1.0},
                                "super_resolution": {"zeta": 0.25}}},
    },
    "daps": {
        # Zhang et al. 2024, zhangbingliang2019/DAPS (branch legacy = the paper's code: config/sampler/edm_daps.yaml,
        # config/task/*.yaml lgvd_config; the "pixel" rows of main's configs/ agree): DAPS-1K = 200 annealing
        # levels x 5 Euler steps of the inner ODE (sigma_min 0.01), 100 Langevin steps, lr 1e-4 (5e-5 for box
        # inpainting and motion blur), lr_min_ratio 0.01, likelihood std tau = 0.01 (measurements have sigma 0.05)
        "published": {"steps": 200, "ode_steps": 5, "ode_sigma_min": 0.01, "langevin_steps": 100, "lr": 1e-4,
                      "lr_min_ratio": 0.01, "tau": 0.01,
                      "tasks": {"box_inpainting": {"lr": 5e-5}, "motion_blur": {"lr": 5e-5}}},
    },
}

#: embedded model name -> family (hub ids and folders have no family: their rows are the published ones)
#: (the embedded Fashion-MNIST models are the same size and image format: they use the rows tuned on MNIST)
EMBEDDED_FAMILIES: dict[str, str] = {"mnist": "mnist", "mnist-ddpm": "mnist", "mnist-ldm": "mnist",
                                     "fashion": "mnist", "fashion-ddpm": "mnist", "fashion-ldm": "mnist"}


#: unconditional sampling: model -> ``(max_steps, sampler, solver)`` rows, the first whose ``max_steps`` (None:
#: any) covers the step count is the recommendation (``hessdiff sample --sampler auto``); ``sampler`` is a
#: ``hessdiff sample`` name, ``solver`` the base of an ``lml-*`` sampler. ``published`` is for every other model
#: (diffusers' DPMSolverMultistepScheduler default). The embedded pixel models: the data-covariance step on
#: UniPC-2 (``lml_variant="cov"``, zero extra evaluations) up to 10 steps -- domain FID at NFE 5 / 6 / 8 / 10 on
#: Fashion 0.88 / 0.75 / 0.67 / 0.66 against the best base's 3.69 / 2.33 / 1.19 / 0.83 (beyond twice the
#: block spread at 5 and 6; on blocks of 1,000 at 8 and 10 too, 10 on the paired test), on MNIST
#: 1.86 / 1.68 / 1.54 against UniPC-2's 2.37 / 1.75 / 1.60 at 5 / 8 / 10;
#: plain UniPC-2 above, where the bases catch up (Fashion NFE 15 / 20: ties; BENCHMARKS.md, ``hessdiff bench
#: lml --parts embedded``). The latent models: on fashion-ldm the covariance step (of the VAE latents) pays at
#: NFE 5 (0.66 against 1.82) and ties from NFE 8 (+34 % at 6, within the spread); on mnist-ldm it never pays
#: (UniPC-2 is already at 0.36 at NFE 5)
SAMPLER_DEFAULTS: dict[str, tuple[tuple[int | None, str, str | None], ...]] = {
    "published": ((None, "dpm++", None),),
    "fashion": ((10, "lml-cov", "unipc"), (None, "unipc", None)),
    "mnist": ((10, "lml-cov", "unipc"), (None, "unipc", None)),
    "fashion-ldm": ((6, "lml-cov", "unipc"), (None, "unipc", None)),
    "mnist-ldm": ((None, "unipc", None),),
}


def recommended_sampler(model: str | None, steps: int) -> tuple[str, str | None]:
    """``(sampler, solver)`` recommended for ``model`` (an embedded name, with or without ``hessdiff/`` or
    ``-ddpm``, or an embedded model's folder; anything else gets the ``published`` row) at ``steps`` steps
    (:data:`SAMPLER_DEFAULTS`)."""
    name = (_embedded_name(model) or "").removesuffix("-ddpm")
    for max_steps, sampler, solver in SAMPLER_DEFAULTS.get(name, SAMPLER_DEFAULTS["published"]):
        if max_steps is None or steps <= max_steps:
            return sampler, solver
    raise AssertionError(f"the sampler defaults of {name!r} have no row for {steps} steps")  # last row: any


def default_method(is_latent: bool) -> str:
    """``dps`` for pixel-space models, ``stsl`` for latent models (the best-measuring methods on the
    embedded models with their recommended defaults)."""
    return "stsl" if is_latent else "dps"


def model_family(source: str | None) -> str | None:
    """The family of a model named ``source``: an embedded name (with or without ``hessdiff/``), or the
    path of an embedded model's folder (as a pipeline loaded from it records in ``name_or_path``)."""
    name = _embedded_name(source)
    return EMBEDDED_FAMILIES.get(name) if name else None


def _embedded_name(source: str | None) -> str | None:
    """The embedded model a source names (with or without ``hessdiff/``), or whose folder it is; else None."""
    if not source:
        return None
    name = str(source).removeprefix("hessdiff/")
    if name in EMBEDDED_FAMILIES:
        return name
    from pathlib import Path

    from .models import assets_path

    try:
        path = Path(name).resolve()
        inside = path.parent == (assets_path() / "models").resolve()
    except (OSError, ValueError):
        return None
    return path.name if inside and path.name in EMBEDDED_FAMILIES else None


def task_overrides(method: str, task: str | None, family: str | None = None, row: str | None = None
                   ) -> dict[str, Any]:
    """The per-task entries of ``method``'s row (see :func:`method_defaults`) that apply to ``task``:
    its group's first, then its own; ``{}`` for no task or none set."""
    if not task:
        return {}
    per_task = _row(method, family, row).get("tasks", {})
    out: dict[str, Any] = {}
    for group, names in TASK_GROUPS.items():
        if task in names:
            out.update(per_task.get(group, {}))
    out.update(per_task.get(task, {}))
    return out


def _row(method: str, family: str | None, row: str | None) -> dict[str, Any]:
    if method not in DEFAULTS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(DEFAULTS)}")
    rows = DEFAULTS[method]
    key = row if row is not None else (family if family in rows else "published")
    if key not in rows:
        raise ValueError(f"method {method!r} has no defaults row {key!r}; rows: {', '.join(rows)}")
    return rows[key]


def method_defaults(method: str, family: str | None = None, row: str | None = None,
                    task: str | None = None) -> dict[str, Any]:
    """The defaults of ``method``: ``row`` if given (``"published"`` or a family name), else the
    family's recommended row when it has one, else the published row; with ``task`` (a task name),
    the row's overrides for that task on top (:func:`task_overrides`). Returns a new dict with
    ``steps`` and the sampler options."""
    out = {k: v for k, v in _row(method, family, row).items() if k != "tasks"}
    out.update(task_overrides(method, task, family, row))
    return out
