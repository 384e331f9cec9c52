"""Model files: find them, load them, check their contract, and merge their params.

A model file is a standalone Python module exposing `model_fn(features, labels, mode, params)`
(it may also take `config`) and `PARAMS`, a dict of every hyperparameter with its default.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any, Mapping

from pipeline.errors import ConfigError, ModelDefinitionError

MODEL_DEFS_DIR = Path(__file__).resolve().parent.parent / "model_defs"
# Params the pipeline fills in from the dataset; a user cannot set them through --params.
DATASET_PARAMS = ("n_classes",)


def available_models(model_defs_dir: Path = MODEL_DEFS_DIR) -> list[str]:
    return sorted(p.stem for p in Path(model_defs_dir).glob("*.py") if not p.name.startswith("_"))


def resolve_model_file(model_def: str, model_defs_dir: Path = MODEL_DEFS_DIR) -> Path:
    """A model name in `model_defs/` (e.g. 'cnn'), or a path to a model file ending in .py."""
    candidate = Path(model_def) if model_def.endswith(".py") else Path(model_defs_dir) / f"{model_def}.py"
    if not candidate.is_file():
        raise ModelDefinitionError(f"model_def={model_def!r}: no file {candidate}; expected one of "
                                   f"{', '.join(available_models(model_defs_dir))} or a path to a .py model file")
    return candidate.resolve()


def load_model_module(model_file: Path) -> ModuleType:
    model_file = Path(model_file)
    module_name = f"model_def_{model_file.stem}_{hashlib.sha256(model_file.read_bytes()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(module_name, model_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "model_fn", None)):
        raise ModelDefinitionError(f"{model_file}: defines no model_fn(features, labels, mode, params)")
    if not isinstance(getattr(module, "PARAMS", None), dict):
        raise ModelDefinitionError(f"{model_file}: defines no PARAMS dict of default hyperparameters")
    return module


def merge_params(model_file: Path, defaults: Mapping[str, Any], overrides: Mapping[str, Any],
                 dataset_values: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """PARAMS with `overrides` laid over them, then the values that come from the dataset."""
    overrides = json.loads(json.dumps(overrides))
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ConfigError(f"--params names {unknown}, unknown to {Path(model_file).name}; its params are "
                          f"{', '.join(sorted(k for k in defaults if k not in DATASET_PARAMS))}")
    fixed = sorted(set(overrides) & set(DATASET_PARAMS))
    if fixed:
        raise ConfigError(f"--params sets {fixed}, which the pipeline takes from the dataset; remove them")
    return {**defaults, **overrides, **(dataset_values or {})}
