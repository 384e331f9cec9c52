"""The central scheduler's start and stop, the hint when none runs, and TensorBoard links."""
import urllib.parse

import pytest

from pipeline.errors import ConfigError
from tasks.config import tensorboard_url
from tasks.services import is_listening, main, start_scheduler, stop_scheduler
from tests.conftest import free_port, luigi_command, repo_config, tiny_config, write_config


def test_scheduler_starts_on_loopback_once_and_stops_by_its_pidfile(tmp_path):
    port = free_port()
    state = tmp_path / "luigid"
    try:
        assert start_scheduler(state, port=port) == f"http://127.0.0.1:{port}"
        pid = int((state / "luigid.pid").read_text())
        # Already listening: a second start leaves the running one alone.
        assert start_scheduler(state, port=port) == f"http://127.0.0.1:{port}"
        assert int((state / "luigid.pid").read_text()) == pid
        assert main(["status", "--port", str(port)]) == 0
    finally:
        stopped = stop_scheduler(state)
    assert stopped == pid
    assert not is_listening("127.0.0.1", port)
    assert (state / "state.pickle").is_file(), "luigid saves its state when stopped with SIGTERM"
    assert not (state / "luigid.pid").exists()
    assert stop_scheduler(state) is None
    assert main(["status", "--port", str(port)]) == 1


def test_scheduler_port_out_of_range_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="port=70000; expected 1-65535"):
        start_scheduler(tmp_path, port=70000)


def test_luigi_without_a_scheduler_fails_fast_saying_what_to_do(mnist_subset, tmp_path):
    sections = tiny_config(tmp_path, mnist_subset.as_uri())
    sections["core"] = {**repo_config()["core"], "default-scheduler-port": str(free_port())}
    sections["retcode"] = repo_config()["retcode"]
    config_path = write_config(tmp_path / "luigi.cfg", sections)

    # The timeout only guards against a hang; Luigi's own defaults would retry for 90 s.
    result = luigi_command(tmp_path, config_path, "RunAll", local_scheduler=False, timeout_s=60)

    assert result.returncode != 0
    assert "make ui" in result.stderr and "--local-scheduler" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists(), "nothing runs without a scheduler"


def test_tensorboard_link_filters_to_one_run(tmp_path):
    run = tmp_path / "results" / "mnist_5k" / "cnn-0123abcd"
    url = tensorboard_url("http://127.0.0.1:6006/", tmp_path / "results", run)
    base, _, fragment = url.partition("#")
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(base).query)
    assert base.startswith("http://127.0.0.1:6006/?") and fragment == "timeseries"
    assert query["runFilter"] == [r"^mnist_5k/cnn\-0123abcd/"]
