"""Sections of luigi.cfg that are not a task's own: where outputs go and where TensorBoard serves."""
import luigi


class layout(luigi.Config):  # noqa: N801 - Luigi names a config section after its class
    data_root = luigi.Parameter(default="data", description="Folder of downloaded and converted datasets")
    results_root = luigi.Parameter(default="results", description="Folder of training runs and index.json")


class tensorboard(luigi.Config):  # noqa: N801 - Luigi names a config section after its class
    url = luigi.Parameter(default="http://127.0.0.1:6006",
                          description="Where `make tensorboard` serves the results folder; Train links to it")
