"""The leaderboard: every evaluation in the results tree, best first, as HTML and CSV.

It is a view of `results/index.json`, rebuilt under the index's lock whenever an evaluation or
a report completes, so concurrent runs never interleave a stale view over a fresh one.
"""
from __future__ import annotations

import csv
import datetime
import html
import io
import json
import os
from pathlib import Path

from pipeline.fileio import read_json, write_bytes_atomic
from pipeline.versioning import INDEX_FILE, MARKERS, index_lock

LEADERBOARD_HTML = "leaderboard.html"
LEADERBOARD_CSV = "leaderboard.csv"
COLUMNS = ("rank", "run", "model", "dataset", "split", "accuracy", "loss", "global_step", "params", "max_steps",
           "batch_size", "tf_random_seed", "train_version", "data_version", "evaluated_at", "report")


def leaderboard_rows(index: dict, results_root: Path) -> list[dict]:
    """One row per evaluation whose metrics are still on disk, best accuracy first, then lowest loss."""
    results_root = Path(results_root).resolve()
    rows = []
    for entry in index.values():
        if entry["stage"] != "evaluate":
            continue
        folder = Path(entry["path"]).resolve()
        metrics_path = folder / MARKERS["evaluate"]
        train = index.get(entry["upstream"][0])
        if train is None or not metrics_path.is_file():  # removed since, by Train --rerun say
            continue
        metrics = read_json(metrics_path)
        params = train["params"]
        report = folder / MARKERS["report"]
        rows.append({
            "run": Path(train["path"]).name,
            "model": Path(str(params["model_def"])).stem,
            "dataset": entry["dataset"],
            "split": metrics["split"],
            "accuracy": metrics["accuracy"],
            "loss": metrics["loss"],
            "global_step": metrics["global_step"],
            "params": json.dumps(params["params"], sort_keys=True),
            "max_steps": params["max_steps"],
            "batch_size": params["batch_size"],
            "tf_random_seed": params["tf_random_seed"],
            "train_version": train["version"],
            "data_version": entry["upstream"][1].split("/", 1)[1],
            "evaluated_at": entry["completed_at"],
            "report": os.path.relpath(report, results_root) if report.is_file() else "",
        })
    rows.sort(key=lambda row: (-row["accuracy"], row["loss"], row["run"], row["split"]))
    for rank, row in enumerate(rows, start=1):
        row["rank"] = rank
    return rows


def render_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def render_html(rows: list[dict]) -> str:
    def cell(column: str, row: dict) -> str:
        value = row[column]
        if column == "report":
            return f'<td><a href="{html.escape(value)}">report</a></td>' if value else "<td></td>"
        if column in ("accuracy", "loss"):
            return f'<td class="num">{value:.4f}</td>'
        css = ' class="num"' if isinstance(value, (int, float)) else ""
        return f"<td{css}>{html.escape(str(value))}</td>"

    head = "".join(f"<th>{html.escape(column)}</th>" for column in COLUMNS)
    body = "".join("<tr>" + "".join(cell(column, row) for column in COLUMNS) + "</tr>" for row in rows)
    generated = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Leaderboard</title><style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: .9em; }}
th, td {{ padding: 3px 9px; border-bottom: 1px solid #e4e4e4; text-align: left; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
tbody tr:first-child {{ background: #eef6ee; }}
</style></head><body>
<h1>Leaderboard</h1>
<p>{len(rows)} evaluation(s), best accuracy first. Also as <a href="{LEADERBOARD_CSV}">{LEADERBOARD_CSV}</a>.</p>
<table id="leaderboard"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
<p><small>Generated {generated} from index.json.</small></p>
</body></html>
"""


def rebuild_leaderboard(results_root: Path) -> list[dict]:
    """Rewrite results/leaderboard.html and .csv from results/index.json; returns the rows."""
    results_root = Path(results_root)
    index_path = results_root / INDEX_FILE
    with index_lock(index_path):
        rows = leaderboard_rows(read_json(index_path) if index_path.exists() else {}, results_root)
        write_bytes_atomic(results_root / LEADERBOARD_CSV, render_csv(rows).encode("utf-8"))
        write_bytes_atomic(results_root / LEADERBOARD_HTML, render_html(rows).encode("utf-8"))
    return rows
