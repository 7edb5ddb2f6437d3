"""Human rendering of a ScheduleTable: a step x rank grid, errors marked in place."""

from __future__ import annotations

from .table import ScheduleTable

_WINDOW = 8
"""Steps shown around each marked step when a grid is too long to print whole."""
_MAX_ROWS = 120


def render_grid(table: ScheduleTable, marks: dict[tuple[int, int], str] | None = None) -> str:
    """One row per step, one column per rank. marks maps (rank, step) to a reason; a
    marked cell is shown as ``>>3F1<<`` and its row ends with ``<-- ERROR HERE``."""
    marks = marks or {}
    num_steps = max((len(actions) for actions in table.ranks), default=0)
    cells = [[str(a) for a in actions] for actions in table.ranks]
    width = max([len(c) for col in cells for c in col] + [len(f"rank {len(cells)}")]) + 4
    header = "step  " + "".join(f"rank {r}".ljust(width) for r in range(len(cells)))
    rows = _visible_rows(num_steps, {step for _, step in marks})
    lines = [header.rstrip()]
    previous = -1
    for step in rows:
        if step != previous + 1:
            lines.append("  ...")
        previous = step
        row = []
        for rank, column in enumerate(cells):
            text = column[step] if step < len(column) else ""
            if (rank, step) in marks:
                text = f">>{text or '(end)'}<<"
            row.append(text.ljust(width))
        line = f"{step:>4}  " + "".join(row)
        reasons = [f"rank {r}: {why}" for (r, s), why in sorted(marks.items()) if s == step]
        if reasons:
            line = line.rstrip() + "  <-- ERROR HERE (" + "; ".join(reasons) + ")"
        lines.append(line.rstrip())
    if rows and rows[-1] != num_steps - 1:
        lines.append("  ...")
    return "\n".join(lines)


def _visible_rows(num_steps: int, marked: set[int]) -> list[int]:
    if num_steps <= _MAX_ROWS:
        return list(range(num_steps))
    keep: set[int] = set(range(min(_WINDOW if marked else 3 * _WINDOW, num_steps)))
    for step in marked:
        keep.update(range(max(0, step - _WINDOW), min(num_steps, step + _WINDOW + 1)))
    if not marked:
        keep.update(range(max(0, num_steps - _WINDOW), num_steps))
    return sorted(keep)


def render_ranks(table: ScheduleTable) -> str:
    """One line per rank with its whole action list (compact, for logs)."""
    return "\n".join(f"rank {r}: " + " ".join(str(a) for a in actions)
                     for r, actions in enumerate(table.ranks))
