"""The site's privacy audit (`spine-fl audit`): run at the site, from the site's own files only.

Reads the egress ledger, the privacy ledger, the site's policy, its data folder and the shared
models it received; writes audit.json and audit.html. Each part is one module:
audit_ledger (integrity, what left), audit_scan (payload scan), audit_budget (epsilon),
audit_policy (compliance, refusals), membership_inference (attacks), audit_verdict, audit_report.
"""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np

from spine_fl.client.audit.budget import budget_report, reported_epsilons
from spine_fl.client.audit.egress_scan import DeclaredModel, collect_identifiers, scan_payloads, scan_report
from spine_fl.client.audit.ledger_integrity import egress_summary, integrity, read_lines
from spine_fl.client.audit.membership_inference import membership_audit
from spine_fl.client.audit.policy_compliance import compliance
from spine_fl.client.audit.report import write_report
from spine_fl.client.audit.verdict import verdict
from spine_fl.client.privacy.plan import plan_round
from spine_fl.client.privacy.privacy_ledger import PrivacyLedger, PrivacyLedgerError, SpendRecord, dataset_id
from spine_fl.client.privacy.received_models import ReceivedModel, load_received
from spine_fl.client.site_config import Site
from spine_fl.shared.config import ConfigError, RunSettings
from spine_fl.shared.contract.data_contract import SiteDataError, load_site
from spine_fl.shared.contract.tasks import TASKS, get_task
from spine_fl.shared.models.registry import build_model, pick_device
from spine_fl.shared.training.local import DpSettings

SMALLEST_IMAGE = 32  # when a run's image size is unknown: the smallest size spine-fl's tests use


def model_shapes(task: str) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(v.shape) for v in build_model(get_task(task)).state_dict().values())


def _settings(received: list[ReceivedModel]) -> dict[str, RunSettings]:
    out = {}
    for model in received:
        try:
            out[model.run_id] = RunSettings.from_run_config(model.run_config)
        except (ConfigError, TypeError, ValueError):
            continue  # reported as "settings unknown" by the policy check
    return out


def _declared(settings: dict[str, RunSettings]) -> tuple[dict[str, DeclaredModel], DeclaredModel]:
    sizes = [s.image_size for s in settings.values() if get_task(s.task).image is not None] or [SMALLEST_IMAGE]
    pixels = min(sizes) ** 2
    per_run = {run: DeclaredModel((model_shapes(s.task),), pixels) for run, s in settings.items()}
    return per_run, DeclaredModel(tuple(model_shapes(t) for t in TASKS), pixels)


def _privacy_records(site: Site) -> tuple[list[SpendRecord], str | None]:
    ledger = PrivacyLedger(site.state_dir, dataset_id(site.data_dir))
    try:
        return ledger.records(), None
    except PrivacyLedgerError as exc:
        return [], str(exc)


def _membership(site: Site, received: list[ReceivedModel], settings: dict[str, RunSettings],
                records: list[SpendRecord], budget: dict[str, Any], shadow_models: int, bootstrap: int, seed: int,
                progress: Callable[[str], None]) -> dict[str, Any]:
    usable = [m for m in received if m.run_id in settings]
    if not usable:
        return {"skipped": "this site holds no final shared model (received models are kept from this version of "
                "spine-fl on, in <state_dir>/received)"}
    model = usable[-1]
    run = settings[model.run_id]
    try:
        data = load_site(site.data_dir, get_task(run.task), run.image_size)
    except SiteDataError as exc:
        return {"skipped": f"the site's data could not be loaded for task {run.task}: {exc}"}
    dp, eps, delta = None, None, None
    if run.dp:
        mine = [r for r in records if r.run_id == model.run_id]
        if mine:
            dp = DpSettings(mine[-1].noise_multiplier, mine[-1].max_grad_norm)
        else:
            dp = DpSettings(plan_round(run, int((data.split == "train").sum())).noise_multiplier, run.max_grad_norm)
        row = next((r for r in budget.get("runs", []) if r["run_id"] == model.run_id), None)
        if row is not None:
            eps, delta = row["epsilon"], row["delta"]
    progress(f"membership inference on run {model.run_id}'s final model")
    result = membership_audit(model.weights, run, model.round, data, dp, eps, delta, shadow_models,
                              bootstrap=bootstrap, seed=seed, device=pick_device(), progress=progress)
    return {"run_id": model.run_id, "round": model.round, "task": run.task, **result}


def run_audit(site: Site, out_dir: Path, *, policy_found: bool = True, policy_source: str = "site config",
              shadow_models: int = 8, bootstrap: int = 1000, seed: int = 0,
              progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Audit one site and write audit.json and audit.html into out_dir; returns the report."""
    progress("checking the egress ledger")
    check = integrity(site.state_dir)
    received = load_received(site.state_dir)
    lines = read_lines(site.state_dir, {flower: m.run_id for m in received for flower in m.flower_runs})
    settings = _settings(received)
    progress("reading identifiers from clinical.csv and DICOM headers")
    ids = collect_identifiers(site.data_dir)
    per_run, fallback = _declared(settings)
    findings = scan_payloads(lines, ids, per_run, fallback)
    progress("recomputing the privacy budget")
    records, ledger_error = _privacy_records(site)
    budget = ({"error": ledger_error} if ledger_error else
              budget_report(records, reported_epsilons(lines), site.policy))
    report: dict[str, Any] = {
        "site": site.name,
        "generated_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "inputs": {"state_dir": str(site.state_dir), "data_dir": str(site.data_dir),
                   "policy_source": policy_source, "policy_found": policy_found,
                   "dataset_id": dataset_id(site.data_dir),
                   "received_models": [{"run_id": m.run_id, "round": m.round, "task": m.task} for m in received]},
        "integrity": check,
        "egress": egress_summary(lines, check["first_broken_line"]),
        "payload_scan": scan_report(findings, len(lines), ids),
        "privacy_budget": budget,
        "policy": compliance(site.policy, lines, settings, budget if "runs" in budget else {"runs": [], "rounds": []}),
        "membership_inference": _membership(site, received, settings, records, budget, shadow_models, bootstrap,
                                            seed, progress),
    }
    report["verdict"] = verdict(report)
    write_report(out_dir, _finite(report))
    return report


def _finite(value: Any) -> Any:
    """JSON has no NaN: write non-finite numbers as null."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, (float, np.floating)) and not math.isfinite(float(value)):
        return None
    if isinstance(value, np.generic):
        return value.item()
    return value
