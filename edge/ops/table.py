"""Plain-text tables and numbers for the operator commands (pure)."""

from __future__ import annotations

from collections.abc import Sequence


def render(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns, two spaces apart, a header line first; ends with a newline."""
    cells = [[str(c) for c in header]] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines) + "\n"


def human_bytes(n: float) -> str:
    """1536 -> '1.5KiB' (binary units, as the topology's sizes)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    raise AssertionError("unreachable")


def seconds(value: float | None) -> str:
    """A duration for a table: '42s', '-3s', '2h05m'."""
    if value is None:
        return "-"
    sign, value = ("-" if value < 0 else ""), abs(int(value))
    if value < 120:
        return f"{sign}{value}s"
    if value < 7200:
        return f"{sign}{value // 60}m{value % 60:02d}s"
    return f"{sign}{value // 3600}h{value % 3600 // 60:02d}m"
