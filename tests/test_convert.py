import fcntl
import hashlib
import io
import os
import random
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageOps

from pipeline import convert
from pipeline.errors import ConfigError, CorruptShard, DatasetError, UnusableImage
from pipeline.storage import read_json
from tests.conftest import REPO, png_claiming


def write_images(root, per_class=10, classes=("a", "b")):
    for label in classes:
        (root / label).mkdir(parents=True)
        for index in range(per_class):
            Image.new("RGB", (9, 7), (index * 20, 40, 80)).save(root / label / f"{index:02d}.png")
    return root


def write_all_shards(raw, out, *, test_fraction, num_shards, image_size, channels):
    convert.plan_conversion(raw, out / convert.PLAN_FILE, validation_fraction=0.0, test_fraction=test_fraction,
                            split_seed=1, num_shards=num_shards)
    return convert.write_all_shards(raw, out, num_shards=num_shards, image_size=image_size, channels=channels)


def converted_images(tmp_path, *, per_class, test_fraction, image_size):
    """Grey images of two classes converted into tmp_path/tfrecords with two shards a split;
    returns (that folder, its metadata)."""
    raw = write_images(tmp_path / "raw", per_class=per_class)
    out = tmp_path / "tfrecords"
    reports = write_all_shards(raw, out, test_fraction=test_fraction, num_shards=2, image_size=image_size,
                               channels=1)
    return out, convert.finalize_conversion(out, reports, out / "metadata.json", image_size=image_size,
                                            channels=1, max_bad_fraction=0.0, source={})


def test_split_is_deterministic_disjoint_and_sized_by_fraction():
    keys = [f"c/{i:03d}.png" for i in range(100)]
    first = convert.split_keys(keys, 0.1, 0.2, "5/c")
    again = convert.split_keys(list(reversed(keys)), 0.1, 0.2, "5/c")
    other = convert.split_keys(keys, 0.1, 0.2, "6/c")

    assert first == again
    assert first != other
    assert {k: len(v) for k, v in first.items()} == {"test": 20, "validation": 10, "train": 70}
    assert sorted(sum(first.values(), [])) == keys


def test_plan_is_stratified_and_reproducible(tmp_path):
    raw = write_images(tmp_path / "raw", per_class=20)
    plan = convert.plan_conversion(raw, tmp_path / "plan.json", validation_fraction=0.25, test_fraction=0.25,
                                   split_seed=3, num_shards=2)
    again = convert.plan_conversion(raw, tmp_path / "plan2.json", validation_fraction=0.25, test_fraction=0.25,
                                    split_seed=3, num_shards=2)

    assert plan == again == read_json(tmp_path / "plan.json")
    assert plan["class_names"] == ["a", "b"]
    test_items = [item for shard in plan["shards"]["test"] for item in shard]
    assert sorted(label for _, label in test_items) == [0] * 5 + [1] * 5


def test_shards_hold_every_good_image_and_metadata_lists_the_bad_one(tmp_path):
    raw = write_images(tmp_path / "raw", per_class=6)
    (raw / "b" / "broken.png").write_bytes(b"not a png at all")
    (raw / "b" / ".DS_Store").write_bytes(b"\0")
    out = tmp_path / "tfrecords"
    reports = write_all_shards(raw, out, test_fraction=0.3, num_shards=2, image_size=5, channels=3)

    metadata = convert.finalize_conversion(out, reports, out / "metadata.json", image_size=5, channels=3,
                                           max_bad_fraction=0.1, source={})

    assert metadata["image_shape"] == [5, 5, 3]
    assert (metadata["image_format"], metadata["jpeg_quality"]) == ("auto", 90)
    assert metadata["label_map"] == {"a": 0, "b": 1}
    counts = {split: metadata["splits"][split]["count"] for split in convert.SPLITS}
    assert sum(counts.values()) == 12 and counts["validation"] == 0
    assert [b["key"] for b in metadata["bad_images"]] == ["b/broken.png"]
    assert "UnidentifiedImageError" in metadata["bad_images"][0]["reason"]
    assert (out / "train-00000-of-00002.tfrecord").is_file()
    assert read_json(out / "metadata.json") == metadata

    with pytest.raises(DatasetError, match=r"1 of 13 images could not be decoded.*b/broken.png"):
        convert.finalize_conversion(out, reports, tmp_path / "strict.json", image_size=5, channels=3,
                                    max_bad_fraction=0.0, source={})
    assert not (tmp_path / "strict.json").exists()


def test_load_image_normalises_mode_size_and_exif_orientation(tmp_path):
    image = Image.new("RGB", (4, 2), "red")
    image.putpixel((0, 0), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=100)
    Image.new("RGBA", (3, 3), (0, 0, 0, 0)).save(tmp_path / "clear.png")

    rotated = Image.open(io.BytesIO(convert.load_image(tmp_path / "rotated.jpg", 4, 3)))
    clear = Image.open(io.BytesIO(convert.load_image(tmp_path / "clear.png", 3, 1)))

    assert rotated.mode == "RGB" and rotated.size == (4, 4)
    assert clear.mode == "L" and set(clear.getdata()) == {255}, "transparency is flattened onto white"


def test_a_png_already_in_the_dataset_form_is_kept_but_still_checked(tmp_path):
    import tensorflow as tf

    pixels = np.random.default_rng(2).integers(0, 256, (6, 6), dtype=np.uint8)
    plain = _png(Image.fromarray(pixels))
    (tmp_path / "plain.png").write_bytes(plain)
    flipped = bytearray(plain)
    flipped[plain.index(b"IDAT") + 10] ^= 1
    corrupt = {"short.png": plain[:-20], "no-end.png": plain[:-12], "flipped.png": bytes(flipped)}
    for name, data in corrupt.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "wide.png").write_bytes(_png(Image.frombytes("I;16", (6, 6), (pixels.astype("<u2") * 257).tobytes())))

    assert convert.load_image(tmp_path / "plain.png", 6, 1) == plain
    np.testing.assert_array_equal(tf.io.decode_png(plain, channels=1).numpy()[..., 0], pixels)
    for name, data in corrupt.items():
        with pytest.raises(tf.errors.InvalidArgumentError):
            tf.io.decode_png(data, channels=1)  # what training would meet, had it been stored
        with pytest.raises(UnusableImage) as refused:
            convert.load_image(tmp_path / name, 6, 1)
        assert isinstance(refused.value.__cause__, (OSError, SyntaxError))
    rescaled = convert.load_image(tmp_path / "wide.png", 6, 1)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(rescaled))), pixels), "16-bit grey is re-encoded as 8 bits"
    assert convert.load_image(tmp_path / "plain.png", 6, 3) != plain, "greyscale is re-encoded for 3 channels"


@pytest.mark.parametrize("kwargs, message", [
    ({"image_size": 0}, "image_size=0"),
    ({"channels": 2}, "channels=2"),
    ({"validation_fraction": 0.5, "test_fraction": 0.5}, "expected less than 1"),
    ({"num_shards": 0}, "num_shards=0"),
    ({"image_format": "webp"}, "image_format='webp'; expected one of auto, png, jpeg"),
    ({"jpeg_quality": 0}, "jpeg_quality=0; expected an integer from 1 to 100"),
    ({"jpeg_quality": 101}, "jpeg_quality=101; expected an integer from 1 to 100"),
    ({"decode_threads": 0}, "decode_threads=0"),
])
def test_bad_conversion_params_are_named(kwargs, message):
    params = {"image_size": 28, "channels": 1, "validation_fraction": 0.1, "test_fraction": 0.1,
              "num_shards": 2, "max_bad_fraction": 0.0, **kwargs}
    with pytest.raises(ConfigError, match=message):
        convert.validate_conversion_params(**params)


def _jpeg(image: Image.Image, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, **save)
    return buffer.getvalue()


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _difficult_source(raw):
    """Every kind of good and bad file the issue lists, in one source. Returns (good keys, bad keys)."""
    left_dark = Image.new("RGB", (20, 10), "white")
    left_dark.paste((0, 0, 0), (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: the dark half ends up on top
    wide = np.linspace(0, 65535, 64, dtype="<u2").reshape(8, 8)
    good = {
        "a cat/upper.PNG": _png(Image.new("RGB", (9, 9), (200, 30, 30))),
        "a cat/cmyk.jpg": _jpeg(Image.new("CMYK", (9, 9), (0, 255, 255, 0))),
        "a cat/wide.png": _png(Image.frombytes("I;16", (8, 8), wide.tobytes())),
        "a cat/palette.gif": _png(Image.new("P", (9, 9), 3)),
        "a cat/alpha.png": _png(Image.new("RGBA", (9, 9), (0, 0, 0, 0))),
        "dog/bilevel.bmp": None,
        "dog/grey-alpha.png": _png(Image.new("LA", (9, 9), (0, 255))),
        "dog/rotated.JPG": _jpeg(left_dark, exif=exif),
        "dog/nested/deeper/inner.png": _png(Image.new("L", (9, 9), 90)),
        "ñandú/uno.png": _png(Image.new("L", (9, 9), 10)),
        "ñandú/dos.jpeg": _jpeg(Image.new("L", (9, 9), 250)),
    }
    full_jpeg, full_png = _jpeg(Image.new("RGB", (64, 64), "blue")), _png(Image.effect_noise((64, 64), 40))
    bad = {
        "dog/empty.png": b"",
        "dog/truncated.jpg": full_jpeg[: len(full_jpeg) // 2],
        "a cat/truncated.png": full_png[: len(full_png) // 2],
        "ñandú/notes.jpg": b"these are my notes, not a picture\n",
        "ñandú/bomb.png": png_claiming(50000, 50000),
    }
    hidden = {"dog/.DS_Store": b"\0\0\0\1Bud1", "a cat/._upper.PNG": b"\0\5\26\7AppleDouble", ".DS_Store": b"\0"}
    for key, data in {**good, **bad, **hidden}.items():
        (raw / key).parent.mkdir(parents=True, exist_ok=True)
        if data is None:
            Image.new("1", (9, 9), 1).save(raw / key)
        else:
            (raw / key).write_bytes(data)
    return set(good), set(bad)


def test_a_difficult_source_converts_every_good_image_and_reports_every_bad_one(tmp_path):
    import tensorflow as tf

    from pipeline import schema

    raw = tmp_path / "raw"
    good, bad = _difficult_source(raw)
    out = tmp_path / "tfrecords"
    reports = write_all_shards(raw, out, test_fraction=0.0, num_shards=1, image_size=8, channels=1)

    metadata = convert.finalize_conversion(out, reports, out / "metadata.json", image_size=8, channels=1,
                                           max_bad_fraction=0.5, source={})

    assert metadata["class_names"] == ["a cat", "dog", "ñandú"]
    records = {record[schema.KEY].decode(): Image.open(io.BytesIO(record[schema.ENCODED]))
               for record in tf.data.TFRecordDataset([str(out / convert.shard_name("train", 0, 1))])
               .map(schema.parse_example).as_numpy_iterator()}
    assert set(records) == good and metadata["splits"]["train"]["count"] == len(good)
    reasons = {item["key"]: item["reason"] for item in metadata["bad_images"]}
    assert set(reasons) == bad
    assert "DecompressionBomb" in reasons["ñandú/bomb.png"] and "runcated" in reasons["dog/truncated.jpg"]
    assert "UnidentifiedImageError" in reasons["ñandú/notes.jpg"] and reasons["dog/empty.png"]

    rotated = np.asarray(records["dog/rotated.JPG"], dtype=float)
    assert rotated[:3].mean() < 60 and rotated[-3:].mean() > 200, "EXIF orientation is applied"
    wide = np.asarray(records["a cat/wide.png"], dtype=int)
    assert wide.min() < 30 and wide.max() > 220 and len(np.unique(wide)) > 20, "16-bit grey is scaled, not clipped"
    assert set(np.asarray(records["a cat/alpha.png"]).ravel()) == {255}, "transparency is flattened onto white"

    with pytest.raises(DatasetError, match=r"5 of 16 images could not be decoded .31\.2%., more than "
                                           r"max_bad_fraction=10\.0%"):
        convert.finalize_conversion(out, reports, tmp_path / "strict.json", image_size=8, channels=1,
                                    max_bad_fraction=0.1, source={})
    assert not (tmp_path / "strict.json").exists()


def test_a_decompression_bomb_is_refused_without_allocating_its_size(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_claiming(50000, 50000))  # 2.5 GB as 8-bit grey
    probe = (
        "import resource, sys\n"
        "from PIL import Image\n"
        "from pipeline.convert import load_image\n"
        "from pipeline.errors import UnusableImage\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        f"    load_image({str(bomb)!r}, 28, 1)\n"
        "except UnusableImage as error:\n"
        "    assert isinstance(error.__cause__, Image.DecompressionBombError), error\n"
        "    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) < 50 << 20, "peak memory grew by more than 50 MB"


def _writer_when_read(fifo: str) -> int:
    """The write end of `fifo`, opened once a reader (load_image, opening the file) waits on it."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            assert time.monotonic() < deadline, f"no reader opened {fifo}"
            time.sleep(0.01)


def _wait_drained(fd: int) -> None:
    """Until the reader has taken every byte written to the pipe `fd` (it is then blocked reading more)."""
    deadline = time.monotonic() + 60
    pending = bytearray(4)
    while True:
        fcntl.ioctl(fd, termios.FIONREAD, pending)
        if int.from_bytes(pending, "little") == 0:
            return
        assert time.monotonic() < deadline, "the reader never read"
        time.sleep(0.01)


# pytest restores the warning filters around each test, dropping the one pipeline.convert set as
# it was imported (the test below checks that filter, in a process of its own).
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_decompression_bomb_is_refused_by_every_decode_thread(tmp_path, monkeypatch):
    """A shard decodes in threads. A bomb must be refused in one thread while another finishes an
    image (with warnings.catch_warnings, process-wide and not thread-safe, the first to leave
    restored filters without the error, and the bomb was stored). FIFOs order the threads' steps."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a warning above 1000 pixels, an error above 2000
    small, bomb = _png(Image.new("L", (10, 10), 10)), _png(Image.new("L", (40, 40), 20))  # 1600 pixels
    (tmp_path / "bomb.png").write_bytes(bomb)
    with pytest.raises(UnusableImage, match="DecompressionBomb"):
        convert.load_image(tmp_path / "bomb.png", 8, 1)

    first, second = str(tmp_path / "first.png"), str(tmp_path / "second.png")
    os.mkfifo(first)
    os.mkfifo(second)
    results = {}

    def load(name, path):
        try:
            results[name] = convert.load_image(path, 8, 1)
        except UnusableImage as error:
            results[name] = error

    a = threading.Thread(target=load, args=("small", first))
    a.start()
    fd_a = _writer_when_read(first)  # thread a is opening its file
    b = threading.Thread(target=load, args=("bomb", second))
    b.start()
    fd_b = _writer_when_read(second)
    os.write(fd_b, bomb[:1])
    _wait_drained(fd_b)  # thread b is in Image.open, reading the bomb
    os.write(fd_a, small)
    os.close(fd_a)
    a.join(60)  # thread a finished its image first
    os.write(fd_b, bomb[1:])
    os.close(fd_b)
    b.join(60)

    assert isinstance(results["small"], bytes)
    assert isinstance(results["bomb"], UnusableImage), "a bomb decoded because another thread finished first"


def test_a_bomb_below_twice_the_limit_is_refused_without_a_warning(tmp_path):
    """Pillow only warns below twice its limit, once for every size of image met: nothing is printed."""
    (tmp_path / "bomb.png").write_bytes(_png(Image.new("L", (40, 40), 20)))
    probe = (
        "from PIL import Image\n"
        "from pipeline.convert import load_image\n"
        "from pipeline.errors import UnusableImage\n"
        "Image.MAX_IMAGE_PIXELS = 1000\n"
        "try:\n"
        f"    load_image({str(tmp_path / 'bomb.png')!r}, 8, 1)\n"
        "except UnusableImage as error:\n"
        "    assert isinstance(error.__cause__, Image.DecompressionBombError), error\n"
        "    print('refused')\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (0, "refused\n", "")


def test_a_corrupt_shard_is_named_with_its_report(tmp_path):
    out, metadata = converted_images(tmp_path, per_class=4, test_fraction=0.0, image_size=4)
    assert len(convert.shard_paths(out, metadata, "train")) == 2

    shard = out / convert.shard_name("train", 1, 2)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))

    with pytest.raises(CorruptShard, match=r"train-00001-of-00002.tfrecord: its sha256 is [0-9a-f]{64}, but "
                                           r"metadata.json records") as found:
        convert.shard_paths(out, metadata, "train")
    assert found.value.shard == str(shard)
    # The task that met it removes that report (the shard task's marker); the library only says which.
    assert convert.report_of(found.value.shard) == str(out / convert.report_name("train", 1, 2))
    assert Path(convert.report_of(found.value.shard)).exists()

    shard.unlink()
    with pytest.raises(DatasetError, match="train-00001-of-00002.tfrecord: it is missing"):
        convert.shard_paths(out, metadata, "train")


def _photo(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A photo-like RGB image: smooth gradients under a few filled ellipses."""
    rng = random.Random(seed)
    bands = [Image.linear_gradient("L"), Image.radial_gradient("L"), Image.linear_gradient("L").rotate(90)]
    image = Image.merge("RGB", [band.resize(size) for band in bands])
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        xs, ys = sorted(rng.sample(range(size[0]), 2)), sorted(rng.sample(range(size[1]), 2))
        draw.ellipse((xs[0], ys[0], xs[1], ys[1]), fill=tuple(rng.randrange(256) for _ in range(3)))
    return image


def _stored(data: bytes) -> tuple[str, str, tuple[int, int]]:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.format, image.mode, image.size


def test_each_image_format_stores_what_it_says_at_the_size_and_mode_asked(tmp_path):
    (tmp_path / "photo.jpg").write_bytes(_jpeg(_photo((300, 200))))
    (tmp_path / "drawing.png").write_bytes(_png(_photo((300, 200), seed=1)))

    for channels, mode in ((3, "RGB"), (1, "L")):
        for name, image_format, stored in (("photo.jpg", "auto", "JPEG"), ("drawing.png", "auto", "PNG"),
                                           ("drawing.png", "jpeg", "JPEG"), ("photo.jpg", "png", "PNG")):
            data = convert.load_image(tmp_path / name, 32, channels, image_format=image_format)
            assert _stored(data) == (stored, mode, (32, 32)), (name, image_format, channels)
    low, high = (convert.load_image(tmp_path / "photo.jpg", 32, 3, image_format="jpeg", jpeg_quality=quality)
                 for quality in (20, 95))
    assert len(low) < len(high)


def test_a_jpeg_already_in_the_dataset_form_is_kept_but_still_checked(tmp_path):
    upright, grey = _jpeg(_photo((16, 16))), _jpeg(_photo((16, 16)).convert("L"))
    exif = Image.Exif()
    exif[0x0112] = 3  # shown upside down
    files = {"upright.jpg": upright, "grey.jpg": grey, "rotated.jpg": _jpeg(_photo((16, 16)), exif=exif),
             "truncated.jpg": upright[:len(upright) // 2]}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)

    assert convert.load_image(tmp_path / "upright.jpg", 16, 3) == upright
    assert convert.load_image(tmp_path / "upright.jpg", 16, 3, image_format="jpeg", jpeg_quality=50) == upright
    assert convert.load_image(tmp_path / "grey.jpg", 16, 1, image_format="jpeg") == grey
    again = convert.load_image(tmp_path / "upright.jpg", 16, 1)
    assert again != upright and _stored(again) == ("JPEG", "L", (16, 16)), "colour is encoded again as grey"
    assert convert.load_image(tmp_path / "rotated.jpg", 16, 3) != files["rotated.jpg"], "rotated, then encoded"
    assert _stored(convert.load_image(tmp_path / "upright.jpg", 16, 3, image_format="png"))[0] == "PNG"
    with pytest.raises(UnusableImage, match="(?i)truncated"):
        convert.load_image(tmp_path / "truncated.jpg", 16, 3)


def test_a_jpeg_kept_as_it_is_decodes_in_tensorflow(tmp_path):
    """A JPEG already at size is kept only if Train's decoder reads it. Pillow decodes one with a
    marker inside its scan (libjpeg warns "Corrupt JPEG data"), TensorFlow refuses it: it is
    encoded again from the pixels Pillow salvaged, so that Train and Predict do not stop on it."""
    import tensorflow as tf

    from pipeline import schema

    jpeg = _jpeg(_photo((64, 64)))
    middle = (jpeg.index(b"\xff\xda") + len(jpeg)) // 2
    corrupt = jpeg[:middle] + b"\xff\xe1" + jpeg[middle:]  # an APP1 marker in the scan
    (tmp_path / "corrupt.jpg").write_bytes(corrupt)
    with Image.open(io.BytesIO(corrupt)) as image:
        salvaged = np.asarray(image, dtype=float)  # Pillow decodes it...
    with pytest.raises(tf.errors.InvalidArgumentError):
        tf.io.decode_image(corrupt)  # ...where TensorFlow does not

    stored = convert.load_image(tmp_path / "corrupt.jpg", 64, 3)

    assert stored != corrupt
    pixels = schema.decode_stored_pixels(tf.constant(stored), [64, 64, 3]).numpy()
    assert np.abs(pixels - salvaged).mean() < 3, "Pillow's pixels, encoded again"


@pytest.mark.parametrize("orientation", [1, 6])
@pytest.mark.parametrize("channels", [3, 1])
def test_a_large_jpeg_scaled_by_libjpeg_is_close_to_a_full_decode(tmp_path, channels, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    (tmp_path / "large.jpg").write_bytes(_jpeg(_photo((640, 512)), exif=exif))
    with Image.open(tmp_path / "large.jpg") as image:
        upright = ImageOps.exif_transpose(image).convert(convert.CHANNEL_MODES[channels])
        full = np.asarray(upright.resize((64, 64), Image.Resampling.BILINEAR), dtype=float)

    scaled = np.asarray(Image.open(io.BytesIO(convert.load_image(tmp_path / "large.jpg", 64, channels,
                                                                  image_format="png"))), dtype=float)

    assert scaled.shape == full.shape
    assert not np.array_equal(scaled, full), "decoded at 1/8 scale, not in full"
    assert np.abs(scaled - full).mean() < 2


def _photo_source(raw, per_class=12):
    rng = random.Random(3)
    for label in ("a", "b"):
        (raw / label).mkdir(parents=True)
        for index in range(per_class):
            size = (rng.randint(40, 140), rng.randint(40, 140))
            (raw / label / f"{index:02d}.jpg").write_bytes(_jpeg(_photo(size, seed=index)))
    (raw / "a" / "broken.jpg").write_bytes(b"not a picture")
    return raw


def test_a_shards_bytes_are_the_same_whatever_the_number_of_decode_threads(tmp_path):
    raw = _photo_source(tmp_path / "raw")
    plan = tmp_path / "plan.json"
    convert.plan_conversion(raw, plan, validation_fraction=0.0, test_fraction=0.0, split_seed=1, num_shards=1)

    reports = {}
    for run, threads in enumerate((1, 4, 4, 3)):
        shard = tmp_path / f"run{run}" / "train.tfrecord"
        reports[run] = convert.write_shard(raw, plan, "train", 0, shard, tmp_path / f"run{run}" / "report.json",
                                           image_size=32, channels=3, image_format="jpeg", decode_threads=threads)
        assert reports[run]["sha256"] == hashlib.sha256(shard.read_bytes()).hexdigest()

    assert reports[0]["records"] == 24 and [bad["key"] for bad in reports[0]["bad"]] == ["a/broken.jpg"]
    assert all(report == reports[0] for report in reports.values()), "same bytes with 1, 3 and 4 threads, twice"


def test_images_are_decoded_in_a_window_that_does_not_grow_with_their_number():
    pulled = 0

    def items():
        nonlocal pulled
        for item in range(200):
            pulled += 1
            yield item

    results = []
    for result in convert._mapped_in_order(lambda item: item * 2, items(), 3):
        assert pulled - len(results) <= 6, "at most two images per thread are pending"
        results.append(result)
    assert results == [item * 2 for item in range(200)]


def test_a_conversion_from_before_the_choice_of_format_stored_png():
    assert convert.stored_format({"image_shape": [28, 28, 1]}) == {"image_format": "png", "jpeg_quality": 90}
    assert convert.stored_format({"image_format": "jpeg", "jpeg_quality": 70}) == {"image_format": "jpeg",
                                                                                   "jpeg_quality": 70}


def test_an_image_normalised_as_its_metadata_says_is_its_stored_record(tmp_path):
    """What Predict does with a folder: each image comes out as conversion stored it."""
    import tensorflow as tf

    from pipeline import schema

    raw = _photo_source(tmp_path / "raw", per_class=3)
    (raw / "b" / "drawing.png").write_bytes(_png(_photo((50, 40), seed=9)))
    out = tmp_path / "tfrecords"
    convert.plan_conversion(raw, out / convert.PLAN_FILE, validation_fraction=0.0, test_fraction=0.0,
                            split_seed=1, num_shards=1)
    reports = convert.write_all_shards(raw, out, num_shards=1, image_size=24, channels=1, image_format="jpeg",
                                       jpeg_quality=70, decode_threads=2)
    metadata = convert.finalize_conversion(out, reports, out / "metadata.json", image_size=24, channels=1,
                                           max_bad_fraction=0.5, source={}, image_format="jpeg", jpeg_quality=70)

    records = {record[schema.KEY].decode(): record[schema.ENCODED]
               for record in tf.data.TFRecordDataset(convert.shard_paths(out, metadata, "train"))
               .map(schema.parse_example).as_numpy_iterator()}
    assert len(records) == 7 and {_stored(data)[:2] for data in records.values()} == {("JPEG", "L")}
    for key, data in records.items():
        assert convert.load_image(raw / key, 24, 1, **convert.stored_format(metadata)) == data, key
