"""Model files: find them, load them, check their contract, and merge their params.

A model file is a standalone Python module exposing `model_fn(features, labels, mode, params)`
(it may also take `config`; a file whose one such function has another name, as the tutorials'
`my_model`, works too) and `PARAMS`, a dict of every hyperparameter with its default.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.util
import inspect
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Mapping

from pipeline import storage
from pipeline.errors import ConfigError, ModelDefinitionError

MODEL_DEFS_DIR = Path(__file__).resolve().parent.parent / "model_defs"
# Params the pipeline fills in from the dataset; a user cannot set them through --params.
# "feature_columns" (only where PARAMS has it) is the image as one numeric column, as the
# custom-Estimator tutorial builds its feature columns from the training data.
DATASET_PARAMS = ("n_classes", "feature_columns")
_MODEL_FN_ARGUMENTS = ["features", "labels", "mode"]
# RunConfig settings a run takes, beside max_steps and batch_size.
RUN_CONFIG_KEYS = ("tf_random_seed", "save_summary_steps", "save_checkpoints_steps", "keep_checkpoint_max",
                   "log_step_count_steps")


def available_models(model_defs_dir: Path = MODEL_DEFS_DIR) -> list[str]:
    return sorted(p.stem for p in Path(model_defs_dir).glob("*.py") if not p.name.startswith("_"))


def resolve_model_file(model_def: str, model_defs_dir: Path = MODEL_DEFS_DIR) -> Path:
    """A model name in `model_defs/` (e.g. 'cnn'), or a path to a model file ending in .py."""
    candidate = Path(model_def) if model_def.endswith(".py") else Path(model_defs_dir) / f"{model_def}.py"
    if not candidate.is_file():
        raise ModelDefinitionError(f"model_def={model_def!r}: no file {candidate}; expected one of "
                                   f"{', '.join(available_models(model_defs_dir))} or a path to a .py model file")
    return candidate.resolve()


@dataclass(frozen=True)
class ModelFile:
    """A loaded model file: where it is, its model_fn, and its PARAMS (the defaults)."""
    path: Path | str
    model_fn: Callable
    defaults: dict


def load_model(model_file: Path | str) -> ModelFile:
    """Import a model file, local or (a run's snapshot) on S3."""
    source = storage.read_bytes(model_file)
    module_name = f"model_def_{Path(storage.name(model_file)).stem}_{hashlib.sha256(source).hexdigest()[:8]}"
    local = model_file
    if storage.is_remote(model_file):
        # Imported from a local copy: tracebacks and AutoGraph read a function's source from its file.
        local = Path(tempfile.gettempdir()) / f"{module_name}.py"
        storage.write_bytes(local, source)
    spec = importlib.util.spec_from_file_location(module_name, local)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not isinstance(getattr(module, "PARAMS", None), dict):
        raise ModelDefinitionError(f"{model_file}: defines no PARAMS dict of default hyperparameters")
    return ModelFile(model_file, _model_fn(module, model_file), module.PARAMS)


def _model_fn(module: ModuleType, model_file: Path) -> Callable:
    """`model_fn`, or else the file's one function taking (features, labels, mode, ...)."""
    if callable(getattr(module, "model_fn", None)):
        return module.model_fn
    candidates = {name: value for name, value in vars(module).items()
                  if inspect.isfunction(value) and value.__module__ == module.__name__
                  and list(inspect.signature(value).parameters)[:3] == _MODEL_FN_ARGUMENTS}
    if len(candidates) == 1:
        return next(iter(candidates.values()))
    found = f"; it has {', '.join(sorted(candidates))}: name the one to use model_fn" if candidates else ""
    raise ModelDefinitionError(f"{model_file}: defines no model_fn(features, labels, mode, params){found}")


def declared_param_keys(model_file: Path) -> set[str] | None:
    """The keys of a model file's `PARAMS = {...}` literal, read without importing the file (and
    so without TensorFlow); None when PARAMS is not written as a literal dict.

    A lambda anywhere in it is refused now, naming its key: params are recorded in JSON, where a
    TensorFlow function is its name, and a lambda has none."""
    tree = ast.parse(Path(model_file).read_text(encoding="utf-8"), filename=str(model_file))
    for node in tree.body:
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)
                and any(isinstance(target, ast.Name) and target.id == "PARAMS" for target in node.targets)
                and all(isinstance(key, ast.Constant) and isinstance(key.value, str) for key in node.value.keys)):
            _refuse_lambdas(node.value, "PARAMS", Path(model_file))
            return {key.value for key in node.value.keys}
    return None


def _refuse_lambdas(node: ast.AST, where: str, model_file: Path) -> None:
    if isinstance(node, ast.Lambda):
        raise ConfigError(f"{model_file.name}: {where} is a lambda, which cannot be recorded in params.json; "
                          "use a TensorFlow function (tf.nn.relu) or a JSON value")
    if isinstance(node, ast.Dict):
        for key, value in zip(node.keys, node.values):
            label = repr(key.value) if isinstance(key, ast.Constant) else "..."
            _refuse_lambdas(value, f"{where}[{label}]", model_file)
    elif isinstance(node, (ast.List, ast.Tuple)):
        for index, item in enumerate(node.elts):
            _refuse_lambdas(item, f"{where}[{index}]", model_file)


def check_param_overrides(model_file: Path, known: set[str] | Mapping[str, Any], overrides: Mapping[str, Any]) -> None:
    """Refuse --params keys the model does not declare, and those taken from the dataset."""
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ConfigError(f"--params names {unknown}, unknown to {Path(model_file).name}; its params are "
                          f"{', '.join(sorted(k for k in known if k not in DATASET_PARAMS))}")
    fixed = sorted(set(overrides) & set(DATASET_PARAMS))
    if fixed:
        raise ConfigError(f"--params sets {fixed}, which the pipeline takes from the dataset; remove them")


def merge_params(model_file: Path, defaults: Mapping[str, Any], overrides: Mapping[str, Any],
                 dataset_values: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """PARAMS with `overrides` laid over them, then the values that come from the dataset."""
    overrides = json.loads(json.dumps(overrides))
    check_param_overrides(model_file, defaults, overrides)
    return {**defaults, **overrides, **(dataset_values or {})}


def require_positive(name: str, value: int) -> None:
    if value <= 0:
        raise ConfigError(f"{name}={value}; expected a positive integer")


def validate_training_settings(max_steps: int, batch_size: int, run_config: Mapping[str, Any]) -> None:
    for name, value in (("max_steps", max_steps), ("batch_size", batch_size),
                        *((key, run_config[key]) for key in RUN_CONFIG_KEYS if key != "tf_random_seed")):
        require_positive(name, value)
