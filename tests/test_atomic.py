"""atomic.py: whole-file replacement, no temporary file left behind, the caller's temporary name."""
from __future__ import annotations

import pytest

from atomic import atomic_write


def test_replaces_the_whole_file_and_makes_the_folder(tmp_path):
    path = tmp_path / "new" / "folder" / "report.json"
    assert atomic_write(path, b"first, and longer") == path
    atomic_write(path, lambda f: f.write(b"second"), durable=False)
    assert path.read_bytes() == b"second"
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "state.bin"
    path.write_bytes(b"old")

    def fail(f):
        f.write(b"half of the new")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, fail)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.bin"]


def test_the_temporary_name_and_the_hook_before_the_rename(tmp_path):
    path, tmp = tmp_path / "manifest.json", tmp_path / "manifest.json.tmp"
    seen = []
    atomic_write(path, b"{}", tmp=tmp, before_replace=lambda: seen.append((tmp.read_bytes(), path.exists())))
    assert seen == [(b"{}", False)]  # complete under the caller's name, not yet renamed
    assert path.read_bytes() == b"{}" and not tmp.exists()
