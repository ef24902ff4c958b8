"""Atomic file writes: a file appears whole or not at all.

Every file is written to a temporary file in its target's folder (named ``.<name>.<12 hex digits>.tmp``,
see :func:`is_temp_file`), flushed and ``fsync``-ed, and only then moved onto the target (``os.replace``;
without ``overwrite`` a hard link, so that a file created meanwhile by someone else is never replaced);
the folder is synced afterwards. A crash therefore leaves either the old state or the complete new file,
plus at worst a temporary file that :func:`remove_temp_files` cleans up.

:func:`atomic_write_many` writes several files all-or-nothing: all of them are written to temporary files
first, and they are moved into place only when every write succeeded; any error removes the temporary
files and leaves the targets untouched. (A failure *while* moving, e.g. the disk disappearing, can leave
the first files in place.)

Content is ``bytes``, ``str`` (written as UTF-8, newlines as given) or a function ``write(tmp_path)`` that
writes the file at the path it is given (e.g. ``lambda p: torch.save(obj, p)``).

Existing targets are refused (:class:`FileExistsError`) unless ``overwrite=True``. New files get the
permissions of a file created with ``open()`` (``0o666 & ~umask``, e.g. ``0o644``), not the ``0o600`` of
:func:`tempfile.mkstemp`; an overwritten file keeps its permission bits. Missing parent folders are an
error unless ``mkdir=True``.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path

__all__ = ["Content", "atomic_write", "atomic_write_many", "is_temp_file", "remove_temp_files"]

Content = bytes | str | Callable[[Path], None]
"""What a file is written from: bytes, text (UTF-8) or a function writing the file at a given path."""

_TEMP_RE = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")
_NAME_MAX = 200  # characters of the target's name kept in its temporary file's name


def is_temp_file(name: str | os.PathLike) -> bool:
    """Whether ``name`` (a file name or path) is a temporary file of this module."""
    return bool(_TEMP_RE.match(Path(name).name))


def remove_temp_files(folder: str | os.PathLike, *, recursive: bool = True) -> int:
    """Remove the temporary files an interrupted write left in ``folder`` (and below it when
    ``recursive``); returns how many were removed. Only call it when no write into the folder is running."""
    n = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            if _TEMP_RE.match(name):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(root, name))
                    n += 1
        if not recursive:
            break
    return n


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows: folders cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_temp(target: Path, content: Content, mode: int | None) -> Path:
    """Write ``content`` to a new temporary file next to ``target``, synced; returns its path.

    ``mode``: permission bits to give it (those of the file it replaces), or ``None`` for a new file's.
    """
    tmp = target.parent / f".{target.name[:_NAME_MAX]}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)  # umask applies
    try:
        try:
            if mode is None:
                mode = os.fstat(fd).st_mode & 0o7777
            if not callable(content):
                data = content.encode("utf-8") if isinstance(content, str) else bytes(content)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
        finally:
            os.close(fd)
        if callable(content):
            content(tmp)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.chmod(tmp, mode)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return tmp


def _refusal(paths: list[Path]) -> FileExistsError:
    return FileExistsError(f"refusing to overwrite existing file(s): {', '.join(map(str, paths))} "
                           "(choose another output folder or pass overwrite)")


def _place_new(tmp: Path, target: Path) -> None:
    """Move ``tmp`` onto ``target``, which must not exist (a hard link where the file system has them)."""
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise _refusal([target]) from None
    except (OSError, NotImplementedError, AttributeError):  # no hard links here: check, then rename
        if target.exists():
            raise _refusal([target]) from None
        os.replace(tmp, target)
    else:
        os.remove(tmp)


def atomic_write_many(files: Mapping[str | os.PathLike, Content], *, overwrite: bool = False,
                      mkdir: bool = False) -> list[Path]:
    """Write several files so that either all of them appear or none does (see the module docstring).

    Args:
        files: target path -> content (bytes, str or ``write(tmp_path)``).
        overwrite: replace existing targets (otherwise any existing target raises before anything is written).
        mkdir: create missing parent folders.

    Returns:
        The target paths, in the given order.

    Raises:
        FileExistsError: a target exists and ``overwrite`` is false; nothing was written.
        IsADirectoryError: a target is an existing folder; nothing was written.
        ValueError: the same target is given twice.
    """
    targets = [Path(p) for p in files]
    if len({os.path.abspath(t) for t in targets}) != len(targets):
        raise ValueError(f"atomic_write_many: a target is given twice: {[str(t) for t in targets]}")
    if not overwrite:
        existing = [t for t in targets if t.exists() or t.is_symlink()]
        if existing:
            raise _refusal(existing)
    # checked before anything is written: a folder in the way would fail the rename after others were replaced
    folders = [t for t in targets if t.is_dir() and not t.is_symlink()]
    if folders:
        raise IsADirectoryError(f"cannot write {', '.join(map(str, folders))}: a folder of that name is in the way; "
                                "nothing was written")
    temps: list[Path] = []
    placed: list[Path] = []
    try:
        for target, content in zip(targets, files.values(), strict=True):
            if mkdir:
                target.parent.mkdir(parents=True, exist_ok=True)
            mode = None
            if overwrite:
                with contextlib.suppress(OSError):
                    mode = os.stat(target).st_mode & 0o7777
            temps.append(_write_temp(target, content, mode))
        for tmp, target in zip(temps, targets, strict=True):
            if overwrite:
                os.replace(tmp, target)
            else:
                _place_new(tmp, target)
            placed.append(target)
    except FileExistsError:
        for target in placed:  # a target appeared meanwhile: take back the new files placed so far
            with contextlib.suppress(OSError):
                target.unlink()
        raise
    finally:
        for tmp in temps:
            with contextlib.suppress(OSError):
                tmp.unlink()
    for folder in dict.fromkeys(t.parent for t in targets):
        _fsync_dir(folder)
    return targets


def atomic_write(path: str | os.PathLike, content: Content, *, overwrite: bool = False,
                 mkdir: bool = False) -> Path:
    """Write one file atomically; see :func:`atomic_write_many`. Returns the path."""
    return atomic_write_many({path: content}, overwrite=overwrite, mkdir=mkdir)[0]
