"""What a rerun repairs: a corrupt shard, rebuilt alone, and the temporary files a crash left."""
from pathlib import Path

import luigi
import pytest

from pipeline.convert import report_name, shard_name
from pipeline.storage import TEMP_INFIX, read_json
from tasks import Convert, Download, Evaluate, RunAll, Train
from tests.conftest import run_tasks, tiny_config

pytestmark = pytest.mark.slow


def test_a_corrupt_shard_is_detected_by_name_and_rebuilt_alone(luigi_config, mnist_subset, tmp_path):
    luigi_config(tiny_config(tmp_path, mnist_subset.as_uri()))
    run_tasks(RunAll())
    metrics = read_json(Evaluate().marker)
    convert_dir = Path(Convert().directory)
    shard = convert_dir / shard_name("test", 0, 2)
    intact = shard.read_bytes()
    flipped = bytearray(intact)
    flipped[len(flipped) // 3] ^= 0x01
    shard.write_bytes(bytes(flipped))

    failures = []

    def record(task, error):
        failures.append(str(error))

    Evaluate.event_handler(luigi.Event.FAILURE)(record)
    try:
        assert not luigi.build([Evaluate(rerun=True)], local_scheduler=True, log_level="CRITICAL")
    finally:
        Evaluate._event_callbacks[Evaluate][luigi.Event.FAILURE].discard(record)
    [message] = failures
    assert f"{shard}: its sha256 is" in message and "the next run rebuilds it" in message
    assert not (convert_dir / report_name("test", 0, 2)).exists()

    assert run_tasks(Evaluate(rerun=True)) == ["Convert", "ConvertShard", "Evaluate"]
    assert shard.read_bytes() == intact
    assert read_json(Evaluate().marker) == metrics


def test_temporaries_left_by_a_crash_are_removed_by_the_next_run(luigi_config, mnist_subset, tmp_path):
    luigi_config(tiny_config(tmp_path, mnist_subset.as_uri()))
    download = Path(Download().directory)
    convert = Path(Convert().directory)
    run = Path(Train().directory)
    left = [download.parent / f"{download.name}{TEMP_INFIX}dead0001" / "tree" / "0" / "a.png",
            convert / f"{shard_name('train', 1, 2)}{TEMP_INFIX}dead0002",
            convert / f"metadata.json{TEMP_INFIX}dead0003",
            run / "model_dir" / "model.ckpt-6_temp" / "part-00000-of-00001.data-00000-of-00001",
            run / "model_dir" / "export" / "best" / "temp-1700000000" / "saved_model.pb",
            run / f"train.json{TEMP_INFIX}dead0004"]
    for path in left:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"partial")

    run_tasks(RunAll())

    assert [path for path in left if path.exists()] == []
    assert not (download.parent / f"{download.name}{TEMP_INFIX}dead0001").exists()
    assert not (run / "model_dir" / "model.ckpt-6_temp").exists()
    assert not (run / "model_dir" / "export" / "best" / "temp-1700000000").exists()
    assert read_json(Train().marker)["global_step"] == 12
