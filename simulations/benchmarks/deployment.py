"""Seconds per round: the same scenario on Flower's simulation engine and on the deployment engine
(`spine-fl server` + three `spine-fl client` processes on 127.0.0.1, TLS and SuperNode
authentication on, DP and SecAgg+ on), `repeats` runs of each on the same machine, interleaved.

    spine-fl benchmark deployment [--rounds 5] [--repeats 2] [--out benchmarks/deployment.json]

Round 1 is left out: in deployment it includes the sites connecting and decoding their DICOMs, in
simulation the Ray actors starting. The ratio is of the medians of every later round of every run
of each engine: on a shared 2-core machine single rounds stall (a simulation's round 2 took 5.8,
6.4 and 8.9 s against its usual 2.2-2.9 s in 3 of 11 runs), and the speed of the machine drifts
within an hour, so the runs alternate (simulation first, then deployment first, ...) and a stalled
round moves the median little where it would move a mean of four rounds by a second.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from spine_fl.shared.config import Scenario
from spine_fl.simulations.loopback import build_loopback
from spine_fl.simulations.runner import load, simulate

POLICY = {"epsilon_per_run": 60.0, "epsilon_lifetime": 200.0}
Say = Callable[[str], None]


def engine_figures(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One engine's runs (each its round seconds, wall seconds, last round's AUROC) and the summary of
    their rounds after the first."""
    later = [s for run in runs for s in run["round_seconds"][1:]]
    return {"runs": runs, "median_round_seconds_after_first": round(statistics.median(later), 2),
            "mean_round_seconds_after_first": round(statistics.mean(later), 2),
            "min_max_round_seconds_after_first": [min(later), max(later)]}


def report_of(scenario: dict[str, Any], sim: dict[str, Any], dep: dict[str, Any]) -> dict[str, Any]:
    """The file's figures from the two engines' runs, and the ratio of their medians."""
    out = {"scenario": scenario, "simulation": sim, "deployment": dep}
    out["ratio_deployment_to_simulation"] = round(
        dep["median_round_seconds_after_first"] / sim["median_round_seconds_after_first"], 2)
    return out


def _simulation_run(scenario: Scenario, folder: Path) -> dict[str, Any]:
    started = time.perf_counter()
    sim = simulate(scenario, folder)
    return {"round_seconds": [r["seconds"] for r in sim["rounds"]],
            "wall_seconds": round(time.perf_counter() - started, 1), "auroc_final_round": sim["rounds"][-1]["auroc"]}


def _deployment_run(scenario: Scenario, folder: Path) -> dict[str, Any]:
    loop = build_loopback(folder, dataclasses.asdict(scenario.run), 3, POLICY, scenario.consortium.seed)
    started = time.perf_counter()
    try:
        server = loop.start_server()
        for site in loop.sites:
            loop.start_client(site, threads=max(1, (os.cpu_count() or 1) // 3))
        if server.wait(3600) != 0:
            raise RuntimeError(f"deployment run failed:\n{loop.output('server')[-3000:]}")
    finally:
        loop.stop_all()
    dep = json.loads((loop.out_dir / "metrics.json").read_text())
    return {"round_seconds": dep["timing"]["round_seconds"], "wall_seconds": round(time.perf_counter() - started, 1),
            "auroc_final_round": dep["rounds"][-1]["auroc"]}


def run(rounds: int = 5, repeats: int = 2, say: Say = print) -> dict[str, Any]:
    if not 2 <= rounds <= 100:
        raise ValueError("the deployment suite needs 2 to 100 rounds (round 1 is left out of the medians)")
    scenario = load("default")
    run_settings = dataclasses.replace(scenario.run, rounds=rounds)
    scenario = dataclasses.replace(scenario, run=run_settings, policy=POLICY)
    engines = {"simulation": _simulation_run, "deployment": _deployment_run}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in engines}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(repeats):
            for name in (list(engines) if rep % 2 == 0 else list(reversed(engines))):
                say(f"{name} run {rep + 1}/{repeats}: {rounds} rounds of the default scenario"
                    + (" (`spine-fl server` + 3 `spine-fl client` on 127.0.0.1, TLS and SuperNode auth)"
                       if name == "deployment" else "") + " ...")
                runs[name].append(engines[name](scenario, Path(tmp) / f"{name}-{rep}"))
                say(f"{name} run {rep + 1}/{repeats}: rounds took {runs[name][-1]['round_seconds']} s")
    deployment = engine_figures(runs["deployment"])
    deployment["setup"] = ("TLS, SuperNode auth, nginx front, SuperLink state in memory, --isolation process with "
                           "spine-fl's long-lived workers, Flower polling capped at 0.1 s, pre-flight on the SecAgg+ "
                           "setup, wake-ups between local processes, Flower's HTTP middleware only where it acts")
    return report_of(
        {"name": "default", "rounds": run_settings.rounds, "repeats": repeats, "task": run_settings.task,
         "image_size": run_settings.image_size, "sites": 3, "dp": run_settings.dp, "secagg": run_settings.secagg},
        engine_figures(runs["simulation"]), deployment)


def headline(report: dict[str, Any]) -> str:
    return (f"deployment / simulation = {report['ratio_deployment_to_simulation']}x per round "
            f"(medians {report['deployment']['median_round_seconds_after_first']} s vs "
            f"{report['simulation']['median_round_seconds_after_first']} s, rounds 2-{report['scenario']['rounds']} "
            f"of {report['scenario']['repeats']} interleaved run(s) each)")
