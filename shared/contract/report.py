"""The validation report: every problem found in a site folder, as errors and warnings.

Warnings that repeat once per patient or per file (an unlabelled patient, a DICOM without pixel
spacing) are collected by kind and given as one finding with the count and the first culprits when
there are more than NAMED of them, so a site with 37 unlabelled patients reads one line, not 37.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

NAMED = 5  # grouped findings name this many culprits, then give a count


@dataclass(frozen=True)
class Problem:
    severity: Literal["error", "warning"]
    where: str
    what: str
    action: str

    def __str__(self) -> str:
        return f"[{self.severity}] {self.where}: {self.what} -> {self.action}"


@dataclass
class _Group:
    """One kind of repeated warning: each occurrence, and how to summarise them."""

    where: str  # the file the summary points to
    summary: str  # e.g. "patients excluded: no 2-month follow-up"
    action: str
    items: list[tuple[Problem, str]] = field(default_factory=list)  # (the single warning, its culprit)


@dataclass
class ValidationReport:
    site_dir: Path
    task: str
    problems: list[Problem] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    _groups: dict[str, _Group] = field(default_factory=dict, repr=False, compare=False)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def usable(self) -> bool:
        return not self.errors

    def error(self, where: str, what: str, action: str) -> None:
        self.problems.append(Problem("error", where, what, action))

    def warn(self, where: str, what: str, action: str) -> None:
        self.problems.append(Problem("warning", where, what, action))

    def warn_grouped(self, kind: str, where: str, what: str, action: str, *, culprit: str,
                     summary_where: str, summary: str) -> None:
        """A warning that may repeat: listed on its own when few of its kind occur, else summarised."""
        group = self._groups.setdefault(kind, _Group(summary_where, summary, action))
        group.items.append((Problem("warning", where, what, action), culprit))

    def flush_groups(self) -> None:
        """Add the collected repeated warnings: each one when few, else one finding with the count."""
        for group in self._groups.values():
            if len(group.items) <= NAMED:
                self.problems.extend(problem for problem, _ in group.items)
                continue
            first = ", ".join(culprit for _, culprit in group.items[:NAMED])
            self.warn(group.where, f"{len(group.items)} {group.summary} - first: {first}, ... "
                      f"and {len(group.items) - NAMED} more", group.action)
        self._groups.clear()

    def to_dict(self) -> dict:
        return {
            "site_dir": str(self.site_dir),
            "task": self.task,
            "usable": self.usable,
            "counts": self.counts,
            "problems": [p.__dict__ for p in self.problems],
        }
