from pathlib import Path

import pytest

from pipeline import versioning
from pipeline.errors import ConfigError
from pipeline.fileio import read_json


def outputs(tmp_path, download_params=None, train_params=None, code=b"model v1"):
    roots = (tmp_path / "data", tmp_path / "results")
    download = versioning.stage_output("download", download_params or {"dataset": "mnist", "source_url": "u"},
                                       [], *roots)
    convert = versioning.stage_output("convert", {"image_size": 28}, [download], *roots)
    train = versioning.stage_output("train", train_params or {"model_def": "cnn", "params": {"a": 1}},
                                    [convert], *roots, code=code)
    evaluate = versioning.stage_output("evaluate", {"split": "test"}, [train, convert], *roots)
    return download, convert, train, evaluate


def test_layout_nests_runs_and_names_datasets(tmp_path):
    download, convert, train, evaluate = outputs(tmp_path)
    assert download.directory == tmp_path / "data" / "raw" / "mnist" / download.version
    assert convert.directory == tmp_path / "data" / "tfrecords" / "mnist" / convert.version
    assert train.directory == tmp_path / "results" / "mnist" / f"cnn-{train.version}"
    assert evaluate.marker == train.directory / f"evaluate-test-{evaluate.version}" / "metrics.json"


def test_a_change_gives_new_versions_to_its_stage_and_everything_downstream(tmp_path):
    base = outputs(tmp_path)
    assert outputs(tmp_path) == base
    new_params = outputs(tmp_path, train_params={"model_def": "cnn", "params": {"a": 2}})
    new_code = outputs(tmp_path, code=b"model v2")
    new_source = outputs(tmp_path, download_params={"dataset": "mnist", "source_url": "v"})
    for changed in (new_params, new_code):
        assert changed[:2] == base[:2]
        assert changed[2].version != base[2].version and changed[3].version != base[3].version
    assert all(a.version != b.version for a, b in zip(new_source, base))


def test_param_order_does_not_change_the_version():
    assert versioning.version_of("train", {"a": 1, "b": {"x": 1, "y": 2}}, []) == \
        versioning.version_of("train", {"b": {"y": 2, "x": 1}, "a": 1}, [])


def test_dataset_names_must_be_safe_folder_names(tmp_path):
    with pytest.raises(ConfigError, match=r"dataset='\.\./up'"):
        versioning.stage_output("download", {"dataset": "../up"}, [], tmp_path, tmp_path)


def test_index_maps_versions_to_params(tmp_path):
    download, convert, *_ = outputs(tmp_path)
    index = tmp_path / "results" / "index.json"
    versioning.record_version(index, download, {"dataset": "mnist", "source_url": "u"}, [])
    versioning.record_version(index, convert, {"image_size": 28}, [download])
    entries = read_json(index)
    assert entries[f"convert/{convert.version}"]["params"] == {"image_size": 28}
    assert entries[f"convert/{convert.version}"]["upstream"] == [f"download/{download.version}"]
    assert Path(entries[f"download/{download.version}"]["path"]) == download.directory
