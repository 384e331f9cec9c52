"""Luigi tasks of the pipeline: `luigi --module tasks RunAll`."""
import luigi.interface

from tasks.base import Rerunnable, Stage, layout
from tasks.stages import ConvertShard, Convert, Download, Evaluate, PlanConversion, Predict, RunAll, Train

# luigi.cfg's [core] RPC settings are read by luigi.rpc, not by the `core` config class, which
# would otherwise warn on every run that they are unused.
luigi.interface.core.ignore_unconsumed = {"rpc_connect_timeout", "rpc_retry_attempts", "rpc_retry_wait"}

__all__ = ["Rerunnable", "Stage", "layout", "Download", "PlanConversion", "ConvertShard", "Convert", "Train",
           "Evaluate", "Predict", "RunAll"]
