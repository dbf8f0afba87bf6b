"""One row per results file in the table of benchmarks/README.md, replaced when the suite writes it again.

The table is the index a reader starts from: which suite, when, with which command, the one figure
that matters and the file with everything else. A suite run on another machine into another file
(the GPU figures beside the CPU ones, say) gets a row of its own. Other sections are left as they are.
"""

from __future__ import annotations

import os
from pathlib import Path

from spine_fl.shared.files import atomic_write_bytes

SECTION = "## Latest results"
HEADER = ("| suite | date | command | headline | file |", "|---|---|---|---|---|")
INTRO = ("Written by `spine-fl benchmark SUITE`: one row per results file, replaced each time it is written. Timings "
         "are wall clock on the machine named in the file (with its load average): compare ratios, not seconds "
         "across machines.")
NEW_README = "# Benchmarks\n\nResults files written by `spine-fl benchmark SUITE` (simulations/benchmarks/).\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def row(suite: str, date: str, command: str, headline: str, file: str) -> str:
    return f"| {_cell(suite)} | {_cell(date)} | `{_cell(command)}` | {_cell(headline)} | {_cell(file)} |"


def upsert_row(readme: Path, suite: str, date: str, command: str, headline: str, results_file: Path) -> None:
    """Add or replace the row of `results_file`; the table (and the README) are created when missing."""
    text = readme.read_text() if readme.exists() else NEW_README
    try:
        file = os.path.relpath(results_file, readme.parent)
    except ValueError:  # another drive
        file = str(results_file)
    file_cell = f"`{file}`"
    new = row(suite, date, command, headline, file_cell)
    lines = text.rstrip("\n").split("\n")
    if SECTION not in lines:
        at = next((i for i, line in enumerate(lines) if i > 0 and line.startswith("## ")), len(lines))
        block = [SECTION, "", INTRO, "", *HEADER, ""]
        lines[at:at] = block if at < len(lines) else ["", *block[:-1]]
    start = lines.index(SECTION)
    head = next(i for i in range(start, len(lines)) if lines[i] == HEADER[1])
    end = head + 1
    while end < len(lines) and lines[end].startswith("| "):
        end += 1
    rows = [r for r in lines[head + 1:end] if not r.endswith(f"| {_cell(file_cell)} |")]
    lines[head + 1:end] = sorted([*rows, new])
    atomic_write_bytes(readme, ("\n".join(lines) + "\n").encode())


def upsert_section(readme: Path, heading: str, body: list[str]) -> None:
    """Replace the section `heading` (up to the next "## ") with `body`, or append it; the rest stays."""
    text = readme.read_text() if readme.exists() else NEW_README
    lines = text.rstrip("\n").split("\n")
    block = [heading, "", *body, ""]
    if heading in lines:
        start = lines.index(heading)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines[start:end] = block if end < len(lines) else block[:-1]
    else:
        lines += ["", *block[:-1]]
    atomic_write_bytes(readme, ("\n".join(lines) + "\n").encode())
