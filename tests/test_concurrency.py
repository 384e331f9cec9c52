"""Two `luigi` processes at once: on one central scheduler, and each with its own local scheduler."""
from __future__ import annotations

import re
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from pipeline.services import start_scheduler, stop_scheduler
from tests.conftest import (cli_sections, free_port, luigi_argv, luigi_env, read_csv, repo_config, start_watched,
                            tiny_config, write_config)

pytestmark = pytest.mark.slow

STAGES = ("Download", "PlanConversion", "ConvertShard", "Convert", "Train", "Evaluate", "Predict", "Report")


def start_luigi(folder: Path, config: Path, name: str, *args: str) -> tuple[subprocess.Popen, Path]:
    log = folder / f"{name}.log"
    with open(log, "w") as handle:
        process = subprocess.Popen(luigi_argv("RunAll", *args), cwd=folder, env=luigi_env(config),
                                   stdout=handle, stderr=subprocess.STDOUT)
    return process, log


def produced(log_text: str) -> Counter:
    """Task ids whose work this process did: it ran them and another process had not finished them."""
    ran = Counter(re.findall(r"\) running\s+(\w+\(.*?\))\n", log_text))
    ran.subtract(Counter(re.findall(r"(\w+\(.*?\)) was completed by another process", log_text)))
    return Counter({task: count for task, count in ran.items() if count > 0 and not task.startswith("RunAll(")})


def check_outputs_intact(folder: Path) -> None:
    [metrics] = (folder / "results").glob("*/*/evaluate-*/metrics.json")
    [predictions] = (folder / "results").glob("*/*/predict-*/predictions.csv")
    assert len(read_csv(predictions)) == 18 and metrics.stat().st_size > 0
    [leaderboard] = [read_csv(folder / "results" / "leaderboard.csv")]
    assert len(leaderboard) == 1


def run_pair(folder: Path, config: Path, first_args: list[str], second_args: list[str]) -> tuple[list, list]:
    pair = [start_luigi(folder, config, "first", *first_args), start_luigi(folder, config, "second", *second_args)]
    codes = [process.wait(timeout=600) for process, _ in pair]
    return codes, [log.read_text() for _, log in pair]


def test_two_runs_on_one_central_scheduler_run_every_task_once(mnist_subset, tmp_path):
    port = free_port()
    start_scheduler(tmp_path / "luigid", port=port)
    sections = tiny_config(tmp_path, mnist_subset.as_uri())
    sections["core"] = {**repo_config()["core"], "default-scheduler-port": str(port)}
    sections["worker"] = repo_config()["worker"]
    sections["retcode"] = repo_config()["retcode"]
    config = write_config(tmp_path / "luigi.cfg", sections)
    try:
        codes, logs = run_pair(tmp_path, config, ["--workers", "2"], ["--workers", "2"])
    finally:
        stop_scheduler(tmp_path / "luigid")

    # Luigi's exit code counts what each process ran itself: 10 or 25 say another process ran some
    # of its tasks (see luigi.cfg [retcode]); a failure would be 20, 30, 35 or 40.
    assert set(codes) <= {0, 10, 25}, "\n".join(log[-2000:] for log in logs)
    assert not any(re.search(r"^\* \d+ failed", log, re.MULTILINE) for log in logs)
    ran = produced(logs[0]) + produced(logs[1])
    assert all(count == 1 for count in ran.values()), ran
    assert Counter(task.split("(")[0] for task in ran) == {**{stage: 1 for stage in STAGES}, "ConvertShard": 6}
    check_outputs_intact(tmp_path)


def test_two_runs_on_local_schedulers_wait_for_each_other(mnist_subset, tmp_path):
    sections = tiny_config(tmp_path, mnist_subset.as_uri())
    sections["core"] = {"no_lock": repo_config()["core"]["no_lock"]}
    sections["retcode"] = repo_config()["retcode"]
    config = write_config(tmp_path / "luigi.cfg", sections)

    codes, logs = run_pair(tmp_path, config, ["--local-scheduler"], ["--local-scheduler", "--workers", "2"])

    assert codes == [0, 0], "\n".join(log[-2000:] for log in logs)
    ran = produced(logs[0]) + produced(logs[1])
    assert all(count == 1 for count in ran.values()), ran
    assert Counter(task.split("(")[0] for task in ran) == {**{stage: 1 for stage in STAGES}, "ConvertShard": 6}
    waited = "".join(logs).count("waiting for another process, which is producing")
    assert waited >= 1, "neither process ever waited for the other"
    check_outputs_intact(tmp_path)


def test_a_failure_ends_both_runs_sharing_a_central_scheduler(luigid, file_server, tmp_path):
    """Both processes need the same Download, whichever runs it: when it fails, neither waits for it."""
    config = write_config(tmp_path / "luigi.cfg", cli_sections(tmp_path, file_server.url("/gone.tar.gz"), luigid))

    pair = [start_watched(tmp_path, config, "RunAll", "--workers", str(workers)) for workers in (1, 2)]
    results = [finish() for finish in pair]

    for result in results:
        print(f"exit {result.returncode} after {result.seconds:.1f} s")
        assert result.returncode != 0 and result.seconds < 60, result.output[-3000:]
    assert file_server.requests["/gone.tar.gz"] == 1, "the failed Download ran once, not once a process"
    [ran_it] = [result for result in results if "failed    Download(" in result.output]
    assert ran_it.returncode == 30
    # Both end by saying what failed and why; the other one says where it failed.
    for result in results:
        epilogue = result.output.rsplit("===== Luigi Execution Summary =====", 1)[1]
        assert "FAILED Download(" in epilogue and f"{file_server.url('/gone.tar.gz')}: HTTP 404" in epilogue, epilogue
    [waited] = [result for result in results if result is not ran_it]
    assert "(in another process)" in waited.output and waited.returncode in (10, 25)
