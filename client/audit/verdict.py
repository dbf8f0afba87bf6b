"""Audit: the verdict a data-protection officer reads first, each level with its plain-language reasons.

fail       the record cannot be trusted or privacy was demonstrably broken: an altered ledger, an
           identifier or undeclared data in a payload, a run that trained against the site's
           policy or over budget, spending left unrecorded, or a membership attack that beats what
           the run's (epsilon, delta) allows or separates members clearly (AUC interval >= 0.60);
attention  nothing broken, but someone should look: a run without DP or without SecAgg+, no policy
           or no final model to audit, budget nearly spent, epsilon figures that disagree, an
           attack clearly above chance (AUC interval > 0.55) yet within the DP ceiling;
pass       everything else, with the checks that passed as its reasons.
"""

from __future__ import annotations

from typing import Any

LEVELS = ("pass", "attention", "fail")
NEARLY_SPENT = 0.8
CLEAR_LEAK_AUC = 0.60
ABOVE_CHANCE_AUC = 0.55
SHOWN_FINDINGS = 5


def _reason(level: str, topic: str, text: str) -> dict[str, str]:
    return {"level": level, "topic": topic, "text": text}


def _integrity(report: dict[str, Any]) -> list[dict[str, str]]:
    check = report["integrity"]
    if not check["ok"]:
        where = f"line {check['first_broken_line']}" if check["first_broken_line"] else "the ledger as a whole"
        return [_reason("fail", "ledger", f"The egress ledger was altered: {where} of {check['ledger']} fails "
                        f"verification ({check['problem']}). The record of what left the site cannot be trusted "
                        "from there on.")]
    if check["lines"] == 0:
        return [_reason("attention", "ledger", "The egress ledger is empty: nothing is recorded as having left "
                        "this site. If the site took part in a run, its ledger is missing.")]
    return [_reason("pass", "ledger", f"Egress ledger intact: all {check['lines']} lines carry a valid "
                    "signature and hash link.")]


def _scan(report: dict[str, Any]) -> list[dict[str, str]]:
    out = []
    findings = report["payload_scan"]["findings"]
    for level in ("fail", "attention"):
        mine = [f for f in findings if f["severity"] == level]
        for f in mine[:SHOWN_FINDINGS]:
            out.append(_reason(level, "payload", f"Ledger line {f['line']}, {f['where']}: {f['what']}."))
        if len(mine) > SHOWN_FINDINGS:
            out.append(_reason(level, "payload", f"... and {len(mine) - SHOWN_FINDINGS} more such findings."))
    if not findings:
        out.append(_reason("pass", "payload", f"All {report['payload_scan']['lines_scanned']} recorded messages "
                           "held only model weights (or SecAgg+-masked weights) and declared numeric metrics; no "
                           "identifier from the clinical table or DICOM headers, no image-sized data."))
    return out


def _budget(report: dict[str, Any]) -> list[dict[str, str]]:
    budget = report["privacy_budget"]
    if "error" in budget:
        return [_reason("fail", "budget", budget["error"])]
    out = []
    for run in budget["runs"]:
        if run["epsilon"] > run["budget"]:
            out.append(_reason("fail", "budget", f"Run {run['run_id']} spent epsilon {run['epsilon']:.2f}, over the "
                               f"per-run budget {run['budget']:g}."))
        if not run["agree"]:
            out.append(_reason("attention", "budget", f"Run {run['run_id']}: the epsilon figures disagree by more "
                               f"than {budget['agreement_tolerance']:.0%} (Opacus {run['epsilon']:.3f}, "
                               f"dp-accounting {run['epsilon_dp_accounting']:.3f}, reported "
                               f"{run['reported_epsilon']}): an accounting error or an edited ledger."))
    for item in budget["reported_without_ledger_record"]:
        out.append(_reason("fail", "budget", f"Ledger line {item['line']} (run {item['run_id']}): a DP update left "
                           "the site but its privacy spending is not in the privacy ledger."))
    life = budget["lifetime"]
    if life["epsilon"] > life["budget"]:
        out.append(_reason("fail", "budget", f"Lifetime epsilon {life['epsilon']:.2f} is over this dataset's "
                           f"lifetime budget {life['budget']:g}."))
    elif life["used_fraction"] >= NEARLY_SPENT:
        out.append(_reason("attention", "budget", f"{life['used_fraction']:.0%} of the lifetime privacy budget is "
                           f"spent (epsilon {life['epsilon']:.2f} of {life['budget']:g}): few runs remain."))
    if not out and budget["runs"]:
        worst = max(budget["runs"], key=lambda r: r["used_fraction"])
        out.append(_reason("pass", "budget", f"Privacy budget kept: at most epsilon {worst['epsilon']:.2f} per run "
                           f"(budget {worst['budget']:g}), {life['epsilon']:.2f} over the dataset's lifetime "
                           f"(budget {life['budget']:g}), delta {life['delta']:.2g}; Opacus, Google's "
                           "dp-accounting and the site's reports agree."))
    return out


def _policy(report: dict[str, Any]) -> list[dict[str, str]]:
    policy = report["policy"]
    out = []
    if not report["inputs"]["policy_found"]:
        out.append(_reason("attention", "policy", f"No site policy was found ({report['inputs']['policy_source']}); "
                           "runs were checked against spine-fl's default policy."))
    for run in policy["runs"]:
        trained = bool(run["trained_rounds"])
        if run["status"] == "breach":
            out.append(_reason("fail", "policy", f"Run {run['run_id']} trained and sent updates although it broke "
                               f"the site's rule(s): {', '.join(run['broken_rules'])}."))
        if trained and run["dp"] is False:
            out.append(_reason("attention", "policy", f"Run {run['run_id']} trained without differential privacy "
                               "(DP off, dp = false): its updates carry no formal privacy guarantee."))
        if trained and not run["secagg"]:
            out.append(_reason("attention", "policy", f"Run {run['run_id']} sent updates without secure "
                               "aggregation: the coordinator saw this site's model update on its own."))
        if trained and run["settings"] is None:
            out.append(_reason("attention", "policy", f"Run {run['run_id']}: its settings are unknown (no final "
                               "model was received), so its rules could only be checked from the ledgers."))
    if not out:
        refused = len(policy["refusals"])
        out.append(_reason("pass", "policy", f"All {len(policy['runs'])} run(s) kept to the site's policy"
                           + (f"; the site enforced it with {refused} refusal(s)." if refused else ".")))
    return out


def _membership(report: dict[str, Any]) -> list[dict[str, str]]:
    mia = report["membership_inference"]
    if "skipped" in mia:
        return [_reason("attention", "membership", f"Membership inference was not run: {mia['skipped']}.")]
    out = []
    for name, attack in mia["attacks"].items():
        label = {"loss_threshold": "loss-threshold attack", "lira": "LiRA attack"}.get(name, name)
        low, high = attack["auc_ci"]
        numbers = f"AUC {attack['auc']:.2f} (95% CI {low:.2f}-{high:.2f})"
        if attack["exceeds_dp_ceiling"]:
            out.append(_reason("fail", "membership", f"The {label} on the final model beats what epsilon "
                               f"{mia['epsilon']:.2f} allows ({numbers}, DP ceiling AUC {attack['auc_ceiling']:.2f}; "
                               f"it proves epsilon >= {attack['proven_epsilon']:.2f}): the DP guarantee does not "
                               "hold as accounted."))
        elif low >= CLEAR_LEAK_AUC:
            out.append(_reason("fail", "membership", f"The {label} tells this site's training patients from its "
                               f"held-out patients: {numbers}. The shared model leaks who was in training."))
        elif low > ABOVE_CHANCE_AUC:
            out.append(_reason("attention", "membership", f"The {label} does better than chance: {numbers}"
                               + (", within what the DP guarantee allows." if mia["epsilon"] is not None else ".")))
    if not out:
        shown = "; ".join(f"{n.replace('_', ' ')} AUC {a['auc']:.2f} (95% CI {a['auc_ci'][0]:.2f}-{a['auc_ci'][1]:.2f})"
                          for n, a in mia["attacks"].items())
        out.append(_reason("pass", "membership", f"Membership attacks on the final model with this site's "
                           f"{mia['members']} training and {mia['non_members']} held-out patients stay below the "
                           f"attention threshold (lower 95% bound of the AUC at most {ABOVE_CHANCE_AUC:.2f}, where "
                           f"0.50 is guessing): {shown}."))
    return out


def verdict(report: dict[str, Any]) -> dict[str, Any]:
    """The worst level among all checks; reasons ordered fail, attention, pass."""
    reasons = [*_integrity(report), *_scan(report), *_budget(report), *_policy(report), *_membership(report)]
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
