"""Tables for people, JSON and CSV for scripts, a progress bar on stderr for long work."""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Iterable, Sequence
from decimal import Decimal
from typing import Any, TextIO


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, Decimal):
        return f"{value:f}"
    return str(value)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Aligned columns, numbers right-aligned; '(none)' for no rows."""
    if not rows:
        return "(none)"
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    numeric = [all(isinstance(row.get(c), int | Decimal) for row in rows
                   if row.get(c) is not None) for c in columns]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if n else v.ljust(w)
                         for v, w, n in zip(values, widths, numeric, strict=True)).rstrip()

    return "\n".join([line([c.upper() for c in columns]), *(line(r) for r in cells)])


def to_csv(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if row.get(c) is None else _cell(row.get(c)) for c in columns])
    return out.getvalue().rstrip("\n")


def to_json(value: Any) -> str:
    """Decimals as strings (exact), never floats."""
    def default(obj: Any) -> Any:
        if isinstance(obj, Decimal):
            return f"{obj:f}"
        raise TypeError(f"{type(obj).__name__} is not JSON serialisable")
    return json.dumps(value, indent=2, sort_keys=False, default=default)


class Progress:
    """`label [#####-----] 5/10` redrawn on stderr, only when stderr is a terminal."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() and total > 1
        self.label, self.total, self.done = label, total, 0

    def step(self) -> None:
        self.done += 1
        if self.enabled:
            filled = 30 * self.done // self.total
            self.stream.write(f"\r{self.label} [{'#' * filled}{'-' * (30 - filled)}] "
                              f"{self.done}/{self.total}")
            if self.done >= self.total:
                self.stream.write("\n")
            self.stream.flush()

    def over(self, items: Iterable[Any]) -> Iterable[Any]:
        for item in items:
            yield item
            self.step()
