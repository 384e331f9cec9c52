"""The whole pipeline with both roots on S3 (a real S3 server on 127.0.0.1), through the real `luigi`
command: every stage, the index and leaderboard, no credential in anything written, and two worker
processes from two working folders sharing one central scheduler and the S3 roots."""
from __future__ import annotations

import re
import subprocess
import uuid
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import (PLANTED_SECRET_KEY, cli_sections, luigi_argv, luigi_env, make_mnist_subset, run_watched,
                            write_config)
from tests.test_concurrency import STAGES, family, produced

pytestmark = pytest.mark.slow


def s3_config(folder: Path, s3_server, prefix: str, source_url: str, scheduler_port: int | None = None,
              num_shards: int = 2) -> Path:
    sections = cli_sections(folder, source_url, scheduler_port)
    sections["layout"] = {"data_root": s3_server.uri(prefix, "data"), "results_root": s3_server.uri(prefix, "results")}
    sections["Convert"]["num_shards"] = str(num_shards)
    folder.mkdir(parents=True, exist_ok=True)
    return write_config(folder / "luigi.cfg", sections)


def assert_no_secret(s3_server, prefix: str, *texts: str, folders: tuple[Path, ...] = ()) -> int:
    """Look for the planted secret key in every object under `prefix`, in `texts` (logs) and in every
    file below `folders`; return how many objects were searched."""
    keys = s3_server.keys(prefix)
    for key in keys:
        assert PLANTED_SECRET_KEY.encode() not in s3_server.read(key), f"the secret key is in s3://.../{key}"
    for text in texts:
        assert PLANTED_SECRET_KEY not in text
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file():
                assert PLANTED_SECRET_KEY.encode() not in path.read_bytes(), f"the secret key is in {path}"
    return len(keys)


def test_every_stage_runs_on_s3_roots_and_writes_no_credential(s3_server, mnist_subset, tmp_path):
    prefix = f"e2e-{uuid.uuid4().hex[:8]}"
    config = s3_config(tmp_path / "work", s3_server, prefix, mnist_subset.as_uri())

    # --log-level DEBUG: every line Luigi can print is searched for the secret too.
    first = run_watched(tmp_path / "work", config, "RunAll", "--local-scheduler", "--log-level", "DEBUG",
                        env=s3_server.env(), limit_s=600)

    assert first.returncode == 0, first.output[-4000:]
    assert re.search(r"RESULT test accuracy [0-9.]+ on 18 images", first.output), first.output[-2000:]
    keys = s3_server.keys(prefix)
    for pattern in (r"data/raw/tiny/\w+/download\.json", r"data/raw/tiny/\w+/0/.+\.png",
                    r"data/tfrecords/tiny/\w+/train-00001-of-00002\.tfrecord",
                    r"data/tfrecords/tiny/\w+/metadata\.json", r"results/tiny/cnn-\w+/model_dir/model\.ckpt-12\.index",
                    r"results/tiny/cnn-\w+/model_dir/events\.out\.tfevents\..+",
                    r"results/tiny/cnn-\w+/model_dir/model_def\.py", r"results/tiny/cnn-\w+/export/\d+/saved_model\.pb",
                    r"results/tiny/cnn-\w+/train\.json", r"results/tiny/cnn-\w+/evaluate-test-\w+/metrics\.json",
                    r"results/tiny/cnn-\w+/predict-\w+/predictions\.csv",
                    r"results/tiny/cnn-\w+/evaluate-test-\w+/report-\w+/report\.html", r"results/\.index/Train/\w+\.json",
                    r"results/\.index/COMPLETE", r"results/leaderboard\.json", r"results/leaderboard\.csv",
                    r"results/leaderboard\.html"):
        assert any(re.fullmatch(f"{prefix}/{pattern}", key) for key in keys), f"no object matches {pattern}"
    assert not any(storage_leftover in key for key in keys for storage_leftover in (".tmp-", "_temp", "/temp-"))
    leaderboard = s3_server.read(f"{prefix}/results/leaderboard.csv").decode()
    assert len(leaderboard.strip().splitlines()) == 2
    # Nothing was written to local data/ or results/ folders: the roots are on S3.
    assert not (tmp_path / "work" / "data").exists() and not (tmp_path / "work" / "results").exists()

    again = run_watched(tmp_path / "work", config, "RunAll", "--local-scheduler", env=s3_server.env())
    assert again.returncode == 0 and "reused  RunAll(" in again.output, again.output[-2000:]
    assert "started " not in again.output, again.output[-2000:]

    searched = assert_no_secret(s3_server, prefix, first.output, again.output, folders=(tmp_path,))
    assert searched > 100


def test_two_workers_from_two_folders_split_a_run_on_s3(s3_server, luigid, tmp_path):
    """As two hosts would: each worker process has its own working folder and configuration file
    (the same settings), and shares only the central scheduler and the S3 roots."""
    prefix = f"pair-{uuid.uuid4().hex[:8]}"
    # Shards of 50 images, enough work that each worker, polling the scheduler every few seconds, gets some.
    digits = make_mnist_subset(tmp_path / "digits.tar.gz", classes=tuple("0123456789"), per_class=60)
    configs = [s3_config(tmp_path / name, s3_server, prefix, digits.as_uri(), luigid, num_shards=4)
               for name in ("host-a", "host-b")]
    processes = []
    for config in configs:
        log = config.with_name("luigi.log")
        with open(log, "w") as handle:
            processes.append((subprocess.Popen(luigi_argv("RunAll", "--workers", "1"), cwd=config.parent,
                                               env=luigi_env(config, **s3_server.env()), stdout=handle,
                                               stderr=subprocess.STDOUT), log))
    codes = [process.wait(timeout=900) for process, _ in processes]
    logs = [log.read_text() for _, log in processes]

    # A host that runs out of work while the other still runs the last stages stops there, and
    # says its RunAll was not run (25, see docs/several-machines.md); nothing may have failed (20, 30, 35, 40).
    assert 0 in codes and set(codes) <= {0, 25}, "\n".join(log[-3000:] for log in logs)
    # A process that exits 25 says why: what it was not given, or that another process finished its task.
    assert all("NOT RUN: " in log or "DONE ELSEWHERE: " in log for code, log in zip(codes, logs) if code == 25), \
        "\n".join(log[-2000:] for log in logs)
    assert not any("FAILED " in log for log in logs)
    ran = [produced(log) for log in logs]
    both = ran[0] + ran[1]
    assert all(count == 1 for count in both.values()), both
    assert Counter(family(task) for task in both) == {**{stage: 1 for stage in STAGES}, "ConvertShard": 12}
    shards_by_worker = [sum(1 for task in worker if task.startswith("ConvertShard(")) for worker in ran]
    assert all(count >= 1 for count in shards_by_worker), f"the shards were not divided: {shards_by_worker}"
    keys = s3_server.keys(prefix)
    assert sum(key.endswith(".tfrecord") for key in keys) == 12
    assert any(key.endswith("/predictions.csv") for key in keys) and any(key.endswith("/report.html") for key in keys)
    assert_no_secret(s3_server, prefix, *logs)
    # Run again on either host, the run is complete.
    for config in configs:
        again = run_watched(config.parent, config, "RunAll", env=s3_server.env())
        assert again.returncode == 0 and "reused  RunAll(" in again.output, again.output[-2000:]
        assert "started " not in again.output, again.output[-2000:]


def test_a_bucket_that_does_not_exist_fails_in_one_line_naming_it(s3_server, mnist_subset, tmp_path):
    """A set-up mistake (the bucket was never made) ends the run naming the bucket and what to do,
    with no traceback through botocore."""
    bucket = f"never-made-{uuid.uuid4().hex[:8]}"
    sections = cli_sections(tmp_path, mnist_subset.as_uri())
    sections["layout"] = {"data_root": f"s3://{bucket}/data", "results_root": f"s3://{bucket}/results"}
    config = write_config(tmp_path / "luigi.cfg", sections)

    result = run_watched(tmp_path, config, "RunAll", "--local-scheduler", env=s3_server.env(), limit_s=120)

    assert result.returncode == 30, result.output[-3000:]
    assert "Traceback" not in result.output, result.output[-3000:]
    naming = [line for line in result.output.splitlines() if f"s3://{bucket}" in line]
    assert naming, result.output[-3000:]
    assert all(f"s3://{bucket}: no such bucket on {s3_server.endpoint}; create it" in line for line in naming), naming
    assert any(re.search(r"(?i)fail.*\bDownload\b", line) for line in result.output.splitlines()), result.output[-3000:]
