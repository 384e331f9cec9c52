"""Evaluate stage: metrics of a run's latest checkpoint on one split, and a confusion-matrix image.

Summaries go to `model_dir/eval_<split>`, where TensorBoard shows them beside training.
`metrics.json` is written last and is the stage's marker.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np
import tensorflow as tf
from PIL import Image, ImageDraw

from pipeline import training
from pipeline.convert import shard_paths
from pipeline.errors import DatasetError
from pipeline.fileio import read_json, write_bytes_atomic, write_json_atomic
from pipeline.progress import Progress

CONFUSION_MATRIX_PNG = "confusion_matrix.png"


def _metric_fn(n_classes: int):
    """Accuracy and a streaming confusion matrix, the same for every model, premade or custom."""
    def metric_fn(labels, predictions):
        labels = tf.reshape(tf.cast(labels, tf.int64), [-1])
        class_ids = tf.reshape(tf.cast(predictions["class_ids"], tf.int64), [-1])
        total = tf.compat.v1.Variable(
            tf.zeros([n_classes, n_classes], tf.int64), trainable=False, name="confusion_matrix",
            collections=[tf.compat.v1.GraphKeys.LOCAL_VARIABLES, tf.compat.v1.GraphKeys.METRIC_VARIABLES])
        update = total.assign_add(tf.math.confusion_matrix(labels, class_ids, n_classes, dtype=tf.int64))
        return {"accuracy": tf.compat.v1.metrics.accuracy(labels, class_ids, name="pipeline_accuracy"),
                "confusion_matrix": (tf.identity(total), update)}
    return metric_fn


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


def confusion_matrix_png(confusion: np.ndarray, class_names: Sequence[str], title: str) -> bytes:
    """A heat map with counts: rows are true classes, columns predicted ones, shaded by row share."""
    cell, margin = 36, 90
    n = len(class_names)
    image = Image.new("RGB", (margin + n * cell + 10, margin + n * cell + 10), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 8), title, fill="black")
    draw.text((margin, margin - 34), "predicted", fill="black")
    draw.text((8, margin - 16), "true", fill="black")
    row_totals = confusion.sum(axis=1, keepdims=True).clip(min=1)
    for i, name in enumerate(class_names):
        draw.text((margin + i * cell + 4, margin - 16), name[:5], fill="black")
        draw.text((8, margin + i * cell + 12), name[:12], fill="black")
        for j in range(n):
            share = confusion[i, j] / row_totals[i, 0]
            shade = int(255 * (1 - share))
            box = (margin + j * cell, margin + i * cell, margin + (j + 1) * cell, margin + (i + 1) * cell)
            draw.rectangle(box, fill=(shade, shade, 255), outline="grey")
            draw.text((box[0] + 4, box[1] + 12), str(int(confusion[i, j])), fill="white" if share > 0.5 else "black")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def evaluate_model(run_dir: Path, convert_dir: Path, metadata_path: Path, split: str, out_dir: Path,
                   metrics_path: Path, *, batch_size: int = 256, progress: Progress | None = None) -> dict:
    metadata = read_json(metadata_path)
    files = shard_paths(convert_dir, metadata, split)
    if metadata["splits"][split]["count"] == 0:
        raise DatasetError(f"{metadata_path}: the {split!r} split holds no images; choose another split or "
                           "raise its fraction in Convert")
    class_names = metadata["class_names"]
    model_dir = Path(run_dir) / training.MODEL_DIR
    estimator = tf.estimator.add_metrics(training.build_estimator(model_dir), _metric_fn(len(class_names)))
    checkpoint = tf.train.latest_checkpoint(str(model_dir))
    batches = -(-metadata["splits"][split]["count"] // batch_size)
    result = estimator.evaluate(
        lambda: training.input_fn(files, metadata["image_shape"], batch_size, training=False),
        checkpoint_path=checkpoint, name=split,
        hooks=[training.ProgressHook(progress, batches)] if progress else None)
    confusion = np.asarray(result["confusion_matrix"], dtype=np.int64)
    metrics = {
        "split": split,
        "examples": int(confusion.sum()),
        "loss": float(result["loss"]),
        "accuracy": float(result["accuracy"]),
        "global_step": int(result["global_step"]),
        "checkpoint": Path(checkpoint).name,
        "class_names": class_names,
        "per_class": per_class_scores(confusion, class_names),
        "confusion_matrix": confusion.tolist(),
    }
    write_bytes_atomic(Path(out_dir) / CONFUSION_MATRIX_PNG, confusion_matrix_png(
        confusion, class_names, f"{split}: accuracy {metrics['accuracy']:.4f} at step {metrics['global_step']}"))
    write_json_atomic(metrics_path, metrics)
    return metrics
