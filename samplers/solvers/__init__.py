"""Base diffusion solvers over the denoiser contract."""

from .base import *  # noqa: F401,F403
from .base import __all__, _check_inputs, _progress  # noqa: F401
