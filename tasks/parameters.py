"""Parameter types of the pipeline's tasks: model params, a sweep's grid, and upstream tasks."""
from __future__ import annotations

import json
from collections.abc import Mapping

import luigi
from luigi.parameter import ParameterVisibility
from luigi.task_register import Register

from pipeline.errors import ConfigError

# Parses parameters: the parsed values are in each stage's identity, so how they are parsed
# cannot change a result without changing the version (see pipeline.fingerprint).
AFFECTS_RESULTS = False


class ParamsParameter(luigi.DictParameter):
    """A JSON object on the command line; anything else is refused with the value and an example."""

    def parse(self, source):
        try:
            value = super().parse(source)
        except ValueError as error:
            raise ConfigError(f"--params {source!r} is not valid JSON ({error}); expected a JSON object "
                              """such as '{"learning_rate": 0.0005}'""") from None
        if not isinstance(value, Mapping):
            raise ConfigError(f"--params {source!r} is a JSON {type(value).__name__}; expected a JSON object "
                              "of the model's PARAMS keys")
        return value


class GridParameter(ParamsParameter):
    """A JSON object of lists: each key a model param, each list the values a sweep tries."""

    def parse(self, source):
        grid = super().parse(source)
        bad = sorted(key for key, values in grid.items() if not isinstance(values, (list, tuple)) or not values)
        if bad:
            raise ConfigError(f"--grid {source!r}: {', '.join(bad)} must map to a non-empty list of values, as in "
                              """'{"learning_rate": [0.001, 0.003]}'""")
        return grid


class UpstreamParameter(luigi.Parameter):
    """An upstream task, as an instance: the same downstream class can sit on any upstream, and a
    sweep builds its variants in plain Python (`Train(convert=convert, params=p)`), as gokart's
    TaskInstanceParameter allows. Left out, it is the task its own section of luigi.cfg describes
    (`PipelineTask.default_upstream`).

    It is written as one JSON object of the task's family and parameters, its own upstream tasks
    nested in it as objects (never as JSON strings inside strings), so that a task can be rebuilt
    from its parameters (Luigi does that for dynamic dependencies) as the same task: the
    insignificant parameters too, which a version may still read (Train's checkpoint spacing,
    under early stopping) and which say how it runs (`rerun`, batch sizes). That JSON holds hidden
    parameters too (a Download's source_url), so it is hidden from the scheduler's task list
    itself, which shows the upstream as Family@version instead (see `PipelineTask.to_str_params`).
    """

    def __init__(self, task_class: type | None = None, **kwargs):
        super().__init__(default=None, visibility=ParameterVisibility.HIDDEN, **kwargs)
        # The task built when none is given; None where the task derives it (see default_upstream).
        self.task_class = task_class

    def parse(self, source):
        if not source:
            return None
        try:
            described = json.loads(source)
            task_class = Register.get_task_cls(described["family"])
            # Nested objects (upstream tasks, dicts and lists) back to the strings Luigi parses.
            return task_class.from_str_params({name: value if isinstance(value, str) else json.dumps(value)
                                               for name, value in described["params"].items()})
        except (ValueError, KeyError, TypeError, AttributeError, luigi.task_register.TaskClassException) as error:
            raise ConfigError(f"upstream task {source!r} is not a task's JSON ({error}); expected "
                              """'{"family": "Convert", "params": {...}}', or leave it out""") from None

    def serialize(self, task):
        if task is None:
            return ""
        return json.dumps(described(task), sort_keys=True)


# Parameters whose serialized value is JSON: nested as JSON values in an upstream task's description.
_JSON_PARAMETERS = (UpstreamParameter, luigi.DictParameter, luigi.ListParameter, luigi.TupleParameter)


def described(task: luigi.Task) -> dict:
    """A task's family and parameters as one JSON value, upstream tasks nested: all that Luigi
    sends of a task, as `Task.to_str_params` does (private parameters are never sent)."""
    params = {}
    for name, param in task.get_params():
        if param.visibility != ParameterVisibility.PRIVATE:
            value = param.serialize(getattr(task, name))
            params[name] = json.loads(value) if isinstance(param, _JSON_PARAMETERS) and value else value
    return {"family": task.get_task_family(), "params": params}
