"""Convert images/s through the real `luigi` command at --workers 1 and 2, against a naive
single-thread loop (Pillow open, a tf.train.Example, write); then Convert at 5k, 20k and 50k
images (the sample shifted and flipped) for peak memory and time per image against N.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import CACHE, EMBEDDED, LUIGI, REPEATS, REPO, bench_config, luigi_env, report

SCALES = [int(n) for n in os.environ.get("BENCH_CONVERT_SCALES", "5000,20000,50000").split(",")]


# Runs a command and prints the peak RSS (KB) of the largest process among it and its workers.
_PEAK_RSS = ("import resource, subprocess, sys; "
             "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def luigi(config: Path, *args: str) -> tuple[float, float]:
    """Run the real `luigi` command; (wall seconds, peak RSS in MB of its largest process)."""
    command = [sys.executable, "-c", _PEAK_RSS, LUIGI, "--module", "tasks", *args, "--local-scheduler"]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env=luigi_env(config), check=True,
                            capture_output=True, text=True)
    return time.perf_counter() - start, int(result.stdout) / 1024


def pipeline_run(source: Path, workers: int) -> tuple[float, float, int]:
    """`luigi ... Convert` with Download done beforehand: (seconds, peak RSS MB, images converted)."""
    with tempfile.TemporaryDirectory(dir=CACHE) as folder:
        folder = Path(folder)
        config = bench_config(folder, source.as_uri())
        luigi(config, "Download")
        seconds, peak_mb = luigi(config, "Convert", "--workers", str(workers))
        [metadata] = (folder / "data" / "tfrecords").glob("*/*/metadata.json")
        splits = json.loads(metadata.read_text())["splits"]
        return seconds, peak_mb, sum(split["count"] for split in splits.values())


# The loop a user would write, as its own process: Pillow open, convert, PNG, tf.train.Example, one writer.
_NAIVE = """
import io, sys
from pathlib import Path
import tensorflow as tf
from PIL import Image
raw, out = Path(sys.argv[1]), sys.argv[2]
files = sorted(p for p in raw.rglob("*.png"))
classes = sorted({p.parent.name for p in files})
with tf.io.TFRecordWriter(out) as writer:
    for path in files:
        with Image.open(path) as image:
            buffer = io.BytesIO()
            image.convert("L").resize((28, 28)).save(buffer, format="PNG")
        example = tf.train.Example(features=tf.train.Features(feature={
            "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[buffer.getvalue()])),
            "image/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[classes.index(path.parent.name)]))}))
        writer.write(example.SerializeToString())
print(len(files))
"""


def naive_run(raw: Path) -> tuple[float, int]:
    """(seconds, images) of the naive loop, a whole process like the pipeline's, over a folder of PNGs."""
    with tempfile.TemporaryDirectory(dir=CACHE) as folder:
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-c", _NAIVE, str(raw), str(Path(folder) / "naive.tfrecord")],
                                check=True, capture_output=True, text=True,
                                env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        return time.perf_counter() - start, int(result.stdout)


def scaled_source(count: int) -> tuple[Path, Path]:
    """`count` images made from the sample by shifts and flips: (image-folder tree, .tar of it)."""
    import tarfile

    import numpy as np
    from PIL import Image

    root = CACHE / f"scaled-{count}"
    archive = CACHE / f"scaled-{count}.tar"
    if archive.is_file():
        return root, archive
    originals = sorted((CACHE / "raw").rglob("*.png"))
    for index in range(count):
        source = originals[index % len(originals)]
        variant = index // len(originals)
        pixels = np.roll(np.asarray(Image.open(source)), shift=(variant % 5 - 2, variant // 5 % 5 - 2), axis=(0, 1))
        if variant // 25 % 2:
            pixels = pixels[:, ::-1]
        target = root / source.parent.name / f"{index:06d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(pixels)).save(target)
    with tarfile.open(f"{archive}.partial", "w") as tar:
        for folder in sorted(root.iterdir()):
            tar.add(folder, arcname=folder.name)
    os.replace(f"{archive}.partial", archive)
    return root, archive


def main() -> None:
    from common import converted_sample

    converted_sample()  # leaves the sample's images in CACHE/raw
    naive, one, two = [], [], []
    for _ in range(REPEATS):
        seconds, images = naive_run(CACHE / "raw")
        naive.append(images / seconds)
        seconds, _, images = pipeline_run(EMBEDDED, 1)
        one.append(images / seconds)
        seconds, _, images = pipeline_run(EMBEDDED, 2)
        two.append(images / seconds)
    report("convert images/s (5k), luigi Convert --workers 1 vs naive loop", one, naive, "images/s", ">= 0.9")
    report("convert images/s (5k), luigi Convert --workers 2 vs naive loop", two, naive, "images/s", ">= 1.8")

    rows = []
    for count in SCALES:
        root, archive = scaled_source(count)
        seconds, peak_mb, images = pipeline_run(archive, 2)
        rows.append((images, seconds, peak_mb))
        print(f"convert at scale: {images} images in {seconds:.1f} s, {seconds / images * 1000:.3f} ms/image, "
              f"peak RSS {peak_mb:.0f} MB (target <= 400 MB, flat in N)", flush=True)
    # The fixed part (interpreter, TensorFlow import, scheduling) shrinks per image as N grows;
    # what must stay flat is the time each further image costs.
    marginal = [(b[1] - a[1]) / (b[0] - a[0]) * 1000 for a, b in zip(rows, rows[1:])]
    for (images, _, peak_mb), ms in zip(rows[1:], marginal):
        print(f"convert at scale: up to {images} images: {ms:.3f} ms per further image, ratio to the first step "
              f"{ms / marginal[0]:.3f}; peak RSS ratio to {rows[0][0]} images {peak_mb / rows[0][2]:.3f} "
              "(target: flat, about 1)", flush=True)
    # Where fixed costs (interpreter, TensorFlow import, scheduling) are amortised.
    root, archive = scaled_source(SCALES[-1])
    naive_seconds, naive_images = naive_run(root)
    for workers in (1, 2):
        seconds, _, images = pipeline_run(archive, workers)
        report(f"convert images/s ({SCALES[-1] // 1000}k), luigi Convert --workers {workers} vs naive loop",
               [images / seconds], [naive_images / naive_seconds], "images/s", ">= 0.9" if workers == 1 else ">= 1.8")


if __name__ == "__main__":
    main()
