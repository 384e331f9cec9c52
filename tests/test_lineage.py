"""Where an output came from (`python -m tasks.lineage`), on real completed runs (two trainings on
one conversion, locally, and one run on S3), and on an index made here for what runs do not make
yet (a verdict, a lost marker)."""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from pipeline.errors import LineageError
from pipeline.lineage import describe, downstream, find, lineage, render_lineage
from tests.conftest import (REPO, FileServer, cli_sections, luigi_env, make_mnist_subset, run_watched,
                            run_without_tensorflow, write_config)

SECRET = "lineage-pw-9Zq"
# A model file is copied byte for byte into its run's model_dir: its sha256 is the source's.
MODEL_SHA256 = hashlib.sha256((REPO / "model_defs" / "cnn.py").read_bytes()).hexdigest()
OTHER_PARAMS = '{"conv_filters": [8], "dense_units": 8}'
# Named as luigi.cfg names the embedded sample's, so that docs/using.md's commands run here as written.
DATASET = "mnist_5k"


def lineage_cli(folder: Path, config: Path, *args: str, code: int = 0,
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m tasks.lineage *args` from `folder`; it must not import TensorFlow on the way."""
    result = run_without_tensorflow("tasks.lineage", *args, cwd=folder,
                                    env={**luigi_env(config), "PYTHONPATH": str(REPO), **(env or {})})
    assert result.returncode == code, result.stdout[-2000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two trainings (two RunAll) on one download and conversion, from an archive served over HTTP
    with a user and password in its URL; (folder, config, the archive's sha256)."""
    folder = tmp_path_factory.mktemp("lineage")
    archive = make_mnist_subset(folder / "digits.tar.gz").read_bytes()
    with FileServer() as server:
        server.files["/digits.tar.gz"] = archive
        url = server.url("/digits.tar.gz").replace("http://", f"http://reader:{SECRET}@")
        sections = cli_sections(folder, url)
        sections["Download"]["dataset"] = DATASET
        config = write_config(folder / "luigi.cfg", sections)
        for extra in ((), ("--Train-params", OTHER_PARAMS)):
            result = run_watched(folder, config, "RunAll", "--local-scheduler", *extra)
            assert result.returncode == 0, result.output[-3000:]
    return folder, config, hashlib.sha256(archive).hexdigest()


def first_run(folder: Path) -> Path:
    """The folder of the first run: its params are luigi.cfg's."""
    [train] = [entry for entry in json_files(folder / "results" / ".index" / "Train")
               if entry["identity"]["params"]["params"]["dense_units"] == 16]
    return Path(train["path"])


def output_of(folder: Path, pattern: str) -> Path:
    """The one output of the first run matching `pattern` below its folder."""
    [found] = first_run(folder).glob(pattern)
    return found


def json_files(folder: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))]


def stages_of(chain: list[dict]) -> dict[str, dict]:
    return {node["stage"]: node for node in chain}


@pytest.mark.slow
def test_lineage_from_every_kind_of_output_names_the_archive_and_the_model_file(two_runs):
    folder, config, archive_sha256 = two_runs
    train = first_run(folder)
    [shard] = (folder / "data" / "tfrecords" / DATASET).glob("*/train-00000-of-00002.tfrecord")
    outputs = {"predictions.csv": output_of(folder, "predict-*/predictions.csv"),
               "export folder": output_of(folder, "export/[0-9]*"),
               "report.html": output_of(folder, "evaluate-*/report-*/report.html"),
               "metrics.json": output_of(folder, "evaluate-*/metrics.json"),
               "run folder": train, "run record": output_of(folder, "run-*/run.json"),
               "version id": train.name.split("-")[1][:8]}

    found = json.loads(lineage_cli(folder, config, "--json", *map(str, outputs.values())).stdout)

    assert found["downstream"] is None
    for (kind, output), result in zip(outputs.items(), found["lineage"], strict=True):
        chain = stages_of(result["chain"])
        assert result["query"] == str(output)
        assert chain["Download"]["details"]["sha256"] == archive_sha256, kind
        assert chain["Train"]["details"]["model_sha256"] == MODEL_SHA256, kind
        assert chain["Train"]["path"] == str(train), kind
        assert result["chain"][-1]["stage"] == "Download", kind
    expected = {"predictions.csv": "Predict", "export folder": "Train", "report.html": "Report",
                "metrics.json": "Evaluate", "run folder": "Train", "run record": "RunRecord", "version id": "Train"}
    assert [result["chain"][0]["stage"] for result in found["lineage"]] == list(expected.values())
    report = stages_of(found["lineage"][2]["chain"])
    assert report["Evaluate"]["details"]["examples"] == 18 and report["Evaluate"]["details"]["split"] == "test"
    assert report["Train"]["details"]["global_step"] == 12
    assert re.fullmatch(r"[0-9a-f]{12}", report["Train"]["details"]["code_fingerprint"])
    # A shard belongs to the conversion: its chain is the conversion's, with every shard's checksum.
    [from_shard] = json.loads(lineage_cli(folder, config, "--json", str(shard)).stdout)["lineage"]
    convert = from_shard["chain"][0]
    assert convert["stage"] == "Convert" and len(convert["details"]["shards"]) == 6
    assert hashlib.sha256(shard.read_bytes()).hexdigest() in [each["sha256"] for each in convert["details"]["shards"]]
    assert SECRET not in json.dumps(found) + json.dumps(from_shard)


@pytest.mark.slow
def test_lineage_prints_the_source_redacted_the_checksums_and_the_model(two_runs):
    folder, config, archive_sha256 = two_runs
    predictions = output_of(folder, "predict-*/predictions.csv")

    result = lineage_cli(folder, config, str(predictions))

    text = result.stdout
    assert text.startswith(f"{predictions} is Predict/")
    assert f"sha256: {archive_sha256}" in text and f"model file: cnn.py  sha256 {MODEL_SHA256}" in text
    assert "final step: 12" in text and "code fingerprint: " in text
    assert re.search(r"source: http://\*\*\*@127\.0\.0\.1:\d+/digits\.tar\.gz \(archive\)", text), text
    assert SECRET not in text + result.stderr and "reader" not in text
    # How the model was judged, though its evaluation and verdict are not upstream of its predictions.
    metrics = json.loads(next(predictions.parent.parent.glob("evaluate-test-*/metrics.json")).read_text())
    assert re.search(rf"\n    evaluated: Evaluate/\w+  \S+\n        test: accuracy {metrics['accuracy']:.4f}, loss "
                     rf"{metrics['loss']:.4f} on 18 images at step 12\n        Bless/\w+: NOT BLESSED: no thresholds set", text), text


@pytest.mark.slow
def test_downstream_lists_every_version_made_from_one_and_no_other(two_runs):
    folder, config, _ = two_runs
    index = folder / "results" / ".index"
    [convert] = json_files(index / "Convert")
    trains = json_files(index / "Train")
    assert len(trains) == 2

    made = json.loads(lineage_cli(folder, config, "--json", "--downstream", convert["version"]).stdout)

    listed = [node["key"] for node in made["downstream"]["downstream"]]
    assert made["lineage"] == [] and made["downstream"]["key"] == f"Convert/{convert['version']}"
    for stage in ("Train", "Evaluate", "Bless", "Predict", "Report", "RunRecord"):
        assert sorted(key for key in listed if key.startswith(f"{stage}/")) == \
            sorted(f"{stage}/{entry['version']}" for entry in json_files(index / stage)), stage
    assert len(listed) == len(set(listed)) == 12
    # Made from one training: its own evaluation, verdict, predictions, report and record, none of the other's.
    mine, other = trains
    from_mine = lineage_cli(folder, config, "--downstream", mine["path"]).stdout
    assert from_mine.startswith(f"{mine['path']} is Train/{mine['version']}; 5 version(s) made from it:")
    assert other["path"] not in from_mine and mine["path"] in from_mine.splitlines()[1]


@pytest.mark.slow
def test_what_no_output_holds_fails_in_one_line_naming_it(two_runs, tmp_path):
    folder, config, _ = two_runs
    outside = tmp_path / "elsewhere.csv"
    outside.write_text("x\n")

    for argument in (str(outside), "0123abcd0123", "results/leaderboard.csv"):
        result = lineage_cli(folder, config, argument, code=2)
        [line] = result.stderr.splitlines()
        assert line.startswith(f"error: {argument}: ") and "expected" in line, line
        assert result.stdout == ""


@pytest.mark.slow
def test_the_commands_in_the_docs_run_as_written(two_runs):
    folder, config, archive_sha256 = two_runs
    section = (REPO / "docs" / "using.md").read_text().split("### Where an output came from", 1)[1]
    commands = re.findall(r"```sh\n(.*?)```", section.split("\n### ", 1)[0], re.DOTALL)[0].strip().splitlines()
    assert len(commands) == 4 and all(command.startswith("python -m tasks.lineage ") for command in commands)

    outputs = []
    for command in commands:
        result = subprocess.run(["bash", "-c", command], cwd=folder, capture_output=True, text=True, timeout=120,
                                env={**luigi_env(config), "PYTHONPATH": str(REPO),
                                     "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"})
        assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"
        outputs.append(result.stdout)
    assert archive_sha256 in outputs[0] and MODEL_SHA256 in outputs[0]
    assert json.loads(outputs[1])["lineage"][0]["chain"][0]["stage"] == "Evaluate"
    assert "12 version(s) made from it" in outputs[3]


@pytest.mark.slow
def test_lineage_on_s3_roots(s3_server, mnist_subset, tmp_path):
    from tests.test_s3 import s3_config

    prefix = f"lineage-{uuid.uuid4().hex[:8]}"
    config = s3_config(tmp_path, s3_server, prefix, mnist_subset.as_uri())
    run = run_watched(tmp_path, config, "RunAll", "--local-scheduler", env=s3_server.env(), limit_s=600)
    assert run.returncode == 0, run.output[-3000:]
    [predictions] = [key for key in s3_server.keys(prefix) if key.endswith("/predictions.csv")]

    found = json.loads(lineage_cli(tmp_path, config, "--json", s3_server.uri(predictions),
                                   env=s3_server.env()).stdout)

    chain = stages_of(found["lineage"][0]["chain"])
    assert chain["Download"]["details"]["sha256"] == hashlib.sha256(mnist_subset.read_bytes()).hexdigest()
    assert chain["Train"]["details"]["model_sha256"] == MODEL_SHA256
    made = lineage_cli(tmp_path, config, "--downstream", chain["Convert"]["version"], env=s3_server.env()).stdout
    assert "6 version(s) made from it" in made and s3_server.uri(predictions).rsplit("/", 1)[0] in made


def entry(stage: str, version: str, path: Path, marker: str, upstream: list[str] = ()) -> dict:
    return {"stage": stage, "version": version, "path": str(path), "marker": str(path / marker),
            "identity": {"stage": stage, "params": {"source_url": f"https://user:{SECRET}@example.com/a.tgz"},
                         "upstream": {}, "code": {}, "content": None},
            "upstream": list(upstream), "completed_at": "2026-01-01T00:00:00+00:00", "dataset": "d"}


def test_a_verdict_a_lost_marker_an_unknown_stage_and_an_ambiguous_prefix(tmp_path):
    evaluation = tmp_path / "run" / "evaluate-test-aaaaaaaa0001"
    bless = evaluation / "bless-bbbbbbbb0001"
    bless.mkdir(parents=True)
    (bless / "blessing.json").write_text(json.dumps({
        "blessed": False, "reason": "failed: accuracy 0.9000 < min 0.97; skipped: accuracy min_change -0.01 (none)",
        "champion": False,
        "checks": [{"metric": "accuracy", "bound": "min", "limit": 0.97, "value": 0.9, "baseline": None,
                    "result": "fail"},
                   {"metric": "accuracy", "bound": "min_change", "limit": -0.01, "value": None, "baseline": None,
                    "result": "skipped"}]}))
    index = {"Evaluate/aaaaaaaa0001": entry("Evaluate", "aaaaaaaa0001", evaluation, "metrics.json"),
             "Bless/bbbbbbbb0001": entry("Bless", "bbbbbbbb0001", bless, "blessing.json", ["Evaluate/aaaaaaaa0001"]),
             "Shipped/aaaaaaaa0002": entry("Shipped", "aaaaaaaa0002", tmp_path / "shipped", "shipped.txt",
                                           ["Bless/bbbbbbbb0001"])}

    assert find(index, str(bless / "blessing.json")) == "Bless/bbbbbbbb0001"
    assert find(index, "Shipped/aaaaaaaa") == "Shipped/aaaaaaaa0002"
    with pytest.raises(LineageError, match=r"aaaaaaaa: several versions start with it \(Evaluate/aaaaaaaa0001, "
                                           r"Shipped/aaaaaaaa0002\)"):
        find(index, "aaaaaaaa")
    verdict = describe(index, "Bless/bbbbbbbb0001")
    assert verdict["details"]["blessed"] is False and [check["bound"] for check in verdict["details"]["failing"]] == ["min"]
    found = lineage(index, "aaaaaaaa0002")
    assert [node["key"] for node in found["chain"]] == list(reversed(index))
    evaluate, unknown = found["chain"][2], found["chain"][0]
    assert evaluate["problem"] == f"its marker {evaluation / 'metrics.json'} is missing"
    assert unknown["problem"] == f"its marker {tmp_path / 'shipped' / 'shipped.txt'} is missing"
    text = render_lineage(found)
    assert "NOT BLESSED: failed: accuracy 0.9000 < min 0.97; skipped: accuracy min_change -0.01 (none)" in text
    assert SECRET not in text + json.dumps(found)
    assert downstream(index, "Evaluate/aaaaaaaa0001") == [(1, "Bless/bbbbbbbb0001"), (2, "Shipped/aaaaaaaa0002")]
