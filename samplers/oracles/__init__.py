"""Exact oracles: Gaussian-mixture priors with closed-form scores, Jacobians and posteriors."""

from .gmm import *  # noqa: F401,F403
from .gmm import __all__  # noqa: F401
