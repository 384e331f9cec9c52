"""Two `luigi` processes at once: on one central scheduler, and each with its own local scheduler."""
from __future__ import annotations

import re
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import cli_sections, luigi_argv, luigi_env, read_csv, start_watched, write_config

pytestmark = pytest.mark.slow

STAGES = ("Download", "PlanConversion", "ConvertShard", "Convert", "Train", "Evaluate", "Predict", "Report",
          "Bless", "RunRecord")


def start_luigi(folder: Path, config: Path, name: str, *args: str) -> tuple[subprocess.Popen, Path]:
    log = folder / f"{name}.log"
    with open(log, "w") as handle:
        process = subprocess.Popen(luigi_argv("RunAll", *args), cwd=folder, env=luigi_env(config),
                                   stdout=handle, stderr=subprocess.STDOUT)
    return process, log


def produced(log_text: str) -> Counter:
    """Tasks whose work this process did, by name: it started them and another process had not
    finished them."""
    ran = Counter(re.findall(r"^started (.+)$", log_text, re.MULTILINE))
    ran.subtract(Counter(re.findall(r"^(.+) was made by another process", log_text, re.MULTILINE)))
    return Counter({task: count for task, count in ran.items() if count > 0})


def family(task_name: str) -> str:
    """The family of a task as the console names it: `Train@version` or `ConvertShard(...)`."""
    return re.split(r"[@(]", task_name, maxsplit=1)[0]


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


def test_two_runs_on_one_central_scheduler_run_every_task_once(luigid, mnist_subset, tmp_path):
    config = write_config(tmp_path / "luigi.cfg", cli_sections(tmp_path, mnist_subset.as_uri(), luigid))

    codes, logs = run_pair(tmp_path, config, ["--workers", "2"], ["--workers", "2"])

    # The two ask for one RunAll, which one of them runs: the other exits 0 if it saw that, else 25
    # (its own root was "not granted": see luigi.cfg [retcode]); a failure would be 20, 30, 35 or 40.
    assert set(codes) <= {0, 25}, "\n".join(log[-2000:] for log in logs)
    # A process that exits 25 says why: what it was not given, or that another process finished its task.
    assert all("NOT RUN: " in log or "DONE ELSEWHERE: " in log for code, log in zip(codes, logs) if code == 25), \
        "\n".join(log[-2000:] for log in logs)
    assert not any("FAILED " in log for log in logs)
    ran = produced(logs[0]) + produced(logs[1])
    assert all(count == 1 for count in ran.values()), ran
    assert Counter(family(task) for task in ran) == {**{stage: 1 for stage in STAGES}, "ConvertShard": 6}
    check_outputs_intact(tmp_path)


SECOND_SUBSET = {"params": ["--Train-params", '{"conv_filters": [8], "dense_units": 24}'],
                 "datasets": ["--Download-dataset", "tiny2"]}


@pytest.mark.parametrize("differing", SECOND_SUBSET)
def test_two_configurations_at_once_on_one_central_scheduler_each_get_their_own_results(
        luigid, mnist_subset, tmp_path, differing):
    """Two RunAll differing in Train's params (or in the dataset), started at once on one luigid:
    each gets its evaluation, report and predictions, the stages both need run once, both exit 0."""
    config = write_config(tmp_path / "luigi.cfg", cli_sections(tmp_path, mnist_subset.as_uri(), luigid))

    codes, logs = run_pair(tmp_path, config, ["--workers", "2"], ["--workers", "1", *SECOND_SUBSET[differing]])

    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
    ran = produced(logs[0]) + produced(logs[1])
    assert all(count == 1 for count in ran.values()), ran
    shared = 1 if differing == "params" else 2  # Download, PlanConversion and Convert
    stages = Counter(family(task) for task in ran)
    assert stages == {"Download": shared, "PlanConversion": shared, "ConvertShard": 6 * shared, "Convert": shared,
                      "Train": 2, "Evaluate": 2, "Predict": 2, "Report": 2, "Bless": 2,
                      "RunRecord": 2}
    results = tmp_path / "results"
    metrics = sorted(results.glob("*/*/evaluate-test-*/metrics.json"))
    assert len(metrics) == 2 and len(list(results.glob("*/*/evaluate-test-*/report-*/report.html"))) == 2
    assert [len(read_csv(path)) for path in results.glob("*/*/predict-*/predictions.csv")] == [18, 18]
    assert len(list(results.glob("*/*/run-*/run.json"))) == 2
    assert len(read_csv(results / "leaderboard.csv")) == 2
    datasets = {path.relative_to(results).parts[0] for path in metrics}
    assert datasets == ({"tiny"} if differing == "params" else {"tiny", "tiny2"})
    # Each ends with its own result.
    assert [log.strip().splitlines()[-5].split()[0] for log in logs] == ["RESULT", "RESULT"]


def test_two_runs_on_local_schedulers_wait_for_each_other(mnist_subset, tmp_path):
    config = write_config(tmp_path / "luigi.cfg", cli_sections(tmp_path, mnist_subset.as_uri()))

    codes, logs = run_pair(tmp_path, config, ["--local-scheduler"], ["--local-scheduler", "--workers", "2"])

    assert codes == [0, 0], "\n".join(log[-2000:] for log in logs)
    ran = produced(logs[0]) + produced(logs[1])
    assert all(count == 1 for count in ran.values()), ran
    assert Counter(family(task) for task in ran) == {**{stage: 1 for stage in STAGES}, "ConvertShard": 6}
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
    # Both end by saying what failed and why; the other one says where it failed, and what to do.
    epilogue = ran_it.output.split("FAILED Download(", 1)[1]
    assert f"{file_server.url('/gone.tar.gz')}: HTTP 404" in epilogue, ran_it.output[-3000:]
    [waited] = [result for result in results if result is not ran_it]
    assert waited.returncode == 25, waited.output[-3000:]
    epilogue = waited.output.split("NOT RUN: ", 1)[1]
    assert re.search(r"Download@\w+ failed in another run, so the scheduler disables it until about "
                     r"\d\d:\d\d:\d\d \(\[scheduler\] disable_persist = 30 s\)", epilogue), epilogue
    assert f"{file_server.url('/gone.tar.gz')}: HTTP 404" in epilogue and "What to do: rerun" in epilogue, epilogue
