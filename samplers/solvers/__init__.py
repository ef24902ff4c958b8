"""Base diffusion solvers: DDIM, multistep DPM-Solver / DPM-Solver++ (orders 1--3), UniPC, iPNDM, DEIS
(tAB) and flow-matching Euler, each a :class:`~hessdiff.samplers.loop.Method` step of
:func:`~hessdiff.samplers.loop.sample`.

The ``sample_*`` functions are the plain-call form: ``sample_x(denoiser, x, grid, *, ...,
generator=None, correction=None, corrector=None, callback=None, progress=False) -> Tensor``, with
``x`` the state at grid point 0 (for a VP schedule starting near pure noise, ``sigma_0 * randn``).
See :mod:`hessdiff.samplers.loop` for the correction and corrector hooks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from ..loop import Method, StepContext, StepCorrection, randn_like, sample
from ..schedule import TimeGrid
from .ddim import DDIM, ddim_step, ddim_variance
from .deis import DEIS, tab_coefficients
from .dpm import DPMSolver, dpm_orders
from .euler import FlowEuler
from .unipc import IPNDM, UniPC, unipc_coefficients

__all__ = [
    "DDIM", "DPMSolver", "FlowEuler", "UniPC", "IPNDM", "DEIS", "unipc_coefficients", "tab_coefficients",
    "sample_unipc", "sample_ipndm", "sample_deis",
    "ddim_step", "ddim_variance", "dpm_orders", "StepContext", "StepCorrection",
    "randn_like", "sample_ddim", "sample_dpm_solver", "sample_dpm_solver_pp", "sample_flow_euler", "SOLVERS",
    "get_solver", "make_solver",
]


def _run(method: Method, denoiser: Any, x: Tensor, grid: TimeGrid, **hooks: Any) -> Tensor:
    return sample(denoiser, x, grid, method, **hooks).samples


def sample_ddim(denoiser: Any, x: Tensor, grid: TimeGrid, *, eta: float = 0.0, **hooks: Any) -> Tensor:
    """DDIM (:class:`DDIM`) with stochasticity ``eta``; ``hooks``: ``generator``, ``correction``,
    ``corrector``, ``callback``, ``progress``."""
    return _run(DDIM(eta), denoiser, x, grid, **hooks)


def sample_dpm_solver(denoiser: Any, x: Tensor, grid: TimeGrid, *, order: int = 3, algorithm: str = "dpmsolver++",
                      solver_type: str = "midpoint", lower_order_final: bool = True, **hooks: Any) -> Tensor:
    """Multistep DPM-Solver / DPM-Solver++ (:class:`DPMSolver`)."""
    return _run(DPMSolver(order, algorithm, solver_type, lower_order_final), denoiser, x, grid, **hooks)


def sample_dpm_solver_pp(denoiser: Any, x: Tensor, grid: TimeGrid, **kwargs: Any) -> Tensor:
    """DPM-Solver++ (data prediction); see :func:`sample_dpm_solver`. Default order 2 (2M)."""
    kwargs.setdefault("order", 2)
    return sample_dpm_solver(denoiser, x, grid, algorithm="dpmsolver++", **kwargs)


def sample_flow_euler(denoiser: Any, x: Tensor, grid: TimeGrid, **hooks: Any) -> Tensor:
    """Euler on the flow-matching ODE (:class:`FlowEuler`)."""
    return _run(FlowEuler(), denoiser, x, grid, **hooks)


def sample_unipc(denoiser: Any, x: Tensor, grid: TimeGrid, *, order: int = 2, variant: str = "bh2",
                 predict_x0: bool = True, lower_order_final: bool = True, **hooks: Any) -> Tensor:
    """UniPC (:class:`UniPC`), diffusers' ``UniPCMultistepScheduler`` defaults (bh2, order 2)."""
    return _run(UniPC(order, variant, predict_x0, lower_order_final), denoiser, x, grid, **hooks)


def sample_ipndm(denoiser: Any, x: Tensor, grid: TimeGrid, *, order: int = 4, **hooks: Any) -> Tensor:
    """iPNDM (:class:`IPNDM`), order 4 with a lower-order warm start."""
    return _run(IPNDM(order), denoiser, x, grid, **hooks)


def sample_deis(denoiser: Any, x: Tensor, grid: TimeGrid, *, order: int = 3, lower_order_final: bool = False,
                **hooks: Any) -> Tensor:
    """DEIS-tAB``order`` (:class:`DEIS`), default tAB3, in the denoiser's schedule time."""
    return _run(DEIS(order, lower_order_final), denoiser, x, grid, **hooks)


def _dpm3(denoiser: Any, x: Tensor, grid: TimeGrid, **kw: Any) -> Tensor:
    kw.setdefault("order", 3)
    return sample_dpm_solver(denoiser, x, grid, algorithm="dpmsolver", **kw)


#: name -> solver function (all take ``denoiser, x, grid`` and the common keywords)
SOLVERS: dict[str, Callable[..., Tensor]] = {
    "ddim": sample_ddim,
    "dpm": _dpm3,
    "dpm++": sample_dpm_solver_pp,
    "euler": sample_flow_euler,
    "unipc": sample_unipc,
    "ipndm": sample_ipndm,
    "deis": sample_deis,
}

_METHODS: dict[str, Callable[..., Method]] = {
    "ddim": DDIM,
    "dpm": lambda **kw: DPMSolver(**{"order": 3, **kw, "algorithm": "dpmsolver"}),
    "dpm++": lambda **kw: DPMSolver(**{"order": 2, **kw, "algorithm": "dpmsolver++"}),
    "euler": FlowEuler,
    "unipc": UniPC,
    "ipndm": IPNDM,
    "deis": DEIS,
}


def _unknown(name: str) -> ValueError:
    return ValueError(f"unknown solver {name!r}; available: {', '.join(SOLVERS)}")


def get_solver(name: str) -> Callable[..., Tensor]:
    try:
        return SOLVERS[name]
    except KeyError:
        raise _unknown(name) from None


def make_solver(name: str, **options: Any) -> Method:
    """The solver ``name`` (a key of :data:`SOLVERS`) as a loop method, e.g. ``make_solver("dpm++", order=3)``."""
    if name not in _METHODS:
        raise _unknown(name)
    return _METHODS[name](**options)
