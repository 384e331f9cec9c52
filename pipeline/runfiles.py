"""The files of a run folder, by name; no TensorFlow, so that scheduling, reports and cluster
launchers can find them without loading it.

A run folder holds `model_dir/` (checkpoints, TensorBoard events, the evaluations on the validation
split in `eval_validation/`, the best export in `export/best/`, each cluster role's log in
`cluster/`, and a snapshot of the model file, params, dataset facts, run config and library
versions), `export/<timestamp>/` (the final SavedModel) and the Train stage's marker, written last.
"""
from __future__ import annotations

from pipeline import storage

# A run's Estimator model_dir, inside its run folder: checkpoints, events and the model snapshot.
MODEL_DIR = "model_dir"
EXPORT_DIR = "export"
# The snapshot that makes a model_dir self-describing; evaluation rebuilds the Estimator from it.
MODEL_FILE = "model_def.py"
PARAMS_FILE = "params.json"
DATASET_FILE = "dataset.json"
RUN_CONFIG_FILE = "run_config.json"
# Written last of the snapshot: its existence says the snapshot is whole (roles of a cluster wait for it).
VERSIONS_FILE = "versions.json"
# Each role's log when a cluster trains: what it ran, and how many steps.
CLUSTER_LOGS = "cluster"
# The split Train validates on; its evaluations land in model_dir/eval_validation.
VALIDATION = "validation"
BEST_EXPORT = "best"


def newest_export(folder: str) -> str | None:
    """The newest complete SavedModel among the timestamped exports in `folder`, if any: the one
    whose timestamp (its folder's name, seconds since the epoch) is the largest. Decided here, not
    by the order a listing comes in (pipeline.storage enters no version)."""
    exports = [path for path in storage.glob(storage.join(folder, "[0-9]*"))
               if storage.exists(storage.join(path, "saved_model.pb"))]
    return max(exports, key=_timestamp, default=None)


def _timestamp(export: str) -> tuple[int, str]:
    # Numbers of more digits are larger; among as many digits, the larger name is the later time.
    name = storage.name(export)
    return len(name), name
