"""A deployed run's result, from what the coordinator legitimately has: the sites' evaluation
reports of the final round (per site and example-weighted), their update sizes, privacy reports,
refusals, dropouts and timing. Patient-level predictions never reach the coordinator, so pooled
and local-only baselines exist only in simulation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from spine_fl.server.deployment.federation_config import FederationConfig
from spine_fl.server.reporting import plots
from spine_fl.server.reporting.federation_record import FEDERATION_FILE
from spine_fl.server.reporting.run_result import RunResult, write_run_result, write_run_status
from spine_fl.shared import protocol


def final_round_summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The last evaluated round's example-weighted metrics, in the shape of a simulation's summary."""
    final = rounds[-1] if rounds else {"per_site": {}}
    per_site = final["per_site"]
    n = sum(int(m.get("n", 0)) for m in per_site.values())
    events = sum(m.get("n", 0) * m.get("prevalence", 0.0) for m in per_site.values())
    return {**{k: final.get(k) for k in protocol.ROUND_METRICS}, "n": n,
            "prevalence": events / n if n else None, "per_site": per_site, "round": final.get("round")}


def deployment_result(fed: FederationConfig, bundle_sha256: str, seconds: float) -> RunResult:
    federation = json.loads((fed.out_dir / FEDERATION_FILE).read_text())
    rounds = federation["rounds"]
    federated = final_round_summary(rounds)
    trained = federation.get("train_examples", {})
    return RunResult(
        engine="deployment",
        task=fed.run.task,
        sites=list(fed.sites),
        patients={s: {"train": trained.get(s), "test": federated["per_site"].get(s, {}).get("n"), "external": None}
                  for s in fed.sites},
        federated=federated,
        status=federation["status"],
        stop_reason=federation["stop_reason"],
        rounds=rounds,
        dropouts=federation["dropouts"],
        failed_rounds=federation["failed_rounds"],
        resumed_after_round=federation["resumed_after_round"],
        privacy=federation["privacy"],
        ledgers=federation["ledgers"],
        calibration=federation.get("calibration"),  # the recalibration round's map and threshold
        config={"run": fed.run.to_run_config(), "federation_file": str(fed.path)},
        bundle_sha256=bundle_sha256,
        timing={"coordinator_seconds": round(seconds, 1), "round_seconds": [r.get("seconds") for r in rounds]},
    )


def write_deployment_results(fed: FederationConfig, bundle_sha256: str, seconds: float) -> RunResult:
    result = deployment_result(fed, bundle_sha256, seconds)
    write_run_result(fed.out_dir, result)
    if result.rounds:
        plots.metric_per_round(fed.out_dir / "auroc_per_round.png", result.rounds, {})
    return result


def run_with_status(out_dir: Path, run: Callable[[], RunResult]) -> RunResult:
    """Run the coordinator with the results folder's run_status.json kept true, as `spine-fl simulate`
    does: "running" until the end, then the result's status ("completed" or "stopped", with its
    reason), or "failed" with the reason when the run raised or was interrupted. A crashed rerun into
    an old results folder thus never leaves the old metrics.json looking current (`spine-fl report`
    refuses a folder whose run is running or failed)."""
    write_run_status(out_dir, "running")
    try:
        result = run()
    except KeyboardInterrupt:
        write_run_status(out_dir, "failed", "interrupted (KeyboardInterrupt) before the run finished")
        raise
    except BaseException as exc:
        write_run_status(out_dir, "failed", f"{type(exc).__name__}: {exc}")
        raise
    write_run_status(out_dir, result.status, result.stop_reason)
    return result
