"""Blessing: whether an evaluation passes the thresholds set for it, and the champion it may become.

Thresholds are a JSON object of metric to bounds, any subset of
`{"min", "max", "min_change", "max_change", "min_relative_change", "max_relative_change"}`:

    {"accuracy": {"min": 0.95, "min_change": -0.002}, "loss": {"max_relative_change": 0.1}}

A metric is a numeric top-level field of metrics.json (accuracy, loss, ...) or a key of its
`model_metrics`. `min`/`max` bound the value; the change bounds bound `value - baseline` and
`(value - baseline) / |baseline|`, the baseline being the champion's value at the moment of the
check. Without a champion (the first run), or where it records no value of the metric, a change
bound is "skipped": recorded, neither passed nor failed. A verdict blesses when no check fails; with
no thresholds at all, nothing was checked and nothing is blessed.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from pipeline import champion
from pipeline.errors import ConfigError
from pipeline.storage import read_json, write_json

BOUNDS = ("min", "max", "min_change", "max_change", "min_relative_change", "max_relative_change")
EXAMPLE = """'{"accuracy": {"min": 0.95, "min_change": -0.002}, "loss": {"max": 0.2}}'"""
NO_THRESHOLDS = ("no thresholds set, so nothing was checked and nothing is blessed: set them with "
                 f"--Bless-thresholds {EXAMPLE} or in luigi.cfg's [Bless] thresholds")


def outcome(blessing: Mapping) -> dict:
    """What a run's record and the index keep of a verdict (blessing.json's content)."""
    return {field: blessing[field] for field in ("blessed", "reason", "failing", "champion")}


def check_thresholds(thresholds: Any) -> dict[str, dict[str, float]]:
    """`thresholds` as plain dicts, or ConfigError naming what is wrong with it and the form expected."""
    # As JSON, as they were given (Luigi's frozen dicts are dicts there).
    shown = f"thresholds {json.dumps(thresholds, default=dict)}"
    if not isinstance(thresholds, Mapping):
        raise ConfigError(f"{shown}: a JSON {type(thresholds).__name__}; expected a JSON object of "
                          f"metric to bounds, such as {EXAMPLE}")
    checked = {}
    for metric, bounds in thresholds.items():
        if not isinstance(bounds, Mapping) or not bounds:
            raise ConfigError(f"{shown}: {metric!r} maps to {bounds!r}; expected an object of bounds "
                              f"({', '.join(BOUNDS)}), such as {EXAMPLE}")
        unknown = sorted(set(bounds) - set(BOUNDS))
        if unknown:
            raise ConfigError(f"{shown}: {metric!r} has unknown bound {unknown[0]!r}; the bounds are "
                              f"{', '.join(BOUNDS)}")
        for bound, limit in bounds.items():
            if not _is_number(limit) or not math.isfinite(limit):
                raise ConfigError(f"{shown}: {metric!r} {bound} is {limit!r}; expected a finite number")
        checked[metric] = {bound: float(bounds[bound]) for bound in BOUNDS if bound in bounds}
    return checked


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def metric_values(evaluation: Mapping) -> dict[str, float]:
    """The metrics an evaluation (metrics.json's content) reports: its numeric top-level fields and
    the model's own metrics (the top-level ones win a clash: they are what the leaderboard shows)."""
    model_metrics = evaluation.get("model_metrics") or {}
    return {name: value for source in (model_metrics, evaluation)
            for name, value in source.items() if _is_number(value)}


def require_metrics(thresholds: Mapping, values: Mapping[str, float]) -> None:
    missing = sorted(set(thresholds) - set(values))
    if missing:
        raise ConfigError(f"thresholds name metric {missing[0]!r}, which the evaluation does not report; "
                          f"its metrics are {', '.join(sorted(values))}")


def _baseline_value(baseline: Mapping | None, metric: str) -> float | None:
    if baseline is None:
        return None
    value = baseline.get(metric, (baseline.get("metrics") or {}).get(metric))
    return value if _is_number(value) else None


def _check(metric: str, bound: str, limit: float, value: float, baseline: float | None) -> dict:
    check = {"metric": metric, "bound": bound, "limit": limit, "value": value, "baseline": baseline}
    if bound in ("min", "max"):
        measured = value
    elif baseline is None:
        return {**check, "result": "skipped", "note": "no champion value to compare with"}
    elif bound.endswith("relative_change"):
        if baseline == 0:
            return {**check, "result": "skipped", "note": "the champion's value is 0: no relative change"}
        measured = check["relative_change"] = (value - baseline) / abs(baseline)
    else:
        measured = check["change"] = value - baseline
    passed = measured >= limit if bound.startswith("min") else measured <= limit
    return {**check, "result": "pass" if passed else "fail"}


def describe(check: Mapping) -> str:
    """One check as a line: `accuracy 0.9100 < min 0.95`, `accuracy change -0.0100 < min_change -0.002`."""
    if check["result"] == "skipped":
        return f"{check['metric']} {check['bound']} {check['limit']:g} ({check['note']})"
    measured = next((key for key in ("relative_change", "change") if key in check), "value")
    what = "" if measured == "value" else f" {measured.replace('_', ' ')}"
    sign = {"pass": (">=", "<="), "fail": ("<", ">")}[check["result"]][check["bound"].startswith("max")]
    return f"{check['metric']}{what} {check[measured]:.4f} {sign} {check['bound']} {check['limit']:g}"


def verdict(evaluation: Mapping, thresholds: Mapping, baseline: Mapping | None) -> dict:
    """The verdict on `evaluation` (metrics.json's content) under `thresholds`, against `baseline` (the
    champion record, or None): {"blessed", "reason", "checks", "failing", "baseline"}."""
    thresholds = check_thresholds(thresholds)
    if not thresholds:
        return {"blessed": False, "reason": NO_THRESHOLDS, "checks": [], "failing": [], "baseline": baseline}
    values = metric_values(evaluation)
    require_metrics(thresholds, values)
    checks = [_check(metric, bound, limit, values[metric], _baseline_value(baseline, metric))
              for metric, bounds in sorted(thresholds.items()) for bound, limit in bounds.items()]
    described = {result: [describe(check) for check in checks if check["result"] == result]
                 for result in ("fail", "pass", "skipped")}
    failing = described["fail"]
    reason = "; ".join(f"{label}: {', '.join(described[result])}" for result, label in
                       (("fail", "failed"), ("pass", "passed"), ("skipped", "skipped")) if described[result])
    return {"blessed": not failing, "reason": reason, "checks": checks, "failing": failing, "baseline": baseline}


def bless_evaluation(metrics_path: str, thresholds: Mapping, *, train: Mapping, champion_path: str,
                     lock_folder: str, blessing_path: str, context: Mapping) -> dict:
    """Check the evaluation at `metrics_path` against `thresholds` and the champion at
    `champion_path` as it is now, make its model (`train`: train_version, train_path, export (as
    train.json names it), model) champion when blessed and better (see pipeline.champion.promote_if_better), and write
    the verdict, with `context` (evaluation, dataset, data_version, split...), to `blessing_path`.

    blessing.json is written last, after the pointer: a check cut off in between is made again, and
    gives the same verdict (promote_if_better judges a model already champion against the one it
    replaced). Returns what it wrote."""
    evaluation = read_json(metrics_path)
    thresholds = check_thresholds(thresholds)
    # Before the lock: a threshold naming a metric the evaluation lacks fails whatever the champion.
    require_metrics(thresholds, metric_values(evaluation))
    candidate = champion.candidate(**train, evaluation=context["evaluation"], metrics=metric_values(evaluation),
                                   blessing=blessing_path)
    judged, is_champion = champion.promote_if_better(champion_path, lock_folder, candidate,
                                                     lambda baseline: verdict(evaluation, thresholds, baseline))
    blessing = {**judged, "champion": is_champion, "thresholds": thresholds, **context}
    write_json(blessing_path, blessing)
    return blessing
