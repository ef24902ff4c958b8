"""Inpainting: multiplication by a binary (or soft) mask."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import LinearOperator, _as_float64, _shape_str


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
