"""Versions and the index: the library's side of identity (the code's is tests/test_code_identity.py)."""
import json

import pytest

from pipeline import storage, versioning
from pipeline.errors import ConfigError


def test_the_same_identity_gives_the_same_version_whatever_the_key_order():
    assert versioning.version_of({"a": 1, "b": {"x": 1, "y": 2}}) == \
        versioning.version_of({"b": {"y": 2, "x": 1}, "a": 1})
    assert versioning.version_of({"a": 1}) != versioning.version_of({"a": 2})
    assert len(versioning.version_of({})) == versioning.VERSION_LENGTH


def test_dataset_names_must_be_safe_folder_names():
    with pytest.raises(ConfigError, match=r"dataset='\.\./up'"):
        versioning.safe_name("dataset", "../up")


def test_the_index_is_updated_under_its_lock_and_views_see_the_update(tmp_path):
    index_path = tmp_path / "results" / "index.json"
    seen = []
    versioning.update_index(index_path, lambda index: index.update(
        {"A/1": versioning.index_entry("A", "1", tmp_path / "a", {"params": {"x": 1}})}), then=seen.append)
    versioning.update_index(index_path, lambda index: index.update(
        {"B/2": versioning.index_entry("B", "2", tmp_path / "b", {"upstream": {"a": "1"}}, note="view")}))
    index = json.loads(index_path.read_text())
    assert set(index) == {"A/1", "B/2"} and index["B/2"]["note"] == "view"
    assert index["A/1"]["identity"] == {"params": {"x": 1}} and index["A/1"]["path"] == str(tmp_path / "a")
    assert seen == [{"A/1": index["A/1"]}]


def complete_version(root: str, stage: str, folder: str, marker: str | None, file_output: bool = False) -> dict:
    """A version's entry file where it belongs, and its marker unless None (its output was removed);
    with `file_output`, the version is its marker, a file among others (a Comparison's)."""
    path = storage.join(root, folder, marker or "gone") if file_output else storage.join(root, folder)
    entry = versioning.index_entry(stage, f"{stage.lower()}1", path, {"params": {}},
                                   marker=path if file_output else storage.join(path, marker or "gone"))
    storage.write_json(versioning.entry_file(path, entry["marker"]), entry)
    if marker:
        storage.write_bytes(entry["marker"], b"done")
    return entry


def repair_of(root: str, rebuilt: list) -> versioning.IndexRepair:
    patterns = [storage.join(root, *["*"] * depth, versioning.ENTRY_GLOB) for depth in range(4)]
    return versioning.IndexRepair(patterns, [root], rebuilt=rebuilt.append)


def test_a_damaged_or_missing_index_is_rebuilt_from_the_entry_files_of_complete_versions(root):
    shallow = complete_version(root, "A", "a1", "a.json")
    deep = complete_version(root, "B", "x/y/b1", "b.json")
    beside = complete_version(root, "C", "", "sweep-c.csv", file_output=True)
    assert storage.name(versioning.entry_file(beside["path"], beside["marker"])) == ".sweep-c" + versioning.ENTRY_FILE
    complete_version(root, "D", "x/d1", None)
    storage.write_bytes(storage.join(root, "x", "e1", versioning.ENTRY_FILE), b'{"stage": "E", "vers')
    index_path = storage.join(root, versioning.INDEX_FILE)
    rebuilt = []
    repair = repair_of(root, rebuilt)
    expected = {f"{entry['stage']}/{entry['version']}": entry for entry in (shallow, deep, beside)}

    for damage in (None, b"", b'{"A/a1": {"stage": "A", "vers', b"[]", b'{"A/a1": 1}', b"\xff\xfe"):
        if damage is None:
            storage.remove_tree(index_path)
        else:
            storage.write_bytes(index_path, damage)
        assert versioning.read_index(index_path) is None
        assert versioning.load_index(index_path, repair) == expected
        assert storage.read_json(index_path) == expected and rebuilt.pop() == expected

    # A valid index is read as it is, without a rebuild.
    assert versioning.load_index(index_path, repair) == expected and rebuilt == []
    storage.write_bytes(index_path, b"{")
    versioning.update_index(index_path, lambda index: index.pop("A/a1"), repair=repair)
    assert set(storage.read_json(index_path)) == {"B/b1", "C/c1"} and len(rebuilt) == 1


def test_the_valid_entries_of_a_damaged_index_are_kept_and_win_over_the_entry_files(root):
    on_file = complete_version(root, "A", "a1", "a.json")
    complete_version(root, "B", "b1", "b.json")
    index_path = storage.join(root, versioning.INDEX_FILE)
    # A/a1 as the index holds it; Old/o1, indexed before entry files existed, is in the index alone.
    own = {**on_file, "note": "the index's own"}
    old = {"stage": "Old", "version": "o1", "path": storage.join(root, "o1")}
    storage.write_json(index_path, {"A/a1": own, "Old/o1": old, "B/b1": {"stage": "B"}, "X/1": 3,
                                    "Z/wrong-key": {**old, "stage": "Z"}})
    rebuilt = []
    assert versioning.read_index(index_path) is None
    index = versioning.load_index(index_path, repair_of(root, rebuilt))
    assert index == {"A/a1": own, "Old/o1": old, "B/b1": storage.read_json(storage.join(root, "b1", versioning.ENTRY_FILE))}
    assert storage.read_json(index_path) == index and rebuilt == [index]


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
    plant(f"raw/ds/v1/.x{versioning.ENTRY_FILE}", path=outside, marker=storage.join(outside, "marker"))
    # Named like a file output's, naming the genuine version's folder.
    plant(f"raw/ds/.v1{versioning.ENTRY_FILE}", path=genuine["path"], marker=genuine["marker"])
    # In its folder, with a marker outside it.
    plant(f"raw/ds/v2/{versioning.ENTRY_FILE}", path=storage.join(data, "raw/ds/v2"),
          marker=storage.join(outside, "marker"))
    # A root itself.
    plant(versioning.ENTRY_FILE, path=data, marker=genuine["marker"])

    rebuilt = versioning.rebuilt_index([storage.join(data, *["*"] * depth, versioning.ENTRY_GLOB)
                                        for depth in range(5)], [data])
    assert rebuilt == {"Download/download1": genuine}
