"""Versions, and the index of every completed one.

A version is a short hash of an identity: whatever the result depends on (parameters, the
versions of what was read, the code that ran (see pipeline.fingerprint), a model file). The
same identity always gives the same version, and any change gives a new one, so nothing is overwritten and
an unchanged stage is found complete. What an identity holds, and where a version's folder
lies, is the caller's to say; this module knows no stage.

`results/index.json` maps each completed version to its identity and folder; callers add what
views of it need (the leaderboard's rows), so that a view is rebuilt from the index alone. The
index is a cache: each completed version also keeps its entry in a file of its own beside its
output (`ENTRY_FILE`), from which a missing or damaged index is rebuilt.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import posixpath
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from pipeline import storage
from pipeline.errors import ConfigError
from pipeline.storage import file_lock, read_json, write_json

VERSION_LENGTH = 12
INDEX_FILE = "index.json"
# A version's own copy of its index entry, beside its output. Hidden, so that no stage reads it as
# data (a Download's folders are its classes); where a stage's output is a file among others,
# `.<its name>` + ENTRY_FILE. ENTRY_GLOB finds both.
ENTRY_FILE = ".stage.json"
ENTRY_GLOB = f".*{ENTRY_FILE[1:]}"
_ENTRY_FIELDS = ("stage", "version", "path")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def safe_name(key: str, value: Any) -> str:
    """`value` as a folder name; ConfigError unless it is a plain name."""
    value = str(value)
    if not _SAFE_NAME.match(value):
        raise ConfigError(f"{key}={value!r} must be a plain name of letters, digits, '_', '.' or '-' "
                          "(it becomes a folder name)")
    return value


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def version_of(identity: Mapping[str, Any]) -> str:
    """The version of an identity: the same mapping (whatever its key order) gives the same one."""
    return hashlib.sha256(canonical_json(identity).encode()).hexdigest()[:VERSION_LENGTH]


def index_lock(index_path: str):
    """Held while the index, or a view rebuilt from it, is read and rewritten, across processes
    (and machines, for an index on S3)."""
    return file_lock(f"{index_path}.lock")


@dataclass(frozen=True)
class IndexRepair:
    """How to rebuild a missing or damaged index: the glob patterns of the entry files, the roots
    every indexed version must lie within, and what to call with the rebuilt index (to rewrite
    the views made from it)."""
    entry_patterns: Sequence[str] = ()
    roots: Sequence[str] = ()
    rebuilt: Callable[[dict], None] | None = None


def entry_file(path: str, marker: str) -> str:
    """Where the entry file of the version at `path` lies: in its folder, or, for an output that is
    a file among others (its marker is itself: a Comparison's CSV), beside it, named after it."""
    if path == marker:
        return storage.join(storage.parent(path), f".{posixpath.splitext(storage.name(path))[0]}{ENTRY_FILE}")
    return storage.join(path, ENTRY_FILE)


def _is_entry(key: str, value: Any) -> bool:
    return (isinstance(value, dict) and all(isinstance(value.get(field), str) for field in _ENTRY_FIELDS)
            and key == f"{value['stage']}/{value['version']}")


def _salvaged(index_path: str) -> tuple[dict, bool]:
    """The index's valid entries, and whether it is intact: there, JSON, a mapping of entries only."""
    try:
        index = read_json(index_path)
    except (FileNotFoundError, ValueError):  # ValueError: not UTF-8, or not JSON
        return {}, False
    if not isinstance(index, dict):
        return {}, False
    valid = {key: entry for key, entry in index.items() if _is_entry(key, entry)}
    return valid, len(valid) == len(index)


def read_index(index_path: str) -> dict | None:
    """The index, or None when it is missing or damaged (not JSON, cut short, not a mapping, or
    holding a malformed entry): then it is to be repaired (see `load_index`)."""
    index, intact = _salvaged(index_path)
    return index if intact else None


def within(path: str, roots: Sequence[str]) -> bool:
    """Whether `path` lies within one of `roots`, not being one: what the pipeline may write or remove."""
    path = storage.absolute(path)
    return any(is_inside(path, root) and path != root for root in map(storage.absolute, roots))


def _placed(found: str, entry: dict, roots: Sequence[str]) -> bool:
    """Whether the entry file `found` is where its own entry says, for a version within `roots`
    whose marker lies within it. Entry files sit among data that downloads unpack: a planted one
    must not make gc remove, or the leaderboard show, whatever it names."""
    marker = entry.get("marker")
    return (isinstance(marker, str) and within(entry["path"], roots)
            and is_inside(storage.absolute(marker), storage.absolute(entry["path"]))
            and storage.absolute(found) == storage.absolute(entry_file(entry["path"], marker)))


def rebuilt_index(entry_patterns: Sequence[str], roots: Sequence[str]) -> dict:
    """The index made from the entry files matching `entry_patterns` that lie where their entries
    say (see `_placed`), of versions whose marker exists (an entry file outlives the removal of an
    output that is a file among others)."""
    index = {}
    for pattern in entry_patterns:
        for path in storage.glob(pattern):
            try:
                entry = read_json(path)
            except (FileNotFoundError, ValueError):
                continue  # its stage is indexed again once a run finds it complete
            key = f"{entry.get('stage')}/{entry.get('version')}" if isinstance(entry, dict) else ""
            if _is_entry(key, entry) and _placed(path, entry, roots) and storage.exists(entry["marker"]):
                index[key] = entry
    return index


def _read_or_rebuild(index_path: str, repair: IndexRepair) -> dict:
    """Under the index's lock: the index, repaired and written back first if it is missing or
    damaged. The valid entries of a damaged index are kept, over those of the entry files: the
    index is the pipeline's own file, where entry files lie among downloaded data, and the two
    hold the same entry unless one was damaged or planted. The entry files add what it lacks."""
    index, intact = _salvaged(index_path)
    if not intact:
        index = {**rebuilt_index(repair.entry_patterns, repair.roots), **index}
        write_json(index_path, index)
        if repair.rebuilt is not None:
            repair.rebuilt(index)
    return index


def load_index(index_path: str, repair: IndexRepair = IndexRepair()) -> dict:
    """The index, for reading; rebuilt (under its lock) when it is missing or damaged."""
    index = read_index(index_path)
    if index is not None:
        return index
    with index_lock(index_path):
        return _read_or_rebuild(index_path, repair)


def update_index(index_path: str, change: Callable[[dict], None],
                 then: Callable[[dict], None] | None = None, repair: IndexRepair = IndexRepair()) -> dict:
    """Apply `change` to the index in place and write it back, then call `then` with it (to rebuild
    a view), all under the index's lock, so that concurrent updates never leave a stale view. A
    missing or damaged index is rebuilt first."""
    with index_lock(index_path):
        index = _read_or_rebuild(index_path, repair)
        change(index)
        write_json(index_path, index)
        if then is not None:
            then(index)
    return index


def is_inside(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or lies within it."""
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def forget_folders(index_path: str, folders: list[str], then: Callable[[dict], None] | None = None,
                   repair: IndexRepair = IndexRepair()) -> dict:
    """Drop from the index every version whose path lies within one of `folders` (removed ones)."""
    def forget(index: dict) -> None:
        for key in [key for key, entry in index.items() if any(is_inside(entry["path"], folder) for folder in folders)]:
            del index[key]

    return update_index(index_path, forget, then, repair)


def index_entry(stage: str, version: str, path: str, identity: Mapping[str, Any], **extra: Any) -> dict:
    """An index entry: what was made, where, from what, and when, plus `extra` for views."""
    return {"stage": stage, "version": version, "path": str(path),
            "identity": json.loads(canonical_json(identity)),
            "completed_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **extra}
