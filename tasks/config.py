"""Sections of luigi.cfg that are not a task's own: where outputs go and where TensorBoard serves."""
from __future__ import annotations

import re
import urllib.parse
from pathlib import Path

import luigi


class layout(luigi.Config):  # noqa: N801 - Luigi names a config section after its class
    data_root = luigi.Parameter(default="data", description="Folder of downloaded and converted datasets")
    results_root = luigi.Parameter(default="results", description="Folder of training runs and index.json")


class tensorboard(luigi.Config):  # noqa: N801 - Luigi names a config section after its class
    url = luigi.Parameter(default="http://127.0.0.1:6006",
                          description="Where `make tensorboard` serves the results folder; Train links to it")


def tensorboard_url(base_url: str, results_root: Path, run_dir: Path) -> str:
    """A link to TensorBoard's time series showing only one run, when TensorBoard serves `results_root`."""
    run = Path(run_dir).resolve().relative_to(Path(results_root).resolve()).as_posix()
    query = urllib.parse.urlencode({"runFilter": f"^{re.escape(run)}/"})
    return f"{base_url.rstrip('/')}/?{query}#timeseries"
