"""Atomic writes: nothing appears at a final path until it is complete."""
from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

log = logging.getLogger(__name__)

# Temporary siblings carry this infix, so that what a crash left is recognisable as such.
TEMP_INFIX = ".tmp-"
# Names that operating systems and archivers leave beside data (.DS_Store, AppleDouble ._*, __MACOSX).
_HIDDEN_PREFIXES = (".", "__MACOSX")


def visible(name: str) -> bool:
    """Whether a file or folder name is data rather than something an OS or archiver left."""
    return not name.startswith(_HIDDEN_PREFIXES)


def visible_keys(folder: Path) -> list[str]:
    """Relative POSIX paths of every file below `folder`, leaving out hidden files and anything in
    hidden folders; sorted by path components, as sorting `Path`s would. `os.scandir` rather than
    `Path.rglob`: on 20k files, pathlib's per-file objects made listing cost more than a shard."""
    keys, pending = [], [""]
    while pending:
        prefix = pending.pop()
        with os.scandir(os.path.join(folder, prefix)) as entries:
            for entry in entries:
                if not visible(entry.name):
                    continue
                key = f"{prefix}/{entry.name}" if prefix else entry.name
                if entry.is_dir():
                    pending.append(key)
                elif entry.is_file():
                    keys.append(key)
    return sorted(keys, key=lambda key: key.split("/"))


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `final`; rename it onto `final` only if the block succeeds.

    The file is flushed to disk before the rename and the rename before returning, so that
    after a power loss `final` holds either its old content or the whole new one.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f"{final.name}{TEMP_INFIX}", dir=final.parent)
    os.close(handle)
    temp = Path(temp_name)
    try:
        yield temp
        _fsync(temp)
        os.replace(temp, final)
        _fsync(final.parent)
    finally:
        temp.unlink(missing_ok=True)


def flush_to_disk() -> None:
    """Flush everything written so far to disk. Called before a marker vouches for files that were
    not written through `atomic_path`: an extracted archive, TensorFlow's checkpoints and export."""
    os.sync()


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_path(path) as temp:
        temp.write_bytes(data)


def write_json_atomic(path: Path, payload: Any) -> None:
    write_bytes_atomic(path, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def file_lock(lock_path: Path, holder: str = "", guards: str = "") -> Iterator[None]:
    """Hold an exclusive lock on `lock_path` (created if missing), across processes; blocks until
    free, saying first what it waits for when `holder` describes it. `guards`, the path being
    written under the lock, is written into the lock file, for `held_locks`."""
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if holder:
                log.warning("waiting for another process, which is producing %s", holder)
            fcntl.flock(lock, fcntl.LOCK_EX)
        lock.truncate(0)
        lock.write(guards)
        lock.flush()
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def held_locks(folder: Path) -> list[str]:
    """What the locks in `folder` that some process holds now guard (see `file_lock`)."""
    held = []
    for lock_path in sorted(Path(folder).glob("*.lock")) if Path(folder).is_dir() else []:
        with open(lock_path) as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                held.append(lock.read())
            else:
                fcntl.flock(lock, fcntl.LOCK_UN)
    return held


def remove_temporaries(patterns: Iterable[Path]) -> None:
    """Remove what matches the glob `patterns` (wildcards in any component): files or folders a
    crashed run left."""
    for pattern in patterns:
        for leftover in sorted(map(Path, glob.glob(str(pattern)))):
            log.warning("removing %s, left by an interrupted run", leftover)
            remove_tree(leftover)


def remove_tree(path: Path) -> None:
    """Remove a file or folder if it exists."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)

