"""What the commands print and write: plain-text tables of accuracy and JSON files (NaN written as null)."""

from __future__ import annotations

import json
import math
from pathlib import Path


def format_table(header: list[str], rows: list[list]) -> str:
    """A plain-text table with aligned columns and a rule under the header; floats are shown as percentages."""
    cells = [[format_cell(value) for value in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(value.ljust(width) for value, width in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def format_cell(value) -> str:
    """A table cell: a float as a percentage (NaN as 'n/a'), anything else as `str`."""
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{100 * value:.1f}%"
    return str(value)


def write_json(path, payload) -> None:
    """Write `payload` as indented JSON (NaN as null), creating the parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_nan_to_none(payload), indent=2, default=str)  # NaN -> null: strict JSON has no NaN
    path.write_text(text + "\n")


def _nan_to_none(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _nan_to_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(item) for item in value]
    return value
