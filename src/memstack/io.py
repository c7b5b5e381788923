"""Crash-safe writes and validated reads of memstack's on-disk artefacts (no pickle anywhere).

A directory is written into a temporary sibling, every file fsynced, then renamed into place, so a
crash leaves either the old directory or the new one, never a mix. A process killed mid-write
leaves its temporary behind (``.NAME.tmp-<8 random characters>``); the next write of that name, or
:func:`remove_stale_temporaries`, removes it. New files and directories get the modes the umask
gives (``tempfile`` alone would leave them private: 0600 and 0700).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# tempfile's names: prefix + 8 characters of this alphabet. Only names of exactly this shape
# are ours to delete.
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-[a-z0-9_]{8}$")


def current_umask() -> int:
    """The process's umask.

    Read from ``/proc/self/status`` where Linux has it (a read, safe while other threads create
    files); elsewhere by setting and restoring it, which another thread creating a file in that
    instant would see as 0 (acceptable for our single-writer saves).
    """
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    old = os.umask(0)
    os.umask(old)
    return old


def remove_stale_temporaries(directory: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Remove what killed :func:`atomic_directory` / :func:`write_json` calls left in ``directory``.

    Only entries named like ours (``.TARGET.tmp-`` or ``.TARGET.old-`` and 8 random characters)
    are touched, and only those whose TARGET fully matches the regular expression ``name`` (None:
    any). One writer per target is assumed: a temporary of a write still in progress would be removed too.
    If a process died between moving the old copy of TARGET aside and renaming the new one into
    place, TARGET is missing and its complete old copy is moved back instead of deleted.

    Returns:
        The paths removed.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    pattern = re.compile(name) if name is not None else None
    stale = []
    for entry in sorted(directory.iterdir()):
        m = _TEMP_NAME.match(entry.name)
        if m and (pattern is None or pattern.fullmatch(m.group("name"))):
            stale.append((entry, m.group("name"), m.group("kind")))
    removed = []
    for entry, target, kind in stale:
        saved = entry / target
        if kind == "old" and not (directory / target).exists() and saved.is_dir():
            os.rename(saved, directory / target)
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
        removed.append(entry)
    return removed


def _fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it replaces ``path`` atomically.

    If the body raises, ``path`` is left exactly as it was and the temporary directory is removed.
    Temporaries of ``path`` left by a killed earlier call are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent, re.escape(path.name))
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it 0700
        _fsync_tree(tmp)
        if path.exists():
            # rename() cannot replace a non-empty directory: move the old one aside first, so a
            # crash between the two renames still leaves a complete copy on disk.
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.rename(path, old / path.name)
            os.rename(tmp, path)
            shutil.rmtree(old)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically (temp file, fsync, rename), with the umask's mode.

    Temporaries of ``path`` left by a killed earlier call are removed first.
    """
    path = Path(path)
    remove_stale_temporaries(path.parent, re.escape(path.name))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~current_umask())  # mkstemp makes it 0600
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write JSON atomically (see :func:`write_text`)."""
    write_text(path, json.dumps(data, indent=2, sort_keys=True))


def read_manifest(path: str | os.PathLike, kind: str, version: int) -> dict[str, Any]:
    """Read a JSON manifest and check its ``format`` and ``version`` fields.

    Raises:
        FileNotFoundError: if the file is missing.
        ValueError: if it is not JSON, not of this kind, or of a newer format version.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {kind} manifest at {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(
            f"{path} is not a {kind} manifest: expected a JSON object, got {type(data).__name__}"
        )
    if data.get("format") != kind:
        raise ValueError(f"{path} is not a {kind} manifest (format={data.get('format')!r})")
    v = data.get("version")
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= version:
        raise ValueError(f"{path} has {kind} version {v!r}; this memstack reads versions 1 to {version}")
    return data


def umask_mode(directory: bool) -> int:
    """Permission bits a plain ``open()``/``mkdir()`` would give under the process umask."""
    return (0o777 if directory else 0o666) & ~current_umask()


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is fsynced and renamed onto ``path``.

    Temporaries are named ``.{name}.tmp-<8 random characters>``; ones left by a killed earlier write of the
    same file are removed first. If the body raises, ``path`` is untouched.

    Raises:
        IsADirectoryError: if ``path`` is a directory.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; expected a file path")
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        with contextlib.suppress(OSError):
            stale.unlink()
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as f:  # on disk before the rename makes it visible
            os.fsync(f.fileno())
        os.chmod(tmp, umask_mode(directory=False))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
