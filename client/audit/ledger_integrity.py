"""Audit: is the site's egress ledger intact, and what does it say left the site, per run and round.

The ledger is the site's own signed record of every reply that left it; the audit reads it, never
the coordinator's account. Lines after the first broken one are still summarised (they are what
the file says), but the summary states that they are unverified. Each line names Flower's run id;
the audit groups lines by run key (one run across coordinator restarts) where the site knows it.
A ledger that is missing or empty although the site's other records show it took part (DP rounds
in its privacy ledger, final models it received) is a failure, not an empty record: the record of
what left the site was deleted or never written.
The check writes two report sections: "integrity" and "egress" (what left).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping

from spine_fl.client.audit.inputs import AuditInputs, Reason, reason
from spine_fl.client.privacy.egress_ledger import LEDGER_FILE, verify

SECTIONS = ("integrity", "egress")


def integrity(state_dir: Path) -> dict[str, Any]:
    """Every signature and hash link checked; the first broken line (1-based) named."""
    result = verify(state_dir)
    return {"ledger": str(Path(state_dir) / LEDGER_FILE), **asdict(result)}


def _metric_value(value: Any) -> Any:
    """Byte payloads are recorded by size and hash; the summary keeps their size."""
    if isinstance(value, dict):
        return {k: value[k] for k in ("bytes", "items") if k in value}
    return value


def _message(entry: dict[str, Any]) -> dict[str, Any]:
    return {
        "line": entry["line"],
        "kind": entry.get("kind", "?"),
        "arrays": [{k: a.get(k) for k in ("name", "shape", "dtype", "bytes")} for a in entry.get("arrays", [])],
        "metrics": {k: _metric_value(v) for k, v in entry.get("metrics", {}).items()},
        "num_examples": entry.get("num_examples"),
        "bytes": entry.get("total_bytes", 0),
        "error": entry.get("error"),
    }


def egress_summary(lines: list[dict[str, Any]], first_broken_line: int | None = None) -> dict[str, Any]:
    """Per run and round: message kinds, arrays, metric names and values, example counts, bytes."""
    runs: dict[str, dict[tuple[str, int | None], list[dict[str, Any]]]] = {}
    for entry in lines:
        if entry.get("unreadable"):
            continue
        key = (str(entry.get("run_id", "?")), entry.get("round"))
        runs.setdefault(entry["run"], {}).setdefault(key, []).append(_message(entry))
    summary = []
    for run_id, rounds in runs.items():
        messages = [m for msgs in rounds.values() for m in msgs]
        summary.append({
            "run_id": run_id,
            "flower_run_ids": list(dict.fromkeys(flower for flower, _ in rounds)),
            "messages": len(messages),
            "bytes": sum(int(m["bytes"] or 0) for m in messages),
            "kinds": sorted({m["kind"] for m in messages}),
            "errors": sum(1 for m in messages if m["error"]),
            "rounds": [{"flower_run_id": f, "round": r, "messages": msgs} for (f, r), msgs in rounds.items()],
        })
    unverified = None if first_broken_line is None else f"lines from {first_broken_line} on are unverified"
    return {"lines": len(lines), "runs": summary, "unverified": unverified}


def activity(audit: AuditInputs) -> dict[str, Any]:
    """What the site's other records say it did: every reply it sent should be in the egress ledger."""
    records = audit.privacy_records
    return {"dp_rounds_recorded": len(records), "dp_runs_recorded": list(dict.fromkeys(r.run_id for r in records)),
            "final_models_received": len(audit.received)}


def run(audit: AuditInputs, report: Mapping[str, Any]) -> dict[str, Any]:
    audit.progress("checking the egress ledger")
    check = {**integrity(audit.site.state_dir), "activity": activity(audit)}
    return {"integrity": check, "egress": egress_summary(audit.lines, check["first_broken_line"])}


def reasons(report: Mapping[str, Any]) -> list[Reason]:
    check = report["integrity"]
    if not check["ok"]:
        where = f"line {check['first_broken_line']}" if check["first_broken_line"] else "the ledger as a whole"
        return [reason("fail", "ledger", f"The egress ledger was altered: {where} of {check['ledger']} fails "
                       f"verification ({check['problem']}). The record of what left the site cannot be trusted "
                       "from there on.")]
    if check["lines"] == 0:
        done = check.get("activity") or {}
        evidence = []
        if done.get("dp_rounds_recorded"):
            evidence.append(f"its privacy ledger records {done['dp_rounds_recorded']} DP round(s) in "
                            f"{len(done['dp_runs_recorded'])} run(s)")
        if done.get("final_models_received"):
            evidence.append(f"it holds {done['final_models_received']} final shared model(s) it received")
        if evidence:
            return [reason("fail", "ledger", f"The egress ledger ({check['ledger']}) is missing or empty, yet this "
                           f"site took part in training: {' and '.join(evidence)}. The record of what left the "
                           "site was deleted or never written, so nothing that left it can be checked.")]
        return [reason("attention", "ledger", "The egress ledger is empty: nothing is recorded as having left "
                       "this site. If the site took part in a run, its ledger is missing.")]
    return [reason("pass", "ledger", f"Egress ledger intact: all {check['lines']} lines carry a valid "
                   "signature and hash link.")]
