"""Versions: the library's side of identity (the code's is tests/test_code_identity.py, the index's tests/test_index.py)."""
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

