"""Tables for the terminal, markdown and CSV: the one formatter every command uses."""

from __future__ import annotations

import csv
import io
import json
import math
from typing import Optional, Sequence


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def fmt_value(value, digits: int = 4) -> str:
    """Compact text for a table cell."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        size = abs(value)
        if value == 0 or (value.is_integer() and size < 1e6):
            return str(int(value))
        if size < 1e-3 or size >= 1e6:
            return f"{value:.3g}"
        if size < 100:
            return f"{value:.{digits}f}".rstrip("0").rstrip(".")
        return f"{value:.1f}"
    if isinstance(value, (list, tuple)):
        return ",".join(fmt_value(v, digits) for v in value)
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence], fmt: str = "text",
                 numeric: Optional[Sequence[bool]] = None) -> str:
    """Render rows as an aligned text table, a markdown table or CSV.

    Cells that are not strings are formatted with :func:`fmt_value`; columns of numbers
    (or those flagged in ``numeric``) are right-aligned.
    """
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(headers)
        for row in rows:
            writer.writerow(["" if v is None else v for v in row])
        return buf.getvalue()
    if numeric is None:
        numeric = [any(is_number(row[i]) for row in rows) and all(is_number(row[i]) or row[i] is None
                                                                   for row in rows)
                   for i in range(len(headers))]
    cells = [[v if isinstance(v, str) else fmt_value(v) for v in row] for row in rows]
    widths = [max([len(str(h))] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def join(values, sep):
        return sep.join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric))

    if fmt == "markdown":
        rule = "|" + "|".join("-" * (w + 1) + ":" if num else "-" * (w + 2) for w, num in zip(widths, numeric)) + "|"
        lines = ["| " + join([str(h) for h in headers], " | ") + " |", rule]
        lines += ["| " + join(r, " | ") + " |" for r in cells]
    else:
        lines = [join([str(h) for h in headers], "  ").rstrip(), "  ".join("-" * w for w in widths)]
        lines += [join(r, "  ").rstrip() for r in cells]
    return "\n".join(lines) + "\n"


def fmt_duration(seconds: Optional[float]) -> str:
    """A wall time as 1h02m, 3m05s or 42s ("-" when unknown)."""
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"
