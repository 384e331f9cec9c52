"""The index of every completed version.

`results/.index/<stage>/<version>.json` holds each completed version's entry: its identity and
folder, and what views of it need (the leaderboard's rows), so that a view is rebuilt from the
index alone. One small file per version, written whole, so that recording a stage costs the same
whatever the number of runs, and finding whether a version is indexed, or reading its entry, is
one read. Hidden, as the lock folders are: a dataset's folder, beside it, cannot be named so.

The index is a cache: each completed version also keeps its entry in a file of its own beside its
output (`ENTRY_FILE`), from which a missing or damaged index is rebuilt. `COMPLETE`, written once
the index holds every version, tells a missing index from an empty one; a repair removes it before
it changes a file. This module knows no
stage: the patterns of the entry files, and the roots they must lie within, are the caller's.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import posixpath
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

from pipeline import storage
from pipeline.errors import StageOutputError
from pipeline.locks import file_lock
from pipeline.storage import TEMP_INFIX, is_inside, read_json, write_json
from pipeline.versioning import canonical_json

INDEX_FOLDER = ".index"
COMPLETE = "COMPLETE"
# The whole index in one file, as pipelines before the one-file-per-version layout kept it: its
# entries are taken over once, when the index folder is first made, and the file removed.
LEGACY_INDEX_FILE = "index.json"
# A version's own copy of its index entry, beside its output. Hidden, so that no stage reads it as
# data (a Download's folders are its classes); where a stage's output is a file among others,
# `.<its name>` + ENTRY_FILE. ENTRY_GLOB finds both.
ENTRY_FILE = ".stage.json"
ENTRY_GLOB = f".*{ENTRY_FILE[1:]}"
_ENTRY_FIELDS = ("stage", "version", "path")
# A stage's and a version's names become the index's folder and file names: plain names only.
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Entries read at once from S3, where each is a request.
_S3_READERS = 16
_held = threading.local()


@contextlib.contextmanager
def index_lock(folder: str) -> Iterator[None]:
    """Held while the index is repaired or versions are forgotten, and while a view made from it is
    read and rewritten, across processes (and machines, for an index on S3). Reentrant: a view
    rewritten under it may repair the index it is made from."""
    held = _held.__dict__.setdefault("folders", set())
    key = storage.absolute(folder)
    if key in held:
        yield
        return
    with file_lock(f"{folder}.lock"):
        held.add(key)
        try:
            yield
        finally:
            held.discard(key)


@dataclass(frozen=True)
class IndexRepair:
    """How to rebuild a missing or damaged index: the glob patterns of the entry files, the roots
    every indexed version must lie within, what to call on the rebuilt index before it is written
    (`amend`: to complete entries an older pipeline wrote) and what to call with it once written
    (`rebuilt`: to rewrite the views made from it)."""
    entry_patterns: Sequence[str] = ()
    roots: Sequence[str] = ()
    rebuilt: Callable[[dict], None] | None = None
    amend: Callable[[dict], None] | None = None


def key_of(entry: Mapping[str, Any]) -> str:
    return f"{entry['stage']}/{entry['version']}"


def is_key(key: str) -> bool:
    """Whether `key` is `<stage>/<version>`, each a plain name (a file name in the index)."""
    stage, _, version = key.partition("/")
    return bool(_PLAIN_NAME.match(stage)) and bool(_PLAIN_NAME.match(version))


def entry_location(folder: str, key: str) -> str:
    """Where the index at `folder` keeps the entry of `key` (`<stage>/<version>`)."""
    stage, version = key.split("/", 1)
    return storage.join(folder, stage, f"{version}.json")


def entry_file(path: str, marker: str) -> str:
    """Where the entry file of the version at `path` lies: in its folder, or, for an output that is
    a file among others (its marker is itself: a Comparison's CSV), beside it, named after it."""
    if path == marker:
        return storage.join(storage.parent(path), f".{posixpath.splitext(storage.name(path))[0]}{ENTRY_FILE}")
    return storage.join(path, ENTRY_FILE)


def _is_entry(key: str, value: Any) -> bool:
    return (isinstance(value, dict) and all(isinstance(value.get(field), str) for field in _ENTRY_FIELDS)
            and bool(_PLAIN_NAME.match(value["stage"])) and bool(_PLAIN_NAME.match(value["version"]))
            and key == key_of(value))


_DAMAGED = object()


def _entry_at(location: str, key: str) -> Any:
    """The entry of `key` at `location`; None when there is none, _DAMAGED when the file there is
    not that entry (not UTF-8, not JSON, cut short, malformed, another version's)."""
    try:
        value = read_json(location)
    except FileNotFoundError:
        return None
    except ValueError:
        return _DAMAGED
    return value if _is_entry(key, value) else _DAMAGED


class EntriesByKey(Mapping):
    """The index at `folder` as a mapping that reads an entry when it is first asked for (one read),
    so that following a version's upstream keys reads those entries alone; only iterating it reads
    the whole index (repaired by `repair` if need be)."""

    def __init__(self, folder: str, repair: IndexRepair):
        self.folder = folder
        self.repair = repair
        self._read: dict[str, dict | None] = {}

    def __getitem__(self, key: str) -> dict:
        if key not in self._read:
            entry = read_entry(self.folder, key)
            # Not found: the index may be missing or damaged, and then lack it only until repaired.
            if entry is None and is_key(key) and indexed(self.folder, key, self.repair):
                entry = read_entry(self.folder, key)
            self._read[key] = entry
        if self._read[key] is None:
            raise KeyError(key)
        return self._read[key]

    def __iter__(self) -> Iterator[str]:
        return iter(load_index(self.folder, self.repair))

    def __len__(self) -> int:
        return len(load_index(self.folder, self.repair))


def read_entry(folder: str, key: str) -> dict | None:
    """The indexed entry of `key`, or None when the index lacks it or holds it damaged, or `key` is
    no `<stage>/<version>` of plain names: one read."""
    if not is_key(key):
        return None
    found = _entry_at(entry_location(folder, key), key)
    return found if isinstance(found, dict) else None


def _listed(folder: str) -> dict[str, str]:
    """key -> location of every file in the index's stage folders (temporaries left out)."""
    try:
        names = storage.keys_below(folder, lambda name: TEMP_INFIX not in name)
    except FileNotFoundError:
        return {}
    listed = {}
    for name in names:
        parts = name.split("/")
        if len(parts) == 2 and parts[1].endswith(".json"):
            listed[f"{parts[0]}/{parts[1].removesuffix('.json')}"] = storage.join(folder, name)
    return listed


def _read_all(listed: Mapping[str, str]) -> dict[str, Any]:
    """key -> what `_entry_at` finds, for every listed file; read in parallel from S3."""
    def read(item: tuple[str, str]) -> Any:
        return _entry_at(item[1], item[0])

    if not any(map(storage.is_remote, listed.values())):
        return dict(zip(listed, map(read, listed.items())))
    with ThreadPoolExecutor(_S3_READERS) as pool:
        return dict(zip(listed, pool.map(read, listed.items())))


def _salvaged(folder: str) -> tuple[dict, dict[str, str], bool]:
    """The index's valid entries, the locations of its damaged files by key, and whether it is
    intact: complete and without a damaged file. A file gone between listing and reading was
    forgotten. COMPLETE is looked for first: a repair removes it before changing any file, replaces
    a damaged file in place (never removing a valid one) and writes COMPLETE last, so the files
    listed once it was found hold the whole index. Looked for last, it could be one that a repair
    wrote after the listing: part of the index would be taken for the whole."""
    complete = storage.exists(storage.join(folder, COMPLETE))
    listed = _listed(folder)
    found = _read_all(listed)
    index = {key: entry for key, entry in found.items() if isinstance(entry, dict)}
    damaged = {key: listed[key] for key, entry in found.items() if entry is _DAMAGED}
    return index, damaged, complete and not damaged


def read_index(folder: str) -> dict | None:
    """The whole index, or None when it is missing, damaged (one of its files is not its version's
    entry) or being repaired: then it is to be repaired (see `load_index`)."""
    index, _, intact = _salvaged(folder)
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


def _legacy_entries(folder: str) -> tuple[dict, str | None]:
    """The valid entries of an older pipeline's whole-index file beside `folder`, and that file."""
    legacy = storage.join(storage.parent(folder), LEGACY_INDEX_FILE)
    try:
        index = read_json(legacy)
    except FileNotFoundError:
        return {}, None
    except ValueError:  # not UTF-8, or not JSON
        return {}, legacy
    valid = {key: entry for key, entry in index.items() if _is_entry(key, entry)} if isinstance(index, dict) else {}
    return valid, legacy


def read_or_rebuild(folder: str, repair: IndexRepair) -> dict:
    """Under the index's lock: the whole index, repaired first if it is missing or damaged. Its
    valid entries are kept, over those of an older pipeline's index.json and of the entry files:
    the index is the pipeline's own, where entry files lie among downloaded data, and they hold
    the same entry unless one was damaged or planted. The others add what it lacks; damaged files
    are replaced or removed."""
    index, damaged, intact = _salvaged(folder)
    if intact:
        return index
    # First, so that no reader takes the index for whole while files change (see `_salvaged`).
    storage.remove_tree(storage.join(folder, COMPLETE))
    written = {key: canonical_json(entry) for key, entry in index.items()}
    legacy, legacy_file = _legacy_entries(folder)
    index = {**rebuilt_index(repair.entry_patterns, repair.roots), **legacy, **index}
    if repair.amend is not None:
        repair.amend(index)
    # A damaged file is overwritten where it lies, never removed first.
    for key, entry in index.items():
        if written.get(key) != canonical_json(entry):
            write_json(entry_location(folder, key), entry)
    for key, location in damaged.items():
        if key in index:
            continue
        # Read again: a process recording that version (without the lock) may have replaced it.
        found = _entry_at(location, key)
        if isinstance(found, dict):
            index[key] = found
        else:
            storage.remove_tree(location)
    storage.write_bytes(storage.join(folder, COMPLETE), b"")
    if legacy_file is not None:
        storage.remove_tree(legacy_file)
    if repair.rebuilt is not None:
        repair.rebuilt(index)
    return index


def load_index(folder: str, repair: IndexRepair = IndexRepair()) -> dict:
    """The whole index, for reading; rebuilt (under its lock) when it is missing or damaged."""
    index = read_index(folder)
    if index is not None:
        return index
    with index_lock(folder):
        return read_or_rebuild(folder, repair)


def indexed(folder: str, key: str, repair: IndexRepair = IndexRepair()) -> bool:
    """Whether the index holds `key`: one read, unless the index is missing or that file damaged,
    when it is repaired first."""
    found = _entry_at(entry_location(folder, key), key)
    if isinstance(found, dict):
        return True
    if found is None and storage.exists(storage.join(folder, COMPLETE)):
        return False
    return key in load_index(folder, repair)


def record(folder: str, entry: dict, repair: IndexRepair = IndexRepair(), only_if_missing: bool = False,
           view: Callable[[], None] | None = None) -> bool:
    """Put `entry` in the index, unless `only_if_missing` and the index holds its version; returns
    whether it was written. No lock is needed: each version has a file of its own, written whole
    (one PUT on S3), and two processes recording one version record the same stage. A missing
    index is rebuilt first, so that no other version is left out of it.

    `view`, when given, puts the entry on a view made from the index; it is called first, both
    under the index's lock: a run cut off between the two finds its stage unindexed and records
    it again, where the other order would leave the entry off the view for good."""
    key = key_of(entry)
    if not _is_entry(key, entry):
        raise StageOutputError(f"index entry {key!r}: expected plain stage and version names and string "
                               f"{', '.join(_ENTRY_FIELDS)}")
    if not storage.exists(storage.join(folder, COMPLETE)):
        load_index(folder, repair)
    with index_lock(folder) if view is not None else contextlib.nullcontext():
        if only_if_missing and read_entry(folder, key) is not None:
            return False
        if view is not None:
            view()
        write_json(entry_location(folder, key), entry)
    return True


def forget_folders(folder: str, folders: list[str], repair: IndexRepair = IndexRepair()) -> list[str]:
    """Drop from the index every version whose path lies within one of `folders` (removed ones),
    under the index's lock; returns their keys."""
    with index_lock(folder):
        index = read_or_rebuild(folder, repair)
        gone = [key for key, entry in index.items() if any(is_inside(entry["path"], removed) for removed in folders)]
        for key in gone:
            storage.remove_tree(entry_location(folder, key))
    return gone


def index_entry(stage: str, version: str, path: str, identity: Mapping[str, Any], **extra: Any) -> dict:
    """An index entry: what was made, where, from what, and when, plus `extra` for views."""
    return {"stage": stage, "version": version, "path": str(path),
            "identity": json.loads(canonical_json(identity)),
            "completed_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **extra}
