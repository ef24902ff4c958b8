"""Noise schedules: ``x_t = alpha_t * x0 + sigma_t * eps``.

A schedule maps a *model time* ``t`` (the number the network is conditioned on) to
``alpha_t``, ``sigma_t`` and the log-SNR ``lambda_t = log(alpha_t / sigma_t)``, and builds
the timestep grids that samplers walk. Three families cover what users meet in practice:

* :class:`DiscreteVPSchedule` -- the DDPM family used by diffusers checkpoints. Model time is
  the training index ``t in [0, T-1]``; fractional ``t`` interpolates ``log sigma/alpha``
  linearly (so log-SNR and Karras grids work too). Built from any diffusers scheduler config.
* :class:`ContinuousVPSchedule` -- ``alpha(t)``, ``sigma(t)`` given as functions of ``t in [0, 1]``
  (VP-SDE linear and cosine schedules are provided).
* :class:`FlowMatchingSchedule` -- rectified flow, ``alpha = 1 - s``, ``sigma = s``; model time is
  ``s * num_train_timesteps`` as in diffusers' flow-matching schedulers.

All schedule arithmetic is float64.

A :class:`TimeGrid` is what samplers consume: ``n + 1`` points (model time, alpha, sigma), from the
noisiest to the final, cleanest one. The final point is where sampling ends (alpha, sigma of the
returned sample); its ``t`` is only informative and is never passed to a network.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "TimeGrid",
    "NoiseSchedule",
    "DiscreteVPSchedule",
    "ContinuousVPSchedule",
    "FlowMatchingSchedule",
    "schedule_from_config",
    "flow_matching_reason",
    "SPACINGS",
]

SPACINGS = ("leading", "trailing", "linspace", "logsnr", "karras", "uniform", "quadratic")
_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


@dataclass(frozen=True)
class TimeGrid:
    """``n + 1`` points a sampler walks: model times and the matching ``alpha``/``sigma``.

    ``t[i]`` is passed to the denoiser at step ``i`` (``i < n``); ``alpha[n]``, ``sigma[n]`` say
    where the last step lands (``sigma[n] = 0`` means clean data).
    """

    t: Tensor
    alpha: Tensor
    sigma: Tensor

    def __post_init__(self) -> None:
        n = self.t.shape[0]
        if self.t.ndim != 1 or n < 2:
            raise ValueError(f"a TimeGrid needs at least 2 points (1 step); got t of shape {tuple(self.t.shape)}")
        if self.alpha.shape != (n,) or self.sigma.shape != (n,):
            raise ValueError(
                f"TimeGrid: t, alpha, sigma must have the same length; got {n}, "
                f"{tuple(self.alpha.shape)}, {tuple(self.sigma.shape)}"
            )
        if bool((self.sigma < 0).any()) or bool((self.alpha < 0).any()) or bool(((self.alpha + self.sigma) <= 0).any()):
            raise ValueError("TimeGrid: need alpha >= 0, sigma >= 0 and not both zero at every point")

    @property
    def num_steps(self) -> int:
        return self.t.shape[0] - 1

    @property
    def lambdas(self) -> Tensor:
        """log-SNR ``log(alpha/sigma)``; ``+inf`` where ``sigma == 0``."""
        return torch.log(self.alpha) - torch.log(self.sigma)

    def __len__(self) -> int:
        return self.num_steps


class NoiseSchedule:
    """Base class. Subclasses implement :meth:`alpha_sigma` and the grid helpers."""

    #: smallest and largest model time the network was trained on
    t_min: float
    t_max: float
    #: what ``x_t`` means for the network's output conversion: "vp" or "flow"
    kind: str = "vp"

    def _check_t(self, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        if torch.isnan(t).any():
            raise ValueError("timestep is NaN")
        lo, hi = self.t_min, self.t_max
        if bool((t < lo - 1e-9).any()) or bool((t > hi + 1e-9).any()):
            raise ValueError(
                f"timestep out of range: got {t.min().item():g}..{t.max().item():g}, "
                f"this schedule covers [{lo:g}, {hi:g}]"
            )
        return t

    def alpha_sigma(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def alpha(self, t: Tensor | float) -> Tensor:
        return self.alpha_sigma(t)[0]

    def sigma(self, t: Tensor | float) -> Tensor:
        return self.alpha_sigma(t)[1]

    def lambda_(self, t: Tensor | float) -> Tensor:
        """log-SNR ``log(alpha_t / sigma_t)``."""
        a, s = self.alpha_sigma(t)
        return torch.log(a) - torch.log(s)

    def rho(self, t: Tensor | float) -> Tensor:
        """``sigma_t / alpha_t`` (EDM's / the VE noise level ``exp(-lambda_t)``), the variable of the
        noise-prediction ODE ``d(x / alpha) / d rho = eps``."""
        a, s = self.alpha_sigma(t)
        return s / a

    def t_from_lambda(self, lam: Tensor) -> Tensor:
        """Model time with the given log-SNR (inverse of :meth:`lambda_`)."""
        raise NotImplementedError

    def grid_from_t(self, t: Tensor, final: Tensor | float | None = None) -> TimeGrid:
        """A grid through the model times ``t`` (descending); ``final`` is the end point's model
        time, or ``None`` for clean data (``sigma = 0``, ``alpha = 1``)."""
        t = self._check_t(torch.as_tensor(t, dtype=torch.float64).flatten())
        a, s = self.alpha_sigma(t)
        if final is None:
            fa = torch.ones(1, dtype=torch.float64)
            fs = torch.zeros(1, dtype=torch.float64)
            ft = torch.full((1,), -1.0, dtype=torch.float64)
        else:
            ft = self._check_t(torch.as_tensor(final, dtype=torch.float64).reshape(1))
            fa, fs = self.alpha_sigma(ft)
        return TimeGrid(torch.cat([t, ft]), torch.cat([a, fa]), torch.cat([s, fs]))

    def grid(
        self,
        num_steps: int,
        spacing: str = "trailing",
        *,
        final: str = "zero",
        rho: float = 7.0,
        **kwargs: Any,
    ) -> TimeGrid:
        raise NotImplementedError


def _check_steps(num_steps: int) -> None:
    if not isinstance(num_steps, int | np.integer) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")


def _karras_sigmas(smin: float, smax: float, n: int, rho: float) -> Tensor:
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    return (smax ** (1 / rho) + ramp * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho


def _quadratic_times(hi: float, lo: float, n: int) -> Tensor:
    """``n`` times from ``hi`` to ``lo`` (both >= 0) uniform in ``sqrt(t)`` (DEIS's quadratic time steps)."""
    if lo < 0:
        raise ValueError(f"the quadratic spacing needs t >= 0, got t_end = {lo:g}")
    ts = torch.linspace(math.sqrt(hi), math.sqrt(lo), n, dtype=torch.float64) ** 2
    ts[0], ts[-1] = hi, lo  # exact ends (sqrt(t)^2 rounds)
    return ts


class DiscreteVPSchedule(NoiseSchedule):
    """The discrete DDPM schedule of a diffusers checkpoint.

    ``alphas_cumprod`` is kept exactly as diffusers computes it (float32 cumulative product, then
    held as float64), so that samples match diffusers' schedulers to float64 rounding.
    """

    kind = "vp"

    def __init__(
        self,
        alphas_cumprod: Tensor,
        *,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        timestep_spacing: str = "leading",
    ) -> None:
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        if ac.numel() < 2:
            raise ValueError("alphas_cumprod needs at least 2 entries")
        if not bool(((ac > 0) & (ac <= 1)).all()):
            raise ValueError("alphas_cumprod must lie in (0, 1] (a zero-terminal-SNR schedule must be "
                             "clamped at its last step; see rescale_betas_zero_snr)")
        if timestep_spacing not in ("leading", "trailing", "linspace"):
            raise ValueError(f"unknown timestep_spacing {timestep_spacing!r}; expected leading, trailing or linspace")
        self.alphas_cumprod = ac
        self.num_train_timesteps = ac.numel()
        self.set_alpha_to_one = bool(set_alpha_to_one)
        self.steps_offset = int(steps_offset)
        self.timestep_spacing = timestep_spacing
        self.t_min, self.t_max = 0.0, float(self.num_train_timesteps - 1)
        # log(sigma/alpha) table for fractional timesteps
        self._log_ratio = 0.5 * (torch.log1p(-ac.clamp(max=1 - 1e-16)) - torch.log(ac))

    # -- construction -------------------------------------------------------------------------
    @staticmethod
    def betas_from_config(config: Mapping[str, Any]) -> Tensor:
        """``betas`` exactly as diffusers builds them (float32)."""
        T = int(config.get("num_train_timesteps", 1000))
        trained = config.get("trained_betas")
        if trained is not None:
            betas = torch.tensor(np.asarray(trained), dtype=torch.float32)
            if betas.numel() != T:
                raise ValueError(f"trained_betas has {betas.numel()} entries but num_train_timesteps is {T}")
        else:
            kind = config.get("beta_schedule", "linear")
            b0 = float(config.get("beta_start", 0.0001))
            b1 = float(config.get("beta_end", 0.02))
            if kind == "linear":
                betas = torch.linspace(b0, b1, T, dtype=torch.float32)
            elif kind == "scaled_linear":
                betas = torch.linspace(b0**0.5, b1**0.5, T, dtype=torch.float32) ** 2
            elif kind == "squaredcos_cap_v2":
                def abar(x: float) -> float:
                    return math.cos((x + 0.008) / 1.008 * math.pi / 2) ** 2
                betas = torch.tensor(
                    [min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)], dtype=torch.float32
                )
            else:
                raise ValueError(
                    f"unsupported beta_schedule {kind!r}; hessdiff reads {', '.join(_BETA_SCHEDULES)} "
                    "or trained_betas"
                )
        if config.get("rescale_betas_zero_snr", False):
            betas = _rescale_zero_terminal_snr(betas)
        return betas

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> DiscreteVPSchedule:
        """Build from a diffusers scheduler config (a dict, ``FrozenDict`` or scheduler object) of a
        DDPM-family scheduler (DDPM, DDIM, PNDM, LMS, Euler, Heun, DPM-Solver, UniPC, DEIS, ...)."""
        why = flow_matching_reason(config)
        if why is not None:
            raise ValueError(f"this is a flow-matching scheduler config ({why}); use FlowMatchingSchedule.from_config")
        config, names = _config_and_names(config)
        if "num_train_timesteps" not in config and "trained_betas" not in config and "beta_schedule" not in config:
            raise ValueError(
                "cannot read this scheduler config: it has none of num_train_timesteps, beta_schedule, "
                f"trained_betas (keys: {sorted(config)[:12]})"
            )
        if names and not any(k in config for k in _VP_KEYS):
            raise ValueError(
                f"{names[0]} is not a DDPM-family scheduler (its config has no beta schedule: none of "
                f"{', '.join(_VP_KEYS)}); hessdiff reads DDPM-family and flow-matching schedulers"
            )
        betas = cls.betas_from_config(config)
        ac = torch.cumprod(1.0 - betas, dim=0)
        if config.get("rescale_betas_zero_snr", False):
            # diffusers clamps the last value so that sigma/alpha stays finite
            ac[-1] = 2**-24
        return cls(
            ac,
            set_alpha_to_one=config.get("set_alpha_to_one", True),
            steps_offset=config.get("steps_offset", 0) or 0,
            timestep_spacing=config.get("timestep_spacing", "leading") or "leading",
        )

    # -- evaluation -----------------------------------------------------------------------------
    def alpha_sigma(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        t = self._check_t(t)
        lo = t.floor().clamp(0, self.num_train_timesteps - 1)
        hi = (lo + 1).clamp(max=self.num_train_timesteps - 1)
        w = t - lo
        lr = (1 - w) * self._log_ratio[lo.long()] + w * self._log_ratio[hi.long()]
        exact = w == 0
        ac = torch.where(exact, self.alphas_cumprod[lo.long()], 1.0 / (1.0 + torch.exp(2 * lr)))
        return ac.sqrt(), (1 - ac).sqrt()

    def rho(self, t: Tensor | float) -> Tensor:
        """``sigma / alpha = exp(log_ratio(t))`` from the interpolated table itself (no ``1 - alpha^2``
        cancellation near ``t = 0``; agrees with ``alpha_sigma`` to ~1e-12 relative)."""
        t = self._check_t(t)
        lo = t.floor().clamp(0, self.num_train_timesteps - 1)
        hi = (lo + 1).clamp(max=self.num_train_timesteps - 1)
        w = t - lo
        return torch.exp((1 - w) * self._log_ratio[lo.long()] + w * self._log_ratio[hi.long()])

    def t_from_lambda(self, lam: Tensor) -> Tensor:
        lam = torch.as_tensor(lam, dtype=torch.float64)
        lr = -lam  # log(sigma/alpha), increasing in t
        table = self._log_ratio
        idx = torch.searchsorted(table, lr.clamp(table[0], table[-1])).clamp(1, len(table) - 1)
        lo, hi = table[idx - 1], table[idx]
        w = ((lr.clamp(table[0], table[-1]) - lo) / (hi - lo)).clamp(0, 1)
        return (idx - 1).to(torch.float64) + w

    @property
    def final_alpha_cumprod(self) -> float:
        return 1.0 if self.set_alpha_to_one else float(self.alphas_cumprod[0])

    def diffusers_timesteps(self, num_steps: int, spacing: str | None = None, *, style: str = "ddim") -> Tensor:
        """The integer timesteps diffusers' ``set_timesteps`` produces.

        ``style="ddim"`` follows ``DDIMScheduler`` (and DDPM/PNDM), ``style="dpmsolver"`` follows
        ``DPMSolverMultistepScheduler`` / ``UniPCMultistepScheduler``, whose ``leading`` and
        ``linspace`` grids differ slightly from DDIM's.
        """
        _check_steps(num_steps)
        spacing = spacing or self.timestep_spacing
        T = self.num_train_timesteps
        if num_steps > T:
            raise ValueError(f"num_steps={num_steps} exceeds num_train_timesteps={T}")
        if style == "ddim":
            if spacing == "linspace":
                ts = np.linspace(0, T - 1, num_steps).round()[::-1]
            elif spacing == "leading":
                ts = (np.arange(0, num_steps) * (T // num_steps)).round()[::-1] + self.steps_offset
            elif spacing == "trailing":
                ts = np.round(np.arange(T, 0, -T / num_steps)) - 1
            else:
                raise ValueError(f"unknown diffusers spacing {spacing!r}")
        elif style == "dpmsolver":
            if spacing == "linspace":
                ts = np.linspace(0, T - 1, num_steps + 1).round()[::-1][:-1]
            elif spacing == "leading":
                ratio = T // (num_steps + 1)
                ts = (np.arange(0, num_steps + 1) * ratio).round()[::-1][:-1] + self.steps_offset
            elif spacing == "trailing":
                ts = np.arange(T, 0, -T / num_steps).round() - 1
            else:
                raise ValueError(f"unknown diffusers spacing {spacing!r}")
        else:
            raise ValueError(f"unknown style {style!r}; expected 'ddim' or 'dpmsolver'")
        return torch.tensor(ts.astype(np.int64).copy(), dtype=torch.float64)

    def grid(
        self,
        num_steps: int,
        spacing: str | None = None,
        *,
        final: str = "zero",
        rho: float = 7.0,
        style: str = "ddim",
        t_start: float | None = None,
        t_end: float | None = None,
    ) -> TimeGrid:
        """A sampling grid of ``num_steps`` steps.

        spacing: ``leading`` / ``trailing`` / ``linspace`` (diffusers' integer grids, see
          :meth:`diffusers_timesteps`), ``logsnr`` (uniform in log-SNR), ``karras`` (EDM's
          ``rho`` spacing of ``sigma/alpha``), ``uniform`` (uniform in ``t``) or ``quadratic`` (uniform in
          ``sqrt(t)``: DEIS's quadratic time steps, diff-sampler's ``time_uniform`` with exponent 2);
          default: the config's.
        final: where the last step lands -- ``"zero"`` (clean, ``sigma = 0``), ``"diffusers"``
          (DDIM's convention: ``alpha = 1`` if ``set_alpha_to_one`` else ``alphas_cumprod[0]``),
          or ``"first"`` (``t = 0``).
        """
        _check_steps(num_steps)
        spacing = spacing or self.timestep_spacing
        lo = self.t_min if t_end is None else float(t_end)
        hi = self.t_max if t_start is None else float(t_start)
        if spacing in ("leading", "trailing", "linspace"):
            ts = self.diffusers_timesteps(num_steps, spacing, style=style)
        elif spacing == "uniform":
            ts = torch.linspace(hi, lo, num_steps + 1, dtype=torch.float64)[:-1]
        elif spacing == "quadratic":
            ts = _quadratic_times(hi, lo, num_steps + 1)[:-1]
        elif spacing in ("logsnr", "karras"):
            lam_hi, lam_lo = self.lambda_(torch.tensor(hi)), self.lambda_(torch.tensor(lo))
            if spacing == "logsnr":
                lams = torch.linspace(float(lam_hi), float(lam_lo), num_steps + 1, dtype=torch.float64)[:-1]
            else:
                s = _karras_sigmas(math.exp(-float(lam_lo)), math.exp(-float(lam_hi)), num_steps + 1, rho)[:-1]
                lams = -torch.log(s)
            ts = self.t_from_lambda(lams)
            ts[0] = hi
        else:
            raise ValueError(f"unknown spacing {spacing!r}; expected one of {SPACINGS}")
        return self._with_final(ts, final)

    def _with_final(self, ts: Tensor, final: str) -> TimeGrid:
        if final == "zero":
            return self.grid_from_t(ts, None)
        if final == "first":
            return self.grid_from_t(ts, 0.0)
        if final == "diffusers":
            if self.set_alpha_to_one:
                return self.grid_from_t(ts, None)
            return self.grid_from_t(ts, 0.0)
        raise ValueError(f"unknown final {final!r}; expected 'zero', 'diffusers' or 'first'")

    def __repr__(self) -> str:
        return f"DiscreteVPSchedule(T={self.num_train_timesteps}, spacing={self.timestep_spacing!r})"


def _rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Rescale betas to zero terminal SNR (Lin et al. 2023), as diffusers does."""
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    a0 = alphas_bar_sqrt[0].clone()
    aT = alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - aT) * (a0 / (a0 - aT))
    alphas_bar = alphas_bar_sqrt**2
    alphas = alphas_bar[1:] / alphas_bar[:-1]
    alphas = torch.cat([alphas_bar[0:1], alphas])
    return 1 - alphas


class ContinuousVPSchedule(NoiseSchedule):
    """``alpha(t)``, ``sigma(t)`` given as functions on ``t in [t_min, t_max]`` (default ``[1e-3, 1]``)."""

    kind = "vp"

    def __init__(
        self,
        alpha_fn: Callable[[Tensor], Tensor],
        sigma_fn: Callable[[Tensor], Tensor],
        *,
        t_min: float = 1e-3,
        t_max: float = 1.0,
        name: str = "custom",
    ) -> None:
        if not t_max > t_min:
            raise ValueError(f"need t_max > t_min, got [{t_min}, {t_max}]")
        self.alpha_fn, self.sigma_fn = alpha_fn, sigma_fn
        self.t_min, self.t_max = float(t_min), float(t_max)
        self.name = name

    @classmethod
    def linear(cls, beta_min: float = 0.1, beta_max: float = 20.0, **kw: Any) -> ContinuousVPSchedule:
        """The VP-SDE with linear ``beta(t)`` (Song et al. 2021)."""
        def log_alpha(t: Tensor) -> Tensor:
            return -0.25 * t**2 * (beta_max - beta_min) - 0.5 * t * beta_min
        return cls(lambda t: torch.exp(log_alpha(t)), lambda t: torch.sqrt(-torch.expm1(2 * log_alpha(t))),
                   name="vp-linear", **kw)

    @classmethod
    def cosine(cls, s: float = 0.008, **kw: Any) -> ContinuousVPSchedule:
        """Nichol & Dhariwal's cosine schedule, ``alpha_t = cos((t+s)/(1+s) pi/2) / cos(s/(1+s) pi/2)``."""
        c0 = math.cos(s / (1 + s) * math.pi / 2)
        kw.setdefault("t_max", 0.999)

        def alpha(t: Tensor) -> Tensor:
            return torch.cos((t + s) / (1 + s) * math.pi / 2) / c0
        return cls(alpha, lambda t: torch.sqrt(1 - alpha(t) ** 2), name="vp-cosine", **kw)

    def alpha_sigma(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        t = self._check_t(t)
        return self.alpha_fn(t).to(torch.float64), self.sigma_fn(t).to(torch.float64)

    def t_from_lambda(self, lam: Tensor) -> Tensor:
        lam = torch.as_tensor(lam, dtype=torch.float64)
        lo = torch.full_like(lam, self.t_min)
        hi = torch.full_like(lam, self.t_max)
        for _ in range(80):  # bisection: lambda is decreasing in t
            mid = 0.5 * (lo + hi)
            go_right = self.lambda_(mid) > lam
            lo = torch.where(go_right, mid, lo)
            hi = torch.where(go_right, hi, mid)
        return 0.5 * (lo + hi)

    def grid(
        self,
        num_steps: int,
        spacing: str = "logsnr",
        *,
        final: str = "zero",
        rho: float = 7.0,
        t_start: float | None = None,
        t_end: float | None = None,
    ) -> TimeGrid:
        """``uniform`` (in t), ``quadratic`` (uniform in ``sqrt(t)``), ``logsnr`` or ``karras`` spacing from
        ``t_start`` (default ``t_max``) to ``t_end`` (default ``t_min``); ``final="zero"`` lands on clean data
        after the last step, ``final="end"`` lands on ``t_end``."""
        _check_steps(num_steps)
        hi = self.t_max if t_start is None else float(t_start)
        lo = self.t_min if t_end is None else float(t_end)
        m = num_steps + (1 if final == "end" else 0)
        if spacing == "uniform":
            ts = torch.linspace(hi, lo, m, dtype=torch.float64)
        elif spacing == "quadratic":
            ts = _quadratic_times(hi, lo, m)
        elif spacing == "logsnr":
            lams = torch.linspace(float(self.lambda_(hi)), float(self.lambda_(lo)), m, dtype=torch.float64)
            ts = self.t_from_lambda(lams)
        elif spacing == "karras":
            smax, smin = math.exp(-float(self.lambda_(hi))), math.exp(-float(self.lambda_(lo)))
            ts = self.t_from_lambda(-torch.log(_karras_sigmas(smin, smax, m, rho)))
        else:
            raise ValueError(f"unknown spacing {spacing!r} for a continuous schedule; use uniform, quadratic, logsnr "
                             "or karras")
        ts[0], ts[-1] = hi, lo
        if final == "end":
            return self.grid_from_t(ts[:-1], ts[-1])
        if final == "zero":
            return self.grid_from_t(ts, None)
        raise ValueError(f"unknown final {final!r}; expected 'zero' or 'end'")


class FlowMatchingSchedule(NoiseSchedule):
    """Rectified flow: ``x_s = (1 - s) x0 + s eps``, model time ``t = s * num_train_timesteps``.

    ``shift`` applies the resolution shift of SD3/FLUX to grids: ``s' = shift s / (1 + (shift-1) s)``.
    """

    kind = "flow"

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0) -> None:
        if shift <= 0:
            raise ValueError(f"shift must be positive, got {shift}")
        self.num_train_timesteps = int(num_train_timesteps)
        self.shift = float(shift)
        self.t_min, self.t_max = 0.0, float(self.num_train_timesteps)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> FlowMatchingSchedule:
        """Build from a flow-matching scheduler config (``FlowMatch*`` schedulers: ``shift``; the
        multistep solvers with ``use_flow_sigmas=True``: ``flow_shift``)."""
        config, _ = _config_and_names(config)
        if config.get("use_dynamic_shifting", False):
            raise ValueError("use_dynamic_shifting needs an image-size dependent mu; pass shift explicitly")
        if config.get("use_flow_sigmas", False) and "flow_shift" in config:
            shift = config.get("flow_shift")
        else:
            shift = config.get("shift")
        return cls(int(config.get("num_train_timesteps", 1000)), float(1.0 if shift is None else shift))

    def alpha_sigma(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        s = self._check_t(t) / self.num_train_timesteps
        return 1.0 - s, s

    def t_from_lambda(self, lam: Tensor) -> Tensor:
        # lambda = log((1-s)/s)  =>  s = 1 / (1 + e^lambda)
        return torch.sigmoid(-torch.as_tensor(lam, dtype=torch.float64)) * self.num_train_timesteps

    def shifted(self, s: Tensor) -> Tensor:
        return self.shift * s / (1 + (self.shift - 1) * s)

    def grid(
        self,
        num_steps: int,
        spacing: str = "uniform",
        *,
        final: str = "zero",
        rho: float = 7.0,
        s_start: float = 1.0,
        s_end: float | None = None,
    ) -> TimeGrid:
        """diffusers' ``FlowMatchEulerDiscreteScheduler`` grid: ``s`` uniform from ``s_start`` to
        ``s_end`` (default: the shifted ``1/T``), shifted, then ``0``. ``logsnr``/``karras`` also accepted."""
        _check_steps(num_steps)
        if s_end is None:  # diffusers: the smallest *shifted* training sigma
            s_end = float(self.shifted(torch.tensor(1.0 / self.num_train_timesteps, dtype=torch.float64)))
        if spacing == "uniform":
            s = torch.linspace(s_start, s_end, num_steps, dtype=torch.float64)
            s = self.shifted(s)
        elif spacing in ("logsnr", "karras"):
            lo, hi = max(s_end, 1e-4), min(s_start, 1 - 1e-4)
            lam_hi, lam_lo = math.log((1 - hi) / hi), math.log((1 - lo) / lo)
            if spacing == "logsnr":
                lams = torch.linspace(lam_hi, lam_lo, num_steps, dtype=torch.float64)
            else:
                lams = -torch.log(_karras_sigmas(math.exp(-lam_lo), math.exp(-lam_hi), num_steps, rho))
            s = torch.sigmoid(-lams)
        else:
            raise ValueError(f"unknown spacing {spacing!r} for flow matching; use uniform, logsnr or karras")
        if final != "zero":
            raise ValueError("flow-matching grids end at s = 0 (final='zero')")
        ts = s * self.num_train_timesteps
        a, sg = 1 - s, s
        return TimeGrid(
            torch.cat([ts, torch.zeros(1, dtype=torch.float64)]),
            torch.cat([a, torch.ones(1, dtype=torch.float64)]),
            torch.cat([sg, torch.zeros(1, dtype=torch.float64)]),
        )


#: config entries that only a DDPM-family (variance-preserving, beta-schedule) scheduler has
_VP_KEYS = ("beta_schedule", "beta_start", "beta_end", "trained_betas", "alphas_cumprod")


def _config_and_names(config: Mapping[str, Any] | Any) -> tuple[Mapping[str, Any], list[str]]:
    """The config mapping of a scheduler object (or a config) and the scheduler class names it
    declares: the object's class and its bases, or the config's ``_class_name``."""
    names: list[str] = []
    if not isinstance(config, Mapping) and hasattr(config, "config"):
        names = [c.__name__ for c in type(config).__mro__]
        config = config.config
    if not isinstance(config, Mapping):
        raise TypeError(f"expected a diffusers scheduler config mapping, got {type(config).__name__}")
    cls_name = config.get("_class_name")
    if cls_name:
        names.insert(0, str(cls_name))
    return config, names


def flow_matching_reason(config: Mapping[str, Any] | Any) -> str | None:
    """Why a diffusers scheduler (or its config) is a flow-matching one, or ``None`` for a VP one.

    Flow matching is what defines it, not the presence of option names: diffusers' DPM-Solver,
    UniPC, DEIS and SA-Solver configs all carry ``use_dynamic_shifting`` / ``flow_shift`` /
    ``time_shift_type`` and are VP (DDPM-family) schedulers unless ``use_flow_sigmas=True``. In order:

    1. the class (the object's, one of its bases', or the config's ``_class_name``) is ``FlowMatch*``;
    2. ``use_flow_sigmas=True`` (DPM-Solver, UniPC, DEIS, SA-Solver on flow sigmas ``s``, ``t = s T``);
    3. ``prediction_type == "flow_prediction"``;
    4. otherwise a config with VP semantics (``beta_*``, ``trained_betas``, ``alphas_cumprod``) or a
       named non-``FlowMatch`` class is VP; only a bare mapping without them and with ``shift``
       (a ``FlowMatch*`` config whose ``_class_name`` was dropped) is taken for flow matching.
    """
    config, names = _config_and_names(config)
    flow_cls = next((n for n in names if n.startswith("FlowMatch") or n.startswith("LMLFlowMatch")), None)
    if flow_cls is not None:
        return f"class {flow_cls}"
    if config.get("use_flow_sigmas", False):
        return "use_flow_sigmas=True"
    if config.get("prediction_type") == "flow_prediction":
        return "prediction_type='flow_prediction'"
    if names or any(k in config for k in _VP_KEYS):
        return None
    if "shift" in config:
        return "a 'shift' entry and no beta schedule"
    return None


def schedule_from_config(config: Mapping[str, Any] | Any) -> NoiseSchedule:
    """A schedule for a diffusers scheduler (or its config): flow matching or discrete VP.

    Which one is decided by :func:`flow_matching_reason` (the class, ``use_flow_sigmas``,
    ``prediction_type``), so that DPM-Solver / UniPC / DEIS configs, which carry
    ``use_dynamic_shifting`` and ``flow_shift`` options, are read as the VP schedules they are.
    """
    if flow_matching_reason(config) is not None:
        return FlowMatchingSchedule.from_config(config)
    return DiscreteVPSchedule.from_config(config)
