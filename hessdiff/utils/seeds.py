"""Seed lists: ``"0-15"``, ``"0,3,7"``, ``"0-3,9"``, an int, or a list of ints.

:func:`parse_seeds` is the one parser behind ``hessdiff sample --seeds`` and a sweep's ``seeds``;
:func:`format_seeds` writes the compact form back.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

__all__ = ["SEED_BOUND", "format_seeds", "parse_seeds"]

SEED_BOUND = 2**64
"""Seeds lie in ``[0, SEED_BOUND)`` by default (what ``torch.Generator.manual_seed`` takes)."""

_EXAMPLE = "write e.g. 0-15, 0,3,7 or 0-3,9"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _bound_text(bound: int) -> str:
    return f"2^{bound.bit_length() - 1}" if bound > 0 and bound & (bound - 1) == 0 else str(bound)


def parse_seeds(value: int | str | Sequence[int], *, limit: int | None = None, bound: int = SEED_BOUND) -> list[int]:
    """The seeds ``value`` names, in the order given.

    ``value`` is a non-negative int, a sequence of them, or a string of comma-separated entries, each a
    seed ``N`` or an inclusive range ``A-B`` (``"0-15"``, ``"0,3,7"``, ``"0-3,9"``; whitespace is
    ignored). Seeds must lie in ``[0, bound)``; at most ``limit`` seeds (no limit when ``None``).

    Raises:
        ValueError: empty input or entry, a malformed entry, a range whose end is below its start, a
            seed out of range, too many seeds, or a seed given more than once (the message says which;
            callers prefix it with the option or key it came from).
    """
    seeds: list[int] = []

    def add(lo: int, hi: int) -> None:
        if lo < 0 or hi >= bound:
            got = str(lo if lo < 0 else hi) if lo == hi else f"{lo}..{hi}"
            raise ValueError(f"seeds must lie in [0, {_bound_text(bound)}), got {got}")
        if limit is not None and len(seeds) + hi - lo + 1 > limit:
            raise ValueError(f"more than {limit} seeds")
        seeds.extend(range(lo, hi + 1))

    if _is_int(value):
        add(value, value)
    elif isinstance(value, str):
        for part in value.split(","):
            part = "".join(part.split())
            if not part:
                raise ValueError(f"empty entry in {value!r} ({_EXAMPLE})")
            lo_s, sep, hi_s = part.partition("-")
            try:
                lo = int(lo_s)
                hi = int(hi_s) if sep else lo
            except ValueError:
                where = f" in {value!r}" if part != "".join(value.split()) else ""
                raise ValueError(f"cannot read {part!r}{where} as a seed or a range A-B of non-negative integers "
                                 f"({_EXAMPLE})") from None
            if hi < lo:
                raise ValueError(f"the range {part!r} is empty (end < start)")
            add(lo, hi)
    elif isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):
        for v in value:
            if not _is_int(v):
                raise ValueError(f"seeds must be integers, got {v!r}")
            add(v, v)
    else:
        raise ValueError(f"seeds must be an int, a list of ints or a string ({_EXAMPLE}), got {value!r}")
    if not seeds:
        raise ValueError("no seeds given")
    dup = sorted(s for s, k in Counter(seeds).items() if k > 1)
    if dup:
        raise ValueError(f"duplicate seed(s) {dup[:5]}{' ...' if len(dup) > 5 else ''} (each seed may be given once)")
    return seeds


def format_seeds(seeds: Sequence[int]) -> str:
    """Compact canonical form of a seed list (sorted, consecutive runs as ranges), e.g. ``"0-3,7"``."""
    parts: list[str] = []
    s = sorted(seeds)
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[j] + 1:
            j += 1
        parts.append(str(s[i]) if i == j else f"{s[i]}-{s[j]}")
        i = j + 1
    return ",".join(parts)
