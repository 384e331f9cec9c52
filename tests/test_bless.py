"""The Bless stage: verdicts of pipeline.blessing on small dicts, then whole runs through the real
`luigi` command: a threshold that passes and one that fails, the first run (no champion: change
bounds skipped), change bounds against a champion, two runs blessed at once against one luigid,
--RunAll-require-blessed, a bad --Bless-thresholds, and the docs' commands as written."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import champion
from pipeline.blessing import NO_THRESHOLDS, bless_evaluation, check_thresholds, verdict
from pipeline.errors import ConfigError
from pipeline.index import INDEX_FOLDER
from pipeline.leaderboard import merit
from tests.conftest import (REPO, cli_sections, luigi_env, make_mnist_subset, run_watched, start_watched,
                            write_config)

EVALUATION = {"split": "test", "accuracy": 0.9, "loss": 0.3, "examples": 50, "global_step": 12,
              "class_names": ["0", "1"], "model_metrics": {"auc": 0.8}}
CHAMPION = {"train_version": "t0", "accuracy": 0.8, "loss": 0.4, "metrics": {"auc": 0.5}}


def results(checks: list[dict]) -> list[tuple[str, str, str]]:
    return [(check["metric"], check["bound"], check["result"]) for check in checks]


def test_value_bounds_pass_and_fail():
    passed = verdict(EVALUATION, {"accuracy": {"min": 0.85}, "loss": {"max": 0.5}}, None)
    assert passed["blessed"] and passed["failing"] == []
    assert results(passed["checks"]) == [("accuracy", "min", "pass"), ("loss", "max", "pass")]
    failed = verdict(EVALUATION, {"accuracy": {"min": 0.95}, "loss": {"max": 0.2}}, None)
    assert not failed["blessed"]
    assert failed["failing"] == ["accuracy 0.9000 < min 0.95", "loss 0.3000 > max 0.2"]
    assert failed["reason"].startswith("failed: accuracy 0.9000 < min 0.95, loss 0.3000 > max 0.2")
    assert failed["checks"][0] == {"metric": "accuracy", "bound": "min", "limit": 0.95, "value": 0.9,
                                   "baseline": None, "result": "fail"}


def test_change_bounds_compare_with_the_champion_absolute_and_relative():
    thresholds = {"accuracy": {"min_change": 0.05, "max_change": 0.2},
                  "loss": {"max_relative_change": -0.2, "min_relative_change": -0.3}}
    judged = verdict(EVALUATION, thresholds, CHAMPION)
    assert judged["blessed"], judged["reason"]
    changes = {(check["metric"], check["bound"]): check for check in judged["checks"]}
    assert changes["accuracy", "min_change"]["change"] == pytest.approx(0.1)
    assert changes["accuracy", "min_change"]["baseline"] == 0.8
    assert changes["loss", "max_relative_change"]["relative_change"] == pytest.approx(-0.25)
    worse = verdict(EVALUATION, {"accuracy": {"min_change": 0.15}, "loss": {"max_relative_change": -0.3}},
                    CHAMPION)
    assert not worse["blessed"]
    assert worse["failing"] == ["accuracy change 0.1000 < min_change 0.15",
                                "loss relative change -0.2500 > max_relative_change -0.3"]


def test_a_model_metric_is_checked_against_the_champions_own():
    judged = verdict(EVALUATION, {"auc": {"min": 0.7, "min_change": 0.4}}, CHAMPION)
    assert judged["failing"] == ["auc change 0.3000 < min_change 0.4"]


def test_change_bounds_without_a_champion_are_skipped_not_passed():
    judged = verdict(EVALUATION, {"accuracy": {"min": 0.5, "min_change": -0.01}}, None)
    assert results(judged["checks"]) == [("accuracy", "min", "pass"), ("accuracy", "min_change", "skipped")]
    assert judged["blessed"]
    assert "skipped: accuracy min_change -0.01 (no champion value to compare with)" in judged["reason"]
    zero = verdict(EVALUATION, {"loss": {"max_relative_change": 0.1}}, {**CHAMPION, "loss": 0.0})
    assert results(zero["checks"]) == [("loss", "max_relative_change", "skipped")]


def test_no_thresholds_bless_nothing_and_say_how_to_set_them():
    judged = verdict(EVALUATION, {}, CHAMPION)
    assert not judged["blessed"] and judged["checks"] == []
    assert judged["reason"] == NO_THRESHOLDS
    assert "no thresholds set" in NO_THRESHOLDS and "--Bless-thresholds" in NO_THRESHOLDS


def test_a_metric_the_evaluation_lacks_is_an_error_naming_it_and_the_metrics_it_has():
    with pytest.raises(ConfigError, match=r"metric 'precision', which the evaluation does not report; its metrics "
                                          r"are accuracy, auc, examples, global_step, loss"):
        verdict(EVALUATION, {"precision": {"min": 0.5}}, None)


@pytest.mark.parametrize("thresholds, message", [
    ([0.9], r"thresholds \[0.9\]: a JSON list; expected a JSON object of metric to bounds"),
    ({"accuracy": 0.9}, r"'accuracy' maps to 0.9; expected an object of bounds \(min, max, min_change"),
    ({"accuracy": {"minimum": 0.9}}, r"'accuracy' has unknown bound 'minimum'; the bounds are min, max, "),
    ({"accuracy": {"min": "0.9"}}, r"'accuracy' min is '0.9'; expected a finite number"),
    ({"accuracy": {"min": True}}, r"'accuracy' min is True; expected a finite number"),
])
def test_bad_thresholds_are_refused_naming_the_value_and_the_form(thresholds, message):
    with pytest.raises(ConfigError, match=message):
        check_thresholds(thresholds)


def test_thresholds_that_are_not_json_are_refused_naming_them():
    from tasks.parameters import ThresholdsParameter

    with pytest.raises(ConfigError, match=r"""thresholds '\{"accuracy": ' is not valid JSON .*; expected a JSON object"""):
        ThresholdsParameter().parse('{"accuracy": ')
    assert ThresholdsParameter().parse('{"accuracy": {"min": 0.5}}') == {"accuracy": {"min": 0.5}}


def test_a_check_cut_off_after_the_pointer_gives_the_same_verdict_again(tmp_path):
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps(EVALUATION))
    pointer = str(tmp_path / "champion.json")
    champion.promote_if_better(pointer, str(tmp_path / "index"), {**CHAMPION, "train_path": "a", "export_dir": "a/e"},
                               lambda baseline: {"blessed": True})

    def bless(blessing: Path) -> dict:
        return bless_evaluation(str(metrics), {"accuracy": {"min_change": 0.05}},
                                train={"train_version": "t1", "train_path": "b", "export": "e", "model": "cnn"},
                                champion_path=pointer, lock_folder=str(tmp_path / "index"),
                                blessing_path=str(blessing), context={"evaluation": "Evaluate/e1"})

    first = bless(tmp_path / "first.json")
    again = bless(tmp_path / "again.json")  # as a rerun after a crash between the pointer and blessing.json
    assert first["champion"] and again["champion"] and champion.current(pointer)["train_version"] == "t1"
    assert first["checks"] == again["checks"] and again["baseline"]["train_version"] == "t0"
    assert json.loads((tmp_path / "first.json").read_text())["evaluation"] == "Evaluate/e1"


# The whole pipeline through the real `luigi` command, on one tiny dataset shared by the tests below.

PASSING = '{"accuracy": {"min": 0, "min_change": -1}, "loss": {"max": 100}}'
FAILING = '{"accuracy": {"min": 1.01}}'


class Site:
    """A folder with a config of the tiny pipeline, and the `luigi` command run in it."""

    def __init__(self, folder: Path, source_url: str):
        self.folder = folder
        self.source_url = source_url
        self.config = write_config(folder / "luigi.cfg", cli_sections(folder, source_url))

    def luigi(self, *args: str, limit_s: float = 300):
        return run_watched(self.folder, self.config, *args, "--local-scheduler", limit_s=limit_s)

    def pointer(self) -> dict:
        [path] = (self.folder / "results" / champion.CHAMPION_FOLDER).glob("tiny/*/test.json")
        return champion.read_pointer(str(path))


def verdict_path(output: str) -> Path:
    """The blessing.json the last RESULT of `output` names."""
    return Path(re.findall(r"^    verdict: +(\S+)$", output, re.MULTILINE)[-1])


def record_of(blessing: Path) -> dict:
    """The run.json whose blessing is `blessing`."""
    [record] = [record for path in blessing.parents[2].glob("run-*/run.json")
                if (record := json.loads(path.read_text()))["blessing"]["path"] == str(blessing)]
    return record


def started(output: str) -> list[str]:
    return sorted(re.findall(r"^started (\w+)[@(]", output, re.MULTILINE))


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Site:
    folder = tmp_path_factory.mktemp("bless")
    return Site(folder, make_mnist_subset(folder / "subset.tar.gz").as_uri())


@pytest.fixture(scope="module")
def first_run(site):
    """The first run on the dataset: a threshold that passes; then the pointer as it left it."""
    result = site.luigi("RunAll", "--Bless-thresholds", PASSING)
    assert result.returncode == 0, result.output[-4000:]
    return result, site.pointer()


@pytest.mark.slow
def test_a_first_run_passes_its_thresholds_skips_its_change_bounds_and_is_champion(first_run):
    result, pointer = first_run
    blessing_path = verdict_path(result.output)
    blessing = json.loads(blessing_path.read_text())
    metrics = json.loads((blessing_path.parents[1] / "metrics.json").read_text())

    assert blessing_path.parent.name.startswith("bless-") and blessing_path.parents[1].name.startswith("evaluate-")
    assert blessing["blessed"] and blessing["champion"] and blessing["baseline"] is None
    assert [(check["bound"], check["result"]) for check in blessing["checks"]] == [
        ("min", "pass"), ("min_change", "skipped"), ("max", "pass")]
    assert blessing["checks"][0]["value"] == metrics["accuracy"]
    assert {key: blessing[key] for key in ("dataset", "split")} == {"dataset": "tiny", "split": "test"}
    assert blessing["evaluation"].startswith("Evaluate/") and blessing["train_version"] == \
        pointer["champion"]["train_version"]
    line = f"    BLESSED: passed: accuracy {metrics['accuracy']:.4f} >= min 0, loss {metrics['loss']:.4f} <= max 100; " \
           "skipped: accuracy min_change -1 (no champion value to compare with) (CHAMPION)"
    assert line in result.output.splitlines(), result.output[-2000:]
    assert record_of(blessing_path)["blessing"] == {"blessed": True, "reason": blessing["reason"], "failing": [],
                                                    "champion": True, "path": str(blessing_path)}
    assert pointer["champion"]["evaluation"] == blessing["evaluation"] and pointer["previous"] == []
    assert pointer["champion"]["accuracy"] == metrics["accuracy"]


@pytest.mark.slow
def test_a_threshold_that_fails_says_not_blessed_and_the_run_still_succeeds(site, first_run):
    result = site.luigi("RunAll", "--Bless-thresholds", FAILING)

    assert result.returncode == 0, result.output[-4000:]
    assert started(result.output) == ["Bless", "Report", "RunRecord"], "only the check, and what shows it, again"
    blessing_path = verdict_path(result.output)
    blessing = json.loads(blessing_path.read_text())
    accuracy = blessing["checks"][0]["value"]
    assert not blessing["blessed"] and blessing["failing"] == [f"accuracy {accuracy:.4f} < min 1.01"]
    assert f"    NOT BLESSED: accuracy {accuracy:.4f} < min 1.01" in result.output, result.output[-2000:]
    assert record_of(blessing_path)["blessing"]["blessed"] is False
    # Its model stays champion, made so by the earlier check.
    assert site.pointer()["champion"]["train_version"] == blessing["train_version"]


@pytest.mark.slow
def test_require_blessed_fails_a_run_whose_model_is_not_blessed_naming_runall_and_why(site, first_run):
    result = site.luigi("RunAll", "--Bless-thresholds", FAILING, "--RunAll-require-blessed")

    assert result.returncode == 30, result.output[-4000:]
    assert "FAILED RunAll(upstream=Train@" in result.output, result.output[-3000:]
    assert "is not blessed (failed: accuracy " in result.output and "--RunAll-require-blessed" in result.output
    assert "    NOT BLESSED: accuracy " in result.output
    # Blessed, the same option lets it through.
    passing = site.luigi("RunAll", "--Bless-thresholds", PASSING, "--RunAll-require-blessed")
    assert passing.returncode == 0 and started(passing.output) == [], passing.output[-3000:]


def test_bad_thresholds_fail_at_once_naming_the_value(tmp_path):
    config = write_config(tmp_path / "luigi.cfg", cli_sections(tmp_path, "file:nothing.tar.gz"))

    result = run_watched(tmp_path, config, "RunAll", "--local-scheduler", "--Bless-thresholds",
                         '{"accuracy": {"minimum": 0.9}}', limit_s=60)

    assert result.returncode != 0, result.output
    assert """thresholds {"accuracy": {"minimum": 0.9}}: 'accuracy' has unknown bound 'minimum'""" in result.output
    assert not (tmp_path / "data").exists()


@pytest.mark.slow
def test_two_runs_blessed_at_once_against_one_luigid_end_with_the_best_as_champion(site, first_run, luigid):
    central = write_config(site.folder / "central.cfg", cli_sections(site.folder, site.source_url, luigid))
    # A sweep whose first point is the first run's Train, beside a run of another Train, at once.
    sweep = start_watched(site.folder, central, "Sweep", "--grid", '{"dense_units": [16, 32]}',
                          "--Bless-thresholds", PASSING, limit_s=400)
    other = start_watched(site.folder, central, "RunAll", "--Train-max-steps", "6", "--Bless-thresholds", PASSING,
                          limit_s=400)
    swept, single = sweep(), other()
    assert swept.returncode == 0, swept.output[-4000:]
    assert single.returncode == 0, single.output[-4000:]

    blessings = [json.loads(path.read_text()) for path in (site.folder / "results").glob(
        "tiny/*/evaluate-test-*/bless-*/blessing.json")]
    checks = [blessing for blessing in blessings if blessing["thresholds"] == check_thresholds(json.loads(PASSING))]
    assert len(checks) == 3 and all(blessing["blessed"] for blessing in checks)
    # Each new model was checked against a champion: its change bound compared, not skipped.
    first_version = first_run[1]["champion"]["train_version"]
    for blessing in (blessing for blessing in checks if blessing["train_version"] != first_version):
        change = blessing["checks"][1]
        assert blessing["baseline"] is not None and change["result"] == "pass"
        assert change["change"] == pytest.approx(change["value"] - blessing["baseline"]["accuracy"])

    pointer = site.pointer()
    best = min(checks, key=lambda blessing: merit({"accuracy": blessing["checks"][0]["value"],
                                                   "loss": blessing["checks"][2]["value"]}))
    assert pointer["champion"]["train_version"] == best["train_version"], pointer
    # No update lost: every crowning is in the history, each replacing the champion before it.
    crowned = [event for event in pointer["history"] if event["action"] == "bless"]
    assert [event["replaced"] for event in crowned] == [None, *(event["train_version"] for event in crowned[:-1])]

    # The sweep's summary, once both are done, shows each run's verdict and which is champion.
    again = site.luigi("Sweep", "--grid", '{"dense_units": [16, 32]}', "--Bless-thresholds", PASSING)
    summary = again.output[again.output.index("SWEEP 2 runs"):]
    assert summary.count("         BLESSED: passed: ") == 2, summary
    single_version = json.loads(verdict_path(single.output).read_text())["train_version"]
    assert summary.count("(CHAMPION)") == (best["train_version"] != single_version), summary


@pytest.mark.slow
def test_the_docs_blessing_commands_work_as_written(site, first_run):
    section = (REPO / "docs" / "using.md").read_text().split("## Blessing and the champion")[1].split("\n## ")[0]
    commands = re.findall(r"```sh\n(.*?)\n```", section, re.DOTALL)
    assert len(commands) == 2 and all(command.startswith("luigi --module tasks RunAll") for command in commands)
    env = luigi_env(site.config, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    for command in commands:
        result = subprocess.run(["bash", "-c", command], cwd=site.folder, env=env, capture_output=True, text=True,
                                timeout=300)
        output = result.stdout + result.stderr
        blessed = json.loads(verdict_path(output).read_text())["blessed"]
        assert re.search(r"^    (BLESSED|NOT BLESSED): ", output, re.MULTILINE), output[-3000:]
        if "--RunAll-require-blessed" in command:
            # Blessed, it exits 0 and says so; not blessed, it fails naming RunAll.
            assert (result.returncode, result.stdout.endswith("blessed\n")) == ((0, True) if blessed else (30, False))
            assert blessed or "FAILED RunAll(" in output, output[-3000:]
        else:
            assert result.returncode == 0, output[-3000:]


@pytest.mark.slow
def test_a_check_made_again_leaves_nothing_showing_the_old_verdict(site, first_run):
    """--Bless-rerun checks against the champion of that moment: the run's record, its report, its
    RESULT and --RunAll-require-blessed all follow the new verdict."""
    # Last in this file: it crowns a model that is no run, then revokes it.
    strict = '{"accuracy": {"min_change": 0}}'
    assert site.luigi("RunAll", "--Bless-thresholds", strict).returncode == 0
    [pointer_path] = (site.folder / "results" / champion.CHAMPION_FOLDER).glob("tiny/*/test.json")
    lock = str(site.folder / "results" / INDEX_FOLDER)
    better = champion.candidate(train_version="t9", train_path=str(site.folder / "results" / "tiny" / "cnn-t9"),
                                export="export/1", model="cnn", evaluation="Evaluate/e9",
                                metrics={"accuracy": 1.0, "loss": 0.0})
    champion.force(str(pointer_path), lock, better, "a better model, for the test")

    again = site.luigi("RunAll", "--Bless-thresholds", strict, "--Bless-rerun", "--RunAll-require-blessed")

    assert again.returncode == 30 and "FAILED RunAll(" in again.output, again.output[-3000:]
    assert {"Bless", "Report", "RunRecord"} <= set(started(again.output)), again.output[-3000:]
    blessing_path = verdict_path(again.output)
    record = record_of(blessing_path)
    assert record["blessing"]["blessed"] is False
    assert "<h2>Verdict: NOT BLESSED</h2>" in Path(record["report"]).read_text()
    champion.revoke(str(pointer_path), lock, "the test is done")
