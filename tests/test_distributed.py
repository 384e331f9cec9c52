"""Train as a TensorFlow cluster on this host (`--Train-distribute local`), through the real `luigi`
command: a chief, two workers, a parameter server and an evaluator, locally and with model_dir on
S3; every trainer runs steps of the shared global_step, and no role process outlives the task.
The roles' servers listen in a network namespace of their own, or, as the user opted in, on
every interface; a private cluster that cannot be is refused before anything runs."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest

from pipeline import netns, storage
from tests.conftest import (REPO, cli_sections, free_port, luigi_argv, luigi_env, run_watched, start_watched,
                            write_config)

pytestmark = pytest.mark.slow

MAX_STEPS = 300


def cluster_config(folder: Path, source_url: str, root: str) -> Path:
    sections = cli_sections(folder, source_url)
    sections["layout"] = {"data_root": storage.join(root, "data"), "results_root": storage.join(root, "results")}
    sections["Train"].update(max_steps=str(MAX_STEPS), save_checkpoints_steps="100")
    return write_config(folder / "luigi.cfg", sections)


def role_processes(marker: str = "") -> dict[int, str]:
    """Command lines, by pid, of the cluster roles (and of the holder of their network namespace)
    running now anywhere on this machine; with `marker`, of those whose command line holds it."""
    found = {}
    for process in Path("/proc").glob("[0-9]*"):
        try:
            found[int(process.name)] = (process / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            pass  # ended meanwhile
    return {pid: args for pid, args in found.items()
            if re.search(r"-m (pipeline\.cluster|tasks\.cluster_role|pipeline\.netns)\b", args) and marker in args}


def listening_ports(net: Path) -> set[int]:
    """The TCP ports listened on in the network namespace that `net` (a /proc/<pid>/net) shows."""
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in (net / table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A":  # TCP_LISTEN
                ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


class ListenWatch(threading.Thread):
    """While a local cluster whose role command lines hold `marker` runs: its chief's port, whether
    it was seen listening from inside the roles' network namespace, and the cluster's ports seen
    listening in this process's (the host's) namespace."""

    def __init__(self, marker: str):
        super().__init__(daemon=True)
        self.marker, self.done = marker, threading.Event()
        self.chief_port: int | None = None
        self.chief_listened = False
        self.on_host: set[int] = set()

    def run(self):
        while not self.done.wait(0.2):
            for pid, args in role_processes(self.marker).items():
                try:
                    self.look(pid)
                except (OSError, StopIteration):
                    pass  # not a role yet, or gone already

    def look(self, pid: int) -> None:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        spec = json.loads(next(entry for entry in environ if entry.startswith(b"TF_CONFIG="))[10:])["cluster"]
        ports = {int(address.rsplit(":", 1)[1]) for addresses in spec.values() for address in addresses}
        self.chief_port = int(spec["chief"][0].rsplit(":", 1)[1])
        self.chief_listened |= self.chief_port in listening_ports(Path(f"/proc/{pid}/net"))
        self.on_host |= ports & listening_ports(Path("/proc/self/net"))


def most_steps_past_max(trainers: int) -> int:
    """How far asynchronous trainers can take global_step past max_steps, however they are timed.
    A trainer reads global_step as each of its steps begins, before its own update, and stops after
    a step whose read, or a fresh read once that one is near, has reached max_steps
    (StopAtStepHook). When an update takes global_step to max_steps, every other trainer can have
    one step under way that read less, after which it begins one more; the trainer that made that
    update can also begin one more. Each step it begins later reads max_steps or more, its last."""
    return 2 * (trainers - 1) + 1


def trained_steps(log_text: str, role: str) -> int:
    found = re.search(rf"{role} ran (\d+) training steps", log_text)
    assert found, f"{role} logged no steps"
    return int(found.group(1))


# S3 is not reachable from a private network namespace: S3 roots need the opt-in.
@pytest.mark.parametrize("where, strategy, network", [("local", "parameter_server", "private"),
                                                      ("s3", "parameter_server", "host"),
                                                      ("local", "mirrored", "private")])
def test_two_workers_and_the_chief_all_train_the_shared_steps(where, strategy, network, mnist_subset, tmp_path,
                                                              request):
    if network == "private" and netns.unavailable_because():
        # CI's machines allow user namespaces: there a refusal is a failure, not a reason to skip.
        (pytest.fail if os.environ.get("CI") else pytest.skip)(netns.unavailable_because())
    root = str(tmp_path) if where == "local" else \
        request.getfixturevalue("s3_server").uri(f"cluster-{uuid.uuid4().hex[:8]}")
    config = cluster_config(tmp_path, mnist_subset.as_uri(), root)
    watch = ListenWatch(root)
    watch.start()

    try:
        run = start_watched(tmp_path, config, "RunAll", "--local-scheduler", "--Train-distribute", "local",
                            "--Train-cluster-workers", "2", "--Train-strategy", strategy,
                            "--Train-cluster-network", network, limit_s=300)()
    finally:
        watch.done.set()
        watch.join()

    assert run.returncode == 0, run.output[-4000:]
    assert watch.chief_port is not None, "no role of the cluster was seen running"
    assert watch.chief_listened, f"the chief's server on port {watch.chief_port} was never seen listening"
    if network == "private":
        assert watch.on_host == set(), "the cluster's servers listened in the host's network"
    else:
        assert watch.chief_port in watch.on_host
        assert re.search(rf"the cluster's TensorFlow servers listen on every interface, on ports [0-9, ]*\b"
                         rf"{watch.chief_port}\b", run.output)
    assert re.search(r"RESULT test accuracy [0-9.]+ on 18 images", run.output)
    [train_marker] = storage.glob(storage.join(root, "results", "tiny", "cnn-*", "train.json"))
    summary = storage.read_json(train_marker)
    overshoot = most_steps_past_max(trainers=3) if strategy == "parameter_server" else 0
    assert MAX_STEPS <= summary["global_step"] <= MAX_STEPS + overshoot
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
    assert role_processes() == {}


def test_a_private_cluster_with_s3_roots_is_refused_before_anything_runs(mnist_subset, tmp_path, s3_server):
    root = s3_server.uri(f"refused-{uuid.uuid4().hex[:8]}")
    config = cluster_config(tmp_path, mnist_subset.as_uri(), root)

    run = run_watched(tmp_path, config, "RunAll", "--local-scheduler", "--Train-distribute", "local", limit_s=120)

    assert run.returncode == 40, run.output[-3000:]
    assert re.search(rf"ERROR: Train: distribute=local with cluster_network=private and {re.escape(root)}/"
                     r"\S+: the roles of a private cluster cannot reach S3; set cluster_network=host "
                     r"\(--Train-cluster-network host\)", run.output), run.output[-3000:]
    assert storage.glob(storage.join(root, "*", "*")) == []


def test_without_user_namespaces_a_private_cluster_is_refused_before_anything_runs(mnist_subset, tmp_path):
    config = cluster_config(tmp_path, mnist_subset.as_uri(), str(tmp_path))
    command = luigi_argv("RunAll", "--local-scheduler", "--Train-distribute", "local")
    if netns.unavailable_because() is None:
        if shutil.which("unshare") is None:
            pytest.skip("user namespaces are allowed here, and there is no `unshare` to disallow them")
        # Inside a user namespace of its own whose limit of nested ones is 0, as a system that
        # allows none: unshare fails with ENOSPC there.
        command = ["unshare", "--map-root-user", "sh", "-c",
                   'echo 0 > /proc/sys/user/max_user_namespaces && exec "$@"', "sh", *command]

    run = subprocess.run(command, cwd=tmp_path, env=luigi_env(config), capture_output=True, text=True, timeout=120)

    output = run.stdout + run.stderr
    assert run.returncode == 40, output[-3000:]
    assert re.search(r"ERROR: Train: distribute=local with cluster_network=private: no private network "
                     r"namespace: .*unshare.* \(user namespaces are not allowed here\); set cluster_network=host "
                     r"\(--Train-cluster-network host\)", output), output[-3000:]
    assert not (tmp_path / "data").exists()


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
    assert role_processes() == {}


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
    assert MAX_STEPS <= storage.read_json(train_marker)["global_step"] <= MAX_STEPS + most_steps_past_max(trainers=2)
    assert re.search(r"RESULT test accuracy [0-9.]+ on 18 images", run.output)
