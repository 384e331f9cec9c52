"""The pipeline's Luigi tasks. Each `produce()` (called by `run()` under the output's lock, see
tasks.base) unpacks its inputs and calls one `pipeline` function.

TensorFlow-backed library modules are imported inside `produce()`, so that `--help` and no-op
reruns never load TensorFlow; scheduling imports it only when such a task will run (see
`Rerunnable.complete`).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import luigi
from luigi.util import inherits

from pipeline import download, versioning
# pipeline.convert imports TensorFlow only inside write_shard, so it is imported here whole.
from pipeline.convert import (PLAN_FILE, SPLITS, finalize_conversion, plan_conversion, report_name, shard_name,
                              shard_paths, validate_conversion_params, write_shard)
from pipeline.errors import ConfigError, StageOutputError
from pipeline.fileio import TEMP_INFIX, read_json, remove_tree
from pipeline.models import (MODEL_DIR, RUN_CONFIG_KEYS, check_param_overrides, declared_param_keys,
                             require_positive, resolve_model_file, validate_training_settings)
from pipeline.services import tensorboard_url
from tasks.base import ParamsParameter, Rerunnable, Stage, TaskProgress, layout, tensorboard
from tasks.console import run_notes


class Download(Stage):
    """Fetch an image-folder archive or a CSV manifest into data/raw/<dataset>/<version>/<class>/<file>."""

    stage = "download"
    dataset = luigi.Parameter(description="Dataset name; names its folders under data/")
    source_url = luigi.Parameter(description="http(s) or file URL of an archive (.tar.gz, .tgz, .tar, .zip) whose "
                                             "folders are the classes, or of a CSV manifest of url,label lines; "
                                             "end it in #sha256=<hex> to have the file checked")
    skip_failed_images = luigi.BoolParameter(
        default=False, description="In a manifest, leave out images that cannot be fetched (listed in "
                                   "download.json) instead of failing the download")
    # Not `workers`: that would clash with Luigi's own --workers when Download is the task named.
    parallel_fetches = luigi.IntParameter(default=8, significant=False,
                                          description="Images fetched at once from a manifest")
    timeout_s = luigi.FloatParameter(default=60.0, significant=False,
                                     description="Seconds without data before a fetch is retried")

    def validate(self):
        download.source_kind(self.source_url)
        download.split_checksum(self.source_url)
        versioning.safe_name("dataset", self.dataset)

    def temporaries(self):
        # The work folder beside the version's folder; see download.download_dataset.
        folder = self.stage_output.directory
        return [folder.parent / f"{folder.name}{TEMP_INFIX}*"]

    def produce(self):
        out = self.stage_output
        with TaskProgress(self) as progress:
            download.download_dataset(self.source_url, out.directory, out.marker.name,
                                      workers=self.parallel_fetches, timeout_s=self.timeout_s,
                                      skip_failed_images=self.skip_failed_images, progress=progress)


class Convert(Stage):
    """Split the images and write sharded TFRecords plus metadata.json to data/tfrecords/<dataset>/<version>/."""

    stage = "convert"
    image_size = luigi.IntParameter(description="Side in pixels of the square images stored in the records")
    channels = luigi.IntParameter(description="1 (grey) or 3 (RGB)")
    validation_fraction = luigi.FloatParameter(description="Share of each class put in the validation split")
    test_fraction = luigi.FloatParameter(description="Share of each class put in the test split")
    split_seed = luigi.IntParameter(description="Seed of the deterministic split")
    num_shards = luigi.IntParameter(description="Shards per split; each is written by its own task")
    max_bad_fraction = luigi.FloatParameter(description="Largest share of undecodable images tolerated")

    def upstream(self):
        return [Download()]

    def validate(self):
        validate_conversion_params(self.image_size, self.channels, self.validation_fraction, self.test_fraction,
                                   self.num_shards, self.max_bad_fraction)

    def requires(self):
        return [self.clone(ConvertShard, split=split, index=index)
                for split in SPLITS for index in range(self.num_shards)]

    def complete(self):
        # A shard found corrupt loses its report (see convert.shard_paths): then Convert reruns
        # to rebuild that shard and check it against the others.
        return super().complete() and all(shard.complete() for shard in self.requires())

    def produce(self):
        out = self.stage_output
        raw = self.upstream()[0].stage_output
        finalize_conversion(out.directory, [Path(target.path) for target in self.input()], out.marker,
                            image_size=self.image_size, channels=self.channels,
                            max_bad_fraction=self.max_bad_fraction,
                            source={"download_version": raw.version, **read_json(raw.marker)})


@inherits(Convert)
class PlanConversion(Rerunnable):
    """Fix the split and shard of every image (plan.json in the Convert folder)."""

    def requires(self):
        return Download()

    def output(self):
        return luigi.LocalTarget(str(self.clone(Convert).stage_output.directory / PLAN_FILE))

    def produce(self):
        plan_conversion(Path(self.input().path).parent, Path(self.output().path),
                        validation_fraction=self.validation_fraction, test_fraction=self.test_fraction,
                        split_seed=self.split_seed, num_shards=self.num_shards)


@inherits(Convert)
class ConvertShard(Rerunnable):
    """Write one TFRecord shard; its JSON report, written after it, is the target."""

    uses_tensorflow = True
    split = luigi.ChoiceParameter(choices=SPLITS, description="Split this shard belongs to")
    index = luigi.IntParameter(description="Shard number within the split")

    def requires(self):
        return {"plan": self.clone(PlanConversion), "raw": Download()}

    def output(self):
        folder = self.clone(Convert).stage_output.directory
        return luigi.LocalTarget(str(folder / report_name(self.split, self.index, self.num_shards)))

    def shard_path(self) -> Path:
        return Path(self.output().path).with_name(shard_name(self.split, self.index, self.num_shards))

    def temporaries(self):
        return [*super().temporaries(), Path(f"{self.shard_path()}{TEMP_INFIX}*")]

    def produce(self):
        with TaskProgress(self) as progress:
            write_shard(Path(self.input()["raw"].path).parent, Path(self.input()["plan"].path), self.split,
                        self.index, self.shard_path(), Path(self.output().path),
                        image_size=self.image_size, channels=self.channels, progress=progress)


class Train(Stage):
    """Train an Estimator from a model file; results/<dataset>/<model>-<version>/ holds model_dir and export."""

    stage = "train"
    uses_tensorflow = True
    model_def = luigi.Parameter(description="Model file: a name in model_defs/ (e.g. cnn) or a path to a .py file")
    params = ParamsParameter(default={}, description="JSON object laid over the model file's PARAMS")
    max_steps = luigi.IntParameter(description="Global step to train to; a rerun resumes from the last checkpoint")
    batch_size = luigi.IntParameter(description="Examples per training step")
    tf_random_seed = luigi.IntParameter(description="RunConfig.tf_random_seed: seeds initialisation and shuffling")
    early_stopping_steps = luigi.IntParameter(
        default=0, description="Stop once the validation loss has not decreased for this many steps; 0: never")
    save_checkpoints_steps = luigi.IntParameter(
        significant=False, description="Steps between checkpoints; each is followed by an evaluation on the "
                                       "validation split (with early stopping, this decides where it may stop)")
    eval_throttle_secs = luigi.IntParameter(
        default=0, significant=False,
        description="At most one validation evaluation per this many seconds (0: after every checkpoint); "
                    "ignored with early stopping, which evaluates every checkpoint")
    save_summary_steps = luigi.IntParameter(significant=False, description="Steps between TensorBoard summaries")
    keep_checkpoint_max = luigi.IntParameter(significant=False, description="Checkpoints kept in model_dir")
    log_step_count_steps = luigi.IntParameter(significant=False, description="Steps between loss and steps/s logs")

    def upstream(self):
        return [Convert()]

    def validate(self):
        model_file = resolve_model_file(self.model_def)
        known = declared_param_keys(model_file)
        if known is not None:  # otherwise checked once the model file is loaded, in produce()
            check_param_overrides(model_file, known, self.params)
        validate_training_settings(self.max_steps, self.batch_size, self.run_config())
        if self.early_stopping_steps < 0 or self.eval_throttle_secs < 0:
            raise ConfigError(f"early_stopping_steps={self.early_stopping_steps}, eval_throttle_secs="
                              f"{self.eval_throttle_secs}; expected 0 (off) or a positive number")

    def run_config(self) -> dict:
        return {key: getattr(self, key) for key in RUN_CONFIG_KEYS}

    def content(self):
        return resolve_model_file(self.model_def).read_bytes()

    def temporaries(self):
        # A checkpoint save cut short leaves TensorFlow's own temporary shard folder.
        model_dir = self.stage_output.directory / MODEL_DIR
        # ...and an export cut short, TensorFlow's temp-<timestamp> folder.
        return [*super().temporaries(), model_dir / "model.ckpt-*_temp*", model_dir / "export" / "*" / "temp-*"]

    def produce(self):
        from pipeline.training import train_model

        out = self.stage_output
        if self.rerun:
            remove_tree(out.directory)
        convert = self.upstream()[0].stage_output
        self.set_tracking_url(tensorboard_url(tensorboard().url, Path(layout().results_root), out.directory))
        with TaskProgress(self) as progress:
            train_model(resolve_model_file(self.model_def), self.significant_values()["params"], convert.directory,
                        convert.marker, out.directory, out.marker, max_steps=self.max_steps,
                        batch_size=self.batch_size, run_config=self.run_config(),
                        eval_throttle_secs=self.eval_throttle_secs, early_stopping_steps=self.early_stopping_steps,
                        progress=progress)


class Evaluate(Stage):
    """Evaluate a run on one split: metrics.json and confusion_matrix.png."""

    stage = "evaluate"
    uses_tensorflow = True
    split = luigi.ChoiceParameter(choices=SPLITS, description="Split to evaluate on")
    batch_size = luigi.IntParameter(default=256, significant=False, description="Examples per evaluation batch")

    def upstream(self):
        return [Train(), Convert()]

    def validate(self):
        require_positive("batch_size", self.batch_size)

    def produce(self):
        from pipeline.evaluation import evaluate_model

        out = self.stage_output
        train, convert = (task.stage_output for task in self.upstream())
        with TaskProgress(self) as progress:
            evaluate_model(train.directory, convert.directory, convert.marker, self.split, out.directory, out.marker,
                           batch_size=self.batch_size, progress=progress)


class Predict(Stage):
    """Batch prediction with the exported SavedModel on a split or a folder: predictions.csv."""

    stage = "predict"
    uses_tensorflow = True
    input_dir = luigi.Parameter(default="", description="Folder of images to predict; empty predicts `split`")
    split = luigi.ChoiceParameter(default="test", choices=SPLITS,
                                  description="Split predicted when input_dir is empty")
    export = luigi.ChoiceParameter(default="final", choices=("final", "best"),
                                   description="The SavedModel to predict with: the final weights, which Evaluate "
                                               "and the report describe, or those of the lowest validation loss")
    batch_size = luigi.IntParameter(default=256, significant=False, description="Images per prediction batch")

    def upstream(self):
        return [Train(), Convert()]

    def validate(self):
        require_positive("batch_size", self.batch_size)
        if self.input_dir and not Path(self.input_dir).is_dir():
            raise ConfigError(f"input_dir={self.input_dir!r} is not a folder; expected a folder of images, "
                              "or empty to predict a split")

    def content(self):
        if not self.input_dir:
            return b""
        # New, removed or rewritten images give a new version.
        listing = sorted(f"{p.relative_to(self.input_dir)}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
                         for p in Path(self.input_dir).rglob("*") if p.is_file())
        return hashlib.sha256("\n".join(listing).encode()).digest()

    def produce(self):
        from pipeline.prediction import predict_to_csv

        out = self.stage_output
        train, convert = (task.stage_output for task in self.upstream())
        export = read_json(train.marker).get("export_dir" if self.export == "final" else "best_export_dir")
        if export is None:
            raise StageOutputError(f"{train.marker}: Train made no best export (its validation split is empty); "
                                   "use --export final")
        export_dir = train.directory / export
        with TaskProgress(self) as progress:
            predict_to_csv(export_dir, read_json(convert.marker), out.marker, convert_dir=convert.directory,
                           split=self.split, input_dir=Path(self.input_dir) if self.input_dir else None,
                           batch_size=self.batch_size, progress=progress)


class Report(Stage):
    """report.html for the configured evaluation, beside its metrics.json; the leaderboard links to it."""

    stage = "report"
    uses_tensorflow = True

    def upstream(self):
        evaluate = Evaluate()
        return [evaluate, Predict(input_dir="", split=evaluate.split, export="final"), Train(), Convert(), Download()]

    def produce(self):
        from pipeline.report import write_report

        upstream = self.upstream()
        evaluate, predict, train, convert, download = (task.stage_output for task in upstream)
        write_report(train.directory, train.marker, evaluate.marker, predict.marker,
                     shard_paths(convert.directory, read_json(convert.marker), upstream[0].split),
                     self.stage_output.marker,
                     versions={"download": download.version, "convert (data)": convert.version,
                               "train": train.version, "evaluate": evaluate.version})


class RunAll(luigi.WrapperTask):
    """The whole pipeline for the configuration in luigi.cfg: evaluation, its report, and batch prediction."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Builds, and so checks, the whole DAG now: a bad parameter fails before anything is scheduled.
        self.requires()

    def requires(self):
        return [Evaluate(), Report(), Predict()]

    def result(self) -> str:
        evaluate, report, predict = (task.stage_output for task in self.requires())
        metrics = read_json(evaluate.marker)
        return (f"RESULT {metrics['split']} accuracy {metrics['accuracy']:.4f} on {metrics['examples']} images\n"
                f"    report:      {report.marker}\n    predictions: {predict.marker}")


@RunAll.event_handler(luigi.Event.SUCCESS)
@RunAll.event_handler(luigi.Event.DEPENDENCY_PRESENT)
def _note_result(task: RunAll) -> None:
    # DEPENDENCY_PRESENT: found complete when scheduled, so the run had nothing to do.
    run_notes.add(task.task_id, task.result())

