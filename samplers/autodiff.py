"""Jacobian products through networks whose kernels lack higher-order rules.

PyTorch's fused attention kernels (the CPU flash kernel in the mid-block attention of diffusers UNets and
VAEs) have no forward-mode or double-backward rule; the math backend has both. Every JVP in hessdiff
(curvature from the denoiser, MMPS / TMPD / PiGDM through a decoder) runs under :func:`math_attention`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["math_attention", "forward_jvp"]


def math_attention() -> Any:
    """A context selecting PyTorch's math attention backend (differentiable to any order)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3: a single backend, nothing to select
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def forward_jvp(f: Callable[[Tensor], Tensor], z: Tensor, w: Tensor) -> Tensor:
    """``J_f(z) w`` by forward-mode AD (e.g. ``A J_D w`` through a decoder at ``z``), ``w`` cast to ``z``'s
    dtype, under :func:`math_attention`."""
    with math_attention():
        return torch.func.jvp(f, (z,), (w.to(z.dtype),))[1]
