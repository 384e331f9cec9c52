"""A TensorFlow training cluster: its roles, the TF_CONFIG that names them, and each role's entry
point (`run_role`, or `python -m pipeline.cluster '<run_role's arguments as JSON>'`).

On this host (`run_local_cluster`): a chief, workers, a parameter server and an evaluator, each a
process of its own with the TF_CONFIG that `tf.estimator.train_and_evaluate` reads, on 127.0.0.1
ports. TensorFlow's own runtime does the rest: the parameter server holds the variables, every
trainer advances the shared global_step, the evaluator follows the chief's checkpoints. Elsewhere
a cluster manager sets TF_CONFIG and starts the roles (see tasks.cluster_role).

The spec's 127.0.0.1 is only the address the roles dial: TensorFlow 2.15's gRPC server binds
0.0.0.0/:: and has no setting for its listen address, and an unauthenticated TensorFlow server runs
any graph it is sent, file reads and writes included. So the roles run in a network namespace of
their own (`network="private"`, see pipeline.netns), where no other process or host reaches them;
`network="host"` is the explicit choice of ports open on every interface, for where that cannot be
(S3 is not reachable from inside; some systems allow no user namespaces).

The processes are this module's to start and to end: a parameter server never exits by itself,
and a role left running after a failure would hold its port and a core. They die with the process
that started them (PR_SET_PDEATHSIG), so even a SIGKILLed Train task leaves none behind.

TensorFlow is imported only by a role as it runs, so that launching and checking need none.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from pipeline import locks, netns, storage
from pipeline.errors import ConfigError, PipelineError
from pipeline.runfiles import VERSIONS_FILE

log = logging.getLogger(__name__)

PARAMETER_SERVER = "parameter_server"
MIRRORED = "mirrored"
STRATEGIES = (PARAMETER_SERVER, MIRRORED)
PRIVATE = "private"
HOST = "host"
NETWORKS = (PRIVATE, HOST)
# The chief's line once its session exists and the variables are set (its first checkpoint): a
# worker started before that sleeps 30 s before it looks again (the session manager's default).
CHIEF_READY = "Saving checkpoints for"
# The file whose existence lets workers and the evaluator go on from there: they start with the chief
# and import TensorFlow and build their graph meanwhile, then wait for it (see `wait_for_start`).
START_SIGNAL = "PIPELINE_CLUSTER_START"


class ClusterError(PipelineError):
    """A role of the training cluster failed or did not start."""


@dataclass(frozen=True)
class Role:
    type: str
    index: int

    @property
    def name(self) -> str:
        return f"{self.type}-{self.index}"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def local_cluster(workers: int, strategy: str) -> dict[str, list[str]]:
    """The cluster spec: a chief and `workers` workers, plus a parameter server unless synchronous
    (MultiWorkerMirroredStrategy keeps a copy of the variables on every trainer)."""
    spec = {"chief": [f"127.0.0.1:{_free_port()}"], "worker": [f"127.0.0.1:{_free_port()}" for _ in range(workers)]}
    if strategy == PARAMETER_SERVER:
        spec["ps"] = [f"127.0.0.1:{_free_port()}"]
    return spec


def tf_config(cluster: dict[str, list[str]], role: Role) -> str:
    # The evaluator is named in `task` only: it is no member of the training cluster.
    return json.dumps({"cluster": cluster, "task": {"type": role.type, "index": role.index}})


def check_network(network: str, locations: Sequence[str]) -> None:
    """ConfigError, saying why and what to do, unless a local cluster can run with `network` here
    and its roles can reach `locations` (the run's folders, or the roots that hold them)."""
    if network not in NETWORKS:
        raise ConfigError(f"cluster_network={network!r}; expected one of {', '.join(NETWORKS)}")
    if network == HOST:
        return
    opt_in = ("set cluster_network=host (--Train-cluster-network host) to run the roles in this host's network "
              "instead, with each role's TensorFlow server listening on every interface, open to whoever "
              "reaches this machine")
    remote = [location for location in locations if storage.is_remote(location)]
    if remote:
        raise ConfigError(f"distribute=local with cluster_network=private and {remote[0]}: the roles of a private "
                          f"cluster cannot reach S3; {opt_in}")
    reason = netns.unavailable_because()
    if reason:
        raise ConfigError(f"distribute=local with cluster_network=private: {reason} (user namespaces are not "
                          f"allowed here); {opt_in}")


def role_from_env() -> Role:
    """This process's role in the cluster, from the TF_CONFIG a cluster manager set."""
    try:
        task = json.loads(os.environ["TF_CONFIG"])["task"]
        return Role(task["type"], int(task.get("index", 0)))
    except (KeyError, ValueError, TypeError) as error:
        raise ClusterError(f"TF_CONFIG={os.environ.get('TF_CONFIG')!r}; expected JSON with a cluster and this "
                           "process's task, {\"type\": \"chief\", \"index\": 0} say") from error


def wait_for_chief(model_dir: str, strategy: str, role: str, timeout_s: float = 3600.0) -> None:
    """In a role a cluster manager started: wait for the chief's snapshot of the model in `model_dir`
    and, for a worker or the evaluator beside a parameter server, for the chief's first checkpoint
    (a worker that asks for a session before the chief has set the variables sleeps 30 s; the
    parameter server itself must be up before the chief can set them)."""
    waited_for = [storage.join(model_dir, VERSIONS_FILE)]
    if strategy == PARAMETER_SERVER and role != "ps":
        waited_for.append(storage.join(model_dir, "checkpoint"))
    deadline = time.monotonic() + timeout_s
    while not all(map(storage.exists, waited_for)):
        if time.monotonic() > deadline:
            raise ClusterError(f"the chief wrote no {', '.join(waited_for)} in {timeout_s:.0f} s")
        time.sleep(1.0)


def wait_for_start(timeout_s: float = 600.0) -> None:
    """In a role process: return once the launcher says the cluster may start (at once without one)."""
    signal_file = os.environ.get(START_SIGNAL)
    deadline = time.monotonic() + timeout_s
    while signal_file and not os.path.exists(signal_file):
        if time.monotonic() > deadline:
            raise ClusterError(f"no start signal ({signal_file}) in {timeout_s:.0f} s")
        time.sleep(0.1)


class _Running:
    def __init__(self, role: Role, command: Sequence[str], cluster: dict, log_dir: Path,
                 join_network: Callable[[], None] | None):
        self.role, self.log_path = role, log_dir / f"{role.name}.log"
        env = {**os.environ, "TF_CONFIG": tf_config(cluster, role)}
        if role.type in ("worker", "evaluator"):
            env[START_SIGNAL] = str(log_dir / "start")

        def prepare() -> None:
            if join_network:
                join_network()
            # After setns: a change of credentials may clear the setting.
            netns.die_with_parent()

        with open(self.log_path, "w") as handle:
            self.process = subprocess.Popen(list(command), stdout=handle, stderr=subprocess.STDOUT, env=env,
                                            preexec_fn=prepare)

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def failed(self) -> bool:
        return self.process.poll() not in (None, 0)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def run_local_cluster(command: Sequence[str], workers: int, strategy: str, *, network: str = PRIVATE,
                      ready_timeout_s: float = 300.0) -> dict[str, str]:
    """Run `command` once per role of a local cluster, each with its TF_CONFIG, until the chief,
    the workers and the evaluator have exited; the parameter server is then stopped. The roles
    share a private network namespace, or with `network="host"` this host's network (see the
    module's doc). Returns each role's log. Raises ClusterError, naming the role and the end of
    its log, as soon as a role fails; every role is stopped whatever happens."""
    if strategy not in STRATEGIES:
        raise ClusterError(f"strategy={strategy!r}; expected one of {', '.join(STRATEGIES)}")
    check_network(network, [])
    cluster = local_cluster(workers, strategy)
    if network == HOST:
        ports = sorted(address.rsplit(":", 1)[1] for addresses in cluster.values() for address in addresses)
        log.warning("cluster_network=host: the cluster's TensorFlow servers listen on every interface, on ports %s, "
                    "and run any graph that whoever reaches them sends", ", ".join(ports))
    with netns.private_network() if network == PRIVATE else contextlib.nullcontext() as join_network:
        return _run_roles(command, cluster, workers, strategy, join_network, ready_timeout_s)


def _run_roles(command: Sequence[str], cluster: dict, workers: int, strategy: str,
               join_network: Callable[[], None] | None, ready_timeout_s: float) -> dict[str, str]:
    running: list[_Running] = []
    with tempfile.TemporaryDirectory(prefix="cluster-") as folder:
        log_dir = Path(folder)
        start = lambda role: running.append(_Running(role, command, cluster, log_dir, join_network))  # noqa: E731
        try:
            for index in range(len(cluster.get("ps", []))):
                start(Role("ps", index))
            start(Role("chief", 0))
            chief = running[-1]
            for index in range(workers):
                start(Role("worker", index))
            start(Role("evaluator", 0))
            if strategy == PARAMETER_SERVER:
                # A worker whose session starts before the chief has set the variables sleeps 30 s.
                _wait_for(chief, running, ready_timeout_s)
            (log_dir / "start").touch()
            trainers = [role for role in running if role.role.type != "ps"]
            while any(role.process.poll() is None for role in trainers):
                _raise_if_failed(running)
                time.sleep(0.2)
            _raise_if_failed(running)
            return {role.role.name: role.log_path.read_text(errors="replace") for role in running}
        finally:
            for role in running:
                role.stop()


def _wait_for(chief: _Running, running: list[_Running], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while CHIEF_READY not in chief.log_path.read_text(errors="replace"):
        _raise_if_failed(running)
        if chief.process.poll() is not None:
            return  # finished already: nothing was left to train
        if time.monotonic() > deadline:
            raise ClusterError(f"the chief set up no session in {timeout_s:.0f} s; its log ends:\n{chief.tail()}")
        time.sleep(0.2)


def _raise_if_failed(running: list[_Running]) -> None:
    # The roles write checkpoints into model_dir under the Train task's lock: once its lease has
    # ended, they are stopped (LockLost), as a training in this process would be.
    locks.check_leases()
    for role in running:
        if role.failed():
            raise ClusterError(f"the {role.role.type} {role.role.index} of the training cluster exited with "
                               f"{role.process.returncode}; its log ends:\n{role.tail()}")


def run_role(model_dir: str, strategy: str, **training: Any) -> None:
    """Train as the role of a cluster that TF_CONFIG names, from the snapshot in `model_dir`;
    `training` as `pipeline.estimator.train_and_validate` takes it."""
    import tensorflow as tf

    from pipeline.estimator import StepCountHook, build_estimator, train_and_validate

    role = role_from_env()
    # Without this, worker N waits (N + 1) x 5 s before its first step.
    config: dict[str, Any] = {"experimental_max_worker_delay_secs": 0}
    if role.type == "chief":
        # The evaluator runs beside the chief and may lag behind it: a checkpoint it has yet to
        # evaluate (and export, when best) must not be deleted under it. 0 keeps them all.
        config["keep_checkpoint_max"] = 0
    if strategy == MIRRORED and role.type in ("chief", "worker"):
        # Synchronous: every trainer computes a share of each step. The evaluator is no trainer,
        # and building the strategy there fails (KeyError: 'evaluator').
        config["train_distribute"] = tf.distribute.experimental.MultiWorkerMirroredStrategy()
    estimator = build_estimator(model_dir, lambda loss: [StepCountHook(f"{role.type} {role.index}")],
                                in_cluster=True, **config)
    metadata = storage.read_json(training["metadata_path"])
    wait_for_start()
    train_and_validate(estimator, metadata, **training)


def _main(argv: Sequence[str]) -> int:
    """A role of a local cluster (see `run_local_cluster`), with run_role's arguments as JSON."""
    import tensorflow as tf

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    tf.get_logger().setLevel(logging.INFO)  # the chief's "Saving checkpoints" says it is ready
    try:
        run_role(**json.loads(argv[0]))
        return 0
    except BaseException:  # noqa: B036 - whatever ends the role, its traceback goes to its log
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    # Left through os._exit: a process that used tensorflow-io's S3 plugin aborts in a normal exit.
    code = _main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
