"""Seconds per round: the same scenario on Flower's simulation engine and on the deployment engine
(`spine-fl server` + three `spine-fl client` processes on 127.0.0.1, TLS and SuperNode
authentication on, DP and SecAgg+ on), one run each on the same machine.

    spine-fl benchmark deployment [--rounds 5] [--out benchmarks/deployment.json]

Round 1 is left out of the means: in deployment it includes the sites connecting and decoding
their DICOMs, in simulation the Ray actors starting.
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

from spine_fl.simulations.loopback import build_loopback
from spine_fl.simulations.runner import load, simulate

POLICY = {"epsilon_per_run": 60.0, "epsilon_lifetime": 200.0}


def _mean_after_first(seconds: list[float]) -> float:
    return round(statistics.mean(seconds[1:]), 2)


def report_of(scenario: dict[str, Any], sim: dict[str, Any], dep: dict[str, Any]) -> dict[str, Any]:
    """The file's figures from the two runs: per-round seconds, their means after round 1, the ratio."""
    out = {"scenario": scenario, "simulation": sim, "deployment": dep}
    out["ratio_deployment_to_simulation"] = round(
        dep["mean_round_seconds_after_first"] / sim["mean_round_seconds_after_first"], 2)
    return out


def run(rounds: int = 5, say: Callable[[str], None] = print) -> dict[str, Any]:
    if not 2 <= rounds <= 100:
        raise ValueError("the deployment suite needs 2 to 100 rounds (round 1 is left out of the means)")
    scenario = load("default")
    run_settings = dataclasses.replace(scenario.run, rounds=rounds)
    scenario = dataclasses.replace(scenario, run=run_settings, policy=POLICY)

    with tempfile.TemporaryDirectory() as tmp:
        say(f"simulation: {rounds} rounds of the default scenario ...")
        started = time.perf_counter()
        sim = simulate(scenario, Path(tmp) / "simulation")
        sim_seconds = [r["seconds"] for r in sim["rounds"]]
        sim_wall = time.perf_counter() - started
        say(f"simulation: rounds took {sim_seconds} s")

        say("deployment: `spine-fl server` + 3 `spine-fl client` on 127.0.0.1, TLS and SuperNode auth ...")
        loop = build_loopback(Path(tmp) / "deployment", dataclasses.asdict(run_settings), 3, POLICY,
                              scenario.consortium.seed)
        started = time.perf_counter()
        try:
            server = loop.start_server()
            for site in loop.sites:
                loop.start_client(site, threads=max(1, (os.cpu_count() or 1) // 3))
            if server.wait(3600) != 0:
                raise RuntimeError(f"deployment run failed:\n{loop.output('server')[-3000:]}")
        finally:
            loop.stop_all()
        dep_wall = time.perf_counter() - started
        dep = json.loads((loop.out_dir / "metrics.json").read_text())
        dep_seconds = dep["timing"]["round_seconds"]
        say(f"deployment: rounds took {dep_seconds} s")

    return report_of(
        {"name": "default", "rounds": run_settings.rounds, "task": run_settings.task,
         "image_size": run_settings.image_size, "sites": 3, "dp": run_settings.dp, "secagg": run_settings.secagg},
        {"round_seconds": sim_seconds, "mean_round_seconds_after_first": _mean_after_first(sim_seconds),
         "wall_seconds": round(sim_wall, 1), "auroc_final_round": sim["rounds"][-1]["auroc"]},
        {"round_seconds": dep_seconds, "mean_round_seconds_after_first": _mean_after_first(dep_seconds),
         "wall_seconds": round(dep_wall, 1), "auroc_final_round": dep["rounds"][-1]["auroc"],
         "setup": "TLS, SuperNode auth, nginx front, SuperLink state in memory, --isolation process with "
                  "spine-fl's long-lived workers, Flower polling capped at 0.1 s, pre-flight on the SecAgg+ setup, "
                  "wake-ups between local processes, Flower's HTTP middleware only where it acts"})


def headline(report: dict[str, Any]) -> str:
    return (f"deployment / simulation = {report['ratio_deployment_to_simulation']}x per round "
            f"({report['deployment']['mean_round_seconds_after_first']} s vs "
            f"{report['simulation']['mean_round_seconds_after_first']} s, rounds 2-{report['scenario']['rounds']})")
