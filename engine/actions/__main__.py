"""`python -m engine.actions [README.md]`: print the table of action kinds, or write it
into the file between its markers (`make docs`)."""

from __future__ import annotations

import sys
from pathlib import Path

from engine.actions._docs import table, with_table


def main(argv: list[str]) -> int:
    if not argv:
        print(table())
        return 0
    path = Path(argv[0])
    try:
        text = path.read_text(encoding="utf-8")
        updated = with_table(text)
    except (OSError, ValueError) as error:
        print(f"error: {path}: {error}", file=sys.stderr)
        return 1
    if updated != text:
        path.write_text(updated, encoding="utf-8")
        print(f"{path}: the actions table was rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
