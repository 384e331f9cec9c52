"""Model files as users write them from the Estimator guides, through `RunAll` end to end: the
tutorial's `my_model`, and a layer-list model whose PARAMS hold TensorFlow functions."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.storage import read_json
from pipeline.index import INDEX_FOLDER, read_index
from tests.conftest import REPO, cli_sections, read_csv, run_watched, write_config

pytestmark = pytest.mark.slow

MODEL_FILES = REPO / "tests" / "model_files"


@pytest.fixture
def config(tmp_path, mnist_subset) -> Path:
    return write_config(tmp_path / "luigi.cfg", cli_sections(tmp_path, mnist_subset.as_uri()))


def run_all(folder: Path, config: Path, model_file: Path, params: str = "{}"):
    """RunAll with `model_file`; returns the output and the run folder it made."""
    def runs() -> set[Path]:
        return set((folder / "results" / "tiny").glob(f"{model_file.stem}-*/train.json"))

    before = runs()
    result = run_watched(folder, config, "RunAll", "--local-scheduler", "--Train-model-def", str(model_file),
                         "--Train-params", params)
    assert result.returncode == 0, result.output[-4000:]
    [train] = runs() - before
    return result, train.parent


def check_outputs(run: Path) -> dict:
    """metrics.json, the report and predictions.csv of one run, as any model gives them."""
    [metrics_path] = run.glob("evaluate-test-*/metrics.json")
    metrics = read_json(metrics_path)
    assert metrics["examples"] == 18 and sum(map(sum, metrics["confusion_matrix"])) == 18
    assert set(metrics["per_class"]) == {"0", "1", "2"} and 0 <= metrics["accuracy"] <= 1
    [report_path] = metrics_path.parent.glob("report-*/report.html")
    report = report_path.read_text()
    assert f"{metrics['accuracy']:.4f}" in report and report.count("data:image/png;base64,") >= 3
    [predictions] = run.glob("predict-*/predictions.csv")
    rows = read_csv(predictions)
    assert len(rows) == 18 and {"p_0", "p_1", "p_2"} <= set(rows[0])
    assert all(abs(sum(float(row[f"p_{c}"]) for c in "012") - 1) < 1e-4 for row in rows)
    from_csv = sum(row["true_label"] == row["predicted_label"] for row in rows) / len(rows)
    assert from_csv == pytest.approx(metrics["accuracy"], abs=1e-6), "Evaluate and Predict read the model alike"
    return metrics


def test_the_custom_estimator_tutorials_my_model_runs_end_to_end(tmp_path, config):
    _, run = run_all(tmp_path, config, MODEL_FILES / "tutorial_my_model.py")

    metrics = check_outputs(run)
    # Its EVAL spec has only loss and its own accuracy: reported under its own name.
    assert set(metrics["model_metrics"]) == {"accuracy"}
    params = read_json(run / "model_dir" / "params.json")
    assert params["hidden_units"] == [10, 10] and params["n_classes"] == 3 and "feature_columns" not in params


def test_a_layer_list_model_with_tensorflow_functions_in_params_runs_end_to_end(tmp_path, config):
    model_file = MODEL_FILES / "layer_list.py"
    _, run = run_all(tmp_path, config, model_file)

    metrics = check_outputs(run)
    assert metrics["model_metrics"] == {}, "its EVAL spec reports only the loss"
    layers = read_json(run / "model_dir" / "params.json")["layers"]
    assert [(layer.get("activation"), layer.get("regularizer")) for layer in layers] == [
        ("tf.nn.relu", "tf.nn.l2_loss"), (None, None), ("tf.nn.relu", "tf.nn.l2_loss")]

    # --params names a function the same way; it is a new version, recorded as given.
    tanh = [{"type": "fc", "units": 16, "activation": "tf.nn.tanh", "regularizer": "tf.nn.l2_loss"}]
    _, tanh_run = run_all(tmp_path, config, model_file, json.dumps({"layers": tanh}))
    assert tanh_run != run
    assert read_json(tanh_run / "model_dir" / "params.json")["layers"] == tanh
    [entry] = [entry for entry in read_index(str(tmp_path / "results" / INDEX_FOLDER)).values()
               if entry["stage"] == "Train" and entry["path"] == str(tanh_run)]
    assert entry["identity"]["params"]["params"] == {"layers": tanh}
    check_outputs(tanh_run)


def run_edited_layer_list(tmp_path: Path, config: Path, name: str, old: str, new: str):
    """RunAll on a copy of layer_list.py named `name`, with `old` replaced by `new`."""
    model_file = tmp_path / name
    source = (MODEL_FILES / "layer_list.py").read_text()
    assert old in source
    model_file.write_text(source.replace(old, new))
    return run_watched(tmp_path, config, "RunAll", "--local-scheduler", "--Train-model-def", str(model_file),
                       "--Train-params", "{}")


def test_a_model_whose_predictions_cannot_be_read_fails_before_training(tmp_path, config):
    result = run_edited_layer_list(tmp_path, config, "embedding_only.py",
                                   'predictions={"output": logits}', 'predictions={"embedding": net}')

    assert result.returncode == 30, result.output[-3000:]
    assert ("embedding_only.py: the PREDICT predictions are 'embedding' [2, 32]; expected class scores as "
            "'probabilities' or 'logits' shaped [batch, 3]") in result.output
    assert not list((tmp_path / "results").rglob("model.ckpt-*")), "no training step ran"


def test_a_lambda_in_params_is_refused_before_anything_runs(tmp_path, config):
    result = run_edited_layer_list(tmp_path, config, "lambda_activation.py", '"units": 32, "activation": tf.nn.relu',
                                   '"units": 32, "activation": lambda x: tf.nn.relu(x)')

    assert result.returncode == 40, result.output[-3000:]
    assert "lambda_activation.py: PARAMS['layers'][2]['activation'] is a lambda" in result.output
    assert not (tmp_path / "data").exists()
