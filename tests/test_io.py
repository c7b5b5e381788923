import json
import os
import re
import signal
import stat
import subprocess
import sys

import pytest

from memstack.io import (
    atomic_directory,
    atomic_file,
    current_umask,
    read_manifest,
    remove_stale_temporaries,
    write_json,
)


def test_atomic_directory_replaces_on_success_and_keeps_old_on_failure(tmp_path):
    target = tmp_path / "store"
    with atomic_directory(target) as d:
        (d / "a.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as d:
            (d / "a.txt").write_text("half-new")
            raise RuntimeError("crash mid-write")
    assert (target / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["store"]  # no temp dirs left behind
    with atomic_directory(target) as d:
        (d / "b.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]


def test_read_manifest_validates(tmp_path):
    p = tmp_path / "m.json"
    write_json(p, {"format": "memstack", "version": 1, "x": 2})
    assert read_manifest(p, "memstack", 1)["x"] == 2
    with pytest.raises(ValueError, match="not a store manifest"):
        read_manifest(p, "store", 1)
    write_json(p, {"format": "memstack", "version": 9})
    with pytest.raises(ValueError, match="version 9"):
        read_manifest(p, "memstack", 1)
    p.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_manifest(p, "memstack", 1)


KILL_INSIDE = """
import os, signal, sys
from pathlib import Path
import memstack.io as io
target = Path(sys.argv[1])
if sys.argv[2] == "directory":
    with io.atomic_directory(target) as d:
        (d / "a.txt").write_text("half-new")
        os.kill(os.getpid(), signal.SIGKILL)
else:
    io.os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)  # die just before the rename
    io.write_json(target, {"new": True})
"""


@pytest.mark.parametrize("kind", ["directory", "json"])
def test_a_write_killed_midway_leaves_the_old_copy_and_the_next_write_removes_its_temporary(tmp_path, kind):
    target = tmp_path / ("store" if kind == "directory" else "m.json")
    if kind == "directory":
        with atomic_directory(target) as d:
            (d / "a.txt").write_text("old")
    else:
        write_json(target, {"new": False})
    res = subprocess.run([sys.executable, "-c", KILL_INSIDE, str(target), kind], capture_output=True)
    assert res.returncode == -signal.SIGKILL, res.stderr
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith(f".{target.name}.tmp-")]
    assert len(left) == 1  # what a killed process leaves
    if kind == "directory":
        assert (target / "a.txt").read_text() == "old"
        with atomic_directory(target) as d:
            (d / "a.txt").write_text("new")
        assert (target / "a.txt").read_text() == "new"
    else:
        assert json.loads(target.read_text()) == {"new": False}
        write_json(target, {"new": True})
        assert json.loads(target.read_text()) == {"new": True}
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_only_our_temporaries_of_the_target_are_removed(tmp_path):
    for name in (".a.json.tmp-abcd1234", ".b.json.tmp-abcd1234", ".a.json.tmp-x", "a.json.tmp-abcd1234"):
        (tmp_path / name).write_text("x")
    (tmp_path / ".a.json.old-_zz9zz9z").mkdir()
    removed = remove_stale_temporaries(tmp_path, re.escape("a.json"))
    assert sorted(p.name for p in removed) == [".a.json.old-_zz9zz9z", ".a.json.tmp-abcd1234"]
    # another target's temporary, and names not of tempfile's shape, are not ours to delete
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".a.json.tmp-x",
        ".b.json.tmp-abcd1234",
        "a.json.tmp-abcd1234",
    ]


def test_a_kill_between_the_two_renames_is_recovered(tmp_path):
    """The old copy was moved aside, the new one not yet renamed in: the old one comes back."""
    aside = tmp_path / ".store.old-abcdefgh" / "store"
    aside.mkdir(parents=True)
    (aside / "a.txt").write_text("old")
    (tmp_path / ".store.tmp-ijklmnop").mkdir()
    remove_stale_temporaries(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["store"]
    assert (tmp_path / "store" / "a.txt").read_text() == "old"


@pytest.mark.parametrize("umask, dir_mode, file_mode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)])
def test_written_files_and_directories_follow_the_umask(tmp_path, umask, dir_mode, file_mode):
    old = os.umask(umask)
    try:
        assert current_umask() == umask
        with atomic_directory(tmp_path / "store") as d:
            (d / "a.txt").write_text("x")
        write_json(tmp_path / "m.json", {})
        with atomic_file(tmp_path / "state.bin") as f:  # StackState.save, save_pretrained
            f.write_bytes(b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "state.bin").stat().st_mode) == file_mode
    assert stat.S_IMODE((tmp_path / "store").stat().st_mode) == dir_mode
    assert stat.S_IMODE((tmp_path / "store" / "a.txt").stat().st_mode) == file_mode
    assert stat.S_IMODE((tmp_path / "m.json").stat().st_mode) == file_mode
