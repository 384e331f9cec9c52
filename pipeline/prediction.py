"""Predict stage: batch prediction with a run's exported SavedModel into predictions.csv.

Input is either a split of the converted records (keys and true labels known) or a folder of
new images, which go through the same Pillow normalisation as conversion before the model's
serving signature decodes them.
"""
from __future__ import annotations

import csv
import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import tensorflow as tf

from pipeline import outputs, schema
from pipeline.convert import list_visible_files, load_image, shard_paths, stored_format
from pipeline.csvcells import safe_row
from pipeline.errors import DatasetError, UnusableImage
from pipeline import storage
from pipeline.storage import atomic_path
from pipeline.progress import Progress

log = logging.getLogger(__name__)


def _record_batches(files: Sequence[str], image_shape: Sequence[int], batch_size: int, *,
                    pixels: bool) -> Iterator[tuple[list[str], list[int], dict[str, np.ndarray]]]:
    """Batches of a split's records as (keys, labels, inputs of the serving signature): the
    model's features for `schema.PIXELS_SIGNATURE` when `pixels`, else the stored image bytes.
    Records are parsed, decoded and scaled in tf.data's threads, ahead of the model, so that this
    thread only hands batches over."""
    def parse(serialized):
        parsed = schema.parse_example(serialized)
        image = schema.decode_stored_pixels(parsed[schema.ENCODED], image_shape) if pixels else parsed[schema.ENCODED]
        return parsed[schema.KEY], parsed[schema.LABEL], image

    records = tf.data.TFRecordDataset([storage.tf_path(file) for file in files])
    dataset = records.map(parse, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size)
    if pixels:
        dataset = dataset.map(lambda keys, labels, images: (keys, labels, schema.scale_pixels(images)))
    for keys, labels, images in dataset.prefetch(tf.data.AUTOTUNE).as_numpy_iterator():
        name = schema.IMAGE if pixels else schema.SERVING_INPUT
        yield [k.decode("utf-8") for k in keys], labels.tolist(), {name: images}


def _folder_batches(files: Sequence[str], input_dir: str, image_size: int, channels: int, batch_size: int,
                    stored: dict) -> Iterator[tuple[list[str], list[None], dict[str, list[bytes]]]]:
    paths, encoded = [], []
    for path in files:
        try:
            encoded.append(load_image(path, image_size, channels, **stored))
        except UnusableImage as error:
            log.warning("skipping %s: %s", path, error)
            continue
        paths.append(storage.relative(path, input_dir))
        if len(paths) == batch_size:
            yield paths, [None] * len(paths), {schema.SERVING_INPUT: encoded}
            paths, encoded = [], []
    if paths:
        yield paths, [None] * len(paths), {schema.SERVING_INPUT: encoded}


def _load_for_serving(export_dir: str) -> tuple[tf.compat.v1.Session, Mapping[str, Any]]:
    """The SavedModel in a session of its own graph, and its signature defs.

    Loaded the TF1 way, as the Estimator exported it: `tf.saved_model.load` costs twice the time
    to load, and each of its signature calls fails to bind its keyword arguments and formats
    the whole input batch into an error message before falling back.
    """
    graph = tf.Graph()
    session = tf.compat.v1.Session(graph=graph)
    with graph.as_default():
        meta_graph = tf.compat.v1.saved_model.load(session, [tf.saved_model.SERVING],
                                                     storage.tf_path(export_dir))
    return session, meta_graph.signature_def


def predict_to_csv(export_dir: str, metadata: dict, output_csv: str, *, convert_dir: str | None = None,
                   split: str = "test", input_dir: str | None = None, batch_size: int = 256,
                   progress: Progress | None = None) -> int:
    """Write one row per image: key or path, true label (blank when unknown), predicted class
    name and id, and the probability of each class, read from the export's outputs as
    `pipeline.outputs` says. Returns the number of rows."""
    class_names = metadata["class_names"]
    image_shape = metadata["image_shape"]
    if input_dir is not None:
        if not storage.is_dir(input_dir):
            raise DatasetError(f"input_dir={str(input_dir)!r} is not a folder; expected a folder of images")
        files, key_column = list_visible_files(input_dir), "path"
        images = len(files)
        batches = _folder_batches(files, input_dir, image_shape[0], image_shape[-1], batch_size,
                                  stored_format(metadata))
        signature = tf.saved_model.DEFAULT_SERVING_SIGNATURE_DEF_KEY
    else:
        files, key_column = shard_paths(convert_dir, metadata, split), "key"
        images = metadata["splits"][split]["count"]
    session, signatures = _load_for_serving(export_dir)
    with closing(session):
        if input_dir is None:
            # Exports from before the pixels signature existed have only the encoded-bytes one.
            pixels = schema.PIXELS_SIGNATURE in signatures
            batches = _record_batches(files, image_shape, batch_size, pixels=pixels)
            signature = schema.PIXELS_SIGNATURE if pixels else tf.saved_model.DEFAULT_SERVING_SIGNATURE_DEF_KEY
        feeds = {name: tensor.name for name, tensor in signatures[signature].inputs.items()}
        keys = outputs.output_keys(
            {name: ([-1] if info.tensor_shape.unknown_rank else [dim.size for dim in info.tensor_shape.dim],
                    tf.as_dtype(info.dtype).is_floating) for name, info in signatures[signature].outputs.items()},
            len(class_names), f"{export_dir}, signature {signature!r}")
        fetches = {name: signatures[signature].outputs[name].name for name in (keys.scores, keys.class_ids) if name}
        return _write_rows(session, feeds, fetches, keys, batches, output_csv, key_column, class_names,
                           -(-images // batch_size), progress, source=str(input_dir or split))


def _write_rows(session: tf.compat.v1.Session, feeds: Mapping[str, str], fetches: Mapping[str, str],
                keys: outputs.OutputKeys, batches: Iterator, output_csv: str, key_column: str,
                class_names: Sequence[str], total_batches: int, progress: Progress | None, source: str) -> int:
    """Run every batch through the signature and write its rows to `output_csv` atomically; a
    `source` that gave no image leaves no file."""
    rows = 0
    with atomic_path(output_csv) as temp, open(temp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(safe_row([key_column, "true_label", "predicted_label", "predicted_id",
                                  *(f"p_{name}" for name in class_names)]))
        def run(inputs):
            return session.run(dict(fetches), {feeds[name]: value for name, value in inputs.items()})

        for batch_number, (batch_keys, labels, results) in enumerate(_run_ahead(run, batches), start=1):
            probabilities, predicted = outputs.read_outputs(results, keys)
            for key, label, class_id, probs in zip(batch_keys, labels, predicted, probabilities):
                writer.writerow(safe_row([key, "" if label is None else class_names[label], class_names[class_id],
                                          int(class_id), *(f"{p:.6f}" for p in probs)]))
            rows += len(batch_keys)
            if progress:
                progress(batch_number, total_batches, "batches", f"{rows} images")
        if rows == 0:
            raise DatasetError(f"found no images to predict in {source}")
    return rows


def _run_ahead(run: Callable[[Any], Any], batches: Iterator[tuple]) -> Iterator[tuple]:
    """(keys, labels, run(inputs)) for each (keys, labels, inputs) of `batches`, in order, with
    the model already running on the next batch in a thread of its own (a session run releases
    the GIL) while the caller writes this one's rows."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for batch_keys, labels, inputs in batches:
            running = (batch_keys, labels, pool.submit(run, inputs))
            if pending:
                yield pending[0], pending[1], pending[2].result()
            pending = running
        if pending:
            yield pending[0], pending[1], pending[2].result()
