"""The leaderboard: every evaluation in the index, best first, as HTML and CSV.

Its rows are kept in `results/leaderboard.json` (the board): each indexed evaluation's row (its
entry's `leaderboard` value), each indexed report's link (its entry's `reports` value: which
evaluation it reports, and its link) and each indexed blessing's verdict (its entry's `blessing`
value: which evaluation it checked, and whether it blessed the model), by index key. A row shows
the newest report and verdict of its evaluation, and links the lineage in that report. Recording
an evaluation, a report or a verdict replaces one of them, and the two pages are rendered from the
board alone, without reading the index or any run's files; the board is rebuilt from the index
when the index is, or when it is missing or damaged. It holds values only, escaped as the pages are rendered: it is a file in the results,
which anything that may write there could plant. The caller holds the index's lock while the
board is read and rewritten.
"""
from __future__ import annotations

import csv
import datetime
import html
import io
import urllib.parse
from typing import Any, Iterable, Mapping

from pipeline import storage
from pipeline.csvcells import safe_row
from pipeline.index import key_of
from pipeline.storage import read_json, write_bytes
from pipeline.versioning import canonical_json

LEADERBOARD_HTML = "leaderboard.html"
LEADERBOARD_CSV = "leaderboard.csv"
BOARD_FILE = "leaderboard.json"
ROW_KEY = "leaderboard"
REPORT_KEY = "reports"
BLESSING_KEY = "blessing"
# The section of a report that shows where its run came from.
LINEAGE_ANCHOR = "#lineage"
COLUMNS = ("rank", "run", "model", "dataset", "split", "accuracy", "loss", "blessed", "global_step", "params",
           "max_steps", "batch_size", "tf_random_seed", "train_version", "data_version", "evaluated_at", "report",
           "lineage")
_JOINED = {REPORT_KEY: "reports", BLESSING_KEY: "blessings"}


def shown(entry: Mapping) -> bool:
    """Whether an index entry changes what the leaderboard shows."""
    return ROW_KEY in entry or any(key in entry for key in _JOINED)


def empty_board() -> dict:
    return {"rows": {}, "reports": {}, "blessings": {}}


def with_entry(board: dict, entry: Mapping) -> dict:
    """`board` with the row or the report link of the index entry `entry` added or replaced."""
    key = key_of(entry)
    if ROW_KEY in entry:
        board["rows"][key] = entry[ROW_KEY]
    for view, part in _JOINED.items():
        if view in entry:
            board[part][key] = {**entry[view], "completed_at": entry["completed_at"]}
    return board


def board_of(entries: Iterable[Mapping]) -> dict:
    """The board of the index entries `entries` (the whole index's)."""
    board = empty_board()
    for entry in entries:
        if shown(entry):
            with_entry(board, entry)
    return board


def merit(row: Mapping) -> tuple:
    """What ranks a model: the lower, the better (best accuracy, then lowest loss)."""
    return -row["accuracy"], row["loss"]


def _order(row: Mapping) -> tuple:
    return *merit(row), row.get("run", ""), row.get("split", "")


def _newest(joined: Mapping[str, dict]) -> dict[str, dict]:
    """The newest report (or verdict) of each evaluation on the board. Joined rather than stored in
    the row, so that a row never links a report that is gone."""
    return {item["evaluation"]: item for item in sorted(joined.values(), key=lambda item: item["completed_at"])}


def leaderboard_rows(board: Mapping[str, dict]) -> list[dict]:
    """The row of each evaluation on the board, best accuracy first, then lowest loss, ranked."""
    return rows_of(board, list(board["rows"]))


def rows_of(board: Mapping[str, dict], keys: Iterable[str], own: Mapping[str, Mapping] | None = None) -> list[dict]:
    """The rows of the evaluations `keys`, each with the newest verdict on it and linking the newest
    report of it and the lineage there, ranked; for an evaluation in `own`, the verdict and report
    given there instead ({"blessed", "link"}: a sweep's own, whatever was checked since)."""
    links = {key: report["link"] for key, report in _newest(board["reports"]).items()}
    blessed = {key: verdict["blessed"] for key, verdict in _newest(board["blessings"]).items()}
    for key, mine in (own or {}).items():
        links[key], blessed[key] = mine["link"], mine["blessed"]

    def joined(key: str) -> dict:
        row = dict(board["rows"][key])
        if key in links:
            row["report"] = links[key]
            row["lineage"] = links[key] + LINEAGE_ANCHOR
        if key in blessed:
            row["blessed"] = "yes" if blessed[key] is True else "no"
        return row

    return ranked(map(joined, keys))


def _is_board(value: Any) -> bool:
    """Whether `value` is a board, each part of the shape `write_board` needs (any other value is
    shown escaped, as text). A loop rather than nested generators: the board is read with every
    evaluation recorded. A board of an earlier pipeline, with rendered cells, is not one: rebuilt."""
    if not (isinstance(value, dict) and set(value) == {"rows", "reports", "blessings"}
            and all(isinstance(part, dict) for part in value.values())):
        return False
    for row in value["rows"].values():
        if not (isinstance(row, dict) and isinstance(row.get("accuracy"), (int, float))
                and isinstance(row.get("loss"), (int, float)) and isinstance(row.get("run", ""), str)
                and isinstance(row.get("split", ""), str)):
            return False
    for report in value["reports"].values():
        if not (isinstance(report, dict) and isinstance(report.get("evaluation"), str)
                and isinstance(report.get("link"), str) and isinstance(report.get("completed_at"), str)):
            return False
    for verdict in value["blessings"].values():
        if not (isinstance(verdict, dict) and isinstance(verdict.get("evaluation"), str)
                and isinstance(verdict.get("completed_at"), str)):
            return False
    return True


def read_board(results_root: str) -> dict | None:
    """The board, or None when it is missing or damaged: then it is to be rebuilt from the index."""
    try:
        board = read_json(storage.join(results_root, BOARD_FILE))
    except (FileNotFoundError, ValueError):  # ValueError: not UTF-8, or not JSON
        return None
    return board if _is_board(board) else None


def ranked(rows: Iterable[Mapping]) -> list[dict]:
    rows = sorted(({column: row.get(column, "") for column in COLUMNS} for row in rows), key=_order)
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


def _csv_line(values: Iterable[Any]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="").writerow(safe_row(values))
    return buffer.getvalue()


def _html_cell(column: str, value: Any) -> str:
    if column in ("accuracy", "loss") and isinstance(value, (int, float)):
        return f'<td class="num">{value:.4f}</td>'
    if column in ("report", "lineage"):
        # A link only if it is a relative one; shown as text otherwise.
        link = str(value)
        return f'<td><a href="{html.escape(link)}">{column}</a></td>' if link and is_relative_link(link) \
            else f"<td>{html.escape(link)}</td>"
    css = ' class="num"' if isinstance(value, (int, float)) else ""
    return f"<td{css}>{html.escape(str(value))}</td>"


def _pages(rows: list[dict], title: str, csv_name: str) -> tuple[str, str]:
    """The HTML page and the CSV of ranked rows (see `ranked`), every value escaped for each."""
    body = "".join(f"<tr>{''.join(_html_cell(column, row[column]) for column in COLUMNS)}</tr>" for row in rows)
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerows(safe_row(row[column] for column in COLUMNS) for row in rows)
    head = "".join(f"<th>{html.escape(column)}</th>" for column in COLUMNS)
    generated = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    page = f"""<!DOCTYPE html>
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
<p><small>Generated {generated} from the index.</small></p>
</body></html>
"""
    return page, f"{_csv_line(COLUMNS)}\n{table.getvalue()}"


def render_html(rows: list[dict], title: str = "Leaderboard", csv_name: str = LEADERBOARD_CSV) -> str:
    return _pages(rows, title, csv_name)[0]


def write_table(rows: list[dict], csv_path: str, html_path: str, title: str) -> None:
    """Ranked rows (see `rows_of`) as an HTML page and the CSV it links, each written atomically:
    the CSV last."""
    page, table = _pages(rows, title, storage.name(csv_path))
    write_bytes(html_path, page.encode("utf-8"))
    write_bytes(csv_path, table.encode("utf-8"))


def write_board(results_root: str, board: dict) -> None:
    """Rewrite results/leaderboard.html and .csv from `board` alone, then the board itself. The
    board last: a run cut off before it has not indexed its stage, and records it again."""
    write_table(leaderboard_rows(board), storage.join(results_root, LEADERBOARD_CSV),
                storage.join(results_root, LEADERBOARD_HTML), "Leaderboard")
    # Compact: it is the pipeline's to read, and rewritten with every evaluation.
    write_bytes(storage.join(results_root, BOARD_FILE), canonical_json(board).encode())


def rebuild_leaderboard(results_root: str, index: Mapping[str, dict]) -> list[dict]:
    """Rewrite the board and the leaderboard from the whole index; returns the rows."""
    board = board_of(index.values())
    write_board(results_root, board)
    return leaderboard_rows(board)
