"""Interoperability with deepinv (optional extra ``hessdiff[deepinv]``).

* :func:`from_deepinv` wraps a deepinv ``LinearPhysics`` (``A``, ``A_adjoint``, ``A_dagger``) as a
  hessdiff :class:`~hessdiff.tasks.operators.LinearOperator`, so it can be used wherever a hessdiff
  operator is expected.
* :func:`to_deepinv` wraps a hessdiff operator as a deepinv ``LinearPhysics``.
* :func:`as_operator` accepts a hessdiff operator, a deepinv linear physics or a 2-D matrix.

deepinv is imported only inside :func:`to_deepinv`; :func:`from_deepinv` works by duck typing.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .operators import LinearOperator, MatrixOperator

__all__ = ["DeepinvOperator", "from_deepinv", "to_deepinv", "as_operator"]


def _is_linear_physics(obj: Any) -> bool:
    return callable(getattr(obj, "A", None)) and callable(getattr(obj, "A_adjoint", None))


class DeepinvOperator(LinearOperator):
    """A deepinv ``LinearPhysics`` seen as a hessdiff operator.

    ``forward = physics.A``, ``adjoint = physics.A_adjoint`` (deepinv's own, which deepinv defines as
    the true adjoint), ``pinv = physics.A_dagger`` (closed form where deepinv has one, otherwise its
    least-squares solver). Shapes are discovered by applying ``A`` / ``A_adjoint`` once to zeros of
    the argument's dtype and device (cached per shape, dtype and device); pass
    ``in_shape`` (one image, without batch) to fix the adjoint's output shape when the physics
    cannot infer it. The physics' noise model is not applied (hessdiff tasks add noise themselves).
    """

    has_pinv = True

    def __init__(self, physics: Any, in_shape: tuple[int, ...] | None = None) -> None:
        super().__init__()
        if not _is_linear_physics(physics):
            raise ValueError(f"from_deepinv: expected a deepinv LinearPhysics (with A and A_adjoint); "
                             f"got {type(physics).__name__}")
        self.physics = physics
        self.in_shape = None if in_shape is None else tuple(int(s) for s in in_shape)
        self._out_cache: dict[tuple, tuple[int, ...]] = {}
        self._in_cache: dict[tuple, tuple[int, ...]] = {}

    def describe(self) -> str:
        return f"DeepinvOperator({type(self.physics).__name__})"

    def _forward(self, x: Tensor) -> Tensor:
        return self.physics.A(x)

    def _adjoint(self, y: Tensor) -> Tensor:
        return self.physics.A_adjoint(y)

    def _pinv(self, y: Tensor) -> Tensor:
        return self.physics.A_dagger(y)

    def _probe_dtype(self) -> tuple[torch.dtype, torch.device]:
        """dtype / device of the physics' own tensors (float32 on the CPU if it has none)."""
        modules = [self.physics] if isinstance(self.physics, torch.nn.Module) else []
        for m in modules:
            for t in list(m.buffers()) + list(m.parameters()):
                if t.is_floating_point():
                    return t.dtype, t.device
        return torch.float32, torch.device("cpu")

    def _probe(self, cache: dict, fn: Any, shape: tuple[int, ...], dtype: torch.dtype | None,
               device: torch.device | None, what: str) -> tuple[int, ...]:
        if dtype is None or device is None:
            dtype, device = self._probe_dtype()
        key = (shape, dtype, device)
        if key not in cache:
            try:
                with torch.no_grad():
                    out = fn(torch.zeros(shape, dtype=dtype, device=device))
            except Exception as exc:  # noqa: BLE001 - deepinv raises many kinds of errors on bad shapes
                raise ValueError(f"{self.describe()}: cannot {what} a tensor of shape {list(shape)}: {exc}") from exc
            cache[key] = tuple(out.shape)
        return cache[key]

    def _output_shape(self, shape: tuple[int, ...], dtype: torch.dtype | None = None,
                      device: torch.device | None = None) -> tuple[int, ...]:
        if self.in_shape is not None and shape[1:] != self.in_shape:
            raise ValueError(f"{self.describe()}: input must be [B, {', '.join(map(str, self.in_shape))}]; "
                             f"got {list(shape)}")
        return self._probe(self._out_cache, self.physics.A, shape, dtype, device, "apply A to")

    def _input_shape(self, shape: tuple[int, ...], dtype: torch.dtype | None = None,
                     device: torch.device | None = None) -> tuple[int, ...]:
        if self.in_shape is not None:
            return (shape[0],) + self.in_shape
        return self._probe(self._in_cache, self.physics.A_adjoint, shape, dtype, device, "apply the adjoint to")

    def check_input(self, x: Tensor) -> None:
        self._check_tensor(x, "input")
        self._output_shape(tuple(x.shape), x.dtype, x.device)

    def check_measurement(self, y: Tensor) -> None:
        self._check_tensor(y, "measurement")
        self._input_shape(tuple(y.shape), y.dtype, y.device)


def from_deepinv(physics: Any, in_shape: tuple[int, ...] | None = None) -> DeepinvOperator:
    """Wrap a deepinv ``LinearPhysics`` as a hessdiff operator (see :class:`DeepinvOperator`)."""
    return DeepinvOperator(physics, in_shape=in_shape)


def to_deepinv(op: LinearOperator) -> Any:
    """A deepinv ``LinearPhysics`` whose ``A`` / ``A_adjoint`` are ``op`` / ``op.adjoint`` (needs deepinv)."""
    try:
        from deepinv.physics import LinearPhysics
    except ImportError as exc:
        raise ImportError("to_deepinv needs deepinv: pip install 'hessdiff[deepinv]' (or pip install deepinv)") from exc
    if not isinstance(op, LinearOperator):
        raise ValueError(f"to_deepinv expects a hessdiff LinearOperator; got {type(op).__name__}")
    physics = LinearPhysics(A=op.forward, A_adjoint=op.adjoint)
    physics.hessdiff_operator = op
    return physics


def as_operator(obj: Any) -> LinearOperator:
    """A hessdiff operator from a hessdiff operator (returned as is), a deepinv linear physics, or a 2-D matrix."""
    if isinstance(obj, LinearOperator):
        return obj
    if isinstance(obj, Tensor) and obj.ndim == 2:
        return MatrixOperator(obj)
    if _is_linear_physics(obj):
        return DeepinvOperator(obj)
    raise ValueError(f"cannot use a {type(obj).__name__} as a linear operator; pass a hessdiff LinearOperator, "
                     "a deepinv LinearPhysics or a 2-D matrix")
