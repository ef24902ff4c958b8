"""Linear measurement operators with true adjoints.

Conventions
-----------
* Images are ``[B, C, H, W]`` float tensors (float32 or float64), nominally in ``[-1, 1]``.
* ``A(x)`` (``forward``) computes the measurement ``A x``; ``A.adjoint(y)`` computes ``Aᵀ y`` for
  the Euclidean inner product ``<u, v> = sum(u * v)`` over all entries, so that
  ``<A x, y> = <x, Aᵀ y>`` holds to rounding error for every operator, padding mode and size.
* ``A.pinv(y)`` computes the Moore–Penrose pseudo-inverse ``A⁺ y`` where a closed form exists
  (masks, identity, super-resolution, circular blur, matrices); other operators raise
  ``NotImplementedError`` naming themselves, and ``A.pinv_cg(y)`` gives the minimum-norm
  least-squares solution by conjugate gradients on the normal equations (CGLS).
* Operator parameters (masks, kernels, matrices) are stored in float64 and cast to the input's
  dtype and device at use, so one operator serves float32 and float64 inputs on any device.
* Parameters may carry a leading batch dimension ``P`` (one mask / kernel per image). ``P`` must be
  ``1`` (shared by the whole batch) or equal to the batch size of the input.
* ``A @ B`` is the composition ``x -> A(B(x))``.

Every operator validates its input (rank, sizes, batch, finiteness) and raises ``ValueError``
naming the problem; set ``op.validate = False`` to skip the finiteness check in hot loops.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LinearOperator",
    "Identity",
    "Compose",
    "MatrixOperator",
    "Inpainting",
    "Blur",
    "SuperResolution",
    "PADDING_MODES",
    "RESIZE_FILTERS",
    "OPERATOR_TYPES",
    "operator_from_config",
    "cgls",
    "resize_matrix",
    "cubic_kernel",
]

PADDING_MODES = ("reflect", "circular", "zero", "replicate")
RESIZE_FILTERS = ("bicubic", "average")
_RESIZE_BOUNDARIES = ("reflect", "truncate")


def _as_float64(t: Any, what: str) -> Tensor:
    if not isinstance(t, Tensor):
        try:
            t = torch.as_tensor(t)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(f"{what} must be a tensor or array of numbers; got {type(t).__name__}") from exc
    if t.is_complex():
        raise ValueError(f"{what} must be real-valued")
    t = t.detach().to(dtype=torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{what} contains NaN or Inf values")
    return t


def _shape_str(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


class LinearOperator(nn.Module):
    """A linear map ``A`` with a true adjoint, as an ``nn.Module``.

    Subclasses implement ``_forward``, ``_adjoint``, ``_output_shape`` and ``_input_shape``, and
    ``_pinv`` when ``has_pinv`` is true. ``forward`` / ``adjoint`` / ``pinv`` validate their
    argument, then call those. All maps are differentiable with autograd.
    """

    #: whether :meth:`pinv` has a closed form for this operator
    has_pinv: bool = False
    #: whether forward / adjoint check their argument for NaN / Inf (one host sync per call)
    validate: bool = True

    # ------------------------------------------------------------------ public API
    def forward(self, x: Tensor) -> Tensor:
        """``A x``."""
        self.check_input(x)
        return self._forward(x)

    def adjoint(self, y: Tensor) -> Tensor:
        """``Aᵀ y`` (true adjoint: ``<A x, y> = <x, Aᵀ y>``)."""
        self.check_measurement(y)
        return self._adjoint(y)

    def pinv(self, y: Tensor) -> Tensor:
        """``A⁺ y``, the Moore–Penrose pseudo-inverse applied to ``y``.

        Raises ``NotImplementedError`` when this operator has no closed form; use
        :meth:`pinv_cg` for the iterative minimum-norm least-squares solution instead.
        """
        if not self.has_pinv:
            raise NotImplementedError(
                f"{self.describe()} has no closed-form pseudo-inverse; use op.pinv_cg(y, max_iter=..., tol=...) "
                "for the minimum-norm least-squares solution by conjugate gradients"
            )
        self.check_measurement(y)
        return self._pinv(y)

    def pinv_cg(self, y: Tensor, max_iter: int = 100, tol: float = 1e-6) -> Tensor:
        """Minimum-norm least-squares solution of ``A x = y`` by CGLS (see :func:`cgls`)."""
        self.check_measurement(y)
        return cgls(self, y, max_iter=max_iter, tol=tol)

    def normal(self, x: Tensor) -> Tensor:
        """``Aᵀ A x``."""
        return self.adjoint(self.forward(x))

    def output_shape(self, input_shape: Sequence[int]) -> tuple[int, ...]:
        """Shape of ``A x`` for ``x`` of shape ``input_shape`` (raises ``ValueError`` if ``x`` is invalid)."""
        return self._output_shape(tuple(int(s) for s in input_shape))

    def input_shape(self, output_shape: Sequence[int]) -> tuple[int, ...]:
        """Shape of ``Aᵀ y`` for ``y`` of shape ``output_shape``."""
        return self._input_shape(tuple(int(s) for s in output_shape))

    def check_input(self, x: Tensor) -> None:
        """Raise ``ValueError`` unless ``x`` is a finite float tensor this operator accepts."""
        self._check_tensor(x, "input")
        self._output_shape(tuple(x.shape))

    def check_measurement(self, y: Tensor) -> None:
        """Raise ``ValueError`` unless ``y`` is a finite float tensor in this operator's range space."""
        self._check_tensor(y, "measurement")
        self._input_shape(tuple(y.shape))

    def describe(self) -> str:
        """Short human-readable name with the main parameters."""
        return type(self).__name__

    def get_config(self) -> dict[str, Any]:
        """``{"type": class name, "args": constructor kwargs}``, tensors included; see :func:`operator_from_config`."""
        raise NotImplementedError(f"{self.describe()} cannot be serialised")

    def __matmul__(self, other: LinearOperator) -> Compose:
        if not isinstance(other, LinearOperator):
            return NotImplemented
        return Compose(self, other)

    # ------------------------------------------------------------------ helpers for subclasses
    def _check_tensor(self, t: Tensor, what: str) -> None:
        if not isinstance(t, Tensor):
            raise ValueError(f"{self.describe()}: {what} must be a torch.Tensor; got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{self.describe()}: {what} must be a floating-point tensor; got {t.dtype}")
        if self.validate and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{self.describe()}: {what} contains NaN or Inf values")

    def _check_image_shape(self, shape: tuple[int, ...], what: str) -> None:
        if len(shape) != 4:
            raise ValueError(f"{self.describe()}: {what} must be [B, C, H, W]; got shape {_shape_str(shape)}")
        if min(shape) < 1:
            raise ValueError(f"{self.describe()}: {what} has an empty dimension: {_shape_str(shape)}")

    def _check_batch(self, param_batch: int, batch: int, what: str) -> None:
        if param_batch != 1 and param_batch != batch:
            raise ValueError(
                f"{self.describe()}: holds {param_batch} per-image {what}s but the batch has {batch} images; "
                f"use a batch of {param_batch} or an operator with one shared {what}"
            )

    # ------------------------------------------------------------------ to implement
    def _forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _adjoint(self, y: Tensor) -> Tensor:
        raise NotImplementedError

    def _pinv(self, y: Tensor) -> Tensor:
        raise NotImplementedError

    def _output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        raise NotImplementedError

    def _input_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        raise NotImplementedError


def _bdot(u: Tensor, v: Tensor) -> Tensor:
    """Per-sample inner products, shape ``[B]``."""
    return (u * v).flatten(1).sum(1)


def _bview(s: Tensor, like: Tensor) -> Tensor:
    return s.view((-1,) + (1,) * (like.ndim - 1))


def cgls(op: LinearOperator, y: Tensor, max_iter: int = 100, tol: float = 1e-6) -> Tensor:
    """Minimum-norm least-squares solution ``argmin ||A x - y||`` by CGLS, per sample.

    Starts from ``x = 0`` (so the iterates stay in the range of ``Aᵀ`` and converge to ``A⁺ y``),
    runs at most ``max_iter`` iterations and stops a sample once ``||Aᵀ (y - A x)|| <= tol * ||Aᵀ y||``.
    The returned tensor has the shape of ``Aᵀ y``.
    """
    if max_iter < 1:
        raise ValueError(f"cgls: max_iter must be >= 1; got {max_iter}")
    if not tol >= 0:
        raise ValueError(f"cgls: tol must be >= 0; got {tol}")
    r = y
    s = op._adjoint(r)
    x = torch.zeros_like(s)
    p = s
    gamma = _bdot(s, s)
    stop = tol**2 * gamma
    active = gamma > 0
    for _ in range(max_iter):
        if not bool(active.any()):
            break
        q = op._forward(p)
        qq = _bdot(q, q)
        alpha = torch.where(active & (qq > 0), gamma / torch.where(qq > 0, qq, torch.ones_like(qq)), 0.0)
        x = x + _bview(alpha, x) * p
        r = r - _bview(alpha, r) * q
        s = op._adjoint(r)
        gamma_new = _bdot(s, s)
        beta = torch.where(active & (gamma > 0), gamma_new / torch.where(gamma > 0, gamma, torch.ones_like(gamma)), 0.0)
        p = s + _bview(beta, p) * p
        gamma = gamma_new
        active = active & (gamma > stop)
    return x


# ====================================================================== identity / composition
class Identity(LinearOperator):
    """``A = I`` (denoising). ``Aᵀ = A⁺ = I``. Accepts tensors of any shape."""

    has_pinv = True

    def _forward(self, x: Tensor) -> Tensor:
        return x

    def _adjoint(self, y: Tensor) -> Tensor:
        return y

    def _pinv(self, y: Tensor) -> Tensor:
        return y

    def _output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape

    def _input_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape

    def get_config(self) -> dict[str, Any]:
        return {"type": "Identity", "args": {}}


class Compose(LinearOperator):
    """``A = A_1 ∘ A_2 ∘ ... ∘ A_n`` (``A_n`` applied first); ``Aᵀ = A_nᵀ ∘ ... ∘ A_1ᵀ``.

    No closed-form pseudo-inverse in general (``pinv`` raises; use ``pinv_cg``).
    """

    def __init__(self, *operators: LinearOperator) -> None:
        super().__init__()
        flat: list[LinearOperator] = []
        for op in operators:
            if isinstance(op, Compose):
                flat.extend(op.ops)
            elif isinstance(op, LinearOperator):
                flat.append(op)
            else:
                raise ValueError(f"Compose: expected LinearOperator instances; got {type(op).__name__}")
        if not flat:
            raise ValueError("Compose needs at least one operator")
        self.ops = nn.ModuleList(flat)

    def describe(self) -> str:
        return "Compose(" + " @ ".join(op.describe() for op in self.ops) + ")"

    def _forward(self, x: Tensor) -> Tensor:
        for op in reversed(self.ops):
            x = op(x)
        return x

    def _adjoint(self, y: Tensor) -> Tensor:
        for op in self.ops:
            y = op.adjoint(y)
        return y

    def _output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        for op in reversed(self.ops):
            shape = op._output_shape(shape)
        return shape

    def _input_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        for op in self.ops:
            shape = op._input_shape(shape)
        return shape

    def get_config(self) -> dict[str, Any]:
        return {"type": "Compose", "args": {"operators": [op.get_config() for op in self.ops]}}

    @classmethod
    def _from_args(cls, operators: Sequence[dict[str, Any]]) -> Compose:
        return cls(*[operator_from_config(c) for c in operators])


# ====================================================================== matrices
class MatrixOperator(LinearOperator):
    """A dense matrix ``M`` of shape ``[m, d]`` behind the operator interface.

    ``forward(x) = x_flat @ Mᵀ`` with ``x`` of shape ``[B, *in_shape]`` (``in_shape`` defaults to
    ``(d,)``; give ``(C, H, W)`` to act on flattened images), output ``[B, m]``;
    ``adjoint(y) = y @ M`` reshaped to ``[B, *in_shape]``; ``pinv(y) = y @ M⁺ᵀ`` with ``M⁺`` from
    ``torch.linalg.pinv`` in float64 (singular values below ``rcond * s_max`` are dropped).
    Used with the exact Gaussian-mixture posteriors.
    """

    has_pinv = True

    def __init__(self, matrix: Tensor, in_shape: Sequence[int] | None = None, rcond: float = 1e-12) -> None:
        super().__init__()
        m = _as_float64(matrix, "MatrixOperator: matrix")
        if m.ndim != 2 or min(m.shape) < 1:
            raise ValueError(f"MatrixOperator: matrix must be 2-D [m, d]; got shape {_shape_str(m.shape)}")
        d = m.shape[1]
        shape = (d,) if in_shape is None else tuple(int(s) for s in in_shape)
        if math.prod(shape) != d:
            raise ValueError(f"MatrixOperator: in_shape {_shape_str(shape)} has {math.prod(shape)} entries "
                             f"but the matrix has {d} columns")
        if not rcond >= 0:
            raise ValueError(f"MatrixOperator: rcond must be >= 0; got {rcond}")
        self.register_buffer("matrix", m)
        self.in_shape = shape
        self.rcond = float(rcond)
        self._pinv_cache: Tensor | None = None

    def describe(self) -> str:
        return f"MatrixOperator({self.matrix.shape[0]}x{self.matrix.shape[1]})"

    def _m(self, t: Tensor) -> Tensor:
        return self.matrix.to(device=t.device, dtype=t.dtype)

    def _forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], -1) @ self._m(x).T

    def _adjoint(self, y: Tensor) -> Tensor:
        return (y @ self._m(y)).reshape((y.shape[0],) + self.in_shape)

    def pinv_matrix(self) -> Tensor:
        """``M⁺`` (float64, ``[d, m]``), computed once."""
        if self._pinv_cache is None or self._pinv_cache.device != self.matrix.device:
            self._pinv_cache = torch.linalg.pinv(self.matrix, rtol=self.rcond)
        return self._pinv_cache

    def _pinv(self, y: Tensor) -> Tensor:
        mp = self.pinv_matrix().to(device=y.device, dtype=y.dtype)
        return (y @ mp.T).reshape((y.shape[0],) + self.in_shape)

    def _output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if len(shape) < 1 or shape[1:] != self.in_shape:
            raise ValueError(f"{self.describe()}: input must be [B, {', '.join(map(str, self.in_shape))}]; "
                             f"got {_shape_str(shape)}")
        return (shape[0], self.matrix.shape[0])

    def _input_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if len(shape) != 2 or shape[1] != self.matrix.shape[0]:
            raise ValueError(f"{self.describe()}: measurement must be [B, {self.matrix.shape[0]}]; "
                             f"got {_shape_str(shape)}")
        return (shape[0],) + self.in_shape

    def get_config(self) -> dict[str, Any]:
        return {"type": "MatrixOperator",
                "args": {"matrix": self.matrix.cpu(), "in_shape": list(self.in_shape), "rcond": self.rcond}}


# ====================================================================== inpainting
class Inpainting(LinearOperator):
    """``A = diag(mask)``, keeping the image shape: ``A x = mask * x``.

    ``mask`` is ``[H, W]``, ``[C, H, W]`` or ``[P, C, H, W]`` with ``C`` equal to 1 (shared by the
    channels) or to the image's channel count, and ``P`` equal to 1 or the batch size. Values are
    usually 0 (missing) / 1 (observed); then ``A = Aᵀ = A⁺``. For a general mask,
    ``A⁺ = diag(1/m where m != 0, else 0)``.
    """

    has_pinv = True

    def __init__(self, mask: Tensor) -> None:
        super().__init__()
        m = _as_float64(mask, "Inpainting: mask")
        if m.ndim == 2:
            m = m[None, None]
        elif m.ndim == 3:
            m = m[None]
        if m.ndim != 4 or min(m.shape) < 1:
            raise ValueError("Inpainting: mask must be [H, W], [C, H, W] or [B, C, H, W]; "
                             f"got {_shape_str(m.shape)}")
        self.register_buffer("mask", m)

    def describe(self) -> str:
        p, c, h, w = self.mask.shape
        return f"Inpainting(mask {h}x{w}, {p} per batch, {c} channel(s))"

    def observed_fraction(self) -> float:
        """Fraction of mask entries that are non-zero."""
        return float((self.mask != 0).double().mean())

    def _m(self, t: Tensor) -> Tensor:
        return self.mask.to(device=t.device, dtype=t.dtype)

    def _forward(self, x: Tensor) -> Tensor:
        return x * self._m(x)

    _adjoint = _forward

    def _pinv(self, y: Tensor) -> Tensor:
        m = self._m(y)
        nz = m != 0
        inv = torch.where(nz, 1.0 / torch.where(nz, m, torch.ones_like(m)), torch.zeros_like(m))
        return y * inv

    def _output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        self._check_image_shape(shape, "image")
        p, c, h, w = self.mask.shape
        if shape[-2:] != (h, w):
            raise ValueError(f"{self.describe()}: mask size {h}x{w} does not match image size {shape[2]}x{shape[3]}")
        if c != 1 and c != shape[1]:
            raise ValueError(f"{self.describe()}: mask has {c} channels but the image has {shape[1]}")
        self._check_batch(p, shape[0], "mask")
        return shape

    _input_shape = _output_shape

    def get_config(self) -> dict[str, Any]:
        return {"type": "Inpainting", "args": {"mask": self.mask.cpu()}}


# ====================================================================== blur
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


# ====================================================================== super-resolution
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


# ====================================================================== (de)serialisation
OPERATOR_TYPES: dict[str, Callable[..., LinearOperator]] = {
    "Identity": Identity,
    "Compose": Compose._from_args,
    "MatrixOperator": MatrixOperator,
    "Inpainting": Inpainting,
    "Blur": Blur,
    "SuperResolution": SuperResolution,
}


def operator_from_config(config: dict[str, Any]) -> LinearOperator:
    """Rebuild an operator from :meth:`LinearOperator.get_config` output."""
    if not isinstance(config, dict) or "type" not in config:
        raise ValueError("operator config must be a dict with a 'type' entry")
    kind = config["type"]
    if kind not in OPERATOR_TYPES:
        raise ValueError(f"unknown operator type {kind!r}; known: {', '.join(sorted(OPERATOR_TYPES))}")
    return OPERATOR_TYPES[kind](**config.get("args", {}))
