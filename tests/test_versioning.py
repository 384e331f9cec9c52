"""Versions, the code fingerprint found from imports, and the index: the library's side of identity."""
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


def test_the_code_a_module_runs_is_found_from_its_imports(tmp_path, monkeypatch):
    """A change to any module a stage imports, directly or not, changes its fingerprint; others do not."""
    package = tmp_path / "pipeline"
    package.mkdir()
    sources = {
        "pipeline.stage": "from pipeline import helper\nimport os\n",
        "pipeline.helper": "from pipeline.deep import f\n",
        "pipeline.deep": "def f():\n    return 1\n",
        "pipeline.unrelated": "X = 1\n",
    }
    for name, source in sources.items():
        (package / f"{name.split('.')[1]}.py").write_text(source)
    monkeypatch.setattr(versioning, "_module_file", lambda name: package / f"{name.split('.')[1]}.py")

    def fingerprint():
        versioning.code_fingerprint.cache_clear()
        return versioning.code_fingerprint("pipeline.stage")

    first = fingerprint()
    (package / "unrelated.py").write_text("X = 2\n")
    assert fingerprint() == first, "a module the stage does not import is not part of its code"
    (package / "deep.py").write_text("def f():\n    return 2\n")
    assert fingerprint() != first, "a module imported through another one is"
    versioning.code_fingerprint.cache_clear()


def test_the_pipelines_stages_fingerprint_the_modules_they_import():
    training = versioning.code_fingerprint("pipeline.training")
    download = versioning.code_fingerprint("pipeline.download")
    assert training != download and len(training) == 64
    assert versioning._imported("pipeline.training") >= {"pipeline.models", "pipeline.schema", "pipeline.convert"}


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


def test_a_damaged_or_missing_index_is_rebuilt_from_the_entry_files_of_complete_versions(root):
    def version(stage: str, folder: str, marker: str | None, entry_name: str = versioning.ENTRY_FILE) -> dict:
        """A version's entry file, and its marker unless None (its output was removed)."""
        path = storage.join(root, folder)
        entry = versioning.index_entry(stage, f"{stage.lower()}1", path, {"params": {}},
                                       marker=storage.join(path, marker or "gone"))
        storage.write_json(storage.join(path, entry_name), entry)
        if marker:
            storage.write_bytes(entry["marker"], b"done")
        return entry

    shallow = version("A", "a1", "a.json")
    deep = version("B", "x/y/b1", "b.json")
    beside = version("C", "", "sweep-c.csv", entry_name=".sweep-c" + versioning.ENTRY_FILE)
    version("D", "x/d1", None)
    storage.write_bytes(storage.join(root, "x", "e1", versioning.ENTRY_FILE), b'{"stage": "E", "vers')
    patterns = [storage.join(root, *["*"] * depth, versioning.ENTRY_GLOB) for depth in range(4)]
    index_path = storage.join(root, versioning.INDEX_FILE)
    rebuilt = []
    repair = versioning.IndexRepair(patterns, rebuilt=rebuilt.append)
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
