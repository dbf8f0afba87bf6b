"""What every benchmark file records besides its figures: the machine, its load, the commit, the command.

Timings only mean something next to the machine they came from and how busy it was: the load
average is read at the start and at the end of a suite, so a reader can tell a quiet machine from
one shared with other work. Git is only read (GIT_OPTIONAL_LOCKS=0: `status` leaves the index alone).
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

from spine_fl.shared.files import atomic_write_json

REPO = Path(__file__).resolve().parents[2]


def git(*args: str) -> str:
    """A read-only git query in the checkout; "" when git or the repository is not there."""
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True, cwd=REPO,
                              env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"}).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def commit() -> dict[str, Any]:
    """HEAD and whether tracked files differ from it (the figures may come from uncommitted code)."""
    return {"sha": git("rev-parse", "HEAD") or None,
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def versions() -> dict[str, str | None]:
    """The libraries whose speed is measured."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "opacus", "flwr", "monai", "ray"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    return out


def machine() -> dict[str, Any]:
    """CPU, cores, GPU (when torch sees one), platform, library versions and the load at the start."""
    import torch

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "versions": versions(), "load_average_start": load_average()}


def section_heading(base: str, report: dict[str, Any]) -> str:
    """A README section per kind of machine: the GPU's figures do not replace the CPU's."""
    gpu = report["machine"].get("gpu")
    return f"{base} on {gpu}" if gpu else base


def envelope(suite: str, command: str) -> dict[str, Any]:
    """The head of a benchmark file, filled in before the suite runs."""
    return {"suite": suite, "command": command, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "commit": commit(), "machine": machine()}


def keep_partial(report: dict[str, Any], out: Path) -> None:
    """The parts of a long suite that have finished, on disk before the rest runs, marked
    `"complete": false`: a run stopped by a time limit (a GPU lease, a batch job) keeps them."""
    atomic_write_json(out, {**report, "complete": False})


def finish(report: dict[str, Any], out: Path) -> None:
    """The load at the end and a word on how shared the machine was; then the file, atomically."""
    report["complete"] = True
    m = report["machine"]
    m["load_average_end"] = load_average()
    # at the start the suite itself has not loaded the machine yet: load there is other work
    m["shared"] = m["load_average_start"][0] >= 1.0
    m["note"] = (f"1-minute load average {m['load_average_start'][0]} at start, {m['load_average_end'][0]} at end "
                 f"(this suite included) on {m['cores']} cores"
                 + (": other processes shared the machine, timings are noisy" if m["shared"] else ""))
    atomic_write_json(out, report)
