"""Parameter types of the pipeline's tasks: model params, a sweep's grid, and upstream tasks."""
from __future__ import annotations

import json
import secrets
from collections.abc import Mapping

import luigi
from luigi.parameter import ParameterVisibility
from luigi.task_register import Register

from pipeline.blessing import EXAMPLE as THRESHOLDS_EXAMPLE, check_thresholds
from pipeline.errors import ConfigError

# Parses parameters: the parsed values are in each stage's identity, so how they are parsed
# cannot change a result without changing the version (see pipeline.fingerprint).
AFFECTS_RESULTS = False


def _parsed(parse, source: str, name: str, example: str):
    """`source` parsed by `parse` (a DictParameter's), or ConfigError naming it and an example."""
    try:
        return parse(source)
    except ValueError as error:
        raise ConfigError(f"{name} {source!r} is not valid JSON ({error}); expected a JSON object such as "
                          f"{example}") from None


class ParamsParameter(luigi.DictParameter):
    """A JSON object on the command line; anything else is refused with the value and an example."""

    def parse(self, source):
        value = _parsed(super().parse, source, "--params", """'{"learning_rate": 0.0005}'""")
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


class ThresholdsParameter(luigi.DictParameter):
    """Bless's thresholds: a JSON object of metric to bounds, checked as it is parsed (see pipeline.blessing)."""

    def parse(self, source):
        value = _parsed(super().parse, source, "thresholds", THRESHOLDS_EXAMPLE)
        check_thresholds(value)
        return value


class UpstreamParameter(luigi.Parameter):
    """An upstream task, as an instance: the same downstream class can sit on any upstream, and a
    sweep builds its variants in plain Python (`Train(convert=convert, params=p)`), as gokart's
    TaskInstanceParameter allows. Left out, it is the task its own section of luigi.cfg describes
    (`PipelineTask.default_upstream`).

    It is written as one JSON object of the task's family and parameters, its own upstream tasks
    nested in it as objects (never as JSON strings inside strings), so that a task can be rebuilt
    from its parameters (Luigi does that for dynamic dependencies) as the same task: the
    insignificant parameters too, which a version may still read (Train's checkpoint spacing,
    under early stopping) and which say how it runs (`rerun`, batch sizes). It is hidden from the
    scheduler's task list, which shows the upstream as Family@version instead (see
    `PipelineTask.to_str_params`).

    Private parameters are left out of it, as Luigi leaves them out of what it sends, and stand
    as a token instead (see `described`).
    """

    def __init__(self, task_class: type | None = None, **kwargs):
        super().__init__(default=None, visibility=ParameterVisibility.HIDDEN, **kwargs)
        # The task built when none is given; None where the task derives it (see default_upstream).
        self.task_class = task_class

    def parse(self, source):
        if not source:
            return None
        try:
            data = json.loads(source)
            task_class = Register.get_task_cls(data["family"])
            # Nested objects (upstream tasks, dicts and lists) back to the strings Luigi parses.
            params = {name: value if isinstance(value, str) else json.dumps(value)
                      for name, value in data["params"].items()}
            task = task_class.from_str_params({**params, **_kept.get(params.get(PRIVATE_KEY), {})})
        except (ValueError, KeyError, TypeError, AttributeError, luigi.task_register.TaskClassException) as error:
            raise ConfigError(f"upstream task {source!r} is not a task's JSON ({error}); expected "
                              """'{"family": "Convert", "params": {...}}', or leave it out""") from None
        # Rebuilt where its private parameters are not known (another process), a task takes
        # them from luigi.cfg: a Download of another URL would make other data under this name.
        if "version" in data and getattr(task, "version", data["version"]) != data["version"]:
            raise ConfigError(
                f"{data['family']}@{data['version']} was rebuilt here as {data['family']}@{task.version}: its "
                f"private parameters ({', '.join(_private_names(task_class)) or 'none'}) are known only to "
                "the process that scheduled it, and luigi.cfg or the command line here give other values; "
                f"pass the same ones (e.g. --{data['family']}-source-url)")
        return task

    def serialize(self, task):
        if task is None:
            return ""
        return json.dumps(described(task), sort_keys=True)


# Parameters whose serialized value is JSON: nested as JSON values in an upstream task's description.
_JSON_PARAMETERS = (UpstreamParameter, luigi.DictParameter, luigi.ListParameter, luigi.TupleParameter)


# The key, in a task's JSON as an upstream task, of the token that stands for its private parameters.
PRIVATE_KEY = "private_token"
# Private parameters' values (serialized) by their token, and the token of each set of values.
_kept: dict[str, dict[str, str]] = {}
_tokens: dict[str, str] = {}


def described(task: luigi.Task) -> dict:
    """A task's family and parameters as one JSON value, upstream tasks nested, its private
    parameters as a token.

    A private parameter (a Download's source_url, which may hold a password or a presigned
    query) is never sent to Luigi's scheduler, which keeps every parameter it is sent in its
    state file and shows them all in a failed task's "Command to re-run". The token, random so
    that it tells nothing of them, is turned back into their values by `UpstreamParameter.parse`
    in this process, where Luigi rebuilds the tasks a task yields (a forked worker only sends
    them back). Elsewhere (a re-run command pasted, `luigi --assistant`) they come from luigi.cfg
    or the command line, as for a task named by itself; the task's version, which it carries,
    makes a rebuild with other values fail, naming them, instead of making other data."""
    params, private = {}, {}
    for name, param in task.get_params():
        value = param.serialize(getattr(task, name))
        if param.visibility == ParameterVisibility.PRIVATE:
            private[name] = value
        else:
            params[name] = json.loads(value) if isinstance(param, _JSON_PARAMETERS) and value else value
    if private:
        token = _tokens.setdefault(json.dumps(private, sort_keys=True), secrets.token_hex(8))
        _kept[token] = private
        params[PRIVATE_KEY] = token
    version = getattr(task, "version", None)
    return {"family": task.get_task_family(), "params": params, **({"version": version} if version else {})}


def _private_names(task_class: type) -> list[str]:
    return [name for name, param in task_class.get_params() if param.visibility == ParameterVisibility.PRIVATE]
