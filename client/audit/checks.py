"""Audit: the checks `spine-fl audit` runs, in order. The list below is the whole audit.

Every check is one module with the same three names (`AuditCheck`):

    SECTIONS = ("my_section",)                 # the report sections it writes, in order
    def run(audit: AuditInputs, report) -> dict[str, Any]:
        return {"my_section": {...}}           # exactly those sections, plain JSON-able values
    def reasons(report) -> list[Reason]:
        return [reason("pass", "my topic", "What a data-protection officer is told.")]

`run` reads the site's files through `audit` (inputs.AuditInputs: received models, egress-ledger
lines, run settings, privacy-ledger records, the site and its policy; add a part there when more than
one check needs it) and the sections of the checks listed before it (`report`, read-only). `reasons`
reads the finished report and says, per finding, "fail" (privacy broken or the record untrustworthy),
"attention" (someone should look) or "pass" (what was checked and held); the verdict is the worst
level among all checks' reasons (verdict.py), and the page lists them.

To add a check: write `client/audit/<check>.py` with those three names, and add the module to
CHECKS below, after the checks whose sections it reads. The report gains its sections and the
verdict its reasons; client/audit/report.py shows the sections it knows how to draw.
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol, runtime_checkable

from spine_fl.client.audit import (
    budget,
    coordinator_record,
    egress_scan,
    ledger_integrity,
    membership_inference,
    policy_compliance,
)
from spine_fl.client.audit.inputs import AuditInputs, Reason


@runtime_checkable
class AuditCheck(Protocol):
    """One audit check (a module): the report sections it writes, how it computes them, what it concludes."""

    SECTIONS: tuple[str, ...]

    def run(self, audit: AuditInputs, report: Mapping[str, Any]) -> dict[str, Any]:
        """The check's report sections, keyed as in SECTIONS; `report` holds the earlier checks' sections."""
        ...

    def reasons(self, report: Mapping[str, Any]) -> list[Reason]:
        """Its plain-language fail / attention / pass reasons, from the finished report."""
        ...


CHECKS: tuple[AuditCheck, ...] = (
    ledger_integrity,  # "integrity", "egress": is the egress ledger intact, and what left per run and round
    coordinator_record,  # "coordinator_record": the pinned key and last ledger head vs the site's files
    egress_scan,  # "payload_scan": identifiers, raw images or undeclared data in what left
    budget,  # "privacy_budget": epsilon per round, run and lifetime, three ways
    policy_compliance,  # "policy": each run against the site's policy, every refusal (reads the budget)
    membership_inference,  # "membership_inference": attacks on the final model (reads the budget)
)
