"""hessdiff.samplers: noise schedules, the denoiser contract, exact Gaussian-mixture oracles and
diffusion solvers (DDIM, DPM-Solver, DPM-Solver++, flow-matching Euler)."""

from .denoiser import (
    PREDICTION_TYPES,
    CallableDenoiser,
    Denoiser,
    Prediction,
    UNetDenoiser,
    convert_prediction,
)
from .loop import Cost, CountingDenoiser, Method, Proposal, Result, sample
from .oracles.gmm import (
    GaussianMixture,
    GMMDenoiser,
    GMMProblem,
    LinearAutoencoder,
    cifar_like_spectrum,
    grid_gmm_prior,
    grid_gmm_problem,
)
from .schedule import (
    ContinuousVPSchedule,
    DiscreteVPSchedule,
    FlowMatchingSchedule,
    NoiseSchedule,
    TimeGrid,
    schedule_from_config,
)
from .solvers import (
    SOLVERS,
    StepContext,
    StepCorrection,
    get_solver,
    randn_like,
    sample_ddim,
    sample_dpm_solver,
    sample_dpm_solver_pp,
    sample_flow_euler,
)

__all__ = [
    "PREDICTION_TYPES", "CallableDenoiser", "CountingDenoiser", "Cost", "Method", "Proposal", "Result",
    "sample", "Denoiser", "Prediction", "UNetDenoiser",
    "convert_prediction", "GaussianMixture", "GMMDenoiser", "GMMProblem", "LinearAutoencoder",
    "cifar_like_spectrum", "grid_gmm_prior", "grid_gmm_problem", "ContinuousVPSchedule", "DiscreteVPSchedule",
    "FlowMatchingSchedule", "NoiseSchedule", "TimeGrid", "schedule_from_config", "SOLVERS", "StepContext",
    "StepCorrection", "get_solver", "randn_like", "sample_ddim", "sample_dpm_solver", "sample_dpm_solver_pp",
    "sample_flow_euler",
]
