"""Versions, and the code they include.

A version is a short hash of an identity: whatever the result depends on (parameters, the
versions of what was read, the source of the code that ran, a model file). The same identity
always gives the same version, and any change gives a new one, so nothing is overwritten and
an unchanged stage is found complete. What an identity holds, and where a version's folder
lies, is the caller's to say; this module knows no stage. Completed versions are listed in the
index (see `pipeline.index`).
"""
from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import json
import re
from pathlib import Path
from typing import Any, Mapping

from pipeline.errors import ConfigError

VERSION_LENGTH = 12
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_PACKAGE = "pipeline"


def safe_name(key: str, value: Any) -> str:
    """`value` as a folder name; ConfigError unless it is a plain name."""
    value = str(value)
    if not _SAFE_NAME.match(value):
        raise ConfigError(f"{key}={value!r} must be a plain name of letters, digits, '_', '.' or '-' "
                          "(it becomes a folder name)")
    return value


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def version_of(identity: Mapping[str, Any]) -> str:
    """The version of an identity: the same mapping (whatever its key order) gives the same one."""
    return hashlib.sha256(canonical_json(identity).encode()).hexdigest()[:VERSION_LENGTH]


def _module_file(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise ConfigError(f"no module {name!r} to fingerprint")
    return Path(spec.origin)


def _imported(name: str) -> set[str]:
    """The modules of this package that module `name` imports, read from its source."""
    tree = ast.parse(_module_file(name).read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from pipeline import convert` names a module; `from pipeline.convert import x` does not.
            if node.module == _PACKAGE:
                found.update(f"{_PACKAGE}.{alias.name}" for alias in node.names)
    return {module for module in found if module.startswith(f"{_PACKAGE}.")}


@functools.lru_cache(maxsize=None)
def code_fingerprint(module: str) -> str:
    """sha256 of the source of `module` and of every module of this package it imports, directly or
    not: the library code a stage runs. Read from the sources, so TensorFlow is not imported."""
    seen, pending = set(), [module]
    while pending:
        name = pending.pop()
        if name not in seen:
            seen.add(name)
            pending.extend(_imported(name))
    digest = hashlib.sha256()
    for name in sorted(seen):
        digest.update(f"{name}\n".encode())
        digest.update(_module_file(name).read_bytes())
    return digest.hexdigest()
