"""LML corrections: the published Levenberg--Marquardt map and the second-order Hessian steps."""

from .corrections import *  # noqa: F401,F403
from .corrections import __all__, _check_lamb_kappa, _secant_to_level, _transport  # noqa: F401
