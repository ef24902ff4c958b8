"""Value checks of sweep configurations: each raises :class:`SweepConfigError` naming the file, section and key;
canonical JSON and the hashes of configurations."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hessdiff.utils.seeds import parse_seeds as _parse_seeds
from hessdiff.utils.suggest import did_you_mean

_LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+=-]*$")


class SweepConfigError(ValueError):
    """A sweep configuration is invalid; the message names the file, section and key."""


# ----------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------


def _unknown(where: str, key: str, known: Sequence[str]) -> SweepConfigError:
    return SweepConfigError(f"{where}: unknown key {key!r} (known: {', '.join(known)}){did_you_mean(key, known)}")


def _check_keys(where: str, table: Any, known: Sequence[str]) -> dict[str, Any]:
    if not isinstance(table, Mapping):
        raise SweepConfigError(f"{where}: expected a table, got {type(table).__name__}")
    for key in table:
        if key not in known:
            raise _unknown(where, str(key), known)
    return dict(table)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(where: str, key: str, v: Any, *, minimum: int | None = None) -> int:
    if not _is_int(v):
        raise SweepConfigError(f"{where}: {key} must be an integer, got {v!r}")
    if minimum is not None and v < minimum:
        raise SweepConfigError(f"{where}: {key} must be >= {minimum}, got {v}")
    return int(v)


def _bool(where: str, key: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise SweepConfigError(f"{where}: {key} must be true or false, got {v!r}")
    return v


def _str(where: str, key: str, v: Any, *, choices: Sequence[str] | None = None) -> str:
    if not isinstance(v, str) or not v:
        raise SweepConfigError(f"{where}: {key} must be a non-empty string, got {v!r}")
    if choices is not None and v not in choices:
        raise SweepConfigError(f"{where}: {key} = {v!r} is not one of {', '.join(map(repr, choices))}")
    return v


def _label(where: str, key: str, v: Any) -> str:
    s = _str(where, key, v)
    if not _LABEL_RE.match(s) or len(s) > 80:
        raise SweepConfigError(
            f"{where}: {key} = {s!r} cannot be used in file names; use letters, digits and _ . + = - "
            "(at most 80 characters, not starting with a symbol)"
        )
    return s


def _slug(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_.+=-]+", "-", text).strip("-.") or "x"
    return s[:80]


def _plain(v: Any, where: str) -> Any:
    """TOML / JSON values in canonical JSON-able form (tuples -> lists, finite floats only)."""
    if isinstance(v, Mapping):
        return {str(k): _plain(u, where) for k, u in v.items()}
    if isinstance(v, list | tuple):
        return [_plain(u, where) for u in v]
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, float) and not math.isfinite(v):
        raise SweepConfigError(f"{where}: non-finite number {v!r} is not allowed")
    if v is None or isinstance(v, bool | int | float | str):
        return v
    raise SweepConfigError(f"{where}: value {v!r} of type {type(v).__name__} cannot be stored in a result record")


def canonical_json(obj: Any) -> str:
    """Canonical JSON text (sorted keys, no spaces, ASCII) used for hashing."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def config_hash(obj: Any, length: int = 16) -> str:
    """First ``length`` hex digits of the SHA-256 of :func:`canonical_json` of ``obj``."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:length]


# ----------------------------------------------------------------------------------------------
# seeds
# ----------------------------------------------------------------------------------------------


def parse_seeds(value: Any, where: str = "seeds") -> tuple[int, ...]:
    """A sweep's seeds (:func:`hessdiff.utils.seeds.parse_seeds`: an int, a list of ints, or a string like
    ``"0-3,7"``) in increasing order, each in ``[0, 2^63)``; errors are :class:`SweepConfigError` naming ``where``."""
    try:
        return tuple(sorted(_parse_seeds(value, bound=2**63)))
    except ValueError as exc:
        raise SweepConfigError(f"{where}: {exc}") from None


def _entries(where: str, raw: Any, key: str) -> list[Any]:
    if isinstance(raw, Mapping):
        return [raw]
    if not isinstance(raw, list):
        raise SweepConfigError(f"{where}: {key} must be an array of tables ([[{key}]]), got {type(raw).__name__}")
    return raw


def _resolve_path(base: Path | None, p: str) -> Path:
    path = Path(p).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    return path


def _unique(name: str, section: str, labels: list[str]) -> None:
    seen: set[str] = set()
    for lab in labels:
        if lab in seen:
            raise SweepConfigError(f"{name}: {section}: label {lab!r} is used twice; give each entry a "
                                   "distinct 'label'")
        seen.add(lab)


def _resolution(where: str, v: Any) -> tuple[int, int]:
    if _is_int(v):
        if v <= 0:
            raise SweepConfigError(f"{where}: resolution must be positive, got {v}")
        return (v, v)
    if isinstance(v, list) and len(v) == 2 and all(_is_int(u) and u > 0 for u in v):
        return (int(v[0]), int(v[1]))
    raise SweepConfigError(f"{where}: resolution must be a positive int or [height, width], got {v!r}")


def _channels(where: str, v: Any) -> int:
    if v not in (1, 3) or isinstance(v, bool):
        raise SweepConfigError(f"{where}: channels must be 1 (grey) or 3 (colour), got {v!r}")
    return int(v)


def _parse_steps(where: str, raw: Any) -> tuple[int, ...]:
    vals = [raw] if _is_int(raw) else raw
    if not isinstance(vals, list) or not vals:
        raise SweepConfigError(f"{where}: steps must be a positive int or a non-empty list of them, got {raw!r}")
    for v in vals:
        if not _is_int(v) or v < 1:
            raise SweepConfigError(f"{where}: steps must be positive integers, got {v!r}")
    if len(set(vals)) != len(vals):
        raise SweepConfigError(f"{where}: steps {vals} contain duplicates")
    return tuple(sorted(int(v) for v in vals))
