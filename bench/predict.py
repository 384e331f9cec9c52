"""Predict images/s: the Predict stage's batch prediction with the exported SavedModel, against
Keras Model.predict on in-memory NumPy arrays, same architecture.

Both sides are timed cold, as a user runs them once, reading a trained model from disk: the
SavedModel, or a saved `.keras` file. The main figure is the test split; the train split, five
times larger, shows the rate once loading is spread over more images. For context, Keras is
also timed with its model built in code, reading nothing.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from common import CACHE, REPEATS, converted_sample, keras_cnn, report, split_arrays, timed

BATCH = 256


def exported_model(convert_dir: Path) -> Path:
    """A briefly trained cnn run on the sample, once; returns its SavedModel folder."""
    from pipeline import models, training
    from pipeline.storage import read_json

    run_dir = CACHE / "predict-run"
    if not (run_dir / "train.json").is_file():
        training.train_model(models.resolve_model_file("cnn"), {}, convert_dir, convert_dir / "metadata.json",
                             run_dir, run_dir / "train.json", max_steps=50, batch_size=64,
                             run_config={"tf_random_seed": 42, "save_summary_steps": 50,
                                         "save_checkpoints_steps": 50, "keep_checkpoint_max": 1,
                                         "log_step_count_steps": 50})
    return run_dir / read_json(run_dir / "train.json")["export_dir"]


def saved_keras_model(image_shape) -> Path:
    path = CACHE / "predict-keras.keras"
    if not path.is_file():
        keras_cnn(image_shape, training=False).save(path)
    return path


def keras_from_file(images, path: Path) -> None:
    import tensorflow as tf

    tf.keras.models.load_model(path).predict(images, batch_size=BATCH, verbose=0)


def keras_from_code(images) -> None:
    keras_cnn(images.shape[1:], training=False).predict(images, batch_size=BATCH, verbose=0)


def main() -> None:
    from pipeline.prediction import predict_to_csv

    convert_dir, metadata = converted_sample()
    export_dir = exported_model(convert_dir)
    keras_file = saved_keras_model(metadata["image_shape"])
    images = {split: split_arrays(convert_dir, metadata, split)[0] for split in ("test", "train")}
    seconds = {(side, split): [] for side in ("pipeline", "keras") for split in images}
    from_code = []
    with tempfile.TemporaryDirectory(dir=CACHE) as folder:
        for _ in range(max(REPEATS, 7)):  # seconds each: more repeats cost little
            for split in images:
                seconds["pipeline", split].append(timed(lambda: predict_to_csv(
                    export_dir, metadata, Path(folder) / "p.csv", convert_dir=convert_dir, split=split,
                    batch_size=BATCH)))
                seconds["keras", split].append(timed(lambda: keras_from_file(images[split], keras_file)))
            from_code.append(timed(lambda: keras_from_code(images["test"])))

    def rates(side: str, split: str) -> list[float]:
        return [len(images[split]) / s for s in seconds[side, split]]

    for split in images:
        report(f"predict images/s ({len(images[split])} {split}-split images), Predict stage vs Keras load_model "
               "+ predict", rates("pipeline", split), rates("keras", split), "images/s", ">= 1.0")
    report("predict images/s (test), Predict stage vs Keras built in code, reading no model (context)",
           rates("pipeline", "test"), [len(images["test"]) / s for s in from_code], "images/s", "none")


if __name__ == "__main__":
    main()
