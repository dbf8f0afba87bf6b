"""Audit: did each run the site took part in keep to the site's policy, and what did it refuse?

A run's settings are the ones the site received with its final model (client/received_models.py);
what the site actually did comes from its own ledgers: whether updates left under SecAgg+, with
DP-SGD, at which noise multiplier and epsilon. A rule that a run broke is fine when the site
refused it; it is a breach when the site trained and sent updates anyway.
The check writes the report's "policy" section; it reads the privacy-budget section before it.
"""

from __future__ import annotations

from typing import Any, Mapping

from spine_fl.client.audit.inputs import AuditInputs, Reason, reason
from spine_fl.client.privacy.plan import allowed_delta
from spine_fl.client.privacy.policy import SitePolicy, rule_violations
from spine_fl.shared import protocol
from spine_fl.shared.config import RunSettings
from spine_fl.shared.refusal import Refusal

SECTIONS = ("policy",)
MASKED_UPDATE = f"{protocol.SECAGG_CONFIGS}/masked_params"
FIT_PAYLOAD_KEYS = (protocol.FIT_NUM_EXAMPLES, MASKED_UPDATE)
DP_FLAG = protocol.fit_metric(protocol.DP)


def run_evidence(lines: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per run, from the egress ledger: rounds whose update left, SecAgg+ use, DP flags, refusals, errors."""
    runs: dict[str, dict[str, Any]] = {}
    for entry in lines:
        if entry.get("unreadable"):
            continue
        run = runs.setdefault(entry["run"], {"trained_rounds": [], "secagg": False, "dp_flags": set(),
                                             "refusals": [], "errors": []})
        kind, metrics, error = str(entry.get("kind", "")), entry.get("metrics") or {}, entry.get("error")
        run["secagg"] |= MASKED_UPDATE in metrics
        if error:
            parsed = Refusal.parse(str(error.get("reason", "")))
            target = run["refusals"] if parsed else run["errors"]
            target.append({"line": entry["line"], "round": entry.get("round"), "kind": kind,
                           **(parsed or {"reason": error.get("reason")})})
        elif kind.startswith("train") and (entry.get("arrays") or any(k in metrics for k in FIT_PAYLOAD_KEYS)):
            run["trained_rounds"].append(entry.get("round"))
            if DP_FLAG in metrics:
                run["dp_flags"].add(bool(metrics[DP_FLAG]))
    return runs


def _checks(policy: SitePolicy, settings: RunSettings | None, evidence: dict[str, Any],
            budget_run: dict[str, Any] | None, lifetime_after: float | None) -> list[dict[str, Any]]:
    dp_used = True in evidence["dp_flags"] if evidence["trained_rounds"] else (settings.dp if settings else None)
    secagg_used = evidence["secagg"] if evidence["trained_rounds"] else (settings.secagg if settings else None)
    violated = set()
    if settings is not None:
        violated = {v.rule for v in rule_violations(policy, settings, bool(secagg_used))}
    rows = [
        ("allowed_tasks", settings.task if settings else None, ", ".join(policy.allowed_tasks)),
        ("require_dp", dp_used, policy.require_dp),
        ("require_secagg", secagg_used, policy.require_secagg),
        ("max_rounds", settings.rounds if settings else None, policy.max_rounds),
        ("max_local_epochs", settings.local_epochs if settings else None, policy.max_local_epochs),
    ]
    required_but_off = {rule for rule, value, limit in rows[1:3] if limit is True and value is False}
    checks = [{"rule": rule, "run": value, "policy": limit,
               "ok": None if value is None else rule not in violated | required_but_off}
              for rule, value, limit in rows]
    shown = {rule for rule, _, _ in rows}
    checks += [{"rule": rule, "run": None, "policy": getattr(policy, rule, None), "ok": False}
               for rule in sorted(violated - shown)]  # rules added to the policy after this audit was written
    if budget_run is not None:
        checks.append(_delta_check(policy, settings, budget_run))
        checks += [
            {"rule": "min_noise_multiplier", "run": budget_run["noise_multiplier_min"],
             "policy": policy.min_noise_multiplier,
             "ok": budget_run["noise_multiplier_min"] >= policy.min_noise_multiplier},
            {"rule": "epsilon_per_run", "run": budget_run["epsilon"], "policy": policy.epsilon_per_run,
             "ok": budget_run["epsilon"] <= policy.epsilon_per_run},
            {"rule": "epsilon_lifetime", "run": lifetime_after, "policy": policy.epsilon_lifetime,
             "ok": lifetime_after is None or lifetime_after <= policy.epsilon_lifetime},
        ]
    return checks


def _delta_check(policy: SitePolicy, settings: RunSettings | None, budget_run: dict[str, Any]) -> dict[str, Any]:
    """The δ the run's ε is at, against the largest the site allows: its policy's max_delta and
    1 / (10 n) for its n training patients. The ledger holds the sampling rate 1 / batches per epoch,
    so n is known only to within a batch: the fewest patients that give that many batches is used,
    which never flags a δ the site was allowed (and catches any δ above 1 / (10 n) by a batch or more)."""
    batches = max(round(1 / r) for r in budget_run["sample_rate"]) if budget_run["sample_rate"] else 1
    fewest = (batches - 1) * settings.batch_size + 1 if settings is not None and batches > 1 else None
    limit = allowed_delta(fewest, policy.max_delta) if fewest else policy.max_delta
    delta = budget_run["delta"]
    return {"rule": "max_delta", "run": delta, "policy": limit,
            "ok": None if delta is None or limit is None else delta <= limit * (1 + 1e-9)}


def compliance(policy: SitePolicy, lines: list[dict[str, Any]], settings: dict[str, RunSettings],
               budget: dict[str, Any]) -> dict[str, Any]:
    """Each run's settings and behaviour against the policy; every refusal with its reason."""
    evidence = run_evidence(lines)
    budget_runs = {r["run_id"]: r for r in budget["runs"]}
    lifetime_after = {row["run_id"]: row["epsilon_lifetime"] for row in budget["rounds"]}  # last row of each run wins
    runs = []
    for run_id, ev in evidence.items():
        run_settings = settings.get(run_id)
        checks = _checks(policy, run_settings, ev, budget_runs.get(run_id), lifetime_after.get(run_id))
        broken = [c["rule"] for c in checks if c["ok"] is False]
        trained = bool(ev["trained_rounds"])
        status = ("breach" if trained and broken else "complied" if trained
                  else "refused" if ev["refusals"] else "did not train")
        runs.append({
            "run_id": run_id, "status": status, "broken_rules": broken, "checks": checks,
            "settings": run_settings.to_run_config() if run_settings else None,
            "trained_rounds": sorted({r for r in ev["trained_rounds"] if r is not None}),
            "dp": (True in ev["dp_flags"]) if ev["dp_flags"] else None, "secagg": ev["secagg"],
            "refusals": ev["refusals"], "errors": ev["errors"],
        })
    return {"policy": _policy_dict(policy), "runs": runs,
            "refusals": [{"run_id": r["run_id"], **ref} for r in runs for ref in r["refusals"]]}


def _policy_dict(policy: SitePolicy) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in policy.__dict__.items()}


def run(audit: AuditInputs, report: Mapping[str, Any]) -> dict[str, Any]:
    budget = report["privacy_budget"]
    spent = budget if "runs" in budget else {"runs": [], "rounds": []}
    return {"policy": compliance(audit.site.policy, audit.lines, audit.settings, spent)}


def reasons(report: Mapping[str, Any]) -> list[Reason]:
    policy = report["policy"]
    out = []
    if not report["inputs"]["policy_found"]:
        out.append(reason("attention", "policy", f"No site policy was found ({report['inputs']['policy_source']}); "
                          "runs were checked against spine-fl's default policy."))
    for row in policy["runs"]:
        trained = bool(row["trained_rounds"])
        if row["status"] == "breach":
            out.append(reason("fail", "policy", f"Run {row['run_id']} trained and sent updates although it broke "
                              f"the site's rule(s): {', '.join(row['broken_rules'])}."))
        if trained and row["dp"] is False:
            out.append(reason("attention", "policy", f"Run {row['run_id']} trained without differential privacy "
                              "(DP off, dp = false): its updates carry no formal privacy guarantee."))
        if trained and not row["secagg"]:
            out.append(reason("attention", "policy", f"Run {row['run_id']} sent updates without secure "
                              "aggregation: the coordinator saw this site's model update on its own."))
        if trained and row["settings"] is None:
            out.append(reason("attention", "policy", f"Run {row['run_id']}: its settings are unknown (no final "
                              "model was received), so its rules could only be checked from the ledgers."))
    if not out:
        refused = len(policy["refusals"])
        out.append(reason("pass", "policy", f"All {len(policy['runs'])} run(s) kept to the site's policy"
                          + (f"; the site enforced it with {refused} refusal(s)." if refused else ".")))
    return out
