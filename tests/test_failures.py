"""Off the happy path, through the real `luigi` command: every failure ends the run promptly with
exit code 30, naming the failed task and the reason, and leaves what was already complete as it was.

Every case runs under the local scheduler with one worker and against a real luigid with two,
in one workspace that already holds a completed run, as a user's would.
"""
from __future__ import annotations

import hashlib
import re
import signal
import subprocess
import tarfile
from pathlib import Path

import pytest

from pipeline.convert import shard_name
from pipeline.index import INDEX_FOLDER, read_index
from tasks.services import start_scheduler, stop_scheduler
from tests.conftest import (REPO, FileServer, cli_sections, free_port, png_claiming, read_csv, run_watched, tar_bytes,
                            write_config)
from tests.test_download import DATASET, png

pytestmark = pytest.mark.slow

# Seconds a failed command may take to exit after its failure is logged (the bound), and
# to finish at all (these runs take 5 to 20 s here).
EXIT_AFTER_FAILURE_S = 60
WHOLE_RUN_S = 150
SCHEDULERS = [("local", 1), ("central", 2)]
RAISING_MODEL = '''import tensorflow as tf

PARAMS = {"n_classes": None}  # filled in from the dataset


def model_fn(features, labels, mode, params):
    raise ValueError("the first layer expects 3 channels, got 1")
'''
KILLING_MODEL = '''import os
import signal

PARAMS = {"n_classes": None}  # filled in from the dataset


def model_fn(features, labels, mode, params):
    os.kill(os.getpid(), signal.SIGKILL)
'''


@pytest.fixture(scope="module")
def sources():
    """What the failure cases download, served on 127.0.0.1."""
    with FileServer() as server:
        symlink = tarfile.TarInfo("cat/link.png")
        symlink.type, symlink.linkname = tarfile.SYMTYPE, "../../etc/passwd"
        server.files["/hostile.tar.gz"] = tar_bytes(DATASET, (symlink,))
        server.files["/set.tar.gz"] = tar_bytes(DATASET)
        images = {f"{label}/{i}.png": png(30 * i + (100 if label == "b" else 0)) for label in "ab" for i in range(6)}
        server.files["/some-bad.tar.gz"] = tar_bytes({**images, "a/notes.png": b"not an image",
                                                      "b/empty.png": b""})
        yield server


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, mnist_subset, sources):
    """A folder holding a completed tiny RunAll, a config for the local scheduler and one for a
    central scheduler; yields (folder, {scheduler: config path})."""
    folder = tmp_path_factory.mktemp("workspace")
    state = folder.parent / f"{folder.name}-luigid"
    port = free_port()
    start_scheduler(state, port=port)
    try:
        configs = {"local": write_config(folder / "local.cfg", cli_sections(folder, mnist_subset.as_uri())),
                   "central": write_config(folder / "central.cfg", cli_sections(folder, mnist_subset.as_uri(), port))}
        (folder / "raising_model.py").write_text(RAISING_MODEL)
        first = run_watched(folder, configs["local"], "RunAll", "--local-scheduler")
        assert first.returncode == 0, first.output[-3000:]
        yield folder, configs
    finally:
        stop_scheduler(state)


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every output file; the index and the leaderboard, views that grow with every
    stage, are compared apart."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for root in ("data", "results") for path in sorted((folder / root).rglob("*"))
            if path.is_file() and ".locks" not in path.parts and INDEX_FOLDER not in path.parts and path.parent.name != "results"}


def assert_kept(folder: Path, before: dict[str, str], index_before: dict, allowed_to_go: set[str] = frozenset()):
    after = snapshot(folder)
    lost = {path for path in before if path not in after} - allowed_to_go
    changed = {path for path in before if path in after and after[path] != before[path]}
    assert not lost and not changed, f"removed: {sorted(lost)}; altered: {sorted(changed)}"
    index_after = read_index(str(folder / "results" / INDEX_FOLDER))
    assert {key: index_after.get(key) for key in index_before} == index_before, "index entries were altered"


def check_failure(folder: Path, config: Path, args: list[str], scheduler: str, workers: int, task: str,
                  reason: str, allowed_to_go: set[str] = frozenset(), bug: bool = False) -> None:
    """Run a command that must fail in `task` with `reason` (a `bug`, not one of the pipeline's own
    errors, shows its traceback too), and check how it ends and that nothing complete was touched."""
    before, index_before = snapshot(folder), read_index(str(folder / "results" / INDEX_FOLDER))
    extra = ["--local-scheduler"] if scheduler == "local" else []
    result = run_watched(folder, config, *args, "--workers", str(workers), *extra, limit_s=WHOLE_RUN_S)

    print(f"{scheduler}, workers={workers}: exit {result.returncode} after {result.seconds:.1f} s, "
          f"{result.after_failure} s after the failure")
    assert result.returncode == 30, result.output[-3000:]
    assert result.after_failure is not None and result.after_failure < EXIT_AFTER_FAILURE_S, result.output[-3000:]
    # The failure line names the task and the reason (a bug's reason ends its traceback), and so
    # does the end of the run, once.
    [failure_line] = [line for line in result.output.splitlines() if f"failed    {task}(" in line]
    if bug:
        assert "Traceback" in result.output and f"\n{reason}\n" in result.output, result.output[-3000:]
    else:
        assert reason in failure_line and "Traceback" not in result.output, result.output[-3000:]
    epilogue = result.output.split(failure_line, 1)[1]
    assert epilogue.count("FAILED ") == 1 and f"FAILED {task}(" in epilogue and reason in epilogue, epilogue
    assert_kept(folder, before, index_before, allowed_to_go)


@pytest.mark.parametrize("scheduler, workers", SCHEDULERS)
def test_download_of_a_missing_http_source_fails_at_once(workspace, sources, scheduler, workers):
    folder, configs = workspace
    url = sources.url(f"/gone-{scheduler}.tar.gz")
    check_failure(folder, configs[scheduler], ["RunAll", "--Download-dataset", f"gone-{scheduler}",
                                               "--Download-source-url", url],
                  scheduler, workers, "Download", f"{url}: HTTP 404 Not Found")
    assert sources.requests[f"/gone-{scheduler}.tar.gz"] == 1, "a 404 is not retried"


@pytest.mark.parametrize("scheduler, workers", SCHEDULERS)
def test_download_with_a_wrong_checksum_names_both(workspace, sources, scheduler, workers):
    folder, configs = workspace
    wrong = ("0" if scheduler == "local" else "1") * 64
    actual = hashlib.sha256(sources.files["/set.tar.gz"]).hexdigest()
    check_failure(folder, configs[scheduler], ["RunAll", "--Download-dataset", "pinned",
                                               "--Download-source-url", f"{sources.url('/set.tar.gz')}#sha256={wrong}"],
                  scheduler, workers, "Download", f"sha256 is {actual}, expected {wrong}")


@pytest.mark.parametrize("scheduler, workers", SCHEDULERS)
def test_download_of_a_hostile_archive_is_refused(workspace, sources, scheduler, workers):
    folder, configs = workspace
    check_failure(folder, configs[scheduler], ["Convert", "--Download-dataset", f"hostile-{scheduler}",
                                               "--Download-source-url", sources.url("/hostile.tar.gz")],
                  scheduler, workers, "Download", "member 'cat/link.png' is not a plain file or folder")


@pytest.mark.parametrize("scheduler, workers", SCHEDULERS)
def test_download_of_a_missing_file_fails_at_once(workspace, scheduler, workers):
    folder, configs = workspace
    missing = folder / f"nowhere-{scheduler}.tar.gz"
    check_failure(folder, configs[scheduler], ["Convert", "--Download-dataset", "x",
                                               "--Download-source-url", missing.as_uri()],
                  scheduler, workers, "Download", f"{missing.as_uri()}: FileNotFoundError")


@pytest.mark.parametrize("scheduler, workers", SCHEDULERS)
def test_convert_past_the_bad_fraction_fails(workspace, sources, scheduler, workers):
    folder, configs = workspace
    check_failure(folder, configs[scheduler], ["RunAll", "--Download-dataset", f"some-bad-{scheduler}",
                                               "--Download-source-url", sources.url("/some-bad.tar.gz")],
                  scheduler, workers, "Convert", "2 of 14 images could not be decoded")


@pytest.mark.parametrize("scheduler, workers", SCHEDULERS)
def test_train_with_a_model_file_that_raises_fails(workspace, scheduler, workers):
    folder, configs = workspace
    model = folder / f"raising_{scheduler}.py"
    model.write_text(RAISING_MODEL)
    # A bug in a user's model file is not one of the pipeline's own errors: its traceback is shown.
    check_failure(folder, configs[scheduler], ["RunAll", "--Train-model-def", str(model), "--Train-params", "{}"],
                  scheduler, workers, "Train", "ValueError: the first layer expects 3 channels, got 1", bug=True)


def test_train_whose_process_is_killed_fails_naming_it(workspace):
    """Under --workers 2 Luigi runs Train in a forked process; one killed (as the kernel's
    out-of-memory killer would) is reported by Luigi only at INFO, which the console says anyway."""
    folder, configs = workspace
    model = folder / "killing_model.py"
    model.write_text(KILLING_MODEL)
    before, index_before = snapshot(folder), read_index(str(folder / "results" / INDEX_FOLDER))

    result = run_watched(folder, configs["central"], "RunAll", "--Train-model-def", str(model),
                         "--Train-params", "{}", "--workers", "2", limit_s=WHOLE_RUN_S)

    assert result.returncode == 30, result.output[-3000:]
    epilogue = result.output[result.output.index("FAILED "):]
    assert re.match(r"FAILED Train\(.+\)\n    Task Train_\w+ died unexpectedly with exit code -9\n", epilogue), \
        result.output[-3000:]
    # Its own failure, not another run's: the scheduler's refusal is not what stopped this run.
    assert epilogue.count("FAILED ") == 1 and "NOT RUN" not in epilogue, epilogue
    assert_kept(folder, before, index_before)


def test_a_run_stopped_with_ctrl_c_does_not_ask_the_central_scheduler_why_tasks_are_undone(workspace):
    """Ctrl-C during Train (delivered here by the model itself, run in the command's own process
    under one worker): the tasks after it are undone on purpose, and the command leaves without
    asking the scheduler for its task list, which can take seconds when it is unreachable."""
    folder, configs = workspace
    model = folder / "interrupting_model.py"
    # Ctrl-C as Python delivers it, raised in the model's code: a SIGINT sent here would be
    # ignored where the test runs in a background job, which starts with SIGINT ignored.
    model.write_text(KILLING_MODEL.replace("os.kill(os.getpid(), signal.SIGKILL)", "raise KeyboardInterrupt"))
    log = folder.parent / f"{folder.name}-luigid" / "luigi-server.log"
    logged_before = log.stat().st_size

    result = run_watched(folder, configs["central"], "RunAll", "--Train-model-def", str(model),
                         "--Train-params", "{}", "--workers", "1", limit_s=WHOLE_RUN_S)

    assert result.returncode == -signal.SIGINT and "KeyboardInterrupt" in result.output, result.output[-3000:]
    with open(log, encoding="utf-8") as handle:
        handle.seek(logged_before)
        answered = handle.read()
    assert "/api/add_task" in answered and "/api/task_list" not in answered, answered[-3000:]


@pytest.mark.parametrize("scheduler, workers", SCHEDULERS)
def test_evaluate_on_a_corrupt_shard_fails_naming_it(workspace, scheduler, workers):
    folder, configs = workspace
    [shard] = (folder / "data" / "tfrecords").glob(f"tiny/*/{shard_name('validation', 1, 2)}")
    report = shard.with_name(shard.name.replace(".tfrecord", ".json"))
    intact, intact_report = shard.read_bytes(), report.read_bytes()
    flipped = bytearray(intact)
    flipped[len(flipped) // 2] ^= 1
    shard.write_bytes(bytes(flipped))
    try:
        # The corrupt shard's report is removed on purpose: the next run rebuilds that shard.
        check_failure(folder, configs[scheduler], ["Evaluate", "--split", "validation"], scheduler, workers,
                      "Evaluate", f"{shard}: its sha256 is", allowed_to_go={str(report.relative_to(folder))})
        assert not report.exists()
    finally:
        shard.write_bytes(intact)
        report.write_bytes(intact_report)


@pytest.mark.parametrize("scheduler, workers", SCHEDULERS)
def test_predict_skips_unusable_files_in_a_folder(workspace, scheduler, workers):
    folder, configs = workspace
    images = folder / f"new-{scheduler}"
    images.mkdir()
    digit = sorted((folder / "data" / "raw").glob("tiny/*/1/*.png"))[0]
    (images / "one.png").write_bytes(digit.read_bytes())
    (images / "unreadable.png").write_bytes(b"this is not an image")
    (images / "bomb.png").write_bytes(png_claiming(50000, 50000))
    earlier = set((folder / "results").glob("tiny/*/predict-*/predictions.csv"))
    extra = ["--local-scheduler"] if scheduler == "local" else []

    result = run_watched(folder, configs[scheduler], "Predict", "--input-dir", str(images), "--workers",
                         str(workers), *extra, limit_s=WHOLE_RUN_S)

    assert result.returncode == 0, result.output[-3000:]
    [predictions] = set((folder / "results").glob("tiny/*/predict-*/predictions.csv")) - earlier
    assert [row["path"] for row in read_csv(predictions)] == ["one.png"]
    assert f"PREDICTIONS of {images}: {predictions}" in result.output.splitlines(), result.output[-2000:]
    skipped = {line.split("skipping ", 1)[1] for line in result.output.splitlines() if "skipping " in line}
    assert {line.split(":", 1)[0] for line in skipped} == {str(images / "unreadable.png"), str(images / "bomb.png")}
    assert any("DecompressionBomb" in line for line in skipped), skipped


def test_make_run_exits_non_zero_when_a_stage_fails(tmp_path):
    """`make run`, the README's first command, on its own central scheduler, with a source that is not there."""
    state, port = tmp_path / "luigid", free_port()
    missing = (tmp_path / "missing.tar.gz").as_uri()
    args = (f"--layout-data-root {tmp_path / 'data'} --layout-results-root {tmp_path / 'results'} "
            f"--Download-dataset missing --Download-source-url {missing}")
    try:
        result = subprocess.run(["make", "--no-print-directory", "run", f"SCHEDULER_DIR={state}",
                                 f"SCHEDULER_PORT={port}", f"ARGS={args}"], cwd=REPO, capture_output=True, text=True,
                                timeout=WHOLE_RUN_S)
    finally:
        subprocess.run(["make", "--no-print-directory", "ui-stop", f"SCHEDULER_DIR={state}"], cwd=REPO, check=True,
                       capture_output=True, timeout=60)
    assert result.returncode != 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"FAILED Download(dataset=missing, source_url={missing}" in result.stderr, result.stderr[-3000:]
    assert "Error 30" in result.stderr, "make reports the luigi command's exit code"
