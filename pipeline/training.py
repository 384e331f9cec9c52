"""Train stage: an Estimator from a model file, fed from the TFRecord shards, validated as it
trains, exported for serving.

It writes the run folder that `pipeline.runfiles` describes: the snapshot in model_dir first, the
export, and the marker last. Training runs to `max_steps` (or until early stopping), so a rerun
after a crash resumes from the latest checkpoint in `model_dir`. It trains in this process, or as
a cluster (see `pipeline.cluster`).
"""
from __future__ import annotations

import json
import sys
from typing import Any, Mapping, Sequence

import tensorflow as tf

from pipeline import cluster, models, schema, storage
from pipeline.errors import DatasetError, StageOutputError
from pipeline.estimator import (ProgressHook, build_estimator, check_predictions, run_params, train_and_validate,
                                write_snapshot)
from pipeline.params import to_json
from pipeline.progress import Progress
from pipeline.runfiles import BEST_EXPORT, CLUSTER_LOGS, EXPORT_DIR, MODEL_DIR, VALIDATION, newest_export
from pipeline.storage import flush_to_disk, read_json, remove_tree, write_json


def train_model(model_file: str, params_overrides: Mapping[str, Any], convert_dir: str, metadata_path: str,
                run_dir: str, marker_path: str, *, max_steps: int, batch_size: int,
                run_config: Mapping[str, Any], eval_throttle_secs: int = 0, early_stopping_steps: int = 0,
                distribute: str = "none", cluster_workers: int = 2, strategy: str = cluster.PARAMETER_SERVER,
                cluster_network: str = cluster.PRIVATE, hooks: Sequence[tf.estimator.SessionRunHook] = (),
                progress: Progress | None = None) -> dict:
    """Train to `max_steps` (resuming from model_dir), evaluating on the validation split after
    each checkpoint (at most once per `eval_throttle_secs`) and exporting the best model by
    validation loss; stop early after `early_stopping_steps` steps without a lower validation
    loss (0: never). With `distribute="local"`, train as a cluster on this host instead: a chief
    and `cluster_workers` workers, with a parameter server (`strategy="parameter_server"`,
    asynchronous) or in lockstep (`"mirrored"`), and an evaluator, in a network namespace of its
    own (`cluster_network="private"`) or this host's (`"host"`: see pipeline.cluster). Then export
    the final model and write the marker last."""
    models.validate_training_settings(max_steps, batch_size, run_config)
    if distribute == "local":
        cluster.check_network(cluster_network, [convert_dir, run_dir])
    metadata = read_json(metadata_path)
    model = models.load_model(model_file)
    dataset = {"n_classes": len(metadata["class_names"]), "image_shape": metadata["image_shape"]}
    recorded = models.merge_params(model_file, to_json(model.defaults, "PARAMS"), params_overrides,
                                   {"n_classes": dataset["n_classes"]})
    recorded.pop("feature_columns", None)  # filled in from the dataset whenever the model is built
    check_predictions(model, run_params(model, recorded, dataset), dataset)
    model_dir = storage.join(run_dir, MODEL_DIR)
    write_snapshot(model_dir, model_file, recorded, dataset, run_config)
    training = dict(convert_dir=convert_dir, metadata_path=metadata_path, max_steps=max_steps, batch_size=batch_size,
                    eval_throttle_secs=eval_throttle_secs, early_stopping_steps=early_stopping_steps)
    if distribute == "local":
        if not metadata["splits"][VALIDATION]["count"]:
            raise DatasetError(f"{metadata_path}: the validation split is empty; a training cluster needs it for "
                               "its evaluator")
        logs = cluster.run_local_cluster(
            [sys.executable, "-m", "pipeline.cluster", json.dumps({"model_dir": model_dir, **training,
                                                                   "strategy": strategy})],
            cluster_workers, strategy, network=cluster_network)
        for role, text in logs.items():
            storage.write_bytes(storage.join(model_dir, CLUSTER_LOGS, f"{role}.log"), text.encode())
        estimator = build_estimator(model_dir)
    elif distribute == "tf_config":
        role = cluster.role_from_env()
        if role.type != "chief":
            raise cluster.ClusterError(f"TF_CONFIG makes this process the {role.type} {role.index}; the Train task "
                                       "is the chief: start the other roles with python -m tasks.cluster_role")
        cluster.run_role(model_dir, strategy, **training)
        estimator = build_estimator(model_dir)
    else:
        estimator = build_estimator(
            model_dir, progress and (lambda loss: [ProgressHook(progress, max_steps, loss)]))
        train_and_validate(estimator, metadata, hooks=hooks, **training)
    receiver = schema.serving_input_receiver_fn(metadata["image_shape"])
    global_step = int(estimator.get_variable_value(tf.compat.v1.GraphKeys.GLOBAL_STEP))

    # An export left by a crash before the marker was written is stale: export again, once.
    export_root = storage.join(run_dir, EXPORT_DIR)
    remove_tree(export_root)
    export_dir = estimator.export_saved_model(storage.tf_path(export_root), receiver).decode()
    if not storage.exists(storage.join(export_dir, "saved_model.pb")):
        raise StageOutputError(f"{export_dir}: export_saved_model returned but wrote no saved_model.pb")
    best_export = newest_export(storage.join(model_dir, EXPORT_DIR, BEST_EXPORT))
    flush_to_disk()  # TensorFlow writes checkpoints and the exports without flushing them
    summary = {"global_step": global_step, "export_dir": storage.relative(export_dir, run_dir),
               "best_export_dir": storage.relative(best_export, run_dir) if best_export else None,
               "model_dir": MODEL_DIR, "model_file": storage.name(model_file), "params": recorded,
               "run_config": dict(run_config), "max_steps": max_steps, "batch_size": batch_size,
               "early_stopping_steps": early_stopping_steps, "distribute": distribute,
               **({"cluster_workers": cluster_workers, "strategy": strategy} if distribute != "none" else {})}
    write_json(marker_path, summary)
    return summary

