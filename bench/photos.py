"""The pipeline on photos, against what a user would write instead (issue 20).

A photo archive laid out like TensorFlow's flower_photos.tgz (one wrapping folder of class
folders of RGB JPEGs, 180-420 px a side, quality 85-92) is built once, offline and seeded, into
build/bench/: each photo is a large handwritten digit of its class from the embedded MNIST
sample, textured in a colour near its class's hue, over a background cropped, flipped, turned
and colour-shifted from matplotlib's sample images, with 1/f noise, a smaller digit of any class
in any colour as a distractor, uneven light and sensor noise. Then, paired per repetition:

  a) Convert images/s, `luigi ... Convert --workers 1` and `2` as whole processes (Download done
     beforehand), against a naive loop (Pillow open, resize, JPEG, tf.train.Example, one writer)
     and against one tf.data pass over the same JPEGs (list, decode_jpeg, resize), each a whole
     process too;
  b) Train steps/s of the Train stage's code (`pipeline.training.train_model`) against
     `image_dataset_from_directory` + `fit` with the same architecture, at each of TRAIN_SIZES;
  c) the whole job, archive to predictions: `luigi ... RunAll --workers 2` from the archive's
     file:// URL against a Keras script doing the same work as a whole process (extract,
     `image_dataset_from_directory` with the pipeline's 75% for training, fit the same steps,
     validating each epoch, predict every held-out image into a CSV), at each of EPOCHS epochs
     of the train split at batch 64;
  d) the TFRecords' bytes (all shards) against the archive's;
  e) Convert's peak RSS (largest process, --workers 2) at SMALL and IMAGES images.

Every size is an environment variable (see docs/development.md for a quick run).
BENCH_PHOTOS_CONVERT_ARGS holds the pipeline's Convert arguments but the image size.
"""
from __future__ import annotations

import colorsys
import contextlib
import gzip
import io
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path

from common import CACHE, LUIGI, REPEATS, REPO, bench_config, cnn_params, keras_cnn, luigi_env, report
from convert import peak_run

IMAGES = int(os.environ.get("BENCH_PHOTOS_IMAGES", "20000"))
SMALL = int(os.environ.get("BENCH_PHOTOS_SMALL", "5000"))
EPOCHS = [int(n) for n in os.environ.get("BENCH_PHOTOS_EPOCHS", "1,5").split(",") if n]  # empty: no whole job
TRAIN_SIZES = [int(n) for n in os.environ.get("BENCH_PHOTOS_TRAIN_SIZES", "128,224").split(",") if n]  # empty: no Train figure
TRAIN_STEPS = int(os.environ.get("BENCH_PHOTOS_TRAIN_STEPS", "200"))
TRAIN_WARMUP = int(os.environ.get("BENCH_PHOTOS_TRAIN_WARMUP", "50"))
CONVERT_ARGS = shlex.split(os.environ.get("BENCH_PHOTOS_CONVERT_ARGS",
                                          "--Convert-channels 3 --Convert-image-format jpeg"))
JOB_SIZE = 128
CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
BATCH = 64
SEED = 22  # names the cached archives: change it whenever the photos change
TRAIN_FRACTION = 0.75  # luigi.cfg's: 10% validation, 15% test

# Filled before the generating processes fork, which inherit them.
_TEXTURES: list = []
_DIGITS: list = []


def _load_sources() -> tuple[list, list]:
    """RGB textures from matplotlib's sample data (a photo, a picture, two elevation maps and an
    MRI slice in colour maps) and the embedded MNIST digits by class."""
    import matplotlib
    import numpy as np
    from PIL import Image

    folder = Path(matplotlib.get_data_path()) / "sample_data"
    textures = [np.asarray(Image.open(folder / "grace_hopper.jpg").convert("RGB"))]
    with Image.open(folder / "Minduka_Present_Blue_Pack.png") as image:
        textures.append(np.asarray(Image.alpha_composite(Image.new("RGBA", image.size, "white"),
                                                         image.convert("RGBA")).convert("RGB")))
    fields = [np.load(folder / "jacksboro_fault_dem.npz")["elevation"], np.load(folder / "topobathy.npz")["topo"],
              np.frombuffer(gzip.open(folder / "s1045.ima.gz").read(), ">u2").reshape(256, 256)]
    for field, colours in zip(fields, ("gist_earth", "terrain", "bone")):
        field = field.astype(np.float64)
        field = (field - field.min()) / (np.ptp(field) or 1)
        textures.append((matplotlib.colormaps[colours](field)[..., :3] * 255).astype(np.uint8))
    digits = [[] for _ in CLASSES]
    with tarfile.open(REPO / "data" / "mnist_5k.tar.gz") as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".png"):
                with Image.open(tar.extractfile(member)) as image:
                    digits[int(member.name.split("/")[-2])].append(np.asarray(image.convert("L")))
    return textures, digits


def _pink_noise(rng, width: int, height: int):
    """A 1/f noise field (the spectrum of natural images), unit variance, made at a quarter size."""
    import numpy as np
    from PIL import Image

    small = (max(height // 4, 8), max(width // 4, 8))
    fy, fx = np.fft.fftfreq(small[0])[:, None], np.fft.rfftfreq(small[1])[None, :]
    field = np.fft.irfft2(np.fft.rfft2(rng.standard_normal(small)) / np.maximum(np.hypot(fx, fy), 1 / max(small)),
                          s=small)
    field = (field - field.mean()) / (field.std() + 1e-9)
    return np.asarray(Image.fromarray(field.astype(np.float32), "F").resize((width, height),
                                                                             Image.Resampling.BILINEAR))


def _texture(rng, width: int, height: int):
    """A random crop of a sample image, flipped, turned, resized, colour-shifted, with 1/f noise."""
    import numpy as np
    from PIL import Image

    source = _TEXTURES[rng.integers(len(_TEXTURES))]
    rows, cols = source.shape[:2]
    crop_rows, crop_cols = int(rows * rng.uniform(0.3, 1)), int(cols * rng.uniform(0.3, 1))
    top, left = rng.integers(rows - crop_rows + 1), rng.integers(cols - crop_cols + 1)
    crop = source[top:top + crop_rows, left:left + crop_cols]
    crop = np.rot90(crop[:, ::-1] if rng.random() < 0.5 else crop, rng.integers(4))
    pixels = np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((width, height), Image.Resampling.BILINEAR),
                        np.float32)
    pixels = pixels[..., rng.permutation(3)] * rng.uniform(0.6, 1.3, 3) + rng.uniform(-30, 30, 3)
    return pixels + _pink_noise(rng, width, height)[..., None] * rng.uniform(4, 16) * rng.uniform(0.7, 1.3, 3)


def _photo(index: int) -> tuple[str, bytes]:
    """Photo number `index`, a function of SEED and `index` alone: (class name, JPEG bytes)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng([SEED, index])
    label = index % len(CLASSES)
    width, height = (int(side) for side in rng.integers(180, 421, 2))
    pixels = _texture(rng, width, height)
    # A faint small digit of any class in any colour, then the large one of the photo's class in a
    # colour near its class's hue (as a kind of flower has its colours): shape and colour tell the class.
    for scale, digit_class, opacity, hue in (
            (rng.uniform(0.2, 0.35), rng.integers(len(CLASSES)), rng.uniform(0.3, 0.6), rng.random()),
            (rng.uniform(0.45, 0.85), label, rng.uniform(0.75, 1), label / len(CLASSES) + rng.normal(0, 0.04))):
        digits = _DIGITS[digit_class]
        side = max(int(scale * min(width, height)), 8)
        mask = Image.fromarray(digits[rng.integers(len(digits))]).resize((side, side), Image.Resampling.BILINEAR)
        mask = np.asarray(mask.rotate(rng.uniform(-30, 30), Image.Resampling.BILINEAR), np.float32)[..., None]
        mask *= opacity / 255
        top, left = rng.integers(height - side + 1), rng.integers(width - side + 1)
        region = pixels[top:top + side, left:left + side]
        region *= 1 - mask
        colour = np.asarray(colorsys.hsv_to_rgb(hue % 1, rng.uniform(0.5, 1), rng.uniform(0.6, 1)), np.float32)
        region += _texture(rng, side, side).mean(axis=2, keepdims=True) * 1.5 * colour * mask
    vertical = rng.random() < 0.5
    light = np.linspace(rng.uniform(0.75, 1.1), rng.uniform(0.9, 1.25), height if vertical else width,
                        dtype=np.float32)
    pixels *= light[:, None, None] if vertical else light[None, :, None]
    pixels += rng.standard_normal(pixels.shape, dtype=np.float32) * rng.uniform(1, 3)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=int(rng.integers(85, 93)))
    return CLASSES[label], buffer.getvalue()


def _write_archive(archive: Path, photos) -> None:
    """Write `photos`, (class name, JPEG bytes) in order, as a flower_photos-style .tar.gz with a
    LICENSE.txt beside the class folders, in one go (a partial file until complete)."""
    partial = Path(f"{archive}.partial")
    license_text = b"Generated by bench/photos.py from matplotlib's sample data and the embedded MNIST sample.\n"
    # Level 6: JPEGs hardly compress, and level 9 only costs time. mtime 0: the same bytes each time.
    with gzip.GzipFile(partial, "wb", compresslevel=6, mtime=0) as packed, tarfile.open(fileobj=packed, mode="w") as tar:
        for name, data in [*((f"{class_name}/{index:06d}_{SEED}.jpg", data)
                             for index, (class_name, data) in enumerate(photos)), ("LICENSE.txt", license_text)]:
            info = tarfile.TarInfo(f"flower_photos/{name}")
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    os.replace(partial, archive)


def photo_archive(count: int) -> Path:
    """The first `count` photos as a flower_photos-style .tar.gz, built once (a process per core)."""
    archive = CACHE / f"photos-{SEED}-{count}.tar.gz"
    if not archive.is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        _TEXTURES[:], _DIGITS[:] = _load_sources()
        start = time.perf_counter()
        with get_context("fork").Pool(os.cpu_count()) as pool:
            _write_archive(archive, pool.imap(_photo, range(count), chunksize=64))
        size = archive.stat().st_size
        print(f"photo archive: {count} photos generated in {time.perf_counter() - start:.0f} s with "
              f"{os.cpu_count()} processes, {size / 1e6:.0f} MB ({size / count / 1e3:.1f} KB a photo)", flush=True)
    return archive


def first_photos(archive: Path, count: int) -> Path:
    """The first `count` photos of `archive` as an archive of their own, once."""
    smaller = CACHE / f"photos-{SEED}-{count}.tar.gz"
    if not smaller.is_file():
        with tarfile.open(archive) as tar:
            members = [member for member in tar if member.name.endswith(".jpg")][:count]
            _write_archive(smaller, [(member.name.split("/")[1], tar.extractfile(member).read())
                                     for member in members])
    return smaller


def extracted(archive: Path) -> Path:
    """The archive's class folders, extracted once beside it."""
    folder = archive.with_name(archive.name.removesuffix(".tar.gz"))
    if not folder.is_dir():
        with tarfile.open(archive) as tar:
            tar.extractall(f"{folder}.partial", filter="data")
        os.replace(f"{folder}.partial", folder)
    return folder / "flower_photos"


def luigi_convert(archive: Path, folder: Path, workers: int, image_size: int) -> tuple[float, float]:
    """Download, then `luigi ... Convert` timed, into `folder`: (seconds, peak RSS MB of its largest process)."""
    config = bench_config(folder, archive.as_uri())
    luigi = [LUIGI, "--module", "tasks", "--local-scheduler"]
    subprocess.run([*luigi, "Download"], cwd=REPO, env=luigi_env(config), check=True, capture_output=True)
    seconds, _, peak_mb = peak_run([*luigi, "Convert", "--workers", str(workers), "--Convert-image-size",
                                    str(image_size), *CONVERT_ARGS], cwd=REPO, env=luigi_env(config))
    return seconds, peak_mb


def converted(folder: Path) -> tuple[Path, dict]:
    [metadata] = (folder / "data" / "tfrecords").glob("*/*/metadata.json")
    return metadata.parent, json.loads(metadata.read_text())


def records_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in (folder / "data" / "tfrecords").rglob("*.tfrecord*"))


def cached_conversion(archive: Path, image_size: int) -> tuple[Path, dict]:
    """The archive converted by `luigi ... Convert` at `image_size` with CONVERT_ARGS, once."""
    import hashlib

    digest = hashlib.sha256(" ".join(CONVERT_ARGS).encode()).hexdigest()[:8]
    folder = archive.with_name(f"{archive.name.removesuffix('.tar.gz')}-converted-{image_size}-{digest}")
    if not folder.is_dir():
        partial = folder.with_name(f"{folder.name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        luigi_convert(archive, partial, 2, image_size)
        os.replace(partial, folder)
    return converted(folder)


_QUIET = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}

# The loop a user would write, as its own process: Pillow open, resize, JPEG, tf.train.Example, one writer.
_NAIVE = """
import io, sys
from pathlib import Path
import tensorflow as tf
from PIL import Image
root, out, size = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
files = sorted(root.glob("*/*.jpg"))
classes = sorted({p.parent.name for p in files})
with tf.io.TFRecordWriter(out) as writer:
    for path in files:
        with Image.open(path) as image:
            buffer = io.BytesIO()
            image.convert("RGB").resize((size, size)).save(buffer, format="JPEG", quality=90)
        example = tf.train.Example(features=tf.train.Features(feature={
            "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[buffer.getvalue()])),
            "image/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[classes.index(path.parent.name)]))}))
        writer.write(example.SerializeToString())
print(len(files))
"""

# The other anchor: no records at all, one tf.data pass that decodes and resizes the JPEGs.
_TF_DATA = """
import sys
import tensorflow as tf
root, size = sys.argv[1], int(sys.argv[2])
def load(path):
    return tf.image.resize(tf.io.decode_jpeg(tf.io.read_file(path), channels=3), (size, size))
files = tf.data.Dataset.list_files(f"{root}/*/*.jpg", shuffle=False)
count = 0
for batch in files.map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(256).prefetch(tf.data.AUTOTUNE):
    count += int(batch.shape[0])
print(count)
"""

# The whole job as a Keras user writes it: extract, load, fit, predict the held-out images into a
# CSV. As in the pipeline, 75% of the photos train, and about 10% validate after each epoch (the
# pipeline: every 250 steps and at the end); every held-out image (25%) is predicted (the
# pipeline evaluates and predicts its 15% test split).
_KERAS_JOB = """
import csv, math, sys, tarfile
from pathlib import Path
import tensorflow as tf
sys.path.insert(0, sys.argv[1])
from common import cnn_params, keras_cnn
archive, out, epochs, epoch_steps, size = Path(sys.argv[2]), Path(sys.argv[3]), *map(int, sys.argv[4:7])
held_out = float(sys.argv[7])
with tarfile.open(archive) as tar:
    tar.extractall(out / "photos", filter="data")
root = out / "photos" / "flower_photos"
tf.keras.utils.set_random_seed(42)
train, held = tf.keras.utils.image_dataset_from_directory(root, validation_split=held_out, subset="both", seed=1234,
                                                          image_size=(size, size), batch_size=64)
classes = train.class_names
shape = (size, size, 3)
model = tf.keras.Sequential([tf.keras.Input(shape), tf.keras.layers.Rescaling(1 / 255),
                             keras_cnn(shape, training=True, num_classes=len(classes))])
model.compile(optimizer=tf.keras.optimizers.Adam(cnn_params()["learning_rate"]),
              loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
model.fit(train.repeat().prefetch(tf.data.AUTOTUNE), steps_per_epoch=epoch_steps, epochs=epochs,
          validation_data=held.take(math.ceil(len(held) * 0.4)).prefetch(tf.data.AUTOTUNE), verbose=0)
right = total = 0
with open(out / "predictions.csv", "w", newline="") as handle:
    writer = csv.writer(handle)
    writer.writerow(["true_label", "predicted_label", "probability"])
    for images, labels in held.prefetch(tf.data.AUTOTUNE):
        probabilities = tf.nn.softmax(model.predict_on_batch(images)).numpy()
        for label, row in zip(labels.numpy(), probabilities):
            writer.writerow([classes[label], classes[row.argmax()], f"{row.max():.4f}"])
            right += int(label == row.argmax())
            total += 1
print(f"{right / total:.4f} {total}")
"""


def naive_run(root: Path) -> tuple[float, int]:
    """(seconds, images) of the naive loop over the extracted photos, at JOB_SIZE."""
    with tempfile.TemporaryDirectory(dir=CACHE) as folder:
        seconds, output, _ = peak_run([sys.executable, "-c", _NAIVE, str(root), str(Path(folder) / "naive.tfrecord"),
                                       str(JOB_SIZE)], env=_QUIET)
        return seconds, int(output)


def tf_data_run(root: Path) -> tuple[float, int]:
    seconds, output, _ = peak_run([sys.executable, "-c", _TF_DATA, str(root), str(JOB_SIZE)], env=_QUIET)
    return seconds, int(output)


def pipeline_train_rate(convert_dir: Path) -> float:
    """Steps/s of the Train stage's code from step TRAIN_WARMUP to TRAIN_STEPS, no checkpoint between."""
    import tensorflow as tf

    from pipeline import models, training

    times: list[float] = []

    class StepTimer(tf.estimator.SessionRunHook):
        def after_run(self, run_context, run_values):
            times.append(time.perf_counter())

    run_config = {"tf_random_seed": 42, "save_summary_steps": 50, "save_checkpoints_steps": TRAIN_STEPS * 10,
                  "keep_checkpoint_max": 3, "log_step_count_steps": 100}
    with tempfile.TemporaryDirectory(dir=CACHE) as run_dir:
        training.train_model(models.resolve_model_file("cnn"), {}, convert_dir, convert_dir / "metadata.json",
                             Path(run_dir), Path(run_dir) / "train.json", max_steps=TRAIN_STEPS, batch_size=BATCH,
                             run_config=run_config, hooks=[StepTimer()],
                             progress=lambda done, total, unit, detail: None)
    return (TRAIN_STEPS - TRAIN_WARMUP) / (times[TRAIN_STEPS - 1] - times[TRAIN_WARMUP - 1])


def keras_train_rate(root: Path, image_size: int) -> float:
    """Steps/s of `image_dataset_from_directory` + `fit`, same architecture, same window of steps."""
    import tensorflow as tf

    tf.keras.utils.set_random_seed(42)
    # As TensorFlow's image-loading tutorial has it, less its `cache()`: the decoded floats of 20k
    # photos at 224 px would not fit in memory.
    with contextlib.redirect_stdout(sys.stderr):  # its "Found N files" would come between the figures
        photos = tf.keras.utils.image_dataset_from_directory(root, image_size=(image_size, image_size),
                                                             batch_size=BATCH, seed=42).prefetch(tf.data.AUTOTUNE)
    shape = (image_size, image_size, 3)
    model = tf.keras.Sequential([tf.keras.Input(shape), tf.keras.layers.Rescaling(1 / 255),
                                 keras_cnn(shape, training=True, num_classes=len(CLASSES))])
    model.compile(optimizer=tf.keras.optimizers.Adam(cnn_params()["learning_rate"]),
                  loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    times: list[float] = []

    class BatchTimer(tf.keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            times.append(time.perf_counter())
            if len(times) >= TRAIN_STEPS:
                self.model.stop_training = True

    model.fit(photos, epochs=math.ceil(TRAIN_STEPS / len(photos)), verbose=0, callbacks=[BatchTimer()])
    return (TRAIN_STEPS - TRAIN_WARMUP) / (times[TRAIN_STEPS - 1] - times[TRAIN_WARMUP - 1])


def pipeline_job(archive: Path, steps: int) -> tuple[float, str]:
    """Wall seconds of `luigi ... RunAll --workers 2` from the archive's URL, and its test accuracy."""
    with tempfile.TemporaryDirectory(dir=CACHE) as folder:
        config = bench_config(Path(folder), archive.as_uri())
        start = time.perf_counter()
        result = subprocess.run([LUIGI, "--module", "tasks", "RunAll", "--local-scheduler", "--workers", "2",
                                 "--Convert-image-size", str(JOB_SIZE), *CONVERT_ARGS, "--Train-max-steps", str(steps)],
                                cwd=REPO, env={**luigi_env(config), "TF_CPP_MIN_LOG_LEVEL": "2"},
                                capture_output=True, text=True)
        seconds = time.perf_counter() - start
    if result.returncode:
        raise RuntimeError(f"RunAll failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    output = result.stdout + result.stderr
    # Where the time goes: the console's line for each stage that ran, "done    Stage@version in 12.3s".
    for stage in re.findall(r"^done +(\w+)@\S+ in (\S+)$", output, re.MULTILINE):
        print(f"photos, whole job of {steps} steps, pipeline stage {stage[0]}: {stage[1]} (profile)", flush=True)
    accuracy = re.search(r"RESULT test accuracy (\S+ on \d+ images)", output)
    return seconds, accuracy.group(1) if accuracy else "?"


def keras_job(archive: Path, epochs: int, epoch_steps: int) -> tuple[float, str]:
    """Wall seconds of the Keras script as a whole process, and its held-out accuracy."""
    with tempfile.TemporaryDirectory(dir=CACHE) as folder:
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-c", _KERAS_JOB, str(Path(__file__).parent), str(archive), folder,
                                 str(epochs), str(epoch_steps), str(JOB_SIZE), str(1 - TRAIN_FRACTION)],
                                env=_QUIET, check=True, capture_output=True, text=True)
        seconds = time.perf_counter() - start
    accuracy, images = result.stdout.split()[-2:]  # after Keras' "Found N files" lines
    return seconds, f"{accuracy} on {images} images"


# Seconds per unit on a quiet 2-core machine, as measured on 2026-12-02 (bench/RESULTS.md): a
# photo generated, an image through one Convert-like pass, a training step at each size (the
# `cnn` model at batch 64: 224 px scaled from 128 px by the pixels), and the fixed cost of a
# training run (graph, validation, export) or of a whole job beside its steps.
_COST = {"generate": 0.026, "convert": 0.0015, "step": {128: 1.43, 224: 4.4}, "train run": 60, "job": 90}


def estimate_minutes(epoch_steps: int, generating: int) -> float:
    """A rough duration of the whole benchmark with these settings, from `_COST`."""
    def step(size: int) -> float:
        return _COST["step"].get(size, _COST["step"][224] * (size / 224) ** 2)

    per_repeat = (_COST["convert"] * (IMAGES * 4 + SMALL)
                  + sum(2 * (_COST["train run"] + TRAIN_STEPS * step(size)) for size in TRAIN_SIZES)
                  + sum(2 * (_COST["job"] + epochs * epoch_steps * step(JOB_SIZE)) + _COST["convert"] * IMAGES
                        for epochs in EPOCHS))
    return (generating * _COST["generate"] + REPEATS * per_repeat) / 60


def main() -> None:
    from collections import defaultdict

    generating = 0 if (CACHE / f"photos-{SEED}-{IMAGES}.tar.gz").is_file() else IMAGES
    train_count = math.floor(IMAGES / len(CLASSES) * TRAIN_FRACTION) * len(CLASSES)  # until the conversion says
    print(f"photo benchmark: {IMAGES} photos (and {SMALL}), Convert arguments {' '.join(CONVERT_ARGS)!r}, train sizes "
          f"{TRAIN_SIZES}, {TRAIN_STEPS} steps, epochs {EPOCHS}, {REPEATS} repetitions; estimated "
          f"{estimate_minutes(math.ceil(train_count / BATCH), generating):.0f} min on a quiet 2-core machine "
          "(several times that on a shared one)", flush=True)
    archive = photo_archive(IMAGES)
    small = first_photos(archive, SMALL)
    root = extracted(archive)
    conversions = {size: cached_conversion(archive, size) for size in sorted({JOB_SIZE, *TRAIN_SIZES})}
    train_count = conversions[JOB_SIZE][1]["splits"]["train"]["count"]
    epoch_steps = math.ceil(train_count / BATCH)

    runs = defaultdict(list)
    for repeat in range(REPEATS):
        marks = [time.perf_counter()]
        runs["naive"].append(naive_run(root))
        runs["tf.data"].append(tf_data_run(root))
        for workers, source in ((1, archive), (2, archive), ("small", small)):
            with tempfile.TemporaryDirectory(dir=CACHE) as folder:
                seconds, peak_mb = luigi_convert(source, Path(folder), 2 if workers == "small" else workers, JOB_SIZE)
                _, metadata = converted(Path(folder))
                runs["convert", workers].append((seconds, sum(split["count"] for split in metadata["splits"].values()),
                                                 peak_mb, records_bytes(Path(folder))))
        marks.append(time.perf_counter())
        for size in TRAIN_SIZES:
            runs["train pipeline", size].append(pipeline_train_rate(conversions[size][0]))
            runs["train keras", size].append(keras_train_rate(root, size))
        marks.append(time.perf_counter())
        for epochs in EPOCHS:
            runs["job pipeline", epochs].append(pipeline_job(archive, epochs * epoch_steps))
            runs["job keras", epochs].append(keras_job(archive, epochs, epoch_steps))
        marks.append(time.perf_counter())
        print(f"photo benchmark: repetition {repeat + 1} of {REPEATS} done in {marks[-1] - marks[0]:.0f} s (convert "
              f"{marks[1] - marks[0]:.0f} s, train {marks[2] - marks[1]:.0f} s, whole jobs {marks[3] - marks[2]:.0f} s)",
              flush=True)

    def rate(side) -> list[float]:
        return [run[1] / run[0] for run in runs[side]]

    convert_args = f"--Convert-image-size {JOB_SIZE} {' '.join(CONVERT_ARGS)}"
    for workers, target in ((1, "none"), (2, ">= 1.8")):
        report(f"photos, convert images/s, {IMAGES} photos, luigi Convert --workers {workers} {convert_args} vs naive "
               "loop (Pillow open, resize, JPEG, tf.train.Example, one writer), whole processes",
               rate(("convert", workers)), rate("naive"), "images/s", target)
        report(f"photos, convert images/s, luigi Convert --workers {workers} vs one tf.data pass (list, decode_jpeg, "
               "resize; no records), whole processes (context)", rate(("convert", workers)), rate("tf.data"),
               "images/s", "none")
    for size in TRAIN_SIZES:
        report(f"photos, train steps/s at {size} px, batch {BATCH}, steps {TRAIN_WARMUP}-{TRAIN_STEPS}: Train stage "
               "(train_model on the records) vs image_dataset_from_directory + fit, same architecture",
               runs["train pipeline", size], runs["train keras", size], "steps/s", ">= 1.5")
    for epochs, target in zip(EPOCHS, (">= 1.2", ">= 1.5", "none")):
        report(f"photos, whole job archive to predictions at {JOB_SIZE} px, {epochs} epoch(s) = {epochs * epoch_steps} "
               f"steps: Keras script wall s vs luigi RunAll --workers 2 wall s (the pipeline's speed-up)",
               [run[0] for run in runs["job keras", epochs]], [run[0] for run in runs["job pipeline", epochs]], "s",
               target if epochs in (1, 5) else "none")
        print(f"photos, whole job at {epochs} epoch(s), accuracy (context): pipeline test "
              f"{[run[1] for run in runs['job pipeline', epochs]]}, Keras held-out "
              f"{[run[1] for run in runs['job keras', epochs]]}", flush=True)
    report(f"photos, bytes of TFRecords (all shards, {convert_args}) vs the archive's",
           [run[3] / 1e6 for run in runs["convert", 2]], [archive.stat().st_size / 1e6] * REPEATS, "MB", "<= 1.0")
    report(f"photos, Convert --workers 2 peak RSS of the largest process, {IMAGES} vs {SMALL} photos",
           [run[2] for run in runs["convert", 2]], [run[2] for run in runs["convert", "small"]], "MB",
           "flat in N, about 1")


if __name__ == "__main__":
    main()
