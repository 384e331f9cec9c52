"""How long `python -m tasks.lineage` takes to answer, on an index of 200 runs against one of 10.

The tree is bench/index.py's (each run a chain of seven stages, from its download to its run
record), with every marker written, so that the command does what it does on a real tree: it
loads the whole index (one file per version), finds the version holding the path given, and reads
the markers along its chain (and hashes the model file's copy). Figures: the whole command, as a
user waits for it (Python's start and imports included), for a predictions.csv's lineage and for
everything made from a download, at BENCH_LINEAGE_RUNS runs (200) against 10 (the baseline,
measured in the same run); the goal is an answer in under a second at 200 runs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import REPEATS, REPO, report, timed
from index import written_index

from pipeline.index import load_index

RUNS = int(os.environ.get("BENCH_LINEAGE_RUNS", "200"))
BASELINE_RUNS = 10
# What each stage's marker holds, as far as lineage reads it.
MARKERS = {"Download": {"source_url": "https://example.com/digits.tar.gz", "sha256": "0" * 64, "kind": "archive"},
           "Convert": {"splits": {split: {"shards": [{"file": f"{split}-{number:05d}-of-00004.tfrecord",
                                                      "records": 1000, "sha256": "1" * 64} for number in range(4)]}
                                  for split in ("train", "validation", "test")}},
           "Train": {"global_step": 1500, "model_file": "cnn.py", "export_dir": "export/1700000000"},
           "Evaluate": {"split": "test", "accuracy": 0.97, "loss": 0.1, "examples": 750, "global_step": 1500},
           "RunRecord": {"result": {"split": "test", "accuracy": 0.97}}}


def tree(folder: Path, runs: int) -> Path:
    """`runs` completed runs below `folder`, with their markers; returns the luigi.cfg naming them."""
    results = folder / "results"
    for found in load_index(written_index(results, runs)).values():
        marker = Path(found["marker"])
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps(MARKERS.get(found["stage"], {})))
        if found["stage"] == "Train":
            (marker.parent / "model_dir").mkdir()
            (marker.parent / "model_dir" / "model_def.py").write_bytes((REPO / "model_defs" / "cnn.py").read_bytes())
    config = folder / "luigi.cfg"
    config.write_text(f"[layout]\ndata_root = {folder / 'data'}\nresults_root = {results}\n")
    return config


def answer_seconds(runs: int) -> tuple[float, float]:
    """Seconds for the lineage of the last run's predictions, and for what was made from its download."""
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        config = tree(folder, runs)
        last = folder / "results" / f"run-{runs - 1}"

        def command(*args: str) -> float:
            return timed(lambda: subprocess.run([sys.executable, "-m", "tasks.lineage", *args], cwd=REPO, check=True,
                                                env={**os.environ, "LUIGI_CONFIG_PATH": str(config)},
                                                stdout=subprocess.DEVNULL))

        return command(str(last / "predict" / "predictions.csv")), command("--downstream", str(last / "download"))


def main() -> None:
    small, large = [], []
    for _ in range(REPEATS):
        small.append(answer_seconds(BASELINE_RUNS))
        large.append(answer_seconds(RUNS))
    for number, what in enumerate(("lineage of a predictions.csv", "--downstream of a download")):
        report(f"ms for `python -m tasks.lineage` ({what}), {RUNS} runs vs {BASELINE_RUNS}",
               [1000 * seconds[number] for seconds in large], [1000 * seconds[number] for seconds in small], "ms",
               f"under 1000 ms at {RUNS} runs")


if __name__ == "__main__":
    main()
