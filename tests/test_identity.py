"""One identity, on the task graph alone (no TensorFlow, nothing run): a task's Luigi id and its
folder change together, with every significant parameter of its own stage and of every stage
upstream, with the model file and with the layout roots; insignificant parameters change neither."""
from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO, cli_sections, tiny_config, write_config

FAMILIES = ("Download", "Convert", "Train", "Evaluate", "Predict", "Report", "Bless", "RunRecord")
# Predict does not follow Evaluate; the Report's own Predict follows the evaluation, not Predict's settings.
DOWNSTREAM = {"Download": set(FAMILIES), "Convert": set(FAMILIES) - {"Download"},
              "Train": {"Train", "Evaluate", "Predict", "Report", "Bless", "RunRecord"},
              "Evaluate": {"Evaluate", "Report", "Bless", "RunRecord"}, "Predict": {"Predict", "RunRecord"},
              "Bless": {"Bless", "Report", "RunRecord"}}
CHANGES = {
    "Download": {"dataset": "other", "source_url": "file:other.tar.gz", "skip_failed_images": "true"},
    "Convert": {"image_size": "32", "channels": "3", "validation_fraction": "0.3", "test_fraction": "0.1",
                "split_seed": "8", "num_shards": "3", "max_bad_fraction": "0.5", "image_format": "jpeg",
                "jpeg_quality": "80"},
    "Train": {"model_def": "dnn", "params": "{}", "max_steps": "13", "batch_size": "9", "tf_random_seed": "2",
              "early_stopping_steps": "50", "distribute": "local"},
    "Evaluate": {"split": "validation"},
    "Predict": {"split": "validation", "export": "best"},
    "Bless": {"thresholds": '{"accuracy": {"min": 0.5}}'},
}
# Settings that change how, not what: neither ids nor folders may move.
INSIGNIFICANT = {"Download": {"parallel_fetches": "2", "timeout_s": "5"}, "Convert": {"decode_threads": "3"},
                 "Train": {"save_checkpoints_steps": "3", "eval_throttle_secs": "60", "keep_checkpoint_max": "9",
                           "log_step_count_steps": "3", "save_summary_steps": "3",
                           # The shape of a cluster, when training runs in one process (distribute=none).
                           "cluster_workers": "3", "strategy": "mirrored",
                           # Where a cluster's roles listen is no part of what they train.
                           "cluster_network": "host"},
                 "Evaluate": {"batch_size": "7"}, "Predict": {"batch_size": "7"},
                 # How the run ends when its model is not blessed, not what any stage makes.
                 "RunAll": {"require_blessed": "true"}}


def graph(luigi_config, sections) -> dict[str, tuple[str, str]]:
    """family -> (task id, folder) of each stage of RunAll's DAG under `sections`; Predict is
    RunAll's own (the Report's follows its evaluation)."""
    from tasks import RunAll

    luigi_config(sections)
    root = RunAll()
    evaluate, report, predict, bless = root.stages()
    stages = [evaluate.train.convert.download, evaluate.train.convert, evaluate.train, evaluate, predict, report,
              bless, root.closing()]
    return {task.get_task_family(): (task.task_id, str(task.directory)) for task in stages}


@pytest.fixture
def base_sections(tmp_path):
    sections = tiny_config(tmp_path, "file:tiny.tar.gz")
    sections["Predict"] = {"input_dir": "", "split": "test", "export": "final"}
    return sections


def changed(base: dict, after: dict) -> set[str]:
    """The families whose id changed; every one of them must have a new folder too, and the rest neither."""
    ids = {family for family in base if base[family][0] != after[family][0]}
    folders = {family for family in base if base[family][1] != after[family][1]}
    assert ids == folders, f"ids changed for {sorted(ids)} but folders for {sorted(folders)}"
    return ids


@pytest.mark.parametrize("section, key", [(section, key) for section, values in CHANGES.items() for key in values])
def test_each_significant_parameter_moves_its_stage_and_everything_downstream(luigi_config, base_sections,
                                                                             section, key):
    base = graph(luigi_config, base_sections)
    sections = copy.deepcopy(base_sections)
    sections.setdefault(section, {})[key] = CHANGES[section][key]
    if key == "model_def":
        sections["Train"]["params"] = "{}"  # the tiny config's params are the cnn model's
    assert changed(base, graph(luigi_config, sections)) == DOWNSTREAM[section]


@pytest.mark.parametrize("section, key", [(section, key) for section, values in INSIGNIFICANT.items()
                                          for key in values])
def test_insignificant_parameters_move_nothing(luigi_config, base_sections, section, key):
    base = graph(luigi_config, base_sections)
    sections = copy.deepcopy(base_sections)
    sections.setdefault(section, {})[key] = INSIGNIFICANT[section][key]
    assert changed(base, graph(luigi_config, sections)) == set()


def test_checkpoint_spacing_is_significant_only_with_early_stopping(luigi_config, base_sections):
    sections = copy.deepcopy(base_sections)
    sections["Train"]["early_stopping_steps"] = "50"
    stopping = graph(luigi_config, sections)
    sections["Train"]["save_checkpoints_steps"] = "3"
    assert changed(stopping, graph(luigi_config, sections)) == DOWNSTREAM["Train"]


def test_the_jpeg_quality_moves_nothing_where_nothing_is_stored_as_jpeg(luigi_config, base_sections):
    sections = copy.deepcopy(base_sections)
    sections["Convert"]["image_format"] = "png"
    png = graph(luigi_config, sections)
    sections["Convert"]["jpeg_quality"] = "80"
    assert changed(png, graph(luigi_config, sections)) == set()


def test_the_split_of_a_prediction_on_a_folder_moves_nothing(luigi_config, base_sections, tmp_path):
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "a.png").write_bytes(b"not read here")
    sections = copy.deepcopy(base_sections)
    sections["Predict"]["input_dir"] = str(tmp_path / "new")
    base = graph(luigi_config, sections)
    sections["Predict"]["split"] = "validation"
    assert changed(base, graph(luigi_config, sections)) == set()


def test_pinning_a_checksum_keeps_the_download_and_everything_after(luigi_config, base_sections):
    base = graph(luigi_config, base_sections)
    sections = copy.deepcopy(base_sections)
    sections["Download"]["source_url"] += "#sha256=" + "ab" * 32
    assert changed(base, graph(luigi_config, sections)) == set()


def test_the_model_files_code_is_part_of_train_and_what_follows_and_its_comments_are_not(luigi_config,
                                                                                           base_sections, tmp_path):
    model = tmp_path / "model.py"
    original = (REPO / "model_defs" / "cnn.py").read_text()
    model.write_text(original)
    sections = copy.deepcopy(base_sections)
    sections["Train"]["model_def"] = str(model)
    before = graph(luigi_config, sections)
    model.write_text(original + '\n# a comment\n"""A docstring-like string."""\n')
    assert changed(before, graph(luigi_config, sections)) == set()
    model.write_text(original + "\n\ndef a_users_edit():\n    return 1\n")
    assert changed(before, graph(luigi_config, sections)) == DOWNSTREAM["Train"]


@pytest.mark.parametrize("root, moved", [("data_root", {"Download", "Convert"}),
                                         ("results_root", set(FAMILIES) - {"Download", "Convert"})])
def test_the_layout_roots_are_part_of_the_id_of_the_stages_under_them(luigi_config, base_sections, tmp_path,
                                                                     root, moved):
    # A root is where, not what: versions stay, but the folders under it, and so the ids, move.
    base = graph(luigi_config, base_sections)
    sections = copy.deepcopy(base_sections)
    sections["layout"][root] = str(tmp_path / "elsewhere")
    assert changed(base, graph(luigi_config, sections)) == moved


def test_the_same_thresholds_written_otherwise_are_one_check(luigi_config, base_sections):
    sections = copy.deepcopy(base_sections)
    sections["Bless"] = {"thresholds": '{"loss": {"max": 1}, "accuracy": {"max_change": 0.5, "min": 0.5}}'}
    base = graph(luigi_config, sections)
    sections["Bless"] = {"thresholds": '{"accuracy": {"min": 0.50, "max_change": 0.5}, "loss": {"max": 1.0}}'}
    assert changed(base, graph(luigi_config, sections)) == set()


def test_the_same_task_built_two_ways_has_one_id(luigi_config, base_sections):
    from tasks import Convert, Evaluate, Report, Train

    luigi_config(base_sections)
    explicit = Report(evaluate=Evaluate(train=Train(convert=Convert())))
    assert explicit.task_id == Report().task_id and explicit == Report()
    assert len({Train(convert=Convert()), Train()}) == 1


def test_a_task_rebuilt_from_what_luigi_sends_is_the_same_task(luigi_config, base_sections):
    """Luigi rebuilds a dynamic dependency from its parameters: each upstream task travels as one
    JSON object, the stages above it nested as objects, never as JSON escaped inside a string."""
    from luigi.task_register import load_task

    from tasks import RunAll

    luigi_config(base_sections)
    record = RunAll().closing()
    sent = record.to_str_params()
    assert not any("\\" in value for value in sent.values()), sent
    assert json.loads(sent["report"])["params"]["evaluate"]["params"]["train"]["family"] == "Train"
    rebuilt = load_task("tasks", "RunRecord", sent)
    assert rebuilt == record and rebuilt.task_id == record.task_id


def built_for_rebuild(family: str):
    """A task of `family` whose DAG holds insignificant values other than luigi.cfg's, one of
    them read by a version (checkpoint spacing under early stopping), and a --rerun."""
    from tasks import Convert, Evaluate, Predict, Report, RunAll, Sweep, Train

    train = Train(save_checkpoints_steps=50, early_stopping_steps=100, log_step_count_steps=3, rerun=True)
    if family == "RunAll":
        return RunAll(train=train)
    if family == "Sweep":
        return Sweep(grid={"dense_units": [16, 32]}, model_defs=["cnn"])
    evaluate = Evaluate(train=train, batch_size=7)
    return Report(evaluate=evaluate, predict=Predict(train=Train(convert=Convert(), max_steps=13), export="best",
                                                     batch_size=5))


@pytest.mark.parametrize("family", ["RunAll", "Sweep", "Report"])
def test_a_task_rebuilt_from_its_str_params_in_another_process_is_the_same_task(luigi_config, base_sections,
                                                                                family):
    """As Luigi rebuilds a dynamic dependency (or a task for another worker), from the strings it
    sends and with none of this process's instances to reuse: the same id, the same version at
    every stage, and the same insignificant values, the upstream tasks' included."""
    from luigi.task_register import Register, load_task

    from tasks.base import Stage
    from tasks.runs import whole_dag

    luigi_config(base_sections)
    original = built_for_rebuild(family)

    def described(root) -> list[tuple]:
        return [(task.task_id, task.version if isinstance(task, Stage) else None, task.to_str_params())
                for task in whole_dag(root)]

    for task in {original, *whole_dag(original)}:
        sent = task.to_str_params()
        Register.clear_instance_cache()
        rebuilt = load_task("tasks", task.get_task_family(), sent)
        assert rebuilt is not task and rebuilt.task_id == task.task_id, task
        assert described(rebuilt) == described(task), task


def test_nothing_luigi_sends_the_scheduler_holds_a_source_urls_secrets(luigi_config, base_sections):
    """Luigi's scheduler keeps every parameter it is sent and shows them in a failed task's
    "Command to re-run": a Download's source_url is never sent, not even inside an upstream's
    JSON, yet a task rebuilt from what is sent, in this process tree, has it back."""
    from luigi.task_register import Register, load_task

    from tasks import Convert, Download, RunAll, Train
    from tasks.runs import whole_dag

    luigi_config(base_sections)
    secret_url = "https://reader:s3cret-pass@127.0.0.1/tiny.tar.gz?X-Amz-Signature=deadbeef&X-Amz-Credential=AKIA1"
    root = RunAll(train=Train(convert=Convert(download=Download(source_url=secret_url))))
    for task in whole_dag(root):
        sent = json.dumps([task.to_str_params(), task.to_str_params(only_significant=True),
                           task._get_param_visibilities()])
        assert not {"s3cret", "deadbeef", "AKIA1", "reader"} & set(re.findall(r"\w+", sent)), (task, sent)
        if not isinstance(task, Download):  # named by itself, a Download reads luigi.cfg's source_url
            Register.clear_instance_cache()
            rebuilt = load_task("tasks", task.get_task_family(), task.to_str_params())
            assert rebuilt.task_id == task.task_id, task
    Register.clear_instance_cache()
    rebuilt = load_task("tasks", "RunRecord", root.closing().to_str_params())
    assert rebuilt.evaluate.train.convert.download.source_url == secret_url


def test_a_task_rebuilt_where_its_source_url_is_not_known_fails_naming_it_instead_of_using_another(
        luigi_config, base_sections):
    """A process that did not schedule a task (`luigi --assistant`, a pasted re-run command) takes
    its Download's private source_url from luigi.cfg: another URL would be other data under the
    same name, so the rebuild fails, naming both versions and the parameter to pass."""
    from luigi.task_register import Register, load_task

    from pipeline.errors import ConfigError
    from tasks import Convert, Download, RunAll, Train, parameters

    luigi_config(base_sections)
    root = RunAll(train=Train(convert=Convert(download=Download(source_url="https://127.0.0.1/other.tar.gz"))))
    sent = root.closing().to_str_params()
    parameters._kept.clear()  # as in a process that did not schedule it
    Register.clear_instance_cache()
    download = root.train.convert.download
    with pytest.raises(ConfigError, match=rf"Download@{download.version} was rebuilt here as Download@\w+: its "
                                          r"private parameters \(source_url\).*--Download-source-url"):
        load_task("tasks", "RunRecord", sent)


def test_stage_folder_places_each_stage_under_the_layout_roots(luigi_config, tmp_path):
    from pipeline.errors import ConfigError
    from tasks.config import stage_folder

    luigi_config({"layout": {"data_root": str(tmp_path / "data"), "results_root": "s3://bucket/results"}})
    assert stage_folder("Convert", "v1", dataset="mnist") == str(tmp_path / "data" / "tfrecords" / "mnist" / "v1")
    assert stage_folder("Train", "v2", dataset="mnist", model="cnn") == "s3://bucket/results/mnist/cnn-v2"
    assert stage_folder("Evaluate", "v3", within="s3://bucket/results/mnist/cnn-v2", split="test") == \
        "s3://bucket/results/mnist/cnn-v2/evaluate-test-v3"
    assert stage_folder("Comparison", "v4") == "s3://bucket/results"
    with pytest.raises(ConfigError, match=r"the folder of Report needs version, within; given version='v5', "
                                          r"within=''"):
        stage_folder("Report", "v5")
    with pytest.raises(ConfigError, match=r"the folder of Train needs version, dataset, model; given "
                                          r"version='v7', dataset='mnist', model=''"):
        stage_folder("Train", "v7", dataset="mnist")
    with pytest.raises(ConfigError, match=r"no folder is defined for stage 'Sweep'; expected one of Download, "):
        stage_folder("Sweep", "v6")


def test_two_datasets_share_no_task_and_two_trainings_share_their_upstream(luigi_config, base_sections):
    first = graph(luigi_config, base_sections)
    sections = copy.deepcopy(base_sections)
    sections["Download"]["dataset"] = "second"
    second = graph(luigi_config, sections)
    assert not {task_id for task_id, _ in first.values()} & {task_id for task_id, _ in second.values()}
    sections = copy.deepcopy(base_sections)
    sections["Train"]["params"] = '{"conv_filters": [8], "dense_units": 32}'
    other_params = graph(luigi_config, sections)
    assert {family for family in first if first[family] == other_params[family]} == {"Download", "Convert"}


def test_building_the_graph_does_not_import_tensorflow(tmp_path):
    config = write_config(tmp_path / "luigi.cfg", cli_sections(tmp_path, "file:tiny.tar.gz"))
    probe = ("import sys, tasks\nroot = tasks.RunAll()\nprint(root.task_id)\n"
             "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "LUIGI_CONFIG_PATH": str(config)})
    assert result.returncode == 0 and result.stdout.startswith("RunAll_"), result.stderr[-2000:]
