"""metrics.json for a deployed run, from what the coordinator legitimately has: the sites'
evaluation reports of the final round (per site and example-weighted), privacy reports,
refusals, dropouts and timing. Patient-level predictions never reach the coordinator, so pooled
and local-only baselines exist only in simulation."""

from __future__ import annotations

import json

from spine_fl.shared import plots

from .federation_config import FederationConfig
from spine_fl.shared.files import atomic_write_json

from .results import FEDERATION_FILE
from .strategy import ROUND_METRICS

METRICS_FILE = "metrics.json"


def write_deployment_results(fed: FederationConfig, bundle_sha256: str, seconds: float) -> dict:
    federation = json.loads((fed.out_dir / FEDERATION_FILE).read_text())
    rounds = federation["rounds"]
    final = rounds[-1] if rounds else {"per_site": {}}
    metrics = {
        "task": fed.run.task,
        "engine": "deployment",
        "sites": list(fed.sites),
        "federated": {**{k: final.get(k) for k in ROUND_METRICS}, "per_site": final["per_site"],
                      "round": final.get("round")},
        "status": federation["status"],
        "stop_reason": federation["stop_reason"],
        "rounds": rounds,
        "dropouts": federation["dropouts"],
        "failed_rounds": federation["failed_rounds"],
        "resumed_after_round": federation["resumed_after_round"],
        "privacy": federation["privacy"],
        "config": {"run": fed.run.to_run_config(), "federation_file": str(fed.path)},
        "bundle_sha256": bundle_sha256,
        "timing": {"coordinator_seconds": round(seconds, 1), "round_seconds": [r.get("seconds") for r in rounds]},
    }
    atomic_write_json(fed.out_dir / METRICS_FILE, metrics)
    if rounds:
        plots.metric_per_round(fed.out_dir / "auroc_per_round.png", rounds, {})
    return metrics
