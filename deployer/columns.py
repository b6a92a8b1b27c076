"""Plain aligned text columns, for the listings a terminal shows and grep reads.

One helper for every table the CLI prints (the run summary, ``hosts``,
``status``, ``recover``), so they line up the same way: cells are padded to
the widest cell of their column, two spaces apart, and each line is stripped of
trailing spaces.
"""

from __future__ import annotations

from collections.abc import Sequence

#: between two columns
GAP = "  "


def align(rows: Sequence[Sequence[str]], *, right_from: int | None = None) -> list[str]:
    """One line a row, its cells padded to the widest cell of their column.

    Cells are left-aligned; with ``right_from``, the columns from that index on
    are right-aligned (numbers), all but the last. The last column is never
    padded and never sets a width: free text (an error, a summary) may be as
    long as it is without widening the table. Every row has as many cells as
    the first; no rows give no lines.
    """
    if not rows:
        return []
    last = len(rows[0]) - 1
    widths = [max(len(row[i]) for row in rows) for i in range(last)]
    lines = []
    for row in rows:
        if len(row) != last + 1:
            raise ValueError(f"a row of {len(row)} cells in a table of {last + 1} columns")
        cells = [
            cell.rjust(width) if right_from is not None and i >= right_from else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row[:last], widths, strict=True))
        ]
        lines.append(GAP.join([*cells, row[last]]).rstrip())
    return lines
