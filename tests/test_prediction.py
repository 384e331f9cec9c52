"""Batch prediction from the records: the pixels signature, and exports made before it existed."""
import numpy as np
import tensorflow as tf

from pipeline import convert, models, prediction, schema, training
from pipeline.estimator import build_estimator
from pipeline.runfiles import MODEL_DIR
from pipeline.report import misclassified
from pipeline.storage import read_json
from tests.conftest import read_csv
from tests.test_convert import converted_images, write_all_shards, write_images

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

    older_export = build_estimator(run_dir / MODEL_DIR).export_saved_model(
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


def test_class_names_a_spreadsheet_would_run_are_escaped_and_read_back(tmp_path):
    classes = ("=1+2", "@SUM(A1)")
    raw = write_images(tmp_path / "raw", per_class=6, classes=classes)
    out = tmp_path / "tfrecords"
    reports = write_all_shards(raw, out, test_fraction=0.5, num_shards=1, image_size=6, channels=1)
    metadata = convert.finalize_conversion(out, reports, out / "metadata.json", image_size=6, channels=1,
                                           max_bad_fraction=0.0, source={})
    run_dir = tmp_path / "run"
    summary = training.train_model(models.resolve_model_file("cnn"), {"conv_filters": [2], "dense_units": 4}, out,
                                   out / "metadata.json", run_dir, run_dir / "train.json", max_steps=2,
                                   batch_size=4, run_config=RUN_CONFIG)

    prediction.predict_to_csv(run_dir / summary["export_dir"], metadata, tmp_path / "predictions.csv",
                              convert_dir=out, batch_size=3)

    rows = read_csv(tmp_path / "predictions.csv")
    assert list(rows[0])[-2:] == ["p_=1+2", "p_@SUM(A1)"]
    assert {row["true_label"] for row in rows} == {"'=1+2", "'@SUM(A1)"}
    assert all(row["key"].startswith(("'=1+2/", "'@SUM(A1)/")) for row in rows)
    assert {row["predicted_label"] for row in rows} <= {"'=1+2", "'@SUM(A1)"}
    # The report reads the names back as they were: every test image is one of the two classes.
    wrong = misclassified(str(tmp_path / "predictions.csv"), limit=100)
    expected = [row for row in rows if row["true_label"] != row["predicted_label"]]
    assert len(wrong) == len(expected) > 0, "two steps of training leave mistakes to read back"
    assert all(item["key"].split("/")[0] == item["true_label"] != item["predicted_label"] and
               {item["true_label"], item["predicted_label"]} == set(classes) for item in wrong)
