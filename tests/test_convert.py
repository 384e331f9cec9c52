import io

import pytest
from PIL import Image

from pipeline import convert
from pipeline.errors import ConfigError, DatasetError
from pipeline.fileio import read_json


def write_images(root, per_class=10, classes=("a", "b")):
    for label in classes:
        (root / label).mkdir(parents=True)
        for index in range(per_class):
            Image.new("RGB", (9, 7), (index * 20, 40, 80)).save(root / label / f"{index:02d}.png")
    return root


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
    convert.plan_conversion(raw, out / convert.PLAN_FILE, validation_fraction=0.0, test_fraction=0.3,
                            split_seed=1, num_shards=2)
    reports = []
    for split in convert.SPLITS:
        for index in range(2):
            report = out / convert.report_name(split, index, 2)
            convert.write_shard(raw, out / convert.PLAN_FILE, split, index,
                                out / convert.shard_name(split, index, 2), report, image_size=5, channels=3)
            reports.append(report)

    metadata = convert.finalize_conversion(out, reports, out / "metadata.json", image_size=5, channels=3,
                                           max_bad_fraction=0.1, source={})

    assert metadata["image_shape"] == [5, 5, 3]
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


@pytest.mark.parametrize("kwargs, message", [
    ({"image_size": 0}, "image_size=0"),
    ({"channels": 2}, "channels=2"),
    ({"validation_fraction": 0.5, "test_fraction": 0.5}, "expected less than 1"),
    ({"num_shards": 0}, "num_shards=0"),
])
def test_bad_conversion_params_are_named(kwargs, message):
    params = {"image_size": 28, "channels": 1, "validation_fraction": 0.1, "test_fraction": 0.1,
              "num_shards": 2, "max_bad_fraction": 0.0, **kwargs}
    with pytest.raises(ConfigError, match=message):
        convert.validate_conversion_params(**params)
