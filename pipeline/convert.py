"""Convert stage: images in `<class>/<file>` folders -> sharded TFRecords and one metadata.json.

It runs in three steps so that shards can be written by separate processes:
`plan_conversion` fixes the split and the shard of every image, `write_shard` writes one
shard and its report, and `finalize_conversion` checks every shard and writes metadata.json,
the stage's marker, last.

Images are stored as PNG or JPEG (`IMAGE_FORMATS`); `schema.decode_stored_pixels` reads either.
"""
from __future__ import annotations

import contextlib
import io
import os
import random
import warnings
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

from PIL import ExifTags, Image, ImageOps

from pipeline.errors import ConfigError, CorruptShard, DatasetError, StageOutputError, UnusableImage
from pipeline import storage
from pipeline.datafiles import visible_keys
from pipeline.storage import atomic_path, read_json, sha256_file, write_json
from pipeline.progress import Progress

SPLITS = ("train", "validation", "test")
PLAN_FILE = "plan.json"
CHANNEL_MODES = {1: "L", 3: "RGB"}
# How images are stored: `auto` keeps a JPEG source JPEG and stores anything else as PNG (lossless,
# so PNG and GIF sources such as the embedded sample lose nothing); `png` and `jpeg` store all so.
IMAGE_FORMATS = ("auto", "png", "jpeg")
DEFAULT_JPEG_QUALITY = 90
# Pillow's formats of a JPEG file; MPO is a camera's JPEG with further pictures after the first.
_JPEG_SOURCES = ("JPEG", "MPO")
# Decoding and resizing in Pillow, and an S3 read, release the GIL, so threads overlap them. One
# per core: on 2 cores with --workers 2, 2 threads a shard converted photos faster than 1, 4 or 8.
DEFAULT_DECODE_THREADS = min(4, os.cpu_count() or 1)


def shard_name(split: str, index: int, num_shards: int) -> str:
    return f"{split}-{index:05d}-of-{num_shards:05d}.tfrecord"


def report_name(split: str, index: int, num_shards: int) -> str:
    return shard_name(split, index, num_shards).removesuffix(".tfrecord") + ".json"


def validate_conversion_params(image_size: int, channels: int, validation_fraction: float,
                               test_fraction: float, num_shards: int, max_bad_fraction: float, *,
                               image_format: str = "auto", jpeg_quality: int = DEFAULT_JPEG_QUALITY,
                               decode_threads: int = 1) -> None:
    if image_size <= 0:
        raise ConfigError(f"image_size={image_size}; expected a positive number of pixels")
    if channels not in CHANNEL_MODES:
        raise ConfigError(f"channels={channels}; expected one of {sorted(CHANNEL_MODES)}")
    for name, value in (("validation_fraction", validation_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{name}={value}; expected a fraction in [0, 1)")
    if validation_fraction + test_fraction >= 1.0:
        raise ConfigError(f"validation_fraction + test_fraction = {validation_fraction + test_fraction}; "
                          "expected less than 1 so that the train split is not empty")
    if num_shards <= 0:
        raise ConfigError(f"num_shards={num_shards}; expected a positive integer")
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise ConfigError(f"max_bad_fraction={max_bad_fraction}; expected a fraction in [0, 1]")
    if image_format not in IMAGE_FORMATS:
        raise ConfigError(f"image_format={image_format!r}; expected one of {', '.join(IMAGE_FORMATS)}")
    if not 1 <= jpeg_quality <= 100:
        raise ConfigError(f"jpeg_quality={jpeg_quality}; expected an integer from 1 to 100")
    if decode_threads <= 0:
        raise ConfigError(f"decode_threads={decode_threads}; expected a positive integer")


def list_visible_files(folder: str) -> list[str]:
    """Every file below `folder`, sorted, leaving out hidden files and anything in hidden folders."""
    return [storage.join(folder, key) for key in visible_keys(folder)]


def list_images(raw_dir: str) -> dict[str, list[str]]:
    """Class name -> sorted keys (`<class>/<relative path>`) of every visible file in its folder."""
    by_class: dict[str, list[str]] = {}
    # One listing of the whole tree: on S3, a listing per class folder would cost a request each.
    for key in visible_keys(raw_dir):
        if "/" in key:
            by_class.setdefault(key.split("/", 1)[0], []).append(key)
    if len(by_class) < 2:
        raise DatasetError(f"{raw_dir}: found classes {sorted(by_class)}; expected at least two class folders")
    return dict(sorted(by_class.items()))


def split_keys(keys: Sequence[str], validation_fraction: float, test_fraction: float, seed: str) -> dict[str, list[str]]:
    """Shuffle `keys` deterministically from `seed` and cut them into the three splits."""
    shuffled = sorted(keys)
    random.Random(seed).shuffle(shuffled)
    n_test = round(len(shuffled) * test_fraction)
    n_validation = round(len(shuffled) * validation_fraction)
    return {"test": shuffled[:n_test],
            "validation": shuffled[n_test:n_test + n_validation],
            "train": shuffled[n_test + n_validation:]}


def plan_conversion(raw_dir: str, plan_path: str, *, validation_fraction: float, test_fraction: float,
                    split_seed: int, num_shards: int) -> dict:
    """Assign every image to a split (stratified by class) and a shard; write the plan atomically."""
    listing = list_images(raw_dir)
    class_names = list(listing)
    by_split: dict[str, list[tuple[str, int]]] = {split: [] for split in SPLITS}
    for label, name in enumerate(class_names):
        for split, keys in split_keys(listing[name], validation_fraction, test_fraction,
                                      f"{split_seed}/{name}").items():
            by_split[split].extend((key, label) for key in keys)
    shards = {}
    for split, items in by_split.items():
        # Interleave the classes so that each shard, and each read of one, mixes them.
        items.sort()
        random.Random(f"{split_seed}/{split}").shuffle(items)
        shards[split] = [[list(item) for item in items[i::num_shards]] for i in range(num_shards)]
    plan = {"class_names": class_names, "num_shards": num_shards, "shards": shards}
    write_json(plan_path, plan)
    return plan


# Greyscale modes wider than 8 bits, as Pillow opens 16-bit PNGs and TIFFs.
_WIDE_GREY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


# (bit depth, colour type) in the IHDR of a PNG whose bytes can be stored as they are: 8-bit
# greyscale or truecolour, as `tf.io.decode_png` reads them into `channels` unchanged.
_STORABLE_PNG = {1: (8, 0), 3: (8, 2)}


# What Pillow raises for a file that is no usable image: not an image at all (UnidentifiedImageError
# is an OSError), truncated or corrupt (OSError, SyntaxError, ValueError), or a decompression bomb.
_UNUSABLE_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning,
                          Image.DecompressionBombError)
# Image.open only warns of a bomb below twice Pillow's limit; `_refuse_bomb` raises for it instead,
# per call, because warnings.catch_warnings, which could make the warning an error, swaps
# process-wide state and is not thread-safe (a shard decodes in threads). The warning, redundant
# then, would be printed once for every size of image met.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning, module=r"PIL\.Image$")


def stored_format(metadata: dict) -> dict:
    """How a conversion stored its images, from its metadata, as `load_image`'s keyword arguments;
    conversions from before the choice existed stored PNG."""
    return {"image_format": metadata.get("image_format", "png"),
            "jpeg_quality": metadata.get("jpeg_quality", DEFAULT_JPEG_QUALITY)}


def load_image(path: str, image_size: int, channels: int, *, image_format: str = "auto",
               jpeg_quality: int = DEFAULT_JPEG_QUALITY) -> bytes:
    """Decode any image Pillow reads into `channels` at `image_size` square, as PNG or JPEG bytes
    (`image_format`, see IMAGE_FORMATS; JPEG at `jpeg_quality`).

    EXIF orientation is applied, transparency is flattened onto white, and Pillow's
    decompression-bomb limit is an error rather than a warning. A JPEG larger than needed is
    decoded at 1/2, 1/4 or 1/8 scale by libjpeg (never below `image_size`) before the resize. A
    file already in the stored form (a PNG or a JPEG at that size, in that mode, upright) is kept
    byte for byte once checked (a JPEG by TensorFlow's decoder itself, a PNG by Pillow's decode
    and checksums): encoding it again took about 40% of the time spent per image. A JPEG that
    TensorFlow refuses is encoded again from what Pillow decodes. Raises
    UnusableImage for a file that cannot be used, naming the underlying error.
    """
    try:
        return _normalised(path, image_size, channels, image_format, jpeg_quality)
    except _UNUSABLE_IMAGE_ERRORS as error:
        raise UnusableImage(f"{type(error).__name__}: {error}") from error


def _refuse_bomb(opened: Image.Image) -> None:
    """Pillow's decompression-bomb limit as an error rather than a warning (above twice the limit,
    Image.open already raised DecompressionBombError)."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and opened.width * opened.height > limit:
        raise Image.DecompressionBombError(f"Image size ({opened.width * opened.height} pixels) exceeds limit of "
                                           f"{limit} pixels, could be decompression bomb DOS attack.")


def _normalised(path: str, image_size: int, channels: int, image_format: str, jpeg_quality: int) -> bytes:
    mode = CHANNEL_MODES[channels]
    with storage.open_binary(path) as handle:
        with Image.open(handle) as opened:
            _refuse_bomb(opened)
            jpeg_source = opened.format in _JPEG_SOURCES
            stored = "PNG" if image_format == "png" or (image_format == "auto" and not jpeg_source) else "JPEG"
            # exif_transpose copies every image; most have no orientation to apply.
            rotated = opened.getexif().get(ExifTags.Base.Orientation, 1) not in (1, None)
            if not rotated and opened.size == (image_size, image_size):
                kept = _kept_bytes(opened, handle, stored, channels)
                if kept is not None:
                    return kept
            if jpeg_source:
                # libjpeg scales in the DCT, several times faster than decoding every pixel and
                # resizing them. The square asked for is the same either way up, so it may
                # come before the rotation.
                opened.draft(mode, (image_size, image_size))
            image = ImageOps.exif_transpose(opened) if rotated else opened
            if image.mode in _WIDE_GREY_MODES:
                # Converting to "L" clips these to 8 bits (most pixels turn white); scale the 16-bit range first.
                image = image.point(lambda value: value / 257).convert("L")
            if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
                rgba = image.convert("RGBA")
                image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
            image = image.convert(mode)
            if image.size != (image_size, image_size):
                image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
            buffer = io.BytesIO()
            if stored == "PNG":
                image.save(buffer, format="PNG", compress_level=1)
            else:
                image.save(buffer, format="JPEG", quality=jpeg_quality)
    return buffer.getvalue()


def _kept_bytes(opened: Image.Image, handle, stored: str, channels: int) -> bytes | None:
    """The file's own bytes, when they are already what would be stored and decode cleanly; else None."""
    if opened.format != stored or opened.mode != CHANNEL_MODES[channels]:
        return None
    handle.seek(0)
    data = handle.read()
    if stored == "PNG":
        if "transparency" in opened.info or (data[24], data[25]) != _STORABLE_PNG[channels]:
            return None
        # Pillow decodes some PNGs that TensorFlow refuses (one cut short of its checksum);
        # verify() checks every chunk's CRC up to IEND, as libpng does. libpng also refuses an
        # unknown critical chunk, a second IHDR or an unterminated zlib stream, which Pillow
        # reads; checking every PNG in TensorFlow as JPEGs are would cost MNIST-sized images
        # 40% of their conversion rate (a TensorFlow call costs twice Pillow's decode of one).
        opened.load()
        with Image.open(io.BytesIO(data), formats=["PNG"]) as again:
            again.verify()
        return data
    # Pillow decodes JPEGs that Train's decoder refuses: libjpeg's warnings ("Corrupt JPEG data",
    # as a marker inside the scan gives) are errors in TensorFlow, and Pillow ignores them. Such
    # a file is encoded again from the pixels Pillow salvaged, as every file was before files
    # were kept. TensorFlow's decode replaces Pillow's, which it makes redundant.
    from pipeline.schema import decodes  # TensorFlow loads only where a JPEG may be kept.
    return data if decodes(data, channels) else None


_T = TypeVar("_T")
_R = TypeVar("_R")


def _mapped_in_order(function: Callable[[_T], _R], items: Iterable[_T], threads: int) -> Iterator[_R]:
    """`function` of each item, in the items' order, computed by `threads` threads. At most two
    results per thread are pending at once, so memory does not grow with the number of items."""
    with ThreadPoolExecutor(threads, thread_name_prefix="convert") as pool:
        window = deque()
        try:
            for item in items:
                window.append(pool.submit(function, item))
                if len(window) >= 2 * threads:
                    yield window.popleft().result()
            while window:
                yield window.popleft().result()
        finally:
            # Stopped early (a write failed): do not wait for images no one will write.
            for future in window:
                future.cancel()


def write_shard(raw_dir: str, plan_path: str, split: str, index: int, shard_path: str, report_path: str,
                *, image_size: int, channels: int, image_format: str = "auto",
                jpeg_quality: int = DEFAULT_JPEG_QUALITY, decode_threads: int = 1,
                progress: Progress | None = None) -> dict:
    """Write one shard of the plan and then its report (the shard's marker). Returns the report.

    `decode_threads` threads read, decode and encode the images; records are written in the
    plan's order, so the shard's bytes do not depend on their number."""
    from pipeline import schema  # TensorFlow loads only in the processes that write records.
    import tensorflow as tf

    plan = read_json(plan_path)
    items = plan["shards"][split][index]
    class_names = plan["class_names"]
    per_class: Counter[str] = Counter()
    bad = []

    def load(key: str) -> bytes | UnusableImage:
        try:
            return load_image(storage.join(raw_dir, key), image_size, channels, image_format=image_format,
                              jpeg_quality=jpeg_quality)
        except UnusableImage as error:
            return error

    with atomic_path(shard_path) as temp:
        with tf.io.TFRecordWriter(str(temp)) as writer:
            with contextlib.closing(_mapped_in_order(load, (key for key, _ in items), decode_threads)) as loaded:
                for done, ((key, label), encoded) in enumerate(zip(items, loaded), start=1):
                    if isinstance(encoded, UnusableImage):
                        bad.append({"key": key, "reason": str(encoded)})
                    else:
                        writer.write(schema.serialize_example(encoded, label, key))
                        per_class[class_names[label]] += 1
                    if progress:
                        progress(done, len(items), "images", f"{split} shard {index}")
        # Hashed before it is published: on S3, reading it back would fetch it again.
        digest = sha256_file(temp)
    report = {"file": storage.name(shard_path), "split": split, "records": sum(per_class.values()),
              "sha256": digest, "per_class": dict(sorted(per_class.items())), "bad": bad}
    write_json(report_path, report)
    return report


def write_all_shards(raw_dir: str, out_dir: str, *, num_shards: int, image_size: int, channels: int,
                     **options) -> list[str]:
    """Every shard of the plan in `out_dir`, one after another in this process (the ConvertShard
    tasks write them in parallel), `options` passed to `write_shard`; returns the reports, for
    `finalize_conversion`."""
    reports = []
    for split in SPLITS:
        for index in range(num_shards):
            reports.append(storage.join(out_dir, report_name(split, index, num_shards)))
            write_shard(raw_dir, storage.join(out_dir, PLAN_FILE), split, index,
                        storage.join(out_dir, shard_name(split, index, num_shards)), reports[-1],
                        image_size=image_size, channels=channels, **options)
    return reports


def finalize_conversion(out_dir: str, reports: Iterable[str], metadata_path: str, *, image_size: int,
                        channels: int, max_bad_fraction: float, source: dict, image_format: str = "auto",
                        jpeg_quality: int = DEFAULT_JPEG_QUALITY) -> dict:
    """Check every shard against its report and the bad fraction, then write metadata.json last."""
    plan = read_json(storage.join(out_dir, PLAN_FILE))
    splits = {split: {"count": 0, "per_class": Counter(), "shards": []} for split in SPLITS}
    bad = []
    for report_path in reports:
        report = read_json(report_path)
        shard_path = storage.join(out_dir, report["file"])
        if not storage.exists(shard_path) or sha256_file(shard_path) != report["sha256"]:
            raise StageOutputError(f"{shard_path}: missing or its sha256 differs from {storage.name(report_path)}; "
                                   "rerun Convert to rebuild it")
        split = splits[report["split"]]
        split["count"] += report["records"]
        split["per_class"].update(report["per_class"])
        split["shards"].append({key: report[key] for key in ("file", "records", "sha256")})
        bad.extend(report["bad"])
    planned = sum(len(shard) for split in plan["shards"].values() for shard in split)
    written = sum(split["count"] for split in splits.values())
    if written + len(bad) != planned:
        raise StageOutputError(f"{out_dir}: shards hold {written} records and report {len(bad)} bad images, "
                               f"but the plan lists {planned} images")
    bad_fraction = len(bad) / planned if planned else 0.0
    if bad_fraction > max_bad_fraction:
        examples = "; ".join(f"{b['key']}: {b['reason']}" for b in bad[:5])
        raise DatasetError(f"{len(bad)} of {planned} images could not be decoded ({bad_fraction:.1%}), more than "
                           f"max_bad_fraction={max_bad_fraction:.1%}. First ones: {examples}")
    if splits["train"]["count"] == 0:
        raise DatasetError(f"{out_dir}: the train split is empty after skipping bad images")
    class_names = plan["class_names"]
    metadata = {
        "class_names": class_names,
        "label_map": {name: label for label, name in enumerate(class_names)},
        "image_shape": [image_size, image_size, channels],
        # How folders given to Predict are stored before the model sees them (`stored_format`).
        "image_format": image_format,
        "jpeg_quality": jpeg_quality,
        "splits": {name: {"count": s["count"], "per_class": {c: s["per_class"].get(c, 0) for c in class_names},
                          "shards": sorted(s["shards"], key=lambda shard: shard["file"])}
                   for name, s in splits.items()},
        "bad_images": sorted(bad, key=lambda b: b["key"]),
        "bad_fraction": bad_fraction,
        "source": source,
    }
    write_json(metadata_path, metadata)
    return metadata


def shard_paths(convert_dir: str, metadata: dict, split: str) -> list[str]:
    """The shard files of one split, from metadata written by `finalize_conversion`, each checked
    against the sha256 recorded there: a missing or corrupt one raises CorruptShard naming it."""
    if split not in metadata["splits"]:
        raise ConfigError(f"split={split!r}; expected one of {', '.join(metadata['splits'])}")
    paths = []
    for shard in metadata["splits"][split]["shards"]:
        path = storage.join(convert_dir, shard["file"])
        actual = sha256_file(path) if storage.exists(path) else None
        if actual != shard["sha256"]:
            found = f"its sha256 is {actual}" if actual else "it is missing"
            raise CorruptShard(f"{path}: {found}, but metadata.json records {shard['sha256']}. The shard is "
                               "corrupt; the next run rebuilds it", path)
        paths.append(path)
    return paths


def report_of(shard_path: str) -> str:
    """The report written after a shard (see `write_shard`)."""
    return storage.join(storage.parent(shard_path), storage.name(shard_path).removesuffix(".tfrecord") + ".json")
