"""What the coordinator writes: the shared model with the task and settings it belongs to."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from spine_fl.server.secure_aggregation import QUANTIZATION_RANGE
from spine_fl.server.strategy import RoundLog
from spine_fl.shared.config import RunSettings
from spine_fl.shared.files import atomic_write_json

# The model file is read at the sites too (`spine-fl predict`): it lives in shared/, re-exported here.
from spine_fl.shared.models.model_file import MODEL_FILE, load_model, privacy_record, save_model

__all__ = ["FEDERATION_FILE", "MODEL_FILE", "load_model", "privacy_section", "save_model", "write_federation_results"]

FEDERATION_FILE = "federation.json"


def privacy_section(settings: RunSettings, sites: list[str], log: RoundLog,
                    calibration: dict[str, Any] | None = None) -> dict[str, Any]:
    """Per site: what this run's training spent, as the site reported it after its last trained round
    ("epsilon"), and with the recalibration histogram's release included ("epsilon_total": the run's
    whole spending, as the site reported it after that round; the training figure when it sent none)."""
    per_site = {}
    recalibrated = (calibration or {}).get("privacy") or {}
    for site in sites:
        reported = log.privacy.get(site, {})
        dp = bool(reported.get("dp", settings.dp))
        total = recalibrated.get(site, {}).get("epsilon_run", reported.get("epsilon_run"))
        per_site[site] = {
            "epsilon_total": total if dp else None,
            "epsilon": reported.get("epsilon_run") if dp else None,
            "epsilon_lifetime": reported.get("epsilon_lifetime") if dp else None,
            "delta": reported.get("delta") if dp else None,
            "noise_multiplier": reported.get("noise_multiplier") if dp else None,
            "max_grad_norm": reported.get("max_grad_norm") if dp else None,
            "sample_rate": reported.get("sample_rate") if dp else None,
            "steps": int(reported["steps_run"]) if dp and "steps_run" in reported else None,
            "accountant": settings.accountant,
            "dp": dp,
            "secagg": settings.secagg,
            "trained": site in log.privacy,
        }
    return {"per_site": per_site, "refusals": log.refusals,
            "secagg": {"enabled": settings.secagg, "clipping_range": settings.secagg_clipping_range,
                       "max_weight": settings.secagg_max_weight, "quantization_range": QUANTIZATION_RANGE}}


def write_federation_results(out_dir: Path, settings: RunSettings, sites: list[str],
                             weights: list[np.ndarray], log: RoundLog, ledgers: dict[str, Any],
                             resumed_after: int = 0, calibration: dict[str, Any] | None = None) -> None:
    """`ledgers`: per site, the pinned ledger key and the last privacy-ledger head (CoordinatorRecord.summary).
    `calibration`: the recalibration round's section (server/calibration.py); a fitted map is folded
    into model.pt's output layer and recorded beside the weights with the recommended threshold."""
    privacy = privacy_section(settings, sites, log, calibration)
    save_model(out_dir / MODEL_FILE, settings, weights, calibration, privacy_record(privacy["per_site"]),
               run_status="stopped" if log.stopped else "completed", stop_reason=log.stopped or None,
               rounds_trained=len(log.trained_rounds))  # a stopped run's weights are never scored as a result
    atomic_write_json(out_dir / FEDERATION_FILE, {
        "task": settings.task, "sites": sites, "config": settings.to_run_config(),
        "status": "stopped" if log.stopped else "completed", "stop_reason": log.stopped or None,
        "rounds": log.rounds, "dropouts": log.dropouts, "failed_rounds": log.failed_rounds,
        "resumed_after_round": resumed_after or None, "train_examples": log.train_examples,
        "privacy": privacy, "ledgers": ledgers,
        "calibration": calibration})
