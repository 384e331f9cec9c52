"""What a command asks for as a whole: one run (`RunAll`) or a grid of them (`Sweep`), each ending
with a record of what it made, printed when the command ends.

**Why the record is a dynamic dependency.** On a central scheduler shared with other processes,
Luigi's worker only knows as done the tasks it ran itself or found complete while scheduling: a
task that another process ran in the meantime stays "pending" in its summary and, unless seen
running, counts as "not granted run permission" (exit code 25), though everything was made. So
`RunAll` and `Sweep`, once their stages are done, yield their record, which requires every stage
of the DAG, together with the tasks of the DAG that are no stages (Convert's plan and shards, a
sweep's runs): Luigi schedules them all again, finds them complete, and counts them so. The
command exits 0 exactly when all it asked for exists. The record requires the stages alone, so
that in the scheduler's graph it sits on the stages and Convert's parts under Convert; the
gathering gains an edge to each part, which that count needs (Luigi re-checks only what a
running task yields or what an unfinished one requires).
"""
from __future__ import annotations

import itertools
from typing import Iterator

import luigi

from pipeline.errors import ChampionError, ConfigError, NotBlessed
from pipeline import storage
from pipeline.blessing import outcome
from pipeline.storage import TEMP_INFIX, read_json, write_json
from pipeline.leaderboard import rows_of, write_table
from pipeline.models import DATASET_PARAMS, declared_param_keys, resolve_model_file
from tasks.console import note
from tasks.parameters import GridParameter, UpstreamParameter
from tasks.base import PipelineTask, Stage, dag, load_board
from tasks.stages import Bless, Convert, Evaluate, Predict, Report, Train


class Gathering(PipelineTask):
    """A task that asks for stages and ends with one more, made from them (`closing`): yielded
    once they are done, for the reason this module's docstring gives."""

    def closing(self) -> Stage:
        raise NotImplementedError

    def done(self) -> bool:
        return all(task.done() for task in self.requires()) and self.closing().done()

    def complete(self):
        done = self.done()
        self.found_incomplete |= not done
        if done:
            # Luigi looks no further than a task found complete: the stages the index lacks are indexed here.
            for task in whole_dag(self):
                if isinstance(task, Stage) and task.done():
                    task.index_if_missing()
        return done

    def run(self):
        closing = self.closing()
        yield [closing, *(task for task in whole_dag(self) if not isinstance(task, Stage) and task is not self)]


def stages_of(*roots: luigi.Task) -> list[Stage]:
    """The stages `roots` are made from, and those among `roots`, upstream first."""
    return [task for task in dag(*roots) if isinstance(task, Stage)]


def whole_dag(root: luigi.Task) -> Iterator[luigi.Task]:
    """Every task `root` runs, upstream first, with the closing stage of a Gathering."""
    return dag(root, root.closing()) if isinstance(root, Gathering) else dag(root)


class RunAll(Gathering):
    """One run: its evaluation, the report of it, its blessing and batch prediction, for luigi.cfg's
    configuration or the Train given; ends with its record (run.json) and its result."""

    train = UpstreamParameter(Train, description="The Train stage; by default luigi.cfg's")
    require_blessed = luigi.BoolParameter(
        default=False, significant=False,
        description="Fail (a non-zero exit) when the model is not blessed; without it, a run whose model is not "
                    "blessed still succeeds, and run.json's blessing says so")

    def stages(self) -> tuple[Evaluate, Report, Predict, Bless]:
        evaluate = Evaluate(train=self.train)
        return evaluate, Report(evaluate=evaluate), Predict(train=self.train), Bless(evaluate=evaluate)

    def requires(self):
        return list(self.stages())

    def closing(self) -> RunRecord:
        evaluate, report, predict, bless = self.stages()
        return RunRecord(evaluate=evaluate, report=report, predict=predict, bless=bless)

    def done(self) -> bool:
        # Not done while a blessing it requires is missing: then run() fails it, saying why.
        return super().done() and (not self.require_blessed or self.closing().blessing()["blessed"])

    def run(self):
        yield from super().run()
        record = self.closing()
        blessing = record.blessing()
        if self.require_blessed and not blessing["blessed"]:
            # Under the record's key: the failure's note takes RunAll's.
            note(record.task_id, record.result())
            raise NotBlessed(f"the model of {self.train.directory} is not blessed ({blessing['reason']}), and "
                             f"--RunAll-require-blessed asks for a blessed one; the verdict: {blessing['path']}")


class RunRecord(Stage):
    """run.json: a run's result, its report and predictions, and the version and folder of every
    stage it took; in `run-<version>/` of the Train folder."""

    marker_name = "run.json"
    # Its requirements are the whole DAG, run before it (see this module's docstring): the console
    # does not call them reused.
    requires_whole_dag = True
    evaluate = UpstreamParameter(Evaluate)
    report = UpstreamParameter(Report)
    predict = UpstreamParameter(Predict)
    bless = UpstreamParameter(Bless)

    def where(self):
        return {"within": self.evaluate.train.directory}

    def requires(self):
        return stages_of(*self.upstream())

    def produce(self):
        # Luigi's scheduler clears a finished task's tracking URL when a worker re-adds it as done,
        # as this record's requirements do to Train: the finished run's TensorBoard link lives here.
        self.set_tracking_url(self.evaluate.train.tensorboard_link())
        metrics = read_json(self.evaluate.marker)
        write_json(self.marker, {
            "result": {key: metrics[key] for key in ("split", "accuracy", "loss", "examples", "global_step")},
            "report": self.report.marker, "predictions": self.predict.marker,
            "blessing": {**outcome(read_json(self.bless.marker)), "path": self.bless.marker},
            "stages": {task.task_id: {"stage": task.get_task_family(), "version": task.version,
                                      "path": task.directory}
                       for task in self.requires() if isinstance(task, Stage)}})

    def blessing(self) -> dict:
        """run.json's blessing: blessed, reason, failing, champion (at the check) and the verdict's path."""
        return read_json(self.marker)["blessing"]

    def result(self) -> str:
        record = read_json(self.marker)
        result = record["result"]
        return (f"RESULT {result['split']} accuracy {result['accuracy']:.4f} on {result['examples']} images\n"
                f"    {verdict_line(record['blessing'], champion_mark(self.bless))}\n"
                f"    report:      {record['report']}\n    predictions: {record['predictions']}\n"
                f"    verdict:     {record['blessing']['path']}")


def verdict_line(blessing: dict, champion: str) -> str:
    """BLESSED, or NOT BLESSED and why (the failing checks, or the reason where none failed); and
    whether the model is champion now."""
    verdict = (f"BLESSED: {blessing['reason']}" if blessing["blessed"]
               else f"NOT BLESSED: {'; '.join(blessing['failing']) or blessing['reason']}")
    return f"{verdict}{champion}"


def champion_mark(bless: Bless) -> str:
    """The mark of a model that is champion now, after its verdict; a damaged pointer is said, not
    raised: the result is printed from an event handler, whose exceptions Luigi only logs."""
    try:
        return " (CHAMPION)" if bless.is_champion() else ""
    except ChampionError as error:
        return f" (champion unknown: {error})"


@RunAll.event_handler(luigi.Event.SUCCESS)
@RunAll.event_handler(luigi.Event.DEPENDENCY_PRESENT)
def _note_result(task: RunAll) -> None:
    # DEPENDENCY_PRESENT: found complete when scheduled, so the run had nothing to do.
    note(task.task_id, task.closing().result())


class Sweep(Gathering):
    """A grid of training variants in one DAG, on one Download and Convert: each point of the grid
    (and each model file) is trained, evaluated, reported and predicted as RunAll does, and the
    sweep ends with their comparison, best first, beside the leaderboard."""

    grid = GridParameter(description="""JSON object of model params to lists of values, e.g. '{"learning_rate": """
                                     """[0.001, 0.003]}'; every combination is one run""")
    model_defs = luigi.ListParameter(default=[], description="Model files to sweep (names in model_defs/ or "
                                                             "paths); by default Train's model_def")

    def validate(self):
        for model_def in self.models():
            model_file = resolve_model_file(model_def)
            known = declared_param_keys(model_file)
            unknown = sorted(key for key in self.grid if known is not None and (key not in known
                                                                               or key in DATASET_PARAMS))
            if unknown:
                raise ConfigError(f"--grid key {unknown[0]!r} is not a param of model {model_def!r} "
                                  f"({model_file.name}); its params are "
                                  f"{', '.join(sorted(k for k in known if k not in DATASET_PARAMS))}")

    def models(self) -> list[str]:
        return list(self.model_defs) or [Train().model_def]

    def trains(self) -> list[Train]:
        """One Train per model and point of the grid, on one Convert. The params luigi.cfg gives
        Train are laid under the grid's for the model it names; other models get the grid's alone."""
        convert, configured = Convert(), Train()
        keys = sorted(self.grid)
        return [Train(convert=convert, model_def=model_def,
                      params={**(configured.params if model_def == configured.model_def else {}),
                              **dict(zip(keys, values))})
                for model_def in self.models() for values in itertools.product(*(self.grid[key] for key in keys))]

    def requires(self):
        return [RunAll(train=train) for train in self.trains()]

    def closing(self) -> Comparison:
        return Comparison(sweep=self)


class Comparison(Stage):
    """sweep-<version>.csv and .html beside the leaderboard: the leaderboard rows of one sweep's
    runs, best first."""

    # Its rows are the evaluations' leaderboard rows, with their reports' links, as their index
    # entries hold them.
    entry_points = ("pipeline.leaderboard:write_table", "pipeline.leaderboard:rows_of", "tasks.stages:Evaluate.entry",
                    "tasks.stages:Report.entry")
    requires_whole_dag = True  # as RunRecord's
    sweep = UpstreamParameter(Sweep)

    def evaluations(self) -> list[Evaluate]:
        return [run.stages()[0] for run in self.sweep.requires()]

    def verdicts(self) -> list[Bless]:
        return [run.stages()[3] for run in self.sweep.requires()]

    def shows(self):
        return self.verdicts()

    def upstream_versions(self):
        # Sorted, as the Sweep's id sorts its runs: the same grid in another order is the same sweep.
        # Its page shows each run's verdict: other thresholds, another comparison.
        return {f"{name}{number}": version for name, stages in (("run", self.evaluations()),
                                                                 ("verdict", self.verdicts()))
                for number, version in enumerate(sorted(stage.version for stage in stages))}

    @property
    def dataset(self):
        return self.sweep.trains()[0].dataset

    def where(self):
        return {}

    @property
    def marker(self):
        return storage.join(self.directory, f"sweep-{self.version}.csv")

    @property
    def owned(self):
        return self.marker

    def page(self) -> str:
        return self.marker.removesuffix(".csv") + ".html"

    def temporaries(self):
        return [f"{self.marker}{TEMP_INFIX}*", f"{self.page()}{TEMP_INFIX}*"]

    def requires(self):
        return stages_of(*self.sweep.requires())

    def upstream_keys(self):
        # The evaluations it compares and the verdicts it shows: the Sweep itself is no stage.
        return sorted(stage.index_key for stage in (*self.evaluations(), *self.verdicts()))

    def rows(self) -> list[dict]:
        # Its own verdicts and reports, not the newest on the board: another sweep may have checked
        # the same evaluations against other thresholds since.
        own = {evaluate.index_key: {"blessed": read_json(bless.marker)["blessed"], "link": report.link()}
               for evaluate, report, _, bless in (run.stages() for run in self.sweep.requires())}
        return rows_of(load_board(), [evaluate.index_key for evaluate in self.evaluations()], own)

    def produce(self):
        # The page is written first: the CSV, written last, is the marker.
        write_table(self.rows(), self.marker, self.page(), f"Sweep {self.version}")

    def summary(self) -> str:
        records = {run.train.version: run.closing() for run in self.sweep.requires()}
        lines = [f"SWEEP {len(self.evaluations())} runs, best first ({self.marker}, {storage.name(self.page())}):"]
        for row in self.rows():
            record = records[row["train_version"]]
            lines.append(f"    {row['rank']:>3}. {row['accuracy']:.4f} accuracy  {row['loss']:.4f} loss  "
                         f"{row['model']:<12} {row['params']}  {row['run']}\n"
                         f"         {verdict_line(record.blessing(), champion_mark(record.bless))}")
        return "\n".join(lines)


@Sweep.event_handler(luigi.Event.SUCCESS)
@Sweep.event_handler(luigi.Event.DEPENDENCY_PRESENT)
def _note_comparison(task: Sweep) -> None:
    note(task.task_id, task.closing().summary())
