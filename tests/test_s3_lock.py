"""The S3 lock as a lease on a real S3 server (moto's, on 127.0.0.1): of two takers of a stale lock
one wins; a holder that lost its lease writes nothing more and its task fails; no host's clock
decides a lease's age; and machines with local data roots of their own share the locks of S3
results.

moto checks a condition and then writes, with no lock between (AWS does both in one step), so a
race that passes here shows the logic, not atomicity: the forced interleavings show that part."""
from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from pipeline import locks, storage
from pipeline.errors import LockLost
from tests.conftest import REPO, cli_sections, free_port, start_watched, tar_bytes, write_config

TTL_VARIABLE = locks.LOCK_TTL_VARIABLE


def lock_uri(s3_server, name: str = "stage.lock") -> str:
    return s3_server.uri(f"locks-{uuid.uuid4().hex[:8]}", ".locks", name)


def left_by_a_dead_process(s3_server, lock: str, ttl_s: float) -> None:
    """A lock as a holder writes it, never renewed after."""
    bucket, key = storage.bucket_key(lock)
    s3_server.client().put_object(Bucket=bucket, Key=key, Body=json.dumps(
        {"guards": "results/dead", "host": "gone", "pid": 1, "ttl_s": ttl_s, "nonce": uuid.uuid4().hex}).encode())


def wait_until_stale(lock_paths: list[str]) -> None:
    deadline = time.monotonic() + 60
    while not all(locks._lock_state(lock).stale() for lock in lock_paths):
        assert time.monotonic() < deadline, "the locks never became stale"
        time.sleep(0.2)


def test_of_two_takers_of_a_stale_lock_exactly_one_holds_it(s3_server, monkeypatch):
    """30 stale locks, two takers each, all let go at once: never two inside one lock."""
    monkeypatch.setenv(TTL_VARIABLE, "10")
    lock_paths = [lock_uri(s3_server) for _ in range(30)]
    for lock in lock_paths:
        left_by_a_dead_process(s3_server, lock, ttl_s=1)
    wait_until_stale(lock_paths)
    start = threading.Barrier(2 * len(lock_paths))
    guard = threading.Lock()
    inside = {lock: 0 for lock in lock_paths}
    most_inside = {lock: 0 for lock in lock_paths}
    entries = {lock: 0 for lock in lock_paths}
    errors = []

    def take(lock: str) -> None:
        try:
            start.wait()
            with locks.file_lock(lock, guards="results/run"):
                with guard:
                    inside[lock] += 1
                    entries[lock] += 1
                    most_inside[lock] = max(most_inside[lock], inside[lock])
                time.sleep(0.05)
                with guard:
                    inside[lock] -= 1
        except Exception as error:  # noqa: BLE001 - reported by the test below
            errors.append(error)

    takers = [threading.Thread(target=take, args=(lock,)) for lock in lock_paths for _ in range(2)]
    for taker in takers:
        taker.start()
    for taker in takers:
        taker.join(timeout=120)

    assert not errors, errors
    assert entries == {lock: 2 for lock in lock_paths}, "each taker got the lock in the end"
    assert most_inside == {lock: 1 for lock in lock_paths}, "two takers held one lock at once"
    assert all(not storage.exists(lock) for lock in lock_paths)


class Interleaving:
    """An S3 client that forces the interleaving a race needs on the lock `key`: the threads named
    "first" and "second" each read the lock, and wait for each other; then "second" writes nothing
    until `first_inside` is set."""

    def __init__(self, client, key: str):
        self.client, self.key = client, key
        self.both_read = threading.Barrier(2, timeout=30)
        self.first_inside = threading.Event()
        self.have_read: set[str] = set()

    def __getattr__(self, name: str):
        method = getattr(self.client, name)

        def call(**kwargs):
            me = threading.current_thread().name
            if kwargs.get("Key") != self.key or me not in ("first", "second"):
                return method(**kwargs)
            if name in ("head_object", "get_object") and me not in self.have_read:
                result = method(**kwargs)
                self.have_read.add(me)
                self.both_read.wait()
                return result
            if name in ("put_object", "delete_object") and me == "second" and me in self.have_read:
                assert self.first_inside.wait(timeout=30)
            return method(**kwargs)
        return call


def test_two_takers_that_both_saw_a_lock_stale_are_never_inside_it_together(s3_server, monkeypatch):
    monkeypatch.setenv(TTL_VARIABLE, "10")
    lock = lock_uri(s3_server)
    left_by_a_dead_process(s3_server, lock, ttl_s=1)
    wait_until_stale([lock])
    client = Interleaving(locks._lock_s3(10.0), storage.bucket_key(lock)[1])
    monkeypatch.setattr(locks, "_lock_s3", lambda ttl_s: client)
    journal, errors = [], []

    def take(name: str) -> None:
        try:
            with locks.file_lock(lock, guards=f"results/{name}"):
                journal.append(f"{name} in")
                client.first_inside.set()
                time.sleep(0.5)
                journal.append(f"{name} out")
        except Exception as error:  # noqa: BLE001 - reported by the test below
            errors.append(error)

    takers = [threading.Thread(target=take, args=(name,), name=name) for name in ("first", "second")]
    takers[0].start()
    time.sleep(0.2)  # "first" writes first
    takers[1].start()
    for taker in takers:
        taker.join(timeout=60)

    assert not errors, errors
    assert journal == ["first in", "first out", "second in", "second out"]


def test_two_takers_that_saw_one_stale_lock_write_in_turn_and_the_second_is_refused(s3_server):
    """The interleaving a race needs, forced: both takers read the lock, then both replace it."""
    lock = lock_uri(s3_server)
    holder, first, second = (locks.Lease(lock, guards, ttl_s=30) for guards in ("old", "first", "second"))
    assert holder.acquire() and not first.acquire() and not second.acquire()
    seen = [locks._lock_state(lock), locks._lock_state(lock)]

    assert first.take_over(seen[0].etag)
    assert not second.take_over(seen[1].etag)
    assert locks._lock_state(lock).guards == "first"
    # The holder that was taken over learns it at its next renewal, and its release leaves the lock be.
    assert not holder.renew() and holder.lost == "another process took it over"
    with pytest.raises(LockLost, match="lost the lock .*another process took it over"):
        holder.check()
    holder.release()
    assert locks._lock_state(lock).guards == "first"
    first.release()
    assert not storage.exists(lock)


def test_a_lock_changed_under_its_holder_ends_the_lease_before_anything_is_published(s3_server, monkeypatch,
                                                                                    tmp_path):
    monkeypatch.setenv(TTL_VARIABLE, "3")
    folder = tmp_path / "tree"
    folder.mkdir()
    (folder / "done.json").write_text("{}")
    for change in ("overwrite", "delete"):
        lock = lock_uri(s3_server)
        output = storage.join(storage.parent(storage.parent(lock)), "out")
        bucket, key = storage.bucket_key(lock)
        with pytest.raises(LockLost, match="lost the lock") as lost:
            with locks.file_lock(lock, guards=output) as lease:
                if change == "overwrite":
                    s3_server.client().put_object(Bucket=bucket, Key=key, Body=b'{"guards": "taker"}')
                else:
                    s3_server.client().delete_object(Bucket=bucket, Key=key)
                while lease.lost is None:  # the next renewal, half a second away, finds it
                    time.sleep(0.1)
                storage.publish_folder(folder, output, "done.json")
        assert "took it over" in str(lost.value) if change == "overwrite" else "it is gone" in str(lost.value)
        assert not storage.is_dir(output), "nothing was published"
        assert storage.exists(lock) == (change == "overwrite"), "the new holder's lock is left alone"


def test_a_lease_lost_inside_fails_the_block_even_when_nothing_was_written(s3_server, monkeypatch):
    monkeypatch.setenv(TTL_VARIABLE, "3")
    lock = lock_uri(s3_server)
    bucket, key = storage.bucket_key(lock)
    with pytest.raises(LockLost, match="took it over"):
        with locks.file_lock(lock) as lease:
            s3_server.client().put_object(Bucket=bucket, Key=key, Body=b'{"guards": "taker"}')
            while lease.lost is None:
                time.sleep(0.1)


def test_a_holder_that_cannot_reach_s3_to_renew_loses_its_lease(s3_server, monkeypatch):
    import boto3
    from botocore.config import Config

    monkeypatch.setenv(TTL_VARIABLE, "3")
    lock = lock_uri(s3_server)
    output = storage.join(storage.parent(storage.parent(lock)), "out.json")
    unreachable = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{free_port()}",
                               config=Config(retries={"max_attempts": 1}, connect_timeout=2))
    with pytest.raises(LockLost, match="renewing it failed: EndpointConnectionError"):
        with locks.file_lock(lock, guards=output) as lease:
            with monkeypatch.context() as cut_off:
                cut_off.setattr(locks, "_lock_s3", lambda ttl_s: unreachable)
                while lease.lost is None:
                    time.sleep(0.1)
            storage.write_bytes(output, b"{}")
    assert not storage.exists(output)
    assert not storage.exists(lock), "the lock, still this holder's, was let go"


def test_a_holder_whose_s3_stops_answering_stops_within_the_ttl(s3_server, monkeypatch, caplog):
    """S3 accepts connections and never answers: the renewals and the release give up after the lock
    client's timeouts (a sixth of the TTL), not botocore's default minutes."""
    monkeypatch.setenv(TTL_VARIABLE, "3")
    lock = lock_uri(s3_server)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)  # the kernel completes the connections; nothing ever answers them
        started = time.monotonic()
        try:
            with pytest.raises(LockLost, match="lost the lock .*(not renewed|renewing it failed)"):
                with locks.file_lock(lock):
                    monkeypatch.setenv("S3_ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
                    storage._clients.clear()
                    while True:
                        locks.check_leases()
                        assert time.monotonic() - started < 60, "the lease never ended"
                        time.sleep(0.1)
            stopped_s = time.monotonic() - started
        finally:
            monkeypatch.undo()
            storage._clients.clear()
    assert stopped_s < 30, "botocore's default timeouts would take minutes"
    assert "could not release the lock" in caplog.text
    assert storage.exists(lock), "left to go stale, since S3 could not be asked to delete it only if unchanged"


def test_a_release_answered_by_conflicts_gives_up_and_deletes_nothing(s3_server, monkeypatch, caplog):
    from botocore.exceptions import ClientError

    lock = lock_uri(s3_server)
    lease = locks.Lease(lock, "results/run", ttl_s=30)
    assert lease.acquire()
    client, deletes = locks._lock_s3(30.0), []

    class Conflicting:
        """What S3 answers while another conditional request on the key is in flight."""
        def __getattr__(self, name):
            return getattr(client, name)

        def delete_object(self, **kwargs):
            deletes.append(kwargs)
            raise ClientError({"Error": {"Code": "ConditionalRequestConflict"}}, "DeleteObject")

    monkeypatch.setattr(locks, "_lock_s3", lambda ttl_s: Conflicting())
    lease.release()

    assert len(deletes) == locks._RELEASE_TRIES and all(kwargs["IfMatch"] == lease.etag for kwargs in deletes)
    assert "could not release the lock" in caplog.text and lease.lost is None
    assert storage.exists(lock)


@pytest.mark.parametrize("answer", ["timeout", "retry refused"])
def test_a_renewal_applied_though_its_answer_was_lost_keeps_the_lease(answer, s3_server, monkeypatch):
    """A renewal that S3 applied but whose answer was lost leaves the lock with an ETag its holder
    never heard, and botocore's retry of it is refused (412): the holder recognises its own nonce in
    the lock instead of taking itself for taken over, and its release still deletes the lock."""
    from botocore.exceptions import ReadTimeoutError

    lock = lock_uri(s3_server)
    lease = locks.Lease(lock, "results/run", ttl_s=30)
    assert lease.acquire()
    client = locks._lock_s3(30.0)
    puts = []

    class AnswerLost:
        """The first renewal is applied, but its answer is lost: a timeout, or botocore's retry of
        it (the same request), refused since the ETag it names is gone."""
        def __getattr__(self, name):
            return getattr(client, name)

        def put_object(self, **kwargs):
            puts.append(kwargs)
            if len(puts) > 1:
                return client.put_object(**kwargs)
            client.put_object(**kwargs)
            if answer == "timeout":
                raise ReadTimeoutError(endpoint_url=s3_server.endpoint)
            return client.put_object(**kwargs)

    monkeypatch.setattr(locks, "_lock_s3", lambda ttl_s: AnswerLost())
    if answer == "timeout":
        with pytest.raises(ReadTimeoutError):
            lease.renew()
    assert lease.renew() and lease.lost is None
    lease.release()
    assert not storage.exists(lock) and lease.lost is None


def test_a_release_of_a_lock_already_deleted_ends_quietly(s3_server):
    """A delete that S3 applied, retried by botocore after its answer was lost, finds no lock (404)."""
    lock = lock_uri(s3_server)
    lease = locks.Lease(lock, "results/run", ttl_s=30)
    assert lease.acquire()
    storage.remove_tree(lock)
    lease.release()
    assert lease.lost is None and not storage.exists(lock)


def test_a_training_whose_lease_is_taken_over_stops_within_a_step(s3_server, monkeypatch, tmp_path):
    """TensorFlow writes the checkpoints, not `storage`: the training checks its leases every step."""
    from pipeline import models, training
    from pipeline.runfiles import MODEL_DIR
    from tests.test_convert import converted_images
    from tests.test_prediction import RUN_CONFIG

    monkeypatch.setenv(TTL_VARIABLE, "3")
    out, _ = converted_images(tmp_path, per_class=6, test_fraction=0.3, image_size=6)
    run_dir, max_steps = tmp_path / "run", 1000
    lock = lock_uri(s3_server)
    bucket, key = storage.bucket_key(lock)
    steps = []
    with pytest.raises(LockLost, match="another process took it over"):
        with locks.file_lock(lock, guards=str(run_dir)) as lease:
            def progress(step, total, unit, note):
                steps.append(step)
                if step == 3:  # what a taker that judged the lock stale does
                    s3_server.client().put_object(Bucket=bucket, Key=key, Body=b'{"guards": "the taker"}')
                    while lease.lost is None:  # found by the next renewal, half a second away
                        time.sleep(0.1)

            training.train_model(models.resolve_model_file("cnn"), {"conv_filters": [2], "dense_units": 4}, out,
                                 out / "metadata.json", run_dir, run_dir / "train.json", max_steps=max_steps,
                                 batch_size=4, run_config=RUN_CONFIG, progress=progress)

    assert steps[-1] <= 4 < max_steps, steps
    assert not (run_dir / "train.json").exists()
    checkpoint = tf_checkpoint_step(run_dir / MODEL_DIR)
    assert checkpoint <= 4, f"a checkpoint of step {checkpoint} was written after the lease ended"
    assert s3_server.read(key) == b'{"guards": "the taker"}'


def tf_checkpoint_step(model_dir) -> int:
    import tensorflow as tf

    return int(tf.train.load_variable(tf.train.latest_checkpoint(str(model_dir)), "global_step"))


def run_holder(lock: str, output: str, ttl_s: str, text: str, s3_env: dict[str, str]) -> subprocess.Popen:
    """A process that takes `lock`, says "held", waits for a line on its stdin, then writes `text` to `output`."""
    code = (f"import sys; from pipeline import locks, storage\n"
            f"with locks.file_lock({lock!r}, guards={output!r}):\n"
            f"    print('held', flush=True); sys.stdin.readline()\n"
            f"    storage.write_bytes({output!r}, {text!r}.encode())\n")
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**s3_env, TTL_VARIABLE: ttl_s})


def test_a_paused_holder_is_taken_over_then_fails_and_only_the_taker_publishes(s3_server, tmp_path):
    lock = lock_uri(s3_server)
    output = storage.join(storage.parent(storage.parent(lock)), "result.txt")
    env = {**os.environ, **s3_server.env()}
    first = run_holder(lock, output, "3", "first", env)
    assert first.stdout.readline().strip() == "held"
    first.send_signal(signal.SIGSTOP)  # a GC pause, a stall: its renewals stop
    try:
        second = run_holder(lock, output, "3", "second", env)
        assert second.stdout.readline().strip() == "held", second.stderr.read()
        _, errors = second.communicate("go\n", timeout=60)
        assert second.returncode == 0, errors
    finally:
        first.send_signal(signal.SIGCONT)
    _, errors = first.communicate("go\n", timeout=60)

    assert first.returncode != 0 and "LockLost: lost the lock" in errors, errors
    assert storage.read_bytes(output) == b"second"
    assert not storage.exists(lock)


def test_a_fast_clock_does_not_take_over_a_live_lock(s3_server, monkeypatch):
    """This process's clock runs 31 s ahead, beyond the default TTL of 30 s and the holder's of 5 s;
    the holder renews its lock every 0.8 s."""
    lock = lock_uri(s3_server)
    left = storage.join(storage.parent(lock), "holder-left")
    code = (f"import time; from pipeline import locks, storage\n"
            f"with locks.file_lock({lock!r}, guards='results/run'):\n"
            f"    print('held', flush=True); time.sleep(4)\n"
            f"    storage.write_bytes({left!r}, b'')\n")
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, **s3_server.env(), TTL_VARIABLE: "5"})
    assert holder.stdout.readline().strip() == "held"

    real_time, real_datetime = time.time, datetime.datetime

    class Ahead(real_datetime):
        @classmethod
        def now(cls, tz=None):
            return real_datetime.now(tz) + datetime.timedelta(seconds=31)

        @classmethod
        def utcnow(cls):
            return real_datetime.utcnow() + datetime.timedelta(seconds=31)

    monkeypatch.setattr(time, "time", lambda: real_time() + 31)
    monkeypatch.setattr(datetime, "datetime", Ahead)
    with locks.file_lock(lock, guards="results/other"):
        assert storage.exists(left), "the lock was taken while its holder was still inside"
    monkeypatch.undo()
    assert holder.wait(timeout=30) == 0


def test_machines_with_their_own_data_root_share_the_lock_of_an_s3_result(s3_server, tmp_path):
    """Two processes, each with a local data_root of its own (two machines), and results on S3."""
    results_root = s3_server.uri(f"mixed-{uuid.uuid4().hex[:8]}", "results")
    journal, go = tmp_path / "journal", tmp_path / "go"
    code = (f"import os, sys, time\n"
            f"from pathlib import Path\n"
            f"from pipeline import locks\n"
            f"from tasks.stages import Download, Train\n"
            f"train, download = Train(), Download()\n"
            f"print(train.lock_path(), download.lock_path(), flush=True)\n"
            f"while not Path({str(go)!r}).exists(): time.sleep(0.05)\n"
            f"def note(what):\n"
            f"    with open({str(journal)!r}, 'a') as journal: journal.write(f'{{what}} {{os.getpid()}}\\n')\n"
            f"with locks.file_lock(train.lock_path(), guards=train.output().path):\n"
            f"    note('in'); time.sleep(1.5); note('out')\n")
    machines = []
    for machine in ("a", "b"):
        sections = cli_sections(tmp_path / machine, "file:/nowhere/source.tar.gz")
        sections["layout"]["results_root"] = results_root
        (tmp_path / machine).mkdir()
        config = write_config(tmp_path / machine / "luigi.cfg", sections)
        machines.append(subprocess.Popen(
            [sys.executable, "-c", code], cwd=tmp_path / machine, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env={**os.environ, **s3_server.env(), "PYTHONPATH": str(REPO), "LUIGI_CONFIG_PATH": str(config)}))
    paths = [machine.stdout.readline().split() for machine in machines]
    assert all(paths), [machine.stderr.read() for machine in machines]
    go.touch()
    for machine in machines:
        assert machine.wait(timeout=60) == 0, machine.stderr.read()

    (train_lock, download_lock), (other_train_lock, other_download_lock) = paths
    assert train_lock == other_train_lock and train_lock.startswith(f"{results_root}/.locks/")
    assert download_lock == str(tmp_path / "a" / "data" / ".locks" / Path(download_lock).name)
    steps = [line.split()[0] for line in journal.read_text().splitlines()]
    assert steps == ["in", "out", "in", "out"], journal.read_text()


def test_a_task_whose_lock_is_taken_over_fails_and_publishes_nothing(s3_server, file_server, tmp_path):
    """Through the `luigi` command: a Download on S3 loses its lock while it fetches."""
    prefix = f"taken-{uuid.uuid4().hex[:8]}"
    file_server.files["/slow.tar.gz"] = tar_bytes({"cat/1.png": b"x", "dog/2.png": b"y"})
    file_server.faults["/slow.tar.gz"] = ["stall"]
    file_server.stall_s = 6
    sections = cli_sections(tmp_path, file_server.url("/slow.tar.gz"))
    sections["layout"]["data_root"] = s3_server.uri(prefix, "data")
    config = write_config(tmp_path / "luigi.cfg", sections)

    finish = start_watched(tmp_path, config, "Download", "--local-scheduler", limit_s=120,
                           env={**s3_server.env(), TTL_VARIABLE: "3"})
    deadline = time.monotonic() + 60
    while not (lock_paths := s3_server.keys(f"{prefix}/data/.locks/")):
        assert time.monotonic() < deadline, "the Download never took its lock"
        time.sleep(0.1)
    # What a second process that judged the lock stale would do: replace it.
    s3_server.client().put_object(Bucket=s3_server.bucket, Key=lock_paths[0], Body=b'{"guards": "the taker"}')
    run = finish()

    assert run.returncode == 30, run.output[-3000:]
    [failure] = [line for line in run.output.splitlines() if "failed    Download(" in line]
    print(failure)
    assert "lost the lock" in failure and "another process took it over" in failure, failure
    assert s3_server.keys(f"{prefix}/data/raw/") == [], "the Download published after losing its lock"
    assert s3_server.read(lock_paths[0]) == b'{"guards": "the taker"}', "the taker's lock was deleted"


def test_gc_sees_the_locks_held_under_both_roots(s3_server, luigi_config, tmp_path):
    from tasks.config import locks_folders
    from tasks.stages import Download, Train

    sections = cli_sections(tmp_path, "file:/nowhere/source.tar.gz")
    sections["layout"]["results_root"] = results_root = s3_server.uri(f"gc-{uuid.uuid4().hex[:8]}", "results")
    luigi_config(sections)
    train, download = Train(), Download()

    assert locks_folders() == [str(tmp_path / "data" / ".locks"), f"{results_root}/.locks"]
    with locks.file_lock(train.lock_path(), guards=train.directory), \
            locks.file_lock(download.lock_path(), guards=download.directory):
        assert sorted(path for folder in locks_folders() for path in locks.held_locks(folder)) == \
            sorted([train.directory, download.directory])
