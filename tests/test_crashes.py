"""Crash trials: SIGKILL the real `luigi` command at a random point inside a stage, then rerun it.

After every kill, no stage may look complete with partial output; the rerun must finish, leave
no temporary files, and produce what an uninterrupted run produces: the same TFRecords, and the
same metrics for the checkpoint it evaluated. Training must resume from its last checkpoint.

Each trial runs with both roots in a local folder and again with both on S3 (a real S3 server on
127.0.0.1), where nothing is renamed and only markers, written last, vouch for a folder.

CI runs one trial per stage locally, and on S3 one per stage that writes there in a way of its
own: Download (a folder uploaded file by file), ConvertShard and Train (checkpoints and exports
through tensorflow-io). Evaluate and Predict write single files, each one PUT, as every marker is
written. `CRASH_TRIALS=N make test PYTEST_ARGS=tests/test_crashes.py` runs N per stage on both
roots (`make crash-trials` runs 5, 50 in all); each trial prints where its kill landed.
"""
from __future__ import annotations

import csv
import io
import os
import random
import re
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline import storage
from pipeline.convert import SPLITS, shard_paths
from pipeline.datafiles import visible_keys
from pipeline.storage import TEMP_INFIX, join, read_json, sha256_file
from tests.conftest import FileServer, luigi_argv, luigi_command, luigi_env, repo_config, tiny_config, write_config

pytestmark = pytest.mark.slow

# Seconds after a stage starts within which its kill is drawn: about how long the stage runs here.
STAGE_WINDOWS = {"Download": 1.2, "ConvertShard": 4.0, "Train": 9.0, "Evaluate": 3.5, "Predict": 3.5}
TRIALS_PER_STAGE = int(os.environ.get("CRASH_TRIALS", "1"))
TRAIN_STEPS = 200


def crash_config(folder: Path, source_url: str, root: str) -> Path:
    sections = tiny_config(folder, source_url)
    sections["layout"] = {"data_root": join(root, "data"), "results_root": join(root, "results")}
    # Long enough to be killed inside training, between checkpoints and while saving one.
    sections["Train"].update(max_steps=str(TRAIN_STEPS), save_checkpoints_steps="25", keep_checkpoint_max="3")
    sections["retcode"] = repo_config()["retcode"]
    return write_config(folder / "luigi.cfg", sections)


@pytest.fixture(scope="module")
def slow_source(mnist_subset):
    """The subset served over HTTP slowly enough that a kill can land inside Download."""
    with FileServer() as server:
        server.files["/subset.tar.gz"] = mnist_subset.read_bytes()
        server.slow = True
        yield server, server.url("/subset.tar.gz")


@dataclass
class Outputs:
    shards: dict[str, str]
    metrics: dict
    predictions: list[dict]
    global_step: int
    folder: str


def read_rows(location: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(storage.read_text(location), newline="")))


def collect(root: str) -> Outputs:
    [metadata_path] = storage.glob(join(root, "data", "tfrecords", "*", "*", "metadata.json"))
    metadata = read_json(metadata_path)
    [train_marker] = storage.glob(join(root, "results", "*", "*", "train.json"))
    run = storage.parent(train_marker)
    [metrics_path] = storage.glob(join(run, "evaluate-*", "metrics.json"))
    [predictions] = storage.glob(join(run, "predict-*", "predictions.csv"))
    shards = {shard["file"]: shard["sha256"] for split in SPLITS for shard in metadata["splits"][split]["shards"]}
    return Outputs(shards, read_json(metrics_path), read_rows(predictions), read_json(train_marker)["global_step"], run)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, slow_source):
    folder = tmp_path_factory.mktemp("reference")
    result = luigi_command(folder, crash_config(folder, slow_source[1], str(folder)), "RunAll")
    assert result.returncode == 0, result.stderr[-3000:]
    return collect(str(folder))


def leftovers(root: str) -> list[str]:
    # Ours carry TEMP_INFIX; TensorFlow's are model.ckpt-N_temp and, for an export, temp-<timestamp>.
    return [key for key in visible_keys(root)
            if any(TEMP_INFIX in part or re.search(r"_temp\b|^temp-\d+$", part) for part in key.split("/"))]


def check_nothing_partial_is_complete(root: str) -> None:
    """Every marker written vouches for complete output."""
    for report in storage.glob(join(root, "data", "tfrecords", "*", "*", "*-of-*.json")):
        shard = report.removesuffix(".json") + ".tfrecord"
        assert sha256_file(shard) == read_json(report)["sha256"], f"{report} vouches for a partial shard"
    for metadata_path in storage.glob(join(root, "data", "tfrecords", "*", "*", "metadata.json")):
        metadata = read_json(metadata_path)
        for split in SPLITS:
            shard_paths(storage.parent(metadata_path), metadata, split)
    for marker in storage.glob(join(root, "data", "raw", "*", "*", "download.json")):
        counts = read_json(marker)["images_per_class"]
        assert {c: len(visible_keys(join(storage.parent(marker), c))) for c in counts} == counts
    for marker in storage.glob(join(root, "results", "*", "*", "train.json")):
        assert storage.exists(join(storage.parent(marker), read_json(marker)["export_dir"], "saved_model.pb"))
    for marker in storage.glob(join(root, "results", "*", "*", "evaluate-*", "metrics.json")):
        assert storage.exists(join(storage.parent(marker), "confusion_matrix.png"))
        assert "accuracy" in read_json(marker)
    for marker in storage.glob(join(root, "results", "*", "*", "predict-*", "predictions.csv")):
        assert len(read_rows(marker)) == 18


def latest_checkpoint_step(root: str) -> int | None:
    """The step of the newest checkpoint the `checkpoint` file names, after checking it loads; on S3,
    that its index is there (reading it with TensorFlow would load the S3 plugin into this process,
    which then aborts at exit)."""
    checkpoint_files = storage.glob(join(root, "results", "*", "*", "model_dir", "checkpoint"))
    if not checkpoint_files:
        return None
    latest = re.search(r'^model_checkpoint_path: "(.+)"', storage.read_text(checkpoint_files[0]), re.MULTILINE)
    path = join(storage.parent(checkpoint_files[0]), latest.group(1))
    if storage.is_remote(root):
        assert storage.exists(f"{path}.index"), f"the checkpoint file names {path}, which is missing"
        return int(path.rsplit("-", 1)[1])
    import tensorflow as tf

    return int(tf.train.load_checkpoint(path).get_tensor("global_step"))


def kill_inside(folder: Path, config: Path, stage: str, delay_s: float, workers: int) -> tuple[str, str]:
    """Start RunAll, SIGKILL its process group `delay_s` after `stage` starts; return (log, running stage)."""
    log_path = folder / "killed.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(luigi_argv("RunAll", "--local-scheduler", "--workers", str(workers)), cwd=folder,
                                   env=luigi_env(config), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    started = re.compile(rf"running\s+{stage}\(")
    deadline = time.monotonic() + 300
    while not started.search(log_path.read_text()):
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{stage} never started:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.01)
    time.sleep(delay_s)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    text = log_path.read_text()
    running = {m.group(1) for m in re.finditer(r"running\s+(\w+)\(", text)}
    done = {m.group(1) for m in re.finditer(r"done\s+(\w+)\(", text)}
    return text, ",".join(sorted(running - done)) or "between stages"


S3_STAGES = ("Download", "ConvertShard", "Train") if TRIALS_PER_STAGE == 1 else tuple(STAGE_WINDOWS)
TRIALS = [(kind, stage, trial) for kind, stages in (("local", STAGE_WINDOWS), ("s3", S3_STAGES))
          for stage in stages for trial in range(TRIALS_PER_STAGE)]


@pytest.fixture
def root(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path)
    return request.getfixturevalue("s3_server").uri(f"crash-{uuid.uuid4().hex[:8]}")


@pytest.mark.parametrize("root, stage, trial", TRIALS, indirect=["root"])
def test_killed_run_resumes_to_the_uninterrupted_result(stage, trial, root, reference, slow_source, tmp_path):
    rng = random.Random(f"{stage}/{trial}/{os.environ.get('CRASH_SEED', '')}")
    delay_s = rng.uniform(0.0, STAGE_WINDOWS[stage])
    workers = rng.choice([1, 2])
    config = crash_config(tmp_path, slow_source[1], root)

    _, landed = kill_inside(tmp_path, config, stage, delay_s, workers)
    print(f"trial {stage}/{trial} on {root}: killed {delay_s:.2f} s into {stage} (workers={workers}), "
          f"while running: {landed}")
    check_nothing_partial_is_complete(root)
    step_at_kill = latest_checkpoint_step(root)

    rerun = luigi_command(tmp_path, config, "RunAll")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    if step_at_kill is not None and step_at_kill < TRAIN_STEPS:
        assert re.search(rf"Restoring parameters from \S+model\.ckpt-{step_at_kill}\b", rerun.stderr), \
            "training did not resume from its last checkpoint"
    outputs = collect(root)
    assert outputs.shards == reference.shards, "the TFRecords differ from an uninterrupted run's"
    assert outputs.global_step == TRAIN_STEPS
    assert leftovers(root) == []
    if step_at_kill is None or step_at_kill == TRAIN_STEPS:
        # Training ran whole, as in the reference: the same weights give the same results.
        assert outputs.metrics == reference.metrics
        assert outputs.predictions == reference.predictions
    else:
        # Training was cut and resumed: other weights, but the metrics must be those of its checkpoint.
        assert outputs.metrics["checkpoint"] == f"model.ckpt-{TRAIN_STEPS}"
        again = luigi_command(tmp_path, config, "Evaluate", "--rerun")
        assert again.returncode == 0, again.stderr[-3000:]
        assert collect(root).metrics == outputs.metrics
