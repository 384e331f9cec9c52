"""What a rerun repairs: a corrupt shard, rebuilt alone, the temporary files a crash left, and a
damaged index or one that missed a stage."""
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import luigi
import pytest

from pipeline.convert import report_name, shard_name
from pipeline.leaderboard import rebuild_leaderboard
from pipeline.storage import TEMP_INFIX, read_json
from pipeline.index import ENTRY_FILE, INDEX_FOLDER, read_index
from tasks import Convert, Download, Evaluate, RunAll, Train, base
from tests.conftest import (REPO, cli_sections, luigi_env, read_csv, run_tasks, run_watched, start_watched,
                            tiny_config, write_config)

pytestmark = pytest.mark.slow


def test_a_corrupt_shard_is_detected_by_name_and_rebuilt_alone(luigi_config, mnist_subset, tmp_path):
    luigi_config(tiny_config(tmp_path, mnist_subset.as_uri()))
    run_tasks(RunAll())
    metrics = read_json(Evaluate().marker)
    convert_dir = Path(Convert().directory)
    shard = convert_dir / shard_name("test", 0, 2)
    intact = shard.read_bytes()
    flipped = bytearray(intact)
    flipped[len(flipped) // 3] ^= 0x01
    shard.write_bytes(bytes(flipped))

    failures = []

    def record(task, error):
        failures.append(str(error))

    Evaluate.event_handler(luigi.Event.FAILURE)(record)
    try:
        assert not luigi.build([Evaluate(rerun=True)], local_scheduler=True, log_level="CRITICAL")
    finally:
        Evaluate._event_callbacks[Evaluate][luigi.Event.FAILURE].discard(record)
    [message] = failures
    assert f"{shard}: its sha256 is" in message and "the next run rebuilds it" in message
    assert not (convert_dir / report_name("test", 0, 2)).exists()

    assert run_tasks(Evaluate(rerun=True)) == ["Convert", "ConvertShard", "Evaluate"]
    assert shard.read_bytes() == intact
    assert read_json(Evaluate().marker) == metrics


def test_temporaries_left_by_a_crash_are_removed_by_the_next_run(luigi_config, mnist_subset, tmp_path):
    luigi_config(tiny_config(tmp_path, mnist_subset.as_uri()))
    download = Path(Download().directory)
    convert = Path(Convert().directory)
    run = Path(Train().directory)
    left = [download.parent / f"{download.name}{TEMP_INFIX}dead0001" / "tree" / "0" / "a.png",
            convert / f"{shard_name('train', 1, 2)}{TEMP_INFIX}dead0002",
            convert / f"metadata.json{TEMP_INFIX}dead0003",
            run / "model_dir" / "model.ckpt-6_temp" / "part-00000-of-00001.data-00000-of-00001",
            run / "model_dir" / "export" / "best" / "temp-1700000000" / "saved_model.pb",
            run / f"train.json{TEMP_INFIX}dead0004"]
    for path in left:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"partial")

    run_tasks(RunAll())

    assert [path for path in left if path.exists()] == []
    assert not (download.parent / f"{download.name}{TEMP_INFIX}dead0001").exists()
    assert not (run / "model_dir" / "model.ckpt-6_temp").exists()
    assert not (run / "model_dir" / "export" / "best" / "temp-1700000000").exists()
    assert read_json(Train().marker)["global_step"] == 12


def command(folder: Path, config: Path, module: str, *args: str) -> subprocess.CompletedProcess:
    """`python -m <module> args` (tasks.explain, tasks.gc) as a user runs it in `folder`."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=folder, capture_output=True, text=True,
                          env={**luigi_env(config), "PYTHONPATH": str(REPO)}, timeout=120)


def index_of(results: Path) -> dict | None:
    return read_index(str(results / INDEX_FOLDER))


def assert_linked_leaderboard(results: Path, rows: int) -> None:
    """The leaderboard has `rows` rows, each linking a report that exists."""
    board = read_csv(results / "leaderboard.csv")
    assert len(board) == rows and all(row["report"] and (results / row["report"]).is_file() for row in board), board


def completed_run(folder: Path, source_url: str) -> tuple[Path, Path, dict]:
    """The tiny pipeline run to its end by the real `luigi` command: its configuration file, results
    folder and index."""
    config = write_config(folder / "luigi.cfg", cli_sections(folder, source_url))
    first = run_watched(folder, config, "RunAll", "--local-scheduler")
    assert first.returncode == 0, first.output[-3000:]
    return config, folder / "results", index_of(folder / "results")


def test_a_damaged_or_missing_index_is_rebuilt_by_runs_explain_and_gc(mnist_subset, tmp_path):
    config, results, clean = completed_run(tmp_path, mnist_subset.as_uri())
    folder = results / INDEX_FOLDER
    [train] = [key for key in clean if key.startswith("Train/")]
    train_file = folder / f"{train}.json"
    assert len(clean) == 8

    shutil.rmtree(folder)
    (results / "leaderboard.json").unlink()
    again = run_watched(tmp_path, config, "RunAll", "--local-scheduler")
    assert again.returncode == 0, again.output[-3000:]
    assert index_of(results) == clean, "the rebuilt index differs from the one the runs wrote"
    assert_linked_leaderboard(results, 1)

    def spoil_index(damage: str | None) -> None:
        """A file of the index damaged, or the whole index missing (None)."""
        if damage is None:
            shutil.rmtree(folder)
        else:
            train_file.write_text(damage)

    for damage in ("[1, 2", '{"Train/x": 3}', None):  # not JSON, the wrong shape, missing
        spoil_index(damage)
        explained = command(tmp_path, config, "tasks.explain", "RunAll")
        assert explained.returncode == 0 and explained.stdout.endswith("0 of 16 tasks will run.\n"), \
            explained.stdout + explained.stderr
        assert index_of(results) == clean
        spoil_index(damage)
        listed = command(tmp_path, config, "tasks.gc")
        assert listed.returncode == 0 and "0 version(s)" in listed.stdout, listed.stdout + listed.stderr
        assert index_of(results) == clean
    (results / "leaderboard.json").write_text("[]")
    assert command(tmp_path, config, "tasks.gc", "--yes").returncode == 0
    assert_linked_leaderboard(results, 1)

    # Removed while a run records its stages: once its Evaluate is done, the others follow.
    finish = start_watched(tmp_path, config, "RunAll", "--local-scheduler", "--Evaluate-split", "validation")
    deadline = time.monotonic() + 240
    while not list(results.glob("tiny/*/evaluate-validation-*/metrics.json")) and time.monotonic() < deadline:
        time.sleep(0.05)
    shutil.rmtree(folder)
    ended = finish()
    assert ended.returncode == 0, ended.output[-3000:]
    index = index_of(results)
    added = sorted(index[key]["stage"] for key in set(index) - set(clean))
    assert added == ["Bless", "Evaluate", "Predict", "Report", "RunRecord"] and set(clean) <= set(index)
    assert_linked_leaderboard(results, 2)


def test_a_stage_completed_but_not_indexed_is_indexed_when_found(mnist_subset, tmp_path):
    """As after a kill between a stage's marker and its index update (or its entry file)."""
    config, results, clean = completed_run(tmp_path, mnist_subset.as_uri())
    folder = results / INDEX_FOLDER
    [report] = [key for key in clean if key.startswith("Report/")]

    def cut_off() -> None:
        """The index and leaderboard as if the Evaluate (killed after its entry file) and the Report
        (killed before its entry file) had never been indexed."""
        index = {key: entry for key, entry in clean.items() if not key.startswith(("Evaluate/", "Report/"))}
        for key in set(clean) - set(index):
            (folder / f"{key}.json").unlink()
        rebuild_leaderboard(str(results), index)
        Path(clean[report]["path"], ENTRY_FILE).unlink()
        assert read_csv(results / "leaderboard.csv") == []

    cut_off()
    explained = command(tmp_path, config, "tasks.explain", "RunAll")
    assert explained.returncode == 0 and explained.stdout.endswith("0 of 16 tasks will run.\n"), explained.stderr
    index = index_of(results)
    assert set(index) == set(clean) and index[report]["completed_at"] >= clean[report]["completed_at"]
    assert_linked_leaderboard(results, 1)

    cut_off()
    shutil.rmtree(folder)  # and then removed: the rebuild finds no Report entry file; the run indexes it
    again = run_watched(tmp_path, config, "RunAll", "--local-scheduler")
    assert again.returncode == 0, again.output[-3000:]
    index = index_of(results)
    assert set(index) == set(clean)
    assert {key: entry for key, entry in index.items() if key != report} == \
        {key: entry for key, entry in clean.items() if key != report}
    assert_linked_leaderboard(results, 1)


def test_versions_indexed_before_entry_files_get_theirs_when_taken_over_and_survive_a_rebuild(luigi_config,
                                                                                                  tmp_path):
    luigi_config(tiny_config(tmp_path, (tmp_path / "none.tar.gz").as_uri()))
    results, data = tmp_path / "results", tmp_path / "data"
    download = data / "raw" / "tiny" / "old1"
    download.mkdir(parents=True)
    (download / "download.json").write_text("{}")
    results.mkdir()
    (results / "sweep-oldc.csv").write_text("rank\n")
    # As an older pipeline indexed them: no marker, no entry file.
    legacy = {"Download/old1": {"stage": "Download", "version": "old1", "path": str(download)},
              "Comparison/oldc": {"stage": "Comparison", "version": "oldc", "path": str(results / "sweep-oldc.csv")},
              "Train/gone": {"stage": "Train", "version": "gone", "path": str(results / "tiny" / "cnn-gone")},
              "Renamed/r1": {"stage": "Renamed", "version": "r1", "path": str(results / "r1")}}
    (results / "index.json").write_text(json.dumps(legacy))

    assert set(base.load_index()) == set(legacy), "an older pipeline's index.json is taken over"

    assert read_json(download / ENTRY_FILE)["marker"] == str(download / "download.json")
    assert read_json(results / f".sweep-oldc{ENTRY_FILE}")["marker"] == str(results / "sweep-oldc.csv")
    assert not (results / "tiny").exists(), "no entry file is written for an output that is gone"
    assert "marker" not in index_of(results)["Renamed/r1"] and not (results / "index.json").exists()
    shutil.rmtree(results / INDEX_FOLDER)
    assert set(base.load_index()) == {"Download/old1", "Comparison/oldc"}
