"""The base of every stage task: its version and output folder, its marker target and `--rerun`."""
from __future__ import annotations

import functools
import gc
import hashlib
import importlib
import json
import logging
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import luigi
from tqdm import tqdm

from pipeline import leaderboard, versioning
from pipeline.errors import ConfigError
from pipeline.fileio import TEMP_INFIX, file_lock, remove_temporaries
from tasks.console import pipeline_error

logger = logging.getLogger("luigi-interface")


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
    # Whether produce() uses TensorFlow.
    uses_tensorflow = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._scheduled_ns = time.time_ns()

    def complete(self) -> bool:
        try:
            modified_ns = Path(self.output().path).stat().st_mtime_ns
        except FileNotFoundError:
            modified_ns = None
        done = modified_ns is not None and (not self.rerun or modified_ns >= self._scheduled_ns)
        if not done and self.uses_tensorflow and "tensorflow" not in sys.modules:
            # Luigi checks completeness while scheduling, in the process that later forks one
            # worker process per task under --workers N. Importing TensorFlow there once, and
            # only when a task that needs it will run, spares each fork its ~3 s import.
            importlib.import_module("tensorflow")
            # Frozen, TensorFlow's Python objects are left out of garbage collection. Otherwise
            # every full collection walks them again: in a forked worker that walk copies each
            # page it touches, and at exit it costs about a second. Convert at 5k images with 2
            # workers took 9.0-12.9 s without this and 5.4-5.9 s with it.
            gc.freeze()
        return done

    def run(self):
        """Produce the output while holding its lock.

        A second pipeline process that reaches the same output (another `--local-scheduler` run,
        say) waits here, then finds it complete and does nothing, instead of writing beside this
        one. Under the lock, what an interrupted run left is removed first.
        """
        output = Path(self.output().path).resolve()
        lock_name = hashlib.sha256(str(output).encode()).hexdigest()[:20]
        with file_lock(Path(layout().data_root) / ".locks" / f"{lock_name}.lock", holder=str(self)):
            if self.complete():
                logger.info("%s was completed by another process while this one waited", self)
                return
            remove_temporaries(self.temporaries())
            self.produce()

    def produce(self) -> None:
        """Write the output: unpack the inputs and call one `pipeline` function."""
        raise NotImplementedError

    def on_failure(self, exception: BaseException) -> str:
        # What the scheduler keeps as the failure's explanation (the UI shows it, and another
        # process waiting for this task prints it): the pipeline's own message, or a bug's traceback.
        return str(pipeline_error(exception) or super().on_failure(exception))

    def temporaries(self) -> list[Path]:
        """Glob patterns of what an interrupted run of this task may have left."""
        return [Path(f"{self.output().path}{TEMP_INFIX}*")]


class Stage(Rerunnable):
    """A pipeline stage. Subclasses set `stage`, list `upstream()` and implement `produce()`."""

    stage: str = ""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Checked as each task is made, its upstream made with it: a bad value anywhere in the
        # DAG fails when the root task is built, before any stage is scheduled or run.
        self.validate()
        self.upstream()

    def validate(self) -> None:
        """Raise ConfigError for a parameter value this stage cannot use, naming the valid ones."""

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

    def temporaries(self) -> list[Path]:
        # A stage's folder is its own (nested stages live in subfolders), so anything temporary in it is stale.
        return [self.stage_output.directory / f"*{TEMP_INFIX}*"]


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


class ParamsParameter(luigi.DictParameter):
    """A JSON object on the command line; anything else is refused with the value and an example."""

    def parse(self, source):
        try:
            value = super().parse(source)
        except ValueError as error:
            raise ConfigError(f"--params {source!r} is not valid JSON ({error}); expected a JSON object "
                              """such as '{"learning_rate": 0.0005}'""") from None
        if not isinstance(value, Mapping):
            raise ConfigError(f"--params {source!r} is a JSON {type(value).__name__}; expected a JSON object "
                              "of the model's PARAMS keys")
        return value
