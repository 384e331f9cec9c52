"""Report pieces, charts and the leaderboard, on small data made here."""
import copy
import csv
import io
import json
import multiprocessing
import re

import numpy as np
import pytest
from PIL import Image

from pipeline import storage
from pipeline.index import INDEX_FOLDER, read_index, record
from pipeline.leaderboard import (BLESSING_KEY, BOARD_FILE, COLUMNS, LEADERBOARD_HTML, REPORT_KEY, ROW_KEY,
                                  board_of, empty_board, leaderboard_rows, read_board, rebuild_leaderboard, render_html, with_entry,
                                  write_board, write_table)
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
        charts={}, examples=[],
        blessing={"blessed": False, "reason": "failed: <b>", "checks": [
            {"metric": "<m>", "bound": "min", "limit": 0.5, "value": 0.25, "baseline": None, "result": "fail"}]},
        lineage="Download d1  results/<i>\n    sha256: 00")
    assert "<script>" not in page and "&lt;script&gt;" in page and "&lt;a&gt;" in page and "&lt;m&gt;" in page
    assert "0.5000" in page and "1.2500" in page and "No misclassified images." in page
    assert "<b>NOT BLESSED</b>" in page and "failed: &lt;b&gt;" in page and "&lt;m&gt; 0.2500 &lt; min 0.5" in page
    assert '<section id="lineage">' in page and "results/&lt;i&gt;" in page and "<i>" not in page


def evaluation(index: dict, run: str, accuracy: float, loss: float, report: str = "") -> None:
    """An evaluation's index entry with its leaderboard row, as Evaluate (and Report) record it."""
    index[f"Evaluate/e{run}"] = {"stage": "Evaluate", "version": f"e{run}",
                                 "path": f"ds/cnn-{run}/evaluate-test-e{run}",
                                 "completed_at": "2026-01-01T00:00:01+00:00", ROW_KEY: {
        "run": f"cnn-{run}", "model": "cnn", "dataset": "ds", "split": "test", "accuracy": accuracy, "loss": loss,
        "global_step": 10, "params": json.dumps({"lr": accuracy}), "max_steps": 10, "batch_size": 4,
        "tf_random_seed": 1, "train_version": run, "data_version": "c1", "evaluated_at": "2026-01-01T00:00:01+00:00",
        "report": report}}
    index[f"Train/{run}"] = {"stage": "Train", "version": run, "path": f"ds/cnn-{run}"}


def test_leaderboard_ranks_evaluations_best_first_from_the_index_alone(tmp_path):
    index = {}
    evaluation(index, "r1", 0.90, 0.30)
    evaluation(index, "r2", 0.95, 0.20, report="ds/cnn-r2/evaluate-test-er2/report.html")
    evaluation(index, "r3", 0.95, 0.10)

    rows = leaderboard_rows(board_of(index.values()))

    assert [(row["rank"], row["run"]) for row in rows] == [(1, "cnn-r3"), (2, "cnn-r2"), (3, "cnn-r1")]
    assert rows[1]["report"] == "ds/cnn-r2/evaluate-test-er2/report.html" and rows[0]["report"] == ""
    assert rows[0]["data_version"] == "c1" and rows[0]["params"] == '{"lr": 0.95}'


def test_leaderboard_files_are_written_from_the_index(tmp_path):
    results = tmp_path / "results"
    index = {}
    evaluation(index, "r1", 0.90, 0.30, report="ds/cnn-r1/evaluate-test-er1/report.html")
    evaluation(index, "r2", 0.80, 0.40)

    rebuild_leaderboard(results, index)

    table = read_csv(results / "leaderboard.csv")
    assert list(table[0]) == list(COLUMNS)
    assert [(row["run"], float(row["accuracy"])) for row in table] == [("cnn-r1", 0.9), ("cnn-r2", 0.8)]
    page = (results / "leaderboard.html").read_text()
    assert page.count("<tr>") == 3 and 'href="ds/cnn-r1/evaluate-test-er1/report.html"' in page


def test_leaderboard_shows_the_newest_verdict_and_links_the_lineage_in_the_newest_report(tmp_path):
    index = {}
    evaluation(index, "r1", 0.90, 0.30)
    evaluation(index, "r2", 0.80, 0.40)
    for version, blessed, at in (("b1", True, "01"), ("b2", False, "02")):  # thresholds changed, checked again
        index[f"Bless/{version}"] = {"stage": "Bless", "version": version, "completed_at": f"2026-01-02T00:00:{at}",
                                     BLESSING_KEY: {"evaluation": "Evaluate/er1", "blessed": blessed}}
    index["Report/p1"] = {"stage": "Report", "version": "p1", "completed_at": "2026-01-02T00:00:03",
                          REPORT_KEY: {"evaluation": "Evaluate/er1", "link": "ds/cnn-r1/report.html"}}

    rebuild_leaderboard(tmp_path, index)

    rows = {row["run"]: row for row in read_csv(tmp_path / "leaderboard.csv")}
    assert (rows["cnn-r1"]["blessed"], rows["cnn-r2"]["blessed"]) == ("no", "")
    assert rows["cnn-r1"]["lineage"] == "ds/cnn-r1/report.html#lineage" and rows["cnn-r2"]["lineage"] == ""
    assert 'href="ds/cnn-r1/report.html#lineage">lineage</a>' in (tmp_path / "leaderboard.html").read_text()


def test_leaderboard_links_a_report_only_by_a_relative_path(tmp_path):
    """The index is rebuilt from files lying among downloaded data: a planted link is shown, not followed."""
    links = {"r1": "ds/cnn-r1/report.html", "r2": "javascript:alert(1)", "r3": " JavaScript:alert(1)",
             "r4": "/etc/passwd", "r5": "../../elsewhere.html", "r6": "https://example.com/x", "r7": "//example.com/x"}
    index = {}
    for number, (run, link) in enumerate(links.items()):
        evaluation(index, run, 0.9 - number / 100, 0.1, report=link)

    page = render_html(leaderboard_rows(board_of(index.values())))

    assert sorted(re.findall(r'href="([^"]*)"', page)) == ["ds/cnn-r1/report.html", "leaderboard.csv"]
    assert "<td>javascript:alert(1)</td>" in page and "<td>../../elsewhere.html</td>" in page


def test_leaderboard_stays_right_with_200_runs_recorded_one_by_one(tmp_path):
    """As 200 runs' evaluations complete, each recorded in the index and put on the board as a
    stage does: every row, in order, and the board as a rebuild from the whole index makes it."""
    results, rng = tmp_path / "results", np.random.default_rng(4)
    folder = str(results / INDEX_FOLDER)
    scores = {f"r{number:03d}": (float(rng.integers(0, 1000)) / 1000, float(rng.random())) for number in range(200)}
    for run, (accuracy, loss) in scores.items():
        entries = {}
        evaluation(entries, run, accuracy, loss)
        for entry in entries.values():
            record(folder, entry, view=lambda: write_board(  # noqa: B023 - called at once
                str(results), with_entry(read_board(str(results)) or empty_board(), entry)))

    table = read_csv(results / "leaderboard.csv")
    expected = sorted(scores, key=lambda run: (-scores[run][0], scores[run][1], f"cnn-{run}"))
    assert [row["run"] for row in table] == [f"cnn-{run}" for run in expected]
    assert [int(row["rank"]) for row in table] == list(range(1, 201))
    index = read_index(folder)
    assert len(index) == 400 and read_board(str(results)) == board_of(index.values())
    # The pages rendered from the board read back are those of its rows.
    write_table(leaderboard_rows(read_board(str(results))), str(tmp_path / "rows.csv"), str(tmp_path / "rows.html"),
                "Leaderboard")
    assert (tmp_path / "rows.csv").read_text() == (results / "leaderboard.csv").read_text()


def record_runs(results: str, runs: list[str]) -> None:
    """Each run's evaluation recorded, and put on the board, as a stage does."""
    folder = storage.join(results, INDEX_FOLDER)
    for run in runs:
        entries = {}
        evaluation(entries, run, 0.5, 0.5)
        for entry in entries.values():
            record(folder, entry, view=lambda: write_board(  # noqa: B023 - called at once
                results, with_entry(read_board(results) or empty_board(), entry)))


def test_processes_recording_at_once_lose_no_entry_and_no_row(root):
    processes = [multiprocessing.get_context("spawn").Process(target=record_runs, args=(
        root, [f"p{process}r{run}" for run in range(12)])) for process in range(4)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=300)
    assert [process.exitcode for process in processes] == [0] * 4

    index = read_index(storage.join(root, INDEX_FOLDER))
    assert len(index) == 96 and read_board(root) == board_of(index.values())
    table = list(csv.DictReader(io.StringIO(storage.read_text(storage.join(root, "leaderboard.csv")))))
    assert sorted(row["run"] for row in table) == sorted(f"cnn-p{process}r{run}" for process in range(4)
                                                         for run in range(12))


def test_a_forget_cut_off_before_the_board_is_written_leaves_no_row_of_a_removed_run(tmp_path, luigi_config):
    """remove_versions forgets the versions in the index, then drops their rows from the board. Cut
    off between the two (here the page cannot be written; a Ctrl-C or an S3 error alike), the index
    is whole without them, and was never rebuilt: every later leaderboard would show the removed
    runs, linking what is gone."""
    results = str(tmp_path / "results")
    luigi_config({"layout": {"data_root": str(tmp_path / "data"), "results_root": results}})
    from tasks.base import load_board, remove_versions

    folder = storage.join(results, INDEX_FOLDER)
    for run, accuracy in (("r1", 0.9), ("r2", 0.8), ("r3", 0.7)):
        entries = {}
        evaluation(entries, run, accuracy, 0.1)
        for entry in map(copy.deepcopy, entries.values()):
            entry["path"] = storage.join(results, entry["path"])
            storage.write_bytes(storage.join(entry["path"], "done"), b"")
            # As a stage records it (see tasks.base: Stage._index).
            record(folder, entry, view=lambda: write_board(  # noqa: B023 - called at once
                results, with_entry(load_board(), entry)))
        if run == "r2":
            (tmp_path / "results" / LEADERBOARD_HTML).unlink()
            (tmp_path / "results" / LEADERBOARD_HTML).mkdir()  # the pages cannot be written for a while
            with pytest.raises(OSError):
                remove_versions([storage.join(results, "ds", "cnn-r1")])
            (tmp_path / "results" / LEADERBOARD_HTML).rmdir()

    index = read_index(folder)
    assert "Evaluate/er1" not in index and read_board(results) == board_of(index.values())
    assert "cnn-r1" not in (tmp_path / "results" / LEADERBOARD_HTML).read_text()


def test_a_row_put_on_the_board_by_a_stage_cut_off_before_its_index_file_goes_with_a_removal(tmp_path,
                                                                                             luigi_config):
    """A stage cut off between putting its row on the board and writing its index file, whose
    folder is then removed (a --rerun, or gc), is not in the index to be forgotten: its row goes
    with the next removal all the same."""
    results = str(tmp_path / "results")
    luigi_config({"layout": {"data_root": str(tmp_path / "data"), "results_root": results}})
    from tasks.base import load_board, remove_versions

    folder = storage.join(results, INDEX_FOLDER)
    entries = {}
    evaluation(entries, "r1", 0.9, 0.1)
    evaluation(entries, "r2", 0.8, 0.1)
    for entry in entries.values():
        if entry["version"] != "er2":
            record(folder, entry, view=lambda: write_board(  # noqa: B023 - called at once
                results, with_entry(load_board(), entry)))
    write_board(results, with_entry(load_board(), entries["Evaluate/er2"]))  # and no index file

    remove_versions([])

    board = read_board(results)
    assert "Evaluate/er2" not in board["rows"] and board == board_of(read_index(folder).values())


def test_a_planted_board_cannot_put_markup_on_the_leaderboard_page(tmp_path):
    """The board is a file in the results: anything that may write there (whoever may write the
    results bucket, a copied results folder) could plant one. It holds values, escaped as the pages
    are rendered; a board of rendered cells, as an earlier pipeline kept it, is not read as one."""
    results = tmp_path / "results"
    results.mkdir()
    script = "<script>alert(1)</script>"
    (results / BOARD_FILE).write_text(json.dumps({
        "rows": {"Evaluate/x": {"accuracy": 1.0, "loss": 0.0, "run": script, "model": script, "report": script}},
        "cells": {"Evaluate/x": [f"<td>{script}</td>", "x", "<td></td>", ""]}, "reports": {}}))
    assert read_board(str(results)) is None
    (results / BOARD_FILE).write_text(json.dumps({
        "rows": {"Evaluate/x": {"accuracy": 1.0, "loss": 0.0, "run": script, "model": script, "report": script}},
        "reports": {"Report/y": {"evaluation": "Evaluate/x", "link": '"><script>', "completed_at": script}},
        "blessings": {"Bless/z": {"evaluation": "Evaluate/x", "blessed": script, "completed_at": script}}}))
    entries = {}
    evaluation(entries, "r1", 0.9, 0.1)

    write_board(str(results), with_entry(read_board(str(results)), entries["Evaluate/er1"]))

    page = (results / LEADERBOARD_HTML).read_text()
    assert "<script>" not in page and page.count("&lt;script&gt;alert(1)&lt;/script&gt;") == 2
    assert page.count("<tr>") == 3 and 'href="&quot;&gt;&lt;script&gt;"' in page
    assert 'href="&quot;&gt;&lt;script&gt;#lineage"' in page
    [planted] = [row for row in read_csv(results / "leaderboard.csv") if row["run"] == script]
    assert planted["blessed"] == "no"  # only True blesses


def test_leaderboard_of_an_empty_index_has_no_rows(tmp_path):
    assert rebuild_leaderboard(tmp_path / "results", {}) == []
    assert read_csv(tmp_path / "results" / "leaderboard.csv") == []


def test_leaderboard_csv_escapes_cells_a_spreadsheet_would_run_and_keeps_numbers(tmp_path):
    index = {}
    evaluation(index, "r1", 0.90, -0.5)
    index["Evaluate/er1"][ROW_KEY].update(model="=1+2", dataset="-cmd", run="@SUM(A1)", split="\tx")

    rebuild_leaderboard(tmp_path, index)

    text = (tmp_path / "leaderboard.csv").read_text()
    [row] = read_csv(tmp_path / "leaderboard.csv")
    assert (row["model"], row["dataset"], row["run"], row["split"]) == ("'=1+2", "'-cmd", "'@SUM(A1)", "'\tx")
    assert row["loss"] == "-0.5" and ",-0.5," in text, "numbers stay numbers"
