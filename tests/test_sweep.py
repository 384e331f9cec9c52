"""Experiments in one DAG: a Sweep through the real `luigi` command."""
from __future__ import annotations

import json
import re

import pytest

from pipeline.index import INDEX_FOLDER, read_index
from tests.conftest import cli_sections, read_csv, run_watched, write_config

pytestmark = pytest.mark.slow


def test_a_sweep_trains_every_variant_on_one_conversion_one_training_at_a_time(tmp_path, mnist_subset):
    config = write_config(tmp_path / "luigi.cfg", cli_sections(tmp_path, mnist_subset.as_uri()))

    result = run_watched(tmp_path, config, "Sweep", "--local-scheduler", "--workers", "2",
                         "--grid", '{"learning_rate": [0.001, 0.01]}', "--model-defs", '["cnn", "dnn"]')

    assert result.returncode == 0, result.output[-4000:]
    log = result.output
    assert log.count("started Download@") == 1 and log.count("started Convert@") == 1
    assert log.count("started Train@") == 4 and log.count("done    Evaluate@") == 4
    # [resources] train = 1: a Train starts only after the one before it is done.
    events = re.findall(r"^(started|done) +Train@", log, re.MULTILINE)
    assert events == ["started", "done"] * 4, events
    # What the sweep made is not said to be reused when it checks its runs again at the end.
    assert "reused  RunAll(" not in log and "reused  Train@" not in log, log[-3000:]
    results = tmp_path / "results"
    assert len(list(results.glob("tiny/*/evaluate-test-*/report-*/report.html"))) == 4
    assert len(list(results.glob("tiny/*/predict-*/predictions.csv"))) == 4
    [comparison] = results.glob("sweep-*.csv")
    rows = read_csv(comparison)
    assert len(rows) == 4 and comparison.with_suffix(".html").is_file()
    assert {(row["model"], json.loads(row["params"])["learning_rate"]) for row in rows} == {
        (model, rate) for model in ("cnn", "dnn") for rate in (0.001, 0.01)}
    ranked = [(-float(row["accuracy"]), float(row["loss"])) for row in rows]
    assert ranked == sorted(ranked) and [row["rank"] for row in rows] == ["1", "2", "3", "4"]
    # The run ends with each run's result, then, last, the comparison.
    summary = log[log.index("RESULT test accuracy"):]
    assert summary.count("RESULT test accuracy") == 4
    comparison_lines = summary[summary.index("SWEEP 4 runs, best first"):].splitlines()
    # Each run's row, then its verdict: luigi.cfg here sets no thresholds.
    assert len(comparison_lines) == 9 and all(" accuracy  " in line for line in comparison_lines[1::2])
    assert all(line.startswith("         NOT BLESSED: no thresholds set") for line in comparison_lines[2::2])

    # In the index, made from the four evaluations and their verdicts, so that gc sees what it needs.
    index = read_index(str(results / INDEX_FOLDER))
    [entry] = [entry for entry in index.values() if entry["stage"] == "Comparison"]
    assert entry["path"] == str(comparison) and len(entry["upstream"]) == 8
    assert sorted(index[key]["stage"] for key in entry["upstream"]) == ["Bless"] * 4 + ["Evaluate"] * 4

    # The same grid in another order is the same sweep, already done.
    again = run_watched(tmp_path, config, "Sweep", "--local-scheduler", "--grid", '{"learning_rate": [0.01, 0.001]}',
                        "--model-defs", '["dnn", "cnn"]')
    assert again.returncode == 0 and "SWEEP 4 runs" in again.output, again.output[-2000:]
    assert "started " not in again.output and "reused  Sweep(" in again.output, again.output[-2000:]


def test_a_grid_key_one_model_lacks_is_refused_before_anything_runs(tmp_path, mnist_subset):
    config = write_config(tmp_path / "luigi.cfg", cli_sections(tmp_path, mnist_subset.as_uri()))

    result = run_watched(tmp_path, config, "Sweep", "--local-scheduler", "--grid", '{"dense_units": [16, 32]}',
                         "--model-defs", '["cnn", "dnn"]')

    assert result.returncode == 40, result.output[-2000:]
    assert "--grid key 'dense_units' is not a param of model 'dnn' (dnn.py)" in result.output
    assert not (tmp_path / "data").exists()
