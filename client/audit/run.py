"""The site's privacy audit (`spine-fl audit`): run at the site, from the site's own files only.

Reads the egress ledger, the privacy ledger, the site's policy, its data folder and the shared
models it received (inputs.py, each read once); runs the checks listed in checks.py in order, each
adding its sections to the report; combines their reasons into the verdict (verdict.py); writes
audit.json and audit.html (report.py).
"""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np

from spine_fl.client.audit import checks
from spine_fl.client.audit.inputs import AuditInputs
from spine_fl.client.audit.report import write_report
from spine_fl.client.audit.verdict import verdict
from spine_fl.client.site_config import Site

VERDICT = "verdict"  # the section run_audit writes after the checks


def run_audit(site: Site, out_dir: Path, *, policy_found: bool = True, policy_source: str = "site config",
              shadow_models: int = 8, bootstrap: int = 1000, seed: int = 0,
              coordinator_record: dict[str, Any] | None = None, coordinator_record_source: str | None = None,
              progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Audit one site and write audit.json and audit.html into out_dir; returns the report.
    `coordinator_record`: the run result's entry for the site (metrics.json "ledgers"), when given."""
    audit = AuditInputs(site, policy_found=policy_found, policy_source=policy_source, shadow_models=shadow_models,
                        bootstrap=bootstrap, seed=seed, progress=progress, coordinator_record=coordinator_record,
                        coordinator_record_source=coordinator_record_source)
    report: dict[str, Any] = {
        "site": site.name,
        "generated_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "inputs": audit.describe(),
    }
    audit_checks = checks.CHECKS
    for check in audit_checks:
        report.update(run_check(check, audit, report))
    report[VERDICT] = verdict(report, audit_checks)
    write_report(out_dir, _finite(report))
    return report


def run_check(check: checks.AuditCheck, audit: AuditInputs, report: dict[str, Any]) -> dict[str, Any]:
    """One check's sections, in its SECTIONS order; a check that writes other sections, or one already
    in the report, is a programming error and says so."""
    name = getattr(check, "__name__", repr(check))
    taken = [s for s in check.SECTIONS if s in report or s == VERDICT]
    if taken:
        raise ValueError(f"audit check {name}: section(s) {', '.join(taken)} already in the report")
    sections = check.run(audit, report)
    if set(sections) != set(check.SECTIONS):
        raise ValueError(f"audit check {name} wrote section(s) {sorted(sections)}, not its SECTIONS "
                         f"{list(check.SECTIONS)}")
    return {section: sections[section] for section in check.SECTIONS}


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
