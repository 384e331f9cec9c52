"""Train as a TensorFlow cluster on this host (`--Train-distribute local`), through the real `luigi`
command: a chief, two workers, a parameter server and an evaluator, locally and with model_dir on
S3; every trainer runs steps of the shared global_step, and no role process outlives the task."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from pipeline import storage
from tests.conftest import REPO, cli_sections, free_port, luigi_env, run_watched, write_config

pytestmark = pytest.mark.slow

MAX_STEPS = 300


def cluster_config(folder: Path, source_url: str, root: str) -> Path:
    sections = cli_sections(folder, source_url)
    sections["layout"] = {"data_root": storage.join(root, "data"), "results_root": storage.join(root, "results")}
    sections["Train"].update(max_steps=str(MAX_STEPS), save_checkpoints_steps="100")
    return write_config(folder / "luigi.cfg", sections)


def role_processes() -> list[str]:
    """Command lines of the cluster roles running now (anywhere on this machine)."""
    listing = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    return [line for line in listing.splitlines() if "-m pipeline.training" in line or "-m tasks.cluster_role" in line]


def trained_steps(log_text: str, role: str) -> int:
    found = re.search(rf"{role} ran (\d+) training steps", log_text)
    assert found, f"{role} logged no steps"
    return int(found.group(1))


@pytest.mark.parametrize("where, strategy", [("local", "parameter_server"), ("s3", "parameter_server"),
                                             ("local", "mirrored")])
def test_two_workers_and_the_chief_all_train_the_shared_steps(where, strategy, mnist_subset, tmp_path, request):
    root = str(tmp_path) if where == "local" else \
        request.getfixturevalue("s3_server").uri(f"cluster-{uuid.uuid4().hex[:8]}")
    config = cluster_config(tmp_path, mnist_subset.as_uri(), root)

    run = run_watched(tmp_path, config, "RunAll", "--local-scheduler", "--Train-distribute", "local",
                      "--Train-cluster-workers", "2", "--Train-strategy", strategy, limit_s=300)

    assert run.returncode == 0, run.output[-4000:]
    assert re.search(r"RESULT test accuracy [0-9.]+ on 18 images", run.output)
    [train_marker] = storage.glob(storage.join(root, "results", "tiny", "cnn-*", "train.json"))
    summary = storage.read_json(train_marker)
    # Asynchronous: a trainer may take one step past max_steps before it sees the others' steps.
    assert MAX_STEPS <= summary["global_step"] <= MAX_STEPS + (3 if strategy == "parameter_server" else 0)
    assert (summary["distribute"], summary["cluster_workers"], summary["strategy"]) == ("local", 2, strategy)
    logs = storage.join(storage.parent(train_marker), "model_dir", "cluster")
    steps = {role: trained_steps(storage.read_text(storage.join(logs, f"{role}.log")), role.replace("-", " "))
             for role in ("chief-0", "worker-0", "worker-1")}
    assert all(count > 0 for count in steps.values()), steps
    if strategy == "parameter_server":
        # Each step is one trainer's; the parameter server held the variables.
        assert sum(steps.values()) >= MAX_STEPS - 1, steps
        assert storage.exists(storage.join(logs, "ps-0.log"))
    else:
        # In lockstep: every trainer computes a share of every step.
        assert set(steps.values()) == {MAX_STEPS}, steps
    assert storage.exists(storage.join(logs, "evaluator-0.log"))
    assert role_processes() == []


def test_a_role_that_fails_ends_the_run_and_every_role(mnist_subset, tmp_path):
    broken = tmp_path / "breaks_in_a_cluster.py"
    # Trains in one process; raises as soon as it is built in a cluster role (TF_CONFIG set).
    broken.write_text((REPO / "model_defs" / "cnn.py").read_text() + (
        "\n\nimport os as _os\n_model_fn = model_fn\n\n\n"
        "def model_fn(features, labels, mode, params):\n"
        "    if _os.environ.get('TF_CONFIG'):\n"
        "        raise RuntimeError('this model file refuses to train in a cluster')\n"
        "    return _model_fn(features, labels, mode, params)\n"))
    config = cluster_config(tmp_path, mnist_subset.as_uri(), str(tmp_path))

    run = run_watched(tmp_path, config, "RunAll", "--local-scheduler", "--Train-distribute", "local",
                      "--Train-model-def", str(broken), limit_s=300)

    assert run.returncode == 30, run.output[-3000:]
    assert re.search(r"failed\s+Train\(", run.output)
    assert "this model file refuses to train in a cluster" in run.output
    assert run.after_failure is not None and run.after_failure < 30
    assert role_processes() == []


def test_a_cluster_from_tf_config_trains_with_the_luigi_command_as_chief(mnist_subset, tmp_path):
    """As a cluster manager would start it: every process has the cluster in TF_CONFIG and its own
    role; the chief is the `luigi` command, the others `python -m tasks.cluster_role`."""
    config = cluster_config(tmp_path, mnist_subset.as_uri(), str(tmp_path))
    spec = {kind: [f"127.0.0.1:{free_port()}"] for kind in ("chief", "worker", "ps")}

    def tf_config(kind: str) -> str:
        return json.dumps({"cluster": spec, "task": {"type": kind, "index": 0}})

    roles = {}
    for kind in ("ps", "worker", "evaluator"):
        with open(tmp_path / f"{kind}.log", "w") as log:
            roles[kind] = subprocess.Popen(
                [sys.executable, "-m", "tasks.cluster_role", "Train", "--distribute", "tf_config"], cwd=tmp_path,
                env=luigi_env(config, TF_CONFIG=tf_config(kind)), stdout=log, stderr=subprocess.STDOUT)
    try:
        run = run_watched(tmp_path, config, "RunAll", "--local-scheduler", "--Train-distribute", "tf_config",
                          env={"TF_CONFIG": tf_config("chief")}, limit_s=300)
        assert run.returncode == 0, run.output[-4000:]
        assert roles["worker"].wait(timeout=120) == 0 and roles["evaluator"].wait(timeout=120) == 0
        assert roles["ps"].poll() is None, "a parameter server runs until it is stopped"
    finally:
        for process in roles.values():
            process.kill()
            process.wait()
    assert trained_steps((tmp_path / "worker.log").read_text(), "worker 0") > 0
    [train_marker] = (tmp_path / "results" / "tiny").glob("cnn-*/train.json")
    assert MAX_STEPS <= storage.read_json(train_marker)["global_step"] <= MAX_STEPS + 2
    assert re.search(r"RESULT test accuracy [0-9.]+ on 18 images", run.output)
