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
