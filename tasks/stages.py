"""The pipeline's stages. Each `produce()` (called by `run()` under the output's lock, see
tasks.base) unpacks its inputs and calls one `pipeline` function.

Each stage takes the stages it reads as parameters (`UpstreamParameter`): left out, they are the
ones luigi.cfg describes, so `luigi --module tasks Train` trains on the configured data, while a
sweep builds `Train(convert=convert, params=...)` variants on one shared Convert.

TensorFlow-backed library modules are imported inside `produce()`, so that `--help` and no-op
reruns never load TensorFlow; scheduling imports it only when such a task will run (see
`Step.complete`).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import luigi
from luigi.parameter import ParameterVisibility
from luigi.util import inherits

from pipeline import download, storage
from pipeline.blessing import bless_evaluation, check_thresholds, outcome
from pipeline.champion import champion_path, current, require_current
from pipeline.cluster import NETWORKS, PARAMETER_SERVER, PRIVATE, STRATEGIES, check_network
from pipeline.convert import (DEFAULT_DECODE_THREADS, DEFAULT_JPEG_QUALITY, IMAGE_FORMATS, PLAN_FILE, SPLITS,
                              finalize_conversion, plan_conversion, report_name, shard_name, shard_paths,
                              validate_conversion_params, write_shard)
from pipeline.errors import ChampionError, ConfigError, StageOutputError
from pipeline.fingerprint import normalised_source
from pipeline.index import EntriesByKey, within
from pipeline.storage import TEMP_INFIX, read_json
from pipeline.models import (RUN_CONFIG_KEYS, check_param_overrides, declared_param_keys, require_positive,
                             resolve_model_file, validate_training_settings)
from pipeline.runfiles import MODEL_DIR
from pipeline.versioning import safe_name
from pipeline.leaderboard import BLESSING_KEY, REPORT_KEY, ROW_KEY
from pipeline.lineage import lineage, render_lineage
from tasks.config import index_folder, layout_roots, results_root, tensorboard, tensorboard_url
from tasks.console import note
from tasks.parameters import ParamsParameter, ThresholdsParameter, UpstreamParameter
from tasks.progress import TaskProgress
from tasks.base import (PipelineTask, Stage, Step, StorageTarget, folder_id, index_repair, load_index,
                        remove_versions)


class Download(Stage):
    """Fetch an image-folder archive or a CSV manifest into data/raw/<dataset>/<version>/<class>/<file>."""

    marker_name = "download.json"
    entry_points = ("pipeline.download:download_dataset",)
    dataset = luigi.Parameter(description="Dataset name; names its folders under data/")
    # Private: a presigned URL's query or a user:password is a secret, and Luigi's scheduler keeps
    # and shows whatever it is sent (its state file, a failed task's "Command to re-run"). So it is
    # never sent; where Luigi rebuilds a task, see UpstreamParameter. What this pipeline itself
    # shows or stores of it (task names, logs, errors, download.json, the index) is redacted.
    source_url = luigi.Parameter(visibility=ParameterVisibility.PRIVATE,
                                 description="http(s) or file URL of an archive (.tar.gz, .tgz, .tar, .zip) whose "
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
    # The caps and the address rule decide whether a download fails, never what a finished one
    # holds (a refused image fails it even under skip_failed_images), so they leave the version.
    max_image_bytes = luigi.IntParameter(default=download.MAX_IMAGE_BYTES, significant=False,
                                         description="Bytes one manifest image may hold")
    max_download_bytes = luigi.IntParameter(default=download.MAX_DOWNLOAD_BYTES, significant=False,
                                            description="Bytes the archive, or a manifest's images together, "
                                                        "may hold")
    allow_private_addresses = luigi.BoolParameter(
        default=False, significant=False,
        description="Let a manifest on a public address name images on private or loopback addresses "
                    "(link-local and cloud-metadata addresses are refused always)")

    def validate(self):
        download.source_kind(self.source_url)
        download.split_checksum(self.source_url)
        safe_name("dataset", self.dataset)

    def significant_values(self):
        # A checksum checks the files; it does not change them. Pinning one keeps the version.
        # Redacted, as the index stores it: a query still counts, by its hash, less a presigned
        # URL's signing parameters (re-signing keeps the version); user information does not.
        return {**super().significant_values(),
                "source_url": download.redact_url(download.split_checksum(self.source_url)[0])}

    def temporaries(self):
        # The work folder beside the version's folder; see download.download_dataset.
        return [f"{self.directory}{TEMP_INFIX}*"]

    def produce(self):
        with TaskProgress(self) as progress:
            download.download_dataset(self.source_url, self.directory, self.marker_name,
                                      workers=self.parallel_fetches, timeout_s=self.timeout_s,
                                      skip_failed_images=self.skip_failed_images,
                                      max_image_bytes=self.max_image_bytes,
                                      max_download_bytes=self.max_download_bytes,
                                      allow_private_addresses=self.allow_private_addresses, progress=progress)


class Convert(Stage):
    """Split the images and write sharded TFRecords plus metadata.json to data/tfrecords/<dataset>/<version>/."""

    marker_name = "metadata.json"
    # Its version covers its plan and its shards: PlanConversion and ConvertShard make its output.
    entry_points = ("pipeline.convert:plan_conversion", "pipeline.convert:write_shard",
                    "pipeline.convert:finalize_conversion", "tasks.stages:PlanConversion.produce",
                    "tasks.stages:ConvertShard.produce")
    download = UpstreamParameter(Download, description="The Download stage read; by default luigi.cfg's")
    image_size = luigi.IntParameter(description="Side in pixels of the square images stored in the records")
    channels = luigi.IntParameter(description="1 (grey) or 3 (RGB)")
    validation_fraction = luigi.FloatParameter(description="Share of each class put in the validation split")
    test_fraction = luigi.FloatParameter(description="Share of each class put in the test split")
    split_seed = luigi.IntParameter(description="Seed of the deterministic split")
    num_shards = luigi.IntParameter(description="Shards per split; each is written by its own task")
    max_bad_fraction = luigi.FloatParameter(description="Largest share of undecodable images tolerated")
    image_format = luigi.ChoiceParameter(
        choices=IMAGE_FORMATS, default="auto",
        description="How images are stored: auto (JPEG sources as JPEG, all others as lossless PNG), png or jpeg")
    jpeg_quality = luigi.IntParameter(default=DEFAULT_JPEG_QUALITY,
                                      description="Quality (1-100) of the JPEGs Convert encodes")
    decode_threads = luigi.IntParameter(default=DEFAULT_DECODE_THREADS, significant=False,
                                        description="Threads reading, decoding and resizing the images of one "
                                                    "shard; the records are the same whatever their number")

    def validate(self):
        validate_conversion_params(self.image_size, self.channels, self.validation_fraction, self.test_fraction,
                                   self.num_shards, self.max_bad_fraction, image_format=self.image_format,
                                   jpeg_quality=self.jpeg_quality, decode_threads=self.decode_threads)

    def significant_values(self):
        values = super().significant_values()
        if self.image_format == "png":
            # Nothing is encoded as JPEG: the quality cannot change a record.
            del values["jpeg_quality"]
        return values

    def shards(self) -> list[ConvertShard]:
        return [self.clone(ConvertShard, split=split, index=index)
                for split in SPLITS for index in range(self.num_shards)]

    def requires(self):
        return self.shards()

    def done(self):
        # A shard found corrupt loses its report (see Step.run): then Convert reruns to
        # rebuild that shard and check it against the others.
        return super().done() and all(shard.done() for shard in self.shards())

    def produce(self):
        raw = self.download
        finalize_conversion(self.directory, [target.path for target in self.input()], self.marker,
                            image_size=self.image_size, channels=self.channels,
                            max_bad_fraction=self.max_bad_fraction,
                            source={"download_version": raw.version, **read_json(raw.marker)},
                            image_format=self.image_format, jpeg_quality=self.jpeg_quality)


@inherits(Convert)
class ConvertPart(Step):
    """A part of one Convert version, written into its folder by a task of its own, so that
    `--workers N` writes N shards at once. It is named by what is its own and by the Convert
    version it belongs to: Convert's parameters, repeated on every part, would bury the rest."""

    # Reused with its Convert: the console says so of the Convert alone.
    said_reused = False

    def convert(self) -> Convert:
        return self.clone(Convert)

    def significant_values(self):
        shared = {name for name, _ in Convert.get_params()}
        return {name: value for name, value in super().significant_values().items() if name not in shared}

    def shown(self):
        return {"of": f"Convert@{self.convert().version}"}


class PlanConversion(ConvertPart):
    """Fix the split and shard of every image (plan.json in the Convert folder)."""

    def requires(self):
        return self.download

    def output(self):
        return StorageTarget(storage.join(self.convert().directory, PLAN_FILE))

    def produce(self):
        plan_conversion(self.download.directory, self.output().path,
                        validation_fraction=self.validation_fraction, test_fraction=self.test_fraction,
                        split_seed=self.split_seed, num_shards=self.num_shards)


class ConvertShard(ConvertPart):
    """Write one TFRecord shard; its JSON report, written after it, is the target."""

    uses_tensorflow = True
    split = luigi.ChoiceParameter(choices=SPLITS, description="Split this shard belongs to")
    index = luigi.IntParameter(description="Shard number within the split")

    def requires(self):
        return {"plan": self.clone(PlanConversion), "raw": self.download}

    def output(self):
        folder = self.convert().directory
        return StorageTarget(storage.join(folder, report_name(self.split, self.index, self.num_shards)))

    def shard_path(self) -> str:
        return storage.join(storage.parent(self.output().path), shard_name(self.split, self.index, self.num_shards))

    def temporaries(self):
        return [*super().temporaries(), f"{self.shard_path()}{TEMP_INFIX}*"]

    def produce(self):
        with TaskProgress(self) as progress:
            write_shard(self.download.directory, self.input()["plan"].path, self.split, self.index,
                        self.shard_path(), self.output().path, image_size=self.image_size,
                        channels=self.channels, image_format=self.image_format, jpeg_quality=self.jpeg_quality,
                        decode_threads=self.decode_threads, progress=progress)


class Train(Stage):
    """Train an Estimator from a model file; results/<dataset>/<model>-<version>/ holds model_dir and export."""

    marker_name = "train.json"
    # With the entry points of a cluster's other roles (`python -m pipeline.cluster`, and
    # `python -m tasks.cluster_role` with what role_arguments gives it): their code trains too.
    entry_points = ("pipeline.training:train_model", "pipeline.cluster:__main__", "tasks.cluster_role:__main__",
                    "tasks.stages:Train.role_arguments")
    uses_tensorflow = True
    # `[resources] train` in luigi.cfg caps the trainings run at once, whatever --workers says.
    resources = {"train": 1}
    convert = UpstreamParameter(Convert, description="The Convert stage trained on; by default luigi.cfg's")
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
    distribute = luigi.ChoiceParameter(
        default="none", choices=("none", "local", "tf_config"),
        description="none: train in this process; local: as a TensorFlow cluster of processes on this host "
                    "(a chief, cluster_workers workers, a parameter server unless mirrored, an evaluator); "
                    "tf_config: as the chief of the cluster TF_CONFIG describes (see tasks.cluster_role)")
    cluster_workers = luigi.IntParameter(default=2, description="Workers beside the chief, with distribute=local "
                                                                "(with tf_config, TF_CONFIG says)")
    strategy = luigi.ChoiceParameter(
        default=PARAMETER_SERVER, choices=STRATEGIES,
        description="With distribute=local: parameter_server (asynchronous: each trainer steps on its own) "
                    "or mirrored (MultiWorkerMirroredStrategy: all trainers compute each step together)")
    cluster_network = luigi.ChoiceParameter(
        default=PRIVATE, choices=NETWORKS, significant=False,
        description="With distribute=local: private: the roles share a network namespace of their own, where "
                    "nothing else reaches their TensorFlow servers (needs user namespaces, and local roots); "
                    "host: in this host's network, each role's server listening on every interface, open to "
                    "whoever reaches this machine (TensorFlow cannot listen on 127.0.0.1 only)")

    def validate(self):
        model_file = resolve_model_file(self.model_def)
        known = declared_param_keys(model_file)
        if known is not None:  # otherwise checked once the model file is loaded, in produce()
            check_param_overrides(model_file, known, self.params)
        validate_training_settings(self.max_steps, self.batch_size, self.run_config())
        if self.distribute != "none":
            require_positive("cluster_workers", self.cluster_workers)
            if self.early_stopping_steps:
                raise ConfigError(f"early_stopping_steps={self.early_stopping_steps} with distribute="
                                  f"{self.distribute}; early stopping needs distribute=none")
        if self.distribute == "local":
            try:
                check_network(self.cluster_network, layout_roots())
            except ConfigError as error:  # refused as the command starts, where no task is named otherwise
                raise ConfigError(f"{self.get_task_family()}: {error}") from None
        if self.early_stopping_steps < 0 or self.eval_throttle_secs < 0:
            raise ConfigError(f"early_stopping_steps={self.early_stopping_steps}, eval_throttle_secs="
                              f"{self.eval_throttle_secs}; expected 0 (off) or a positive number")

    def significant_values(self):
        values = super().significant_values()
        if self.early_stopping_steps:
            # Early stopping decides at each checkpoint's evaluation, so their spacing changes the weights.
            values["save_checkpoints_steps"] = self.save_checkpoints_steps
        if self.distribute == "none":
            # The cluster's shape does not exist then: the versions trained in one process stay as they were.
            for name in ("distribute", "cluster_workers", "strategy"):
                del values[name]
        elif self.distribute == "tf_config":
            del values["cluster_workers"]  # not read: the cluster manager's TF_CONFIG says
        return values

    def run_config(self) -> dict:
        return {key: getattr(self, key) for key in RUN_CONFIG_KEYS}

    def content(self):
        # Its syntax tree, where it parses: a comment or a docstring in a model file does not retrain it.
        return normalised_source(resolve_model_file(self.model_def).read_bytes())

    def where(self):
        return {"dataset": self.dataset, "model": Path(self.model_def).stem}

    def temporaries(self):
        model_dir = storage.join(self.directory, MODEL_DIR)
        # A checkpoint save cut short leaves TensorFlow's own temporary shard folder, and an
        # export cut short its temp-<timestamp> folder.
        return [*super().temporaries(), storage.join(model_dir, "model.ckpt-*_temp*"),
                storage.join(model_dir, "export", "*", "temp-*")]

    def role_arguments(self) -> dict:
        """What a role of this Train's cluster that is not the chief needs (see tasks.cluster_role)."""
        return {"model_dir": storage.join(self.directory, MODEL_DIR), "strategy": self.strategy,
                "convert_dir": self.convert.directory, "metadata_path": self.convert.marker,
                "max_steps": self.max_steps, "batch_size": self.batch_size,
                "eval_throttle_secs": self.eval_throttle_secs, "early_stopping_steps": self.early_stopping_steps}

    def tensorboard_link(self) -> str:
        return tensorboard_url(tensorboard().url, results_root(), self.directory)

    def produce(self):
        from pipeline.training import train_model

        if self.rerun:
            # The old weights go, with the evaluations and predictions made from them.
            remove_versions([self.directory])
        convert = self.convert
        self.set_tracking_url(self.tensorboard_link())
        with TaskProgress(self) as progress:
            train_model(str(resolve_model_file(self.model_def)), self.significant_values()["params"],
                        convert.directory,
                        convert.marker, self.directory, self.marker, max_steps=self.max_steps,
                        batch_size=self.batch_size, run_config=self.run_config(),
                        eval_throttle_secs=self.eval_throttle_secs, early_stopping_steps=self.early_stopping_steps,
                        distribute=self.distribute, cluster_workers=self.cluster_workers, strategy=self.strategy,
                        cluster_network=self.cluster_network,
                        progress=progress)


# What to do where a model is asked of the champion and there is none (see tasks.champion).
HOW_TO_MAKE_A_CHAMPION = ("""bless one (luigi --module tasks RunAll, or Sweep, with --Bless-thresholds """
                          """'{"accuracy": {"min": 0.97}}'), or force one in (python -m tasks.champion """
                          "--set RUN --reason TEXT)")


class ChampionTrain(PipelineTask):
    """The Train that is champion of a Convert's dataset version and split (see pipeline.champion),
    standing in for it: its version, folder, marker and Convert, so that a stage made from it (a
    Predict) has the version and folder it would have made from that Train itself.

    `current` looks the champion up as the task is made, so that without one the command fails as
    it starts, and keeps it in the task's parameters (`version`, `directory`): a worker that
    rebuilds the task from them (see UpstreamParameter) uses that champion, even if another was
    crowned since, and Luigi's cache of tasks made in one process never hands back an older one."""

    convert = UpstreamParameter(Convert, description="The Convert whose dataset version's champion is used; by "
                                                     "default luigi.cfg's")
    split = luigi.ChoiceParameter(choices=SPLITS, description="The split the champion was ranked on")
    version = luigi.Parameter(description="The champion's Train version")
    directory = luigi.Parameter(description="The champion's Train folder, with its version")

    @classmethod
    def current(cls, split: str) -> ChampionTrain:
        """The champion now of luigi.cfg's Convert on `split`."""
        convert = Convert()
        record = require_current(champion_path(results_root(), convert.dataset, convert.version, split),
                                 HOW_TO_MAKE_A_CHAMPION)
        return cls(convert=convert, split=split, version=record["train_version"], directory=record["train_path"])

    def validate(self):
        # The pointer is a file in the results, which whoever may write there could plant: it may
        # name only a Train the index holds (repaired first if need be), at its own folder within
        # results_root, trained on this very dataset version.
        convert = self.convert
        entry = EntriesByKey(index_folder(), index_repair()).get(self.index_key)
        if entry is None or entry["path"] != self.directory or not within(self.directory, [results_root()]) \
                or entry.get("dataset") != convert.dataset \
                or (entry.get("identity") or {}).get("upstream", {}).get("convert") != convert.version:
            raise ChampionError(f"{self.pointer()}: its champion, {self.index_key} at {self.directory}, is no Train "
                                f"the index ({index_folder()}) holds at that folder within results_root, trained "
                                f"on {convert.dataset} version {convert.version}; step back (python -m "
                                "tasks.champion --revoke --reason TEXT) or set another champion")

    def pointer(self) -> str:
        convert = self.convert
        return champion_path(results_root(), convert.dataset, convert.version, self.split)

    def id_suffix(self):
        return folder_id(self.version, self.directory)

    @property
    def dataset(self) -> str:
        return self.convert.dataset

    @property
    def marker(self) -> str:
        return storage.join(self.directory, Train.marker_name)

    @property
    def index_key(self) -> str:
        return f"{Train.get_task_family()}/{self.version}"

    def done(self) -> bool:
        return storage.exists(self.marker)

    def complete(self):
        return self.done()

    def run(self):
        raise StageOutputError(f"the champion's Train, {self.index_key}, is gone ({self.marker} is missing): "
                               "step back to the champion before it (python -m tasks.champion --revoke --reason "
                               "TEXT), or make another one: " + HOW_TO_MAKE_A_CHAMPION)


class Evaluate(Stage):
    """Evaluate a run on one split: metrics.json and confusion_matrix.png."""

    marker_name = "metrics.json"
    entry_points = ("pipeline.evaluation:evaluate_model",)
    uses_tensorflow = True
    train = UpstreamParameter(Train, description="The Train stage evaluated; by default luigi.cfg's")
    split = luigi.ChoiceParameter(choices=SPLITS, description="Split to evaluate on")
    batch_size = luigi.IntParameter(default=256, significant=False, description="Examples per evaluation batch")

    def validate(self):
        require_positive("batch_size", self.batch_size)

    def where(self):
        return {"within": self.train.directory, "split": self.split}

    def also_reads(self):
        return [self.train.convert]

    def produce(self):
        from pipeline.evaluation import evaluate_model

        convert = self.train.convert
        with TaskProgress(self) as progress:
            evaluate_model(self.train.directory, convert.directory, convert.marker, self.split, self.directory,
                           self.marker, batch_size=self.batch_size, progress=progress)

    def entry(self):
        # The row's report link is joined in from the Report's entry (see pipeline.leaderboard),
        # so Evaluate --rerun keeps it.
        entry = super().entry()
        metrics, train = read_json(self.marker), self.train
        entry[ROW_KEY] = {
            "run": storage.name(train.directory), "model": Path(train.model_def).stem, "dataset": self.dataset,
            "split": self.split, "accuracy": metrics["accuracy"], "loss": metrics["loss"],
            "global_step": metrics["global_step"], "params": json.dumps(train.significant_values()["params"],
                                                                        sort_keys=True),
            "max_steps": train.max_steps, "batch_size": train.batch_size, "tf_random_seed": train.tf_random_seed,
            "train_version": train.version, "data_version": train.convert.version,
            "evaluated_at": entry["completed_at"]}
        return entry


class Predict(Stage):
    """Batch prediction with the exported SavedModel on a split or a folder: predictions.csv."""

    marker_name = "predictions.csv"
    entry_points = ("pipeline.prediction:predict_to_csv",)
    uses_tensorflow = True
    train = UpstreamParameter(Train, description="The Train stage whose export predicts; by default luigi.cfg's, "
                                                 "or the champion's (see model)")
    # Not significant: which Train predicts is in the version already, through the train upstream's
    # version; a new champion gives a new version that way.
    model = luigi.ChoiceParameter(choices=("train", "champion"), default="train", significant=False,
                                  description="Where the Train comes from when none is given: train: luigi.cfg's; "
                                              "champion: the champion of luigi.cfg's Convert (its dataset "
                                              "version) on Evaluate's split (see python -m tasks.champion)")
    input_dir = luigi.Parameter(default="", description="Folder of images to predict; empty predicts `split`")
    split = luigi.ChoiceParameter(default="test", choices=SPLITS,
                                  description="Split predicted when input_dir is empty")
    export = luigi.ChoiceParameter(default="final", choices=("final", "best"),
                                   description="The SavedModel to predict with: the final weights, which Evaluate "
                                               "and the report describe, or those of the lowest validation loss")
    batch_size = luigi.IntParameter(default=256, significant=False, description="Images per prediction batch")

    def default_upstream(self, name):
        if name == "train" and self.model == "champion":
            # Ranked on the split Evaluate is given (by luigi.cfg or the command line), as RunAll's are.
            return ChampionTrain.current(Evaluate.split.task_value(Evaluate.get_task_family(), "split"))
        return super().default_upstream(name)

    def validate(self):
        require_positive("batch_size", self.batch_size)
        if self.input_dir and not Path(self.input_dir).is_dir():
            raise ConfigError(f"input_dir={self.input_dir!r} is not a folder; expected a folder of images, "
                              "or empty to predict a split")

    def significant_values(self):
        values = super().significant_values()
        if self.input_dir:
            del values["split"]  # not read when a folder is predicted: no new version for it
        return values

    def content(self):
        if not self.input_dir:
            return b""
        # New, removed or rewritten images give a new version.
        listing = sorted(f"{p.relative_to(self.input_dir)}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
                         for p in Path(self.input_dir).rglob("*") if p.is_file())
        return hashlib.sha256("\n".join(listing).encode()).digest()

    def where(self):
        return {"within": self.train.directory}

    def also_reads(self):
        return [self.train.convert]

    def produce(self):
        from pipeline.prediction import predict_to_csv

        train, convert = self.train, self.train.convert
        export = read_json(train.marker).get("export_dir" if self.export == "final" else "best_export_dir")
        if export is None:
            raise StageOutputError(f"{train.marker}: Train made no best export (its validation split is empty); "
                                   "use --export final")
        with TaskProgress(self) as progress:
            predict_to_csv(storage.join(train.directory, export), read_json(convert.marker), self.marker,
                           convert_dir=convert.directory, split=self.split, input_dir=self.input_dir or None,
                           batch_size=self.batch_size, progress=progress)


@Predict.event_handler(luigi.Event.SUCCESS)
@Predict.event_handler(luigi.Event.DEPENDENCY_PRESENT)
def _note_predictions(task: Predict) -> None:
    # A split's predictions are named in the run's RESULT; a folder's are said here.
    if task.input_dir:
        note(task.task_id, f"PREDICTIONS of {task.input_dir}: {task.marker}")


class Report(Stage):
    """report.html for an evaluation, beside its metrics.json, with the verdict on it and its
    lineage; the leaderboard links to both."""

    marker_name = "report.html"
    entry_points = ("pipeline.report:write_report", "pipeline.convert:shard_paths")
    uses_tensorflow = True
    evaluate = UpstreamParameter(Evaluate, description="The evaluation reported; by default luigi.cfg's")
    predict = UpstreamParameter(description="The predictions its misclassified images come from; by default "
                                            "the final export's on the evaluated split")
    bless = UpstreamParameter(description="The verdict it shows; by default the evaluation's Bless, with "
                                          "luigi.cfg's thresholds")

    def default_upstream(self, name):
        if name == "predict":
            return Predict(train=self.evaluate.train, input_dir="", split=self.evaluate.split, export="final")
        if name == "bless":
            return Bless(evaluate=self.evaluate)
        return super().default_upstream(name)

    def where(self):
        # Within its evaluation's folder, but a folder per version: a report of other predictions,
        # or made by changed report code, must not find an older report.html and count as done.
        return {"within": self.evaluate.directory}

    def also_reads(self):
        return [self.evaluate.train, self.evaluate.train.convert]

    def produce(self):
        from pipeline.report import write_report

        evaluate, predict = self.evaluate, self.predict
        train = evaluate.train
        convert = train.convert
        write_report(train.directory, train.marker, evaluate.marker, predict.marker,
                     shard_paths(convert.directory, read_json(convert.marker), evaluate.split), self.marker,
                     versions={"download": convert.download.version, "convert (data)": convert.version,
                               "train": train.version, "evaluate": evaluate.version},
                     blessing=read_json(self.bless.marker),
                     lineage=render_lineage(lineage(EntriesByKey(index_folder(), index_repair()),
                                                    self.bless.index_key, judged=False)))

    def link(self) -> str:
        """Where the leaderboard, beside results_root, links it."""
        return storage.relative(self.marker, results_root())

    def entry(self):
        entry = super().entry()
        entry[REPORT_KEY] = {"evaluation": self.evaluate.index_key, "link": self.link()}
        return entry


class Bless(Stage):
    """blessing.json: whether an evaluation passes its thresholds, against the champion of its
    dataset version and split as it is at that moment; a blessed model that ranks above the
    champion becomes champion (see pipeline.blessing, pipeline.champion)."""

    marker_name = "blessing.json"
    entry_points = ("pipeline.blessing:bless_evaluation",)
    # Its report and run record show its verdict: checked again, they show the new one.
    rerun_remakes_downstream = True
    evaluate = UpstreamParameter(Evaluate, description="The evaluation checked; by default luigi.cfg's")
    thresholds = ThresholdsParameter(
        default={}, description="""JSON object of metric to bounds (min, max, min_change, max_change, """
                                """min_relative_change, max_relative_change), e.g. '{"accuracy": {"min": 0.95}}'; """
                                """the change bounds compare with the champion""")

    def validate(self):
        check_thresholds(self.thresholds)

    def significant_values(self):
        # As checked: {"min": 1} and {"min": 1.0}, or the same bounds in another order, are one check.
        return {**super().significant_values(), "thresholds": check_thresholds(self.thresholds)}

    def where(self):
        return {"within": self.evaluate.directory}

    def also_reads(self):
        return [self.evaluate.train]

    def champion_path(self) -> str:
        evaluate = self.evaluate
        return champion_path(results_root(), self.dataset, evaluate.train.convert.version, evaluate.split)

    def is_champion(self) -> bool:
        """Whether its model is the champion now (its verdict says whether it was made so)."""
        champion = current(self.champion_path())
        return champion is not None and champion["train_version"] == self.evaluate.train.version

    def produce(self):
        if self.rerun:
            # What shows the old verdict goes (its reports, run records, sweep comparisons): a run
            # makes them again from the new one (see Step.rerunning), now or later.
            remove_versions(entry["path"] for entry in load_index().values()
                            if self.index_key in entry.get("upstream", ()))
        evaluate = self.evaluate
        train = evaluate.train
        bless_evaluation(
            evaluate.marker, self.thresholds,
            train={"train_version": train.version, "train_path": train.directory,
                   "export": read_json(train.marker)["export_dir"], "model": Path(train.model_def).stem},
            champion_path=self.champion_path(), lock_folder=index_folder(), blessing_path=self.marker,
            context={"evaluation": evaluate.index_key, "train_version": train.version, "dataset": self.dataset,
                     "data_version": train.convert.version, "split": evaluate.split})

    def entry(self):
        entry = super().entry()
        entry[BLESSING_KEY] = {"evaluation": self.evaluate.index_key, **outcome(read_json(self.marker))}
        return entry
