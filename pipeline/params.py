"""A model's params as its model_fn reads them, and as the pipeline records them.

Model files written from the Estimator write-ups put TensorFlow functions in PARAMS
(`"activation": tf.nn.relu`, `"regularizer": tf.nn.l2_loss`) and read params both as a dict and
by attribute (`params.learning_rate`). In JSON (params.json, `--params`, the index) such a
function is its public name, a string such as "tf.nn.relu"; `to_json` names them and
`from_json` turns the names back into the functions. Anything else that JSON cannot hold (a
lambda, a function of the model file's own) cannot be recorded, so it is refused, naming its key.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import re
from typing import Any

from pipeline.errors import ConfigError

# "tf." and a dotted path of identifiers: how a TensorFlow function is written in JSON.
_TENSORFLOW_NAME = re.compile(r"tf(\.[A-Za-z_][A-Za-z0-9_]*)+")
# Where a function without an export name of its own is looked for, in this order.
_NAMESPACES = ("nn", "math", "", "keras.activations", "keras.initializers", "keras.regularizers",
               "keras.losses", "initializers", "compat.v1.layers", "compat.v1.nn", "compat.v1.initializers",
               "compat.v1.losses", "compat.v1.train", "keras.optimizers", "image")


class Params(dict):
    """A dict whose keys also read as attributes: `params["learning_rate"]` is `params.learning_rate`."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"params has no {name!r}; its keys are {', '.join(sorted(self))}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value


def as_params(value: Any) -> Any:
    """`value` with every dict in it, nested ones too, made a `Params`."""
    if isinstance(value, dict):
        return Params({key: as_params(item) for key, item in value.items()})
    if type(value) in (list, tuple):  # not a namedtuple such as a feature column
        return type(value)(as_params(item) for item in value)
    return value


def _tensorflow():
    return importlib.import_module("tensorflow")


def resolve_name(name: str, where: str = "params") -> Any:
    """The TensorFlow object a "tf.<path>" name stands for; ConfigError, naming `where`, when there is none."""
    target: Any = _tensorflow()
    for part in name.split(".")[1:]:
        target = getattr(target, part, None)
        if target is None:
            break
    if not callable(target):
        raise ConfigError(f"{where} is {name!r}, which names no TensorFlow function or class; expected a public "
                          "name such as 'tf.nn.relu' or 'tf.keras.initializers.GlorotUniform'")
    return target


def tensorflow_name(function: Any) -> str | None:
    """The public name ("tf.nn.relu") of a TensorFlow function or class, or None if it has none:
    its export name where TensorFlow or Keras records one, else where it sits in a namespace
    users take such functions from (`tf.nn.softmax` records none)."""
    exported = [*(getattr(function, "_tf_api_names", None) or ()), *(getattr(function, "_keras_api_names", None) or ())]
    for name in [f"tf.{name}" for name in exported] + _namespace_names().get(id(function), []):
        try:
            if resolve_name(name) is function:
                return name
        except ConfigError:
            continue
    return None


@functools.lru_cache(maxsize=1)
def _namespace_names() -> dict[int, list[str]]:
    """id of every public function and class in `_NAMESPACES` -> its names there, first namespace first."""
    tf = _tensorflow()
    names: dict[int, list[str]] = {}
    for namespace in _NAMESPACES:
        holder = tf
        for part in filter(None, namespace.split(".")):
            holder = getattr(holder, part)
        for attribute in dir(holder):
            value = getattr(holder, attribute, None)
            if not attribute.startswith("_") and callable(value) and not inspect.ismodule(value):
                names.setdefault(id(value), []).append(".".join(filter(None, ("tf", namespace, attribute))))
    return names


def to_json(value: Any, where: str = "params") -> Any:
    """`value` as JSON values, TensorFlow functions and classes by name; ConfigError, naming the
    key, for anything else JSON cannot hold."""
    if isinstance(value, dict):
        return {str(key): to_json(item, f"{where}[{key!r}]") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(item, f"{where}[{index}]") for index, item in enumerate(value)]
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    name = tensorflow_name(value) if callable(value) else None
    if name is None:
        raise ConfigError(f"{where} is {value!r}, which cannot be recorded in params.json: expected a JSON value "
                          "or a TensorFlow function or class by its public name (tf.nn.relu), not a lambda or "
                          "a function of the model file's own")
    return name


def from_json(value: Any, where: str = "params") -> Any:
    """`value` read from JSON, with every "tf.<path>" string turned into what it names."""
    if isinstance(value, dict):
        return {key: from_json(item, f"{where}[{key!r}]") for key, item in value.items()}
    if isinstance(value, list):
        return [from_json(item, f"{where}[{index}]") for index, item in enumerate(value)]
    if isinstance(value, str) and _TENSORFLOW_NAME.fullmatch(value):
        return resolve_name(value, where)
    return value
