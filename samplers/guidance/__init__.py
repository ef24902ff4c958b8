"""Posterior sampling with a diffusion prior: DPS, latent DPS, PSLD, STSL."""

from .posterior import *  # noqa: F401,F403
from .posterior import __all__  # noqa: F401
