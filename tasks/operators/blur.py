"""Blur: convolution with a kernel, with true adjoints for every padding mode."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import PADDING_MODES, LinearOperator, _as_float64, _shape_str


def _pad_index(n: int, before: int, after: int, mode: str, device: torch.device) -> Tensor:
    """For padding an axis of length ``n``: the source index of each of the ``before + n + after`` entries."""
    j = torch.arange(-before, n + after, device=device)
    if mode == "reflect":  # d c b | a b c d | c b a   (edge not repeated; torch / numpy "reflect")
        period = 2 * (n - 1)
        if period == 0:
            return torch.zeros_like(j)
        j = torch.remainder(j, period)
        return torch.where(j >= n, period - j, j)
    if mode == "circular":
        return torch.remainder(j, n)
    if mode == "replicate":
        return j.clamp(0, n - 1)
    raise ValueError(f"unknown padding mode {mode!r}")


class Blur(LinearOperator):
    """Convolution with a kernel, the output keeping the image size: ``A x = k ⋆ pad(x)``.

    ``kernel`` is ``[kh, kw]`` (shared) or ``[P, kh, kw]`` (one per image), odd-sized in both
    directions, centred at ``(kh//2, kw//2)``; it is applied to every channel. The map is the
    correlation ``(A x)[i, j] = Σ_ab k[a, b] · pad(x)[i + a, j + b]`` (for a kernel symmetric under
    a 180° rotation, such as a Gaussian, this equals convolution). ``padding``:

    * ``"reflect"`` — mirror without repeating the edge (torch ``reflect``; scipy ``mirror``); needs
      ``kh//2 < H`` and ``kw//2 < W``, otherwise a ``ValueError`` is raised;
    * ``"circular"`` — periodic, any kernel size (``pinv`` has a closed form via the FFT);
    * ``"zero"`` — zeros outside the image;
    * ``"replicate"`` — edge value repeated.

    The adjoint is the transposed convolution followed by the adjoint of the padding (border
    values folded back onto the pixels they were copied from), which makes it exact.
    ``method``: ``"direct"`` (``conv2d``), ``"fft"`` (FFT on the padded image; faster for large
    kernels) or ``"auto"`` (FFT when the kernel has more than 15 rows or columns).
    ``pinv_rcond``: for circular padding, frequencies whose response is below ``pinv_rcond`` times
    the largest are dropped by ``pinv``.
    """

    def __init__(self, kernel: Tensor, padding: str = "reflect", method: str = "auto",
                 pinv_rcond: float = 1e-6) -> None:
        super().__init__()
        k = _as_float64(kernel, "Blur: kernel")
        if k.ndim == 2:
            k = k[None]
        elif k.ndim == 4 and k.shape[1] == 1:
            k = k[:, 0]
        if k.ndim != 3 or min(k.shape) < 1:
            raise ValueError(f"Blur: kernel must be [kh, kw] or [B, kh, kw]; got shape {_shape_str(k.shape)}")
        kh, kw = k.shape[-2:]
        if kh % 2 == 0 or kw % 2 == 0:
            raise ValueError(f"Blur: kernel size must be odd in both directions (centred kernel); got {kh}x{kw}")
        if padding == "constant":
            padding = "zero"
        if padding not in PADDING_MODES:
            raise ValueError(f"Blur: unknown padding {padding!r}; choose one of {', '.join(PADDING_MODES)}")
        if method not in ("auto", "direct", "fft"):
            raise ValueError(f"Blur: unknown method {method!r}; choose auto, direct or fft")
        if not pinv_rcond > 0:
            raise ValueError(f"Blur: pinv_rcond must be > 0; got {pinv_rcond}")
        self.register_buffer("kernel", k)
        self.padding = padding
        self.method = method
        self.pinv_rcond = float(pinv_rcond)

    @property
    def has_pinv(self) -> bool:  # type: ignore[override]
        return self.padding == "circular"

    def describe(self) -> str:
        p, kh, kw = self.kernel.shape
        per = f", {p} kernels" if p > 1 else ""
        return f"Blur({kh}x{kw}{per}, {self.padding} padding)"

    # -------------------------------------------------------------- shapes
    def _output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        self._check_image_shape(shape, "image")
        p, kh, kw = self.kernel.shape
        self._check_batch(p, shape[0], "kernel")
        h, w = shape[-2:]
        if self.padding == "reflect" and (kh // 2 >= h or kw // 2 >= w):
            raise ValueError(
                f"{self.describe()}: reflect padding needs the kernel half-size ({kh // 2}x{kw // 2}) to be "
                f"smaller than the image ({h}x{w}); use a smaller kernel, a larger image, or circular/zero padding"
            )
        return shape

    _input_shape = _output_shape

    # -------------------------------------------------------------- padding and its adjoint
    def _pad(self, x: Tensor) -> Tensor:
        kh, kw = self.kernel.shape[-2:]
        ph, pw = kh // 2, kw // 2
        if self.padding == "zero":
            return F.pad(x, (pw, pw, ph, ph))
        h, w = x.shape[-2:]
        ih = _pad_index(h, ph, ph, self.padding, x.device)
        iw = _pad_index(w, pw, pw, self.padding, x.device)
        return x.index_select(-2, ih).index_select(-1, iw)

    def _pad_adjoint(self, z: Tensor, h: int, w: int) -> Tensor:
        kh, kw = self.kernel.shape[-2:]
        ph, pw = kh // 2, kw // 2
        if self.padding == "zero":
            return z[..., ph:ph + h, pw:pw + w]
        ih = _pad_index(h, ph, ph, self.padding, z.device)
        iw = _pad_index(w, pw, pw, self.padding, z.device)
        zw = z.new_zeros(z.shape[:-1] + (w,)).index_add(-1, iw, z)
        return zw.new_zeros(zw.shape[:-2] + (h, w)).index_add(-2, ih, zw)

    # -------------------------------------------------------------- correlation (valid) and its adjoint
    def _use_fft(self) -> bool:
        if self.method == "auto":
            return max(self.kernel.shape[-2:]) > 15
        return self.method == "fft"

    def _weights(self, t: Tensor, channels: int) -> Tensor:
        """Kernel(s) as grouped-conv weights for a ``[1, B*C, ., .]`` or ``[B*C, 1, ., .]`` layout."""
        k = self.kernel.to(device=t.device, dtype=t.dtype)
        return k.repeat_interleave(channels, dim=0)[:, None]

    def _corr_valid(self, xp: Tensor) -> Tensor:
        b, c, hp, wp = xp.shape
        p, kh, kw = self.kernel.shape
        h, w = hp - 2 * (kh // 2), wp - 2 * (kw // 2)
        if self._use_fft():
            k = self.kernel.to(device=xp.device, dtype=xp.dtype)[:, None]  # [P, 1, kh, kw]
            kf = torch.fft.rfft2(k, s=(hp, wp))
            full = torch.fft.irfft2(torch.fft.rfft2(xp) * kf.conj(), s=(hp, wp))
            return full[..., :h, :w]
        if p == 1:
            wgt = self.kernel.to(device=xp.device, dtype=xp.dtype)[:, None]
            return F.conv2d(xp.reshape(b * c, 1, hp, wp), wgt).reshape(b, c, h, w)
        out = F.conv2d(xp.reshape(1, b * c, hp, wp), self._weights(xp, c), groups=b * c)
        return out.reshape(b, c, h, w)

    def _corr_valid_adjoint(self, y: Tensor) -> Tensor:
        b, c, h, w = y.shape
        p, kh, kw = self.kernel.shape
        hp, wp = h + 2 * (kh // 2), w + 2 * (kw // 2)
        if self._use_fft():
            k = self.kernel.to(device=y.device, dtype=y.dtype)[:, None]
            kf = torch.fft.rfft2(k, s=(hp, wp))
            z = F.pad(y, (0, wp - w, 0, hp - h))
            return torch.fft.irfft2(torch.fft.rfft2(z) * kf, s=(hp, wp))
        if p == 1:
            wgt = self.kernel.to(device=y.device, dtype=y.dtype)[:, None]
            return F.conv_transpose2d(y.reshape(b * c, 1, h, w), wgt).reshape(b, c, hp, wp)
        out = F.conv_transpose2d(y.reshape(1, b * c, h, w), self._weights(y, c), groups=b * c)
        return out.reshape(b, c, hp, wp)

    def _forward(self, x: Tensor) -> Tensor:
        return self._corr_valid(self._pad(x))

    def _adjoint(self, y: Tensor) -> Tensor:
        h, w = y.shape[-2:]
        return self._pad_adjoint(self._corr_valid_adjoint(y), h, w)

    # -------------------------------------------------------------- circular pseudo-inverse
    def transfer_function(self, h: int, w: int, device: torch.device | None = None) -> Tensor:
        """For circular padding: ``K`` with ``A x = ifft2(fft2(x) · conj(K))`` on an ``h x w`` grid.

        Shape ``[P, 1, h, w]`` complex128. The kernel is wrapped onto the grid (entries that fall
        on the same pixel modulo the image size add up), so kernels larger than the image work.
        """
        p, kh, kw = self.kernel.shape
        k = self.kernel.to(device=device or self.kernel.device)
        ih = torch.remainder(torch.arange(kh, device=k.device) - kh // 2, h)
        iw = torch.remainder(torch.arange(kw, device=k.device) - kw // 2, w)
        kw_ = k.new_zeros(p, kh, w).index_add(-1, iw, k)
        kc = kw_.new_zeros(p, h, w).index_add(-2, ih, kw_)
        return torch.fft.fft2(kc)[:, None]

    def _pinv(self, y: Tensor) -> Tensor:
        h, w = y.shape[-2:]
        kf = self.transfer_function(h, w, device=y.device)
        mag2 = kf.real**2 + kf.imag**2
        thresh = (self.pinv_rcond**2) * mag2.flatten(1).amax(1).view(-1, 1, 1, 1)
        keep = mag2 > thresh
        inv = torch.where(keep, kf / torch.where(keep, mag2, torch.ones_like(mag2)), torch.zeros_like(kf))
        yf = torch.fft.fft2(y.to(torch.float64))
        return torch.fft.ifft2(yf * inv).real.to(y.dtype)

    def get_config(self) -> dict[str, Any]:
        return {"type": "Blur", "args": {"kernel": self.kernel.cpu(), "padding": self.padding,
                                         "method": self.method, "pinv_rcond": self.pinv_rcond}}
