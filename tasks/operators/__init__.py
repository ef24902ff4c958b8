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

from collections.abc import Callable
from typing import Any

from .base import PADDING_MODES, RESIZE_FILTERS, Compose, Identity, LinearOperator, MatrixOperator, cgls
from .blur import Blur
from .inpainting import Inpainting
from .resize import SuperResolution, cubic_kernel, resize_matrix

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
