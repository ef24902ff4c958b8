"""Super-resolution: antialiased bicubic or average-pooling downsampling as a matrix per axis."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import _RESIZE_BOUNDARIES, RESIZE_FILTERS, LinearOperator


def cubic_kernel(x: Tensor, a: float = -0.5) -> Tensor:
    """Keys' cubic convolution kernel with parameter ``a`` (``a = -0.5``: Matlab ``imresize``, PIL, PyTorch antialias).

    ``W(x) = (a+2)|x|³ − (a+3)|x|² + 1`` for ``|x| ≤ 1``; ``a|x|³ − 5a|x|² + 8a|x| − 4a`` for
    ``1 < |x| < 2``; ``0`` otherwise.
    """
    ax = x.abs()
    ax2, ax3 = ax * ax, ax * ax * ax
    inner = (a + 2) * ax3 - (a + 3) * ax2 + 1
    outer = a * ax3 - 5 * a * ax2 + 8 * a * ax - 4 * a
    return torch.where(ax <= 1, inner, torch.where(ax < 2, outer, torch.zeros_like(ax)))


def resize_matrix(n_in: int, scale: int, filter: str = "bicubic", boundary: str = "reflect") -> Tensor:
    """Per-axis downsampling matrix ``W`` (float64, ``[n_in // scale, n_in]``).

    ``filter="average"``: ``W[i, j] = 1/scale`` for ``j`` in ``[i·scale, (i+1)·scale)``.

    ``filter="bicubic"`` (antialiased, Matlab ``imresize`` / the DPS ``Resizer``): output pixel
    ``i`` sits at input coordinate ``c_i = (i + 0.5)·scale − 0.5``; tap ``j`` gets weight
    ``cubic((j − c_i)/scale)`` (Keys, ``a = -0.5``, i.e. the cubic widened by the scale factor, support
    ``|j − c_i| < 2·scale``), the weights of a row normalised to sum to one. Out-of-range taps:

    * ``boundary="reflect"``: folded back by half-sample symmetric reflection (edge pixel repeated:
      ``-1 -> 0``, ``n -> n-1``), after normalising over all taps (the DPS ``Resizer``'s rule);
    * ``boundary="truncate"``: dropped, then the remaining weights are renormalised (PIL's and
      ``torch.nn.functional.interpolate(mode="bicubic", antialias=True)``'s rule).
    """
    if scale < 1:
        raise ValueError(f"scale must be a positive integer; got {scale}")
    if n_in % scale != 0:
        raise ValueError(f"scale {scale} does not divide the size {n_in}")
    n_out = n_in // scale
    if filter == "average":
        w = torch.zeros(n_out, n_in, dtype=torch.float64)
        rows = torch.arange(n_in) // scale
        w[rows, torch.arange(n_in)] = 1.0 / scale
        return w
    if filter != "bicubic":
        raise ValueError(f"unknown resize filter {filter!r}; choose one of {', '.join(RESIZE_FILTERS)}")
    if boundary not in _RESIZE_BOUNDARIES:
        raise ValueError(f"unknown resize boundary {boundary!r}; choose reflect or truncate")
    c = (torch.arange(n_out, dtype=torch.float64) + 0.5) * scale - 0.5  # [n_out]
    half = 2 * scale
    lo = torch.floor(c - half).to(torch.long)
    taps = lo[:, None] + torch.arange(2 * half + 2)[None, :]  # [n_out, T]
    wt = cubic_kernel((taps.to(torch.float64) - c[:, None]) / scale)
    if boundary == "truncate":
        wt = torch.where((taps >= 0) & (taps < n_in), wt, torch.zeros_like(wt))
        idx = taps.clamp(0, n_in - 1)
    else:
        period = 2 * n_in
        m = torch.remainder(taps, period)
        idx = torch.where(m >= n_in, period - 1 - m, m)
    wt = wt / wt.sum(1, keepdim=True)
    w = torch.zeros(n_out, n_in, dtype=torch.float64)
    w.scatter_add_(1, idx, wt)
    return w


class SuperResolution(LinearOperator):
    """Downsampling by an integer ``scale`` as a separable linear map: ``A x = W_H · x · W_Wᵀ``.

    ``filter="bicubic"`` is the antialiased bicubic resizer of the DPS / PSLD protocol
    (``boundary="reflect"``) or of PIL / PyTorch (``boundary="truncate"``); ``filter="average"`` is
    ``scale x scale`` average pooling. See :func:`resize_matrix`. The per-axis matrices are built for
    each input size on first use, so any size divisible by ``scale`` works (odd sizes included);
    a size not divisible by ``scale`` is an error (crop or pad the image first).
    ``Aᵀ y = W_Hᵀ · y · W_W`` and ``A⁺ y = W_H⁺ · y · W_W⁺ᵀ`` (the pseudo-inverse of a Kronecker
    product is the Kronecker product of the pseudo-inverses), both exact.
    """

    has_pinv = True

    def __init__(self, scale: int, filter: str = "bicubic", boundary: str = "reflect") -> None:
        super().__init__()
        if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
            raise ValueError(f"SuperResolution: scale must be a positive integer; got {scale!r}")
        if filter not in RESIZE_FILTERS:
            raise ValueError(f"SuperResolution: unknown filter {filter!r}; choose one of {', '.join(RESIZE_FILTERS)}")
        if boundary not in _RESIZE_BOUNDARIES:
            raise ValueError(f"SuperResolution: unknown boundary {boundary!r}; choose reflect or truncate")
        self.scale = scale
        self.filter = filter
        self.boundary = boundary
        self._mats: dict[tuple[int, str, torch.device, torch.dtype], Tensor] = {}

    def describe(self) -> str:
        extra = f", {self.boundary} boundary" if self.filter == "bicubic" else ""
        return f"SuperResolution(x{self.scale}, {self.filter}{extra})"

    def _matrix(self, n: int, kind: str, like: Tensor) -> Tensor:
        key = (n, kind, like.device, like.dtype)
        m = self._mats.get(key)
        if m is None:
            w = resize_matrix(n, self.scale, self.filter, self.boundary)
            if kind == "pinv":
                w = torch.linalg.pinv(w)
            m = w.to(device=like.device, dtype=like.dtype)
            self._mats[key] = m
        return m

    def _forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        return self._matrix(h, "fwd", x) @ x @ self._matrix(w, "fwd", x).T

    def _adjoint(self, y: Tensor) -> Tensor:
        h, w = y.shape[-2] * self.scale, y.shape[-1] * self.scale
        return self._matrix(h, "fwd", y).T @ y @ self._matrix(w, "fwd", y)

    def _pinv(self, y: Tensor) -> Tensor:
        h, w = y.shape[-2] * self.scale, y.shape[-1] * self.scale
        return self._matrix(h, "pinv", y) @ y @ self._matrix(w, "pinv", y).T

    def _output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        self._check_image_shape(shape, "image")
        h, w = shape[-2:]
        s = self.scale
        if h % s or w % s:
            raise ValueError(
                f"{self.describe()}: scale {s} does not divide the image size {h}x{w}; crop or pad the image "
                f"to a multiple of {s} (e.g. {h - h % s}x{w - w % s})"
            )
        return shape[:2] + (h // s, w // s)

    def _input_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        self._check_image_shape(shape, "measurement")
        return shape[:2] + (shape[2] * self.scale, shape[3] * self.scale)

    def get_config(self) -> dict[str, Any]:
        return {"type": "SuperResolution",
                "args": {"scale": self.scale, "filter": self.filter, "boundary": self.boundary}}
