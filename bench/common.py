"""Shared by the benchmarks: the embedded sample converted once, timing, and printing ratios.

Every figure is a ratio against a baseline measured in the same run: absolute times on these
shared machines mean little. Each repetition measures both sides back to back, and the figure is
the median of the repetitions' ratios, so that the machine's load, which drifts over minutes,
weighs on both sides of each ratio alike.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / "build" / "bench"
EMBEDDED = REPO / "data" / "mnist_5k.tar.gz"
REPEATS = int(os.environ.get("BENCH_REPEATS", "3"))

sys.path.insert(0, str(REPO))


def bench_config(folder: Path, source_url: str, roots: str | None = None) -> Path:
    """luigi.cfg's settings with data and results in `folder` (or below `roots`, an S3 prefix) and the
    dataset from `source_url`; returns the path of the configuration file written there."""
    import configparser

    parser = configparser.ConfigParser(interpolation=None)
    parser.read(REPO / "luigi.cfg")
    roots = roots or str(folder)
    parser["layout"] = {"data_root": f"{roots}/data", "results_root": f"{roots}/results"}
    parser["Download"] = {"dataset": "bench", "source_url": source_url}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "luigi.cfg"
    with open(path, "w") as handle:
        parser.write(handle)
    return path


def luigi_env(config: Path) -> dict[str, str]:
    return {**os.environ, "LUIGI_CONFIG_PATH": str(config)}


LUIGI = str(Path(sys.executable).with_name("luigi"))


def converted_sample(num_shards: int = 4) -> tuple[Path, dict]:
    """The embedded sample downloaded and converted with luigi.cfg's settings, once; (folder, metadata)."""
    from pipeline import convert, download
    from pipeline.storage import read_json

    out = CACHE / f"tfrecords-{num_shards}"
    if not (out / "metadata.json").is_file():
        raw = CACHE / "raw"
        if not (raw / "download.json").is_file():
            download.download_dataset(EMBEDDED.as_uri(), raw, "download.json")
        convert.plan_conversion(raw, out / convert.PLAN_FILE, validation_fraction=0.1, test_fraction=0.15,
                                split_seed=1234, num_shards=num_shards)
        reports = convert.write_all_shards(raw, out, num_shards=num_shards, image_size=28, channels=1)
        convert.finalize_conversion(out, reports, out / "metadata.json", image_size=28, channels=1,
                                    max_bad_fraction=0.01, source={})
    return out, read_json(out / "metadata.json")


def split_arrays(convert_dir: Path, metadata: dict, split: str):
    """A split as in-memory NumPy arrays: float32 images in [0, 1] and int64 labels."""
    import numpy as np
    import tensorflow as tf

    from pipeline import schema
    from pipeline.convert import shard_paths

    images, labels = [], []
    dataset = tf.data.TFRecordDataset(shard_paths(convert_dir, metadata, split)).map(
        lambda s: schema.parse_training_example(s, metadata["image_shape"]))
    for pixels, label in dataset.as_numpy_iterator():
        images.append(pixels)
        labels.append(label)
    return np.stack(images).astype(np.float32) / 255.0, np.asarray(labels, dtype=np.int64)


def cnn_params() -> dict:
    from pipeline import models

    return models.load_model(models.resolve_model_file("cnn")).defaults


def keras_cnn(image_shape, *, training: bool, num_classes: int = 10):
    """The default `cnn` model file's architecture in Keras, from its PARAMS, for `num_classes`
    classes: for training with dropout and logits, for prediction with class probabilities."""
    import tensorflow as tf

    params = cnn_params()
    layers = [tf.keras.Input(image_shape)]
    for filters in params["conv_filters"]:
        layers += [tf.keras.layers.Conv2D(filters, params["kernel_size"], padding="same", activation="relu"),
                   tf.keras.layers.MaxPool2D(2, padding="same")]
    layers += [tf.keras.layers.Flatten(), tf.keras.layers.Dense(params["dense_units"], activation="relu")]
    if training:
        layers += [tf.keras.layers.Dropout(params["dropout_rate"]), tf.keras.layers.Dense(num_classes)]
    else:
        layers += [tf.keras.layers.Dense(num_classes, activation="softmax")]
    return tf.keras.Sequential(layers)


def timed(function: Callable[[], object]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def report(figure: str, measured: list[float], baseline: list[float], unit: str, target: str) -> float:
    """Print one figure: the median of the paired ratios measured[i] / baseline[i], and each side's median."""
    ratio = statistics.median(mine / theirs for mine, theirs in zip(measured, baseline, strict=True))
    print(f"{figure}: {statistics.median(measured):.1f} vs {statistics.median(baseline):.1f} {unit} (medians) -> "
          f"ratio {ratio:.3f} (target {target}); runs {[round(v, 1) for v in measured]} vs "
          f"{[round(v, 1) for v in baseline]}", flush=True)
    return ratio
