"""Audit: is the site's egress ledger intact, and what does it say left the site, per run and round.

The ledger is the site's own signed record of every reply that left it; the audit reads it, never
the coordinator's account. Lines after the first broken one are still summarised (they are what
the file says), but the summary states that they are unverified. Each line names Flower's run id;
the audit groups lines by run key (one run across coordinator restarts) where the site knows it.
A ledger that is missing or empty although the site's other records show it took part (DP rounds
in its privacy ledger, final models it received) is a failure, not an empty record: the record of
what left the site was deleted or never written. So is a ledger that lacks some of those replies: every
privacy-ledger spending is a DP reply that left (its reply carries the privacy ledger's head after
it: dataset, line number, line hash), and a spending whose reply the egress ledger does not hold
means lines were dropped from it (truncated, or edited and re-signed with the site's own key, which
an insider holds: the signatures alone cannot tell).
The check writes two report sections: "integrity" and "egress" (what left).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping

from spine_fl.client.audit.inputs import AuditInputs, Reason, reason
from spine_fl.client.privacy.egress_ledger import LEDGER_FILE, verify
from spine_fl.client.privacy.privacy_ledger import SpendRecord
from spine_fl.shared import protocol

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


HEAD_DATASET, HEAD_LINES, HEAD_SHA256, STEPS_RUN = (protocol.fit_metric(k) for k in (
    protocol.LEDGER_DATASET, protocol.LEDGER_LINES, protocol.LEDGER_SHA256, protocol.STEPS_RUN))


def dp_reply_heads(lines: list[dict[str, Any]], dataset: str) -> set[int]:
    """The privacy-ledger line numbers (of `dataset`) that the egress ledger's DP replies carried as
    their head: each DP train or recalibration reply names the privacy-ledger line of its own spending."""
    heads = set()
    for entry in lines:
        metrics = entry.get("metrics") if isinstance(entry.get("metrics"), dict) else {}
        if entry.get("error") or str(metrics.get(HEAD_DATASET, "")) != dataset:
            continue
        try:
            heads.add(int(metrics[HEAD_LINES]))
        except (KeyError, TypeError, ValueError):
            continue
    return heads


def _dp_reply_steps(lines: list[dict[str, Any]]) -> set[tuple[str, int]]:
    """(run, the run's cumulative DP steps) of every DP reply: how replies sent before they carried the
    privacy ledger's head name their round."""
    out = set()
    for entry in lines:
        metrics = entry.get("metrics") if isinstance(entry.get("metrics"), dict) else {}
        if not entry.get("error") and isinstance(metrics.get(STEPS_RUN), (int, float)):
            out.add((str(entry.get("run")), int(metrics[STEPS_RUN])))
    return out


def spending_without_reply(records: list[SpendRecord], lines: list[dict[str, Any]], dataset: str) -> list[dict[str, Any]]:
    """Privacy-ledger spendings (line, run, round) whose DP reply is not in the egress ledger: the mirror
    of the budget check's "reported without ledger record". A reply matches by the privacy-ledger head
    it carried or, for replies without one, by run and cumulative steps."""
    heads, steps = dp_reply_heads(lines, dataset), _dp_reply_steps(lines)
    run_steps: dict[str, int] = {}
    missing = []
    for number, record in enumerate(records, start=1):
        run_steps[record.run_id] = run_steps.get(record.run_id, 0) + record.steps
        if number not in heads and (record.run_id, run_steps[record.run_id]) not in steps:
            missing.append({"privacy_ledger_line": number, "run_id": record.run_id, "round": record.round})
    return missing


def activity(audit: AuditInputs) -> dict[str, Any]:
    """What the site's other records say it did: every reply it sent should be in the egress ledger."""
    records = audit.privacy_records
    return {"dp_rounds_recorded": len(records), "dp_runs_recorded": list(dict.fromkeys(r.run_id for r in records)),
            "final_models_received": len(audit.received),
            "dp_replies_missing": spending_without_reply(records, audit.lines, audit.dataset_id),
            "dp_reply_heads": sorted(dp_reply_heads(audit.lines, audit.dataset_id))}


def _rounds(missing: list[dict[str, Any]]) -> str:
    """"run r1 round(s) 2, 3; run r2 round(s) 1"."""
    runs: dict[str, list[str]] = {}
    for item in missing:
        runs.setdefault(str(item["run_id"]), []).append(str(item["round"]))
    return "; ".join(f"run {run} round(s) {', '.join(rounds)}" for run, rounds in runs.items())


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
    missing = (check.get("activity") or {}).get("dp_replies_missing") or []
    if missing:
        lines = ", ".join(str(m["privacy_ledger_line"]) for m in missing)
        return [reason("fail", "ledger", f"The egress ledger ({check['ledger']}) lacks the DP replies of "
                       f"{len(missing)} spending(s) in the privacy ledger: {_rounds(missing)} (privacy-ledger "
                       f"line(s) {lines}). Each of those updates left the site, yet its record is gone: lines were "
                       "removed from the egress ledger and its head re-signed (with the site's key), so its "
                       "signatures prove nothing about what left the site.")]
    return [reason("pass", "ledger", f"Egress ledger intact: all {check['lines']} lines carry a valid "
                   "signature and hash link, and every spending in the privacy ledger has its reply there.")]
