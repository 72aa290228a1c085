"""Text tables the benchmark scripts print and write: numbers formatted, column-aligned console tables, markdown
tables."""

from __future__ import annotations


def format_number(value, digits: int | None = None) -> str:
    """"—" for None; ``digits`` decimals when given, else 3 significant-ish digits (1234, 12.3, 1.23)."""
    if value is None:
        return "—"
    if digits is not None:
        return f"{value:.{digits}f}"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def console_table(header: list, cells: list, left_columns: set) -> str:
    """A column-aligned plain-text table: columns in ``left_columns`` (indices) left-aligned, the rest right."""
    widths = [max(len(h), *(len(row[i]) for row in cells)) if cells else len(h) for i, h in enumerate(header)]

    def line(values):
        return "  ".join(v.ljust(w) if i in left_columns else v.rjust(w)
                         for i, (v, w) in enumerate(zip(values, widths))).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(row) for row in cells])


def markdown_table(header: list, cells: list, left_columns: set) -> str:
    """A markdown table: columns in ``left_columns`` (indices) left-aligned, the rest right-aligned."""
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i in left_columns else "--:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


__all__ = ["format_number", "console_table", "markdown_table"]
