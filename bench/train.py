"""Train steps/s through the Train stage's own code, against (a) a bare Estimator on the same
model_fn and (b) Keras Model.fit on the same architecture, both fed from in-memory NumPy arrays.

The default `cnn` model, batch 64, the run settings of luigi.cfg but for checkpoints. Steps/s
is taken from step WARMUP to step STEPS, so graph building, the first steps and the export are
left out: it is the median over windows of WINDOW steps, so that a burst of load from elsewhere
on the machine during one window does not decide the run. A last figure is the cost of the
validation the Train stage runs after each checkpoint.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

from common import REPEATS, cnn_params, converted_sample, keras_cnn, report, split_arrays

STEPS = int(os.environ.get("BENCH_TRAIN_STEPS", "400"))
WARMUP = 100
WINDOW = 50
MARKS = range(WARMUP, STEPS + 1, WINDOW)
BATCH = 64
# No checkpoint, and so no validation, inside the timed windows: the steady rate of steps. What
# validating every 250 steps (luigi.cfg's setting) costs is its own figure, `validation_cost`.
RUN_CONFIG = {"tf_random_seed": 42, "save_summary_steps": 50, "save_checkpoints_steps": 500,
              "keep_checkpoint_max": 3, "log_step_count_steps": 100}


def steady_rate(times: dict[int, float]) -> float:
    return statistics.median(WINDOW / (times[end] - times[start]) for start, end in zip(MARKS, MARKS[1:]))


def step_timer(times: dict[int, float]):
    import tensorflow as tf

    class StepTimer(tf.estimator.SessionRunHook):
        def begin(self):
            self._step = tf.compat.v1.train.get_global_step()

        def before_run(self, run_context):
            return tf.estimator.SessionRunArgs(self._step)

        def after_run(self, run_context, run_values):
            step = int(run_values.results) + 1
            if step in MARKS:
                times[step] = time.perf_counter()

    return StepTimer()


def pipeline_times(convert_dir: Path, metadata_path: Path, run_config: dict) -> dict[int, float]:
    """When the Train stage's own code reached each mark, training the `cnn` model."""
    from pipeline import models, training

    times: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as run_dir:
        training.train_model(models.resolve_model_file("cnn"), {}, convert_dir, metadata_path, Path(run_dir),
                             Path(run_dir) / "train.json", max_steps=STEPS, batch_size=BATCH,
                             run_config=run_config, hooks=[step_timer(times)],
                             progress=lambda done, total, unit, detail: None)
    return times


def pipeline_rate(convert_dir: Path, metadata_path: Path) -> float:
    return steady_rate(pipeline_times(convert_dir, metadata_path, RUN_CONFIG))


def validation_cost(convert_dir: Path, metadata_path: Path) -> tuple[float, float]:
    """Steps/s over all the timed steps together, with a checkpoint and a validation every 100
    steps (three of them inside), and with none: what validating as it goes costs."""
    rates = []
    for every in (100, STEPS * 10):
        times = pipeline_times(convert_dir, metadata_path, {**RUN_CONFIG, "save_checkpoints_steps": every})
        rates.append((STEPS - WARMUP) / (times[STEPS] - times[WARMUP]))
    return rates[0], rates[1]


def bare_estimator_rate(images, labels) -> float:
    import tensorflow as tf

    from pipeline import models

    model_file = models.resolve_model_file("cnn")
    model = models.load_model(model_file)
    params = models.merge_params(model_file, model.defaults, {}, {"n_classes": 10})

    def input_fn():
        dataset = tf.data.Dataset.from_tensor_slices(({"image": images}, labels))
        return dataset.shuffle(10_000, seed=42).repeat().batch(BATCH).prefetch(tf.data.AUTOTUNE)

    times: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as model_dir:
        tf.keras.utils.set_random_seed(42)
        estimator = tf.estimator.Estimator(model.model_fn, params=params,
                                           config=tf.estimator.RunConfig(model_dir=model_dir, **RUN_CONFIG))
        estimator.train(input_fn, max_steps=STEPS, hooks=[step_timer(times)])
    return steady_rate(times)


def keras_rate(images, labels) -> float:
    import tensorflow as tf

    tf.keras.utils.set_random_seed(42)
    model = keras_cnn(images.shape[1:], training=True)
    model.compile(optimizer=tf.keras.optimizers.Adam(cnn_params()["learning_rate"]),
                  loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    times: dict[int, float] = {}

    class BatchTimer(tf.keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seen = 0

        def on_train_batch_end(self, batch, logs=None):
            self.seen += 1
            if self.seen in MARKS:
                times[self.seen] = time.perf_counter()
            if self.seen >= STEPS:
                self.model.stop_training = True

    epochs = -(-STEPS // -(-len(images) // BATCH))
    model.fit(images, labels, batch_size=BATCH, epochs=epochs, shuffle=True, verbose=0, callbacks=[BatchTimer()])
    return steady_rate(times)


def main() -> None:
    convert_dir, metadata = converted_sample()
    images, labels = split_arrays(convert_dir, metadata, "train")
    pipeline, bare, keras = [], [], []
    for _ in range(max(REPEATS, 5)):  # single runs on these machines vary by a third
        pipeline.append(pipeline_rate(convert_dir, convert_dir / "metadata.json"))
        bare.append(bare_estimator_rate(images, labels))
        keras.append(keras_rate(images, labels))
    report("train steps/s, Train stage vs bare Estimator on NumPy", pipeline, bare, "steps/s", ">= 0.98")
    report("train steps/s, Train stage vs Keras fit on NumPy", pipeline, keras, "steps/s", ">= 1.0")
    report("train steps/s, bare Estimator vs Keras fit (context)", bare, keras, "steps/s", "none")
    validating, not_validating = zip(*(validation_cost(convert_dir, convert_dir / "metadata.json")
                                       for _ in range(REPEATS)))
    report("train steps/s over steps 100-400, validating every 100 steps vs never (the cost of validation)",
           list(validating), list(not_validating), "steps/s", "none")


if __name__ == "__main__":
    main()
