"""Render benchmark results as Markdown: tables, notes, versions, commands.

Pure: scenarios hand over :class:`Table` objects, this module only formats.
The same text is printed to the terminal and written to
``benchmarks/results/latest.md``.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


@dataclass
class Table:
    title: str
    headers: Sequence[str]
    rows: list[Sequence[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *cells: object) -> None:
        if len(cells) != len(self.headers):
            raise ValueError(f"{self.title}: row has {len(cells)} cells, table has {len(self.headers)} columns")
        self.rows.append([str(c) for c in cells])


@dataclass
class Report:
    title: str
    summary: list[str] = field(default_factory=list)      # bullet lines under the title
    tables: list[Table] = field(default_factory=list)
    environment: list[tuple[str, str]] = field(default_factory=list)   # (what, version or fact)
    commands: list[str] = field(default_factory=list)


def _escape(cell: str) -> str:
    return cell.replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table; columns padded so it also reads as plain text."""
    body = [[_escape(str(c)) for c in row] for row in rows]
    head = [_escape(h) for h in headers]
    widths = [max([len(h)] + [len(r[i]) for r in body]) for i, h in enumerate(head)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    out = [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in body]
    return "\n".join(out)


def render(report: Report) -> str:
    parts = [f"# {report.title}", ""]
    if report.summary:
        parts += [f"- {line}" for line in report.summary] + [""]
    for table in report.tables:
        parts += [f"## {table.title}", "", markdown_table(table.headers, table.rows), ""]
        if table.notes:
            parts += [f"- {note}" for note in table.notes] + [""]
    if report.environment:
        parts += ["## Environment", "", markdown_table(["what", "value"], report.environment), ""]
    if report.commands:
        parts += ["## Exact commands", "", "```"] + report.commands + ["```", ""]
    return "\n".join(parts)


# --------------------------------------------------------------------------- number formats

def ratio(value: float, reference: float) -> str:
    return f"{value / reference:.2f}" if reference > 0 else "n/a"


def rate(value: float) -> str:
    """Requests or queries per second, readable at a glance."""
    return f"{value:,.0f}"


def ms(value: float) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 100 else f"{value:.0f}"


def percent(share: float) -> str:
    return f"{share * 100:.0f}%"


def mib(value_bytes: float) -> str:
    return f"{value_bytes / 2**20:.1f}"


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else 0.0
