"""The versioned tree: one function maps a stage's significant inputs to its output folder.

A version is a short hash of the stage name, its significant parameters, the versions of the
stages it reads, and (for training and after) the model file's source. Any change to one of
those gives a new folder, so nothing is overwritten and unchanged stages are found complete.

    data/raw/<dataset>/<download>/                      images as <class>/<file>, download.json last
    data/tfrecords/<dataset>/<convert>/                 shards, metadata.json last
    results/<dataset>/<model>-<train>/                  model_dir/, export/, train.json last
    results/<dataset>/<model>-<train>/evaluate-<split>-<evaluate>/   metrics.json last
    results/<dataset>/<model>-<train>/predict-<predict>/             predictions.csv
    results/<dataset>/<model>-<train>/evaluate-<split>-<evaluate>/   report.html (the report stage)
    results/leaderboard.html, leaderboard.csv                        every evaluation, best first
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from pipeline.errors import ConfigError
from pipeline.fileio import file_lock, read_json, write_json_atomic

VERSION_LENGTH = 12
INDEX_FILE = "index.json"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class StageOutput:
    stage: str
    version: str
    directory: Path
    dataset: str

    @property
    def marker(self) -> Path:
        """The file written last: while it is missing, the stage is not complete."""
        return self.directory / MARKERS[self.stage]


def safe_name(key: str, value: Any) -> str:
    """`value` as a folder name; ConfigError unless it is a plain name."""
    value = str(value)
    if not _SAFE_NAME.match(value):
        raise ConfigError(f"{key}={value!r} must be a plain name of letters, digits, '_', '.' or '-' "
                          "(it becomes a folder name)")
    return value


def _significant(params: Mapping[str, Any], key: str) -> str:
    return safe_name(key, params[key])


MARKERS = {
    "download": "download.json",
    "convert": "metadata.json",
    "train": "train.json",
    "evaluate": "metrics.json",
    "predict": "predictions.csv",
    "report": "report.html",
}

_Layout = Callable[[Mapping[str, Any], Sequence[StageOutput], Path, Path, str], Path]
_LAYOUT: dict[str, _Layout] = {
    "download": lambda p, up, data, results, v: data / "raw" / _significant(p, "dataset") / v,
    "convert": lambda p, up, data, results, v: data / "tfrecords" / up[0].dataset / v,
    "train": lambda p, up, data, results, v: results / up[0].dataset / f"{Path(p['model_def']).stem}-{v}",
    "evaluate": lambda p, up, data, results, v: up[0].directory / f"evaluate-{p['split']}-{v}",
    "predict": lambda p, up, data, results, v: up[0].directory / f"predict-{v}",
    # A report is fully determined by its evaluation, so it lives in that evaluation's folder.
    "report": lambda p, up, data, results, v: up[0].directory,
}
STAGES = tuple(_LAYOUT)


def version_of(stage: str, significant: Mapping[str, Any], upstream_versions: Sequence[str], code: bytes = b"") -> str:
    canonical = json.dumps(
        {"stage": stage, "params": significant, "upstream": list(upstream_versions),
         "code": hashlib.sha256(code).hexdigest()},
        sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:VERSION_LENGTH]


def stage_output(stage: str, significant: Mapping[str, Any], upstream: Sequence[StageOutput],
                 data_root: Path, results_root: Path, code: bytes = b"") -> StageOutput:
    """Derive a stage's version and output folder. `upstream[0]` is the stage it nests under or reads."""
    if stage not in _LAYOUT:
        raise ConfigError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    version = version_of(stage, significant, [u.version for u in upstream], code)
    directory = _LAYOUT[stage](significant, upstream, Path(data_root), Path(results_root), version)
    dataset = significant["dataset"] if stage == "download" else upstream[0].dataset
    return StageOutput(stage=stage, version=version, directory=directory, dataset=dataset)


def index_lock(index_path: Path) -> contextlib.AbstractContextManager:
    """Held while the index, or a view rebuilt from it, is read and rewritten, across processes."""
    index_path = Path(index_path)
    return file_lock(index_path.with_name(index_path.name + ".lock"))


def record_version(index_path: Path, output: StageOutput, significant: Mapping[str, Any],
                   upstream: Sequence[StageOutput]) -> None:
    """Add a completed stage to the JSON index that maps versions to their parameters."""
    index_path = Path(index_path)
    with index_lock(index_path):
        index = read_json(index_path) if index_path.exists() else {}
        index[f"{output.stage}/{output.version}"] = {
            "stage": output.stage,
            "version": output.version,
            "dataset": output.dataset,
            "path": str(output.directory),
            "params": json.loads(json.dumps(significant, default=str)),
            "upstream": [f"{u.stage}/{u.version}" for u in upstream],
            "completed_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        write_json_atomic(index_path, index)
