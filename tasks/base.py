"""The base of every stage task: its version and output folder, its marker target and `--rerun`."""
from __future__ import annotations

import functools
import json
import logging
import sys
import time
from pathlib import Path

import luigi
import luigi.rpc
from tqdm import tqdm

from pipeline import leaderboard, versioning


class layout(luigi.Config):  # noqa: N801 - Luigi names a config section after its class
    data_root = luigi.Parameter(default="data", description="Folder of downloaded and converted datasets")
    results_root = luigi.Parameter(default="results", description="Folder of training runs and index.json")


class TaskProgress:
    """The `Progress` callback a task hands to library code.

    It relays progress to the scheduler, which the UI shows live, at most once a second (each
    update is an RPC), and draws a bar when stderr is a terminal, so that CI logs stay clean.
    """

    def __init__(self, task: luigi.Task, interval_s: float = 1.0):
        self._task, self._interval_s = task, interval_s
        self._sent_at = float("-inf")
        self._bar: tqdm | None = None

    def __call__(self, done: int, total: int | None, unit: str, detail: str) -> None:
        finished = total is not None and done >= total
        now = time.monotonic()
        if finished or now - self._sent_at >= self._interval_s:
            self._sent_at = now
            of_total = f"/{total}" if total is not None else ""
            self._task.set_status_message(f"{done}{of_total} {unit}" + (f" - {detail}" if detail else ""))
            if total:
                self._task.set_progress_percentage(min(100, round(100 * done / total)))
        if sys.stderr.isatty():
            self._draw(done, total, unit, detail)

    def _draw(self, done: int, total: int | None, unit: str, detail: str) -> None:
        if self._bar is None or self._bar.unit != unit:
            self.close()
            self._bar = tqdm(total=total, unit=unit, desc=self._task.task_family, leave=False, dynamic_ncols=True,
                             unit_scale=unit == "bytes")
        self._bar.total = total
        self._bar.set_postfix_str(detail, refresh=False)
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> TaskProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Rerunnable(luigi.Task):
    """A task complete when its output exists; under --rerun, only once it was rewritten after the
    task was scheduled. The check reads the file's time, so it holds in forked worker processes too."""

    rerun = luigi.BoolParameter(default=False, significant=False,
                                description="Ignore this stage's finished outputs and run it again; "
                                            "upstream stages are left as they are")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._scheduled_ns = time.time_ns()

    def complete(self) -> bool:
        try:
            modified_ns = Path(self.output().path).stat().st_mtime_ns
        except FileNotFoundError:
            return False
        return not self.rerun or modified_ns >= self._scheduled_ns


class Stage(Rerunnable):
    """A pipeline stage. Subclasses set `stage`, list `upstream()` and implement `run()`."""

    stage: str = ""

    def upstream(self) -> list[Stage]:
        """The stages whose versions this one's version depends on; the first is the one it reads or nests in."""
        return []

    def content(self) -> bytes:
        """Bytes beyond the parameters that the result depends on (a model file's source)."""
        return b""

    def significant_values(self) -> dict:
        values = {}
        for name, param in self.get_params():
            if param.significant:
                value = getattr(self, name)
                values[name] = json.loads(param.serialize(value)) if isinstance(param, luigi.DictParameter) else value
        return values

    @functools.cached_property
    def stage_output(self) -> versioning.StageOutput:
        roots = layout()
        return versioning.stage_output(self.stage, self.significant_values(),
                                       [task.stage_output for task in self.upstream()],
                                       Path(roots.data_root), Path(roots.results_root), self.content())

    def requires(self):
        return self.upstream()

    def output(self) -> luigi.LocalTarget:
        return luigi.LocalTarget(str(self.stage_output.marker))


class tensorboard(luigi.Config):  # noqa: N801 - Luigi names a config section after its class
    url = luigi.Parameter(default="http://127.0.0.1:6006",
                          description="Where `make tensorboard` serves the results folder; Train links to it")


@Stage.event_handler(luigi.Event.SUCCESS)
def _record_in_index(task: Stage) -> None:
    results_root = Path(layout().results_root)
    versioning.record_version(results_root / versioning.INDEX_FILE, task.stage_output,
                              task.significant_values(), [u.stage_output for u in task.upstream()])
    # Every stage, not only evaluations: Train --rerun removes the evaluations of the old weights.
    leaderboard.rebuild_leaderboard(results_root)


class _SchedulerHint(logging.Filter):
    """Turns Luigi's traceback for an unreachable central scheduler into one line saying what to do."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, luigi.rpc.RPCError):
            record.msg = ("%s. Start the central scheduler with `make ui` (or `luigid`), "
                          "or pass --local-scheduler to run without one.")
            record.args = (error,)
            record.exc_info = record.exc_text = None
        return True


logging.getLogger("luigi-interface").addFilter(_SchedulerHint())


@Rerunnable.event_handler(luigi.Event.START)
def _keep_luigi_lines_single(task: Rerunnable) -> None:
    # absl (inside TensorFlow) calls logging.basicConfig() on its first message, giving the root
    # logger a handler that repeats every line Luigi's own handler already printed. Luigi's
    # default setup gives "luigi-interface" that handler; a user's logging setup is left alone.
    interface = logging.getLogger("luigi-interface")
    if interface.handlers:
        interface.propagate = False
