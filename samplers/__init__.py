"""hessdiff.samplers: noise schedules, the denoiser contract, exact Gaussian-mixture oracles and
diffusion solvers (DDIM, DPM-Solver, DPM-Solver++, flow-matching Euler).

The names below are imported from their submodules on first use, so that importing a light submodule
(``hessdiff.samplers.defaults``, e.g. for ``hessdiff --help``) does not import torch."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("PREDICTION_TYPES", "CallableDenoiser", "Denoiser", "Prediction", "UNetDenoiser",
                     "convert_prediction"), ".denoiser"),
    **dict.fromkeys(("Cost", "CountingDenoiser", "Method", "Proposal", "Result", "sample"), ".loop"),
    **dict.fromkeys(("GaussianMixture", "GMMDenoiser", "GMMProblem", "LinearAutoencoder", "cifar_like_spectrum",
                     "grid_gmm_prior", "grid_gmm_problem"), ".oracles.gmm"),
    **dict.fromkeys(("ContinuousVPSchedule", "DiscreteVPSchedule", "FlowMatchingSchedule", "NoiseSchedule",
                     "TimeGrid", "schedule_from_config"), ".schedule"),
    **dict.fromkeys(("SOLVERS", "StepContext", "StepCorrection", "get_solver", "randn_like", "sample_ddim",
                     "sample_dpm_solver", "sample_dpm_solver_pp", "sample_flow_euler"), ".solvers"),
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
