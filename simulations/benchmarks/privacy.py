"""What privacy costs: the default scenario with DP and SecAgg+ switched on and off, same seed.

    spine-fl benchmark privacy [--rounds N] [--out benchmarks/privacy.json]

Writes AUROC (federated / pooled / local-only), epsilon per site and seconds per round for each
setting, with the machine and the command, to the results file (timings are wall clock on this
machine: compare ratios, not absolute numbers across machines).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from spine_fl.shared.config import Scenario
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


Say = Callable[[str], None]


def run(rounds: int | None = None, scenario: Scenario | None = None, settings: list[str] | None = None,
        say: Say = print) -> dict[str, Any]:
    """Each setting of `settings` (default: all four) on `scenario` (default: the shipped default)."""
    base = scenario or load("default")
    results = {}
    for name in settings or list(SETTINGS):
        switches = SETTINGS[name]
        run_settings = replace(base.run, **switches, rounds=rounds or base.run.rounds)
        policy = {**base.policy, "require_dp": switches["dp"], "require_secagg": switches["secagg"]}
        say(f"{name}: {run_settings.rounds} round(s) of scenario {base.name} ({run_settings.task}) ...")
        with tempfile.TemporaryDirectory() as tmp:
            metrics = simulate(replace(base, run=run_settings, policy=policy), Path(tmp))
        results[name] = {
            "auroc": {k: round(metrics[k]["auroc"], 4) for k in ("federated", "pooled", "local_only")},
            "epsilon": {s: p["epsilon"] for s, p in metrics["privacy"]["per_site"].items()},
            "seconds_per_round": round(metrics["timing"]["federated_seconds"] / run_settings.rounds, 2),
            "optimizer": f"{run_settings.optimizer} lr {run_settings.learning_rate:g}",
            "status": metrics["status"],
        }
        say(f"{name}: {json.dumps(results[name])}")
    base_time = results.get("neither", {}).get("seconds_per_round")
    for entry in results.values():
        entry["round_time_ratio_vs_neither"] = round(entry["seconds_per_round"] / base_time, 2) if base_time else None
    return {"scenario": base.name, "task": base.run.task, "sites": base.consortium.sites,
            "seconds_per_round_means": "federated seconds / rounds (round 1, with Ray's start-up, included)",
            "results": results}


def headline(report: dict[str, Any]) -> str:
    parts = [f"{name}: {r['seconds_per_round']} s/round, AUROC {r['auroc']['federated']}"
             + (f" ({r['round_time_ratio_vs_neither']}x neither)" if r.get("round_time_ratio_vs_neither") else "")
             for name, r in report["results"].items()]
    return "; ".join(parts) + " (per-round means include round 1 and Ray's start-up)"
