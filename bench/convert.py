"""Convert images/s through the real `luigi` command at --workers 1 and 2, against a naive
single-thread loop (Pillow open, a tf.train.Example, write); then Convert at 5k, 20k and 50k
images (the sample shifted and flipped) for peak memory and time per image against N.

Both sides run as whole processes, so each pays an interpreter start and a TensorFlow import
(about 3 s, more than converting 5k images takes). The compared figure is therefore the rate of
further images: in each repetition both sides convert every set, and the slope of a
least-squares line through (images, seconds) gives the time each further image costs; the
fixed costs are its intercept. Whole-process rates are printed beside it, and, as the ceiling
for 2 workers, how two naive loops at once scale on this machine.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import CACHE, LUIGI, REPEATS, REPO, bench_config, converted_sample, luigi_env, report

SCALES = [int(n) for n in os.environ.get("BENCH_CONVERT_SCALES", "5000,20000,50000").split(",")]


# Runs a command, passes on its output, and then prints the peak RSS (KB) of the largest process
# among it and its workers.
_PEAK_RSS = ("import resource, subprocess, sys; "
             "sys.stdout.write(subprocess.run(sys.argv[1:], check=True, stdout=subprocess.PIPE, "
             "stderr=subprocess.DEVNULL, text=True).stdout); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def peak_run(command: list[str], **kwargs) -> tuple[float, str, float]:
    """Run `command`; (wall seconds, its stdout, peak RSS in MB of its largest process)."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", _PEAK_RSS, *command], check=True, capture_output=True,
                            text=True, **kwargs)
    *output, peak_kb = result.stdout.splitlines()
    return time.perf_counter() - start, "\n".join(output), int(peak_kb) / 1024


def pipeline_run(source: Path, workers: int) -> tuple[float, int, float]:
    """`luigi ... Convert` with Download done beforehand: (seconds, images converted, peak RSS MB)."""
    with tempfile.TemporaryDirectory(dir=CACHE) as folder:
        folder = Path(folder)
        config = bench_config(folder, source.as_uri())
        luigi = [LUIGI, "--module", "tasks", "--local-scheduler"]
        subprocess.run([*luigi, "Download"], cwd=REPO, env=luigi_env(config), check=True, capture_output=True)
        seconds, _, peak_mb = peak_run([*luigi, "Convert", "--workers", str(workers)], cwd=REPO, env=luigi_env(config))
        [metadata] = (folder / "data" / "tfrecords").glob("*/*/metadata.json")
        splits = json.loads(metadata.read_text())["splits"]
        return seconds, sum(split["count"] for split in splits.values()), peak_mb


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


def naive_run(raw: Path) -> tuple[float, int, float]:
    """(seconds, images, peak RSS MB) of the naive loop, a whole process like the pipeline's, over a folder of PNGs."""
    with tempfile.TemporaryDirectory(dir=CACHE) as folder:
        seconds, output, peak_mb = peak_run(
            [sys.executable, "-c", _NAIVE, str(raw), str(Path(folder) / "naive.tfrecord")],
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        return seconds, int(output), peak_mb


def naive_pair(raw: Path) -> float:
    """Seconds for two naive loops started together over the same folder, each writing its own file."""
    with tempfile.TemporaryDirectory(dir=CACHE) as folder:
        start = time.perf_counter()
        loops = [subprocess.Popen([sys.executable, "-c", _NAIVE, str(raw), str(Path(folder) / f"naive-{i}.tfrecord")],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}) for i in range(2)]
        if any(loop.wait() for loop in loops):
            raise RuntimeError("a naive loop failed")
        return time.perf_counter() - start


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
    import statistics
    from collections import defaultdict

    converted_sample()  # leaves the sample's images in CACHE/raw, which scaled_source draws from
    runs = defaultdict(list)  # (side, images) -> [(seconds, images, peak RSS MB)]
    pairs = []  # (seconds of one naive loop, seconds of two at once) over the middle set
    for _ in range(REPEATS):
        for count in SCALES:
            root, archive = scaled_source(count)
            runs["naive", count].append(naive_run(root))
            runs[1, count].append(pipeline_run(archive, 1))
            runs[2, count].append(pipeline_run(archive, 2))
        root, _ = scaled_source(SCALES[1])
        pairs.append((runs["naive", SCALES[1]][-1][0], naive_pair(root)))

    def further(side) -> list[float]:
        """Images/s of each repetition's least-squares line through its (images, seconds) points."""
        return [1 / statistics.linear_regression([run[1] for run in rep], [run[0] for run in rep]).slope
                for rep in zip(*(runs[side, count] for count in SCALES))]

    sets = "/".join(f"{count // 1000}k" for count in SCALES)
    for workers, target in ((1, ">= 0.9"), (2, ">= 1.8")):
        report(f"convert images/s per further image (slope over {sets}), luigi Convert --workers {workers} vs naive "
               "loop", further(workers), further("naive"), "images/s", target)
        for count in SCALES:
            report(f"convert images/s, whole process at {count // 1000}k, luigi Convert --workers {workers} vs "
                   "naive loop (context)", [images / seconds for seconds, images, _ in runs[workers, count]],
                   [images / seconds for seconds, images, _ in runs["naive", count]], "images/s", "none")
    report(f"this machine's ceiling for 2 workers: two naive loops at once over {SCALES[1] // 1000}k each vs one "
           "(context)", [2 * SCALES[1] / both for _, both in pairs], [SCALES[1] / one for one, _ in pairs],
           "images/s", "none")

    rows = []
    for count in SCALES:
        seconds = statistics.median(run[0] for run in runs[2, count])
        peak_mb = max(run[2] for run in runs[2, count])
        rows.append((count, seconds, peak_mb))
        print(f"convert at scale, --workers 2: {count} images in {seconds:.1f} s (median), "
              f"{seconds / count * 1000:.3f} ms/image, peak RSS {peak_mb:.0f} MB (target <= 400 MB, flat in N)",
              flush=True)
    naive_peak = max(run[2] for count in SCALES for run in runs["naive", count])
    print(f"convert at scale: the naive loop's peak RSS {naive_peak:.0f} MB (context: its TensorFlow import)", flush=True)
    # The fixed part (interpreter, TensorFlow import, scheduling) shrinks per image as N grows;
    # what must stay flat is the time each further image costs.
    marginal = [(b[1] - a[1]) / (b[0] - a[0]) * 1000 for a, b in zip(rows, rows[1:])]
    for (images, _, peak_mb), ms in zip(rows[1:], marginal):
        print(f"convert at scale: up to {images} images: {ms:.3f} ms per further image, ratio to the first step "
              f"{ms / marginal[0]:.3f}; peak RSS ratio to {rows[0][0]} images {peak_mb / rows[0][2]:.3f} "
              "(target: flat, about 1)", flush=True)


if __name__ == "__main__":
    main()
