"""Medians with their spread, and peak memory of a process tree.

A Flower simulation trains in Ray worker processes, not in the process that started it, so the
peak resident memory of this process alone says little: the sampler sums the resident memory of
this process and every descendant (Ray's raylet, GCS and workers) a few times a second and keeps
the largest sum. Linux only (/proc); elsewhere it reports this process's own peak.
"""

from __future__ import annotations

import os
import resource
import statistics
import threading
from pathlib import Path
from typing import Any

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def peak_rss_mib() -> int:
    """This process's own peak resident memory (VmHWM). Not ru_maxrss: Linux carries the parent's
    high-water mark across fork + exec into it, so a child started by a large parent would report
    at least the parent's size."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024)  # kB
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # KiB on Linux


def summary(values: list[float], digits: int = 3) -> dict[str, Any]:
    """Median, min, max and the values themselves (None figures when there is no value)."""
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0, "values": []}
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits), "n": len(values), "values": [round(v, digits) for v in values]}


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])  # the command name may hold spaces
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def tree_rss_bytes(root: int | None = None) -> int:
    """Resident memory of `root` (default: this process) and all its descendants."""
    tree, todo, total = _children(), [root or os.getpid()], 0
    while todo:
        pid = todo.pop()
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            pass
        todo += tree.get(pid, [])
    return total


class PeakMemory:
    """`with PeakMemory() as peak: ...`, then `peak.mib` (process tree) and `peak.self_mib` (this process)."""

    def __init__(self, interval: float = 0.25):
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.on_proc = Path("/proc/self/statm").exists()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        if self.on_proc:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.on_proc:
            self._thread.join()

    @property
    def mib(self) -> int:
        return round((self.peak or self.self_mib * 2**20) / 2**20)

    @property
    def self_mib(self) -> int:
        return peak_rss_mib()
