"""Report pieces, charts and the leaderboard, on small data made here."""
import csv
import io

import numpy as np
import pytest
from PIL import Image

from pipeline.fileio import write_json_atomic
from pipeline.leaderboard import COLUMNS, leaderboard_rows, rebuild_leaderboard
from pipeline.plots import confusion_matrix_png, curves_png
from pipeline.report import misclassified, render_report
from tests.conftest import read_csv


def decoded(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


@pytest.mark.parametrize("n_classes", [10, 100])
def test_confusion_matrix_is_coloured_by_share_and_grows_with_the_classes(n_classes):
    names = [f"class-{i:03d}" for i in range(n_classes)]
    right = decoded(confusion_matrix_png(np.diag(np.arange(1, n_classes + 1) * 7), names, "all right"))
    spread = decoded(confusion_matrix_png(np.full((n_classes, n_classes), 5), names, "all spread"))
    height, width, _ = right.shape
    # Room for each label: at 100 classes, rows of at least 18 pixels (5-point labels).
    assert height >= 18 * n_classes and width > height

    def dark_blue(pixels):  # a share near 1, whatever the class's size; the colour bar is in both
        return int(((pixels[..., 2] > 100) & (pixels[..., 0] < 80)).sum())

    assert dark_blue(right) - dark_blue(spread) > 0.5 * (height / n_classes * 0.6) ** 2 * n_classes


def test_curves_are_drawn_on_one_chart_per_metric():
    png = curves_png("loss", {"train": [(1, 2.0), (50, 0.5), (100, 0.1)], "validation": [(50, 0.6), (100, 0.3)],
                              "test": [(100, 0.35)]})
    pixels = decoded(png)
    assert pixels.shape[:2] == (400, 700)
    colours = {tuple(colour) for colour in pixels.reshape(-1, 3)[::7]}
    assert {(31, 119, 180), (255, 127, 14)} <= colours, "matplotlib's first two line colours, one per series"


def test_misclassified_lists_the_most_confident_mistakes_first(tmp_path):
    path = tmp_path / "predictions.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["key", "true_label", "predicted_label", "predicted_id", "p_a", "p_b"])
        writer.writerow(["a/1.png", "a", "a", 0, "0.9", "0.1"])
        writer.writerow(["a/2.png", "a", "b", 1, "0.4", "0.6"])
        writer.writerow(["b/3.png", "b", "a", 0, "0.95", "0.05"])
        writer.writerow(["b/4.png", "b", "a", 0, "0.7", "0.3"])
    assert [(m["key"], m["probability"]) for m in misclassified(path, limit=2)] == [("b/3.png", 0.95), ("b/4.png", 0.7)]


def test_report_escapes_what_it_shows():
    page = render_report(
        title="<run>", train={"params": {"note": "<script>"}, "max_steps": 2, "batch_size": 1, "global_step": 2,
                              "run_config": {"tf_random_seed": 1}, "model_file": "m.py"},
        metrics={"split": "test", "accuracy": 0.5, "loss": 1.25, "examples": 2, "global_step": 2,
                 "checkpoint": "model.ckpt-2", "per_class": {"<a>": {"precision": 1.0, "recall": 0.5, "f1": 0.6667,
                                                                    "support": 2}},
                 "model_metrics": {"<m>": 0.25}},
        versions={"train": "abc"}, model_sha256="0" * 64, confusion_png=b"\x89PNG",
        charts={}, examples=[])
    assert "<script>" not in page and "&lt;script&gt;" in page and "&lt;a&gt;" in page and "&lt;m&gt;" in page
    assert "0.5000" in page and "1.2500" in page and "No misclassified images." in page


def _evaluation(results, index, run, accuracy, loss, *, report=False, keep=True):
    train_key, eval_key = f"train/{run}", f"evaluate/e{run}"
    run_dir = results / "ds" / f"cnn-{run}"
    eval_dir = run_dir / f"evaluate-test-e{run}"
    index[train_key] = {"stage": "train", "version": run, "dataset": "ds", "path": str(run_dir),
                        "params": {"model_def": "cnn", "params": {"lr": accuracy}, "max_steps": 10, "batch_size": 4,
                                   "tf_random_seed": 1},
                        "upstream": ["convert/c1"], "completed_at": "2026-01-01T00:00:00+00:00"}
    index[eval_key] = {"stage": "evaluate", "version": f"e{run}", "dataset": "ds", "path": str(eval_dir),
                       "params": {"split": "test"}, "upstream": [train_key, "convert/c1"],
                       "completed_at": "2026-01-01T00:00:01+00:00"}
    if keep:
        write_json_atomic(eval_dir / "metrics.json", {"split": "test", "accuracy": accuracy, "loss": loss,
                                                      "global_step": 10})
    if report:
        (eval_dir / "report.html").write_text("<html></html>")


def test_leaderboard_ranks_runs_best_first_and_skips_removed_ones(tmp_path):
    results = tmp_path / "results"
    index = {}
    _evaluation(results, index, "r1", 0.90, 0.30)
    _evaluation(results, index, "r2", 0.95, 0.20, report=True)
    _evaluation(results, index, "r3", 0.95, 0.10)
    _evaluation(results, index, "r4", 0.99, 0.01, keep=False)  # its folder was removed by Train --rerun

    rows = leaderboard_rows(index, results)

    assert [(row["rank"], row["run"]) for row in rows] == [(1, "cnn-r3"), (2, "cnn-r2"), (3, "cnn-r1")]
    assert rows[1]["report"] == "ds/cnn-r2/evaluate-test-er2/report.html" and rows[0]["report"] == ""
    assert rows[0]["data_version"] == "c1" and rows[0]["params"] == '{"lr": 0.95}'


def test_leaderboard_files_are_written_from_the_index(tmp_path):
    results = tmp_path / "results"
    index = {}
    _evaluation(results, index, "r1", 0.90, 0.30, report=True)
    _evaluation(results, index, "r2", 0.80, 0.40)
    write_json_atomic(results / "index.json", index)

    rebuild_leaderboard(results)

    table = read_csv(results / "leaderboard.csv")
    assert list(table[0]) == list(COLUMNS)
    assert [(row["run"], float(row["accuracy"])) for row in table] == [("cnn-r1", 0.9), ("cnn-r2", 0.8)]
    page = (results / "leaderboard.html").read_text()
    assert page.count("<tr>") == 3 and 'href="ds/cnn-r1/evaluate-test-er1/report.html"' in page


def test_leaderboard_of_an_empty_tree_has_no_rows(tmp_path):
    assert rebuild_leaderboard(tmp_path / "results") == []
    assert read_csv(tmp_path / "results" / "leaderboard.csv") == []
