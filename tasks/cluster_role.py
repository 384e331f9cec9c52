"""One role of a training cluster that a cluster manager started: a worker, a parameter server or
an evaluator, as the `TF_CONFIG` in its environment says.

    python -m tasks.cluster_role Train --distribute tf_config [the chief's other Train parameters]

The chief is the `luigi` command itself, with the same parameters (`--Train-distribute tf_config`
under RunAll): it writes the model's snapshot, trains, then exports and writes train.json. A role
started here finds the same run from the same parameters and luigi.cfg, waits for the chief's
snapshot (and, with a parameter server, its first checkpoint), then runs. Workers and the evaluator
exit once training reaches max_steps; a parameter server runs until it is stopped.
"""
from __future__ import annotations

import logging
import os
import sys
import traceback

import luigi
from luigi.cmdline_parser import CmdlineParser
from luigi.task_register import TaskClassException

from pipeline import cluster
from pipeline.errors import ConfigError, PipelineError
from tasks.stages import Train


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    try:
        role = cluster.role_from_env()
        if role.type == "chief":
            raise ConfigError("TF_CONFIG names the chief: run the luigi command as the chief, with "
                              "--Train-distribute tf_config")
        with CmdlineParser.global_instance(argv) as parser:
            train = parser.get_task_obj()
        if not isinstance(train, Train) or train.distribute != "tf_config":
            raise ConfigError(f"{train}: expected Train with --distribute tf_config, as the chief has")
        arguments = train.role_arguments()
    except (PipelineError, ValueError, luigi.parameter.ParameterException, TaskClassException) as error:
        print(f"error: {error}", file=sys.stderr)
        return 40
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    import tensorflow as tf

    tf.get_logger().setLevel(logging.INFO)
    cluster.wait_for_chief(arguments["model_dir"], arguments["strategy"], role.type)
    cluster.run_role(**arguments)
    return 0


if __name__ == "__main__":
    # Left through os._exit: a process that used tensorflow-io's S3 plugin aborts in a normal exit.
    try:
        code = main(sys.argv[1:])
    except Exception:  # the role's own failure: its traceback, then a non-zero exit
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
