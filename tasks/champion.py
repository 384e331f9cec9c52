"""The champion of each dataset version and split: `python -m tasks.champion [--json]`

Shows every champion (see pipeline.champion): its dataset, data version (the Convert version) and
split, the run (its Train version and folder) and export, its accuracy and loss, since when, by
what (a blessing, or a person's `--set`) and why, and the history of each pointer.

    python -m tasks.champion --set RUN --reason TEXT    force a model in: RUN is a Train run folder
                                                        (results/<dataset>/<model>-<version>) or a
                                                        Train version, evaluated on --split
    python -m tasks.champion --revoke --reason TEXT     step back to the champion before it

`--split` (default test) names the split ranked on; `--dataset` and `--data-version` choose the
pointer `--revoke` changes where there are several. It reads luigi.cfg's [layout] and the index,
never TensorFlow.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline import champion, storage
from pipeline.blessing import metric_values
from pipeline.convert import SPLITS
from pipeline.errors import ChampionError, LineageError, PipelineError
from pipeline.index import key_of
from pipeline.lineage import find
from pipeline.storage import read_json
from tasks.base import load_index
from tasks.config import index_folder, results_root
from tasks.console import printable
from tasks.stages import HOW_TO_MAKE_A_CHAMPION

# Shows and changes which model is served, never what a stage computes (see pipeline.fingerprint).
AFFECTS_RESULTS = False


def where(path: str) -> dict[str, str]:
    """The dataset, data version and split of the pointer at `path`, as its place names them."""
    dataset, data_version, file_name = storage.relative(
        path, storage.join(results_root(), champion.CHAMPION_FOLDER)).split("/")
    return {"dataset": dataset, "data_version": data_version, "split": file_name.removesuffix(".json")}


def train_entry(index: dict, run: str) -> dict:
    """The index entry of the Train that `run` names: its folder, or its version, as lineage finds
    them (see pipeline.lineage.find)."""
    try:
        key = find(index, run)
    except LineageError as error:
        raise ChampionError(f"--set {run!r}: {error}") from None
    if index[key]["stage"] != "Train":
        raise ChampionError(f"--set {run!r} names {key}, no Train; expected a run folder such as "
                            "results/<dataset>/<model>-<version>, or its version")
    return index[key]


def evaluation_of(index: dict, train: dict, split: str) -> dict:
    """The newest index entry of an evaluation of `train` on `split`."""
    found = [entry for entry in index.values() if entry["stage"] == "Evaluate"
             and key_of(train) in entry.get("upstream", ()) and entry["identity"]["params"].get("split") == split]
    if not found:
        raise ChampionError(f"--set {train['path']}: it has no evaluation on the {split} split to rank it by; "
                            "evaluate it (luigi --module tasks Evaluate, with the parameters that trained it), "
                            "or name the split it was evaluated on (--split)")
    return max(found, key=lambda entry: entry["completed_at"])


def candidate_of(index: dict, run: str, split: str) -> tuple[str, dict]:
    """The pointer `run` would be champion of on `split`, and its champion record."""
    train = train_entry(index, run)
    evaluation = evaluation_of(index, train, split)
    record = champion.candidate(
        train_version=train["version"], train_path=train["path"], export=read_json(train["marker"])["export_dir"],
        model=Path(train["identity"]["params"]["model_def"]).stem, evaluation=key_of(evaluation),
        metrics=metric_values(read_json(evaluation["marker"])))
    path = champion.champion_path(results_root(), train["dataset"], train["identity"]["upstream"]["convert"], split)
    return path, record


def chosen_pointer(pointers: dict[str, dict], dataset: str | None, data_version: str | None, split: str) -> str:
    """The one pointer with a champion that `dataset`, `data_version` and `split` leave."""
    wanted = {"dataset": dataset, "data_version": data_version, "split": split}
    found = [path for path, pointer in pointers.items() if pointer["champion"] is not None
             and all(value in (None, where(path)[key]) for key, value in wanted.items())]
    if len(found) == 1:
        return found[0]
    asked = ", ".join(f"{key} {value}" for key, value in wanted.items() if value is not None)
    if not found:
        raise ChampionError(f"--revoke: no champion of {asked} under {results_root()}; "
                            "python -m tasks.champion lists them")
    listed = "; ".join(" ".join(where(path).values()) for path in found)
    raise ChampionError(f"--revoke: {len(found)} champions of {asked} ({listed}); choose one with --dataset and "
                        "--data-version")


def record_lines(record: dict | None) -> str:
    if record is None:
        return "none"
    return (f"{record['run']} (Train {record['train_version']}) accuracy {record['accuracy']:.4f} loss "
            f"{record['loss']:.4f}, since {record['since']} by {record['by']}: {record['reason'] or '-'}\n"
            f"    run:    {record['train_path']}\n    export: {record['export_dir']}")


def shown(path: str, pointer: dict) -> str:
    place = where(path)
    lines = [f"{place['dataset']}  data {place['data_version']}  split {place['split']}  ({path})",
             f"  champion: {record_lines(pointer['champion'])}", "  history:"]
    for change in pointer["history"]:
        # A revoke names the champion it restored; a bless or a set, the one it replaced.
        after = "restored" if change["action"] == "revoke" else "replaced"
        lines.append(f"    {change['at']}  {change['action']:<6} {change['train_version']}  ({after} "
                     f"{change[after] or 'none'})  {change['reason'] or '-'}")
    return "\n".join(lines)


def as_json(path: str, pointer: dict) -> dict:
    return {**where(path), "path": path, **pointer}


def arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tasks.champion", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    change = parser.add_mutually_exclusive_group()
    change.add_argument("--set", metavar="RUN", help="make this Train champion: its run folder or its version")
    change.add_argument("--revoke", action="store_true", help="step back to the champion before the current one")
    parser.add_argument("--reason", help="why (recorded in the pointer's history); needed by --set and --revoke")
    parser.add_argument("--split", default="test", choices=SPLITS, help="the split ranked on (default: test)")
    parser.add_argument("--dataset", help="with --revoke: the dataset whose champion is revoked")
    parser.add_argument("--data-version", help="with --revoke: the data (Convert) version whose champion is revoked")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    args = parser.parse_args(argv)
    if (args.set or args.revoke) and not (args.reason or "").strip():
        parser.error(f"{'--set' if args.set else '--revoke'} needs --reason TEXT; it is kept in the history")
    return args


def main(argv: list[str]) -> int:
    args = arguments(argv)
    try:
        if args.set:
            path, record = candidate_of(load_index(), args.set, args.split)
            changed = {path: champion.force(path, index_folder(), record, args.reason)}
        elif args.revoke:
            path = chosen_pointer(champion.all_pointers(results_root()), args.dataset, args.data_version, args.split)
            changed = {path: champion.revoke(path, index_folder(), args.reason)}
        else:
            changed = champion.all_pointers(results_root())
    except PipelineError as error:
        print(printable(f"error: {error}"), file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([as_json(path, pointer) for path, pointer in changed.items()], indent=2))
    elif not changed:
        print(f"No champion under {results_root()}: {HOW_TO_MAKE_A_CHAMPION}.")
    else:
        print(printable("\n\n".join(shown(path, pointer) for path, pointer in changed.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
