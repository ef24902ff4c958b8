"""'Did you mean ...?' hints for unknown names (:func:`difflib.get_close_matches`)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["did_you_mean"]


def did_you_mean(name: str, known: Iterable[str], *, cutoff: float = 0.6) -> str:
    """``"; did you mean 'x'?"`` for the known name closest to ``name``, or ``""`` when none is close
    (``difflib.get_close_matches(name, known, n=1, cutoff=cutoff)``). Meant to end an error message::

        raise ValueError(f"unknown method {name!r} (known: {', '.join(known)}){did_you_mean(name, known)}")
    """
    close = difflib.get_close_matches(str(name), [str(k) for k in known], n=1, cutoff=cutoff)
    return f"; did you mean {close[0]!r}?" if close else ""
