"""The local services a user watches the pipeline with: Luigi's central scheduler and TensorBoard.

`python -m tasks.services start|stop|status` manages one `luigid` whose pidfile, logs and
state live in one folder (`.luigid/` from the Makefile). It binds to loopback unless told
otherwise: luigid has no authentication, so whoever reaches its port can see and steer runs.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from pipeline.errors import ConfigError, PipelineError

# Starts and stops the scheduler and TensorBoard, around runs, never inside one: it cannot
# change a result (see pipeline.fingerprint).
AFFECTS_RESULTS = False

PIDFILE = "luigid.pid"
STATE_FILE = "state.pickle"
LOG_FILE = "luigi-server.log"
LOOPBACK = "127.0.0.1"


class ServiceError(PipelineError):
    """A local service did not start or stop as asked."""


def is_listening(host: str, port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _pid_from(pidfile: Path) -> int | None:
    """The pid in `pidfile` when that process is alive, else None."""
    try:
        pid = int(pidfile.read_text().strip())
        os.kill(pid, 0)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None
    except PermissionError:  # alive, owned by someone else
        return pid
    return pid


def start_scheduler(state_dir: Path, host: str = LOOPBACK, port: int = 8082, *, timeout_s: float = 30.0) -> str:
    """Start `luigid` in the background unless something already listens on host:port.

    Returns the UI's address. Raises ServiceError, naming the log, when it does not come up.
    """
    if not 0 < port < 65536:
        raise ConfigError(f"port={port}; expected 1-65535")
    url = f"http://{host}:{port}"
    if is_listening(host, port):
        return url
    state_dir = Path(state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    luigid = Path(sys.executable).with_name("luigid")
    # --background daemonizes: this command returns once the daemon has forked away.
    subprocess.run([str(luigid), "--background", "--address", host, "--port", str(port),
                    "--pidfile", str(state_dir / PIDFILE), "--logdir", str(state_dir),
                    "--state-path", str(state_dir / STATE_FILE)], check=True)
    deadline = time.monotonic() + timeout_s
    while not is_listening(host, port):
        if time.monotonic() > deadline:
            raise ServiceError(f"luigid did not listen on {host}:{port} within {timeout_s:.0f} s; "
                               f"see {state_dir / LOG_FILE} and the luigi-server-*.err files beside it")
        time.sleep(0.1)
    return url


def stop_scheduler(state_dir: Path, *, timeout_s: float = 15.0) -> int | None:
    """Stop the luigid started from `state_dir` (by its pidfile). Returns its pid, or None if none ran."""
    pidfile = Path(state_dir) / PIDFILE
    pid = _pid_from(pidfile)
    if pid is None:
        pidfile.unlink(missing_ok=True)
        return None
    # SIGTERM lets luigid save its state file on the way out.
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while _pid_from(pidfile) is not None:
        if time.monotonic() > deadline:
            raise ServiceError(f"luigid (pid {pid}, from {pidfile}) still runs {timeout_s:.0f} s after SIGTERM")
        time.sleep(0.1)
    pidfile.unlink(missing_ok=True)
    return pid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.services", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("start", "stop", "status"))
    parser.add_argument("--state-dir", type=Path, default=Path(".luigid"),
                        help="Folder of luigid's pidfile, logs and saved state (default: .luigid)")
    parser.add_argument("--host", default=LOOPBACK,
                        help="Address to listen on (default: 127.0.0.1). Anything else exposes an "
                             "unauthenticated scheduler to the network")
    parser.add_argument("--port", type=int, default=8082)
    args = parser.parse_args(argv)
    url = f"http://{args.host}:{args.port}"
    try:
        if args.action == "start":
            print(f"Luigi scheduler UI: {start_scheduler(args.state_dir, args.host, args.port)}")
        elif args.action == "stop":
            pid = stop_scheduler(args.state_dir)
            print(f"stopped luigid (pid {pid})" if pid else f"no luigid running from {args.state_dir}")
        else:
            up = is_listening(args.host, args.port)
            print(f"Luigi scheduler {'listening' if up else 'not running'} at {url}")
            return 0 if up else 1
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
