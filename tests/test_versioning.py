"""Versions and the code fingerprint found from imports: the library's side of identity."""
import pytest

from pipeline import versioning
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
    assert versioning._imported("pipeline.training") >= {"pipeline.models", "pipeline.schema", "pipeline.estimator"}
