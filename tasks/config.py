"""Sections of luigi.cfg that are not a task's own, and where everything the pipeline writes lies.

`stage_folder` is the one function that derives a stage's folder from its version under the
`[layout]` roots; the index, the entry files and the locks are placed here too, so that no other
module reads `[layout]`.
"""
from __future__ import annotations

import re
import urllib.parse

import luigi
import luigi.configuration

from pipeline import index as version_index
from pipeline import storage
from pipeline.errors import ConfigError

# Where outputs lie (the layout, each stage's folder, the index, the locks) and the TensorBoard
# link a run shows, never what an output holds (see pipeline.fingerprint).
AFFECTS_RESULTS = False


class layout(luigi.Config):  # noqa: N801 - Luigi names a config section after its class
    data_root = luigi.Parameter(default="data", description="Folder, or s3://bucket/prefix, of downloaded and "
                                                            "converted datasets")
    results_root = luigi.Parameter(default="results", description="Folder, or s3://bucket/prefix, of training "
                                                                  "runs, their index and the leaderboard")


def stage_folder(stage: str, version: str, *, dataset: str = "", model: str = "", split: str = "",
                 within: str = "") -> str:
    """The folder of `stage` (a task family) at `version`, where it writes its output.

    Download and Convert write under data_root, by dataset; Train under results_root, by dataset
    and model; what is made from one training (its evaluations, predictions and run records) in
    that training's folder (`within`), and a report or a blessing in its evaluation's. A Comparison writes its
    files into results_root itself, beside the leaderboard:

        Download    <data_root>/raw/<dataset>/<version>
        Convert     <data_root>/tfrecords/<dataset>/<version>
        Train       <results_root>/<dataset>/<model>-<version>
        Evaluate    <within: the Train folder>/evaluate-<split>-<version>
        Predict     <within: the Train folder>/predict-<version>
        RunRecord   <within: the Train folder>/run-<version>
        Report      <within: the Evaluate folder>/report-<version>
        Bless       <within: the Evaluate folder>/bless-<version>
        Comparison  <results_root>

    A folder per version: a version's output can never be found in another's folder.
    """
    roots = layout()
    # Each stage's folder, and the values it needs besides the version.
    places = {
        "Download": (("dataset",), (roots.data_root, "raw", dataset, version)),
        "Convert": (("dataset",), (roots.data_root, "tfrecords", dataset, version)),
        "Train": (("dataset", "model"), (roots.results_root, dataset, f"{model}-{version}")),
        "Evaluate": (("within", "split"), (within, f"evaluate-{split}-{version}")),
        "Predict": (("within",), (within, f"predict-{version}")),
        "RunRecord": (("within",), (within, f"run-{version}")),
        "Report": (("within",), (within, f"report-{version}")),
        "Bless": (("within",), (within, f"bless-{version}")),
        "Comparison": ((), (roots.results_root,)),
    }
    if stage not in places:
        raise ConfigError(f"stage_folder: no folder is defined for stage {stage!r}; expected one of "
                          f"{', '.join(places)}")
    needs, parts = places[stage]
    given = {"version": version, "dataset": dataset, "model": model, "split": split, "within": within}
    needed = ("version", *needs)
    if not all(given[name] for name in needed):
        raise ConfigError(f"stage_folder: the folder of {stage} needs {', '.join(needed)}; given "
                          f"{', '.join(f'{name}={given[name]!r}' for name in needed)} "
                          "(see the table in stage_folder's docstring)")
    return storage.join(*parts)


def results_root() -> str:
    return layout().results_root


def layout_roots() -> list[str]:
    """data_root and results_root, as every process names them: what the pipeline writes is within them."""
    roots = layout()
    return [storage.absolute(roots.data_root), storage.absolute(roots.results_root)]


def index_folder() -> str:
    return storage.join(results_root(), version_index.INDEX_FOLDER)


def entry_patterns() -> list[str]:
    """Where the entry files may lie (see pipeline.index): a version's folder is at most 4
    levels below results_root (a Report's or a Bless's), 3 below data_root, or, for an output that is a file
    (a Comparison's), results_root itself."""
    roots = layout()
    return [storage.join(root, *["*"] * depth, version_index.ENTRY_GLOB)
            for root, depths in ((roots.results_root, 5), (roots.data_root, 4)) for depth in range(depths)]


def locks_folder(output: str) -> str:
    """The lock folder of the layout root that holds `output` (the innermost, should one hold the
    other), so that every machine writing `output` reaches its lock as it reaches the output: under
    a local data_root, the lock of an output on S3 would be each machine's own."""
    roots = layout_roots()
    return storage.join(max((root for root in roots if storage.is_inside(output, root)), key=len,
                            default=roots[0]), ".locks")


def locks_folders() -> list[str]:
    """Every lock folder a stage's lock may be in (one when both roots are the same)."""
    return list(dict.fromkeys(map(locks_folder, layout_roots())))


def isolate_remote_io() -> None:
    """With a root on S3, have Luigi run every task in a process of its own, even under --workers 1.

    TensorFlow reaches S3 through tensorflow-io, whose plugin makes a process abort as it exits
    (exit code 134, tensorflow/io#1912). Luigi ends its task processes with os._exit, which
    skips that; the process that schedules never loads the plugin (see pipeline.storage).
    Called as tasks are made, before Luigi makes its worker, which reads this setting then.
    """
    if any(map(storage.is_remote, layout_roots())):
        luigi.configuration.get_config().set("worker", "force_multiprocessing", "true")


class tensorboard(luigi.Config):  # noqa: N801 - Luigi names a config section after its class
    url = luigi.Parameter(default="http://127.0.0.1:6006",
                          description="Where `make tensorboard` serves the results folder; Train links to it")


def tensorboard_url(base_url: str, results_root: str, run_dir: str) -> str:
    """A link to TensorBoard's time series showing only one run, when TensorBoard serves `results_root`."""
    run = storage.relative(run_dir, results_root)
    query = urllib.parse.urlencode({"runFilter": f"^{re.escape(run)}/"})
    return f"{base_url.rstrip('/')}/?{query}#timeseries"
