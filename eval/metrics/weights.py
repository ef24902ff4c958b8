"""Locating metric weights on disk, fetching them once, and failing with a useful message.

Metric networks (clean-fid's Inception, the torchvision backbones of LPIPS) need weight files
that are normally downloaded on first use. On a machine without network access the download
fails; :class:`MissingWeightsError` then says which file is missing, where exactly to put it,
and where it can be downloaded from, so that the user can copy it over by hand.

Downloads use a short timeout and write to a temporary file that is renamed into place only
when complete, so an interrupted download never leaves a truncated weight file behind.
"""

from __future__ import annotations

import os
import shutil
import urllib.request
from pathlib import Path

__all__ = ["MissingWeightsError", "default_cache_dir", "ensure_weights_file"]

DOWNLOAD_TIMEOUT_S = 30.0
"""Seconds to wait for a weight server to answer before giving up."""


class MissingWeightsError(RuntimeError):
    """A weight file needed by a metric is absent and could not be downloaded.

    Attributes:
        filename: the file's name, e.g. ``"alexnet-owt-7be5be79.pth"``.
        path: the exact path at which the file is looked for (place it there).
        url: where the file can be downloaded from, or ``None``.
        what: short description of the weights (e.g. ``"LPIPS-alex backbone"``).
    """

    def __init__(self, what: str, path: str | os.PathLike, url: str | None = None, reason: str = ""):
        self.what = what
        self.path = Path(path)
        self.filename = self.path.name
        self.url = url
        self.reason = reason
        msg = f"{what}: weight file '{self.filename}' is missing; place it at exactly {self.path}"
        if url:
            msg += f" (download it from {url})"
        if reason:
            msg += f". Automatic download failed: {reason}"
        super().__init__(msg)


def default_cache_dir(sub: str = "") -> Path:
    """Return hessdiff's cache folder: ``$XDG_CACHE_HOME/hessdiff`` or ``~/.cache/hessdiff``.

    Args:
        sub: optional sub-folder name (``"fid"``, ``"weights"``) appended to the path.

    The folder is not created here.
    """
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = Path(base) / "hessdiff"
    return path / sub if sub else path


def _download(url: str, dest: Path, timeout: float) -> None:
    """Download ``url`` to ``dest`` through a temporary file in the same folder (atomic rename,
    :func:`hessdiff.utils.files.atomic_write`)."""
    from hessdiff.utils.files import atomic_write

    def fetch(tmp: Path) -> None:
        with open(tmp, "wb") as f, urllib.request.urlopen(url, timeout=timeout) as response:
            shutil.copyfileobj(response, f)

    atomic_write(dest, fetch, overwrite=True, mkdir=True)


def ensure_weights_file(
    path: str | os.PathLike,
    *,
    what: str,
    url: str | None,
    download: bool = True,
    alternatives: tuple[str | os.PathLike, ...] = (),
    timeout: float = DOWNLOAD_TIMEOUT_S,
) -> Path:
    """Return a path to an existing weight file, downloading it to ``path`` if allowed.

    Args:
        path: the canonical location of the file (where it is downloaded to).
        what: description used in the error message.
        url: download address (``None``: never download).
        download: try to download when the file is absent.
        alternatives: further locations checked, in order, after ``path`` (e.g. another
            library's own cache); the first existing one is returned.
        timeout: seconds before a silent server counts as a failed download.

    Raises:
        MissingWeightsError: the file is nowhere to be found and the download is disabled or
            failed; the message names ``path``.
    """
    path = Path(path)
    for candidate in (path, *map(Path, alternatives)):
        if candidate.is_file():
            return candidate
    if not download or url is None:
        reason = "" if url is None else "downloading is disabled (download=False)"
        raise MissingWeightsError(what, path, url, reason)
    try:
        _download(url, path, timeout)
    except Exception as err:  # any failure means "not available"
        raise MissingWeightsError(what, path, url, f"{type(err).__name__}: {err}") from err
    return path
