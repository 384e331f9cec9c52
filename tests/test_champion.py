"""The champion: its pointer under promotions at once (local and S3), `python -m tasks.champion`
(show, set, revoke, JSON), and Predict from the champion through the real `luigi` command."""
from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from pipeline import champion, index, storage
from pipeline.errors import ChampionError, NoChampion, StageOutputError
from pipeline.index import INDEX_FOLDER, read_index
from tests.conftest import (REPO, cli_sections, luigi_env, run_watched, run_without_tensorflow, tiny_config,
                            write_config)

ACCURACIES = (0.91, 0.97, 0.93, 0.95, 0.90)


def record(version: str, accuracy: float, train_path: str = "") -> dict:
    return champion.candidate(train_version=version, train_path=train_path or f"results/tiny/cnn-{version}",
                              export="export/1", model="cnn", evaluation=f"Evaluate/e{version}",
                              metrics={"accuracy": accuracy, "loss": 1 - accuracy})


def test_a_revoked_model_is_not_crowned_again_by_a_check_only_by_a_person(tmp_path):
    pointer, lock = str(tmp_path / "champion.json"), str(tmp_path / ".index")

    def blessed(baseline):
        return {"blessed": True, "reason": "passed"}

    assert champion.promote_if_better(pointer, lock, record("t1", 0.9), blessed)[1]
    champion.revoke(pointer, lock, "it mislabels sevens")

    verdict, crowned = champion.promote_if_better(pointer, lock, record("t1", 0.9), blessed)
    assert verdict["blessed"] and not crowned and "not made champion: it was revoked" in verdict["reason"]
    assert champion.current(pointer) is None and champion.read_pointer(pointer)["revoked"] == ["t1"]
    champion.force(pointer, lock, record("t1", 0.9), "fixed upstream")
    assert champion.current(pointer)["train_version"] == "t1" and champion.read_pointer(pointer)["revoked"] == []


def promote(path: str, lock_folder: str, version: str, accuracy: float, start, crowned) -> None:
    """One process's check: blessed, and crowned if it ranks above the champion it finds."""
    start.wait()
    _verdict, is_champion = champion.promote_if_better(
        path, lock_folder, record(version, accuracy),
        lambda baseline: {"blessed": True, "reason": f"against {baseline and baseline['train_version']}"})
    crowned[version] = is_champion


def test_promotions_at_once_end_with_the_best_and_lose_no_change(root):
    path = champion.champion_path(root, "tiny", "d1", "test")
    context = multiprocessing.get_context("spawn")
    start, crowned = context.Barrier(len(ACCURACIES)), context.Manager().dict()
    processes = [context.Process(target=promote, args=(path, storage.join(root, INDEX_FOLDER), f"t{number}",
                                                       accuracy, start, crowned))
                 for number, accuracy in enumerate(ACCURACIES)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert [process.exitcode for process in processes] == [0] * len(ACCURACIES)

    pointer = champion.read_pointer(path)
    assert pointer["champion"]["accuracy"] == max(ACCURACIES)
    # Every crowning is in the history, each replacing the one crowned before it: none was lost.
    history = pointer["history"]
    assert sorted(change["train_version"] for change in history) == sorted(
        version for version, is_champion in crowned.items() if is_champion)
    assert [change["replaced"] for change in history] == [None] + [change["train_version"] for change in history[:-1]]
    assert [old["train_version"] for old in pointer["previous"]] == [change["train_version"] for change in history[:-1]]
    assert [old["accuracy"] for old in pointer["previous"]] == sorted(old["accuracy"] for old in pointer["previous"])


def test_a_damaged_pointer_is_an_error_naming_its_file(root):
    path = champion.champion_path(root, "tiny", "d1", "test")
    storage.write_bytes(path, b'{"champion": {"train_version": ')

    with pytest.raises(ChampionError, match=re.escape(path)):
        champion.read_pointer(path)
    with pytest.raises(ChampionError, match=re.escape(path)):
        champion.force(path, storage.join(root, INDEX_FOLDER), record("t1", 0.9), "a person chose it")


def test_predict_from_the_champion_stands_on_its_train_and_travels_with_it(luigi_config, tmp_path):
    """In one process: no champion fails as Predict is made; with one, Predict stands on its Train
    (folder and key), rebuilt from its parameters as the same task; a removed run fails clearly."""
    from tasks.config import index_folder, results_root
    from tasks.stages import ChampionTrain, Convert, Predict

    luigi_config(tiny_config(tmp_path, "file:unused.tar.gz"))
    (tmp_path / "images").mkdir()
    with pytest.raises(NoChampion, match=r"python -m tasks\.champion --set RUN --reason TEXT"):
        Predict(model="champion", input_dir=str(tmp_path / "images"))

    convert = Convert()
    path = champion.champion_path(results_root(), "tiny", convert.version, "test")
    train_path = str(tmp_path / "results" / "tiny" / "cnn-t1")
    champion.force(path, index_folder(), record("t1", 0.9, train_path), "a person chose it")
    with pytest.raises(ChampionError, match="is no Train the index"):  # not indexed yet
        Predict(model="champion", input_dir=str(tmp_path / "images"))

    def indexed_train(version: str, path: str, data_version: str = convert.version) -> None:
        index.record(index_folder(), index.index_entry("Train", version, path, {"upstream": {"convert": data_version}},
                                                       dataset="tiny"))

    indexed_train("t1", train_path)
    predict = Predict(model="champion", input_dir=str(tmp_path / "images"))

    train = predict.train
    assert isinstance(train, ChampionTrain) and (train.version, train.directory) == ("t1", train_path)
    assert predict.identity["upstream"] == {"train": "t1"} and predict.upstream_keys() == ["Train/t1"]
    assert storage.parent(predict.directory) == train_path
    assert "upstream=Train@t1" in repr(predict)
    rebuilt = Predict.train.parse(Predict.train.serialize(train))
    assert (rebuilt.task_id, rebuilt.directory, rebuilt.convert.version) == (train.task_id, train_path,
                                                                             convert.version)
    assert not train.complete()
    with pytest.raises(StageOutputError, match=re.escape(f"{train_path}/train.json")):
        train.run()

    # A planted pointer may not send Predict outside results_root, nor to a folder the index does not give its Train.
    # Nor to a Train trained on another dataset version, whose model would read these records.
    for indexed, planted, data_version in (("/etc", "/etc", convert.version),
                                           (str(tmp_path / "results" / "tiny" / "cnn-t2"), train_path, convert.version),
                                           (train_path, train_path, "other")):
        indexed_train("t2", indexed, data_version)
        champion.force(path, index_folder(), record("t2", 0.95, planted), "planted")
        with pytest.raises(ChampionError, match=re.escape(f"Train/t2 at {planted}, is no Train the index")):
            Predict(model="champion", input_dir=str(tmp_path / "other"))
        champion.revoke(path, index_folder(), "planted")

    # The champion of the split Evaluate is given: none was set on the validation split.
    luigi_config({**tiny_config(tmp_path, "file:unused.tar.gz"), "Evaluate": {"split": "validation"}})
    with pytest.raises(NoChampion, match=re.escape(path.removesuffix("test.json") + "validation.json")):
        Predict(model="champion", input_dir=str(tmp_path / "images"))


# --- Through the real commands, on one sweep of two runs ---

def champion_command(cwd: Path, config: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -m tasks.champion args`, which must not import TensorFlow on the way."""
    return run_without_tensorflow("tasks.champion", *args, cwd=cwd,
                                  env={**luigi_env(config), "PYTHONPATH": str(REPO)})


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, mnist_subset):
    """Two completed runs of the tiny pipeline: `a` (dense_units 8) and `b` (luigi.cfg's Train, 16)."""
    folder = tmp_path_factory.mktemp("champion")
    config = write_config(folder / "luigi.cfg", cli_sections(folder, mnist_subset.as_uri()))
    result = run_watched(folder, config, "Sweep", "--local-scheduler", "--workers", "2",
                         "--grid", '{"dense_units": [8, 16]}')
    assert result.returncode == 0, result.output[-3000:]
    trains = {entry["identity"]["params"]["params"]["dense_units"]: entry
              for entry in read_index(str(folder / "results" / INDEX_FOLDER)).values() if entry["stage"] == "Train"}
    images = folder / "path" / "to" / "images"
    images.mkdir(parents=True)
    for number in range(3):
        Image.new("L", (28, 28), color=80 * number).save(images / f"image{number}.png")
    return {"folder": folder, "config": config, "source_url": mnist_subset.as_uri(), "a": trains[8], "b": trains[16]}


@pytest.fixture
def no_champion(sweep):
    shutil.rmtree(sweep["folder"] / "results" / champion.CHAMPION_FOLDER, ignore_errors=True)
    return sweep


def pointer_json(sweep) -> dict:
    shown = champion_command(sweep["folder"], sweep["config"], "--json")
    assert shown.returncode == 0, shown.stderr
    [pointer] = json.loads(shown.stdout)
    return pointer


@pytest.mark.slow
def test_set_show_and_revoke_through_the_command(no_champion):
    sweep = no_champion
    folder, config, a, b = sweep["folder"], sweep["config"], sweep["a"], sweep["b"]
    empty = champion_command(folder, config)
    assert empty.returncode == 0 and "No champion under" in empty.stdout and "--set RUN" in empty.stdout

    by_folder = champion_command(folder, config, "--set", a["path"], "--reason", "the smaller model")
    assert by_folder.returncode == 0, by_folder.stderr
    assert storage.name(a["path"]) in by_folder.stdout and "by set: the smaller model" in by_folder.stdout
    pointer = pointer_json(sweep)
    [metrics] = [json.loads(path.read_text()) for path in Path(folder, a["path"]).glob("evaluate-test-*/metrics.json")]
    assert (pointer["dataset"], pointer["data_version"], pointer["split"]) == (
        "tiny", a["identity"]["upstream"]["convert"], "test")
    assert {key: pointer["champion"][key] for key in ("train_version", "train_path", "by", "reason", "accuracy")} == {
        "train_version": a["version"], "train_path": a["path"], "by": "set", "reason": "the smaller model",
        "accuracy": metrics["accuracy"]}
    assert pointer["champion"]["export_dir"].startswith(a["path"] + "/export/")
    assert Path(folder, pointer["champion"]["export_dir"], "saved_model.pb").is_file()
    assert set(pointer["champion"]["metrics"]) >= {"accuracy", "loss", "examples"}

    by_version = champion_command(folder, config, "--set", b["version"], "--reason", "the configured one")
    assert by_version.returncode == 0, by_version.stderr
    assert pointer_json(sweep)["champion"]["train_version"] == b["version"]

    revoked = champion_command(folder, config, "--revoke", "--reason", "it mislabels sevens")
    assert revoked.returncode == 0, revoked.stderr
    pointer = pointer_json(sweep)
    assert pointer["champion"]["train_version"] == a["version"] and pointer["previous"] == []
    assert [(change["action"], change["train_version"]) for change in pointer["history"]] == [
        ("set", a["version"]), ("set", b["version"]), ("revoke", b["version"])]
    assert pointer["history"][-1]["restored"] == a["version"]
    shown = champion_command(folder, config)
    assert shown.returncode == 0 and "it mislabels sevens" in shown.stdout and "revoke" in shown.stdout

    # Errors: one line naming the bad value, and a non-zero exit.
    for args, named in ((("--set", "cnn-nosuchversion", "--reason", "x"), "'cnn-nosuchversion'"),
                        (("--set", a["path"], "--reason", "x", "--split", "validation"), "validation split"),
                        (("--set", a["path"], "--reason", "again"), "already the champion"),
                        (("--revoke", "--reason", "x", "--dataset", "other"), "dataset other")):
        refused = champion_command(folder, config, *args)
        assert refused.returncode != 0 and named in refused.stderr, (args, refused.stderr)
        assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    champion_path = Path(pointer["path"])
    champion_path.write_text("{")
    damaged = champion_command(folder, config)
    assert damaged.returncode != 0 and str(champion_path) in damaged.stderr, damaged.stderr


def predictions_of(output: str, images: Path) -> Path:
    """The predictions.csv a Predict of `images` names at the end of its command."""
    return Path(re.search(rf"PREDICTIONS of {re.escape(str(images))}: (\S+)", output).group(1))


@pytest.mark.slow
def test_predict_from_the_champion_follows_a_new_champion(no_champion, luigid):
    sweep = no_champion
    folder, config, a, b = sweep["folder"], sweep["config"], sweep["a"], sweep["b"]
    images = folder / "path" / "to" / "images"
    predict = ("Predict", "--Predict-model", "champion", "--input-dir", str(images))

    missing = run_watched(folder, config, *predict, "--local-scheduler", limit_s=60)
    assert missing.returncode != 0, missing.output[-2000:]
    assert "no champion at" in missing.output and "python -m tasks.champion --set RUN" in missing.output
    assert "--Bless-thresholds" in missing.output and "Traceback" not in missing.output, missing.output[-2000:]

    assert champion_command(folder, config, "--set", b["path"], "--reason", "first").returncode == 0
    first = run_watched(folder, config, *predict, "--local-scheduler")
    assert first.returncode == 0, first.output[-3000:]
    from_b = predictions_of(first.output, images)
    assert from_b.is_file() and from_b.parent.parent == Path(b["path"]).resolve()
    # The same task as a Predict on b's Train named by luigi.cfg (b is that Train): found done.
    on_b = run_watched(folder, config, "Predict", "--input-dir", str(images), "--local-scheduler")
    assert on_b.returncode == 0 and predictions_of(on_b.output, images) == from_b, on_b.output[-3000:]
    assert "started " not in on_b.output, on_b.output[-3000:]

    # A new champion: the same command predicts again with it, into a new version; b's stay.
    assert champion_command(folder, config, "--set", a["path"], "--reason", "second").returncode == 0
    # Through a central scheduler, with worker processes: the champion travels with the task.
    central = write_config(folder / "central.cfg", cli_sections(folder, sweep["source_url"], scheduler_port=luigid))
    second = run_watched(folder, central, *predict, "--workers", "2")
    assert second.returncode == 0, second.output[-3000:]
    from_a = predictions_of(second.output, images)
    assert from_a.is_file() and from_a.parent.parent == Path(a["path"]).resolve()
    assert from_a.parent.name != from_b.parent.name and from_b.is_file()


def documented_commands() -> list[str]:
    """The commands of docs/using.md's section on the champion, in order."""
    section = (REPO / "docs" / "using.md").read_text().split("## The champion", 1)[1].split("\n## ", 1)[0]
    [block] = re.findall(r"```sh\n(.*?)```", section, re.DOTALL)
    return [line for line in block.splitlines() if line.strip()]


@pytest.mark.slow
def test_the_documented_champion_commands_run_as_written(no_champion):
    sweep = no_champion
    commands = documented_commands()
    # The one line that names a run of the reader's own names one of this sweep's.
    [assignment] = [number for number, line in enumerate(commands) if line.startswith("RUN=")]
    commands[assignment] = f"RUN={sweep['a']['path']}"
    env = {**luigi_env(sweep["config"]), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}

    ran = subprocess.run(["bash", "-euxc", "\n".join(commands)], cwd=sweep["folder"], env=env, capture_output=True,
                         text=True, timeout=300)

    assert ran.returncode == 0, ran.stderr[-3000:]
    assert any(line.startswith("luigi --module tasks Predict") and "--Predict-model champion" in line
               for line in commands)
    pointer = pointer_json(sweep)
    assert [change["action"] for change in pointer["history"]] == ["set", "revoke"]
    assert pointer["champion"] is None


def test_the_command_shows_no_control_character_a_pointer_holds(tmp_path):
    """The pointer is a file in the results: a planted reason may not drive the terminal."""
    config = write_config(tmp_path / "luigi.cfg", tiny_config(tmp_path, "file:unused.tar.gz"))
    results = tmp_path / "results"
    champion.force(champion.champion_path(str(results), "tiny", "d1", "test"), str(results / INDEX_FOLDER),
                   record("t1", 0.9), "\x1b]0;owned\x07\x1b[2Jplanted")

    shown = champion_command(tmp_path, config)

    assert shown.returncode == 0, shown.stderr
    assert "\x1b" not in shown.stdout and "\x07" not in shown.stdout
    assert "\ufffd]0;owned\ufffd\ufffd[2Jplanted" in shown.stdout
