"""Train as a TensorFlow cluster on this host (`--Train-distribute local`), through the real `luigi`
command: a chief, two workers, a parameter server and an evaluator, locally and with model_dir on
S3; every trainer runs steps of the shared global_step, and no role process outlives the task."""
from __future__ import annotations

import re
import subprocess
import uuid
from pathlib import Path

import pytest

from pipeline import storage
from tests.conftest import REPO, cli_sections, run_watched, write_config

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
    return [line for line in listing.splitlines() if "-m pipeline.training" in line]


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path)
    return request.getfixturevalue("s3_server").uri(f"cluster-{uuid.uuid4().hex[:8]}")


def test_two_workers_and_the_chief_all_train_the_shared_steps(root, mnist_subset, tmp_path):
    config = cluster_config(tmp_path, mnist_subset.as_uri(), root)

    run = run_watched(tmp_path, config, "RunAll", "--local-scheduler", "--Train-distribute", "local",
                      "--Train-cluster-workers", "2", limit_s=600)

    assert run.returncode == 0, run.output[-4000:]
    assert re.search(r"RESULT test accuracy [0-9.]+ on 18 images", run.output)
    [train_marker] = storage.glob(storage.join(root, "results", "tiny", "cnn-*", "train.json"))
    summary = storage.read_json(train_marker)
    # Asynchronous: a trainer may take one step past max_steps before it sees the others' steps.
    assert MAX_STEPS <= summary["global_step"] <= MAX_STEPS + 3
    assert (summary["distribute"], summary["cluster_workers"], summary["strategy"]) == ("local", 2, "parameter_server")
    logs = storage.join(storage.parent(train_marker), "model_dir", "cluster")
    steps = {}
    for role in ("chief-0", "worker-0", "worker-1"):
        found = re.search(r"ran (\d+) training steps", storage.read_text(storage.join(logs, f"{role}.log")))
        assert found, f"{role} logged no steps"
        steps[role] = int(found.group(1))
    assert all(count > 0 for count in steps.values()), steps
    assert sum(steps.values()) >= MAX_STEPS - 1, steps
    assert storage.exists(storage.join(logs, "evaluator-0.log")) and storage.exists(storage.join(logs, "ps-0.log"))
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
