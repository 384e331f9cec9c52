"""The base classes of the pipeline's tasks, and the index they record their versions in.

- `PipelineTask`: what every task shares: its Luigi id, derived from what it makes; its upstream
  tasks, given as parameters; how it shows in logs and in the scheduler's UI. The gatherings
  (`RunAll`, `Sweep`, see tasks.runs) are plain `PipelineTask`s.
- `Step`: a task that writes one output under that output's lock, complete once it exists (under
  `--rerun`, once it was rewritten). The steps that are not stages are parts of one: Convert's
  plan and shards, written into its folder.
- `Stage`: a step whose output is a folder of its own, named by its version, and recorded in the
  index once complete.

**One identity.** A stage's version hashes its identity: its significant parameters, the
versions of the stages it reads (passed as parameters, see `UpstreamParameter`), the code it
runs (its `entry_points` and its own `produce`, followed by pipeline.fingerprint) and, for Train
and what follows, the model file. Its folder is derived from that version by `stage_folder`
(tasks.config), and its Luigi task id from that folder. So two tasks that would write different
folders never share an id, on any scheduler, and two that would write the same folder always do.
"""
from __future__ import annotations

import functools
import gc
import hashlib
import importlib
import sys
import time
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, Iterator

import luigi
from luigi.parameter import ParameterVisibility
from luigi.task_register import Register, TaskClassException

from pipeline import index as version_index
from pipeline import fingerprint, storage, versioning
from pipeline.errors import CorruptShard
from pipeline.locks import file_lock
from pipeline.storage import TEMP_INFIX, remove_temporaries
from pipeline.leaderboard import (BOARD_FILE, board_of, read_board, rebuild_leaderboard, shown, with_entry,
                                  write_board)
from pipeline.convert import report_of
from tasks.config import (entry_patterns, index_folder, isolate_remote_io, layout_roots, locks_folder, results_root,
                          stage_folder)
from tasks.console import pipeline_error, say, task_name
from tasks.parameters import UpstreamParameter

# Whether, when and where a stage runs (scheduling, locks, folders), its identity and the index:
# a stage's version is decided here, what its produce() computes is not (see pipeline.fingerprint).
AFFECTS_RESULTS = False


def _short_hash(text: str, length: int = 16) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def location(path: str) -> str:
    """An output's place as every process names it: its S3 URI or absolute local path."""
    return storage.absolute(path)


def folder_id(version: str, directory: str) -> str:
    """The Luigi id suffix of what a version's folder holds: its version, and the folder as every
    process names it (the same version under another root is another output)."""
    return f"{version}_{_short_hash(location(directory), 8)}"


class StorageTarget(luigi.Target):
    """A file on a local disk or in S3 (see pipeline.storage), as a Luigi target."""

    def __init__(self, path: str):
        self.path = str(path)

    def exists(self) -> bool:
        return storage.exists(self.path)


def dag(*roots: luigi.Task) -> Iterator[luigi.Task]:
    """Every task `roots` require, directly or not, each once, upstream before downstream."""
    seen: set[str] = set()

    def visit(task: luigi.Task) -> Iterator[luigi.Task]:
        if task.task_id in seen:
            return
        seen.add(task.task_id)
        for required in luigi.task.flatten(task.requires()):
            yield from visit(required)
        yield task

    for root in roots:
        yield from visit(root)


class PipelineTask(luigi.Task):
    """A task whose Luigi id is derived from what it makes (`id_suffix`), not from its own
    parameters alone, which would leave out what it reads; its upstream tasks are parameters
    (`UpstreamParameter`), the ones luigi.cfg describes when left out."""

    # Whether this process found it incomplete: then, found complete later, it was made in this
    # run (here or by another process), not reused. Luigi keeps one instance per task and process.
    found_incomplete = False
    # Whether the console says "reused" of it when it is found complete.
    said_reused = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for name in self.upstream_names():
            if getattr(self, name) is None:
                setattr(self, name, self.default_upstream(name))
                self.param_kwargs[name] = getattr(self, name)
        # Checked as each task is made, its upstream made with it: a bad value anywhere in the
        # DAG fails when the root task is built, before any task is scheduled or run.
        self.validate()
        self.task_id = f"{self.get_task_family()}_{self.id_suffix()}"

    def __hash__(self):
        return hash(self.task_id)

    @classmethod
    def upstream_names(cls) -> list[str]:
        return [name for name, param in cls.get_params() if isinstance(param, UpstreamParameter)]

    def upstream(self) -> list[luigi.Task]:
        """The upstream tasks, in parameter order (for a stage, those whose versions its version depends on)."""
        return [getattr(self, name) for name in self.upstream_names()]

    def default_upstream(self, name: str) -> luigi.Task:
        """The upstream task `name` when none was given: the one its section of luigi.cfg describes."""
        return dict(self.get_params())[name].task_class()

    def validate(self) -> None:
        """Raise ConfigError for a parameter value this task cannot use, naming the valid ones."""

    def id_suffix(self) -> str:
        """By default, a hash of what the task requires: the id of a task that makes nothing itself."""
        return _short_hash(" ".join(sorted(task.task_id for task in luigi.task.flatten(self.requires()))))

    def significant_values(self) -> dict[str, Any]:
        """The significant parameters of this task's own, as JSON values."""
        upstream = set(self.upstream_names())
        return {name: _thawed(getattr(self, name)) for name, param in self.get_params()
                if param.significant and name not in upstream}

    def shown(self) -> dict[str, str]:
        """What names this task beside its own significant parameters: its upstream tasks, as
        Family@version, as the index keys them (a task not in the index, by its id; a stand-in for
        a stage, such as the champion's Train, as that stage); their whole parameters would bury
        this task's own."""
        upstream = [task.index_key.replace("/", "@") if hasattr(task, "index_key") else task.task_id
                    for task in self.upstream() if task is not None]
        return {"upstream": ", ".join(upstream)} if upstream else {}

    def __repr__(self) -> str:
        shown = {**self.significant_values(), **self.shown()}
        return f"{self.get_task_family()}({', '.join(f'{name}={value}' for name, value in shown.items())})"

    # The scheduler's task list and dependency graph show of a task the parameters Luigi sends it
    # as public: here what its repr shows, its own significant parameters and `shown()`. The rest
    # is sent too, hidden: Luigi rebuilds a task from it in another process (a dynamic
    # dependency), and ignores the keys of `shown()`, which are no parameters.

    def to_str_params(self, only_significant=False, only_public=False):
        return {**super().to_str_params(only_significant=only_significant, only_public=only_public), **self.shown()}

    def _get_param_visibilities(self):
        public = {name for name, param in self.get_params() if param.visibility == ParameterVisibility.PUBLIC}
        shown = (public & set(self.significant_values())) | set(self.shown())
        return {name: (ParameterVisibility.PUBLIC if name in shown else ParameterVisibility.HIDDEN).serialize()
                for name in self.to_str_params()}


class Step(PipelineTask):
    """A task that writes one output (a `StorageTarget`) under that output's lock: complete when
    the output exists; under --rerun, only once it was rewritten after the task was scheduled. The
    check reads the file's time, so it holds in forked worker processes too."""

    rerun = luigi.BoolParameter(default=False, significant=False,
                                description="Ignore this stage's finished outputs and run it again; "
                                            "upstream stages are left as they are")
    # Whether produce() uses TensorFlow.
    uses_tensorflow: ClassVar[bool] = False
    # Whether this step's --rerun remakes, in the same run, the steps that show its output (a
    # verdict made again is shown again); otherwise they are left as they are.
    rerun_remakes_downstream: ClassVar[bool] = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._scheduled_ns = time.time_ns()
        isolate_remote_io()

    def id_suffix(self) -> str:
        return _short_hash(location(self.output().path))

    def done(self) -> bool:
        """Whether the output is there (and, rerun, rewritten since scheduling); no side effects."""
        path = self.output().path
        return storage.written_since(path, self._scheduled_ns) if self.rerunning() else storage.exists(path)

    def rerunning(self) -> bool:
        """Whether this step is made again in this run: under its --rerun, or that of a step it shows."""
        return self.rerun or any(isinstance(task, Step) and task.rerun and task.rerun_remakes_downstream
                                 for task in self.shows())

    def shows(self) -> list[luigi.Task]:
        """The tasks whose output this step's output shows: by default, its upstream tasks."""
        return self.upstream()

    def complete(self) -> bool:
        done = self.done()
        self.found_incomplete |= not done
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
        one. Under the lock, what an interrupted run left is removed first. A corrupt shard met on
        the way loses its report, so that the next run rebuilds that shard.
        """
        with file_lock(self.lock_path(), holder=str(self), guards=location(self.output().path)):
            if self.complete():
                say(f"{task_name(self)} was made by another process while this one waited")
                return
            remove_temporaries(self.temporaries())
            try:
                self.produce()
            except CorruptShard as error:
                storage.remove_tree(report_of(error.shard))
                raise
            self.produced()

    def lock_path(self) -> str:
        output = location(self.output().path)
        return storage.join(locks_folder(output), f"{_short_hash(output, 20)}.lock")

    def produce(self) -> None:
        """Write the output: unpack the inputs and call one `pipeline` function."""
        raise NotImplementedError

    def produced(self) -> None:
        """What follows a completed output, still under its lock; a failure here fails the task."""

    def on_failure(self, exception: BaseException) -> str:
        # What the scheduler keeps as the failure's explanation (the UI shows it, and another
        # process waiting for this task prints it): the pipeline's own message, or a bug's traceback.
        return str(pipeline_error(exception) or super().on_failure(exception))

    def temporaries(self) -> list[str]:
        """Glob patterns of what an interrupted run of this task may have left."""
        return [f"{self.output().path}{TEMP_INFIX}*"]


class Stage(Step):
    """A pipeline stage: one versioned folder, complete once its marker, written last, exists.

    Subclasses set `marker_name` and `entry_points` (the pipeline functions `produce()` calls, as
    `module:name`, and any other code that makes their output), declare their upstream stages as
    `UpstreamParameter`s, say `where` their folder lies (the values `stage_folder` needs besides
    the version) and implement `produce()`.
    """

    marker_name: ClassVar[str] = ""
    entry_points: ClassVar[tuple[str, ...]] = ()

    def id_suffix(self) -> str:
        return folder_id(self.version, self.directory)

    def upstream_versions(self) -> dict[str, str]:
        return {name: task.version for name, task in zip(self.upstream_names(), self.upstream())}

    def content(self) -> bytes:
        """Bytes beyond the parameters that the result depends on (a model file's source)."""
        return b""

    @functools.cached_property
    def identity(self) -> dict[str, Any]:
        content = self.content()
        return {"stage": self.get_task_family(), "params": self.significant_values(),
                "upstream": self.upstream_versions(),
                "code": fingerprint.code_identity(self.code_entry_points()),
                "content": hashlib.sha256(content).hexdigest() if content else None}

    @classmethod
    def code_entry_points(cls) -> tuple[str, ...]:
        """`entry_points`, and this stage's own produce(): it decides what they are given. Named
        on this class, so that `self.x` in it is followed to this class's x (see pipeline.fingerprint)."""
        return (*cls.entry_points, f"{cls.__module__}:{cls.__qualname__}.produce")

    @functools.cached_property
    def version(self) -> str:
        return versioning.version_of(self.identity)

    def where(self) -> dict[str, str]:
        """What `stage_folder` needs, besides the version, to place this stage's folder."""
        return {"dataset": self.dataset}

    @functools.cached_property
    def directory(self) -> str:
        return stage_folder(self.get_task_family(), self.version, **self.where())

    @property
    def marker(self) -> str:
        """The file written last: while it is missing, the stage is not complete."""
        return storage.join(self.directory, self.marker_name)

    @property
    def owned(self) -> str:
        """What is this stage's alone, which removing it removes: its folder, or its marker where
        it writes into a folder that is not its own."""
        return self.directory

    @property
    def dataset(self) -> str:
        return self.upstream()[0].dataset

    def requires(self):
        return [*self.upstream(), *self.also_reads()]

    def also_reads(self) -> list[Stage]:
        """Stages read directly beside the upstream ones, whose versions the upstream's already
        include (Evaluate reads Train's Convert): required, so that each is checked, and
        repaired, before this one runs."""
        return []

    def output(self) -> StorageTarget:
        return StorageTarget(self.marker)

    def temporaries(self) -> list[str]:
        # A stage's folder is its own (nested stages live in subfolders), so anything temporary in it is stale.
        return [storage.join(self.directory, f"*{TEMP_INFIX}*")]

    @property
    def index_key(self) -> str:
        return f"{self.get_task_family()}/{self.version}"

    @property
    def entry_path(self) -> str:
        """This version's own copy of its index entry (see pipeline.index)."""
        return version_index.entry_file(self.owned, self.marker)

    def entry(self) -> dict:
        """The index entry of this completed stage, with what the index's views need of it."""
        return version_index.index_entry(
            self.get_task_family(), self.version, self.owned, self.identity, dataset=self.dataset,
            marker=self.marker, upstream=self.upstream_keys())

    def upstream_keys(self) -> list[str]:
        """The index keys of the stages this one is made from."""
        return [task.index_key for task in self.upstream()]

    def complete(self) -> bool:
        done = super().complete()
        if done:
            self.index_if_missing()
        return done

    def produced(self) -> None:
        # In the task, not in a SUCCESS handler, whose exceptions Luigi only logs: a stage the
        # index missed would be left off the leaderboard and out of reach of explain and gc.
        # The entry file first: from it, a run cut off before the index update is indexed again.
        entry = self.entry()
        storage.write_json(self.entry_path, entry)
        self._index(entry)

    def index_if_missing(self) -> None:
        """Index this complete stage if the index lacks it (a run was cut off between its marker and
        its index update), from its entry file or, failing that, anew. Cheap when it is indexed:
        one read of its own index file, once per process."""
        folder = index_folder()
        if (folder, self.index_key) in _indexed or version_index.indexed(folder, self.index_key, index_repair()):
            _indexed.add((folder, self.index_key))
            return
        try:
            entry = storage.read_json(self.entry_path)
        except (FileNotFoundError, ValueError):
            entry = None
        # Trusted only as this version's own: an entry file sits among data a download unpacked.
        if not isinstance(entry, dict) or [entry.get(field) for field in ("stage", "version", "path", "marker")] != \
                [self.get_task_family(), self.version, str(self.owned), self.marker]:
            entry = self.entry()
            storage.write_json(self.entry_path, entry)
        self._index(entry, only_if_missing=True)

    def _index(self, entry: dict, only_if_missing: bool = False) -> None:
        """Put `entry` in the index, and on the leaderboard if it shows there."""
        folder = index_folder()
        version_index.record(folder, entry, index_repair(), only_if_missing,
                             view=(lambda: write_board(results_root(), with_entry(load_board(), entry)))
                             if shown(entry) else None)
        _indexed.add((folder, self.index_key))


# (index folder, key) of the versions this process found indexed: a completeness check reads a
# stage's index file once.
_indexed: set[tuple[str, str]] = set()


def show_leaderboard(index: dict) -> None:
    rebuild_leaderboard(results_root(), index)


def index_repair() -> version_index.IndexRepair:
    return version_index.IndexRepair(entry_patterns(), layout_roots(), rebuilt=show_leaderboard,
                                     amend=add_entry_files)


def load_index() -> dict:
    """The whole index, rebuilt from the entry files when it is missing or damaged."""
    folder = index_folder()
    index = version_index.load_index(folder, index_repair())
    _indexed.update((folder, key) for key in index)
    return index


def load_board() -> dict:
    """The leaderboard's board (see pipeline.leaderboard), rebuilt from the index when it is missing
    or damaged."""
    board = read_board(results_root())
    if board is not None:
        return board
    with version_index.index_lock(index_folder()):
        board = read_board(results_root())
        if board is None:
            board = board_of(version_index.read_or_rebuild(index_folder(), index_repair()).values())
            write_board(results_root(), board)
    return board


def add_entry_files(index: dict) -> None:
    """Write the entry file of each version indexed before versions had one (its entry has no
    marker), so that a rebuild of the index does not drop it; its entry gains its marker, so this
    is done once. Called when the index is repaired, which an older pipeline's index.json is
    taken over by, rather than in completeness checks: a no-op rerun pays nothing."""
    for entry in (entry for entry in index.values() if "marker" not in entry):
        try:
            marker_name = Register.get_task_cls(entry["stage"]).marker_name
        except (TaskClassException, AttributeError):
            continue  # a stage this code no longer has: its marker is unknown
        # A stage without a marker name is its marker, a file among others (a Comparison's CSV).
        entry["marker"] = storage.join(entry["path"], marker_name) if marker_name else entry["path"]
        if version_index.within(entry["path"], layout_roots()) and storage.exists(entry["marker"]):
            storage.write_json(version_index.entry_file(entry["path"], entry["marker"]), entry)


def remove_versions(paths: Iterable[str]) -> list[str]:
    """Remove the outputs of versions (their folders, or files), then forget them: the index drops
    every version within one removed, and the leaderboard loses their rows. What was removed is
    forgotten even when a later removal fails. Returns the paths removed."""
    removed: list[str] = []
    try:
        for path in paths:
            storage.remove_tree(path)
            removed.append(path)
    finally:
        folder = index_folder()
        with version_index.index_lock(folder):
            # The board goes first and is rebuilt from the index once it forgot them: cut off in
            # between, the next update rebuilds it so (see load_board). Rebuilt, it also loses the
            # row of a stage cut off between putting it there and writing its index file.
            storage.remove_tree(storage.join(results_root(), BOARD_FILE))
            gone = version_index.forget_folders(folder, removed, index_repair())
            load_board()
        _indexed.difference_update((folder, key) for key in gone)
    return removed


def _thawed(value: Any) -> Any:
    """Luigi's frozen containers (FrozenOrderedDict, tuples) as plain JSON values."""
    if isinstance(value, Mapping):
        return {key: _thawed(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_thawed(item) for item in value]
    return value
