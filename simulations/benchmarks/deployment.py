"""Seconds per round: the same scenario on Flower's simulation engine and on the deployment engine
(`spine-fl server` + three `spine-fl client` processes on 127.0.0.1, TLS and SuperNode
authentication on, DP and SecAgg+ on), one run each on the same machine.

    python -m spine_fl.simulations.benchmarks.deployment [--rounds 5] [--out benchmarks/deployment_rounds.json]

Round 1 is left out of the means: in deployment it includes the sites connecting and decoding
their DICOMs, in simulation the Ray actors starting.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from spine_fl.shared.files import atomic_write_json
from spine_fl.simulations.loopback import build_loopback
from spine_fl.simulations.runner import load, simulate

POLICY = {"epsilon_per_run": 60.0, "epsilon_lifetime": 200.0}


def _mean_after_first(seconds: list[float]) -> float:
    return round(statistics.mean(seconds[1:]), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, choices=range(2, 101), metavar="2..100")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/deployment_rounds.json"))
    args = parser.parse_args()
    scenario = load("default")
    run = dataclasses.replace(scenario.run, rounds=args.rounds)
    scenario = dataclasses.replace(scenario, run=run, policy=POLICY)

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        sim = simulate(scenario, Path(tmp) / "simulation")
        sim_seconds = [r["seconds"] for r in sim["rounds"]]
        sim_wall = time.perf_counter() - started

        loop = build_loopback(Path(tmp) / "deployment", dataclasses.asdict(run), 3, POLICY, scenario.consortium.seed)
        started = time.perf_counter()
        try:
            server = loop.start_server()
            for site in loop.sites:
                loop.start_client(site, threads=max(1, (os.cpu_count() or 1) // 3))
            if server.wait(3600) != 0:
                sys.exit(f"deployment run failed:\n{loop.output('server')[-3000:]}")
        finally:
            loop.stop_all()
        dep_wall = time.perf_counter() - started
        dep = json.loads((loop.out_dir / "metrics.json").read_text())
        dep_seconds = dep["timing"]["round_seconds"]

    result = {
        "command": "python -m spine_fl.simulations.benchmarks.deployment " + " ".join(sys.argv[1:]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "scenario": {"name": "default", "rounds": run.rounds, "task": run.task, "image_size": run.image_size,
                     "sites": 3, "dp": run.dp, "secagg": run.secagg},
        "simulation": {"round_seconds": sim_seconds, "mean_round_seconds_after_first": _mean_after_first(sim_seconds),
                       "wall_seconds": round(sim_wall, 1), "auroc_final_round": sim["rounds"][-1]["auroc"]},
        "deployment": {"round_seconds": dep_seconds, "mean_round_seconds_after_first": _mean_after_first(dep_seconds),
                       "wall_seconds": round(dep_wall, 1), "auroc_final_round": dep["rounds"][-1]["auroc"],
                       "setup": "TLS, SuperNode auth, --isolation process with spine-fl's long-lived workers, "
                                "Flower polling capped at 0.1 s"},
    }
    result["ratio_deployment_to_simulation"] = round(
        result["deployment"]["mean_round_seconds_after_first"] / result["simulation"]["mean_round_seconds_after_first"], 2)
    atomic_write_json(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
