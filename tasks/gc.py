"""Cleaning up: `python -m tasks.gc [--keep-top N] [--yes]`

Lists the versions in the index (results/.index) that nothing needs: not in the DAG that `RunAll` would
run now (luigi.cfg's configuration, the current code and model files), not the newest of their
configuration (the same stage with the same parameters all the way upstream, differing only in
code or model file), not among the top N evaluations of the leaderboard, not a champion's run or
evaluation (nor those of the champions before it, which `tasks.champion --revoke` steps back to),
not a report, verdict or run record of a kept evaluation, and not upstream of a version that is kept. With their sizes.
Removes them only with --yes, and never a version that a running task is writing into (its stage
lock is held), nor anything outside data_root and results_root. A missing or damaged index is rebuilt first.
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from typing import Any

import luigi
from luigi.task_register import TaskClassException

from pipeline.champion import all_pointers
from pipeline.errors import PipelineError
from pipeline.index import index_lock, key_of, within
from pipeline.locks import held_locks
from pipeline.storage import absolute, is_inside, size_of
from pipeline.leaderboard import ROW_KEY, board_of, leaderboard_rows
from pipeline.versioning import canonical_json
from tasks.runs import RunAll, whole_dag
from tasks.base import Stage, load_index, remove_versions
from tasks.config import index_folder, layout_roots, locks_folders, results_root

# Lists and removes versions; it makes none (see pipeline.fingerprint).
AFFECTS_RESULTS = False

# Stages that only describe one evaluation: kept with it, though they are not upstream of it.
_DESCRIBING = ("Report", "Bless", "RunRecord")


def _configuration(key: str, index: dict, memo: dict) -> str:
    """A version's parameters all the way upstream, without its code and content."""
    if key not in memo:
        entry = index.get(key, {})
        memo[key] = canonical_json([entry.get("stage"), entry.get("dataset"), entry.get("identity", {}).get("params"),
                                    [_configuration(up, index, memo) for up in entry.get("upstream", [])]])
    return memo[key]


def current_keys() -> set[str]:
    """The index keys of every stage `RunAll` would run now, done or not."""
    return {task.index_key for task in whole_dag(RunAll()) if isinstance(task, Stage)}


def champion_keys() -> set[str]:
    """The index keys of every champion's Train and evaluation, and of the champions' before it."""
    return {key for pointer in all_pointers(results_root()).values()
            for record in (pointer["champion"], *pointer["previous"]) if record is not None
            for key in (f"Train/{record['train_version']}", record["evaluation"])}


def kept(index: dict, keep_top: int, current: set[str]) -> set[str]:
    """The keys of the versions to keep (`current` ones among them), of the reports and run records
    of kept evaluations, and of everything upstream of those."""
    describing = defaultdict(list)
    for key, entry in index.items():
        if entry.get("stage") in _DESCRIBING:
            for evaluation in entry.get("upstream", []):
                if ROW_KEY in index.get(evaluation, {}):
                    describing[evaluation].append(key)
    memo: dict[str, str] = {}
    newest: dict[str, str] = {}
    for key, entry in index.items():
        configuration = _configuration(key, index, memo)
        if configuration not in newest or entry["completed_at"] > index[newest[configuration]]["completed_at"]:
            newest[configuration] = key
    best = {(row["train_version"], row["split"]) for row in leaderboard_rows(board_of(index.values()))[:keep_top]}
    top = {key for key, entry in index.items() if "leaderboard" in entry
           and (entry["leaderboard"]["train_version"], entry["leaderboard"]["split"]) in best}
    keep, pending = set(), [*current, *newest.values(), *top]
    while pending:
        key = pending.pop()
        if key in index and key not in keep:
            keep.add(key)
            pending.extend([*index[key].get("upstream", []), *describing[key]])
    return keep


def garbage(index: dict, keep_top: int, current: set[str],
            allowed: list[str]) -> tuple[list[dict[str, Any]], list[dict]]:
    """The versions to remove, outermost folders only (a run folder holds its evaluations), with
    sizes; and those that lie outside `allowed`, refused whatever the index says (it may be
    rebuilt from files lying among downloaded data)."""
    keep = kept(index, keep_top, current)
    kept_paths = [index[key]["path"] for key in keep]
    # Entries an older pipeline wrote have no identity to tell their configurations apart: kept.
    removable = [entry for key, entry in index.items() if key not in keep and "identity" in entry
                 # A folder holding a kept one (a run with a kept evaluation) stays.
                 and not any(is_inside(path, entry["path"]) for path in kept_paths)]
    refused = sorted((entry for entry in removable if not within(entry["path"], allowed)),
                     key=lambda entry: entry["path"])
    removable = [entry for entry in removable if entry not in refused]
    outermost = [entry for entry in removable
                 if not any(other is not entry and is_inside(entry["path"], other["path"]) for other in removable)]
    return ([{"key": key_of(entry), "path": entry["path"], "bytes": size_of(entry["path"])}
             for entry in sorted(outermost, key=lambda entry: entry["path"])], refused)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.gc", description=__doc__.splitlines()[0])
    parser.add_argument("--keep-top", type=int, default=5, help="Evaluations of the leaderboard kept (default 5)")
    parser.add_argument("--yes", action="store_true", help="Remove them; without it, only list them")
    args = parser.parse_args(argv)
    if args.keep_top < 0:
        parser.error(f"--keep-top must be 0 or more, not {args.keep_top}")
    try:
        current = current_keys()
    except (PipelineError, luigi.parameter.ParameterException, TaskClassException) as error:
        # Without it, the versions luigi.cfg uses could be listed: nothing is.
        print(f"error: luigi.cfg does not make a RunAll, so the versions it uses are unknown: {error}",
              file=sys.stderr)
        return 2
    # Under the index's lock from reading it to the removal: an evaluation or a report completing
    # meanwhile is recorded under it, holding its stage's lock, so it is either in the index read
    # or a running task's, and the run holding it is kept. A champion is crowned under it too.
    with index_lock(index_folder()):
        try:
            current |= champion_keys()
        except PipelineError as error:  # a damaged pointer: its champions are unknown, so nothing is listed
            print(f"error: {error}", file=sys.stderr)
            return 2
        found, refused = garbage(load_index(), args.keep_top, current, layout_roots())
        for entry in refused:
            print(f"refused {key_of(entry)} {entry['path']}: outside data_root and results_root")
        for item in found:
            print(f"{item['bytes'] / 1e6:10.1f} MB  {item['key']:<28} {item['path']}")
        total = sum(item["bytes"] for item in found)
        print(f"{len(found)} version(s), {total / 1e6:.1f} MB{'' if args.yes else '; pass --yes to remove them'}")
        if not args.yes:
            return 0
        busy = [path for folder in locks_folders() for path in held_locks(folder)]
        idle = []
        for item in found:
            writing = [path for path in busy if is_inside(path, absolute(item["path"]))]
            if writing:
                print(f"kept {item['path']}: a running task is writing {writing[0]}")
            else:
                idle.append(item["path"])
        removed = remove_versions(idle)
        print(f"removed {len(removed)} version(s)")
        return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
