"""hessdiff: second-order diffusion sampling (LML) and diffusion posterior sampling in PyTorch."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hessdiff")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
