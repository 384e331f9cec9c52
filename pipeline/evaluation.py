"""Evaluate stage: a run's latest checkpoint on one split: metrics.json and a confusion matrix.

The loss, and the model's own `eval_metric_ops` under their own names, come from the model's
EVAL spec; its summaries go to `model_dir/eval_<split>`, where TensorBoard shows them beside
training. The accuracy, the confusion matrix and the per-class scores come from the model's
predictions on the split, read as `pipeline.outputs` says, so a model needs nothing beyond the
Estimator contract. `metrics.json` is written last and is the stage's marker.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import tensorflow as tf

from pipeline import outputs
from pipeline.estimator import ProgressHook, build_estimator, input_fn
from pipeline.convert import shard_paths
from pipeline.errors import DatasetError
from pipeline import storage
from pipeline.storage import read_json, write_bytes, write_json
from pipeline.plots import confusion_matrix_png
from pipeline.progress import Progress
from pipeline.runfiles import MODEL_DIR

CONFUSION_MATRIX_PNG = "confusion_matrix.png"
# What the Estimator's evaluate() returns beside the model's own metrics.
_ESTIMATOR_KEYS = ("loss", "global_step")


def per_class_scores(confusion: np.ndarray, class_names: Sequence[str]) -> dict[str, dict[str, float]]:
    """Precision, recall, F1 and support per class; rows of `confusion` are true labels."""
    true_positive = np.diag(confusion).astype(float)
    predicted = confusion.sum(axis=0)
    actual = confusion.sum(axis=1)
    precision = np.divide(true_positive, predicted, out=np.zeros_like(true_positive), where=predicted > 0)
    recall = np.divide(true_positive, actual, out=np.zeros_like(true_positive), where=actual > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros_like(true_positive), where=both > 0)
    return {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                   "support": int(actual[i])} for i, name in enumerate(class_names)}


def _as_json(value: Any) -> Any:
    array = np.asarray(value)
    return array.item() if array.ndim == 0 else array.tolist()


def predicted_class_ids(estimator: tf.estimator.Estimator, input_fn, checkpoint: str, n_classes: int,
                        hooks: list) -> np.ndarray:
    """The class id the model predicts for each example `input_fn` gives, in order."""
    keys, class_ids = None, []
    for batch in estimator.predict(input_fn, checkpoint_path=checkpoint, yield_single_examples=False, hooks=hooks):
        if keys is None:
            named = batch if isinstance(batch, dict) else {outputs.SINGLE_OUTPUT: batch}
            keys = outputs.output_keys({name: (array.shape, np.issubdtype(array.dtype, np.floating))
                                        for name, array in named.items()}, n_classes, "the model's predictions")
        class_ids.append(outputs.read_outputs(batch, keys)[1])
    return np.concatenate(class_ids) if class_ids else np.zeros([0], np.int64)


def evaluate_model(run_dir: str, convert_dir: str, metadata_path: str, split: str, out_dir: str,
                   metrics_path: str, *, batch_size: int = 256, progress: Progress | None = None) -> dict:
    metadata = read_json(metadata_path)
    files = shard_paths(convert_dir, metadata, split)
    examples = metadata["splits"][split]["count"]
    if examples == 0:
        raise DatasetError(f"{metadata_path}: the {split!r} split holds no images; choose another split or "
                           "raise its fraction in Convert")
    class_names = metadata["class_names"]
    model_dir = storage.join(run_dir, MODEL_DIR)
    estimator = build_estimator(model_dir)
    checkpoint = tf.train.latest_checkpoint(storage.tf_path(model_dir))
    batches = -(-examples // batch_size)

    def split_input():
        return input_fn(files, metadata["image_shape"], batch_size, training=False)

    def hooks(done_before: int) -> list:
        return [ProgressHook(progress, 2 * batches, done_before=done_before)] if progress else []

    result = estimator.evaluate(split_input, checkpoint_path=checkpoint, name=split, hooks=hooks(0))
    labels = np.concatenate([batch_labels for _, batch_labels in split_input().as_numpy_iterator()])
    predicted = predicted_class_ids(estimator, split_input, checkpoint, len(class_names), hooks(batches))
    confusion = np.zeros([len(class_names)] * 2, dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    metrics = {
        "split": split,
        "examples": int(confusion.sum()),
        "loss": float(result["loss"]),
        "accuracy": float(np.mean(labels == predicted)),
        "global_step": int(result["global_step"]),
        "checkpoint": storage.name(checkpoint),
        "class_names": class_names,
        "per_class": per_class_scores(confusion, class_names),
        "confusion_matrix": confusion.tolist(),
        "model_metrics": {name: _as_json(value) for name, value in sorted(result.items())
                          if name not in _ESTIMATOR_KEYS},
    }
    write_bytes(storage.join(out_dir, CONFUSION_MATRIX_PNG), confusion_matrix_png(
        confusion, class_names, f"{split}: accuracy {metrics['accuracy']:.4f} at step {metrics['global_step']}"))
    write_json(metrics_path, metrics)
    return metrics
