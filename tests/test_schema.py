import io

import numpy as np
import tensorflow as tf
from PIL import Image

from pipeline import schema
from pipeline.estimator import input_fn


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_example_round_trip_through_input_fn(tmp_path):
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (6, 6, 3), dtype=np.uint8) for _ in range(5)]
    path = tmp_path / "records.tfrecord"
    with tf.io.TFRecordWriter(str(path)) as writer:
        for index, image in enumerate(images):
            writer.write(schema.serialize_example(png_bytes(image), index % 2, f"c/{index}.png"))

    parsed = [schema.parse_example(record) for record in tf.data.TFRecordDataset(str(path))]
    assert [p[schema.KEY].numpy().decode() for p in parsed] == [f"c/{i}.png" for i in range(5)]

    features, labels = next(iter(input_fn([str(path)], (6, 6, 3), 5, training=False)))
    assert labels.numpy().tolist() == [0, 1, 0, 1, 0]
    np.testing.assert_allclose(features[schema.IMAGE].numpy(), np.stack(images) / 255.0, atol=1e-6)


def test_serving_receiver_decodes_png_and_jpeg_of_any_size():
    jpeg = io.BytesIO()
    Image.new("RGB", (40, 20), "white").save(jpeg, format="JPEG")
    with tf.Graph().as_default():
        receiver = schema.serving_input_receiver_fn((8, 8, 1))()
        with tf.compat.v1.Session() as session:
            images = session.run(receiver.features[schema.IMAGE], {
                receiver.receiver_tensors[schema.SERVING_INPUT]: [png_bytes(np.zeros((3, 5), np.uint8)),
                                                                  jpeg.getvalue()]})
    assert images.shape == (2, 8, 8, 1)
    np.testing.assert_allclose(images[0], 0.0)
    np.testing.assert_allclose(images[1], 1.0, atol=0.02)


def test_stored_pixels_decode_from_png_and_jpeg_alike_as_pillow_reads_them():
    rng = np.random.default_rng(4)
    for shape, mode in (((8, 8, 3), "RGB"), ((8, 8, 1), "L")):
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
        image = Image.fromarray(pixels[..., 0] if mode == "L" else pixels)
        jpeg = io.BytesIO()
        image.save(jpeg, format="JPEG", quality=90)

        from_png = schema.decode_stored_pixels(png_bytes(np.asarray(image)), shape).numpy()
        from_jpeg = schema.decode_stored_pixels(jpeg.getvalue(), shape).numpy()

        np.testing.assert_array_equal(from_png, pixels)
        assert from_jpeg.shape == shape and from_jpeg.dtype == np.uint8
        # Pillow's and TensorFlow's libjpeg differ in their integer DCT by a unit or two at most.
        pillow = np.asarray(Image.open(jpeg)).reshape(shape).astype(int)
        assert np.abs(from_jpeg.astype(int) - pillow).max() <= 8 and not np.array_equal(from_jpeg, pixels)


def test_training_batches_are_the_same_whatever_is_cached(tmp_path):
    # What input_fn caches depends on the machine's memory; the order it trains in must not, or
    # one version would train to other weights on another machine.
    rng = np.random.default_rng(2)
    files = [str(tmp_path / f"train-{shard}.tfrecord") for shard in range(3)]
    shape = (16, 16, 3)
    for shard, path in enumerate(files):
        with tf.io.TFRecordWriter(path) as writer:
            for index in range(7):
                # One colour per image: each is told apart, and its PNG is far smaller than its pixels.
                image = np.full(shape, rng.integers(0, 256, 3), dtype=np.uint8)
                writer.write(schema.serialize_example(png_bytes(image), index % 3, f"c/{shard}-{index}.png"))
    record_bytes = sum((tmp_path / f"train-{shard}.tfrecord").stat().st_size for shard in range(3))
    pixel_bytes = 21 * int(np.prod(shape))
    assert record_bytes < pixel_bytes

    def batches(cache_limit: int) -> list[tuple[np.ndarray, np.ndarray]]:
        dataset = input_fn(files, shape, 4, training=True, seed=7, images=21, cache_limit=cache_limit)
        # 40 batches of 4 span more than seven epochs of 21 records, reshuffled each epoch.
        return [(features[schema.IMAGE].numpy(), labels.numpy()) for features, labels in dataset.take(40)]

    pixels_cached = batches(pixel_bytes)
    for limit in (record_bytes, 0):  # the records cached (their pixels do not fit), then nothing
        for (images, labels), (expected_images, expected_labels) in zip(batches(limit), pixels_cached, strict=True):
            np.testing.assert_array_equal(labels, expected_labels)
            np.testing.assert_array_equal(images, expected_images)
    epochs = np.concatenate([labels for _, labels in pixels_cached])
    assert not np.array_equal(epochs[:21], epochs[21:42]), "every epoch should be shuffled anew"
