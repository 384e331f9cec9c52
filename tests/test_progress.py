"""Progress bars appear on a terminal and nowhere else."""
import fcntl
import os
import pty
import struct
import subprocess
import termios
from pathlib import Path

from tests.conftest import luigi_argv, luigi_command, luigi_env, tiny_config, write_config


def run_on_terminal(command: list[str], cwd: Path, env: dict, timeout_s: float = 120) -> tuple[int, str]:
    """Run `command` with a pseudo-terminal as its stdin, stdout and stderr; return its exit code and output."""
    main, secondary = pty.openpty()
    # A new pseudo-terminal is 0 columns wide, and a bar that fits in no columns draws nothing.
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    process = subprocess.Popen(command, stdin=secondary, stdout=secondary, stderr=secondary, cwd=cwd, env=env)
    os.close(secondary)
    output = bytearray()
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # EIO: the child closed its side of the terminal
            break
        if not chunk:
            break
        output += chunk
    os.close(main)
    return process.wait(timeout=timeout_s), output.decode("utf-8", "replace")


def test_download_draws_a_bar_on_a_terminal_but_not_into_a_log(mnist_subset, tmp_path):
    config = write_config(tmp_path / "luigi.cfg", tiny_config(tmp_path, mnist_subset.as_uri()))

    logged = luigi_command(tmp_path, config, "Download", "--Download-dataset", "logged")
    assert logged.returncode == 0, logged.stderr[-2000:]
    assert "%|" not in logged.stderr and "\r" not in logged.stderr

    code, output = run_on_terminal(luigi_argv("Download", "--Download-dataset", "terminal", "--local-scheduler"),
                                   tmp_path, luigi_env(config))
    assert code == 0, output[-2000:]
    assert "Download:" in output and "%|" in output and "bytes" in output
