"""Scale-out on one machine, three figures (`python bench/scaleout.py [s3] [convert] [distribute]`, all
by default): a whole RunAll with both roots on S3 (moto's server on 127.0.0.1) against the same
RunAll with local roots; Train as a local cluster (a chief, two workers, a parameter server and
an evaluator) against Train in one process, in steps per second of the whole command; and the
conversion of 20k images (the sample's, shifted and
flipped, as bench/convert.py makes them) by two `luigi` worker processes sharing one central
scheduler against one. At the sample's 5k images the conversion is over before a second process
has started: its start-up (importing TensorFlow) takes about as long. Each repetition measures both sides back to
back, in fresh folders and prefixes, so that nothing is found complete.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from common import CACHE, EMBEDDED, LUIGI, REPEATS, REPO, bench_config, converted_sample, luigi_env, report, timed
from convert import scaled_source

sys.path.insert(0, str(REPO))
TRAIN_STEPS = "300"
SCALED_IMAGES = 20_000
S3_ENV = {"AWS_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def luigi(folder: Path, config: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    """Start the `luigi` command in `folder`, its output in a new luigi-<n>.log there."""
    log = folder / f"luigi-{len(list(folder.glob('luigi-*.log')))}.log"
    with open(log, "w") as handle:
        return subprocess.Popen([LUIGI, "--module", "tasks", *args], cwd=folder,
                                env={**luigi_env(config), **(env or {})}, stdout=handle, stderr=subprocess.STDOUT)


def finish(*processes: subprocess.Popen) -> None:
    """Wait for `processes`; exit unless each ended with 0, or 25: on a shared scheduler, a process
    whose tasks another one ran says they were "not granted" (the caller checks the output)."""
    codes = [process.wait() for process in processes]
    if not set(codes) <= {0, 25}:
        raise SystemExit(f"a luigi command failed: exit codes {codes}; see the luigi-*.log files")


def s3_against_local(endpoint: str) -> None:
    s3_env = {"S3_ENDPOINT": endpoint, **S3_ENV}
    on_s3, local = [], []
    for repetition in range(REPEATS):
        prefix = f"s3://bench/run-{uuid.uuid4().hex[:8]}"
        folder = Path(tempfile.mkdtemp(dir=CACHE))
        local_config = bench_config(folder / "local", EMBEDDED.as_uri())
        s3_config = bench_config(folder / "s3", EMBEDDED.as_uri(), roots=prefix)
        args = ("RunAll", "--local-scheduler", "--workers", "2", "--Train-max-steps", TRAIN_STEPS)
        local.append(timed(lambda: finish(luigi(folder / "local", local_config, *args))))
        on_s3.append(timed(lambda: finish(luigi(folder / "s3", s3_config, *args, env=s3_env))))
        print(f"  repetition {repetition}: local {local[-1]:.1f} s, S3 {on_s3[-1]:.1f} s", flush=True)
    report(f"RunAll ({TRAIN_STEPS} steps, --workers 2), S3 roots vs local roots, wall seconds", on_s3, local, "s",
           "none: the overhead S3 costs")


def two_workers_against_one() -> None:
    from tasks.services import start_scheduler, stop_scheduler

    converted_sample()  # the images scaled_source draws from
    _, archive = scaled_source(SCALED_IMAGES)
    port = free_port()
    state = Path(tempfile.mkdtemp(dir=CACHE))
    start_scheduler(state, port=port)
    try:
        one, two = [], []
        for repetition in range(REPEATS):
            rates = []
            for processes in (1, 2):
                folder = Path(tempfile.mkdtemp(dir=CACHE))
                config = bench_config(folder, archive.as_uri())
                scheduler = ("--scheduler-host", "127.0.0.1", "--scheduler-port", str(port))
                finish(luigi(folder, config, "Download", *scheduler))  # not timed: conversion alone is
                seconds = timed(lambda: finish(*(luigi(folder, config, "Convert", "--workers", "1", *scheduler)
                                                 for _ in range(processes))))
                if not list(folder.glob("data/tfrecords/*/*/metadata.json")):
                    raise SystemExit(f"{folder}: Convert exited without its metadata.json")
                rates.append(SCALED_IMAGES / seconds)
            one.append(rates[0])
            two.append(rates[1])
            print(f"  repetition {repetition}: one worker {one[-1]:.0f} images/s, two {two[-1]:.0f}", flush=True)
        report(f"Convert {SCALED_IMAGES} images on one luigid, two worker processes vs one, images/s", two, one,
               "images/s",
               "> 1 with two cores free")
    finally:
        stop_scheduler(state)


def distributed_against_one_process() -> None:
    steps = 1500
    cluster, alone = [], []
    for repetition in range(REPEATS):
        folder = Path(tempfile.mkdtemp(dir=CACHE))
        config = bench_config(folder, EMBEDDED.as_uri())
        finish(luigi(folder, config, "Convert", "--local-scheduler", "--workers", "2"))  # not timed
        train = ("Train", "--local-scheduler", "--max-steps", str(steps))
        alone.append(steps / timed(lambda: finish(luigi(folder, config, *train))))
        cluster.append(steps / timed(lambda: finish(luigi(folder, config, *train, "--distribute", "local",
                                                          "--cluster-workers", "2"))))
        print(f"  repetition {repetition}: one process {alone[-1]:.1f} steps/s, cluster {cluster[-1]:.1f}",
              flush=True)
    report(f"Train {steps} steps, distribute=local with 2 workers vs none, steps/s of the whole command", cluster,
           alone, "steps/s", "none on 2 cores: it proves the mechanism, not the speed")


def main() -> None:
    CACHE.mkdir(parents=True, exist_ok=True)
    port = free_port()
    with open(CACHE / "moto_server.log", "w") as log:
        server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p",
                                   str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port)
        endpoint = f"http://127.0.0.1:{port}"
        subprocess.run(["curl", "-sf", "-X", "PUT", f"{endpoint}/bench"], check=True)
        os.environ.update(S3_ENV)
        figures = set(sys.argv[1:]) or {"s3", "convert", "distribute"}
        if "s3" in figures:
            s3_against_local(endpoint)
        if "convert" in figures:
            two_workers_against_one()
        if "distribute" in figures:
            distributed_against_one_process()
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
