"""Luigi tasks of the pipeline: `luigi --module tasks RunAll`, or `Sweep` for a grid of runs."""
import luigi.interface

# Sets up the console and gathers the tasks: nothing a stage computes (see pipeline.fingerprint).
AFFECTS_RESULTS = False

# This package is where every command starts (Luigi imports it for `--module tasks`, and each
# `python -m tasks.<command>` imports it first): its console is set up here, before anything
# loads TensorFlow.
from tasks import console

console.set_up()
from tasks.config import layout, tensorboard
from tasks.runs import Comparison, RunAll, RunRecord, Sweep
from tasks.base import PipelineTask, Stage, Step
from tasks.stages import Bless, ConvertShard, Convert, Download, Evaluate, PlanConversion, Predict, Report, Train

# luigi.cfg's [core] RPC settings are read by luigi.rpc, and the scheduler address through
# config_path aliases, not under these names by the `core` config class, which would otherwise
# warn on every run that they are unused.
luigi.interface.core.ignore_unconsumed = {"rpc_connect_timeout", "rpc_retry_attempts", "rpc_retry_wait",
                                          "default_scheduler_host", "default_scheduler_port"}

__all__ = ["console", "PipelineTask", "Step", "Stage", "layout", "tensorboard", "Download", "PlanConversion", "ConvertShard",
           "Convert", "Train", "Evaluate", "Predict", "Report", "Bless", "RunAll", "RunRecord", "Sweep", "Comparison"]
