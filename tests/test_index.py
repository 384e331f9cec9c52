"""The index of completed versions: a file per version, rebuilt from the entry files when missing
or damaged, an older pipeline's index.json taken over once, and blind to entry files that lie
anywhere but where their entries say."""
import threading

import pytest

from pipeline import index as version_index
from pipeline import storage
from pipeline.errors import StageOutputError
from pipeline.index import (COMPLETE, ENTRY_FILE, ENTRY_GLOB, INDEX_FOLDER, LEGACY_INDEX_FILE, IndexRepair,
                            entry_file, entry_location, forget_folders, index_entry, index_lock, indexed, load_index,
                            read_entry, read_index, read_or_rebuild, rebuilt_index, record)


def test_each_version_is_recorded_in_a_file_of_its_own_and_read_back_by_key(root):
    folder = storage.join(root, "results", INDEX_FOLDER)
    first = index_entry("A", "1", storage.join(root, "a"), {"params": {"x": 1}})
    assert record(folder, first) and read_entry(folder, "A/1") == first
    assert storage.read_json(storage.join(folder, "A", "1.json")) == first
    assert not record(folder, {**first, "note": "later"}, only_if_missing=True)
    assert record(folder, index_entry("B", "2", storage.join(root, "a", "b"), {"upstream": {"a": "1"}}, note="view"))
    index = load_index(folder)
    assert set(index) == {"A/1", "B/2"} and index["B/2"]["note"] == "view" and index["A/1"] == first
    assert indexed(folder, "B/2") and not indexed(folder, "C/3") and read_entry(folder, "C/3") is None

    assert forget_folders(folder, [storage.join(root, "a", "b")]) == ["B/2"]
    assert set(read_index(folder)) == {"A/1"}


def test_an_entry_that_would_not_be_a_plain_file_of_the_index_is_refused(root):
    folder = storage.join(root, INDEX_FOLDER)
    for stage, version in (("..", "1"), ("A", "../../x"), ("A/B", "1"), ("A", "")):
        with pytest.raises(StageOutputError, match="plain stage and version names"):
            record(folder, index_entry(stage, version, storage.join(root, "a"), {}))
    assert load_index(folder) == {}


def complete_version(root: str, stage: str, folder: str, marker: str | None, file_output: bool = False) -> dict:
    """A version's entry file where it belongs, and its marker unless None (its output was removed);
    with `file_output`, the version is its marker, a file among others (a Comparison's)."""
    path = storage.join(root, folder, marker or "gone") if file_output else storage.join(root, folder)
    entry = index_entry(stage, f"{stage.lower()}1", path, {"params": {}},
                        marker=path if file_output else storage.join(path, marker or "gone"))
    storage.write_json(entry_file(path, entry["marker"]), entry)
    if marker:
        storage.write_bytes(entry["marker"], b"done")
    return entry


def repair_of(root: str, rebuilt: list) -> IndexRepair:
    patterns = [storage.join(root, *["*"] * depth, ENTRY_GLOB) for depth in range(4)]
    return IndexRepair(patterns, [root], rebuilt=rebuilt.append)


def test_a_damaged_or_missing_index_is_rebuilt_from_the_entry_files_of_complete_versions(root):
    shallow = complete_version(root, "A", "a1", "a.json")
    deep = complete_version(root, "B", "x/y/b1", "b.json")
    beside = complete_version(root, "C", "", "sweep-c.csv", file_output=True)
    assert storage.name(entry_file(beside["path"], beside["marker"])) == ".sweep-c" + ENTRY_FILE
    complete_version(root, "D", "x/d1", None)
    storage.write_bytes(storage.join(root, "x", "e1", ENTRY_FILE), b'{"stage": "E", "vers')
    folder = storage.join(root, INDEX_FOLDER)
    rebuilt = []
    repair = repair_of(root, rebuilt)
    expected = {f"{entry['stage']}/{entry['version']}": entry for entry in (shallow, deep, beside)}
    a1 = storage.join(folder, "A", "a1.json")

    for damage in (None, COMPLETE, b"", b'{"stage": "A", "vers', b"[]", b'{"stage": "A", "version": "a2"}',
                   b"\xff\xfe"):
        if damage is None:
            storage.remove_tree(folder)
        elif damage == COMPLETE:
            storage.remove_tree(storage.join(folder, COMPLETE))
        else:
            storage.write_bytes(a1, damage)
        assert read_index(folder) is None
        assert load_index(folder, repair) == expected
        assert read_index(folder) == expected and rebuilt.pop() == expected

    # A valid index is read as it is, without a rebuild.
    assert load_index(folder, repair) == expected and rebuilt == []
    # A damaged file is found by the one read that asks for its version, and repaired then.
    storage.write_bytes(a1, b"{")
    assert indexed(folder, "A/a1", repair) and read_entry(folder, "A/a1") == shallow and len(rebuilt) == 1
    # So is a missing index, by the first version recorded in it.
    storage.remove_tree(folder)
    record(folder, index_entry("F", "f1", storage.join(root, "f1"), {}), repair)
    assert set(read_index(folder)) == {*expected, "F/f1"} and len(rebuilt) == 2
    # And damaged files that no entry file replaces are removed.
    storage.write_bytes(storage.join(folder, "G", "g1.json"), b"[]")
    assert set(load_index(folder, repair)) == {*expected, "F/f1"}
    assert not storage.exists(storage.join(folder, "G", "g1.json"))


def test_the_valid_entries_of_a_damaged_index_are_kept_and_win_over_the_entry_files(root):
    on_file = complete_version(root, "A", "a1", "a.json")
    complete_version(root, "B", "b1", "b.json")
    folder = storage.join(root, INDEX_FOLDER)
    # A/a1 as the index holds it; Old/o1, indexed before entry files existed, is in the index alone.
    own = {**on_file, "note": "the index's own"}
    old = {"stage": "Old", "version": "o1", "path": storage.join(root, "o1")}
    for entry in (own, old):
        record(folder, entry)
    storage.write_bytes(storage.join(folder, "B", "b1.json"), b'{"stage": "B"}')
    storage.write_json(storage.join(folder, "Z", "wrong-key.json"), {**old, "stage": "Z"})
    rebuilt = []
    assert read_index(folder) is None
    index = load_index(folder, repair_of(root, rebuilt))
    assert index == {"A/a1": own, "Old/o1": old, "B/b1": storage.read_json(storage.join(root, "b1", ENTRY_FILE))}
    assert read_index(folder) == index and rebuilt == [index]


def test_an_older_pipelines_index_json_is_taken_over_once_below_the_index_and_the_entry_files(root):
    on_file = complete_version(root, "A", "a1", "a.json")
    b_file = complete_version(root, "B", "b1", "b.json")
    folder = storage.join(root, INDEX_FOLDER)
    legacy = storage.join(root, LEGACY_INDEX_FILE)
    old = {"stage": "Old", "version": "o1", "path": storage.join(root, "o1")}
    recorded = {**on_file, "note": "recorded since"}
    record(folder, recorded)  # by a new pipeline, before the index was repaired: the index wins
    storage.remove_tree(storage.join(folder, COMPLETE))
    storage.write_json(legacy, {"A/a1": {**on_file, "note": "legacy"}, "B/b1": {**b_file, "note": "legacy"},
                                "Old/o1": old, "X/1": 3, "Y/../y": {**old, "stage": "Y", "version": "../y"}})
    amended = []
    repair = IndexRepair(repair_of(root, []).entry_patterns, [root], amend=lambda index: amended.append(set(index)))

    index = load_index(folder, repair)

    assert index["A/a1"] == recorded and index["B/b1"]["note"] == "legacy" and index["Old/o1"] == old
    assert set(index) == {"A/a1", "B/b1", "Old/o1"} and amended == [set(index)]
    assert not storage.exists(legacy) and read_index(folder) == index


def test_a_reader_never_takes_a_partial_index_for_the_whole(root, monkeypatch):
    """A reader listing the index while a repair writes it (here the take-over of an older
    index.json, on the first run after an upgrade), and reading its files once the repair is done,
    reads it as missing, never as whole: gc, explain and a Comparison read it without the lock, and
    gc would not keep a run whose evaluation it did not see. The wrapper only orders the threads."""
    folder = storage.join(root, "results", INDEX_FOLDER)
    entries = {f"A/{n}": index_entry("A", str(n), storage.join(root, f"a{n}"), {}) for n in range(3)}
    storage.write_json(storage.join(root, "results", LEGACY_INDEX_FILE), entries)
    listed, go = threading.Event(), threading.Event()
    real_listed = version_index._listed

    def listed_then_wait(where):
        found = real_listed(where)
        if threading.current_thread().name == "reader":
            listed.set()
            go.wait(60)
        return found

    monkeypatch.setattr(version_index, "_listed", listed_then_wait)
    seen = {}
    reader = threading.Thread(target=lambda: seen.update(index=read_index(folder)), name="reader")
    reader.start()
    assert listed.wait(60)
    with index_lock(folder):
        assert set(read_or_rebuild(folder, IndexRepair())) == set(entries)
    go.set()
    reader.join(60)

    assert seen["index"] is None or set(seen["index"]) == set(entries), \
        f"a partial index read as whole: {sorted(seen['index'])}"
    assert set(read_index(folder)) == set(entries)


def test_a_repair_leaves_no_index_to_read_while_it_writes_and_keeps_a_file_recorded_meanwhile(root):
    """A damaged file makes a complete index to be repaired: while the repair writes, readers find
    no index (they wait for the repair under the lock), and a version recorded meanwhile in the
    damaged file's place (records take no lock) is kept rather than removed as damaged."""
    folder = storage.join(root, INDEX_FOLDER)
    kept = index_entry("A", "1", storage.join(root, "a"), {})
    record(folder, kept)
    storage.write_bytes(entry_location(folder, "B/2"), b'{"stage": "B", "vers')
    meanwhile = index_entry("B", "2", storage.join(root, "b"), {})
    during = []

    def record_meanwhile(index: dict) -> None:
        during.append(read_index(folder))
        storage.write_json(entry_location(folder, "B/2"), meanwhile)  # as another process's record does

    assert load_index(folder, IndexRepair(amend=record_meanwhile)) == {"A/1": kept, "B/2": meanwhile}
    assert during == [None] and read_index(folder) == {"A/1": kept, "B/2": meanwhile}


def test_an_entry_file_is_ignored_unless_it_lies_where_its_entry_says_within_the_roots(root, tmp_path):
    """As an unpacked archive could plant them: none may make gc remove, or the leaderboard show,
    what it names."""
    data = storage.join(root, "data")
    genuine = complete_version(data, "Download", "raw/ds/v1", "download.json")
    outside = storage.join(root, "outside") if storage.is_remote(root) else str(tmp_path / "outside")
    storage.write_bytes(storage.join(outside, "marker"), b"precious")

    def plant(where: str, **entry: str) -> None:
        storage.write_json(storage.join(data, where), {"stage": "Evil", "version": "e1", **entry})

    # Beside a genuine version, naming a folder outside the roots (its marker exists).
    plant(f"raw/ds/v1/.x{ENTRY_FILE}", path=outside, marker=storage.join(outside, "marker"))
    # Named like a file output's, naming the genuine version's folder.
    plant(f"raw/ds/.v1{ENTRY_FILE}", path=genuine["path"], marker=genuine["marker"])
    # In its folder, with a marker outside it.
    plant(f"raw/ds/v2/{ENTRY_FILE}", path=storage.join(data, "raw/ds/v2"),
          marker=storage.join(outside, "marker"))
    # A root itself.
    plant(ENTRY_FILE, path=data, marker=genuine["marker"])

    rebuilt = rebuilt_index([storage.join(data, *["*"] * depth, ENTRY_GLOB) for depth in range(5)], [data])
    assert rebuilt == {"Download/download1": genuine}
