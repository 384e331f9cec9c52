"""What a `luigi` run prints: each failure on one line naming its task and reason, and, once at
the end below Luigi's execution summary, which tasks failed and why, or what a run produced.

Luigi runs each task in a forked process under `--workers N`, and only the scheduling process
prints the summary. So whatever is to be said at the end is written to `run_notes`, an unlinked
file opened before any fork: every worker process appends to it, and the summary reads it.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import tempfile
import warnings

import luigi
import luigi.interface
import luigi.rpc
import luigi.scheduler

from pipeline.errors import PipelineError

logger = logging.getLogger("luigi-interface")
_SUMMARY_MARK = "===== Luigi Execution Summary ====="

# TensorFlow's own logs are shown in full when the user sets TF_CPP_MIN_LOG_LEVEL below 3 (0 shows
# all); otherwise its C++ start-up lines (CUDA and TensorRT probes, cuDNN factory registrations),
# its deprecation notices and its set-up chatter are left out, so that a run's result fits on a
# screen. 3 is what this module sets, so processes started from this one stay quiet too.
TENSORFLOW_LOGS = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3") != "3"
# The INFO lines of TensorFlow's Python logger that say how training and evaluation go.
_TENSORFLOW_LINES_KEPT = ("loss = ", "global_step/sec", "Loss for final step", "Saving checkpoints for",
                          "Restoring parameters from", "Saving dict for global step", "Finished evaluation")


class _TensorFlowChatter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.levelno > logging.INFO:
            return "is deprecated and will be removed" not in message
        return message.startswith(_TENSORFLOW_LINES_KEPT)


if not TENSORFLOW_LOGS:
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"  # read when TensorFlow loads, which is later
    logging.getLogger("tensorflow").addFilter(_TensorFlowChatter())
    # tf.compat.v1.layers, which model files from the Estimator guides use, warns at every call.
    warnings.filterwarnings("ignore", message=r".* is deprecated and will be removed", category=UserWarning)
    # TensorBoard's reader warns about each run's duplicate graph events when the report reads curves.
    logging.getLogger("tensorboard").setLevel(logging.ERROR)
# The Estimator reports loss, steps/s and checkpoints at INFO, below TensorFlow's default level.
logging.getLogger("tensorflow").setLevel(logging.INFO)


class RunNotes:
    """Lines for the end of the run, keyed so that a task said twice (a retry) is printed once."""

    def __init__(self):
        descriptor, path = tempfile.mkstemp(prefix="luigi-run-notes-")
        os.unlink(path)  # the descriptor keeps the file alive; nothing is left behind at exit
        # Appends from several processes land whole and one after another.
        fcntl.fcntl(descriptor, fcntl.F_SETFL, fcntl.fcntl(descriptor, fcntl.F_GETFL) | os.O_APPEND)
        self._descriptor = descriptor

    def add(self, key: str, text: str) -> None:
        os.write(self._descriptor, (json.dumps([key, text]) + "\n").encode("utf-8"))

    def take(self) -> list[str]:
        """Every note so far, the last one of each key, in the order the keys first came; then empty."""
        data = os.pread(self._descriptor, os.fstat(self._descriptor).st_size, 0)
        os.ftruncate(self._descriptor, 0)
        notes: dict[str, str] = {}
        for line in data.decode("utf-8").splitlines():
            key, text = json.loads(line)
            notes[key] = text
        return list(notes.values())


run_notes = RunNotes()


def pipeline_error(error: BaseException | None) -> PipelineError | None:
    """The pipeline's own error behind `error`, which Luigi may have wrapped (a parameter's parse)."""
    while error is not None and not isinstance(error, PipelineError):
        error = error.__cause__ or error.__context__
    return error


def failure_reason(error: BaseException) -> str:
    """The pipeline's own message, or the type and message of anything else (a bug, whose
    traceback the log already shows)."""
    cause = pipeline_error(error)
    return str(cause) if cause is not None else f"{type(error).__name__}: {error}"


@luigi.Task.event_handler(luigi.Event.FAILURE)
def _note_failure(task: luigi.Task, error: BaseException) -> None:
    run_notes.add(task.task_id, f"FAILED {task}\n    {failure_reason(error)}")


# Every task this process scheduled, so that a run on a shared central scheduler can say which of
# the tasks it waited for failed in another process.
_scheduled: set[str] = set()


@luigi.Task.event_handler(luigi.Event.DEPENDENCY_DISCOVERED)
def _note_scheduled(task: luigi.Task, dependency: luigi.Task) -> None:
    _scheduled.add(dependency.task_id)


def _failed_elsewhere() -> list[str]:
    """Tasks this run needed that failed in another process on the central scheduler, with the
    reason that process reported; empty under --local-scheduler."""
    config = luigi.interface.core()
    if config.local_scheduler or not _scheduled:
        return []
    url = config.scheduler_url or f"http://{config.scheduler_host}:{config.scheduler_port}/"
    scheduler = luigi.rpc.RemoteScheduler(url)
    try:
        failed = {**scheduler.task_list(status=luigi.scheduler.DISABLED, search=None),
                  **scheduler.task_list(status=luigi.scheduler.FAILED, search=None)}
        return [f"FAILED {failed[task_id]['display_name']} (in another process)\n    "
                f"{json.loads(scheduler.fetch_error(task_id)['error'] or 'null') or 'no reason reported'}"
                for task_id in sorted(_scheduled & set(failed))]
    except luigi.rpc.RPCError:
        return []


class ConsoleFilter(logging.Filter):
    """Shortens what Luigi logs on `luigi-interface`, without tracebacks that would only show
    Luigi's internals or repeat one of the pipeline's own messages:

    - a task that failed with a PipelineError: Luigi's line naming the task, then the message;
    - a bad parameter (before any task exists): its message alone;
    - an unreachable central scheduler: what to do about it;
    - Luigi's execution summary: followed by the run's notes (see `run_notes`).

    Any other error (a bug) keeps its traceback.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        cause = pipeline_error(error)
        if isinstance(error, luigi.rpc.RPCError):
            record.msg = ("%s. Start the central scheduler with `make ui` (or `luigid`), "
                          "or pass --local-scheduler to run without one.")
            record.args = (error,)
        elif cause is not None and any(isinstance(arg, luigi.Task) for arg in record.args or ()):
            record.msg, record.args = "%s: %s", (record.getMessage(), cause)
        elif cause is not None:
            record.msg, record.args = "%s", (cause,)
        elif isinstance(error, ValueError) and isinstance(error.__cause__, ValueError):
            # Luigi's "Error when parsing the value of 'split'", caused by "holdout is not a valid choice ...".
            record.msg, record.args = "%s: %s", (error, error.__cause__)
        elif isinstance(record.msg, str) and record.msg.startswith("\n" + _SUMMARY_MARK):
            notes = run_notes.take()
            if "being run by another worker" in record.msg or "not granted run permission" in record.msg:
                notes += _failed_elsewhere()
            if notes:
                record.msg = record.msg.rstrip("\n") + "\n\n" + "\n".join(notes) + "\n"
            return True
        else:
            return True
        record.exc_info = record.exc_text = None
        return True


logger.addFilter(ConsoleFilter())


@luigi.Task.event_handler(luigi.Event.START)
def _keep_luigi_lines_single(task: luigi.Task) -> None:
    # absl (inside TensorFlow) calls logging.basicConfig() on its first message, giving the root
    # logger a handler that repeats every line Luigi's own handler already printed. Luigi's
    # default setup gives "luigi-interface" that handler; a user's logging setup is left alone.
    if logger.handlers:
        logger.propagate = False
