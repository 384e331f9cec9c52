"""Train stage: an Estimator from a model file, fed from the TFRecord shards, validated as it
trains, exported for serving.

The run folder holds `model_dir/` (checkpoints, TensorBoard events, the evaluations on the
validation split in `eval_validation/`, the best export in `export/best/`, and a snapshot of the
model file, params, dataset facts, run config and library versions), `export/<timestamp>/` (the
final SavedModel) and `train.json`, written last. Training runs to `max_steps` (or until early
stopping), so a rerun after a crash resumes from the latest checkpoint in `model_dir`.
"""
from __future__ import annotations

import importlib.metadata
import inspect
import json
import logging
import math
import os
import platform
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import tensorflow as tf

from pipeline import cluster, models, outputs, schema
from pipeline.convert import shard_paths
from pipeline.errors import DatasetError, ModelDefinitionError, StageOutputError
from pipeline import storage
from pipeline.storage import flush_to_disk, read_json, remove_tree, write_json
from pipeline.models import MODEL_DIR, ModelFile
from pipeline.params import Params, as_params, from_json, to_json
from pipeline.progress import Progress

log = logging.getLogger(__name__)

EXPORT_DIR = "export"
# The snapshot that makes a model_dir self-describing; evaluation rebuilds the Estimator from it.
MODEL_FILE = "model_def.py"
PARAMS_FILE = "params.json"
DATASET_FILE = "dataset.json"
RUN_CONFIG_FILE = "run_config.json"
VERSIONS_FILE = "versions.json"
# Each role's log when a cluster trains: what it ran, and how many steps.
CLUSTER_LOGS = "cluster"
# The split Train validates on; its evaluations land in model_dir/eval_validation.
VALIDATION = "validation"
BEST_EXPORT = "best"
_SHUFFLE_BUFFER = 10_000
# Training sets whose decoded pixels fit in this many bytes are cached in memory.
CACHE_LIMIT_BYTES = 1 << 30
_PACKAGES = ("tensorflow", "tensorflow-estimator", "keras", "numpy", "pillow", "luigi")


def input_fn(files: Sequence[str], image_shape: Sequence[int], batch_size: int, *, training: bool,
             seed: int | None = None, images: int | None = None) -> tf.data.Dataset:
    """Batches of ({image}, label) from TFRecord shards; shuffled and repeated when training.

    When training on `images` records whose pixels fit in CACHE_LIMIT_BYTES, the decoded pixels
    are cached in memory after the first epoch, so later epochs skip reading and PNG decoding.
    Pixels are scaled to floats per batch, one vectorised op instead of one per image.
    """
    image_shape = list(image_shape)
    dataset = tf.data.Dataset.from_tensor_slices([storage.tf_path(file) for file in files])
    if training:
        dataset = dataset.shuffle(len(files), seed=seed)
    dataset = dataset.interleave(tf.data.TFRecordDataset, cycle_length=min(len(files), 4),
                                 num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    dataset = dataset.map(lambda serialized: schema.parse_training_example(serialized, image_shape),
                          num_parallel_calls=tf.data.AUTOTUNE)
    if training:
        if images is not None and images * math.prod(image_shape) <= CACHE_LIMIT_BYTES:
            dataset = dataset.cache()
        dataset = dataset.shuffle(_SHUFFLE_BUFFER, seed=seed).repeat()
    dataset = dataset.batch(batch_size).map(lambda pixels, labels: ({schema.IMAGE: schema.scale_pixels(pixels)},
                                                                    labels))
    return dataset.prefetch(tf.data.AUTOTUNE)


class ProgressHook(tf.estimator.SessionRunHook):
    """Reports to a `Progress` callback after every session run.

    Given a loss tensor (training), it reports the global step of `total` with the last loss;
    otherwise (evaluation, prediction) the batches run so far, after `done_before` batches of
    an earlier pass.
    """

    def __init__(self, progress: Progress, total: int | None, loss: tf.Tensor | None = None, done_before: int = 0):
        self._progress, self._total, self._loss = progress, total, loss
        self._first_step, self._runs = 0, done_before

    def after_create_session(self, session, coord):
        if self._loss is not None:
            # Read once: fetched beside the train op, the step may be read before or after its update.
            self._first_step = int(session.run(tf.compat.v1.train.get_global_step()))

    def before_run(self, run_context):
        return tf.estimator.SessionRunArgs(self._loss) if self._loss is not None else None

    def after_run(self, run_context, run_values):
        self._runs += 1
        if self._loss is None:
            self._progress(self._runs, self._total, "batches", "")
        else:
            loss = float(run_values.results)
            self._progress(self._first_step + self._runs, self._total, "steps", f"loss {loss:.4f}")


class LeaseCheckHook(tf.estimator.SessionRunHook):
    """Raises LockLost after the first training step that ends once an S3 lease this process holds
    has ended: TensorFlow writes checkpoints into model_dir itself, not through `storage`, whose
    writes check the leases (see `storage.check_leases`)."""

    def after_run(self, run_context, run_values):
        storage.check_leases()


def _call(model_fn: Callable, features, labels, mode, params, config):
    takes_config = "config" in inspect.signature(model_fn).parameters
    return model_fn(features, labels, mode, params, **({"config": config} if takes_config else {}))


def _with_training_hooks(model_fn: Callable, hooks_for_loss: Callable[[tf.Tensor], list]) -> Callable:
    """Wrap `model_fn` so that its TRAIN spec carries hooks built from its own loss tensor."""
    def wrapped(features, labels, mode, params, config):
        spec = _call(model_fn, features, labels, mode, params, config)
        if mode == tf.estimator.ModeKeys.TRAIN:
            spec = spec._replace(training_hooks=(*spec.training_hooks, *hooks_for_loss(spec.loss)))
        return spec
    return wrapped


def run_params(model: ModelFile, recorded: Mapping[str, Any], dataset: Mapping[str, Any]) -> Params:
    """The params a run's model_fn receives: `recorded` (PARAMS with --params and n_classes laid
    over, in JSON) with TensorFlow functions resolved from their names, and the dataset's
    feature columns where PARAMS asks for them."""
    params = from_json(dict(recorded))
    if "feature_columns" in model.defaults:
        params["feature_columns"] = [tf.feature_column.numeric_column(schema.IMAGE, shape=dataset["image_shape"])]
    return as_params(params)


def build_estimator(model_dir: str, hooks_for_loss: Callable[[tf.Tensor], list] | None = None, *,
                    in_cluster: bool = False, **run_config: Any) -> tf.estimator.Estimator:
    """Rebuild the Estimator of a run from the snapshot in its model_dir (a local folder or on S3).

    `hooks_for_loss(loss)` returns training hooks that need the model's loss tensor; `run_config`
    adds RunConfig settings that are not the run's (how it is distributed). Only `in_cluster` does
    RunConfig read TF_CONFIG: an evaluation in the chief's process, after its cluster is gone,
    would otherwise wait for the cluster's servers.
    """
    model = models.load_model(storage.join(model_dir, MODEL_FILE))
    model_fn = model.model_fn if hooks_for_loss is None else _with_training_hooks(model.model_fn, hooks_for_loss)
    saved_tf_config = None if in_cluster else os.environ.pop("TF_CONFIG", None)
    try:
        run_config = tf.estimator.RunConfig(model_dir=storage.tf_path(model_dir),
                                            **{**read_json(storage.join(model_dir, RUN_CONFIG_FILE)), **run_config})
    finally:
        if saved_tf_config is not None:
            os.environ["TF_CONFIG"] = saved_tf_config
    params = run_params(model, read_json(storage.join(model_dir, PARAMS_FILE)),
                        read_json(storage.join(model_dir, DATASET_FILE)))
    return tf.estimator.Estimator(model_fn, config=run_config, params=params)


def check_predictions(model: ModelFile, params: Params, dataset: Mapping[str, Any]) -> outputs.OutputKeys:
    """Call the model_fn in PREDICT mode on one batch, before any training, and find its class
    scores by the rule in `pipeline.outputs`; ModelDefinitionError, saying what it returned, if
    the pipeline could not read them."""
    with tf.Graph().as_default():
        images = tf.zeros([2, *dataset["image_shape"]], tf.float32)
        spec = _call(model.model_fn, {schema.IMAGE: images}, None, tf.estimator.ModeKeys.PREDICT, params,
                     tf.estimator.RunConfig())
        if not isinstance(spec, tf.estimator.EstimatorSpec):
            raise ModelDefinitionError(f"{model.path}: model_fn returned {type(spec).__name__} in PREDICT mode; "
                                       "expected a tf.estimator.EstimatorSpec")
        predictions = spec.predictions if isinstance(spec.predictions, Mapping) else \
            {outputs.SINGLE_OUTPUT: spec.predictions}
        shapes = {name: (tensor.shape.as_list() if tensor.shape.rank is not None else [], tensor.dtype.is_floating)
                  for name, tensor in predictions.items()}
    return outputs.output_keys(shapes, dataset["n_classes"], storage.name(model.path))


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    versions.update({name: importlib.metadata.version(name) for name in _PACKAGES})
    return versions


def _write_snapshot(model_dir: str, model_file: str, params: Mapping[str, Any], dataset: Mapping[str, Any],
                    run_config: Mapping[str, Any]) -> None:
    snapshot = storage.join(model_dir, MODEL_FILE)
    source = storage.read_bytes(model_file)
    if storage.exists(snapshot) and storage.read_bytes(snapshot) != source:
        # The run folder's version includes the model source, so this means the folder was tampered with.
        raise StageOutputError(f"{snapshot} differs from {model_file}; remove {storage.parent(model_dir)} "
                               "or rerun Train")
    storage.write_bytes(snapshot, source)
    write_json(storage.join(model_dir, PARAMS_FILE), dict(params))
    write_json(storage.join(model_dir, DATASET_FILE), dict(dataset))
    write_json(storage.join(model_dir, RUN_CONFIG_FILE), dict(run_config))
    write_json(storage.join(model_dir, VERSIONS_FILE), library_versions())


def _newest_export(folder: str) -> str | None:
    exports = [path for path in storage.glob(storage.join(folder, "[0-9]*"))
               if storage.exists(storage.join(path, "saved_model.pb"))]
    return exports[-1] if exports else None


def _train(estimator: tf.estimator.Estimator, metadata: Mapping[str, Any], *, convert_dir: str, metadata_path: str,
           max_steps: int, batch_size: int, eval_throttle_secs: int, early_stopping_steps: int,
           hooks: Sequence[tf.estimator.SessionRunHook] = ()) -> None:
    """Train `estimator` to `max_steps`, validating after its checkpoints when there is a validation
    split: in this process, or as the role its RunConfig took from TF_CONFIG."""
    hooks = [*hooks, LeaseCheckHook()]
    seed = estimator.config.tf_random_seed
    # RunConfig seeds the graph, but Keras layers draw their initializers' seeds from Python's
    # `random`: without this, two runs of one version train different weights.
    tf.keras.utils.set_random_seed(seed)
    files = shard_paths(convert_dir, metadata, "train")
    images = metadata["splits"]["train"]["count"]
    train_input = lambda: input_fn(files, metadata["image_shape"], batch_size, training=True,  # noqa: E731
                                   seed=seed, images=images)
    receiver = schema.serving_input_receiver_fn(metadata["image_shape"])
    if metadata["splits"][VALIDATION]["count"]:
        validation = shard_paths(convert_dir, metadata, VALIDATION)
        train_hooks = list(hooks)
        if early_stopping_steps:
            train_hooks.append(tf.estimator.experimental.stop_if_no_decrease_hook(
                estimator, "loss", early_stopping_steps, eval_dir=estimator.eval_dir(VALIDATION),
                run_every_secs=None, run_every_steps=estimator.config.save_checkpoints_steps))
        best = tf.estimator.BestExporter(name=BEST_EXPORT, serving_input_receiver_fn=receiver, exports_to_keep=1,
                                         event_file_pattern=f"eval_{VALIDATION}/*.tfevents.*")
        tf.estimator.train_and_evaluate(
            estimator, tf.estimator.TrainSpec(train_input, max_steps=max_steps, hooks=train_hooks),
            tf.estimator.EvalSpec(lambda: input_fn(validation, metadata["image_shape"], batch_size, training=False),
                                  steps=None, name=VALIDATION, exporters=[best], start_delay_secs=0,
                                  # Early stopping decides on every evaluation: skipping some by the
                                  # clock would make where it stops depend on the machine's speed.
                                  throttle_secs=0 if early_stopping_steps else eval_throttle_secs))
    else:
        log.warning("the validation split is empty: training without validation, and without a best export")
        estimator.train(train_input, max_steps=max_steps, hooks=list(hooks))


class StepCountHook(tf.estimator.SessionRunHook):
    """Logs, as its process ends, how many training steps this process ran: each role of a cluster
    says what it contributed to the shared global_step."""

    def __init__(self, role: str):
        self._role, self._steps = role, 0

    def after_run(self, run_context, run_values):
        self._steps += 1

    def end(self, session):
        log.info("%s ran %d training steps", self._role, self._steps)


def wait_for_chief(model_dir: str, strategy: str, role: str, timeout_s: float = 3600.0) -> None:
    """In a role a cluster manager started: wait for the chief's snapshot of the model in `model_dir`
    and, for a worker or the evaluator beside a parameter server, for the chief's first checkpoint
    (a worker that asks for a session before the chief has set the variables sleeps 30 s; the
    parameter server itself must be up before the chief can set them)."""
    waited_for = [storage.join(model_dir, VERSIONS_FILE)]
    if strategy == cluster.PARAMETER_SERVER and role != "ps":
        waited_for.append(storage.join(model_dir, "checkpoint"))
    deadline = time.monotonic() + timeout_s
    while not all(map(storage.exists, waited_for)):
        if time.monotonic() > deadline:
            raise cluster.ClusterError(f"the chief wrote no {', '.join(waited_for)} in {timeout_s:.0f} s")
        time.sleep(1.0)


def run_role(model_dir: str, strategy: str, **training: Any) -> None:
    """Train as the role of a cluster that TF_CONFIG names, from the snapshot in `model_dir`."""
    task = json.loads(os.environ["TF_CONFIG"])["task"]
    role = f"{task['type']} {task['index']}"
    # Without this, worker N waits (N + 1) x 5 s before its first step.
    config: dict[str, Any] = {"experimental_max_worker_delay_secs": 0}
    if task["type"] == "chief":
        # The evaluator runs beside the chief and may lag behind it: a checkpoint it has yet to
        # evaluate (and export, when best) must not be deleted under it. 0 keeps them all.
        config["keep_checkpoint_max"] = 0
    if strategy == cluster.MIRRORED and task["type"] in ("chief", "worker"):
        # Synchronous: every trainer computes a share of each step. The evaluator is no trainer,
        # and building the strategy there fails (KeyError: 'evaluator').
        config["train_distribute"] = tf.distribute.experimental.MultiWorkerMirroredStrategy()
    estimator = build_estimator(model_dir, lambda loss: [StepCountHook(role)], in_cluster=True, **config)
    metadata = read_json(training["metadata_path"])
    cluster.wait_for_start()
    _train(estimator, metadata, **training)


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
    _write_snapshot(model_dir, model_file, recorded, dataset, run_config)
    training = dict(convert_dir=convert_dir, metadata_path=metadata_path, max_steps=max_steps, batch_size=batch_size,
                    eval_throttle_secs=eval_throttle_secs, early_stopping_steps=early_stopping_steps)
    if distribute == "local":
        if not metadata["splits"][VALIDATION]["count"]:
            raise DatasetError(f"{metadata_path}: the validation split is empty; a training cluster needs it for "
                               "its evaluator")
        logs = cluster.run_local_cluster(
            [sys.executable, "-m", "pipeline.training", json.dumps({"model_dir": model_dir, **training,
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
        run_role(model_dir, strategy, **training)
        estimator = build_estimator(model_dir)
    else:
        estimator = build_estimator(
            model_dir, progress and (lambda loss: [ProgressHook(progress, max_steps, loss)]))
        _train(estimator, metadata, hooks=hooks, **training)
    receiver = schema.serving_input_receiver_fn(metadata["image_shape"])
    global_step = int(estimator.get_variable_value(tf.compat.v1.GraphKeys.GLOBAL_STEP))

    # An export left by a crash before the marker was written is stale: export again, once.
    export_root = storage.join(run_dir, EXPORT_DIR)
    remove_tree(export_root)
    export_dir = estimator.export_saved_model(storage.tf_path(export_root), receiver).decode()
    if not storage.exists(storage.join(export_dir, "saved_model.pb")):
        raise StageOutputError(f"{export_dir}: export_saved_model returned but wrote no saved_model.pb")
    best_export = _newest_export(storage.join(model_dir, EXPORT_DIR, BEST_EXPORT))
    flush_to_disk()  # TensorFlow writes checkpoints and the exports without flushing them
    summary = {"global_step": global_step, "export_dir": storage.relative(export_dir, run_dir),
               "best_export_dir": storage.relative(best_export, run_dir) if best_export else None,
               "model_dir": MODEL_DIR, "model_file": storage.name(model_file), "params": recorded,
               "run_config": dict(run_config), "max_steps": max_steps, "batch_size": batch_size,
               "early_stopping_steps": early_stopping_steps, "distribute": distribute,
               **({"cluster_workers": cluster_workers, "strategy": strategy} if distribute != "none" else {})}
    write_json(marker_path, summary)
    return summary


if __name__ == "__main__":
    # A role of a training cluster (see pipeline.cluster), with run_role's arguments as JSON. It
    # leaves through os._exit: a process that used tensorflow-io's S3 plugin aborts in a normal exit.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    tf.get_logger().setLevel(logging.INFO)  # the chief's "Saving checkpoints" says it is ready
    try:
        run_role(**json.loads(sys.argv[1]))
        code = 0
    except BaseException:  # noqa: B036 - whatever ends the role, its traceback goes to its log
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
