"""Why will it run? `python -m tasks.explain <Task> [the same parameters as luigi]`

Prints every task of that task's DAG as done or to run, and for each one to run, why: no output
yet; which significant parameter differs from the closest completed version of that stage in
the index (old and new value); the model file (or input folder) changed; which parts
of the code it runs changed, were added or removed (`module.function`, see pipeline.fingerprint);
an upstream stage will run. Nothing is run and TensorFlow is not imported; a damaged
index is rebuilt, and a done stage the index lacks is indexed, as a run would.
"""
from __future__ import annotations

import json
import sys
from typing import Any

import luigi
from luigi.cmdline_parser import CmdlineParser
from luigi.task_register import TaskClassException

from pipeline.errors import PipelineError
from tasks.runs import Gathering, whole_dag
from tasks.base import Stage, load_index

# Says what would run and why; it runs and writes nothing (see pipeline.fingerprint).
AFFECTS_RESULTS = False

# What a stage's `content` is, where it has one.
_CONTENT = {"Train": "the model file", "Predict": "the input folder's images"}


def _differences(identity: dict[str, Any], recorded: dict[str, Any]) -> list[str]:
    """How `identity` differs from a recorded one, one phrase per component."""
    found = []
    params, old_params = identity["params"], recorded.get("params", {})
    for key in sorted(set(params) | set(old_params)):
        if params.get(key) != old_params.get(key):
            found.append(f"{key}: {json.dumps(old_params.get(key))} -> {json.dumps(params.get(key))}")
    if identity["content"] != recorded.get("content"):
        found.append(f"{_CONTENT.get(identity['stage'], 'its content')} changed")
    if identity["code"] != recorded.get("code"):
        found.append(_code_change(identity["code"], recorded.get("code")))
    return found


def _code_change(code: dict[str, str], recorded: Any) -> str:
    """One phrase naming the parts of the code (see pipeline.fingerprint) that changed, were added or removed."""
    if not isinstance(recorded, dict):
        return "code changed (the completed version predates code identities by part)"
    kinds = (("changed", [name for name in code if name in recorded and code[name] != recorded[name]]),
             ("added", [name for name in code if name not in recorded]),
             ("removed", [name for name in recorded if name not in code]))
    return "code " + "; ".join(f"{kind}: {', '.join(sorted(map(_dotted, names)))}" for kind, names in kinds if names)


def _dotted(part: str) -> str:
    """`pipeline.convert:load_image` as a reader names it: pipeline.convert.load_image."""
    return part.replace(":", ".")


def reasons(task: luigi.Task, index: dict, to_run: set[str]) -> list[str]:
    """Why `task`, which is not done, will run."""
    # A stage's own parts (Convert's shards) are not its upstream; the stages it reads are.
    read = [*task.upstream(), *task.also_reads()] if isinstance(task, Stage) else luigi.task.flatten(task.requires())
    rerun_upstream = sorted({f"{up.get_task_family()}@{up.version}" if isinstance(up, Stage) else up.get_task_family()
                             for up in read if up.task_id in to_run})
    if isinstance(task, Gathering):
        return ["it gathers the stages above, then writes its record"]
    if not isinstance(task, Stage):
        return ["upstream will run: " + ", ".join(rerun_upstream)] if rerun_upstream else ["no output yet"]
    if task.rerunning():
        return ["--rerun"] if task.rerun else ["it shows a check made again (--Bless-rerun)"]
    entries = [entry for entry in index.values() if entry["stage"] == task.get_task_family()
               and entry.get("dataset") == task.dataset]
    if any(entry["version"] == task.version for entry in entries):
        return ["its output was removed since it completed"]
    found = ["upstream will run: " + ", ".join(rerun_upstream)] if rerun_upstream else []
    if not entries:
        return found or ["no output yet"]
    identity = task.identity

    def distance(entry: dict) -> tuple[int, str]:
        """Fewest differences first; among those, the newest (ISO times sort as they read)."""
        recorded = entry.get("identity", {})
        upstream_differs = recorded.get("upstream") != identity["upstream"]
        return len(_differences(identity, recorded)) + upstream_differs, _negated(entry["completed_at"])

    closest = min(entries, key=distance)
    differences = _differences(identity, closest.get("identity", {}))
    if not differences and not found:
        differences = ["an upstream stage has another version than the closest completed one's"]
    return found + [f"{text} (closest completed: {closest['stage']}@{closest['version']})" for text in differences]


def _negated(text: str) -> str:
    """A key that sorts `text` in reverse order."""
    return "".join(chr(0x10FFFF - ord(character)) for character in text)


def explain(root: luigi.Task) -> list[str]:
    """One line per task of `root`'s DAG, upstream first, with the reasons of those to run."""
    index = load_index()
    lines, to_run = [], set()
    for task in whole_dag(root):
        if task.done():
            if isinstance(task, Stage):
                task.index_if_missing()
            lines.append(f"done    {task}")
            continue
        to_run.add(task.task_id)
        lines.append(f"to run  {task}")
        lines.extend(f"          - {reason}" for reason in reasons(task, index, to_run))
    return lines


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    try:
        with CmdlineParser.global_instance(argv) as parser:
            lines = explain(parser.get_task_obj())
    except (PipelineError, ValueError, luigi.parameter.ParameterException, TaskClassException) as error:
        # As luigi refuses them: one line and exit code 40 ([retcode] unhandled_exception).
        print(f"error: {error}", file=sys.stderr)
        return 40
    print("\n".join(lines))
    will_run = sum(line.startswith("to run") for line in lines)
    print(f"\n{will_run} of {sum(not line.startswith(' ') for line in lines)} tasks will run.")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
