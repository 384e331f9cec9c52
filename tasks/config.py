"""Sections of luigi.cfg that are not a task's own: where outputs go and where TensorBoard serves."""
from __future__ import annotations

import re
import urllib.parse

import luigi
import luigi.configuration

from pipeline import storage


class layout(luigi.Config):  # noqa: N801 - Luigi names a config section after its class
    data_root = luigi.Parameter(default="data", description="Folder, or s3://bucket/prefix, of downloaded and "
                                                            "converted datasets")
    results_root = luigi.Parameter(default="results", description="Folder, or s3://bucket/prefix, of training "
                                                                  "runs and index.json")


def isolate_remote_io() -> None:
    """With a root on S3, have Luigi run every task in a process of its own, even under --workers 1.

    TensorFlow reaches S3 through tensorflow-io, whose plugin makes a process abort as it exits
    (exit code 134, tensorflow/io#1912). Luigi ends its task processes with os._exit, which
    skips that; the process that schedules never loads the plugin (see pipeline.storage).
    Called as tasks are made, before Luigi makes its worker, which reads this setting then.
    """
    roots = layout()
    if storage.is_remote(roots.data_root) or storage.is_remote(roots.results_root):
        luigi.configuration.get_config().set("worker", "force_multiprocessing", "true")


class tensorboard(luigi.Config):  # noqa: N801 - Luigi names a config section after its class
    url = luigi.Parameter(default="http://127.0.0.1:6006",
                          description="Where `make tensorboard` serves the results folder; Train links to it")


def tensorboard_url(base_url: str, results_root: str, run_dir: str) -> str:
    """A link to TensorBoard's time series showing only one run, when TensorBoard serves `results_root`."""
    run = storage.relative(run_dir, results_root)
    query = urllib.parse.urlencode({"runFilter": f"^{re.escape(run)}/"})
    return f"{base_url.rstrip('/')}/?{query}#timeseries"
