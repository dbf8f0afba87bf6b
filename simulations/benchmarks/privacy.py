"""What privacy costs: the default scenario with DP and SecAgg+ switched on and off, same seed.

    python -m spine_fl.simulations.benchmarks.privacy [--rounds N] [--out benchmarks/privacy_cost.json]

Writes AUROC (federated / pooled / local-only), epsilon per site and seconds per round for each
setting, with the machine and the command, to the results file (timings are wall clock on this
machine: compare ratios, not absolute numbers across machines).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from spine_fl.simulations.runner import load, simulate

# Without DP's per-sample clipping, plain SGD at the DP learning rate diverges: runs without DP
# use the optimizer they are tuned for (Adam, 1e-3); rounds, epochs, batch size and seed stay equal.
WITHOUT_DP = {"optimizer": "adam", "learning_rate": 1e-3}
SETTINGS = {
    "dp+secagg": {"dp": True, "secagg": True},
    "dp only": {"dp": True, "secagg": False},
    "secagg only": {"dp": False, "secagg": True, **WITHOUT_DP},
    "neither": {"dp": False, "secagg": False, **WITHOUT_DP},
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=None, help="override the scenario's rounds")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/privacy_cost.json"))
    args = parser.parse_args(argv)
    base = load("default")
    results = {}
    for name, switches in SETTINGS.items():
        run = replace(base.run, **switches, rounds=args.rounds or base.run.rounds)
        policy = {**base.policy, "require_dp": switches["dp"], "require_secagg": switches["secagg"]}
        scenario = replace(base, run=run, policy=policy)
        with tempfile.TemporaryDirectory() as tmp:
            metrics = simulate(scenario, Path(tmp))
        results[name] = {
            "auroc": {k: round(metrics[k]["auroc"], 4) for k in ("federated", "pooled", "local_only")},
            "epsilon": {s: p["epsilon"] for s, p in metrics["privacy"]["per_site"].items()},
            "seconds_per_round": round(metrics["timing"]["federated_seconds"] / run.rounds, 2),
            "optimizer": f"{run.optimizer} lr {run.learning_rate:g}",
            "status": metrics["status"],
        }
        print(name, json.dumps(results[name]), flush=True)
    base_time = results["neither"]["seconds_per_round"]
    for entry in results.values():
        entry["round_time_ratio_vs_neither"] = round(entry["seconds_per_round"] / base_time, 2)
    report = {
        "command": " ".join(["python -m spine_fl.simulations.benchmarks.privacy", *(argv or sys.argv[1:])]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "scenario": "default",
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
