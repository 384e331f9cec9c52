"""The champion: for each dataset version and split, the blessed model now in use.

`<results_root>/.champion/<dataset>/<data_version>/<split>.json` (the pointer) names it: its Train
version, folder and final export, the evaluation and the check that made it champion, when and
why. It keeps the champions before it, newest last, for `revoke` to step back to, every change in
`history`, and the Train versions revoked: a blessing never crowns those again (a person may,
with `force`). It is rewritten whole (a rename, or one PUT on S3) and only under the index's lock,
and every change reads it under that lock: two checks at once never lose an update, and each
compares with the champion as it is at that moment. Readers need no lock.

A champion record: {"train_version", "train_path", "export_dir", "model", "run", "evaluation",
"accuracy", "loss", "metrics", "since", "by" ("bless" or "set"), "reason", "blessing"}.
"""
from __future__ import annotations

import contextlib
import datetime
from typing import Any, Callable, Iterator, Mapping

from pipeline import storage
from pipeline.errors import ChampionError, NoChampion
from pipeline.index import index_lock
from pipeline.leaderboard import merit
from pipeline.storage import read_json, write_json
from pipeline.versioning import canonical_json, safe_name

CHAMPION_FOLDER = ".champion"
_RECORD_FIELDS = ("train_version", "train_path", "export_dir", "accuracy", "loss")


def champion_path(results_root: str, dataset: str, data_version: str, split: str) -> str:
    return storage.join(results_root, CHAMPION_FOLDER, safe_name("dataset", dataset),
                        safe_name("data_version", data_version), f"{safe_name('split', split)}.json")


def empty_pointer() -> dict:
    return {"champion": None, "previous": [], "history": [], "revoked": []}


def _is_record(value: Any) -> bool:
    return (isinstance(value, dict) and all(field in value for field in _RECORD_FIELDS)
            and all(isinstance(value[field], (int, float)) for field in ("accuracy", "loss")))


def read_pointer(path: str) -> dict:
    """The pointer at `path`; an empty one where there is none. A damaged pointer is an error, not
    an empty one: taking it for empty would drop its history at the next change."""
    try:
        pointer = read_json(path)
    except FileNotFoundError:
        return empty_pointer()
    except ValueError as error:
        raise ChampionError(f"{path}: not a champion pointer ({error}); restore it or remove it") from None
    if isinstance(pointer, dict):
        pointer.setdefault("revoked", [])
    if not (isinstance(pointer, dict) and isinstance(pointer.get("previous"), list)
            and isinstance(pointer.get("history"), list) and isinstance(pointer["revoked"], list)
            and (pointer.get("champion") is None or _is_record(pointer["champion"]))
            and all(map(_is_record, pointer["previous"]))):
        raise ChampionError(f"{path}: not a champion pointer (expected champion, previous and history, "
                            "each champion with train_version, train_path, export_dir, accuracy and loss); "
                            "restore it or remove it")
    return pointer


def current(path: str) -> dict | None:
    """The champion record at `path`, or None when there is no champion."""
    return read_pointer(path)["champion"]


def require_current(path: str, how_to_make_one: str) -> dict:
    champion = current(path)
    if champion is None:
        raise NoChampion(f"no champion at {path}: {how_to_make_one}")
    return champion


def candidate(*, train_version: str, train_path: str, export: str, model: str, evaluation: str,
              metrics: Mapping[str, float], blessing: str | None = None) -> dict:
    """A champion record before it is crowned: the Train (its folder as the pipeline names it, and its
    final export, relative to that folder, as train.json names it), the evaluation that ranks it and
    its metrics (change bounds compare with them), and the blessing that let it in, if one did."""
    return {"train_version": train_version, "train_path": train_path, "export_dir": storage.join(train_path, export),
            "model": model, "run": storage.name(train_path), "evaluation": evaluation,
            "accuracy": metrics["accuracy"], "loss": metrics["loss"], "metrics": dict(metrics), "blessing": blessing}


def ranks_above(candidate: dict, champion: dict) -> bool:
    """Whether `candidate` is a better model than `champion`, by the leaderboard's order; a tie keeps
    the champion."""
    return merit(candidate) < merit(champion)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _same_model(record: dict | None, candidate: dict) -> bool:
    return record is not None and record["train_version"] == candidate["train_version"]


@contextlib.contextmanager
def _changing(path: str, lock_folder: str) -> Iterator[dict]:
    """The pointer at `path`, read under the index's lock and written back whole, still under it,
    once the block is done with it, if it changed it (not when the block raises)."""
    with index_lock(lock_folder):
        pointer = read_pointer(path)
        before = canonical_json(pointer)
        yield pointer
        if canonical_json(pointer) != before:
            write_json(path, pointer)


def _crown(pointer: dict, candidate: dict, by: str, reason: str) -> None:
    dethroned = pointer["champion"]
    if dethroned is not None:
        pointer["previous"].append(dethroned)
    pointer["champion"] = {**candidate, "since": _now(), "by": by, "reason": reason}
    pointer["history"].append({"at": pointer["champion"]["since"], "action": by,
                               "train_version": candidate["train_version"], "reason": reason,
                               "replaced": dethroned and dethroned["train_version"]})


def promote_if_better(path: str, lock_folder: str, candidate: dict,
                      judge: Callable[[dict | None], dict]) -> tuple[dict, bool]:
    """Judge `candidate` against the champion as it is now, and make it champion if the verdict
    blesses it and it ranks above that champion (or there is none), all under the index's lock.

    `judge(baseline)` returns the verdict, a dict with "blessed"; the baseline is the champion, or,
    where the candidate already is champion (its check was cut off after it was crowned), the one
    it replaced, so that a check made again gives the same verdict. A model once revoked is not
    crowned again by a check (a person may `force` it back). Returns (verdict, whether the candidate
    is champion afterwards)."""
    with _changing(path, lock_folder) as pointer:
        champion = pointer["champion"]
        if _same_model(champion, candidate):
            return judge(pointer["previous"][-1] if pointer["previous"] else None), True
        verdict = judge(champion)
        revoked = candidate["train_version"] in pointer["revoked"]
        if verdict["blessed"] and revoked:
            verdict = {**verdict, "reason": f"{verdict['reason']}; not made champion: it was revoked (python -m "
                                            "tasks.champion --set brings it back)"}
        crowned = verdict["blessed"] and not revoked and (champion is None or ranks_above(candidate, champion))
        if crowned:
            _crown(pointer, candidate, "bless", verdict.get("reason", ""))
        return verdict, crowned


def force(path: str, lock_folder: str, candidate: dict, reason: str) -> dict:
    """Make `candidate` champion whatever its verdict (a person decided: `reason` says why).
    Returns the pointer."""
    if not reason.strip():
        raise ChampionError("a forced champion needs a reason (--reason TEXT); it is kept in the history")
    with _changing(path, lock_folder) as pointer:
        if _same_model(pointer["champion"], candidate):
            raise ChampionError(f"{candidate['train_path']} is already the champion ({path})")
        pointer["revoked"] = [version for version in pointer["revoked"] if version != candidate["train_version"]]
        _crown(pointer, candidate, "set", reason)
        return pointer


def revoke(path: str, lock_folder: str, reason: str) -> dict:
    """Step back to the champion before the current one (none, if there was none). Returns the pointer."""
    with _changing(path, lock_folder) as pointer:
        revoked = pointer["champion"]
        if revoked is None:
            raise NoChampion(f"no champion to revoke at {path}")
        pointer["champion"] = pointer["previous"].pop() if pointer["previous"] else None
        restored = pointer["champion"]
        pointer["revoked"].append(revoked["train_version"])
        pointer["history"].append({"at": _now(), "action": "revoke", "train_version": revoked["train_version"],
                                   "reason": reason, "restored": restored and restored["train_version"]})
        return pointer


def all_pointers(results_root: str) -> dict[str, dict]:
    """Every pointer under `results_root`, by its path."""
    pattern = storage.join(results_root, CHAMPION_FOLDER, "*", "*", "*.json")
    return {path: read_pointer(path) for path in sorted(storage.glob(pattern))}
