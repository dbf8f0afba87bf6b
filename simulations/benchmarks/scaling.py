"""How a round grows with the consortium: 10, 30, 100 virtual sites on the tabular task, DP + SecAgg+.

Each size is one spine-fl federation (spine_run) on its own synthetic sites, with every site
required in every round (min_sites = sites), so each round carries the full SecAgg+ cost. Seconds
per round are printed as the rounds finish; peak memory is the largest resident memory of this
process and all of Flower's/Ray's processes together (measure.PeakMemory), sampled while it runs.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from spine_fl.simulations.benchmarks import spine_run
from spine_fl.simulations.benchmarks.measure import PeakMemory, summary

TASK = "rbp_tabular"
SIZES = (10, 30, 100)


def secagg_setup(run: Any, sites: int) -> dict[str, Any]:
    """What SecAgg+ was asked for at this size: shares per site and how many unmask a site."""
    from spine_fl.server.secure_aggregation import secagg_fit_workflow

    w = secagg_fit_workflow(run)
    if w is None:
        return {}
    if hasattr(w, "shares_for"):  # spine-fl decides the share count per round from the sites selected
        shares, threshold = w.shares_for(sites)
    else:
        shares = round(w.num_shares * sites) if isinstance(w.num_shares, float) else w.num_shares
        threshold = w.reconstruction_threshold
    return {"shares_per_site": shares, "reconstruction_threshold": threshold}


def measure_size(sites: int, rounds: int, tmp: Path, say: Callable[[str], None]) -> dict[str, Any]:
    scenario = spine_run.scenario_for(TASK, sites, rounds, dp=True, secagg=True)
    say(f"{sites} sites: writing the synthetic sites ...")
    site_dirs = spine_run.write_sites(scenario, tmp / f"sites-{sites}")
    seconds: list[float] = []
    mark = [time.perf_counter()]

    def on_round(server_round: int) -> None:
        now = time.perf_counter()
        seconds.append(now - mark[0])
        mark[0] = now
        say(f"{sites} sites: round {server_round} took {seconds[-1]:.1f} s")

    say(f"{sites} sites: {rounds} rounds of {TASK}, DP-SGD + SecAgg+ ...")
    started = time.perf_counter()
    error = None
    with PeakMemory() as peak:
        try:
            spine_run.run(scenario, site_dirs, tmp / f"run-{sites}", on_round)
        except Exception as exc:  # noqa: BLE001 - recorded: a size that fails is a finding
            error = f"{type(exc).__name__}: {exc}"
    wall = time.perf_counter() - started
    out = {"sites": sites, "rounds": rounds, "rounds_completed": len(seconds), "round_seconds": summary(seconds, 2),
           "median_round_seconds_after_first": summary(seconds[1:], 2)["median"],
           "wall_seconds": round(wall, 1), "peak_memory_mib_process_tree": peak.mib,
           "peak_memory_mib_this_process": peak.self_mib, "secagg": secagg_setup(scenario.run, sites),
           "wall_includes": "Ray start-up, round 1 (imports, data) and spine-fl's recalibration round after the last"}
    if error:
        out["error"] = error
    say(f"{sites} sites: {len(seconds)} round(s) in {wall:.0f} s, peak memory {peak.mib} MiB (process tree)")
    return out


def run(sizes: list[int], rounds: int, say: Callable[[str], None],
        keep: Callable[[dict[str, Any]], None] = lambda figures: None) -> dict[str, Any]:
    """`keep` gets the figures so far after each consortium size (a stopped run keeps them)."""
    out: dict[str, Any] = {"task": TASK, "dp": True, "secagg": True, "results": []}
    with tempfile.TemporaryDirectory() as name:
        for n in sizes:
            out["results"].append(measure_size(n, rounds, Path(name), say))
            keep(out)
    return out


def headline(report: dict[str, Any]) -> str:
    def one(r: dict[str, Any]) -> str:
        after = r["median_round_seconds_after_first"]
        rounds = f"{after} s/round (median after round 1)" if after is not None else \
            f"{r['round_seconds']['median']} s/round (round 1 only)"
        return f"{r['sites']} sites: {rounds}, {r['peak_memory_mib_process_tree']} MiB peak" + \
            (f" FAILED ({r['error'][:60]})" if "error" in r else "")

    return "; ".join(one(r) for r in report["results"])
