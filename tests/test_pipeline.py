"""End to end: the whole DAG into tmp_path, reruns, the luigi command, and the default configuration."""
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from pipeline.storage import read_json
from pipeline.index import INDEX_FOLDER, read_index
from tasks import Convert, Evaluate, Predict, Report, RunAll, Train
from tests.conftest import REPO, luigi_command, read_csv, repo_config, run_tasks, tiny_config, write_config

pytestmark = pytest.mark.slow

CONVERT_STEPS = ["ConvertShard"] * 6 + ["Convert", "PlanConversion"]


def test_run_all_writes_every_stage_and_reruns_only_what_changed(luigi_config, mnist_subset, tmp_path):
    config = tiny_config(tmp_path, mnist_subset.as_uri())
    luigi_config(config)

    assert run_tasks(RunAll()) == sorted(["Download", *CONVERT_STEPS, "Train", "Evaluate", "Predict", "Report",
                                          "Bless", "RunRecord"])

    train = Train()
    model_dir = Path(train.directory) / "model_dir"
    assert (model_dir / "model_def.py").read_bytes() == (REPO / "model_defs" / "cnn.py").read_bytes()
    assert read_json(model_dir / "params.json")["conv_filters"] == [8]
    assert read_json(model_dir / "params.json")["n_classes"] == 3
    assert read_json(model_dir / "run_config.json")["tf_random_seed"] == 1
    assert read_json(model_dir / "versions.json")["tensorflow"].startswith("2.15.")
    assert list(model_dir.glob("events.out.tfevents.*")) and list((model_dir / "eval_test").glob("events.*"))
    marker = read_json(train.marker)
    assert marker["global_step"] == 12
    assert (Path(train.directory) / marker["export_dir"] / "saved_model.pb").is_file()

    metadata = read_json(Convert().marker)
    metrics = read_json(Evaluate().marker)
    assert metrics["global_step"] == 12 and metrics["examples"] == metadata["splits"]["test"]["count"] == 18
    assert set(metrics["per_class"]) == {"0", "1", "2"} and 0.0 <= metrics["accuracy"] <= 1.0
    assert sum(map(sum, metrics["confusion_matrix"])) == 18
    assert Image.open(Path(Evaluate().directory) / "confusion_matrix.png").size[0] > 100

    rows = read_csv(Predict().marker)
    assert len(rows) == 18 and set(rows[0]) == {"key", "true_label", "predicted_label", "predicted_id",
                                                "p_0", "p_1", "p_2"}
    assert all(abs(sum(float(r[f"p_{c}"]) for c in "012") - 1) < 1e-4 for r in rows)
    accuracy_from_csv = sum(r["true_label"] == r["predicted_label"] for r in rows) / len(rows)
    assert accuracy_from_csv == pytest.approx(metrics["accuracy"], abs=1e-6)

    index = read_index(str(tmp_path / "results" / INDEX_FOLDER))
    assert sorted(entry["stage"] for entry in index.values()) == sorted(
        ["Download", "Convert", "Train", "Evaluate", "Predict", "Report", "Bless", "RunRecord"])
    assert index[f"Train/{train.version}"]["upstream"] == [f"Convert/{Train().convert.version}"]
    report = Path(Report().marker)
    assert report.parent == Path(Evaluate().directory) / f"report-{Report().version}" and report.name == "report.html"
    assert f"{metrics['accuracy']:.4f}" in report.read_text()
    board = read_csv(tmp_path / "results" / "leaderboard.csv")
    assert [(row["run"], row["report"]) for row in board] == [
        (Path(train.directory).name, str(report.relative_to(tmp_path / "results")))]

    # Nothing changed: nothing runs.
    assert run_tasks(RunAll()) == []

    # --rerun of one stage runs that stage alone and leaves its upstream as it was.
    convert_marker_time = Path(Convert().marker).stat().st_mtime_ns
    assert run_tasks(Train(rerun=True)) == ["Train"]
    assert Path(Convert().marker).stat().st_mtime_ns == convert_marker_time
    assert read_json(Train().marker)["global_step"] == 12

    # A params change reruns training and what reads it, in new folders beside the old ones.
    config["Train"]["params"] = '{"conv_filters": [8], "dense_units": 24}'
    luigi_config(config)
    assert run_tasks(RunAll()) == ["Bless", "Evaluate", "Predict", "Report", "RunRecord", "Train"]
    assert Path(Train().directory) != Path(train.directory) and Path(train.marker).exists()
    # The rerun above removed the first run's evaluation with its old weights.
    second_run = Path(Train().directory).name
    assert [row["run"] for row in read_csv(tmp_path / "results" / "leaderboard.csv")] == [second_run]

    metadata_version = Convert().version
    # A convert change reruns conversion and everything after it, not the download.
    config["Convert"]["split_seed"] = "8"
    luigi_config(config)
    assert run_tasks(RunAll()) == sorted([*CONVERT_STEPS, "Train", "Evaluate", "Predict", "Report", "Bless",
                                          "RunRecord"])
    board = read_csv(tmp_path / "results" / "leaderboard.csv")
    assert sorted(row["run"] for row in board) == sorted([second_run, Path(Train().directory).name])
    assert {row["data_version"] for row in board} == {metadata_version, Convert().version}
    ranked = [(-float(row["accuracy"]), float(row["loss"])) for row in board]
    assert ranked == sorted(ranked) and [row["rank"] for row in board] == ["1", "2"]


def test_predict_on_a_folder_of_new_images(luigi_config, mnist_subset, tmp_path):
    luigi_config(tiny_config(tmp_path, mnist_subset.as_uri()))
    run_tasks(Train())
    raw = Path(Train().convert.download.directory)
    new = tmp_path / "new" / "nested"
    new.mkdir(parents=True)
    shutil.copy(raw / "1" / sorted(os.listdir(raw / "1"))[0], new / "one.png")
    Image.open(raw / "0" / sorted(os.listdir(raw / "0"))[0]).convert("RGB").resize((56, 56)).save(
        new / "zero_big.jpg")
    (new / "notes.txt").write_text("not an image")

    assert run_tasks(Predict(input_dir=str(tmp_path / "new"))) == ["Predict"]

    rows = read_csv(Path(Predict(input_dir=str(tmp_path / "new")).marker))
    assert [r["path"] for r in rows] == ["nested/one.png", "nested/zero_big.jpg"]
    assert all(r["true_label"] == "" and r["predicted_label"] in {"0", "1", "2"} for r in rows)


def test_luigi_command_runs_shards_in_parallel_and_exits_non_zero_on_failure(mnist_subset, tmp_path):
    sections = tiny_config(tmp_path, mnist_subset.as_uri())
    sections["retcode"] = repo_config()["retcode"]
    config_path = write_config(tmp_path / "luigi.cfg", sections)

    first = luigi_command(tmp_path, config_path, "RunAll", "--workers", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "6 ConvertShard" in first.stderr
    again = luigi_command(tmp_path, config_path, "RunAll")
    assert again.returncode == 0 and "Did not run any tasks" in again.stderr

    unknown_model = luigi_command(tmp_path, config_path, "RunAll", "--Train-model-def", "resnet")
    assert unknown_model.returncode != 0
    assert "model_def='resnet'" in unknown_model.stderr and "cnn" in unknown_model.stderr
    zero_steps = luigi_command(tmp_path, config_path, "Train", "--max-steps", "0")
    assert zero_steps.returncode != 0 and "max_steps=0; expected a positive integer" in zero_steps.stderr

    described = luigi_command(tmp_path, config_path, "Train", "--help")
    assert "Global step to train to" in described.stdout and "JSON object laid over" in described.stdout


def test_default_configuration_reaches_the_accuracy_target(luigi_config, tmp_path):
    """The embedded MNIST sample with luigi.cfg's settings, as `make run` runs it."""
    sections = repo_config()
    sections["layout"] = {"data_root": str(tmp_path / "data"), "results_root": str(tmp_path / "results")}
    sections["Download"]["source_url"] = (REPO / "data" / "mnist_5k.tar.gz").as_uri()
    luigi_config(sections)

    run_tasks(RunAll())

    metrics = read_json(Evaluate().marker)
    assert metrics["examples"] == 750
    assert metrics["accuracy"] >= 0.95
