"""What a completed stage costs the index and the leaderboard, with 10 runs and with 200.

Each completed stage writes its own file in the index (results/.index/<stage>/<version>.json),
without the index's lock; an evaluation or a report first puts its row on the leaderboard's board
(results/leaderboard.json) under that lock, and the two pages are rendered from the board alone
(no other entry, and no run's file, is read). Figures: milliseconds per completed evaluation and
per other stage, at 200 runs (BENCH_INDEX_RUNS) against 10 (the baseline, measured in the same
run); the goal is at most 2x, a cost flat in the number of runs.
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from common import REPEATS, report

from pipeline.index import COMPLETE, INDEX_FOLDER, entry_location, index_entry, key_of, load_index, record
from pipeline.leaderboard import ROW_KEY, board_of, empty_board, read_board, with_entry, write_board

RUNS = int(os.environ.get("BENCH_INDEX_RUNS", "200"))
BASELINE_RUNS = 10
# Stages recorded per measurement, of each kind.
RECORDED = int(os.environ.get("BENCH_INDEX_RECORDED", "20"))


STAGES_PER_RUN = ("Download", "Convert", "Train", "Evaluate", "Predict", "Report", "RunRecord")
# What each stage is made from, as the pipeline's stages are (see tasks/stages.py).
UPSTREAM = {"Download": (), "Convert": ("Download",), "Train": ("Convert",), "Evaluate": ("Train",),
            "Predict": ("Train",), "Report": ("Evaluate", "Predict"), "RunRecord": ("Evaluate", "Report", "Predict")}
MARKERS = {"Download": "download.json", "Convert": "metadata.json", "Train": "train.json", "Evaluate": "metrics.json",
           "Predict": "predictions.csv", "Report": "report.html", "RunRecord": "run.json"}
# A real entry's code identity names a hundred or so functions: its size is most of the entry's.
CODE = {f"pipeline.module:function_{number}": f"{number:016x}" for number in range(100)}


def entry(stage: str, run: int, results: Path) -> dict:
    """The index entry of `stage` in run `run`, each run a chain of its own from its download."""
    path = results / f"run-{run}" / stage.lower()
    found = index_entry(stage, f"{run:06d}", path,
                        {"params": {"learning_rate": run / 1000},
                         "upstream": {name.lower(): f"{run:06d}" for name in UPSTREAM[stage]}, "code": CODE},
                        dataset="bench", marker=str(path / MARKERS[stage]),
                        upstream=[f"{name}/{run:06d}" for name in UPSTREAM[stage]])
    if stage == "Evaluate":
        found[ROW_KEY] = {"run": f"cnn-{run}", "model": "cnn", "dataset": "bench", "split": "test",
                          "accuracy": (run * 7919 % 1000) / 1000, "loss": 1 / (run + 1), "train_version": f"{run}"}
    return found


def written_index(results: Path, runs: int) -> str:
    """The index of `runs` completed runs in `results`, written straight (recording each, flushed to
    disk, would make the setup the benchmark); returns its folder."""
    folder = str(results / INDEX_FOLDER)
    for run in range(runs):
        for stage in STAGES_PER_RUN:
            found = entry(stage, run, results)
            location = Path(entry_location(folder, key_of(found)))
            location.parent.mkdir(parents=True, exist_ok=True)
            location.write_text(json.dumps(found, indent=2, sort_keys=True))
    Path(folder, COMPLETE).touch()
    return folder


def recorded(folder: str, results: Path, found: dict) -> None:
    """`found` recorded as a completed stage records it (see tasks.base: Stage._index)."""
    record(folder, found, view=(lambda: write_board(str(results), with_entry(read_board(str(results)) or empty_board(),
                                                                            found))) if ROW_KEY in found else None)


def per_stage_seconds(runs: int) -> tuple[float, float]:
    """Median seconds to record one more evaluation (with the leaderboard) and one more other stage."""
    with tempfile.TemporaryDirectory() as temporary:
        results = Path(temporary)
        folder = written_index(results, runs)
        write_board(str(results), board_of(load_index(folder).values()))
        evaluation, other = [], []
        for extra in range(runs, runs + RECORDED):
            start = time.perf_counter()
            recorded(folder, results, entry("Evaluate", extra, results))
            evaluation.append(time.perf_counter() - start)
            start = time.perf_counter()
            recorded(folder, results, entry("Train", extra, results))
            other.append(time.perf_counter() - start)
        return statistics.median(evaluation), statistics.median(other)


def main() -> None:
    small, large = [], []
    for _ in range(REPEATS):
        small.append(per_stage_seconds(BASELINE_RUNS))
        large.append(per_stage_seconds(RUNS))
    report(f"ms per completed evaluation (index + leaderboard), {RUNS} runs vs {BASELINE_RUNS}",
           [1000 * seconds for seconds, _ in large], [1000 * seconds for seconds, _ in small], "ms",
           "<= 2.0, flat in the number of runs")
    report(f"ms per other completed stage (index), {RUNS} runs vs {BASELINE_RUNS}",
           [1000 * seconds for _, seconds in large], [1000 * seconds for _, seconds in small], "ms",
           "<= 2.0, flat in the number of runs")


if __name__ == "__main__":
    main()
