"""The one sampling loop: every method is a ``step`` over the denoiser contract.

:func:`sample` owns what every method shares -- input checks, the dtype policy (float32, float64 for
float64 inputs, whatever the network's dtype), per-sample generators, the callback, the progress
bar, cost counting, wall clock and memory -- and calls ``method.step(run, x, i)`` once per grid
interval. A method is a small object (:class:`Method`): DDIM, each DPM-Solver order and flow Euler in
:mod:`hessdiff.samplers.solvers`; DPS, latent DPS, PSLD and STSL in :mod:`hessdiff.samplers.guidance`.

What a step sees is a :class:`Run`: the counted denoiser (``run.denoise``), the grid point
(``run.point(i)``), the generators, the optional autoencoder (``run.decode`` / ``run.encode``, counted)
and, for solvers, the two hooks:

* ``correction`` (e.g. LML): a solver proposes ``x_next = offset + scale * g``, with ``g`` the update
  vector its paper preconditions (DDIM: the noise estimate of the direction term; DPM-Solver: the whole
  increment; flow Euler: the velocity), and hands the :class:`Proposal` -- current point, prediction,
  the proposed update -- to ``correction(proposal) -> g'``; the step then takes ``offset + scale * g'``.
* ``corrector``: called after each step that lands at ``sigma > 0`` as ``corrector(x, ctx) -> x``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from .denoiser import Prediction, compute_dtype
from .schedule import TimeGrid

__all__ = [
    "GeneratorArg",
    "randn_like",
    "StepContext",
    "Proposal",
    "StepCorrection",
    "Corrector",
    "Callback",
    "Cost",
    "CountingDenoiser",
    "Run",
    "Method",
    "Result",
    "sample",
    "check_inputs",
    "progress_range",
]

GeneratorArg = torch.Generator | Sequence[torch.Generator] | None
Callback = Callable[[int, Tensor, Tensor, Prediction], None]


def randn_like(x: Tensor, generator: GeneratorArg = None) -> Tensor:
    """Standard normal noise shaped like ``x``; with a list of generators, sample ``i`` uses
    generator ``i`` (so a sample's noise does not depend on the batch it is in)."""
    if generator is None:
        return torch.randn(x.shape, dtype=x.dtype, device=x.device)
    if isinstance(generator, torch.Generator):
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=generator.device)
        return z.to(x.device)
    gens = list(generator)
    if len(gens) != x.shape[0]:
        raise ValueError(f"got {len(gens)} generators for a batch of {x.shape[0]}")
    return torch.cat([randn_like(x[i : i + 1], g) for i, g in enumerate(gens)])


# ------------------------------------------------------------------------------------------ hooks
@dataclass
class StepContext:
    """Grid step ``i`` (from point ``i`` to ``i + 1``) as a corrector sees it."""

    i: int
    num_steps: int
    t: Tensor  # model time at point i (scalar tensor)
    alpha: float  # at point i
    sigma: float
    alpha_next: float  # at point i + 1
    sigma_next: float
    x: Tensor  # state at point i (compute dtype)
    pred: Prediction  # denoiser output at (x, t)
    denoiser: Any = None
    generator: GeneratorArg = None


def _no_first_order(x0: Tensor, eps: Tensor) -> Tensor:
    raise NotImplementedError("this proposal has no first-order form")


@dataclass
class Proposal(StepContext):
    """A base solver's proposed step ``x_next = offset + scale * g``.

    ``g`` is the update vector the solver's paper preconditions; ``first_order(x0, eps)`` gives the
    ``g`` of the first-order (DDIM-equivalent) step from the same point in the same form, for
    corrections that replace a multistep update.
    """

    g: Tensor | None = None
    offset: Tensor | None = None
    scale: float = 1.0
    first_order: Callable[[Tensor, Tensor], Tensor] = _no_first_order

    def with_g(self, g: Tensor) -> Proposal:
        return replace(self, g=g)


@runtime_checkable
class StepCorrection(Protocol):
    """A map of a solver's proposed update vector, e.g. the LML Levenberg--Marquardt correction."""

    def reset(self) -> None: ...

    def __call__(self, proposal: Proposal) -> Tensor: ...


Corrector = Callable[[Tensor, StepContext], Tensor]


# ------------------------------------------------------------------------------------------- cost
@dataclass
class Cost:
    """What a sampling run spent.

    * ``network_forward`` / ``network_backward``: denoiser network evaluations and vector-Jacobian
      products through it (one per batched call, whatever the batch size; a classifier-free-guidance
      pair inside the denoiser counts once). ``network_jvp``: Jacobian-vector products of ``x0_hat``
      (forward mode, or the oracle's closed form).
    * ``decoder_*`` / ``encoder_*``: the same for the autoencoder (latent methods). With decoder
      gradient checkpointing each decoder backward also recomputes one decoder forward, which is
      not added to ``decoder_forward``.
    * ``nfe``: network function evaluations *as the method's paper counts them*; ``nfe_convention``
      says how.
    * ``wall_time_s``: wall clock of the run (CUDA synchronised at both ends; argument checks excluded).
    * ``peak_memory_bytes`` / ``memory_measure``: on CUDA, ``torch.cuda.max_memory_allocated``
      during the run (the peak counter is reset at the start); on CPU, the process's peak resident
      set size at the end of the run -- a high-water mark since the process started, not the run's
      own peak; ``None`` where neither is available.
    """

    network_forward: int = 0
    network_backward: int = 0
    decoder_forward: int = 0
    decoder_backward: int = 0
    encoder_forward: int = 0
    encoder_backward: int = 0
    nfe: int = 0
    nfe_convention: str = ""
    wall_time_s: float = 0.0
    peak_memory_bytes: int | None = None
    memory_measure: str = ""
    network_jvp: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _CountBackward(torch.autograd.Function):
    """Identity whose backward increments ``cost.<field>``: placed on a network's input, it runs
    once per backward pass through that call (autograd sums every path before calling it)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, cost: Cost, name: str) -> Tensor:  # type: ignore[override]
        ctx.cost, ctx.name = cost, name
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        setattr(ctx.cost, ctx.name, getattr(ctx.cost, ctx.name) + 1)
        return g, None, None


class CountingDenoiser:
    """A denoiser (and optional autoencoder) that counts its passes into a :class:`Cost`.

    Calls return predictions in the input's dtype. ``jvp_x0`` counts one ``network_jvp`` and runs
    the inner denoiser's own closed form when it has one, else autodiff through it. Other
    attributes (``schedule``, ``hessian``, ...) are forwarded.
    """

    def __init__(self, inner: Any, autoencoder: Any | None = None, cost: Cost | None = None) -> None:
        self.inner = inner
        self.autoencoder = autoencoder
        self.cost = cost if cost is not None else Cost()

    def _mark(self, x: Tensor, name: str) -> Tensor:
        return _CountBackward.apply(x, self.cost, name) if x.requires_grad else x

    def __call__(self, x: Tensor, t: Tensor | float) -> Prediction:
        self.cost.network_forward += 1
        p = self.inner(self._mark(x, "network_backward"), t)
        return Prediction(eps=p.eps.to(x.dtype), x0=p.x0.to(x.dtype))

    denoise = __call__

    def jvp_x0(self, x: Tensor, t: Tensor | float, v: Tensor) -> Tensor:
        from .lml.curvature import denoiser_jvp

        self.cost.network_jvp += 1
        return denoiser_jvp(self.inner, x, t, v)

    @property
    def nfe(self) -> int:
        """Network forward passes (settable, e.g. ``counter.nfe = 0`` between runs)."""
        return self.cost.network_forward

    @nfe.setter
    def nfe(self, value: int) -> None:
        self.cost.network_forward = int(value)

    @property
    def extra(self) -> dict[str, int]:
        """The other evaluations by kind (``{"jvp_x0": n}``); assigning ``{}`` resets them."""
        return {"jvp_x0": self.cost.network_jvp} if self.cost.network_jvp else {}

    @extra.setter
    def extra(self, value: dict[str, int]) -> None:
        self.cost.network_jvp = int(value.get("jvp_x0", 0))

    @property
    def evaluations(self) -> int:
        """Forward passes plus JVPs: the count the benchmarks hold methods to."""
        return self.cost.network_forward + self.cost.network_jvp

    def decode(self, z: Tensor) -> Tensor:
        if self.autoencoder is None:
            return z
        self.cost.decoder_forward += 1
        return self.autoencoder.decode(self._mark(z, "decoder_backward"))

    def encode(self, x: Tensor, like: Tensor) -> Tensor:
        """Encode ``x``; the result is cast to ``like``'s dtype (pixel methods: identity)."""
        if self.autoencoder is None:
            return x
        self.cost.encoder_forward += 1
        return self.autoencoder.encode(self._mark(x, "encoder_backward")).to(like.dtype)

    def __getattr__(self, name: str) -> Any:
        if name in ("inner", "autoencoder", "cost"):
            raise AttributeError(name)
        return getattr(self.inner, name)


@contextmanager
def _measure(cost: Cost, device: torch.device):
    cuda = device.type == "cuda" and torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    try:
        yield
    finally:
        if cuda:
            torch.cuda.synchronize(device)
            cost.peak_memory_bytes = int(torch.cuda.max_memory_allocated(device))
            cost.memory_measure = "cuda_max_memory_allocated"
        else:
            try:
                import resource

                rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                cost.peak_memory_bytes = int(rss if sys.platform == "darwin" else rss * 1024)
                cost.memory_measure = "process_max_rss"
            except ImportError:  # pragma: no cover - non-POSIX
                cost.peak_memory_bytes, cost.memory_measure = None, "unavailable"
        cost.wall_time_s = time.perf_counter() - t0


# -------------------------------------------------------------------------------------------- run
class Run:
    """What a method's step sees: the counted denoiser and autoencoder, the grid, the generators and
    the solver hooks. ``run.state`` is a dict a method may keep per-run state in."""

    def __init__(self, denoiser: Any, grid: TimeGrid, *, autoencoder: Any | None = None,
                 generator: GeneratorArg = None, correction: StepCorrection | None = None,
                 corrector: Corrector | None = None) -> None:
        self.counted = CountingDenoiser(denoiser, autoencoder)
        self.grid, self.generator = grid, generator
        self.correction, self.corrector = correction, corrector
        self.num_steps = grid.num_steps
        self.state: dict[str, Any] = {}

    @property
    def cost(self) -> Cost:
        return self.counted.cost

    @property
    def autoencoder(self) -> Any | None:
        return self.counted.autoencoder

    def point(self, i: int) -> tuple[Tensor, float, float, float, float]:
        """``(t_i, alpha_i, sigma_i, alpha_{i+1}, sigma_{i+1})`` as Python floats (``t`` a tensor)."""
        g = self.grid
        return g.t[i], float(g.alpha[i]), float(g.sigma[i]), float(g.alpha[i + 1]), float(g.sigma[i + 1])

    def denoise(self, x: Tensor, t: Tensor | float) -> Prediction:
        return self.counted(x, t)

    def decode(self, z: Tensor) -> Tensor:
        return self.counted.decode(z)

    def encode(self, x: Tensor, like: Tensor) -> Tensor:
        return self.counted.encode(x, like)

    def context(self, i: int, x: Tensor, pred: Prediction) -> StepContext:
        t, a, s, an, sn = self.point(i)
        return StepContext(i, self.num_steps, t, a, s, an, sn, x, pred, self.counted, self.generator)

    def propose(self, i: int, x: Tensor, pred: Prediction, offset: Tensor, scale: float, g: Tensor,
                first_order: Callable[[Tensor, Tensor], Tensor] = _no_first_order) -> Tensor:
        """``offset + scale * g``, with ``g`` first passed through the correction (if any)."""
        if self.correction is not None:
            t, a, s, an, sn = self.point(i)
            g = self.correction(Proposal(i, self.num_steps, t, a, s, an, sn, x, pred, self.counted, self.generator,
                                         g=g, offset=offset, scale=scale, first_order=first_order))
        return offset + scale * g

    def correct(self, i: int, x: Tensor, pred: Prediction) -> Tensor:
        """The corrector after step ``i`` (skipped after the last step and at ``sigma = 0``)."""
        if self.corrector is None or i + 1 >= self.num_steps:
            return x
        g = self.grid
        an, sn = float(g.alpha[i + 1]), float(g.sigma[i + 1])
        if not sn > 0:
            return x
        ctx = StepContext(i + 1, self.num_steps, g.t[i + 1], an, sn, an, sn, x, pred, self.counted, self.generator)
        return self.corrector(x, ctx)


class Method:
    """A sampling method: ``step(run, x, i) -> (x_next, prediction)`` from grid point ``i`` to ``i + 1``.

    ``start`` may check the run and transform the initial state (e.g. STSL's initialisation);
    ``nfe`` reports the evaluations as the method's paper counts them (default: network forwards
    plus JVPs). Methods keep their per-run state in ``run.state``.
    """

    name = "method"
    nfe_convention = "network evaluations (forward passes and Jacobian-vector products)"

    def start(self, run: Run, x: Tensor) -> Tensor:
        return x

    def step(self, run: Run, x: Tensor, i: int) -> tuple[Tensor, Prediction]:
        raise NotImplementedError

    def nfe(self, run: Run) -> int:
        return run.cost.network_forward + run.cost.network_jvp

    def info(self, run: Run) -> dict[str, Any]:
        return {}


@dataclass
class Result:
    """``samples``: final states (latents for latent methods) in the input's dtype; ``images``: the
    decoded samples (``samples`` itself without an autoencoder); ``cost``: the :class:`Cost`."""

    samples: Tensor
    images: Tensor
    cost: Cost
    info: dict[str, Any] = field(default_factory=dict)


def check_inputs(x: Tensor, grid: TimeGrid) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(grid, TimeGrid):
        raise TypeError(f"grid must be a TimeGrid (see NoiseSchedule.grid), got {type(grid).__name__}")
    if not torch.is_floating_point(x):
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError("the starting sample x contains NaN or Inf")


def progress_range(n: int, enabled: bool, desc: str) -> Any:
    if not enabled:
        return range(n)
    from tqdm.auto import tqdm

    return tqdm(range(n), desc=desc, leave=False)


def sample(denoiser: Any, x: Tensor, grid: TimeGrid, method: Method, *, autoencoder: Any | None = None,
           generator: GeneratorArg = None, correction: StepCorrection | None = None,
           corrector: Corrector | None = None, callback: Callback | None = None,
           progress: bool = False) -> Result:
    """Run ``method`` from ``x`` (the state at grid point 0) along ``grid``.

    ``generator``: one ``torch.Generator`` or one per sample (image ``i`` then depends on generator
    ``i`` only). ``autoencoder`` (``decode`` / ``encode``) for latent methods: ``images`` are then the
    decoded samples. ``correction`` / ``corrector``: the solver hooks (module docstring).
    ``callback(i, t_i, x_next, prediction)`` after every step.
    """
    check_inputs(x, grid)
    if correction is not None:
        correction.reset()
    run = Run(denoiser, grid, autoencoder=autoencoder, generator=generator, correction=correction,
              corrector=corrector)
    z = x.detach().to(compute_dtype(x.dtype)) if not x.requires_grad else x.to(compute_dtype(x.dtype))
    with _measure(run.cost, z.device):
        z = method.start(run, z)
        for i in progress_range(grid.num_steps, progress, method.name):
            z, pred = method.step(run, z, i)
            if callback is not None:
                callback(i, grid.t[i], z, pred)
        if autoencoder is None:
            images = z
        else:
            with torch.no_grad():
                images = run.decode(z.detach()).detach()
    run.cost.nfe = method.nfe(run)
    run.cost.nfe_convention = method.nfe_convention
    return Result(samples=z.to(x.dtype), images=images, cost=run.cost, info=method.info(run))
