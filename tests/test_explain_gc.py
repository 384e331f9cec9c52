"""Why will it run (`python -m tasks.explain`), and cleaning up (`python -m tasks.gc`), on a real
completed tree and on ones made here."""
from __future__ import annotations

import configparser
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import champion, fingerprint
from pipeline.champion import champion_path
from pipeline.index import INDEX_FOLDER, index_entry, read_index, record
from pipeline.locks import file_lock
from tests.conftest import (REPO, cli_sections, luigi_env, read_csv, run_watched, run_without_tensorflow,
                            tiny_config, write_config)


def explain(folder: Path, config: Path, *args: str, code: int = 0, source: Path = REPO) -> list[str]:
    """The lines `python -m tasks.explain` prints (on stderr when `code` is not 0), run from the
    code in `source`; it must not import TensorFlow on the way."""
    result = run_without_tensorflow("tasks.explain", *args, cwd=folder,
                                    env={**luigi_env(config), "PYTHONPATH": str(source)}, timeout_s=60)
    assert result.returncode == code, result.stderr[-3000:]
    return (result.stderr if code else result.stdout).splitlines()


def reasons_of(lines: list[str], family: str) -> list[str]:
    """The reasons printed under the first task of `family` to run ([] if it is done)."""
    for number, line in enumerate(lines):
        if line.startswith(f"to run  {family}("):
            following = [text.strip()[2:] for text in lines[number + 1:]]
            return following[:next((i for i, text in enumerate(lines[number + 1:]) if not text.startswith(" ")),
                                   len(following))]
        if line.startswith(f"done    {family}("):
            return []
    raise AssertionError(f"no {family} in:\n" + "\n".join(lines))


@pytest.fixture(scope="module")
def completed(tmp_path_factory, mnist_subset):
    folder = tmp_path_factory.mktemp("completed")
    config = write_config(folder / "luigi.cfg", cli_sections(folder, mnist_subset.as_uri()))
    result = run_watched(folder, config, "RunAll", "--local-scheduler")
    assert result.returncode == 0, result.output[-3000:]
    return folder, config


@pytest.mark.slow
def test_explain_says_what_will_run_and_why(completed):
    folder, config = completed

    nothing = explain(folder, config, "RunAll")
    assert all(line.startswith("done") for line in nothing if line.startswith(("done", "to run")))
    # Download, PlanConversion, 6 ConvertShard, Convert, Train, Evaluate, Predict, Report, Bless, RunAll,
    # RunRecord
    assert nothing[-1] == "0 of 16 tasks will run."

    params = explain(folder, config, "RunAll", "--Train-params", '{"conv_filters": [8], "dense_units": 32}')
    assert reasons_of(params, "Download") == [] and reasons_of(params, "Convert") == []
    [why] = reasons_of(params, "Train")
    assert why.startswith('params: {"conv_filters": [8], "dense_units": 16} -> {"conv_filters": [8], '
                          '"dense_units": 32} (closest completed: Train@')
    assert reasons_of(params, "Evaluate")[0].startswith("upstream will run: Train@")

    seed = explain(folder, config, "RunAll", "--Convert-split-seed", "8")
    assert reasons_of(seed, "Convert")[0].startswith("split_seed: 7 -> 8")
    assert reasons_of(seed, "Train")[0].startswith("upstream will run: Convert@")

    model = folder / "cnn_copy.py"
    model.write_text((REPO / "model_defs" / "cnn.py").read_text() + "\n\ndef a_users_edit():\n    return 1\n")
    copied = explain(folder, config, "RunAll", "--Train-model-def", str(model))
    assert any("the model file changed" in why for why in reasons_of(copied, "Train"))
    assert any(why.startswith("model_def: ") for why in reasons_of(copied, "Train"))

    # A comment is no change to a model file (see pipeline.fingerprint).
    model.write_text((REPO / "model_defs" / "cnn.py").read_text() + "# a user's comment\n")
    commented = explain(folder, config, "RunAll", "--Train-model-def", str(model))
    assert [why.startswith("model_def: ") for why in reasons_of(commented, "Train")] == [True]


@pytest.mark.slow
def test_explain_refuses_what_luigi_refuses_in_one_line(completed):
    folder, config = completed
    assert explain(folder, config, "Sweep", "--grid", '{"dense_units": [8, 16]}', "--model-defs", '["cnn", "dnn"]',
                   code=40) == ["error: --grid key 'dense_units' is not a param of model 'dnn' (dnn.py); its params "
                                "are hidden_units, learning_rate"]
    [line] = explain(folder, config, "RunAll", "--Train-max-steps", "many", code=40)
    assert "max_steps" in line


@pytest.mark.slow
def test_explain_names_a_change_to_the_pipelines_code(completed, luigi_config, monkeypatch):
    from tasks.explain import explain as lines_of

    folder, config = completed
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(config)
    luigi_config({name: dict(parser[name]) for name in parser.sections()})
    identity = fingerprint.code_identity

    def edited(entry_points, packages=fingerprint.PACKAGES):
        code = identity(entry_points, packages)
        return {**code, "pipeline.evaluation:per_class_scores": "edited"} if \
            "pipeline.evaluation:per_class_scores" in code else code

    monkeypatch.setattr(fingerprint, "code_identity", edited)
    monkeypatch.chdir(folder)
    from tasks import RunAll

    lines = lines_of(RunAll())
    assert reasons_of(lines, "Train") == []
    assert any(why.startswith("code changed: pipeline.evaluation.per_class_scores (closest completed: Evaluate@")
               for why in reasons_of(lines, "Evaluate")), lines


def fabricated(results: Path, runs: dict[str, tuple[str, float, str]]) -> dict:
    """An index of Train runs (version -> (params, accuracy, completed_at)), each with its
    evaluation, and their folders with a file of 1000 bytes each."""
    index = {}
    for version, (params, accuracy, at) in runs.items():
        run = results / "ds" / f"cnn-{version}"
        evaluation = run / f"evaluate-test-e{version}"
        for folder in (run, evaluation):
            folder.mkdir(parents=True)
            (folder / "weights").write_bytes(bytes(1000))
        index[f"Train/{version}"] = index_entry(
            "Train", version, run, {"params": {"params": params}, "content": version}, dataset="ds",
            upstream=["Convert/c1"])
        index[f"Train/{version}"]["completed_at"] = at
        index[f"Evaluate/e{version}"] = index_entry(
            "Evaluate", f"e{version}", evaluation, {"params": {"split": "test"}}, dataset="ds",
            upstream=[f"Train/{version}"], leaderboard={
                "run": run.name, "model": "cnn", "split": "test", "accuracy": accuracy, "loss": 1 - accuracy,
                "train_version": version})
        index[f"Evaluate/e{version}"]["completed_at"] = at
    index["Convert/c1"] = index_entry("Convert", "c1", results.parent / "data" / "c1", {}, dataset="ds")
    return index


def put_in_index(results: Path, index: dict) -> None:
    for entry in index.values():
        record(str(results / INDEX_FOLDER), entry)


def gc(folder: Path, config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tasks.gc", *args], cwd=folder,
                          env={**luigi_env(config), "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=60)


# v1 and v2 share params: v2, newer, supersedes v1 (the model file changed); v3 supersedes v4.
RUNS = {"v1": ('{"lr": 1}', 0.70, "2026-01-01T00:00:01+00:00"),
        "v2": ('{"lr": 1}', 0.80, "2026-01-02T00:00:01+00:00"),
        "v3": ('{"lr": 2}', 0.60, "2026-01-03T00:00:01+00:00"),
        "v4": ('{"lr": 2}', 0.90, "2026-01-01T00:00:01+00:00")}


def superseded_runs(tmp_path: Path) -> tuple[Path, Path, dict]:
    """RUNS in the index, and a configuration RunAll can be made of (gc keeps its versions), none
    of whose versions is in this index: (results folder, luigi.cfg, index)."""
    results = tmp_path / "results"
    config = write_config(tmp_path / "luigi.cfg", tiny_config(tmp_path, (tmp_path / "none.tar.gz").as_uri()))
    index = fabricated(results, RUNS)
    put_in_index(results, index)
    return results, config, index


def test_gc_lists_superseded_runs_outside_the_top_and_removes_them_only_when_asked(tmp_path):
    results, config, _ = superseded_runs(tmp_path)

    listed = gc(tmp_path, config, "--keep-top", "1")
    assert listed.returncode == 0, listed.stderr
    # v4 is older than v3 but the best evaluation: kept. v1 is superseded by v2 and not in the top 1.
    assert [line.split()[2] for line in listed.stdout.splitlines()[:-1]] == ["Train/v1"]
    assert "0.0 MB" in listed.stdout and "pass --yes to remove them" in listed.stdout
    assert (results / "ds" / "cnn-v1").is_dir(), "nothing is removed without --yes"

    # A task writing into v1's folder holds its stage lock: then v1 stays.
    lock = tmp_path / "data" / ".locks" / "busy.lock"
    with file_lock(lock, guards=str((results / "ds" / "cnn-v1" / "evaluate-validation-x").resolve())):
        busy = gc(tmp_path, config, "--keep-top", "1", "--yes")
    assert "kept" in busy.stdout and (results / "ds" / "cnn-v1").is_dir()

    removed = gc(tmp_path, config, "--keep-top", "1", "--yes")
    assert removed.returncode == 0 and "removed 1 version(s)" in removed.stdout, removed.stdout + removed.stderr
    assert not (results / "ds" / "cnn-v1").exists()
    assert all((results / "ds" / f"cnn-{version}").is_dir() for version in ("v2", "v3", "v4"))
    index = read_index(str(results / INDEX_FOLDER))
    assert "Train/v1" not in index and "Evaluate/ev1" not in index and "Train/v2" in index
    assert [row["run"] for row in read_csv(results / "leaderboard.csv")] == ["cnn-v4", "cnn-v2", "cnn-v3"]


def test_gc_keeps_the_champion_and_the_champions_before_it(tmp_path):
    results, config, index = superseded_runs(tmp_path)
    pointer = champion_path(str(results), "ds", "c1", "test")
    for version in ("v4", "v1"):  # v1, superseded by v2, is champion; v4, superseded by v3, was before it
        entry = index[f"Evaluate/e{version}"]
        champion.force(pointer, str(results / INDEX_FOLDER), champion.candidate(
            train_version=version, train_path=index[f"Train/{version}"]["path"], export="export/1", model="cnn",
            evaluation=f"Evaluate/e{version}", metrics={"accuracy": entry["leaderboard"]["accuracy"], "loss": 0.3}),
            "chosen")

    listed = gc(tmp_path, config, "--keep-top", "0")

    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[-1].startswith("0 version(s)"), listed.stdout
    champion.revoke(pointer, str(results / INDEX_FOLDER), "wrong")
    champion.revoke(pointer, str(results / INDEX_FOLDER), "wrong too")
    assert [line.split()[2] for line in gc(tmp_path, config, "--keep-top", "0").stdout.splitlines()[:-1]] == \
        ["Train/v1", "Train/v4"]
    Path(pointer).write_text("{")
    damaged = gc(tmp_path, config, "--keep-top", "0", "--yes")
    assert damaged.returncode == 2 and damaged.stdout == "" and pointer in damaged.stderr
    assert (results / "ds" / "cnn-v4").is_dir()


def test_gc_never_removes_what_lies_outside_the_roots_whatever_the_index_says(tmp_path):
    results = tmp_path / "results"
    config = write_config(tmp_path / "luigi.cfg", tiny_config(tmp_path, (tmp_path / "none.tar.gz").as_uri()))
    runs = {"v1": ('{"lr": 1}', 0.70, "2026-01-01T00:00:01+00:00"),
            "v2": ('{"lr": 1}', 0.80, "2026-01-02T00:00:01+00:00")}
    index = fabricated(results, runs)
    # Superseded by v2 as v1 is, but naming a folder outside data_root and results_root (as an
    # index rebuilt from a planted entry file could).
    precious = tmp_path / "home" / "user"
    precious.mkdir(parents=True)
    (precious / "notes.txt").write_text("keep me")
    index["Train/v0"] = {**index["Train/v1"], "version": "v0", "path": str(precious),
                         "completed_at": "2025-12-31T00:00:01+00:00"}
    put_in_index(results, index)

    removed = gc(tmp_path, config, "--keep-top", "0", "--yes")

    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert (precious / "notes.txt").read_text() == "keep me" and (results / "ds" / "cnn-v2").is_dir()
    assert f"refused Train/v0 {precious}: outside data_root and results_root" in removed.stdout
    assert "removed 1 version(s)" in removed.stdout and not (results / "ds" / "cnn-v1").exists()
    assert "Train/v0" in read_index(str(results / INDEX_FOLDER))


@pytest.fixture(scope="module")
def edited_model_runs(tmp_path_factory, mnist_subset):
    """Two complete runs of the same parameters, the second with an edit to the model file (the
    first's code is older), and the index after the first."""
    folder = tmp_path_factory.mktemp("edited")
    model = folder / "mymodel.py"
    original = (REPO / "model_defs" / "cnn.py").read_text()
    model.write_text(original)
    sections = cli_sections(folder, mnist_subset.as_uri())
    sections["Train"]["model_def"] = str(model)
    config = write_config(folder / "luigi.cfg", sections)
    first = run_watched(folder, config, "RunAll", "--local-scheduler")
    assert first.returncode == 0, first.output[-3000:]
    older = read_index(str(folder / "results" / INDEX_FOLDER))
    model.write_text(original + "\n\ndef a_users_edit():\n    return 1\n")
    second = run_watched(folder, config, "RunAll", "--local-scheduler")
    assert second.returncode == 0, second.output[-3000:]
    return folder, config, model, original, {entry["stage"]: entry for entry in older.values()}


@pytest.mark.slow
def test_gc_keeps_the_report_and_predictions_of_a_kept_evaluation(edited_model_runs):
    folder, config, _, _, older = edited_model_runs
    results = folder / "results"
    # The older run's evaluation is among the top 5, though a newer run of its configuration exists.
    assert len(read_csv(results / "leaderboard.csv")) == 2

    listed = gc(folder, config)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[-1].startswith("0 version(s)"), listed.stdout

    removed = gc(folder, config, "--yes")
    assert removed.returncode == 0 and "removed 0 version(s)" in removed.stdout, removed.stdout + removed.stderr
    for stage in ("Report", "Predict", "RunRecord", "Evaluate", "Train"):
        assert Path(older[stage]["marker"]).is_file(), f"gc removed the kept evaluation's {stage}"
    board = read_csv(results / "leaderboard.csv")
    assert str(Path(older["Report"]["marker"]).relative_to(results)) in [row["report"] for row in board]
    assert all((results / row["report"]).is_file() for row in board)


@pytest.mark.slow
def test_gc_never_lists_the_versions_luigi_cfg_uses_now(edited_model_runs):
    folder, config, model, original, older = edited_model_runs
    # Back to the first model file: its run, complete but older than the edited one's, is the current one.
    model.write_text(original)
    assert explain(folder, config, "RunAll")[-1] == "0 of 16 tasks will run."

    listed = gc(folder, config, "--keep-top", "0")
    assert listed.returncode == 0, listed.stderr
    assert older["Train"]["path"] not in listed.stdout, listed.stdout
    assert gc(folder, config, "--keep-top", "0", "--yes").returncode == 0
    assert all(Path(older[stage]["marker"]).is_file()
               for stage in ("Download", "Convert", "Train", "Evaluate", "Predict", "Report", "RunRecord"))
    assert explain(folder, config, "RunAll")[-1] == "0 of 16 tasks will run."


def test_gc_refuses_when_luigi_cfg_makes_no_run(tmp_path):
    config = write_config(tmp_path / "luigi.cfg", {"layout": {"data_root": str(tmp_path / "data"),
                                                              "results_root": str(tmp_path / "results")}})
    refused = gc(tmp_path, config, "--yes")
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.startswith("error: luigi.cfg does not make a RunAll, so the versions it uses are unknown")
    assert "requires the 'model_def' parameter to be set" in refused.stderr
