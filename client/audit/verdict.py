"""Audit: the verdict a data-protection officer reads first, each level with its plain-language reasons.

fail       the record cannot be trusted or privacy was demonstrably broken: an altered ledger, an
           egress ledger missing or emptied while the site's other records show it took part, an
           identifier or undeclared data in a payload, a run that trained against the site's
           policy or over budget, spending left unrecorded, or a membership attack that beats what
           the run's (epsilon, delta) allows or separates members clearly (AUC interval >= 0.60);
attention  nothing broken, but someone should look: a run without DP or without SecAgg+, no policy
           or no final model to audit, budget nearly spent, epsilon figures that disagree, an
           attack clearly above chance (AUC interval > 0.55) yet within the DP ceiling;
pass       everything else, with the checks that passed as its reasons.

Each check words its own reasons (`reasons(report)` in its module, see checks.py); this module only
combines them, and picks what the first screen shows.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from spine_fl.client.audit import checks
from spine_fl.client.audit.inputs import LEVELS, Reason


def verdict(report: Mapping[str, Any], audit_checks: Iterable[checks.AuditCheck] | None = None) -> dict[str, Any]:
    """The worst level among all checks' reasons (checks.CHECKS unless given); reasons ordered fail,
    attention, pass, each level in the checks' order."""
    reasons: list[Reason] = [r for check in (checks.CHECKS if audit_checks is None else audit_checks)
                             for r in check.reasons(report)]
    level = max((r["level"] for r in reasons), key=LEVELS.index, default="pass")
    reasons.sort(key=lambda r: -LEVELS.index(r["level"]))
    return {"verdict": level, "reasons": reasons}


def headline(result: dict[str, Any]) -> list[str]:
    """What the first screen lists: every problem (attention ones marked when the verdict is fail),
    or, on a pass, the checks that passed."""
    if result["verdict"] == "pass":
        return [r["text"] for r in result["reasons"]]
    return [("Attention: " if r["level"] == "attention" and result["verdict"] == "fail" else "") + r["text"]
            for r in result["reasons"] if r["level"] != "pass"]
