"""Plain-text tables for commands that print to a person (`--json` prints for scripts)."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], indent: str = "") -> str:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, value in enumerate(row):
            widths[i] = max(widths[i], len(value))
    # The last column (usually a free-text detail) is not padded, so long text does not
    # push trailing blanks onto every line.
    lines = [_line(headers, widths, indent), _line(["─" * w for w in widths], widths, indent)]
    lines.extend(_line(row, widths, indent) for row in cells)
    return "\n".join(lines)


def _line(values: Sequence[str], widths: Sequence[int], indent: str) -> str:
    padded = [v.ljust(w) for v, w in zip(values[:-1], widths[:-1], strict=True)]
    return (indent + "  ".join([*padded, values[-1]])).rstrip()


def _cell(value: object) -> str:
    if value is None:
        return "-"
    return str(value).replace("\n", " ")


def timestamp(value: datetime | float | None) -> str | None:
    """ISO 8601 in UTC with a `Z`, to the second (what operators compare with the Portal)."""
    if value is None:
        return None
    moment = value if isinstance(value, datetime) else datetime.fromtimestamp(value, UTC)
    return moment.astimezone(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def emit(text: str) -> None:
    """Print to stdout; a reader that went away (`| head`) is not an error."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # Keep the interpreter's own flush at exit from failing on the closed pipe too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
