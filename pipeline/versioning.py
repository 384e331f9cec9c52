"""Versions.

A version is a short hash of an identity: whatever the result depends on (parameters, the
versions of what was read, the code that ran (see pipeline.fingerprint), a model file). The same identity
always gives the same version, and any change gives a new one, so nothing is overwritten and
an unchanged stage is found complete. What an identity holds, and where a version's folder
lies, is the caller's to say; this module knows no stage. Completed versions are listed in the
index (see `pipeline.index`).
"""
from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Mapping

from pipeline.errors import ConfigError

VERSION_LENGTH = 12
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


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
