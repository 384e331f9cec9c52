"""A no-op rerun of a completed RunAll: wall time of the whole `luigi` process, and whether it
imported TensorFlow. Baseline: starting Python and importing Luigi's command line, nothing else.
"""
from __future__ import annotations

import configparser
import os
import subprocess
import sys
from pathlib import Path

from common import CACHE, EMBEDDED, REPEATS, REPO, report, timed

# Runs the luigi command in-process, then says whether TensorFlow was imported.
_PROBE = ("import sys, luigi.cmdline\n"
          "try:\n    luigi.cmdline.luigi_run(sys.argv[1:])\n"
          "except SystemExit as done:\n    code = done.code\n"
          "print('tensorflow imported' if 'tensorflow' in sys.modules else 'tensorflow not imported')\n"
          "sys.exit(code)\n")
ARGS = ["--module", "tasks", "RunAll", "--local-scheduler", "--Train-max-steps", "50"]


def main() -> None:
    folder = CACHE / "noop"
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(REPO / "luigi.cfg")
    parser["layout"] = {"data_root": str(folder / "data"), "results_root": str(folder / "results")}
    parser["Download"]["source_url"] = EMBEDDED.as_uri()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "luigi.cfg", "w") as handle:
        parser.write(handle)
    env = {**os.environ, "LUIGI_CONFIG_PATH": str(folder / "luigi.cfg")}
    luigi = str(Path(sys.executable).with_name("luigi"))
    subprocess.run([luigi, *ARGS], cwd=REPO, env=env, check=True, capture_output=True)  # completes the tree

    def rerun() -> None:
        subprocess.run([luigi, *ARGS], cwd=REPO, env=env, check=True, capture_output=True)

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
