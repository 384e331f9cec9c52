"""Predict images/s: the Predict stage's batch prediction on the test split with the exported
SavedModel, against Keras Model.predict on the same split as in-memory NumPy arrays, same
architecture. Both are timed cold, as a user runs them once: loading or tracing included.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from common import CACHE, REPEATS, converted_sample, report, split_arrays, timed

BATCH = 256


def exported_model(convert_dir: Path) -> Path:
    """A briefly trained cnn run on the sample, once; returns its SavedModel folder."""
    from pipeline import models, training
    from pipeline.fileio import read_json

    run_dir = CACHE / "predict-run"
    if not (run_dir / "train.json").is_file():
        training.train_model(models.resolve_model_file("cnn"), {}, convert_dir, convert_dir / "metadata.json",
                             run_dir, run_dir / "train.json", max_steps=50, batch_size=64,
                             run_config={"tf_random_seed": 42, "save_summary_steps": 50,
                                         "save_checkpoints_steps": 50, "keep_checkpoint_max": 1,
                                         "log_step_count_steps": 50})
    return run_dir / read_json(run_dir / "train.json")["export_dir"]


def keras_predict(images) -> None:
    import tensorflow as tf

    from pipeline import models

    params = models.load_model_module(models.resolve_model_file("cnn")).PARAMS
    layers = [tf.keras.Input(images.shape[1:])]
    for filters in params["conv_filters"]:
        layers += [tf.keras.layers.Conv2D(filters, params["kernel_size"], padding="same", activation="relu"),
                   tf.keras.layers.MaxPool2D(2, padding="same")]
    layers += [tf.keras.layers.Flatten(), tf.keras.layers.Dense(params["dense_units"], activation="relu"),
               tf.keras.layers.Dense(10, activation="softmax")]
    tf.keras.Sequential(layers).predict(images, batch_size=BATCH, verbose=0)


def main() -> None:
    from pipeline.prediction import predict_to_csv

    convert_dir, metadata = converted_sample()
    export_dir = exported_model(convert_dir)
    images, _ = split_arrays(convert_dir, metadata, "test")
    count = len(images)
    pipeline, keras = [], []
    with tempfile.TemporaryDirectory(dir=CACHE) as folder:
        for _ in range(max(REPEATS, 7)):  # seconds each: more repeats cost little
            pipeline.append(count / timed(lambda: predict_to_csv(export_dir, metadata, Path(folder) / "p.csv",
                                                                 convert_dir=convert_dir, batch_size=BATCH)))
            keras.append(count / timed(lambda: keras_predict(images)))
    report("predict images/s, Predict stage vs Keras predict on NumPy", pipeline, keras, "images/s", ">= 1.0")


if __name__ == "__main__":
    main()
