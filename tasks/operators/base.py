"""The operator contract (:class:`LinearOperator`), CGLS, identity, composition and dense matrices."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

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
        from . import operator_from_config

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
