"""Batch prediction from the records: the pixels signature, and exports made before it existed."""
import numpy as np
import tensorflow as tf

from pipeline import convert, models, prediction, schema, training
from pipeline.storage import read_json
from tests.conftest import read_csv
from tests.test_convert import converted_images

SHAPE = [6, 6, 1]
RUN_CONFIG = {"tf_random_seed": 3, "save_summary_steps": 5, "save_checkpoints_steps": 5,
              "keep_checkpoint_max": 1, "log_step_count_steps": 5}


def probabilities(rows):
    return np.array([[float(row[f"p_{name}"]) for name in ("a", "b")] for row in rows])


def test_records_are_predicted_alike_through_either_signature(tmp_path):
    out, metadata = converted_images(tmp_path, per_class=9, test_fraction=0.4, image_size=6)
    run_dir = tmp_path / "run"
    summary = training.train_model(models.resolve_model_file("cnn"), {"conv_filters": [2], "dense_units": 4}, out,
                                   out / "metadata.json", run_dir, run_dir / "train.json", max_steps=5,
                                   batch_size=4, run_config=RUN_CONFIG)
    export_dir = run_dir / summary["export_dir"]
    assert set(tf.saved_model.load(str(export_dir)).signatures) == {
        tf.saved_model.DEFAULT_SERVING_SIGNATURE_DEF_KEY, schema.PIXELS_SIGNATURE}

    def receiver_without_pixels():
        receiver = schema.serving_input_receiver_fn(SHAPE)()
        return tf.estimator.export.ServingInputReceiver(receiver.features, receiver.receiver_tensors)

    older_export = training.build_estimator(run_dir / training.MODEL_DIR).export_saved_model(
        str(tmp_path / "older"), receiver_without_pixels).decode()

    count = prediction.predict_to_csv(export_dir, metadata, tmp_path / "pixels.csv", convert_dir=out, batch_size=3)
    prediction.predict_to_csv(older_export, metadata, tmp_path / "bytes.csv", convert_dir=out, batch_size=3)

    by_pixels, by_bytes = read_csv(tmp_path / "pixels.csv"), read_csv(tmp_path / "bytes.csv")
    assert count == len(by_pixels) == metadata["splits"]["test"]["count"] > 3
    expected_keys = {key for shard in read_json(out / convert.PLAN_FILE)["shards"]["test"] for key, _ in shard}
    assert {row["key"] for row in by_pixels} == expected_keys
    assert [row["key"] for row in by_bytes] == [row["key"] for row in by_pixels]
    assert all(row["true_label"] == row["key"].split("/")[0] for row in by_pixels)
    np.testing.assert_allclose(probabilities(by_pixels), probabilities(by_bytes), atol=2e-6)
    np.testing.assert_allclose(probabilities(by_pixels).sum(axis=1), 1.0, atol=1e-4)
