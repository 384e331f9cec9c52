from __future__ import annotations

import configparser
import csv
import http.server
import io
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import threading
import time
import uuid
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import luigi
import luigi.configuration
import pytest
from luigi.task_register import Register
from PIL import Image


REPO = Path(__file__).resolve().parent.parent
EMBEDDED_ARCHIVE = REPO / "data" / "mnist_5k.tar.gz"

# Families of the stages that did work in this process, recorded through Luigi's own event hook
# (RunAll and Sweep, which only gather stages, are left out).
STARTED: list[str] = []


@luigi.Task.event_handler(luigi.Event.START)
def _record_start(task):
    from tasks.base import Step

    if isinstance(task, Step):
        STARTED.append(task.get_task_family())


def make_mnist_subset(path: Path, classes=("0", "1", "2"), per_class: int = 30) -> Path:
    """A small tar.gz of real MNIST digits, taken from the embedded archive."""
    taken = defaultdict(int)
    with tarfile.open(EMBEDDED_ARCHIVE) as source, tarfile.open(path, "w:gz") as subset:
        for member in source:
            label = member.name.split("/")[0]
            if member.isfile() and label in classes and taken[label] < per_class:
                taken[label] += 1
                subset.addfile(member, source.extractfile(member))
    return path


@pytest.fixture(scope="session")
def mnist_subset(tmp_path_factory) -> Path:
    return make_mnist_subset(tmp_path_factory.mktemp("sources") / "mnist_subset.tar.gz")


def tiny_config(tmp_path: Path, source_url: str) -> dict[str, dict[str, str]]:
    """A configuration of every task that runs the whole pipeline in seconds."""
    return {
        "layout": {"data_root": str(tmp_path / "data"), "results_root": str(tmp_path / "results")},
        "Download": {"dataset": "tiny", "source_url": source_url},
        "Convert": {"image_size": "28", "channels": "1", "validation_fraction": "0.2", "test_fraction": "0.2",
                    "split_seed": "7", "num_shards": "2", "max_bad_fraction": "0.0"},
        "Train": {"model_def": "cnn", "params": '{"conv_filters": [8], "dense_units": 16}', "max_steps": "12",
                  "batch_size": "8", "tf_random_seed": "1", "save_checkpoints_steps": "6",
                  "save_summary_steps": "6", "keep_checkpoint_max": "2", "log_step_count_steps": "6"},
        "Evaluate": {"split": "test"},
        "Predict": {"input_dir": ""},
    }


@pytest.fixture
def luigi_config():
    """Install a fresh Luigi configuration and instance cache; restore both afterwards.

    Call the returned function with {section: {key: value}} to set the configuration.
    """
    original = luigi.configuration.LuigiConfigParser.instance()
    Register.clear_instance_cache()
    STARTED.clear()
    yield install_luigi_config
    restore_luigi_config(original)


def install_luigi_config(sections: dict[str, dict[str, str]]) -> None:
    config = luigi.configuration.LuigiConfigParser()
    for section, values in sections.items():
        config.add_section(section)
        for key, value in values.items():
            config.set(section, key, value)
    luigi.configuration.LuigiConfigParser._instance = config
    Register.clear_instance_cache()


def restore_luigi_config(original: luigi.configuration.LuigiConfigParser) -> None:
    luigi.configuration.LuigiConfigParser._instance = original
    Register.clear_instance_cache()


def free_port() -> int:
    """A loopback port nothing listens on now (the OS will not hand it out again at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def repo_config() -> dict[str, dict[str, str]]:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(REPO / "luigi.cfg")
    return {name: dict(parser[name]) for name in parser.sections()}


def write_config(path: Path, sections: dict) -> Path:
    parser = configparser.ConfigParser()
    parser.read_dict(sections)
    with open(path, "w") as handle:
        parser.write(handle)
    return path


# luigi.cfg's settings of Luigi itself, which every run of the real `luigi` command in a test keeps.
INFRASTRUCTURE_SECTIONS = ("core", "worker", "scheduler", "resources", "retcode")


def cli_sections(folder: Path, source_url: str, scheduler_port: int | None = None) -> dict[str, dict[str, str]]:
    """The tiny pipeline into `folder` with luigi.cfg's own core, worker, scheduler and exit-code
    settings; `scheduler_port` points it at a central scheduler on 127.0.0.1."""
    sections = tiny_config(folder, source_url)
    repo = repo_config()
    sections.update({name: dict(repo[name]) for name in INFRASTRUCTURE_SECTIONS})
    if scheduler_port is not None:
        sections["core"]["default-scheduler-port"] = str(scheduler_port)
    return sections


@pytest.fixture
def luigid(tmp_path):
    """A real central scheduler on a free loopback port, stopped afterwards; yields the port."""
    from tasks.services import start_scheduler, stop_scheduler

    port = free_port()
    start_scheduler(tmp_path / "luigid", port=port)
    try:
        yield port
    finally:
        stop_scheduler(tmp_path / "luigid")


def luigi_argv(*args: str) -> list[str]:
    """The real `luigi` command line for this project's tasks."""
    return [str(Path(sys.executable).with_name("luigi")), "--module", "tasks", *args]


def luigi_env(config_path: Path, **variables: str | None) -> dict[str, str]:
    """The environment that makes `config_path` the only configuration file `luigi` reads, with
    `variables` set (or, given None, removed)."""
    env = {**os.environ, "LUIGI_CONFIG_PATH": str(config_path), **variables}
    return {name: value for name, value in env.items() if value is not None}


def luigi_command(cwd: Path, config_path: Path, *args: str, local_scheduler: bool = True,
                  timeout_s: float = 600) -> subprocess.CompletedProcess:
    """Run the real `luigi` command with `config_path` as its configuration; capture its output."""
    return subprocess.run(luigi_argv(*args, *(["--local-scheduler"] if local_scheduler else [])), cwd=cwd,
                          env=luigi_env(config_path), capture_output=True, text=True, timeout=timeout_s)


def tensorflow_free_command(folder: Path, config: Path, module: str, *args: str,
                            source: Path = REPO) -> subprocess.CompletedProcess:
    """`python -m <module> args` in `folder` with `config`, run from the code in `source`; it fails
    if the command imported TensorFlow on the way."""
    probe = ("import runpy, sys\nsys.argv = [sys.argv[1], *sys.argv[2:]]\n"
             "try:\n    runpy.run_module(sys.argv[0], run_name='__main__')\n"
             "except SystemExit as done:\n    code = done.code\n"
             "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\nsys.exit(code)\n")
    return subprocess.run([sys.executable, "-c", probe, module, *args], cwd=folder,
                          env={**luigi_env(config), "PYTHONPATH": str(source)}, capture_output=True, text=True,
                          timeout=120)


@dataclass
class Watched:
    """A finished `luigi` command: exit code, output (stdout and stderr together), and seconds
    from its start, and from its first "failed" line, to its exit."""
    returncode: int
    output: str
    seconds: float
    after_failure: float | None


def start_watched(cwd: Path, config_path: Path, *args: str, limit_s: float = 240,
                  env: dict[str, str | None] | None = None) -> Callable[[], Watched]:
    """Start the real `luigi` command (with `env` as in `luigi_env`); the returned function waits
    for it and returns how it ended.

    Its process group is killed after `limit_s`: a command still running then has hung, and the
    test fails saying so."""
    start = time.monotonic()
    process = subprocess.Popen(luigi_argv(*args), cwd=cwd, env=luigi_env(config_path, **(env or {})),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    watchdog = threading.Timer(limit_s, os.killpg, (process.pid, signal.SIGKILL))
    watchdog.start()
    lines: list[str] = []
    failed_at: list[float] = []

    def read() -> None:
        for line in process.stdout:
            lines.append(line)
            if not failed_at and re.search(r"\bfailed\s+\w+\(", line):
                failed_at.append(time.monotonic())

    reader = threading.Thread(target=read)
    reader.start()

    def finish() -> Watched:
        returncode = process.wait()
        end = time.monotonic()
        watchdog.cancel()
        reader.join()
        output = "".join(lines)
        if returncode == -signal.SIGKILL:
            pytest.fail(f"`luigi {' '.join(args)}` still ran after {limit_s:.0f} s and was killed:\n{output[-3000:]}")
        return Watched(returncode, output, end - start, end - failed_at[0] if failed_at else None)

    return finish


def run_watched(cwd: Path, config_path: Path, *args: str, limit_s: float = 240,
                env: dict[str, str | None] | None = None) -> Watched:
    """Run the real `luigi` command to its end; see `start_watched`."""
    return start_watched(cwd, config_path, *args, limit_s=limit_s, env=env)()


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def run_tasks(*tasks) -> list[str]:
    """Build `tasks` on the local scheduler; return the families of the tasks that ran."""
    STARTED.clear()
    Register.clear_instance_cache()
    assert luigi.build(list(tasks), local_scheduler=True, log_level="WARNING"), "luigi.build reported a failure"
    return sorted(STARTED)


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's naming
        server: FileServer = self.server.owner
        server.requests[self.path] += 1
        server.ranges[self.path].append(self.headers.get("Range"))
        if self.headers.get("Authorization"):
            server.authorizations[self.path].append(self.headers["Authorization"])
        fault = server.faults[self.path].pop(0) if server.faults[self.path] else None
        if fault == "503":
            return self._reply(503, b"busy")
        if self.path not in server.files:
            return self._reply(404, b"not found")
        body = server.files[self.path]
        start = int(match.group(1)) if (match := re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")) else 0
        if fault == "stall":
            time.sleep(server.stall_s)
        if start:
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if fault in ("reset", "short"):
            # Half the body, then the connection ends: abruptly (RST) for a reset, cleanly for a short body.
            self.wfile.write(body[start:start + (len(body) - start) // 2])
            self.wfile.flush()
            if fault == "reset":
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            return
        if server.slow:
            # Twenty pieces over about a second, so that a kill can land mid-download.
            step = max(1, (len(body) - start) // 20)
            for offset in range(start, len(body), step):
                self.wfile.write(body[offset:offset + step])
                self.wfile.flush()
                time.sleep(0.05)
            return
        self.wfile.write(body[start:])

    def _reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # A client killed mid-body (the crash trials do that) is expected, not worth a traceback.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class FileServer:
    """An HTTP server on 127.0.0.1 serving `files`, with Range requests.

    `faults[path]` lists what the next requests of `path` get, one each: "503"; "reset" or
    "short" (half the body, then the connection is reset, or closed); "stall" (`stall_s` of
    silence first). With `slow`, every body trickles out over about a second. `requests`,
    `ranges` and `authorizations` record what was asked. A path's query is part of it.
    """

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.faults: dict[str, list[str]] = defaultdict(list)
        self.requests: dict[str, int] = defaultdict(int)
        self.ranges: dict[str, list[str | None]] = defaultdict(list)
        self.authorizations: dict[str, list[str]] = defaultdict(list)
        self.stall_s = 2.0
        self.slow = False
        self._server = _QuietServer(("127.0.0.1", 0), _Handler)
        self._server.owner = self
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}{path}"

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def file_server():
    with FileServer() as server:
        yield server


def png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims `width` x `height` pixels (a decompression bomb, from its header)."""
    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # IHDR's width and height, after signature and chunk head
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def tar_bytes(members: dict[str, bytes], special: tuple[tarfile.TarInfo, ...] = ()) -> bytes:
    """A .tar.gz of plain files, then `special` members (links, devices...) as given."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in special:
            tar.addfile(info, io.BytesIO(bytes(info.size)) if info.size else None)
    return buffer.getvalue()


# A secret key no real account has, recognisable wherever it would leak (tests/test_s3.py looks).
PLANTED_SECRET_KEY = "plantedSECRET" + "x7Qk2ZrV9wLp4NmT8sJd1HfB6cYgE3uA"


@dataclass
class S3Server:
    """A real S3 server (moto's) on 127.0.0.1, and one bucket of it for this test session."""
    endpoint: str
    bucket: str

    def env(self) -> dict[str, str]:
        """The variables a process reaches the server with, as docs/several-machines.md tells users to set them."""
        return {"S3_ENDPOINT": self.endpoint, "AWS_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "PIPELINETESTKEY",
                "AWS_SECRET_ACCESS_KEY": PLANTED_SECRET_KEY, "AWS_EC2_METADATA_DISABLED": "true"}

    def uri(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])

    def client(self):
        import boto3

        env = self.env()
        return boto3.client("s3", endpoint_url=self.endpoint, region_name=env["AWS_REGION"],
                            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])

    def keys(self, prefix: str) -> list[str]:
        """Every object key under `prefix` in the bucket."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(entry["Key"] for page in pages for entry in page.get("Contents", []))

    def read(self, key: str) -> bytes:
        return self.client().get_object(Bucket=self.bucket, Key=key)["Body"].read()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's S3 server in a process of its own on a free loopback port, with a fresh bucket; stopped
    afterwards. This process's environment points at it for the session, as a user's shell would."""
    from pipeline import storage

    port = free_port()
    log = tmp_path_factory.mktemp("s3") / "moto_server.log"
    with open(log, "w") as handle:
        process = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1",
                                    "-p", str(port)], stdout=handle, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    server = S3Server(f"http://127.0.0.1:{port}", f"pipeline-{os.getpid()}")
    saved = {name: os.environ.get(name) for name in server.env()}
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"moto_server did not start:\n{log.read_text()[-2000:]}")
                time.sleep(0.2)
        server.client().create_bucket(Bucket=server.bucket)
        os.environ.update(server.env())
        storage._clients.clear()
        yield server
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        storage._clients.clear()
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    """A folder to write into: a local one, then one on the S3 server."""
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("s3_server").uri(f"storage-{uuid.uuid4().hex[:8]}")
