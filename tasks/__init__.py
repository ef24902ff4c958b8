"""Inverse problems for diffusion posterior sampling.

* Operators (:mod:`.operators`): ``nn.Module``s with ``A(x)``, a true ``A.adjoint(y)`` and
  ``A.pinv(y)`` where closed-form — :class:`Identity`, :class:`Inpainting`, :class:`Blur`,
  :class:`SuperResolution`, :class:`MatrixOperator`, :class:`Compose` (``A @ B``).
* Kernels (:mod:`.kernels`) and masks (:mod:`.masks`) from seeded generators or files.
* Noise (:mod:`.noise`): :class:`GaussianNoise` with ``σ_y`` on the ``[-1, 1]`` scale
  (:func:`from_scale` converts), :class:`PoissonNoise`.
* Tasks (:mod:`.task`): the registry :data:`TASKS`, :func:`make_task`, paper presets
  (:func:`load_preset`: ``dps-256``, ``psld-512``, ``stsl-512``), :class:`Measurement` with
  :func:`load_measurement` for exact reproduction.
* deepinv interoperability (:mod:`.deepinv_adapter`): :func:`from_deepinv`, :func:`to_deepinv`.

Images are ``[B, C, H, W]`` float tensors in ``[-1, 1]``; image files are read and written with
:mod:`hessdiff.utils.images`.
"""

from .deepinv_adapter import DeepinvOperator, as_operator, from_deepinv, to_deepinv
from .kernels import gaussian_kernel, load_kernel, motion_blur_kernel
from .masks import box_mask, freeform_mask, png_mask, random_mask
from .noise import GaussianNoise, NoiseModel, NoNoise, PoissonNoise, from_scale
from .operators import (
    Blur,
    Compose,
    Identity,
    Inpainting,
    LinearOperator,
    MatrixOperator,
    SuperResolution,
    cgls,
    operator_from_config,
    resize_matrix,
)
from .task import (
    TASKS,
    Measurement,
    Preset,
    Task,
    list_presets,
    load_measurement,
    load_preset,
    make_task,
    task_parameters,
)

__all__ = [
    "LinearOperator",
    "Identity",
    "Compose",
    "MatrixOperator",
    "Inpainting",
    "Blur",
    "SuperResolution",
    "cgls",
    "resize_matrix",
    "operator_from_config",
    "gaussian_kernel",
    "motion_blur_kernel",
    "load_kernel",
    "box_mask",
    "random_mask",
    "freeform_mask",
    "png_mask",
    "NoiseModel",
    "NoNoise",
    "GaussianNoise",
    "PoissonNoise",
    "from_scale",
    "Task",
    "Measurement",
    "TASKS",
    "make_task",
    "task_parameters",
    "Preset",
    "load_preset",
    "list_presets",
    "load_measurement",
    "DeepinvOperator",
    "from_deepinv",
    "to_deepinv",
    "as_operator",
]
