"""The TFRecord feature schema, shared by conversion, `input_fn`, the serving receiver and prediction.

A record holds one image already normalised by conversion (size and channels of the dataset)
as PNG or JPEG bytes, its integer label and its key (`<class>/<file>` inside the raw folder). A
model's `features` are `{IMAGE: float32 [batch, height, width, channels] in [0, 1]}`.
"""
from __future__ import annotations

from typing import Sequence

import tensorflow as tf

ENCODED = "image/encoded"
LABEL = "image/label"
KEY = "image/key"

FEATURE_SPEC = {
    ENCODED: tf.io.FixedLenFeature([], tf.string),
    LABEL: tf.io.FixedLenFeature([], tf.int64),
    KEY: tf.io.FixedLenFeature([], tf.string),
}

# The name of the image in a model's features and of the serving signature's input.
IMAGE = "image"
SERVING_INPUT = "image_bytes"
# A second signature of every export takes the model's features directly (`IMAGE`: float32 in
# [0, 1]), skipping the per-image decode of the default one. Estimator names a receiver
# alternative's signature "<alternative>:<export output key>".
PIXELS_SIGNATURE = "pixels:serving_default"


def serialize_example(encoded: bytes, label: int, key: str) -> bytes:
    feature = {
        ENCODED: tf.train.Feature(bytes_list=tf.train.BytesList(value=[encoded])),
        LABEL: tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
        KEY: tf.train.Feature(bytes_list=tf.train.BytesList(value=[key.encode("utf-8")])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def parse_example(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    return tf.io.parse_single_example(serialized, FEATURE_SPEC)


def decode_stored_pixels(encoded: tf.Tensor, image_shape: Sequence[int]) -> tf.Tensor:
    """Decode a stored image (PNG or JPEG, see `pipeline.convert.IMAGE_FORMATS`), which conversion
    already brought to `image_shape`, as uint8 pixels.

    One op reads both: the format is told by the bytes, so records need not say it, and a
    conversion may mix the two. It decodes PNG pixel for pixel as decode_png did, and JPEG as
    decode_jpeg does by default, deterministically (asking decode_jpeg for INTEGER_FAST gave the
    same pixels and no gain on 128-px photos: it is already what the default means).
    """
    decoded = tf.io.decode_image(encoded, channels=image_shape[-1], expand_animations=False)
    return tf.ensure_shape(decoded, image_shape)


def decodes(encoded: bytes, channels: int) -> bool:
    """Whether `decode_stored_pixels` reads `encoded` (at its own size). It runs the same kernel,
    called as the raw op: tf.io.decode_image's wrapper and ensure_shape added a third to the time
    of checking a 128-px photo."""
    try:
        tf.raw_ops.DecodeImage(contents=encoded, channels=channels, expand_animations=False)
    except tf.errors.InvalidArgumentError:
        return False
    return True


def scale_pixels(pixels: tf.Tensor) -> tf.Tensor:
    """uint8 pixels (one image or a batch) as the model's float32 input in [0, 1]."""
    return tf.cast(pixels, tf.float32) / 255.0


def decode_any_image(encoded: tf.Tensor, image_shape: Sequence[int]) -> tf.Tensor:
    """Decode PNG, JPEG, GIF or BMP bytes of any size into `image_shape` floats in [0, 1]."""
    image = tf.io.decode_image(encoded, channels=image_shape[-1], expand_animations=False)
    image = tf.image.resize(tf.cast(image, tf.float32) / 255.0, image_shape[:2])
    return tf.ensure_shape(image, image_shape)


def parse_training_example(serialized: tf.Tensor, image_shape: Sequence[int]) -> tuple[tf.Tensor, tf.Tensor]:
    """(uint8 pixels, label) of one record; `scale_pixels` turns pixels into the model's input."""
    parsed = parse_example(serialized)
    return decode_stored_pixels(parsed[ENCODED], image_shape), parsed[LABEL]


def serving_input_receiver_fn(image_shape: Sequence[int]):
    """A receiver whose default signature takes a batch of encoded image bytes under `SERVING_INPUT`,
    and whose `PIXELS_SIGNATURE` takes decoded images under `IMAGE`."""
    image_shape = list(image_shape)

    def receiver() -> tf.estimator.export.ServingInputReceiver:
        encoded = tf.compat.v1.placeholder(tf.string, shape=[None], name=SERVING_INPUT)
        images = tf.map_fn(lambda one: decode_any_image(one, image_shape), encoded,
                           fn_output_signature=tf.TensorSpec(image_shape, tf.float32))
        return tf.estimator.export.ServingInputReceiver(
            {IMAGE: images}, {SERVING_INPUT: encoded},
            receiver_tensors_alternatives={PIXELS_SIGNATURE.split(":")[0]: {IMAGE: images}})

    return receiver
