"""Lineage: where an output came from, and what was made from it, read from the index and markers.

`find(index, argument)` names the version an argument means: a version id (whole, a prefix of at
least `MIN_PREFIX` hex digits, or `<Stage>/<version>`), or a path to anything within an output (a
predictions.csv, an export folder, a shard, a run folder...): the version whose path is the
longest one holding it. `upstream(index, key)` is that version and everything it was made from,
back to the download; `downstream(index, key)` everything made from it. `describe` reads each
node's marker for what tells it apart (the source's sha256, the shards' checksums, the model
file's sha256, the metrics, the verdict), and the `render_*` functions print them. No TensorFlow:
a marker is read as JSON, a file's checksum computed from its bytes.

This module knows the markers' fields, never the tasks: the index entries say the stage, folder
and marker of each version.
"""
from __future__ import annotations

import json
import re
from typing import Any, Callable, Mapping

from pipeline import storage
from pipeline.download import redact_url
from pipeline.errors import LineageError
from pipeline.runfiles import MODEL_DIR, MODEL_FILE
from pipeline.versioning import version_of

# Fewer hex digits would often name several versions at once.
MIN_PREFIX = 8
_VERSION = re.compile(rf"^(?:(?P<stage>[A-Za-z][A-Za-z0-9_]*)/)?(?P<version>[0-9a-f]{{{MIN_PREFIX},}})$")
# The fields of an evaluation's metrics.json its node shows (the per-class figures and matrix are its report's).
_EVALUATION_FIELDS = ("split", "accuracy", "loss", "examples", "global_step")


def find(index: Mapping[str, dict], argument: str) -> str:
    """The index key of the version `argument` names (see the module's docstring); LineageError
    when none does, or when a version prefix names several."""
    if argument in index:  # a key: found without reading the whole index
        return argument
    named = _VERSION.match(argument)
    if named and not _exists_locally(argument):
        stage, version = named.group("stage"), named.group("version")
        keys = sorted(key for key, entry in index.items() if entry["version"].startswith(version)
                      and (stage is None or entry["stage"] == stage))
        if len(keys) == 1:
            return keys[0]
        if len(keys) > 1:
            raise LineageError(f"{argument}: several versions start with it ({', '.join(keys)}); give more of its "
                               "digits")
    key = _holding(index, argument)
    if key is None:
        found = "no version in the index starts with it" if named else \
            f"no output of the pipeline holds that path ({storage.absolute(argument)})"
        raise LineageError(
            f"{argument}: {found}; expected a version id ({MIN_PREFIX} or more hex digits, or <Stage>/<version>) "
            "or a path within an output the index lists: a predictions.csv, an export folder, a report.html, "
            "a shard, a metrics.json, a run folder")
    return key


def _exists_locally(argument: str) -> bool:
    # A file or folder named like a version in the working folder is what the user means.
    return not storage.is_remote(argument) and (storage.exists(argument) or storage.is_dir(argument))


def _holding(index: Mapping[str, dict], argument: str) -> str | None:
    """The key of the version whose output holds `argument` (the innermost: a report lies within
    its evaluation's folder, which lies within its training's), or None."""
    wanted = storage.absolute(argument)
    parts = set(wanted.split("/"))
    best, best_length = None, -1
    for key, entry in index.items():
        path = entry["path"]
        # Every output's path ends in a name of its own version: only those named on the way are
        # resolved, a cost of a few entries rather than of the whole index.
        if storage.name(path) not in parts and not _beside(entry, wanted):
            continue
        found = storage.absolute(path)
        if (storage.is_inside(wanted, found) or _beside(entry, wanted)) and len(found) > best_length:
            best, best_length = key, len(found)
    return best


def _beside(entry: Mapping[str, Any], wanted: str) -> bool:
    """Whether `wanted` is a file made with an output that is a file among others (a Comparison's
    page beside its CSV): the same name, another extension."""
    path = entry["path"]
    if entry.get("marker") != path:
        return False
    stem = storage.name(path).rpartition(".")[0]
    return storage.name(wanted).rpartition(".")[0] == stem and \
        storage.absolute(storage.parent(path)) == storage.parent(wanted)


def upstream(index: Mapping[str, dict], key: str) -> list[str]:
    """`key` and every version it was made from, each once, every one before those it was made
    from (the download last)."""
    order: list[str] = []
    seen: set[str] = set()

    def visit(current: str) -> None:
        seen.add(current)
        for parent in index.get(current, {}).get("upstream", []):
            if parent not in seen:
                visit(parent)
        order.append(current)

    visit(key)
    return order[::-1]


def children(index: Mapping[str, dict]) -> dict[str, list[str]]:
    """key -> the keys of the versions made directly from it, oldest first."""
    made: dict[str, list[str]] = {}
    for key, entry in sorted(index.items(), key=lambda item: (item[1].get("completed_at", ""), item[0])):
        for parent in entry.get("upstream", []):
            made.setdefault(parent, []).append(key)
    return made


def downstream(index: Mapping[str, dict], key: str) -> list[tuple[int, str]]:
    """Every version made from `key`, directly or not, once each, as (depth, key) in the order of a
    tree: each under the first version it was found made from (depth 1: made from `key` itself)."""
    made = children(index)
    found: list[tuple[int, str]] = []
    seen = {key}

    def visit(current: str, depth: int) -> None:
        for child in made.get(current, []):
            if child not in seen:
                seen.add(child)
                found.append((depth, child))
                visit(child, depth + 1)

    visit(key, 1)
    return found


# What each stage's marker tells of it. Each takes the version's entry and its parsed marker.

def _download(entry: Mapping, marker: Mapping) -> dict:
    return {"source_url": redact_url(str(marker.get("source_url", ""))), "sha256": marker.get("sha256"),
            "kind": marker.get("kind"), "images_per_class": marker.get("images_per_class")}


def _convert(entry: Mapping, marker: Mapping) -> dict:
    splits = marker.get("splits", {})
    return {"shards": [{"split": split, "file": storage.join(entry["path"], shard["file"]),
                        "records": shard.get("records"), "sha256": shard.get("sha256")}
                       for split, facts in splits.items() for shard in facts.get("shards", [])]}


def _train(entry: Mapping, marker: Mapping) -> dict:
    code = entry.get("identity", {}).get("code") or {}
    snapshot = storage.join(entry["path"], MODEL_DIR, MODEL_FILE)
    try:
        model_sha256 = storage.sha256_file(snapshot)
    except FileNotFoundError:
        model_sha256 = None
    return {"code_fingerprint": version_of(code), "code": code, "global_step": marker.get("global_step"),
            "model_file": marker.get("model_file"), "model_file_copy": snapshot, "model_sha256": model_sha256,
            "export_dir": storage.join(entry["path"], marker["export_dir"]) if marker.get("export_dir") else None}


def _evaluate(entry: Mapping, marker: Mapping) -> dict:
    return {field: marker.get(field) for field in _EVALUATION_FIELDS}


def _bless(entry: Mapping, marker: Mapping) -> dict:
    checks = marker.get("checks") or []
    return {"blessed": marker.get("blessed"), "reason": marker.get("reason"), "champion": marker.get("champion"),
            "failing": [check for check in checks if isinstance(check, Mapping) and check.get("result") == "fail"]}


def _run_record(entry: Mapping, marker: Mapping) -> dict:
    return {"result": marker.get("result"), "report": marker.get("report"), "predictions": marker.get("predictions")}


# Stages whose marker is JSON worth reading; any other's marker is looked for, not read (a
# predictions.csv or a report can be large).
_DESCRIBERS: dict[str, Callable[[Mapping, Mapping], dict]] = {
    "Download": _download, "Convert": _convert, "Train": _train, "Evaluate": _evaluate, "Bless": _bless,
    "RunRecord": _run_record}


def _redacted(params: Any) -> Any:
    """Parameters as shown: any URL's user information and query redacted (the index stores a
    source URL redacted already; an older entry, or another stage's parameter, might not)."""
    if isinstance(params, Mapping):
        return {name: _redacted(value) for name, value in params.items()}
    if isinstance(params, list):
        return [_redacted(value) for value in params]
    if isinstance(params, str) and "://" in params:
        return redact_url(params)
    return params


def describe(index: Mapping[str, dict], key: str) -> dict:
    """One version as lineage shows it: its stage, version, folder, marker, parameters and
    upstream, from the index, and `details` from its marker; `problem` says why its marker could
    not be read (missing, not JSON), without failing."""
    entry = index[key]
    identity = entry.get("identity") or {}
    marker = entry.get("marker")
    node = {"key": key, "stage": entry["stage"], "version": entry["version"], "path": entry["path"],
            "marker": marker, "dataset": entry.get("dataset"), "completed_at": entry.get("completed_at"),
            "params": _redacted(identity.get("params", {})), "upstream": list(entry.get("upstream", [])),
            "details": {}, "problem": None}
    describer = _DESCRIBERS.get(entry["stage"])
    try:
        if not marker:
            node["problem"] = "the index names no marker for this version"
        elif describer is None:
            if not storage.exists(marker):
                node["problem"] = f"its marker {marker} is missing"
        else:
            found = storage.read_json(marker)
            if not isinstance(found, Mapping):
                raise ValueError("not a JSON object")
            node["details"] = describer(entry, found)
    except FileNotFoundError:
        node["problem"] = f"its marker {marker} is missing"
    except (ValueError, KeyError, TypeError) as error:
        node["problem"] = f"its marker {marker} is unreadable: {error}"
    return node


def lineage(index: Mapping[str, dict], argument: str, judged: bool = True) -> dict:
    """What `argument` names, and the chain that made it, as JSON-able values. With `judged`, each
    model in the chain also shows its evaluations and their verdicts (`judged`), which are not
    upstream of what it made (its predictions, say) but say how it was judged: that reads the
    whole index."""
    key = find(index, argument)
    chain = upstream(index, key)
    nodes = [describe(index, each) for each in chain if each in index]
    if judged:
        made = children(index)
        for node in (node for node in nodes if node["stage"] == "Train"):
            node["judged"] = [
                {**describe(index, evaluation), "verdicts": [describe(index, verdict)
                                                             for verdict in made.get(evaluation, [])
                                                             if index[verdict]["stage"] == "Bless"]}
                for evaluation in made.get(node["key"], []) if index[evaluation]["stage"] == "Evaluate"
                and evaluation not in chain]
    return {"query": argument, "key": key, "chain": nodes, "missing": [each for each in chain if each not in index]}


def made_from(index: Mapping[str, dict], argument: str) -> dict:
    """What `argument` names, and every version made from it, as JSON-able values."""
    key = find(index, argument)
    return {"query": argument, "key": key,
            "downstream": [{"depth": depth, "key": each, "stage": index[each]["stage"],
                            "version": index[each]["version"], "path": index[each]["path"],
                            "upstream": list(index[each].get("upstream", []))}
                           for depth, each in downstream(index, key)]}


def _shown(value: Any) -> str:
    return json.dumps(value, sort_keys=True) if isinstance(value, (Mapping, list)) else str(value)


def _detail_lines(node: Mapping) -> list[str]:
    details, stage = node["details"], node["stage"]
    if stage == "Download":
        return [f"source: {details['source_url']} ({details['kind']})", f"sha256: {details['sha256']}"]
    if stage == "Convert":
        return [f"shard: {shard['file']}  sha256 {shard['sha256']}  ({shard['records']} records)"
                for shard in details["shards"]]
    if stage == "Train":
        return [f"model file: {details['model_file']}  sha256 {details['model_sha256']} "
                f"(its copy {details['model_file_copy']})",
                f"code fingerprint: {details['code_fingerprint']}", f"final step: {details['global_step']}",
                f"export: {details['export_dir']}"]
    if stage == "Evaluate" and all(isinstance(details.get(field), (int, float)) for field in ("accuracy", "loss")):
        return [f"{details['split']}: accuracy {details['accuracy']:.4f}, loss {details['loss']:.4f} on "
                f"{details['examples']} images at step {details['global_step']}"]
    if stage == "Bless":  # its reason names every check, failed, passed or skipped
        return [f"{'BLESSED' if details['blessed'] is True else 'NOT BLESSED'}: {details['reason']}"]
    return [f"{name}: {_shown(value)}" for name, value in details.items() if value is not None]


def render_lineage(found: Mapping) -> str:
    """The chain of `lineage()` as console text: each version, then what tells it apart."""
    lines = [f"{found['query']} is {found['key']}, made from:" if len(found["chain"]) > 1
             else f"{found['query']} is {found['key']}:"]
    for node in found["chain"]:
        lines.append(f"{node['stage']} {node['version']}  {node['path']}")
        if node["params"]:
            lines.append(f"    params: {_shown(node['params'])}")
        if node["problem"]:
            lines.append(f"    ({node['problem']})")
        else:
            lines.extend(f"    {line}" for line in _detail_lines(node))
        for evaluation in node.get("judged", []):
            lines.append(f"    evaluated: {evaluation['key']}  {evaluation['path']}")
            # Each verdict named: the same evaluation may be checked against several thresholds.
            lines.extend(f"        {prefix}{line}" for verdict, prefix in ((evaluation, ""), *(
                (verdict, f"{verdict['key']}: ") for verdict in evaluation["verdicts"]))
                for line in (_detail_lines(verdict) if not verdict["problem"] else [verdict["problem"]]))
        if node["upstream"]:
            lines.append(f"    made from: {', '.join(node['upstream'])}")
    lines.extend(f"{key}: not in the index" for key in found["missing"])
    return "\n".join(lines)


def render_downstream(found: Mapping) -> str:
    """The versions of `made_from()` as a console tree, each under the version it was made from."""
    made = found["downstream"]
    lines = [f"{found['query']} is {found['key']}; {len(made)} version(s) made from it:"]
    lines.extend(f"{'    ' * node['depth']}{node['stage']} {node['version']}  {node['path']}" for node in made)
    return "\n".join(lines)
