"""What a `luigi` run prints (tasks/console.py): the run's story by default, Luigi's chatter only
when asked for, and, when the central scheduler refuses a run its tasks, why and what to do."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import REPO, cli_sections, run_watched, write_config

# Every line a default run may print: the story of each task, TensorFlow's evaluations, the result.
STORY_LINE = re.compile(r"(started|done   ) (\w+@\w+|ConvertShard\(split=\w+, index=\d, of=Convert@\w+\)|"
                        r"PlanConversion\(of=Convert@\w+\))( in [0-9.ms]+)?"
                        r"|done    RunAll\(upstream=Train@\w+\) in [0-9.ms]+"
                        r"|INFO:tensorflow:Saving dict for global step \d+: .*"
                        # TensorFlow's warnings stay: its exporter meets an export of the same second.
                        r"|WARNING:tensorflow:.*"
                        r"|RESULT test accuracy [0-9.]+ on 18 images|    (report|predictions|verdict): +\S+"
                        r"|    NOT BLESSED: no thresholds set, .*")


@pytest.mark.slow
def test_a_run_prints_one_line_as_each_task_starts_and_ends_and_luigi_chatter_only_at_debug(mnist_subset, tmp_path):
    config = write_config(tmp_path / "luigi.cfg", cli_sections(tmp_path, mnist_subset.as_uri()))

    result = run_watched(tmp_path, config, "RunAll", "--local-scheduler", limit_s=300)

    assert result.returncode == 0, result.output[-3000:]
    lines = result.output.splitlines()
    assert [line for line in lines if not STORY_LINE.fullmatch(line)] == [], result.output
    started = re.findall(r"^started (.+)$", result.output, re.MULTILINE)
    done = re.findall(r"^done +(.+) in ", result.output, re.MULTILINE)
    # Each task once as it starts and once as it ends; RunAll, which only gathers, as it ends.
    assert len(started) == len(set(started)) and len(done) == len(set(done)) == len(started) + 1, result.output
    assert set(done) - set(started) == {re.search(r"^done +(RunAll\(.+\)) in ", result.output, re.MULTILINE)[1]}
    families = sorted(re.split(r"[@(]", name)[0] for name in started)
    assert families == sorted(["Download", "PlanConversion", *["ConvertShard"] * 6, "Convert", "Train", "Evaluate",
                               "Predict", "Report", "Bless", "RunRecord"]), families

    # Done, the same run is reused; --log-level DEBUG brings back Luigi's lines.
    again = run_watched(tmp_path, config, "RunAll", "--local-scheduler", "--log-level", "DEBUG")
    assert again.returncode == 0, again.output[-3000:]
    assert re.search(r"^reused  RunAll\(upstream=Train@\w+\)$", again.output, re.MULTILINE), again.output
    assert "Informed scheduler that task   RunAll_" in again.output and "Checking if RunAll(" in again.output
    assert "===== Luigi Execution Summary =====" in again.output and "RESULT test accuracy" in again.output


def test_a_run_refused_by_the_central_scheduler_says_which_tasks_why_and_what_to_do(luigid, file_server, tmp_path):
    """A Download that failed in one run is disabled on the central scheduler for disable_persist
    seconds: the next run gets none of its tasks (exit code 25) and says so."""
    config = write_config(tmp_path / "luigi.cfg", cli_sections(tmp_path, file_server.url("/gone.tar.gz"), luigid))
    failed = run_watched(tmp_path, config, "RunAll")
    assert failed.returncode == 30 and "FAILED Download(" in failed.output, failed.output[-3000:]

    refused = run_watched(tmp_path, config, "RunAll")

    assert refused.returncode == 25, refused.output[-3000:]
    assert file_server.requests["/gone.tar.gz"] == 1, "the disabled Download was not run again"
    epilogue = refused.output[refused.output.index("NOT RUN: "):].splitlines()
    assert re.fullmatch(r"NOT RUN: the central scheduler at http://127\.0\.0\.1:\d+/ did not grant this run "
                        r"permission to run \d+ of its tasks \(exit code 25\):", epilogue[0]), epilogue
    assert re.fullmatch(r"    Download@\w+ failed in another run, so the scheduler disables it until about "
                        r"(\d\d:\d\d:\d\d) \(\[scheduler\] disable_persist = 30 s\):", epilogue[1]), epilogue
    assert epilogue[2].strip().startswith(f"{file_server.url('/gone.tar.gz')}: HTTP 404"), epilogue
    waiting = dict(reversed(part.split()) for part in epilogue[3].split("waiting for them: ")[1].split(", "))
    assert waiting == {"RunAll": "1", "Evaluate": "1", "Report": "1", "Predict": "1", "Bless": "1", "Train": "1",
                       "Convert": "1", "ConvertShard": "6", "PlanConversion": "1"}, epilogue
    until = re.search(r"until about (\S+)", epilogue[1])[1]
    assert epilogue[4].startswith(f"What to do: rerun this command after {until} to run the disabled task again"), \
        epilogue
    assert "Informed scheduler" not in refused.output and ":)" not in refused.output
    assert "/api/task_list" in scheduler_log(tmp_path)


def scheduler_log(tmp_path) -> str:
    """What the `luigid` fixture's scheduler logged, each request it answered among it."""
    return (tmp_path / "luigid" / "luigi-server.log").read_text()


def test_a_run_that_left_nothing_undone_does_not_ask_the_central_scheduler_for_its_task_list(luigid, mnist_subset,
                                                                                           tmp_path):
    """Download and the plan made from it, run in worker processes: all done here, so the end of
    the run has nothing to ask the scheduler about (a shared scheduler's task list is long)."""
    sections = cli_sections(tmp_path, mnist_subset.as_uri(), luigid)
    sections["PlanConversion"] = sections["Convert"]  # a part named alone reads its own section
    config = write_config(tmp_path / "luigi.cfg", sections)

    result = run_watched(tmp_path, config, "PlanConversion", "--workers", "2")

    assert result.returncode == 0 and "NOT RUN" not in result.output, result.output[-3000:]
    assert re.search(r"^done +PlanConversion\(", result.output, re.MULTILINE), result.output
    log = scheduler_log(tmp_path)
    assert "/api/add_task" in log and "/api/task_list" not in log, log[-3000:]


@pytest.mark.parametrize("stored, shown", [
    ('"http://x/gone.tar.gz: HTTP 404"', "http://x/gone.tar.gz: HTTP 404"),
    ("", "no reason reported"),
    # Luigi's worker stores a task it cannot load as a traceback, not as JSON.
    ("Traceback (most recent call last):\n  ...\nTaskClassNotFoundException: No task Gone\n",
     "Traceback (most recent call last):\n  ...\nTaskClassNotFoundException: No task Gone"),
])
def test_a_failures_explanation_from_the_scheduler_is_read_as_json_or_shown_as_stored(stored, shown):
    from tasks.console import explanation

    assert explanation(stored) == shown


def test_a_run_whose_undone_tasks_are_all_merely_pending_says_so_and_what_to_do():
    """Nothing failed, disabled or running elsewhere (a worker that was to run them died): the
    end of the run still says why it exits 25."""
    from collections import Counter

    from tasks.console import _left_pending

    lines = _left_pending("http://127.0.0.1:8082/", Counter({"Train": 1, "ConvertShard": 6}))

    assert lines[0] == ("NOT RUN: the central scheduler at http://127.0.0.1:8082/ did not grant this run permission "
                        "to run 7 of its tasks (exit code 25): they are pending, waiting for a worker: "
                        "1 Train, 6 ConvertShard."), lines
    assert lines[1].startswith("What to do: rerun this command") and "http://127.0.0.1:8082/" in lines[1], lines


def test_the_console_is_set_up_by_one_call_not_by_importing_its_module():
    script = f"""
import importlib.util, logging, os, sys
import luigi
sys.path.insert(0, {str(REPO)!r})
def handlers():
    return sum(len(callbacks) for callbacks in luigi.Task._event_callbacks.get(luigi.Task, {{}}).values())
spec = importlib.util.spec_from_file_location("console_alone", {str(REPO / "tasks" / "console.py")!r})
console = importlib.util.module_from_spec(spec)
spec.loader.exec_module(console)
assert "TF_CPP_MIN_LOG_LEVEL" not in os.environ and handlers() == 0 and not console.story.handlers
console.set_up()
once = handlers()
console.set_up()
assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "3" and handlers() == once > 0 and len(console.story.handlers) == 1
print("ok")
"""
    env = {"PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0 and result.stdout == "ok\n", result.stderr[-3000:]
