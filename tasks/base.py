"""The base of every stage task: its version and output folder, its marker target and `--rerun`."""
from __future__ import annotations

import functools
import json
import logging
import time
from pathlib import Path

import luigi

from pipeline import versioning


class layout(luigi.Config):  # noqa: N801 - Luigi names a config section after its class
    data_root = luigi.Parameter(default="data", description="Folder of downloaded and converted datasets")
    results_root = luigi.Parameter(default="results", description="Folder of training runs and index.json")


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


@Stage.event_handler(luigi.Event.SUCCESS)
def _record_in_index(task: Stage) -> None:
    versioning.record_version(Path(layout().results_root) / "index.json", task.stage_output,
                              task.significant_values(), [u.stage_output for u in task.upstream()])


@Rerunnable.event_handler(luigi.Event.START)
def _keep_luigi_lines_single(task: Rerunnable) -> None:
    # absl (inside TensorFlow) calls logging.basicConfig() on its first message, giving the root
    # logger a handler that repeats every line Luigi's own handler already printed. Luigi's
    # default setup gives "luigi-interface" that handler; a user's logging setup is left alone.
    interface = logging.getLogger("luigi-interface")
    if interface.handlers:
        interface.propagate = False
