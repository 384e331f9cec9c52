"""Predict stage: batch prediction with a run's exported SavedModel into predictions.csv.

Input is either a split of the converted records (keys and true labels known) or a folder of
new images, which go through the same Pillow normalisation as conversion before the model's
serving signature decodes them.
"""
from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import tensorflow as tf
from PIL import Image

from pipeline import schema
from pipeline.convert import list_visible_files, load_image, shard_paths
from pipeline.errors import DatasetError
from pipeline.fileio import atomic_path
from pipeline.progress import Progress

log = logging.getLogger(__name__)


def _record_batches(files: Sequence[str], batch_size: int) -> Iterator[tuple[list[str], list[int], list[bytes]]]:
    dataset = tf.data.TFRecordDataset(list(files)).map(schema.parse_example).batch(batch_size)
    for batch in dataset.as_numpy_iterator():
        yield ([k.decode("utf-8") for k in batch[schema.KEY]], batch[schema.LABEL].tolist(),
               list(batch[schema.ENCODED]))


def _folder_batches(files: Sequence[Path], input_dir: Path, image_size: int, channels: int,
                    batch_size: int) -> Iterator[tuple[list[str], list[None], list[bytes]]]:
    paths, encoded = [], []
    for path in files:
        try:
            encoded.append(load_image(path, image_size, channels))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            log.warning("skipping %s: %s: %s", path, type(error).__name__, error)
            continue
        paths.append(path.relative_to(input_dir).as_posix())
        if len(paths) == batch_size:
            yield paths, [None] * len(paths), encoded
            paths, encoded = [], []
    if paths:
        yield paths, [None] * len(paths), encoded


def predict_to_csv(export_dir: Path, metadata: dict, output_csv: Path, *, convert_dir: Path | None = None,
                   split: str = "test", input_dir: Path | None = None, batch_size: int = 256,
                   progress: Progress | None = None) -> int:
    """Write one row per image: key or path, true label (blank when unknown), predicted class
    name and id, and the probability of each class. Returns the number of rows."""
    class_names = metadata["class_names"]
    height, _, channels = metadata["image_shape"]
    if input_dir is not None:
        input_dir = Path(input_dir)
        if not input_dir.is_dir():
            raise DatasetError(f"input_dir={str(input_dir)!r} is not a folder; expected a folder of images")
        files = list_visible_files(input_dir)
        batches, key_column = _folder_batches(files, input_dir, height, channels, batch_size), "path"
        images = len(files)
    else:
        batches, key_column = _record_batches(shard_paths(convert_dir, metadata, split), batch_size), "key"
        images = metadata["splits"][split]["count"]
    serve = tf.saved_model.load(str(export_dir)).signatures[tf.saved_model.DEFAULT_SERVING_SIGNATURE_DEF_KEY]
    total_batches = -(-images // batch_size)
    rows = 0
    with atomic_path(output_csv) as temp, open(temp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow([key_column, "true_label", "predicted_label", "predicted_id",
                         *(f"p_{name}" for name in class_names)])
        for batch_number, (keys, labels, encoded) in enumerate(batches, start=1):
            outputs = serve(**{schema.SERVING_INPUT: tf.constant(encoded)})
            probabilities = outputs["probabilities"].numpy()
            predicted = np.argmax(probabilities, axis=1)
            for key, label, class_id, probs in zip(keys, labels, predicted, probabilities):
                writer.writerow([key, "" if label is None else class_names[label], class_names[class_id],
                                 int(class_id), *(f"{p:.6f}" for p in probs)])
            rows += len(keys)
            if progress:
                progress(batch_number, total_batches, "batches", f"{rows} images")
        if rows == 0:
            raise DatasetError(f"found no images to predict in {input_dir or split}")
    return rows
