"""What a completed stage costs the index and the leaderboard, with 10 runs and with 200.

Each completed stage records itself in results/index.json under its lock; an evaluation or a
report then rebuilds the leaderboard, from the index alone (no run's files are read). Both grow
with the number of runs only as the index does. Figures: seconds per completed evaluation and per
other stage, in milliseconds, at 200 runs against 10 (the baseline, measured in the same run).
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from common import REPEATS, report

from pipeline.index import INDEX_FILE, index_entry, update_index
from pipeline.leaderboard import ROW_KEY, rebuild_leaderboard

STAGES_PER_RUN = ("Download", "Convert", "Train", "Evaluate", "Predict", "Report", "RunRecord")


def entry(stage: str, run: int, results: Path) -> dict:
    found = index_entry(stage, f"{run:06d}", results / f"run-{run}" / stage.lower(),
                        {"params": {"learning_rate": run / 1000}, "upstream": {"train": f"{run:06d}"}},
                        dataset="bench", upstream=[f"Train/{run:06d}"])
    if stage == "Evaluate":
        found[ROW_KEY] = {"run": f"cnn-{run}", "model": "cnn", "dataset": "bench", "split": "test",
                          "accuracy": (run * 7919 % 1000) / 1000, "loss": 1 / (run + 1), "train_version": f"{run}"}
    return found


def per_stage_seconds(runs: int, repeats: int = 20) -> tuple[float, float]:
    """Median seconds to record one more evaluation (with the leaderboard) and one more other stage."""
    with tempfile.TemporaryDirectory() as folder:
        results = Path(folder)
        index_path = results / INDEX_FILE
        update_index(index_path, lambda index: index.update(
            {f"{stage}/{run:06d}": entry(stage, run, results) for run in range(runs) for stage in STAGES_PER_RUN}))
        evaluation, other = [], []
        for extra in range(runs, runs + repeats):
            start = time.perf_counter()
            update_index(index_path, lambda index: index.update(  # noqa: B023 - called at once
                {f"Evaluate/{extra:06d}": entry("Evaluate", extra, results)}),
                then=lambda index: rebuild_leaderboard(results, index))
            evaluation.append(time.perf_counter() - start)
            start = time.perf_counter()
            update_index(index_path, lambda index: index.update(  # noqa: B023 - called at once
                {f"Train/{extra:06d}": entry("Train", extra, results)}))
            other.append(time.perf_counter() - start)
        return statistics.median(evaluation), statistics.median(other)


def main() -> None:
    small, large = [], []
    for _ in range(REPEATS):
        small.append(per_stage_seconds(10))
        large.append(per_stage_seconds(200))
    report("ms per completed evaluation (index + leaderboard), 200 runs vs 10",
           [1000 * seconds for seconds, _ in large], [1000 * seconds for seconds, _ in small], "ms",
           "none; it grows with the index's size only")
    report("ms per other completed stage (index), 200 runs vs 10",
           [1000 * seconds for _, seconds in large], [1000 * seconds for _, seconds in small], "ms",
           "none; it grows with the index's size only")


if __name__ == "__main__":
    main()
