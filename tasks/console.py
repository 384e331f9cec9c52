"""What a `luigi` run prints: the run's story, set up by one call, `set_up()`, once per command.

By default Luigi's own logging configuration (luigi.cfg `[core] log_level = WARNING`) keeps its
scheduler chatter ("Informed scheduler that task ... has status ...", worker start and stop, the
execution summary) off the console; `--log-level INFO` or `DEBUG` brings it back. What is left:

- one line when a task starts and one when it is done, with its time; one for a task reused;
- each failure on one line naming its task and reason (Luigi's own error line, shortened);
- at the end, which tasks failed and why, what the run produced, or, when the central scheduler
  did not let this run do its tasks (exit code 25), which tasks, why, and what to do.

Luigi runs each task in a forked process under `--workers N`, and only the scheduling process
lives to the end. So whatever is to be said at the end is written to the run's notes, an
unlinked file opened before any fork: every worker process appends to it, and the scheduling
process prints it as it exits.
"""
from __future__ import annotations

import atexit
import datetime
import fcntl
import inspect
import json
import logging
import os
import re
import sys
import tempfile
import time
import warnings
from collections import Counter

import luigi
import luigi.interface
import luigi.rpc
import luigi.scheduler
from luigi.cmdline_parser import CmdlineParser

from pipeline.errors import PipelineError

# What the console prints is read by people, never by a task: it cannot change a result
# (see pipeline.fingerprint).
AFFECTS_RESULTS = False

logger = logging.getLogger("luigi-interface")
# The run's own lines, printed whatever Luigi's log level: they are what the console is for.
story = logging.getLogger("tasks.console")

# The INFO lines of TensorFlow's Python logger that say how training goes: by default only each
# evaluation's metrics (six in a default Train); under --log-level INFO or DEBUG also the loss,
# steps/s and checkpoints.
_TENSORFLOW_LINES = ("Saving dict for global step",)
_TENSORFLOW_LINES_VERBOSE = _TENSORFLOW_LINES + (
    "loss = ", "global_step/sec", "Loss for final step", "Saving checkpoints for", "Restoring parameters from",
    "Finished evaluation")


class _TensorFlowChatter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.levelno > logging.INFO:
            return "is deprecated and will be removed" not in message
        verbose = logger.isEnabledFor(logging.INFO)  # Luigi's --log-level, inherited by forked workers
        return message.startswith(_TENSORFLOW_LINES_VERBOSE if verbose else _TENSORFLOW_LINES)


class RunNotes:
    """Lines for the end of the run, keyed so that a task said twice (a retry) is printed once;
    and the tasks done in this run, whichever process ran them."""

    def __init__(self):
        descriptor, path = tempfile.mkstemp(prefix="luigi-run-notes-")
        os.unlink(path)  # the descriptor keeps the file alive; nothing is left behind at exit
        # Appends from several processes land whole and one after another.
        fcntl.fcntl(descriptor, fcntl.F_SETFL, fcntl.fcntl(descriptor, fcntl.F_GETFL) | os.O_APPEND)
        self._descriptor = descriptor

    def add(self, key: str, text: str) -> None:
        self._append([key, text])

    def add_done(self, task_id: str) -> None:
        self._append({"done": task_id})

    def _append(self, record: list | dict) -> None:
        os.write(self._descriptor, (json.dumps(record) + "\n").encode("utf-8"))

    def take(self) -> tuple[dict[str, str], set[str]]:
        """Every note so far, the last one of each key, in the order the keys first came, and the
        ids of the tasks done; then empty."""
        data = os.pread(self._descriptor, os.fstat(self._descriptor).st_size, 0)
        os.ftruncate(self._descriptor, 0)
        notes: dict[str, str] = {}
        done: set[str] = set()
        for line in data.decode("utf-8").splitlines():
            record = json.loads(line)
            if isinstance(record, dict):
                done.add(record["done"])
            else:
                key, text = record
                notes[key] = text
        return notes, done


_notes: RunNotes | None = None


def note(key: str, text: str) -> None:
    """Say `text` at the end of the run, once for `key`; nothing without `set_up()`."""
    if _notes is not None:
        _notes.add(key, text)


# Control characters, but for newlines and tabs: a value read from a file in the results (a
# verdict's reason, a pointer's) could otherwise move the cursor, recolour or retitle a terminal.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """`text` with every control character (but newlines and tabs) shown as U+FFFD."""
    return _CONTROL.sub("\ufffd", text)


def say(text: str) -> None:
    """One line of the run's story, now."""
    story.info("%s", text)


def task_name(task: luigi.Task) -> str:
    """A stage as `Family@version`; any other task as its repr (upstream stages by version)."""
    version = getattr(task, "version", None)
    return f"{task.get_task_family()}@{version}" if isinstance(version, str) else repr(task)


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


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(seconds, 60)
    return f"{int(minutes)}m{seconds:04.1f}s" if minutes else f"{seconds:.1f}s"


# When each task this process runs started (a task that yields dependencies starts more than once).
_started_at: dict[str, float] = {}
# Every task this process scheduled, by id: what a run on a shared central scheduler checks at
# its end, to say which of them another process failed, holds or runs.
_scheduled: dict[str, luigi.Task] = {}
# Where the central scheduler is, as this command's parameters say; None under --local-scheduler.
_scheduler_url: list[str | None] = []


def _on_start(task: luigi.Task) -> None:
    if task.task_id not in _started_at and not inspect.isgeneratorfunction(type(task).run):
        # A task that yields its dependencies is started again once they are done: its end alone is said.
        say(f"started {task_name(task)}")
    _started_at.setdefault(task.task_id, time.monotonic())


def _on_success(task: luigi.Task) -> None:
    if _notes is not None:
        _notes.add_done(task.task_id)
    started = _started_at.pop(task.task_id, None)
    say(f"done    {task_name(task)}" + (f" in {_duration(time.monotonic() - started)}" if started else ""))


def _on_failure(task: luigi.Task, error: BaseException) -> None:
    _note_failed(task, failure_reason(error))


def _note_failed(task: luigi.Task, reason: str) -> None:
    """Also what Luigi reports of a task whose forked process died (killed, out of memory, a
    crash) or ran past `[worker] timeout`, which it logs only at INFO, hidden by default."""
    note(task.task_id, f"FAILED {task}\n    {reason}")


def _on_present(task: luigi.Task) -> None:
    _remember(task)
    _found_done.add(task.task_id)
    # A task that `requires_whole_dag` has its requirements found done again once they have run,
    # and a gathering has what it made checked again (see tasks.runs): only what this run did not
    # have to make is reused.
    if getattr(task, "said_reused", True) and not (
            getattr(_discovered_by.get(task.task_id), "requires_whole_dag", False)
            or getattr(task, "found_incomplete", False)):
        say(f"reused  {task_name(task)}")


def _remember(*tasks: luigi.Task) -> None:
    if not _scheduler_url:
        # Read while the `luigi` command's line is parsed, not at exit. luigi.build() (in a test)
        # passes its settings past the configuration: it is not asked about.
        config = luigi.interface.core()
        command = CmdlineParser.get_instance() is not None
        _scheduler_url.append(None if config.local_scheduler or not command else
                              config.scheduler_url or f"http://{config.scheduler_host}:{config.scheduler_port}/")
    for task in tasks:
        _scheduled.setdefault(task.task_id, task)


# The tasks this process found complete as it scheduled them.
_found_done: set[str] = set()
# The task that required each task last, as Luigi scheduled them.
_discovered_by: dict[str, luigi.Task] = {}


def _on_discovered(task: luigi.Task, dependency: luigi.Task) -> None:
    _remember(task, dependency)
    _discovered_by[dependency.task_id] = task


def _cause(scheduler: luigi.rpc.RemoteScheduler, task_id: str, task: dict) -> tuple[str, str | None]:
    """Why the scheduler holds a task back from this run, as the task's state on it says; and,
    for a task it disables for a while, until when (HH:MM:SS)."""
    name = task_name(_scheduled[task_id])
    if task["status"] == luigi.scheduler.RUNNING:
        return f"{name} is being run by another process ({task['worker_running']})", None
    reason = explanation(scheduler.fetch_error(task_id)["error"])
    if task["status"] == luigi.scheduler.FAILED:
        return f"{name} failed in another run:\n        {reason}", None
    if not task.get("re_enable_able"):
        return f"{name} was disabled by hand in the scheduler's UI, which can enable it again", None
    persist = luigi.scheduler.scheduler().disable_persist  # luigid's own luigi.cfg may say otherwise
    until = datetime.datetime.fromtimestamp(task["last_updated"] + persist).strftime("%H:%M:%S")
    return (f"{name} failed in another run, so the scheduler disables it until about {until} "
            f"([scheduler] disable_persist = {persist} s):\n        {reason}"), until


def explanation(error: str | None) -> str:
    """A failure's explanation as the central scheduler keeps it: what a task's run reported, as
    JSON; the raw text where a worker stored another (Luigi's traceback of a task it could not load)."""
    try:
        reason = json.loads(error or "null")
    except ValueError:
        return error.strip()
    return str(reason) if reason else "no reason reported"


def _not_run(failed_here: set[str], done_here: set[str]) -> list[str]:
    """Why the central scheduler did not let this run do some of its tasks (Luigi's "not granted
    run permission", exit code 25), and what to do; empty when every task is done, when only this
    process's own failures stopped it, or under --local-scheduler. The scheduler is asked only
    when a task was left undone here: its whole task list, on a shared scheduler, is long."""
    url = _scheduler_url[0] if _scheduler_url else None
    if url is None or not set(_scheduled) - _found_done - done_here:
        return []
    scheduler = luigi.rpc.RemoteScheduler(url)
    held_back = (luigi.scheduler.DISABLED, luigi.scheduler.FAILED, luigi.scheduler.RUNNING)
    try:
        known = scheduler.task_list(status="", search=None, limit=False)
        undone = {task_id: known[task_id] for task_id in _scheduled
                  if task_id in known and known[task_id]["status"] != luigi.scheduler.DONE}
        causes = [_cause(scheduler, task_id, task) for task_id, task in undone.items()
                  if task_id not in failed_here and task["status"] in held_back]
    except luigi.rpc.RPCError:
        return []
    waiting = Counter(task.get_task_family() for task_id, task in _scheduled.items()
                      if task_id in undone and undone[task_id]["status"] == luigi.scheduler.PENDING)
    if causes:
        return _refused(url, len(undone), causes, waiting)
    if undone and failed_here.isdisjoint(undone) and sum(waiting.values()) == len(undone):
        return _left_pending(url, waiting)
    return _done_elsewhere(url, known, undone, done_here)


def _refused(url: str, undone: int, causes: list[tuple[str, str | None]], waiting: Counter) -> list[str]:
    """The tasks another process failed, holds or runs, and what to do."""
    until = max((until for _, until in causes if until), default=None)
    todo = (f"rerun this command after {until} to run the disabled task again, once its cause is fixed" if until
            else "rerun this command once the other process is done, or once the task is enabled again")
    return [f"NOT RUN: the central scheduler at {url} did not grant this run permission to run "
            f"{undone} of its tasks (exit code 25):",
            *(f"    {cause}" for cause, _ in causes),
            *([f"    waiting for them: {_counted(waiting)}"] if waiting else []),
            f"What to do: {todo}; the scheduler's UI ({url}) shows each task's failure."]


def _left_pending(url: str, waiting: Counter) -> list[str]:
    """Why a run exits 25 with nothing failed, disabled or running: every task it left is merely
    pending on the scheduler, as when a worker process that was to run one of them died."""
    return [f"NOT RUN: the central scheduler at {url} did not grant this run permission to run "
            f"{sum(waiting.values())} of its tasks (exit code 25): they are pending, waiting for a worker: "
            f"{_counted(waiting)}.",
            "What to do: rerun this command; if it stops here again, the scheduler's UI "
            f"({url}) shows which worker holds them (stop that worker, or wait for it)."]


def _counted(families: Counter) -> str:
    return ", ".join(f"{count} {family}" for family, count in families.items())


def _done_elsewhere(url: str, known: dict, undone: dict, done_here: set[str]) -> list[str]:
    """Why a run exits 25 though nothing is missing: Luigi gives that code to a command whose own
    task (not a dependency) another process on the central scheduler ran, as a second machine's
    RunAll may."""
    roots = [task_id for task_id in _scheduled if task_id not in _discovered_by]
    elsewhere = [task_name(_scheduled[task_id]) for task_id in roots
                 if task_id not in done_here and task_id not in _found_done
                 and known.get(task_id, {}).get("status") == luigi.scheduler.DONE]
    if undone or not elsewhere:
        return []
    return [f"DONE ELSEWHERE: another process on the central scheduler at {url} finished {', '.join(elsewhere)}; "
            "everything this run asked for exists. Luigi exits 25 when a command's own task ran in another "
            "process: run the command again to see its result (it runs nothing and exits 0)."]


def _epilogue() -> None:
    """At the end of the command: the run's notes, then why tasks were not run, if they were not."""
    notes, done_here = _notes.take() if _notes is not None else ({}, set())
    failed_here = {key for key, text in notes.items() if text.startswith("FAILED ")}
    # A run stopped with Ctrl-C left its tasks undone on purpose, and a user who stops a run
    # wants it gone now, not after the scheduler's RPC retries when it is unreachable. Python
    # keeps the exception that ended the program in sys.last_value for the exit hooks.
    interrupted = isinstance(getattr(sys, "last_value", None), KeyboardInterrupt)
    lines = [*notes.values(), *([] if interrupted else _not_run(failed_here, done_here))]
    if lines:
        say("\n".join(lines))


# Luigi's warnings as it retries an RPC to the central scheduler.
_RETRIES = ("Failed connecting to remote scheduler %r", "Failed pinging scheduler")


class ConsoleFilter(logging.Filter):
    """Shortens the errors Luigi logs on `luigi-interface`, without tracebacks that would only
    show Luigi's internals or repeat one of the pipeline's own messages:

    - a task that failed with a PipelineError: Luigi's line naming the task, then the message;
    - a bad parameter (before any task exists): its message alone;
    - an unreachable central scheduler: what to do about it, once it has given up; its retries
      are left out unless --log-level is INFO or DEBUG.

    Any other error (a bug) keeps its traceback.
    """

    def __init__(self):
        super().__init__()
        self._unreachable_said: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg in _RETRIES and not logger.isEnabledFor(logging.INFO):
            return False
        error = record.exc_info[1] if record.exc_info else None
        cause = pipeline_error(error)
        if isinstance(error, luigi.rpc.RPCError):
            if str(error) in self._unreachable_said:
                return False  # the worker and then the command each log the same error
            self._unreachable_said.add(str(error))
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
        else:
            return True
        record.exc_info = record.exc_text = None
        return True


def _keep_luigi_lines_single(task: luigi.Task) -> None:
    # absl (inside TensorFlow) calls logging.basicConfig() on its first message, giving the root
    # logger a handler that repeats every line Luigi's own handler already printed. Luigi's
    # default setup gives "luigi-interface" that handler; a user's logging setup is left alone.
    if logger.handlers:
        logger.propagate = False


class _CurrentStderr(logging.StreamHandler):
    """Writes to sys.stderr as it is when a line is said, not as it was at set-up: a test that
    imported the tasks has its captured stream closed by the time the run's end is said."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def set_up() -> None:
    """Set up the console of this command; later calls do nothing. Call it before anything
    imports TensorFlow, which reads TF_CPP_MIN_LOG_LEVEL as it loads."""
    global _notes
    if _notes is not None:
        return
    _notes = RunNotes()
    # TensorFlow's own logs are shown in full when the user sets TF_CPP_MIN_LOG_LEVEL below 3 (0
    # shows all); otherwise its C++ start-up lines (CUDA and TensorRT probes, cuDNN factory
    # registrations), its deprecation notices and its set-up chatter are left out. The variable
    # set here keeps the processes this one starts quiet too.
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3") == "3":
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
        logging.getLogger("tensorflow").addFilter(_TensorFlowChatter())
        # tf.compat.v1.layers, which model files from the Estimator guides use, warns at every call.
        warnings.filterwarnings("ignore", message=r".* is deprecated and will be removed", category=UserWarning)
        # TensorBoard's reader warns about each run's duplicate graph events when the report reads curves.
        logging.getLogger("tensorboard").setLevel(logging.ERROR)
    # The Estimator reports its evaluations, loss and steps/s at INFO, below TensorFlow's default level.
    logging.getLogger("tensorflow").setLevel(logging.INFO)

    handler = _CurrentStderr()
    handler.setFormatter(logging.Formatter("%(message)s"))
    story.addHandler(handler)
    story.setLevel(logging.INFO)
    story.propagate = False  # absl's root handler (see _keep_luigi_lines_single) would repeat it
    logger.addFilter(ConsoleFilter())

    for event, handler_function in ((luigi.Event.START, _on_start), (luigi.Event.START, _keep_luigi_lines_single),
                                    (luigi.Event.SUCCESS, _on_success), (luigi.Event.FAILURE, _on_failure),
                                    (luigi.Event.PROCESS_FAILURE, _note_failed),
                                    (luigi.Event.TIMEOUT, _note_failed),
                                    (luigi.Event.DEPENDENCY_PRESENT, _on_present),
                                    (luigi.Event.DEPENDENCY_DISCOVERED, _on_discovered)):
        luigi.Task.event_handler(event)(handler_function)
    # Forked worker processes leave through os._exit: only the scheduling process says this.
    atexit.register(_epilogue)
