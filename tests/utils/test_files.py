"""Atomic writes: all-or-nothing, no overwrite unless asked, normal permissions, no leftovers."""

from __future__ import annotations

import os
import stat

import pytest

from hessdiff.utils.files import atomic_write, atomic_write_many, is_temp_file, remove_temp_files


@pytest.fixture()
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_bytes_text_and_writer_contents(tmp_path):
    assert atomic_write(tmp_path / "a.bin", b"\x00\x01") == tmp_path / "a.bin"
    atomic_write(tmp_path / "b.txt", "π ± 1\n")
    atomic_write(tmp_path / "c.dat", lambda p: p.write_bytes(b"from a writer"))
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "b.txt").read_bytes() == "π ± 1\n".encode()
    assert (tmp_path / "c.dat").read_bytes() == b"from a writer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.txt", "c.dat"]


def test_new_files_get_normal_permissions(tmp_path, umask_022):
    atomic_write(tmp_path / "a", b"x")
    atomic_write(tmp_path / "b", lambda p: p.write_text("y"))
    assert _mode(tmp_path / "a") == 0o644 and _mode(tmp_path / "b") == 0o644


def test_no_overwrite_unless_asked_and_overwrite_keeps_the_mode(tmp_path, umask_022):
    p = tmp_path / "f"
    atomic_write(p, b"old")
    os.chmod(p, 0o600)
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        atomic_write(p, b"new")
    assert p.read_bytes() == b"old"
    atomic_write(p, b"new", overwrite=True)
    assert p.read_bytes() == b"new" and _mode(p) == 0o600


def test_many_files_all_or_nothing(tmp_path):
    def boom(path):
        path.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_many({tmp_path / "a": b"a", tmp_path / "b": boom})
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "b").write_bytes(b"keep")
    with pytest.raises(FileExistsError, match="b"):
        atomic_write_many({tmp_path / "a": b"a", tmp_path / "b": b"b"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"] and (tmp_path / "b").read_bytes() == b"keep"
    assert atomic_write_many({tmp_path / "a": b"a", tmp_path / "b": b"b"}, overwrite=True) == [tmp_path / "a",
                                                                                                tmp_path / "b"]
    assert (tmp_path / "a").read_bytes() == b"a" and (tmp_path / "b").read_bytes() == b"b"


def test_a_target_created_meanwhile_is_not_replaced(tmp_path):
    target = tmp_path / "b"

    def someone_else_writes_b(path):  # another process creates the target while we write
        target.write_bytes(b"theirs")
        path.write_bytes(b"ours")

    with pytest.raises(FileExistsError):
        atomic_write_many({tmp_path / "a": b"a", target: someone_else_writes_b})
    assert target.read_bytes() == b"theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # "a" was taken back, no temporary files


def test_folders_and_arguments(tmp_path):
    with pytest.raises(FileNotFoundError):
        atomic_write(tmp_path / "sub" / "f", b"x")
    atomic_write(tmp_path / "sub" / "deeper" / "f", b"x", mkdir=True)
    assert (tmp_path / "sub" / "deeper" / "f").read_bytes() == b"x"
    with pytest.raises(ValueError, match="twice"):
        atomic_write_many({tmp_path / "g": b"1", str(tmp_path / "g"): b"2"})


def test_temporary_files_are_recognised_and_removed(tmp_path):
    (tmp_path / "d").mkdir()
    left = [tmp_path / ".f.png.0123456789ab.tmp", tmp_path / "d" / ".g.json.abcdef012345.tmp"]
    for p in left:
        p.write_bytes(b"")
    kept = [tmp_path / "f.png", tmp_path / ".hidden", tmp_path / ".f.png.0123.tmp"]
    for p in kept:
        p.write_bytes(b"")
    assert all(is_temp_file(p) for p in left) and not any(is_temp_file(p) for p in kept)
    assert remove_temp_files(tmp_path, recursive=False) == 1 and left[1].exists()
    assert remove_temp_files(tmp_path) == 1 and not any(p.exists() for p in left)
    assert all(p.exists() for p in kept)


def test_overwrite_with_a_folder_in_the_way_writes_nothing(tmp_path):
    (tmp_path / "a.txt").write_text("old a")
    (tmp_path / "c.txt").mkdir()
    with pytest.raises(IsADirectoryError, match="c.txt"):
        atomic_write_many({tmp_path / "a.txt": "new a", tmp_path / "b.txt": "b", tmp_path / "c.txt": "c"},
                          overwrite=True)
    assert (tmp_path / "a.txt").read_text() == "old a" and not (tmp_path / "b.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "c.txt"]
