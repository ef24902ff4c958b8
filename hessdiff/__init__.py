"""hessdiff: second-order diffusion sampling (LML) and diffusion posterior sampling in PyTorch.

The public API (imported lazily, so ``import hessdiff`` is cheap):

* the denoiser contract and schedules: :class:`Prediction`, :class:`Denoiser`, :class:`UNetDenoiser`,
  :class:`DiscreteVPSchedule`, :class:`FlowMatchingSchedule`, :class:`TimeGrid`, :func:`schedule_from_config`;
* the one loop: :func:`sample` (``sample(denoiser, x, grid, method) -> Result``) with solver steps
  :class:`DDIM`, :class:`DPMSolver`, :class:`FlowEuler` (:func:`make_solver` by name) and the
  ``sample_*`` plain calls;
* posterior sampling: :func:`restore` on a model, the method registry :data:`POSTERIOR_SAMPLERS`
  (``sample_dps``, ``sample_latent_dps``, ``sample_psld``, ``sample_stsl``) and the defaults table
  :func:`method_defaults` (:func:`recommended_sampler` for unconditional sampling);
* LML: :class:`LMLCorrection`, :class:`HessianStepCorrection` (solver corrections) and the diffusers
  drop-ins :class:`LMLDDIMScheduler`, :class:`LMLDPMSolverMultistepScheduler`,
  :class:`LMLFlowMatchEulerDiscreteScheduler`, :class:`LMLUniPCMultistepScheduler`,
  :class:`PosteriorSamplingPipeline`;
* models and oracles: :func:`load_model`, :func:`model_from_pipeline`, :func:`embedded_model_path`,
  :class:`GaussianMixture`, :class:`GMMDenoiser`;
* tasks: :func:`make_task`, :data:`TASKS`; image files: :func:`load_image`.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("hessdiff")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"

_EXPORTS: dict[str, str] = {
    # contract and schedules
    "Prediction": "hessdiff.samplers.denoiser",
    "Denoiser": "hessdiff.samplers.denoiser",
    "UNetDenoiser": "hessdiff.samplers.denoiser",
    "DiscreteVPSchedule": "hessdiff.samplers.schedule",
    "ContinuousVPSchedule": "hessdiff.samplers.schedule",
    "FlowMatchingSchedule": "hessdiff.samplers.schedule",
    "TimeGrid": "hessdiff.samplers.schedule",
    "schedule_from_config": "hessdiff.samplers.schedule",
    # the loop and the solvers
    "sample": "hessdiff.samplers.loop",
    "Method": "hessdiff.samplers.loop",
    "Result": "hessdiff.samplers.loop",
    "Cost": "hessdiff.samplers.loop",
    "Proposal": "hessdiff.samplers.loop",
    "DDIM": "hessdiff.samplers.solvers",
    "DPMSolver": "hessdiff.samplers.solvers",
    "FlowEuler": "hessdiff.samplers.solvers",
    "make_solver": "hessdiff.samplers.solvers",
    "SOLVERS": "hessdiff.samplers.solvers",
    "sample_ddim": "hessdiff.samplers.solvers",
    "sample_dpm_solver": "hessdiff.samplers.solvers",
    "sample_dpm_solver_pp": "hessdiff.samplers.solvers",
    "sample_flow_euler": "hessdiff.samplers.solvers",
    # posterior sampling
    "restore": "hessdiff.samplers.api",
    "RestoreResult": "hessdiff.samplers.api",
    "model_from_pipeline": "hessdiff.samplers.api",
    "POSTERIOR_SAMPLERS": "hessdiff.samplers.guidance",
    "sample_dps": "hessdiff.samplers.guidance",
    "sample_latent_dps": "hessdiff.samplers.guidance",
    "sample_psld": "hessdiff.samplers.guidance",
    "sample_stsl": "hessdiff.samplers.guidance",
    "DEFAULTS": "hessdiff.samplers.defaults",
    "method_defaults": "hessdiff.samplers.defaults",
    "recommended_sampler": "hessdiff.samplers.defaults",
    # LML and diffusers
    "LMLCorrection": "hessdiff.samplers.lml",
    "HessianStepCorrection": "hessdiff.samplers.lml",
    "LMLDDIMScheduler": "hessdiff.samplers.diffusers.schedulers",
    "LMLDPMSolverMultistepScheduler": "hessdiff.samplers.diffusers.schedulers",
    "LMLFlowMatchEulerDiscreteScheduler": "hessdiff.samplers.diffusers.schedulers",
    "LMLUniPCMultistepScheduler": "hessdiff.samplers.diffusers.schedulers",
    "lml_scheduler_from": "hessdiff.samplers.diffusers.schedulers",
    "PosteriorSamplingPipeline": "hessdiff.samplers.diffusers.pipeline",
    # models, oracles, tasks
    "load_model": "hessdiff.samplers.models",
    "embedded_model_path": "hessdiff.samplers.models",
    "GaussianMixture": "hessdiff.samplers.oracles.gmm",
    "GMMDenoiser": "hessdiff.samplers.oracles.gmm",
    "grid_gmm_prior": "hessdiff.samplers.oracles.gmm",
    "make_task": "hessdiff.tasks",
    "TASKS": "hessdiff.tasks",
    "load_image": "hessdiff.utils.images",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hessdiff' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
