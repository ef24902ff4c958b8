"""diffusers drop-in schedulers with the published LML correction.

Four subclasses of diffusers' own schedulers; the correction math lives in
:func:`hessdiff.samplers.lml.lm_correct` and nothing of diffusers' solver code is copied:

* :class:`LMLDDIMScheduler` (``DDIMScheduler``): the noise estimate of the direction term is
  corrected, ``x_prev = sqrt(abar_prev) x0_hat + c eps' (+ noise)``; the stock ``step`` runs
  unchanged and ``c (eps' - eps)`` is added to its result, with
  ``c = sqrt(1 - abar_prev - std^2)`` (``x0_hat`` stays uncorrected, as in the released code).
* :class:`LMLDPMSolverMultistepScheduler` (``DPMSolverMultistepScheduler``, ``algorithm_type``
  ``"dpmsolver"`` or ``"dpmsolver++"``, orders 1--3): the stock update functions are called twice,
  once with zero model outputs (giving the exact ``(sigma_t/sigma_s) x`` or ``(alpha_t/alpha_s) x``
  part) and once with a zero sample (giving the exact increment); the result is
  ``base + LML(increment)``, the released arithmetic.
* :class:`LMLFlowMatchEulerDiscreteScheduler` (``FlowMatchEulerDiscreteScheduler``): the velocity
  is corrected before the stock ``step``, ``x_next = x + dt LML(v)``.
* :class:`LMLUniPCMultistepScheduler` (``UniPCMultistepScheduler``, ``bh1`` / ``bh2``, orders 1--3, data
  or noise prediction): the predictor (UniP) is split like DPM-Solver's update, once with a zero history
  (the exact ``(sigma_t/sigma_s) x`` or ``(alpha_t/alpha_s) x``) and once with a zero sample (the
  increment), and the increment is corrected; the corrector (UniC) runs unchanged -- what
  :class:`hessdiff.samplers.solvers.UniPC` does with a correction. With ``lml_variant="cov"`` this is the
  best measured zero-NFE method on the embedded pixel models at NFE 5 (BENCHMARKS.md: ``unipc-2+cov-ad``).

Each adds these config entries, registered through diffusers' ``register_to_config`` so that
``LMLDDIMScheduler.from_config(pipe.scheduler.config, lamb=1e-3)``, ``save_pretrained`` /
``from_pretrained`` and ``compatibles`` work as for the stock class:

* ``lamb`` (> 0): the damping ``lambda`` (default ``1e-3``, the published Stable Diffusion value);
* ``kappa`` (in ``[0, 1]``): the history weight (published: 0);
* ``precision``: ``"float32"`` (the published arithmetic) or ``"float64"`` (the exact operator);
* ``saturated``: what happens where the published map is saturated (``lamb`` below the resolution of
  ``|g|^2`` in the map's precision, see *Saturation* below): ``"keep"`` (default: that sample's update is
  left uncorrected, i.e. the stock scheduler's, and counted), ``"published"`` (the released arithmetic
  there too; only samples where it gives 0/0 are left uncorrected) or ``"raise"`` (``FloatingPointError``);
* ``lml_variant``: ``"published"`` (default: the rank-one map above), ``"secant"``, ``"stats"`` or ``"cov"``:
  the zero-NFE second-order variants of :class:`~hessdiff.samplers.lml.HessianStepCorrection` (local-Gaussian
  step, gain-ratio damping; float64; deterministic steps only) with the curvature of ``"secant"``: secants
  of consecutive steps (radial direction left to the base solver); ``"stats"``: the model's per-noise-level
  statistics (:class:`~hessdiff.samplers.lml.curvature.StatsSource`, a file ``lml_stats.safetensors``
  written by ``python -m hessdiff.scripts.lml_stats MODEL``); ``"cov"``: the data covariance
  (:class:`~hessdiff.samplers.lml.curvature.DataCovarianceSource`, a file ``lml_cov.safetensors`` written in
  seconds by ``python -m hessdiff.scripts.lml_stats MODEL --covariance``, no network evaluation); with
  ``"stats"`` and ``"cov"`` the whole step is corrected. Measured (BENCHMARKS.md, ``hessdiff bench lml``):
  on the embedded Fashion-MNIST model (v-prediction, cosine schedule; 1,000 samples in 5 seed blocks) the
  data covariance on UniPC-2 at NFE 5 cuts the domain FID from 3.69 to 0.88, while the model statistics make
  it worse (4.83): at the highest noise levels the network's Jacobian is mostly error, and transporting it
  to other levels multiplies that error by ``rho^2`` (``rho`` reaches 2e4 on the cosine schedule). On the
  exact grid-mixture oracles both cut the sliced W1 of the best of eight base solvers by 27-78 % at NFE 5-8
  in d = 80 and 800, but in d = 8 only at NFE 5 and are 26-41 % worse at NFE 6-10. ``lamb``/``kappa``/
  ``precision`` only concern the published map.
* ``lml_stats`` (``lml_variant="stats"`` or ``"cov"``): the path of the statistics (or covariance) file.
  Default ``None``: the file ``lml_stats.safetensors`` (``lml_cov.safetensors``) is looked for, when the
  scheduler is loaded with ``from_pretrained(folder, subfolder="scheduler")`` or inside
  ``DiffusionPipeline.from_pretrained(folder)``, in the scheduler's folder and then its parent (the model
  folder); a relative ``lml_stats`` is looked for in the same folders, then the working directory. Without a
  file the constructor raises :class:`LMLStatsNotFoundError` (a ``FileNotFoundError``) naming the paths it
  looked at. A file found this way is not written into the config; ``save_pretrained`` copies it next to the
  saved config, so a saved scheduler or pipeline folder loads again. A file whose recorded model fingerprint
  differs from the model folder it is found in (retrained weights) gives a warning.

The correction history is reset by ``set_timesteps`` (once per sampling run). The correction always
runs in float32 or float64, whatever the model's dtype (the released DDIM/DPM code computes in the
model's dtype, which in float16 destroys the sample; hessdiff upcasts).

What the published correction does (see :class:`~hessdiff.samplers.lml.LMLCorrection`): with
``kappa = 0`` it is the identity in exact arithmetic, and in float32 it adds rounding noise of
relative size about ``3.4e-8 |g|^2 / lamb`` per step.

Saturation (zero-terminal-SNR schedules, large samples). The published map is *saturated* for a sample
when ``lamb`` is below the resolution of ``|g|^2`` in the map's precision (``lamb + |g|^2 == |g|^2``; in
float32 about ``|g|^2 > 1.7e7 lamb``): ``g - g |g|^2 / (lamb + |g|^2)`` is then pure rounding residue and
the released code returns 0/0, or that residue rescaled to ``|g|`` (a few spikes as large as the whole
update), whatever ``lamb`` is (with ``kappa > 0`` the map there no longer depends on ``lamb`` either, and
is treated the same). DDIM's corrected noise estimate has ``|g|^2`` of about the number of sample
elements (3.7e4 for a 4x96x96 latent, above ``1.7e4`` at ``lamb = 1e-3``), and at a zero-terminal-SNR first
step (``rescale_betas_zero_snr=True`` with a grid starting at ``T - 1``, v-prediction) it is exactly
``x_T``; DPM-Solver's increment with epsilon prediction divides by ``alpha_T`` there. The drop-ins

* warn at ``set_timesteps`` when the grid starts at zero SNR (``alphas_cumprod < 1e-6`` at the first
  timestep) and ``precision="float32"``, naming what to do: ``precision="float64"`` (the exact operator,
  the identity for ``kappa = 0``) or a larger ``lamb``;
* never crash mid-run by default: with ``saturated="keep"`` a saturated sample's update is left
  uncorrected (the value of the exact operator for ``kappa = 0``), and in every mode a sample whose map
  gives 0/0 is left uncorrected rather than turned into NaN (``saturated="raise"`` raises instead);
* count both per sampling run (reset by ``set_timesteps``): :attr:`lml_saturated_count` (saturated
  sample-steps) and :attr:`lml_nonfinite_count` (sample-steps where the map gave 0/0), and warn once per run
  when either happens. Unsaturated steps keep the published arithmetic bit for bit.

Saving and loading pipelines. ``save_pretrained`` of a pipeline records a drop-in in ``model_index.json``
as ``["hessdiff.samplers.diffusers.schedulers", "LMLDDIMScheduler"]`` (its module path). diffusers
resolves such an entry from ``sys.modules`` only (it never imports a module a repository names) and then
looks for its loadable base classes (``SchedulerMixin``) *in that module*; this module therefore exposes
``SchedulerMixin``, and ``DDPMPipeline.from_pretrained(dir)`` / ``DiffusionPipeline.from_pretrained(dir)``
/ ``from_pretrained(dir, scheduler=...)`` give back the drop-in with its ``lamb`` etc. once this module
is imported (``import hessdiff.samplers.diffusers.schedulers``, or ``from hessdiff import
LMLDDIMScheduler``); in a process that has not imported it, diffusers says to import it.

Checked against diffusers 0.42.1 (the update-function signatures ``fn(model_output(s), *,
sample, noise)`` exist since diffusers 0.22).
"""

from __future__ import annotations

import contextvars
import inspect
import os
import shutil
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# SchedulerMixin must be an attribute of this module: diffusers' loader looks up the loadable base classes
# of a model_index.json entry ["hessdiff.samplers.diffusers.schedulers", "LML..."] in the entry's module
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    SchedulerMixin,  # noqa: F401
    UniPCMultistepScheduler,
)
from diffusers.configuration_utils import register_to_config
from torch import Tensor

from ..denoiser import Prediction
from ..lml import PRECISIONS, DataCovarianceSource, HessianStepCorrection, LMLCorrection, StatsSource
from ..lml import check_lamb_kappa as _check_lamb_kappa
from ..lml.lowrank import flat
from ..loop import Proposal
from ..models import LML_COV_FILE, LML_STATS_FILE

__all__ = [
    "LMLDDIMScheduler",
    "LMLDPMSolverMultistepScheduler",
    "LMLFlowMatchEulerDiscreteScheduler",
    "LMLUniPCMultistepScheduler",
    "LML_SCHEDULERS",
    "lml_scheduler_from",
    "LML_CONFIG_DEFAULTS",
    "LML_VARIANTS",
    "ZERO_SNR_ALPHAS_CUMPROD",
    "SATURATED",
    "LML_STATS_FILE",
    "LML_COV_FILE",
    "LML_VARIANT_FILES",
    "LMLStatsNotFoundError",
]

#: the config entries every LML scheduler adds to its base class's
LML_CONFIG_DEFAULTS: dict[str, Any] = {"lamb": 1e-3, "kappa": 0.0, "precision": "float32", "lml_variant": "published",
                                       "saturated": "keep", "lml_stats": None}

#: ``lml_variant`` values: the published rank-one map, or the zero-NFE Gaussian step with secant curvature, with
#: the model's per-level statistics, or with the data covariance
LML_VARIANTS = ("published", "secant", "stats", "cov")

#: variant -> (default file name, the lml_stats command that writes it): the statistics file of
#: ``lml_variant="stats"`` and the data-covariance file of ``"cov"``, looked for next to the scheduler config or
#: in its parent folder
LML_VARIANT_FILES = {"stats": (LML_STATS_FILE, "python -m hessdiff.scripts.lml_stats MODEL"),
                  "cov": (LML_COV_FILE, "python -m hessdiff.scripts.lml_stats MODEL --covariance")}

#: folders ``from_pretrained`` is loading from (the scheduler's, then its parent), seen by ``__init__``
_STATS_DIRS: contextvars.ContextVar[tuple[Path, ...]] = contextvars.ContextVar("hessdiff_lml_stats_dirs", default=())

#: model folders larger than this are not hashed to check a found statistics file's fingerprint
_FINGERPRINT_MAX_BYTES = 256 * 2**20


class LMLStatsNotFoundError(FileNotFoundError):
    """``lml_variant="stats"`` without a statistics file (the message names the paths looked at)."""


def _stats_dirs(path: Any, subfolder: str | None) -> tuple[Path, ...]:
    """The local folders a statistics file is looked for in: the scheduler config's folder, then its parent."""
    if path is None:
        return ()
    base = Path(path).expanduser()
    folder = base / subfolder if subfolder else base
    if not folder.is_dir():
        return ()  # a hub id: nothing local to look in
    folder = folder.resolve()
    return (folder, folder.parent)


def _find_stats(lml_stats: Any, dirs: tuple[Path, ...], variant: str = "stats") -> tuple[Path, bool]:
    """``(path, found)``: the file of ``lml_variant`` ``variant`` (``"stats"``: the statistics file, ``"cov"``:
    the data covariance; ``found``: located in ``dirs`` rather than given)."""
    name, command = LML_VARIANT_FILES[variant]
    what_file = "statistics file" if variant == "stats" else "data-covariance file"
    if lml_stats is not None and str(lml_stats) != "":
        p = Path(lml_stats).expanduser()
        cands = [p] if p.is_absolute() else [d / p for d in dirs] + [Path.cwd() / p]
        found = False
    else:
        cands = [d / name for d in dirs]
        found = True
    for c in cands:
        if c.is_file():
            return c, found
    how = f"`{command}` writes it next to a model (MODEL/{name})"
    if not cands:
        raise LMLStatsNotFoundError(
            f"lml_variant={variant!r} needs the model's {what_file} {name}, and none was looked for: "
            "no lml_stats path was given and the scheduler was not loaded from a folder. Pass lml_stats=PATH, or "
            "load it with from_pretrained(model_folder, subfolder='scheduler') / "
            "DiffusionPipeline.from_pretrained(model_folder) from a folder holding the file (next to the "
            f"scheduler config or one level up); {how}")
    what = f"lml_stats={str(lml_stats)!r}" if not found else name
    raise LMLStatsNotFoundError(
        f"lml_variant={variant!r}: no {what_file} {what}; looked at: {', '.join(str(c) for c in cands)}. "
        f"Pass lml_stats=PATH of an existing file; {how}")


def _check_fingerprint(stats: StatsSource, path: Path) -> None:
    """Warn when a statistics file found in a model folder was computed for other weights."""
    want = stats.metadata.get("model_fingerprint")
    model = path.parent.parent if path.parent.name == "scheduler" else path.parent
    if not want or not any((model / sub).is_dir() for sub in ("unet", "transformer")):
        return
    try:
        size = sum(f.stat().st_size for f in model.rglob("*") if f.is_file() and "checkpoint" not in f.parts)
        if size > _FINGERPRINT_MAX_BYTES:
            return
        from ..models import model_fingerprint

        have = model_fingerprint(model)
    except OSError:
        return
    if have != want:
        warnings.warn(f"{path}: these LML statistics were computed for other weights (model fingerprint "
                      f"{want[:12]}..., the model in {model} has {have[:12]}...); recompute them with "
                      f"`python -m hessdiff.scripts.lml_stats {model} --overwrite`", UserWarning,
                      stacklevel=_caller_stacklevel())

#: ``saturated`` values: leave saturated samples uncorrected, apply the released arithmetic, or raise
SATURATED = ("keep", "published", "raise")

#: ``set_timesteps`` warns when the grid's first ``alphas_cumprod`` is below this (zero terminal SNR)
ZERO_SNR_ALPHAS_CUMPROD = 1e-6


def _caller_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside this module and diffusers (the user's loop or pipeline)."""
    import diffusers

    skip = (os.path.abspath(__file__), os.path.dirname(os.path.abspath(diffusers.__file__)) + os.sep)
    frame, level = sys._getframe(1), 1
    while frame is not None:
        name = os.path.abspath(frame.f_code.co_filename)
        if name != skip[0] and not name.startswith(skip[1]):
            break
        frame, level = frame.f_back, level + 1
    return level


def _lml_init(base: type, defaults: dict[str, Any]) -> Callable[..., None]:
    """An ``__init__`` with the base class's signature plus ``defaults`` (keyword-only), decorated
    with ``register_to_config`` so the extra entries land in the config next to the base's."""
    raw = getattr(base.__init__, "__wrapped__", base.__init__)  # undecorated: register once, here
    sig = inspect.signature(raw)

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        extra = {k: kwargs.pop(k, v) for k, v in defaults.items()}
        raw(self, *args, **kwargs)
        self._lml_setup(**extra)

    params = [p for p in sig.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    var_kw = [p for p in sig.parameters.values() if p.kind == inspect.Parameter.VAR_KEYWORD]
    params += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v) for k, v in defaults.items()]
    __init__.__signature__ = sig.replace(parameters=params + var_kw)  # type: ignore[attr-defined]
    __init__.__doc__ = f"{base.__name__}'s arguments plus the LML entries {sorted(defaults)}."
    return register_to_config(__init__)


class _LMLMixin:
    """Shared state: one :class:`LMLCorrection` per scheduler, reset in ``set_timesteps``, and the
    saturation counters of the current sampling run."""

    config: Any
    _lml: LMLCorrection
    #: sample-steps of this run where ``lamb + |g|^2 == |g|^2`` in the correction's precision (saturated map)
    lml_saturated_count: int = 0
    #: sample-steps of this run where the published map gave 0/0 (left uncorrected)
    lml_nonfinite_count: int = 0

    def _lml_setup(self, lamb: float, kappa: float, precision: str, lml_variant: str = "published",
                   saturated: str = "keep", lml_stats: Any = None) -> None:
        _check_lamb_kappa(lamb, kappa)
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
        if lml_variant not in LML_VARIANTS:
            raise ValueError(f"unknown lml_variant {lml_variant!r}; expected one of {LML_VARIANTS}")
        if saturated not in SATURATED:
            raise ValueError(f"unknown saturated policy {saturated!r}; expected one of {SATURATED}")
        # 0/0 never becomes NaN mid-run: those samples keep their update (counted below)
        self._lml = LMLCorrection(float(lamb), float(kappa), precision, nonfinite="keep")
        # radial="exclude": on a trained network the Hessian-step variants that trust the Jacobian along x
        # destroy the samples (hessdiff bench lml --parts embedded); the drop-ins only ever run networks
        self._hstep: HessianStepCorrection | None = None
        #: the statistics file of lml_variant="stats" (None otherwise)
        self.lml_stats_path: Path | None = None
        self._lml_stats_found = False
        if lml_variant == "secant":
            self._hstep = HessianStepCorrection("secant", 1, adaptive=True, precision="float64", radial="exclude")
        elif lml_variant in ("stats", "cov"):
            path, found = _find_stats(lml_stats, _STATS_DIRS.get(), lml_variant)
            source = (StatsSource if lml_variant == "stats" else DataCovarianceSource).load(path)
            if found and lml_variant == "stats":  # a data covariance does not depend on the weights
                _check_fingerprint(source, path)
            self.lml_stats_path, self._lml_stats_found = path, found
            # radial="keep": data-averaged statistics and the data covariance are not the network's local Jacobian
            # along x; excluding the radial part made the step much worse on the exact oracles (hessdiff bench lml,
            # stats8-ad vs stats8-ad-perp). The covariance needs no network evaluation and is exact for Gaussian
            # data; on the embedded Fashion-MNIST model it beat the best base solver at NFE 5 beyond the seed
            # spread, and by less than the spread at NFE 8-10 (BENCHMARKS.md)
            self._hstep = HessianStepCorrection(source, adaptive=True, precision="float64", radial="keep")
        self._lml_reset_counts()

    def _lml_reset_counts(self) -> None:
        self.lml_saturated_count = 0
        self.lml_nonfinite_count = 0
        self._lml_warned = False

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any = None, subfolder: str | None = None,
                        return_unused_kwargs: bool = False, **kwargs: Any) -> Any:
        """diffusers' ``from_pretrained``; with ``lml_variant="stats"`` the statistics file is also looked for
        in the scheduler's folder and its parent (see the module doc)."""
        token = _STATS_DIRS.set(_stats_dirs(pretrained_model_name_or_path, subfolder))
        try:
            return super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder,  # type: ignore[misc]
                                           return_unused_kwargs=return_unused_kwargs, **kwargs)
        finally:
            _STATS_DIRS.reset(token)

    def save_pretrained(self, save_directory: Any, push_to_hub: bool = False, **kwargs: Any) -> None:
        """diffusers' ``save_pretrained``; a statistics file that was found (not named in the config) is
        copied next to the saved config, so that the saved folder loads again."""
        super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)  # type: ignore[misc]
        src = getattr(self, "lml_stats_path", None)
        if src is None or not self._lml_stats_found:
            return
        dst = Path(save_directory) / Path(src).name
        if dst.exists() and (dst.resolve() == Path(src).resolve() or dst.read_bytes() == Path(src).read_bytes()):
            return
        from hessdiff.utils.files import atomic_write

        atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp), overwrite=True)

    def _hessian_step(self, g: Tensor, scale: float, x: Tensor, x0: Tensor, eps: Tensor, alpha: float, sigma: float,
                     alpha_next: float, sigma_next: float) -> Tensor:
        """The Gaussian-step correction (secant or statistics curvature) of the update ``g`` of the step
        ``base + scale * g`` (``lml_variant="secant"`` / ``"stats"``), in float64."""
        assert self._hstep is not None
        i = int(getattr(self, "step_index", None) or 0)  # DDIMScheduler keeps no step index
        f64 = torch.float64
        prop = Proposal(i, len(self.timesteps), torch.tensor(float(i)), alpha, sigma, alpha_next, sigma_next,
                        x.to(f64), Prediction(eps=eps.to(f64), x0=x0.to(f64)), g=g.to(f64), scale=scale)
        return self._hstep(prop)

    @property
    def lml_dtype(self) -> torch.dtype:
        """The dtype the correction runs in."""
        return torch.float64 if self._lml.precision == "float64" else torch.float32

    def _lml_apply(self, g: Tensor) -> Tensor:
        """The correction of ``g`` in :attr:`lml_dtype` (the result stays in that dtype), with the
        ``saturated`` policy; counts, and warns once per run about, saturated and 0/0 samples."""
        g = g.to(self.lml_dtype)
        lamb = float(self.config.lamb)
        policy = self.config.get("saturated", "keep")
        n2 = (flat(g) * flat(g)).sum(1)  # the published map's |g|^2, in its precision
        saturated = (n2 + lamb) == n2  # lamb below the resolution of |g|^2: the map's output is rounding residue
        n_sat = int(saturated.sum())
        if n_sat and policy == "raise":
            raise FloatingPointError(
                f"{type(self).__name__}: the published LML map is saturated for {n_sat} of {g.shape[0]} sample(s): "
                f"|g|^2 up to {float(n2.max()):.3g} puts lamb={lamb:g} below the {self._lml.precision} resolution of "
                f"|g|^2; use precision='float64' or a lamb well above {float(n2.max()) * 2.0**-24:.2g} "
                "(or saturated='keep' to leave such samples uncorrected)")
        finite_in = int(torch.isfinite(flat(g)).all(1).sum())
        before = getattr(self._lml, "nonfinite_count", 0)
        out = self._lml(g)
        # rows that were already NaN/Inf come back unchanged and are not the map's doing
        n_bad = getattr(self._lml, "nonfinite_count", 0) - before - (g.shape[0] - finite_in)
        if n_sat and policy == "keep":
            out = torch.where(saturated.reshape((-1,) + (1,) * (g.ndim - 1)), g, out)
        if n_sat or n_bad > 0:
            self.lml_saturated_count += n_sat
            self.lml_nonfinite_count += max(n_bad, 0)
            if not getattr(self, "_lml_warned", False):
                self._lml_warned = True
                what = ("left uncorrected (saturated='keep')" if policy == "keep" else
                        "given the released arithmetic (saturated='published'), rounding noise as large as the "
                        f"update; {max(n_bad, 0)} gave 0/0 and were left uncorrected")
                warnings.warn(
                    f"{type(self).__name__}: the published LML map is saturated for {n_sat} of {g.shape[0]} "
                    f"sample(s) at this step (|g|^2 up to {float(n2.max()):.3g} puts lamb={lamb:g} below the "
                    f"{self._lml.precision} resolution of |g|^2): {what}. To correct them use precision='float64' "
                    f"(the exact operator) or a lamb well above |g|^2 * 2^-24 = {float(n2.max()) * 2.0**-24:.2g}; "
                    "this run's counts are in lml_saturated_count / lml_nonfinite_count.",
                    UserWarning, stacklevel=_caller_stacklevel())
        return out

    def _lml_first_alphas_cumprod(self) -> float | None:
        """``alphas_cumprod`` at the first timestep of the grid (``None`` where not defined)."""
        return None

    def _lml_sigmas_first_alphas_cumprod(self) -> float | None:
        """:meth:`_lml_first_alphas_cumprod` of the multistep schedulers' ``sigmas`` grid (none for flow sigmas)."""
        if self.config.get("use_flow_sigmas", False):
            return None
        alpha, _ = self._sigma_to_alpha_sigma_t(self.sigmas[0])
        return float(alpha) ** 2

    def _lml_multistep_update(self, base: Tensor, inc: Tensor, sample: Tensor, m: Tensor, data_prediction: bool,
                              evaluated: Tensor | None = None) -> Tensor:
        """``base + correction(inc)`` for a multistep update from ``sigmas[step_index]``: the published map of
        ``inc``, or the Gaussian step with ``x0_hat`` / the noise estimate from the converted model output ``m``
        (data or noise prediction) at the ``evaluated`` sample (default ``sample``), in float64."""
        if self._hstep is None:
            return (base.to(self.lml_dtype) + self._lml_apply(inc)).to(base.dtype)
        i = int(self.step_index)
        a_s, s_s = (float(v) for v in self._sigma_to_alpha_sigma_t(self.sigmas[i]))
        a_t, s_t = (float(v) for v in self._sigma_to_alpha_sigma_t(self.sigmas[i + 1]))
        m = m.to(torch.float64)
        x = sample.to(torch.float64)
        xe = x if evaluated is None else evaluated.to(torch.float64)
        if data_prediction:
            x0, eps = m, (xe - a_s * m) / s_s
        else:
            x0, eps = (xe - s_s * m) / a_s, m
        inc_c = self._hessian_step(inc, 1.0, x, x0, eps, a_s, s_s, a_t, s_t)
        return (base.to(torch.float64) + inc_c).to(base.dtype)

    def _lml_check_zero_snr(self) -> None:
        if self._hstep is not None or self._lml.precision != "float32":
            return
        abar = self._lml_first_alphas_cumprod()
        if abar is None or abar >= ZERO_SNR_ALPHAS_CUMPROD:
            return
        lamb = float(self.config.lamb)
        then = {"keep": "are left uncorrected (saturated='keep')",
                "published": "get the released arithmetic (saturated='published'; 0/0 ones are left uncorrected)",
                "raise": "raise FloatingPointError (saturated='raise')"}[self.config.get("saturated", "keep")]
        warnings.warn(
            f"{type(self).__name__}: this grid starts at zero terminal SNR (alphas_cumprod = {abar:.3g} at timestep "
            f"{int(self.timesteps[0])}; rescale_betas_zero_snr={self.config.get('rescale_betas_zero_snr', False)}). "
            "There the update the published float32 LML map corrects is large (DDIM: the noise estimate, x_T itself "
            "with v-prediction, |g|^2 about the number of sample elements; DPM-Solver with epsilon prediction: the "
            "x0 estimate divided by alpha_T) and the map saturates once |g|^2 > lamb * 2^24 "
            f"= {lamb * 2.0**24:.3g} (lamb={lamb:g}): its output is then rounding residue, or 0/0, whatever lamb is. "
            "To correct these steps use precision='float64' (the exact operator) or a larger lamb (above "
            f"|g|^2 / 1.7e7). Saturated samples {then}; this run counts them in lml_saturated_count "
            "(0/0 ones in lml_nonfinite_count).",
            UserWarning, stacklevel=_caller_stacklevel())

    def set_timesteps(self, *args: Any, **kwargs: Any) -> Any:
        out = super().set_timesteps(*args, **kwargs)  # type: ignore[misc]
        self._lml.reset()
        if self._hstep is not None:
            self._hstep.reset()
        self._lml_reset_counts()
        self._lml_check_zero_snr()
        return out


class LMLDDIMScheduler(_LMLMixin, DDIMScheduler):
    """``DDIMScheduler`` with the published LML correction of the noise estimate (see module doc).

    Works with every ``prediction_type`` DDIM supports (``epsilon``, ``sample``, ``v_prediction``),
    with ``eta > 0``, clipping and ``use_clipped_model_output`` (the corrected quantity is the
    ``pred_epsilon`` that diffusers' DDIM puts in the direction term).

    Zero terminal SNR (``rescale_betas_zero_snr=True``, ``timestep_spacing="trailing"``): the first
    noise estimate is ``x_T`` itself (v-prediction), ``|g|^2`` about the number of sample elements, so
    at ``lamb = 1e-3`` a latent of more than about 17,000 elements saturates the float32 map.
    ``set_timesteps`` warns; saturated samples take the stock DDIM step (``saturated="keep"``,
    counted in :attr:`lml_saturated_count`); ``precision="float64"`` corrects them exactly.
    """

    __init__ = _lml_init(DDIMScheduler, LML_CONFIG_DEFAULTS)

    def _lml_setup(self, lamb: float, kappa: float, precision: str, lml_variant: str = "published",
                   saturated: str = "keep", lml_stats: Any = None) -> None:
        pt = self.config.prediction_type
        if pt not in ("epsilon", "sample", "v_prediction"):
            raise ValueError(f"LMLDDIMScheduler: unsupported prediction_type {pt!r}; DDIM supports "
                             "'epsilon', 'sample', 'v_prediction'")
        super()._lml_setup(lamb, kappa, precision, lml_variant, saturated, lml_stats)

    def _lml_first_alphas_cumprod(self) -> float | None:
        return float(self.alphas_cumprod[int(self.timesteps[0])])

    def step(
        self,
        model_output: Tensor,
        timestep: int | Tensor,
        sample: Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: torch.Generator | None = None,
        variance_noise: Tensor | None = None,
        return_dict: bool = True,
    ) -> Any:
        out = super().step(model_output, timestep, sample, eta=eta, use_clipped_model_output=use_clipped_model_output,
                           generator=generator, variance_noise=variance_noise, return_dict=True)
        dt = self.lml_dtype
        abar = self.alphas_cumprod[timestep].to(dt)
        beta = 1 - abar
        x0 = out.pred_original_sample
        pt = self.config.prediction_type
        if use_clipped_model_output:
            eps = (sample.to(dt) - abar**0.5 * x0.to(dt)) / beta**0.5
        elif pt == "epsilon":
            eps = model_output
        elif pt == "sample":
            eps = (sample.to(dt) - abar**0.5 * model_output.to(dt)) / beta**0.5
        else:  # v_prediction
            eps = abar**0.5 * model_output.to(dt) + beta**0.5 * sample.to(dt)
        prev_t = timestep - self.config.num_train_timesteps // self.num_inference_steps
        abar_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        std = eta * self._get_variance(timestep, prev_t) ** 0.5
        coef = (1 - torch.as_tensor(abar_prev, dtype=dt) - torch.as_tensor(std, dtype=dt) ** 2) ** 0.5
        eps = eps.to(dt)
        if self._hstep is None:
            delta = coef * (self._lml_apply(eps) - eps)
        else:
            if eta > 0:
                raise ValueError(f"lml_variant={self.config.lml_variant!r} needs deterministic DDIM (eta = 0)")
            a2 = float(abar)
            an2 = float(abar_prev)
            sn = max(1 - an2, 0.0) ** 0.5
            eps_c = self._hessian_step(eps, sn, sample, x0, eps, a2**0.5, (1 - a2) ** 0.5, an2**0.5, sn)
            delta = coef * (eps_c.to(dt) - eps)
        prev = (out.prev_sample.to(dt) + delta).to(out.prev_sample.dtype)
        if not return_dict:
            return (prev, x0)
        out.prev_sample = prev
        return out


class LMLDPMSolverMultistepScheduler(_LMLMixin, DPMSolverMultistepScheduler):
    """``DPMSolverMultistepScheduler`` with the published LML correction of the solver increment.

    ``algorithm_type="dpmsolver"`` (noise prediction; the LML paper's CIFAR-10 base with
    ``solver_order=3``) and ``"dpmsolver++"``, orders 1--3, midpoint or heun; the SDE variants are
    not supported (the released code does not correct them).

    Zero terminal SNR (``rescale_betas_zero_snr=True``; diffusers clamps ``alphas_cumprod[-1]`` to
    ``2^-24``): ``set_timesteps`` warns when the grid starts there. With epsilon prediction the first
    increments carry the ``x0`` estimate divided by ``alpha_T = 2^-12`` (``|g|^2`` far above
    ``1.7e7 lamb``); saturated samples take the stock DPM-Solver step (``saturated="keep"``, counted in
    :attr:`lml_saturated_count`), ``saturated="published"`` gives the released rounding residue instead,
    ``saturated="raise"`` stops; ``precision="float64"`` corrects them exactly.
    """

    __init__ = _lml_init(DPMSolverMultistepScheduler, LML_CONFIG_DEFAULTS)

    def _lml_setup(self, lamb: float, kappa: float, precision: str, lml_variant: str = "published",
                   saturated: str = "keep", lml_stats: Any = None) -> None:
        algo = self.config.algorithm_type
        if algo not in ("dpmsolver", "dpmsolver++"):
            raise ValueError(f"LMLDPMSolverMultistepScheduler: unsupported algorithm_type {algo!r}; the LML "
                             "correction is defined for 'dpmsolver' and 'dpmsolver++'")
        super()._lml_setup(lamb, kappa, precision, lml_variant, saturated, lml_stats)

    def _lml_first_alphas_cumprod(self) -> float | None:
        return self._lml_sigmas_first_alphas_cumprod()

    def _lml_split(self, fn: Callable[..., Tensor], outputs: Any, args: tuple, sample: Tensor | None,
                   noise: Tensor | None, kwargs: dict[str, Any]) -> Tensor:
        if sample is None and len(args) > 2:  # legacy positional (timestep, prev_timestep, sample)
            sample, args = args[2], args[:2]
        if sample is None:
            raise ValueError("missing `sample` as a required keyword argument")
        if isinstance(outputs, list | tuple):
            zeros = [None if m is None else torch.zeros_like(m) for m in outputs]
        else:
            zeros = torch.zeros_like(outputs)
        base = fn(zeros, *args, sample=sample, noise=noise, **dict(kwargs))
        inc = fn(outputs, *args, sample=torch.zeros_like(sample), noise=noise, **dict(kwargs))
        return self._lml_multistep_update(base, inc, sample, self.model_outputs[-1],
                                          self.config.algorithm_type == "dpmsolver++")

    def dpm_solver_first_order_update(self, model_output: Tensor, *args: Any, sample: Tensor | None = None,
                                      noise: Tensor | None = None, **kwargs: Any) -> Tensor:
        return self._lml_split(super().dpm_solver_first_order_update, model_output, args, sample, noise, kwargs)

    def multistep_dpm_solver_second_order_update(self, model_output_list: list[Tensor], *args: Any,
                                                 sample: Tensor | None = None, noise: Tensor | None = None,
                                                 **kwargs: Any) -> Tensor:
        return self._lml_split(super().multistep_dpm_solver_second_order_update, model_output_list, args, sample,
                               noise, kwargs)

    def multistep_dpm_solver_third_order_update(self, model_output_list: list[Tensor], *args: Any,
                                                sample: Tensor | None = None, noise: Tensor | None = None,
                                                **kwargs: Any) -> Tensor:
        return self._lml_split(super().multistep_dpm_solver_third_order_update, model_output_list, args, sample,
                               noise, kwargs)


class LMLFlowMatchEulerDiscreteScheduler(_LMLMixin, FlowMatchEulerDiscreteScheduler):
    """``FlowMatchEulerDiscreteScheduler`` with the published LML correction of the velocity
    (the released FLUX setting used ``lamb = 1e-2``). The output keeps the model output's dtype,
    as the stock scheduler does. Saturated samples (``|v|^2 > 1.7e7 lamb`` in float32, e.g. large
    latents) take the stock Euler step (``saturated="keep"``, counted in :attr:`lml_saturated_count`,
    one warning per run); there is no zero-SNR warning, every flow grid starts at ``sigma = 1``."""

    __init__ = _lml_init(FlowMatchEulerDiscreteScheduler, LML_CONFIG_DEFAULTS)
    _compatibles = ["FlowMatchEulerDiscreteScheduler"]

    def step(self, model_output: Tensor, timestep: Any, sample: Tensor, *args: Any, return_dict: bool = True,
             **kwargs: Any) -> Any:
        if self._hstep is None:
            corrected = self._lml_apply(model_output)
        else:
            if self.step_index is None:
                self._init_step_index(timestep)
            i = int(self.step_index)
            sig, sig_n = float(self.sigmas[i]), float(self.sigmas[i + 1])
            v = model_output.to(torch.float64)
            x = sample.to(torch.float64)
            corrected = self._hessian_step(v, sig_n - sig, x, x - sig * v, x + (1 - sig) * v, 1 - sig, sig, 1 - sig_n,
                                           sig_n).to(torch.float32)
        out = super().step(corrected, timestep, sample, *args, return_dict=True, **kwargs)
        prev = out.prev_sample
        if kwargs.get("per_token_timesteps") is None:
            prev = prev.to(model_output.dtype)
        if not return_dict:
            return (prev,)
        out.prev_sample = prev
        return out


class LMLUniPCMultistepScheduler(_LMLMixin, UniPCMultistepScheduler):
    """``UniPCMultistepScheduler`` with the LML correction of the predictor's increment (see module doc).

    ``solver_type`` ``"bh1"`` / ``"bh2"``, ``solver_order`` 1--3, ``predict_x0`` true or false,
    ``disable_corrector``, ``lower_order_final``; not with ``solver_p`` (another scheduler as the predictor,
    whose step is not UniP). The corrector (UniC) is not corrected. The Gaussian-step variants
    (``"secant"``, ``"stats"``, ``"cov"``) read ``x0_hat`` and the noise estimate at the evaluated
    (uncorrected) sample and the step from the corrected one, as :class:`hessdiff.samplers.solvers.UniPC`.

    Zero terminal SNR: as :class:`LMLDPMSolverMultistepScheduler` (``set_timesteps`` warns with the published
    float32 map; saturated samples take the stock step, counted in :attr:`lml_saturated_count`).
    """

    __init__ = _lml_init(UniPCMultistepScheduler, LML_CONFIG_DEFAULTS)

    def _lml_setup(self, lamb: float, kappa: float, precision: str, lml_variant: str = "published",
                   saturated: str = "keep", lml_stats: Any = None) -> None:
        if getattr(self, "solver_p", None) is not None:
            raise ValueError("LMLUniPCMultistepScheduler: solver_p replaces the UniP predictor that the LML "
                             "correction acts on; use it without solver_p")
        super()._lml_setup(lamb, kappa, precision, lml_variant, saturated, lml_stats)
        self._lml_raw_sample: Tensor | None = None

    def _lml_first_alphas_cumprod(self) -> float | None:
        return self._lml_sigmas_first_alphas_cumprod()

    def step(self, model_output: Tensor, timestep: Any, sample: Tensor, *args: Any, generator: Any = None,
             **kwargs: Any) -> Any:
        # ``generator`` is accepted and unused (UniPC is deterministic), so that pipelines which pass one to every
        # scheduler, such as DDPMPipeline, run with it (the stock UniPCMultistepScheduler.step rejects it)
        self._lml_raw_sample = sample  # the evaluated sample, before UniC corrects it
        try:
            return super().step(model_output, timestep, sample, *args, **kwargs)
        finally:
            self._lml_raw_sample = None

    def multistep_uni_p_bh_update(self, model_output: Tensor, *args: Any, sample: Tensor | None = None,
                                  order: int | None = None, **kwargs: Any) -> Tensor:
        fn = super().multistep_uni_p_bh_update
        if sample is None and len(args) > 1:  # legacy positional (prev_timestep, sample, order)
            sample, args, order = args[1], args[:1], (args[2] if len(args) > 2 else order)
        if sample is None:
            raise ValueError("missing `sample` as a required keyword argument")
        inc = fn(model_output, *args, sample=torch.zeros_like(sample), order=order, **kwargs)
        history = self.model_outputs
        self.model_outputs = [None if m is None else torch.zeros_like(m) for m in history]
        try:  # a zero history leaves the exact (sigma_t / sigma_s) x or (alpha_t / alpha_s) x
            base = fn(torch.zeros_like(model_output), *args, sample=sample, order=order, **kwargs)
        finally:
            self.model_outputs = history
        return self._lml_multistep_update(base, inc, sample, history[-1], self.predict_x0, self._lml_raw_sample)


#: stock diffusers scheduler class name -> LML drop-in
LML_SCHEDULERS: dict[str, type] = {
    "DDIMScheduler": LMLDDIMScheduler,
    "DPMSolverMultistepScheduler": LMLDPMSolverMultistepScheduler,
    "FlowMatchEulerDiscreteScheduler": LMLFlowMatchEulerDiscreteScheduler,
    "UniPCMultistepScheduler": LMLUniPCMultistepScheduler,
}


def lml_scheduler_from(scheduler: Any, **lml_kwargs: Any) -> Any:
    """The LML drop-in for a stock scheduler (object or config), with ``lml_kwargs``
    (``lamb``, ``kappa``, ``precision``) added: ``pipe.scheduler = lml_scheduler_from(pipe.scheduler, lamb=1e-3)``.

    Raises ``ValueError`` for schedulers without an LML version.
    """
    cfg = scheduler.config if hasattr(scheduler, "config") else scheduler
    name = type(scheduler).__name__ if hasattr(scheduler, "config") else str(cfg.get("_class_name", ""))
    if not name:
        raise ValueError("this scheduler config has no _class_name; pass the scheduler object itself")
    for stock, lml_cls in LML_SCHEDULERS.items():
        if name == stock or name == lml_cls.__name__:
            return lml_cls.from_config(cfg, **lml_kwargs)
    raise ValueError(f"no LML version of scheduler {name!r}; supported: {', '.join(LML_SCHEDULERS)}")
