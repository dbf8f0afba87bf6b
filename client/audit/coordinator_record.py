"""Audit: do the site's ledgers agree with what the coordinator recorded of them?

Someone with the site's disk can delete both ledgers, roll them back, or make a new key and re-sign
edited copies: each ledger then verifies on its own. The coordinator's run result holds, per site,
the fingerprint of the ledger key it pinned (at enrolment or on the site's first reply) and the last
privacy-ledger head the site's replies carried. This check compares the site's files with them:
another key, a missing ledger or a ledger that no longer holds the recorded head is a failure; an
egress ledger that is empty while the coordinator recorded activity is one too, and so is one that
lacks any of the DP replies the recorded head counts (a head of n lines means n DP replies left the
site, each carrying its line number: an egress ledger truncated and re-signed with the site's own
key verifies on its own, but no longer holds them all). Without the run
result (`--run-result`, or `--run-dir` of a simulation) the comparison cannot be made, and the
verdict says so.
"""

from __future__ import annotations

from typing import Any, Mapping

from spine_fl.client.audit.inputs import AuditInputs, Reason, reason
from spine_fl.client.audit.ledger_integrity import dp_reply_heads
from spine_fl.client.privacy.privacy_ledger import PrivacyLedger
from spine_fl.client.privacy.signed_log import load_public_key
from spine_fl.shared import protocol
from spine_fl.shared.runtime.credentials import key_fingerprint

SECTIONS = ("coordinator_record",)


def run(audit: AuditInputs, report: Mapping[str, Any]) -> dict[str, Any]:
    recorded = audit.coordinator_record
    if recorded is None:
        return {"coordinator_record": {"compared": False, "source": None}}
    public = load_public_key(audit.site.state_dir)
    section: dict[str, Any] = {"compared": True, "source": audit.coordinator_record_source,
                               "pinned_key": recorded.get("ledger_key"), "key_pinned_by": recorded.get("key_pinned_by"),
                               "site_key": key_fingerprint(public) if public is not None else None}
    section["key_matches"] = section["pinned_key"] is None or section["site_key"] == section["pinned_key"]
    head = {k: recorded.get(k) for k in protocol.LEDGER_HEAD}
    if all(v is not None for v in head.values()):
        ledger = PrivacyLedger(audit.site.state_dir, str(head[protocol.LEDGER_DATASET]))
        lines, _ = ledger.log.last()
        section["head"] = {**head, "ledger": str(ledger.path), "ledger_lines_now": lines,
                           "held": ledger.log.contains(int(head[protocol.LEDGER_LINES]),
                                                       str(head[protocol.LEDGER_SHA256]))}
        sent = dp_reply_heads(audit.lines, str(head[protocol.LEDGER_DATASET]))
        section["head"]["replies_missing"] = [n for n in range(1, int(head[protocol.LEDGER_LINES]) + 1) if n not in sent]
    section["egress_lines"] = report["integrity"]["lines"]
    return {"coordinator_record": section}


def reasons(report: Mapping[str, Any]) -> list[Reason]:
    section = report["coordinator_record"]
    if not section["compared"]:
        return [reason("attention", "coordinator record", "The site's ledgers were not compared with the "
                       "coordinator's record (pinned key, last ledger head): pass the run's metrics.json with "
                       "--run-result. Without it, ledgers deleted together or re-signed with a new key go unnoticed.")]
    out = []
    if not section["key_matches"]:
        site_key = section["site_key"] or "missing (no site_ed25519.pub)"
        out.append(reason("fail", "coordinator record", f"The site's ledgers are signed by key {site_key}, not by "
                          f"the key {section['pinned_key']} the coordinator pinned at {section['key_pinned_by']}: "
                          "they were re-signed (or the key replaced), so they prove nothing about what left the site."))
    head = section.get("head")
    if head is not None and not head["held"]:
        out.append(reason("fail", "coordinator record", f"The coordinator recorded this site's privacy ledger with "
                          f"{head[protocol.LEDGER_LINES]} line(s); {head['ledger']} now has {head['ledger_lines_now']} "
                          "and does not hold that line: it was deleted, truncated or rolled back, and the epsilon "
                          "spent since is missing from it."))
    if head is not None and section["egress_lines"] == 0:
        out.append(reason("fail", "coordinator record", "The egress ledger is missing or empty, yet the coordinator "
                          "recorded DP training replies from this site: the record of what left it was deleted."))
    elif head is not None and head.get("replies_missing"):
        missing = head["replies_missing"]
        shown = ", ".join(str(n) for n in missing[:20]) + (", ..." if len(missing) > 20 else "")
        out.append(reason("fail", "coordinator record", f"The coordinator recorded a reply from this site whose "
                          f"privacy-ledger head counts {head[protocol.LEDGER_LINES]} DP repl(ies); the egress ledger "
                          f"lacks {len(missing)} of them (those naming privacy-ledger line(s) {shown}): lines were "
                          "removed from it and its head re-signed, so it no longer records everything that left."))
    if not out:
        pinned = f"the key pinned at {section['key_pinned_by']}" if section["pinned_key"] else "no pinned key"
        held = "holds the last head the coordinator recorded" if head else "(no head recorded by the coordinator)"
        out.append(reason("pass", "coordinator record", f"The site's ledgers match the coordinator's record: signed "
                          f"by {pinned}; the privacy ledger {held}."))
    return out
