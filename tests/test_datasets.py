"""Another dataset, as the README tells: a real-world archive layout over HTTP with no checksum
given, converted to another size and to colour, through the real `luigi` command; and what a
default run prints."""
from __future__ import annotations

import io
import random
import re

import pytest
from PIL import Image

from pipeline.storage import read_json
from tests.conftest import FileServer, cli_sections, read_csv, run_watched, tar_bytes, write_config

pytestmark = pytest.mark.slow

CLASSES = {"daisy": (230, 230, 90), "roses": (200, 40, 60), "tulips": (240, 140, 40)}
# A line TensorFlow's C++ logging writes: "2026-11-22 03:27:14.104996: E external/...".
CPP_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d [\d:.]+: [IWEF] ", re.MULTILINE)


def jpeg(colour: tuple[int, int, int], rng: random.Random) -> bytes:
    """An RGB JPEG of a random size, `colour` with noise."""
    size = (rng.randint(40, 130), rng.randint(40, 130))
    image = Image.new("RGB", size, colour)
    for _ in range(60):
        xy = (rng.randrange(size[0]), rng.randrange(size[1]))
        image.putpixel(xy, tuple(rng.randrange(256) for _ in range(3)))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def flower_photos_archive(per_class: int = 10) -> bytes:
    """Laid out like TensorFlow's flower_photos.tgz: one wrapping folder holding the class folders
    and a LICENSE.txt beside them."""
    rng = random.Random(5)
    members = {f"flower_photos/{name}/{i:04d}_{rng.randrange(10**6)}.jpg": jpeg(colour, rng)
               for name, colour in CLASSES.items() for i in range(per_class)}
    members["flower_photos/LICENSE.txt"] = b"All images in this archive are licensed under CC-BY.\n"
    return tar_bytes(members)


def test_a_flower_photos_style_archive_runs_end_to_end_without_a_checksum(tmp_path):
    with FileServer() as server:
        server.files["/flower_photos.tgz"] = flower_photos_archive()
        url = server.url("/flower_photos.tgz")
        config = write_config(tmp_path / "luigi.cfg", cli_sections(tmp_path, "file:unused.tar.gz"))

        # As the README prints it, with this server's URL, and TF_CPP_MIN_LOG_LEVEL unset as a new user's is.
        result = run_watched(tmp_path, config, "RunAll", "--local-scheduler", "--Download-dataset", "flowers",
                             "--Download-source-url", url, "--Convert-image-size", "64", "--Convert-channels", "3",
                             env={"TF_CPP_MIN_LOG_LEVEL": None})

    assert result.returncode == 0, result.output[-3000:]
    [download] = (tmp_path / "data" / "raw" / "flowers").glob("*/download.json")
    summary = read_json(download)
    assert summary["images_per_class"] == {name: 10 for name in CLASSES}
    assert summary["ignored"] == ["flower_photos/LICENSE.txt"] and len(summary["sha256"]) == 64
    assert (download.parent / "LICENSE.txt").is_file(), "ignored files are kept beside the classes"
    [metadata] = (tmp_path / "data" / "tfrecords" / "flowers").glob("*/metadata.json")
    assert read_json(metadata)["image_shape"] == [64, 64, 3] and read_json(metadata)["bad_images"] == []
    [metrics] = (tmp_path / "results" / "flowers").glob("*/evaluate-test-*/metrics.json")
    assert read_json(metrics)["examples"] == 6 and set(read_json(metrics)["per_class"]) == set(CLASSES)
    [predictions] = (tmp_path / "results" / "flowers").glob("*/predict-*/predictions.csv")
    assert {row["true_label"] for row in read_csv(predictions)} == set(CLASSES)

    # What it printed: the run's story, none of Luigi's chatter, none of TensorFlow's start-up
    # noise or deprecation notices, its evaluations, and, last, the result with the report's path.
    output = result.output
    assert "DEBUG:" not in output and "INFO: " not in output and not CPP_LOG_LINE.search(output), output[:3000]
    assert "is deprecated" not in output and "Instructions for updating" not in output
    assert re.search(r"^started Train@\w+$", output, re.MULTILINE) and "Saving dict for global step" in output
    epilogue = output[output.rindex("RESULT "):].splitlines()
    assert epilogue[0] == f"RESULT test accuracy {read_json(metrics)['accuracy']:.4f} on 6 images"
    report = tmp_path / next(line for line in epilogue if "report:" in line).split("report:", 1)[1].strip()
    assert report.parent.parent == metrics.parent and report.name == "report.html" and report.is_file()

    # The documented switch shows TensorFlow's own logs.
    verbose = run_watched(tmp_path, config, "Evaluate", "--local-scheduler", "--rerun", "--Download-dataset",
                          "flowers", "--Download-source-url", url, "--Convert-image-size", "64",
                          "--Convert-channels", "3", env={"TF_CPP_MIN_LOG_LEVEL": "0"})
    assert verbose.returncode == 0, verbose.output[-3000:]
    assert CPP_LOG_LINE.search(verbose.output) and "Calling model_fn" in verbose.output
