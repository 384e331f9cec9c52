"""CSV cells that a spreadsheet shows as text, never runs as a formula (OWASP's CSV injection advice).

A cell that starts with `=`, `+`, `-`, `@`, a tab or a carriage return is taken by Excel, LibreOffice
and Google Sheets for a formula; a class or run named `=HYPERLINK(...)` would run when the CSV is
opened. Such a text cell is written with a leading `'`, which spreadsheets show as text. A cell
that already starts with `'` gets one too, so that `read_cell` gives back exactly what was written.
Numbers stay numbers: only strings are escaped, so a loss of -0.5 is still -0.5.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "'")


def safe_cell(value: Any) -> Any:
    """`value` as it is written to a CSV: a string a spreadsheet would run is prefixed with `'`."""
    if isinstance(value, str) and value.startswith(_FORMULA_STARTS):
        return f"'{value}"
    return value


def safe_row(values: Iterable[Any]) -> list[Any]:
    return [safe_cell(value) for value in values]


def safe_record(row: Mapping[str, Any]) -> dict[str, Any]:
    return {key: safe_cell(value) for key, value in row.items()}


def read_cell(text: str) -> str:
    """A cell as `safe_cell` was given it."""
    return text[1:] if text.startswith("'") and text[1:].startswith(_FORMULA_STARTS) else text


def read_record(row: Mapping[str, str]) -> dict[str, str]:
    """A csv.DictReader row, its header names included, as `safe_cell` was given them."""
    return {read_cell(key): read_cell(value) for key, value in row.items()}
