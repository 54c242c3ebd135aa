"""The README's table of action kinds, written from the registry (`make docs`), so it says
what the code does: each kind's `summary` and `parameters`."""

from __future__ import annotations

from engine.actions import ACTIONS
from engine.actions.base import Action, Parameter

BEGIN = "<!-- actions table: written by `make docs` from engine.actions; edit the modules -->"
END = "<!-- end of the actions table -->"


def table() -> str:
    """The table in Markdown, one row per kind, by name."""
    rows = ["| action | parameters | what it does |", "|---|---|---|"]
    for kind in sorted(ACTIONS):
        action = ACTIONS[kind]
        rows.append(f"| `{kind}` | {_parameters(action)} | {action.summary} |")
    return "\n".join(rows)


def _parameters(action: type[Action]) -> str:
    required = [p for p in action.parameters if p.required]
    optional = [p for p in action.parameters if not p.required]
    parts = [", ".join(map(_shown, required))] if required else []
    if optional:
        parts.append("optional " + ", ".join(map(_shown, optional)))
    return ", ".join(parts) or "none"


def _shown(parameter: Parameter) -> str:
    return f"`{parameter.name}`" + (f" ({parameter.note})" if parameter.note else "")


def with_table(text: str) -> str:
    """`text` (the README) with the part between the markers replaced by `table()`;
    ValueError when the markers are missing."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"the markers are missing: {BEGIN} ... {END}")
    return f"{text[: start + len(BEGIN)]}\n{table()}\n{text[end:]}"
