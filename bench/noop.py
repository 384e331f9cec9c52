"""A no-op rerun of a completed RunAll: wall time of the whole `luigi` process, and whether it
imported TensorFlow. Baseline: starting Python and importing Luigi's command line, nothing else.
"""
from __future__ import annotations

import subprocess
import sys

from common import CACHE, EMBEDDED, LUIGI, REPEATS, REPO, bench_config, luigi_env, report, timed

# Runs the luigi command in-process, then says whether TensorFlow was imported.
_PROBE = ("import sys, luigi.cmdline\n"
          "try:\n    luigi.cmdline.luigi_run(sys.argv[1:])\n"
          "except SystemExit as done:\n    code = done.code\n"
          "print('tensorflow imported' if 'tensorflow' in sys.modules else 'tensorflow not imported')\n"
          "sys.exit(code)\n")
ARGS = ["--module", "tasks", "RunAll", "--local-scheduler", "--Train-max-steps", "50"]


def main() -> None:
    env = luigi_env(bench_config(CACHE / "noop", EMBEDDED.as_uri()))
    subprocess.run([LUIGI, *ARGS], cwd=REPO, env=env, check=True, capture_output=True)  # completes the tree

    def rerun() -> None:
        subprocess.run([LUIGI, *ARGS], cwd=REPO, env=env, check=True, capture_output=True)

    def bare() -> None:
        subprocess.run([sys.executable, "-c", "import luigi.cmdline"], check=True)

    noop, baseline = [], []
    for _ in range(max(REPEATS, 5)):
        noop.append(timed(rerun))
        baseline.append(timed(bare))
    probe = subprocess.run([sys.executable, "-c", _PROBE, *ARGS], cwd=REPO, env=env, capture_output=True,
                           text=True, check=True)
    report("no-op RunAll rerun, wall seconds vs Python + import luigi", noop, baseline, "s",
           "none; the target is <= 1.5 s absolute")
    print(f"no-op RunAll rerun: {min(noop):.2f}-{max(noop):.2f} s wall (target <= 1.5 s); "
          f"{probe.stdout.strip()} (target: not imported)")


if __name__ == "__main__":
    main()
