"""The leaderboard: every evaluation in the index, best first, as HTML and CSV.

It is a view of `results/index.json` built from the rows the index holds (an evaluation's entry's
`leaderboard` value, and a report's `reports` value: which evaluation it reports, and its link),
without reading any run's files: rebuilding it costs the same whatever the
runs' sizes, and grows with their number only as the index does.
"""
from __future__ import annotations

import csv
import datetime
import html
import io
import urllib.parse
from typing import Iterable, Mapping

from pipeline import storage
from pipeline.csvcells import safe_record
from pipeline.storage import write_bytes

LEADERBOARD_HTML = "leaderboard.html"
LEADERBOARD_CSV = "leaderboard.csv"
ROW_KEY = "leaderboard"
REPORT_KEY = "reports"
COLUMNS = ("rank", "run", "model", "dataset", "split", "accuracy", "loss", "global_step", "params", "max_steps",
           "batch_size", "tf_random_seed", "train_version", "data_version", "evaluated_at", "report")


def leaderboard_rows(index: Mapping[str, dict]) -> list[dict]:
    """The row of each indexed evaluation, best accuracy first, then lowest loss, ranked."""
    return rows_of(index, [key for key, entry in index.items() if ROW_KEY in entry])


def rows_of(index: Mapping[str, dict], keys: Iterable[str]) -> list[dict]:
    """The rows of the evaluations `keys`, each linking the newest indexed report of it, ranked.
    Joined here rather than stored in the row, so that a row never links a report that is gone."""
    reports = sorted((entry for entry in index.values() if REPORT_KEY in entry),
                     key=lambda entry: entry["completed_at"])
    links = {entry[REPORT_KEY]["evaluation"]: entry[REPORT_KEY]["link"] for entry in reports}
    return ranked({**index[key][ROW_KEY], **({"report": links[key]} if key in links else {})} for key in keys)


def shown(entry: Mapping) -> bool:
    """Whether an index entry changes what the leaderboard shows."""
    return ROW_KEY in entry or REPORT_KEY in entry


def ranked(rows: Iterable[Mapping]) -> list[dict]:
    rows = [{column: row.get(column, "") for column in COLUMNS} for row in rows]
    rows.sort(key=lambda row: (-row["accuracy"], row["loss"], row["run"], row["split"]))
    for rank, row in enumerate(rows, start=1):
        row["rank"] = rank
    return rows


def is_relative_link(link: str) -> bool:
    """Whether `link` is a relative path below the page's folder: no scheme (`javascript:`, a
    remote page), no leading '/', no '..'. A report's link comes from the index, which is rebuilt
    from files lying among downloaded data: anything else is shown, not linked."""
    parts = urllib.parse.urlsplit(link)
    return (not parts.scheme and not parts.netloc and not link.startswith(("/", "\\"))
            and ".." not in parts.path.replace("\\", "/").split("/"))


def render_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(map(safe_record, rows))
    return buffer.getvalue()


def render_html(rows: list[dict], title: str = "Leaderboard", csv_name: str = LEADERBOARD_CSV) -> str:
    def cell(column: str, row: dict) -> str:
        value = row[column]
        if column == "report":
            link = str(value)
            return (f'<td><a href="{html.escape(link)}">report</a></td>' if link and is_relative_link(link)
                    else f"<td>{html.escape(link)}</td>")
        if column in ("accuracy", "loss"):
            return f'<td class="num">{value:.4f}</td>'
        css = ' class="num"' if isinstance(value, (int, float)) else ""
        return f"<td{css}>{html.escape(str(value))}</td>"

    head = "".join(f"<th>{html.escape(column)}</th>" for column in COLUMNS)
    body = "".join("<tr>" + "".join(cell(column, row) for column in COLUMNS) + "</tr>" for row in rows)
    generated = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: .9em; }}
th, td {{ padding: 3px 9px; border-bottom: 1px solid #e4e4e4; text-align: left; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
tbody tr:first-child {{ background: #eef6ee; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{len(rows)} evaluation(s), best accuracy first. Also as <a href="{html.escape(csv_name)}">{html.escape(csv_name)}</a>.</p>
<table id="leaderboard"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
<p><small>Generated {generated} from index.json.</small></p>
</body></html>
"""


def write_table(rows: list[dict], csv_path: str, html_path: str, title: str) -> None:
    """The rows as an HTML page, then as the CSV it links, each written atomically: the CSV last."""
    write_bytes(html_path, render_html(rows, title, storage.name(csv_path)).encode("utf-8"))
    write_bytes(csv_path, render_csv(rows).encode("utf-8"))


def rebuild_leaderboard(results_root: str, index: Mapping[str, dict]) -> list[dict]:
    """Rewrite results/leaderboard.html and .csv from the index; returns the rows."""
    rows = leaderboard_rows(index)
    write_table(rows, storage.join(results_root, LEADERBOARD_CSV), storage.join(results_root, LEADERBOARD_HTML),
                "Leaderboard")
    return rows
