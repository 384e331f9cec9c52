"""The Estimator of a run and what feeds it: the input function over TFRecord shards, the snapshot
in model_dir that a run's Estimator is rebuilt from (by training, by each role of a cluster, by
evaluation), the hooks that training runs with, and the loop that trains and validates it.
"""
from __future__ import annotations

import importlib.metadata
import inspect
import logging
import math
import os
import platform
from typing import Any, Callable, Mapping, Sequence

import tensorflow as tf

from pipeline import locks, models, outputs, schema, storage
from pipeline.convert import shard_paths
from pipeline.errors import ModelDefinitionError, StageOutputError
from pipeline.models import ModelFile
from pipeline.params import Params, as_params, from_json
from pipeline.progress import Progress
from pipeline.runfiles import (BEST_EXPORT, DATASET_FILE, MODEL_FILE, PARAMS_FILE, RUN_CONFIG_FILE, VALIDATION,
                               VERSIONS_FILE)
from pipeline.storage import read_json, write_json

log = logging.getLogger(__name__)

_SHUFFLE_BUFFER = 10_000
_PACKAGES = ("tensorflow", "tensorflow-estimator", "keras", "numpy", "pillow", "luigi")

# Where a container's memory limit is read, cgroup v2 then v1: in a container, the machine's
# physical memory is the host's, which the container may not have.
_CGROUP_MEMORY_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def cache_limit_bytes() -> int:
    """How much of a training set may be cached in memory: a quarter of the memory this process
    may use (the machine's, or its container's limit when lower), leaving the rest to the model,
    the shuffle buffer and other processes."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in _CGROUP_MEMORY_LIMITS:
        try:
            with open(path) as handle:
                limit = handle.read().strip()
        except OSError:
            continue
        if limit.isdigit():  # "max": no limit
            memory = min(memory, int(limit))
    return memory // 4


def input_fn(files: Sequence[str], image_shape: Sequence[int], batch_size: int, *, training: bool,
             seed: int | None = None, images: int | None = None,
             cache_limit: int | None = None) -> tf.data.Dataset:
    """Batches of ({image}, label) from TFRecord shards; shuffled and repeated when training.

    When training, later epochs read from memory rather than the shards: the decoded pixels of
    `images` records when they fit in `cache_limit` bytes (default `cache_limit_bytes()`), else
    the stored records when their files fit, decoded again each epoch (JPEG records are a tenth
    of their pixels). Records are shuffled before they are decoded unless their pixels are
    cached, so the shuffle buffer holds stored bytes, not pixels. Either way the order is the
    shuffle's alone: what is cached, and so the machine's memory, never changes the weights.
    Pixels are scaled to floats per batch, one vectorised op instead of one per image.
    """
    image_shape = list(image_shape)
    decode = lambda serialized: schema.parse_training_example(serialized, image_shape)  # noqa: E731
    dataset = tf.data.Dataset.from_tensor_slices([storage.tf_path(file) for file in files])
    if training:
        # Once: every epoch then reads the records in the order of the first, which is what a cache
        # replays; the shuffle below reorders them each epoch.
        dataset = dataset.shuffle(len(files), seed=seed, reshuffle_each_iteration=False)
    dataset = dataset.interleave(tf.data.TFRecordDataset, cycle_length=min(len(files), 4),
                                 num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if not training:
        dataset = dataset.map(decode, num_parallel_calls=tf.data.AUTOTUNE)
    else:
        limit = cache_limit_bytes() if cache_limit is None else cache_limit
        cache_pixels = images is not None and images * math.prod(image_shape) <= limit
        if cache_pixels:
            dataset = dataset.map(decode, num_parallel_calls=tf.data.AUTOTUNE).cache()
        elif sum(storage.size_of(file) for file in files) <= limit:
            dataset = dataset.cache()
        dataset = dataset.shuffle(_SHUFFLE_BUFFER, seed=seed).repeat()
        if not cache_pixels:
            dataset = dataset.map(decode, num_parallel_calls=tf.data.AUTOTUNE)
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
    writes check the leases (see `locks.check_leases`)."""

    def after_run(self, run_context, run_values):
        locks.check_leases()


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


def write_snapshot(model_dir: str, model_file: str, params: Mapping[str, Any], dataset: Mapping[str, Any],
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


def train_and_validate(estimator: tf.estimator.Estimator, metadata: Mapping[str, Any], *, convert_dir: str,
                       metadata_path: str, max_steps: int, batch_size: int, eval_throttle_secs: int,
                       early_stopping_steps: int, hooks: Sequence[tf.estimator.SessionRunHook] = ()) -> None:
    """Train `estimator` to `max_steps`, validating after its checkpoints when there is a validation
    split: in this process, or as the role its RunConfig took from TF_CONFIG."""
    hooks = [*hooks, LeaseCheckHook()]
    seed = estimator.config.tf_random_seed
    # RunConfig seeds the graph, but Keras layers draw their initializers' seeds from Python's
    # `random`: without this, two runs of one version train different weights.
    tf.keras.utils.set_random_seed(seed)
    files = shard_paths(convert_dir, metadata, "train")
    images = metadata["splits"]["train"]["count"]
    # Each trainer of a cluster caches its own copy: on one machine (distribute=local), they share its memory.
    cache_limit = cache_limit_bytes() // max(1, estimator.config.num_worker_replicas)
    train_input = lambda: input_fn(files, metadata["image_shape"], batch_size, training=True,  # noqa: E731
                                   seed=seed, images=images, cache_limit=cache_limit)
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
