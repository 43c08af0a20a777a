"""Append a measured row to a table of docs/results.md: the table that follows a given heading."""

from __future__ import annotations

from pathlib import Path

from siamese_omniglot.files import atomic_write


def insert_row(path: str | Path, heading: str, row: str) -> None:
    """Add ``row`` after the last row of the first table below the line ``heading``."""
    path = Path(path)
    lines = path.read_text().splitlines()
    if heading not in lines:
        raise SystemExit(f"{path}: no heading {heading!r} to add the row under")
    index = lines.index(heading) + 1
    while index < len(lines) and not lines[index].startswith("|"):
        index += 1
    while index < len(lines) and lines[index].startswith("|"):
        index += 1
    lines.insert(index, row)
    with atomic_write(path, "w") as file:  # a crash mid-write leaves the page as it was, not cut short
        file.write("\n".join(lines) + "\n")
