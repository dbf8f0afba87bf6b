"""Audit: the privacy budget spent, per round, per run and over the dataset's lifetime.

Three figures stand side by side for each: epsilon recomputed with Opacus from the site's privacy
ledger (the figure spine-fl enforces), the same history recomputed independently with Google's
dp-accounting (a different implementation of the same Poisson-subsampled Gaussian mechanism),
and the epsilon the site reported in its egress ledger at the time. Disagreement means an
accounting bug or an edited ledger; both are the auditor's business.
The check writes the report's "privacy_budget" section ({"error": ...} when the privacy ledger
cannot be read).
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Mapping

import dp_accounting
from opacus.accountants.rdp import RDPAccountant

from spine_fl.client.audit.inputs import AuditInputs, Reason, reason
from spine_fl.client.privacy.policy import SitePolicy
from spine_fl.client.privacy.privacy_ledger import SpendRecord
from spine_fl.shared import protocol
from spine_fl.shared.training.accounting import History, epsilon

SECTIONS = ("privacy_budget",)
AGREEMENT = 0.02  # relative difference tolerated between the three figures
NEARLY_SPENT = 0.8  # share of the lifetime budget from which the verdict asks for attention


def independent_epsilon(history: Iterable[tuple[float, float, int]], delta: float, accountant: str = "rdp") -> float:
    """Google's dp-accounting on the composed history (RDP with Opacus' orders, or PLD for 'prv')."""
    merged: dict[tuple[float, float], int] = {}
    for sigma, rate, steps in history:
        if steps > 0:
            merged[(float(sigma), float(rate))] = merged.get((float(sigma), float(rate)), 0) + int(steps)
    if not merged:
        return 0.0
    event = dp_accounting.ComposedDpEvent([
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(sigma)), steps)
        for (sigma, rate), steps in merged.items()])
    if accountant == "rdp":
        acc: Any = dp_accounting.rdp.RdpAccountant(orders=RDPAccountant.DEFAULT_ALPHAS)
    else:
        acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # fractional orders below 2 may not converge; dp-accounting skips them, loudly
    try:
        acc.compose(event)
        return float(acc.get_epsilon(delta))
    finally:
        absl.setLevel(level)


def reported_epsilons(lines: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, float]]:
    """What the site told the coordinator after each DP round (egress ledger fit replies), keyed by run
    and the run's cumulative DP steps: a round's unique mark, also across coordinator restarts."""
    run_eps, life_eps, steps = (protocol.fit_metric(k) for k in
                                (protocol.EPSILON_RUN, protocol.EPSILON_LIFETIME, protocol.STEPS_RUN))
    out = {}
    for entry in lines:
        metrics = entry.get("metrics") or {}
        if run_eps in metrics and steps in metrics:
            out[(entry["run"], int(metrics[steps]))] = {
                "epsilon_run": float(metrics[run_eps]),
                "epsilon_lifetime": float(metrics.get(life_eps, float("nan"))),
                "line": entry["line"]}
    return out


def _both(history: History, delta: float, accountant: str) -> tuple[float, float]:
    return epsilon(history, delta, accountant), independent_epsilon(history, delta, accountant)


def _agrees(a: float | None, b: float | None) -> bool | None:
    if a is None or b is None:
        return None
    return abs(a - b) <= AGREEMENT * max(abs(a), abs(b), 1e-12)


def _record_entry(record: SpendRecord) -> tuple[float, float, int]:
    return (record.noise_multiplier, record.sample_rate, record.steps)


def budget_report(records: list[SpendRecord], reported: dict[tuple[str, int], dict[str, float]],
                  policy: SitePolicy) -> dict[str, Any]:
    """Cumulative epsilon after every round (per run and lifetime) and each run's and the lifetime total."""
    rounds: list[dict[str, Any]] = []
    for index, record in enumerate(records):
        lifetime = [_record_entry(r) for r in records[:index + 1]]
        this_run = [_record_entry(r) for r in records[:index + 1] if r.run_id == record.run_id]
        run_eps, run_ind = _both(this_run, record.delta, record.accountant)
        life_eps, life_ind = _both(lifetime, record.delta, record.accountant)
        said = reported.get((record.run_id, sum(steps for _, _, steps in this_run)), {})
        rounds.append({
            "run_id": record.run_id, "round": record.round, "noise_multiplier": record.noise_multiplier,
            "sample_rate": record.sample_rate, "steps": record.steps, "max_grad_norm": record.max_grad_norm,
            "delta": record.delta, "accountant": record.accountant,
            "epsilon_run": run_eps, "epsilon_run_dp_accounting": run_ind,
            "epsilon_lifetime": life_eps, "epsilon_lifetime_dp_accounting": life_ind,
            "reported_epsilon_run": said.get("epsilon_run"), "reported_epsilon_lifetime": said.get("epsilon_lifetime"),
            "reported_on_line": said.get("line"),
            "agree": all(_agrees(run_eps, x) is not False for x in (run_ind, said.get("epsilon_run")))
            and all(_agrees(life_eps, x) is not False for x in (life_ind, said.get("epsilon_lifetime"))),
        })
    run_rows = [_run_row(run_id, rounds, records, policy) for run_id in dict.fromkeys(r.run_id for r in records)]
    last = rounds[-1] if rounds else None
    lifetime_row = {
        "epsilon": last["epsilon_lifetime"] if last else 0.0,
        "epsilon_dp_accounting": last["epsilon_lifetime_dp_accounting"] if last else 0.0,
        "delta": last["delta"] if last else None, "accountant": last["accountant"] if last else None,
        "budget": policy.epsilon_lifetime,
        "used_fraction": (last["epsilon_lifetime"] if last else 0.0) / policy.epsilon_lifetime,
    }
    recorded = {(row["run_id"], row["reported_on_line"]) for row in rounds}
    missing = [{"run_id": run, "steps_run": steps, "line": said["line"]} for (run, steps), said in reported.items()
               if (run, said["line"]) not in recorded]
    return {"rounds": rounds, "runs": run_rows, "lifetime": lifetime_row,
            "reported_without_ledger_record": missing,
            "agreement_tolerance": AGREEMENT}


def _run_row(run_id: str, rounds: list[dict[str, Any]], records: list[SpendRecord],
             policy: SitePolicy) -> dict[str, Any]:
    last = [row for row in rounds if row["run_id"] == run_id][-1]
    mine = [r for r in records if r.run_id == run_id]
    return {
        "run_id": run_id, "rounds": len(mine), "epsilon": last["epsilon_run"],
        "epsilon_dp_accounting": last["epsilon_run_dp_accounting"], "reported_epsilon": last["reported_epsilon_run"],
        "delta": last["delta"], "accountant": last["accountant"],
        "noise_multiplier_min": min(r.noise_multiplier for r in mine),
        "noise_multiplier_max": max(r.noise_multiplier for r in mine),
        "sample_rate": sorted({r.sample_rate for r in mine}), "steps": sum(r.steps for r in mine),
        "max_grad_norm": sorted({r.max_grad_norm for r in mine}),
        "budget": policy.epsilon_per_run, "used_fraction": last["epsilon_run"] / policy.epsilon_per_run,
        "agree": all(row["agree"] for row in rounds if row["run_id"] == run_id),
    }


def run(audit: AuditInputs, report: Mapping[str, Any]) -> dict[str, Any]:
    audit.progress("recomputing the privacy budget")
    if audit.privacy_ledger_error:
        return {"privacy_budget": {"error": audit.privacy_ledger_error}}
    return {"privacy_budget": budget_report(audit.privacy_records, reported_epsilons(audit.lines), audit.site.policy)}


def reasons(report: Mapping[str, Any]) -> list[Reason]:
    budget = report["privacy_budget"]
    if "error" in budget:
        return [reason("fail", "budget", budget["error"])]
    out = []
    for row in budget["runs"]:
        if row["epsilon"] > row["budget"]:
            out.append(reason("fail", "budget", f"Run {row['run_id']} spent epsilon {row['epsilon']:.2f}, over the "
                              f"per-run budget {row['budget']:g}."))
        if not row["agree"]:
            out.append(reason("attention", "budget", f"Run {row['run_id']}: the epsilon figures disagree by more "
                              f"than {budget['agreement_tolerance']:.0%} (Opacus {row['epsilon']:.3f}, "
                              f"dp-accounting {row['epsilon_dp_accounting']:.3f}, reported "
                              f"{row['reported_epsilon']}): an accounting error or an edited ledger."))
    for item in budget["reported_without_ledger_record"]:
        out.append(reason("fail", "budget", f"Ledger line {item['line']} (run {item['run_id']}): a DP update left "
                          "the site but its privacy spending is not in the privacy ledger."))
    life = budget["lifetime"]
    if life["epsilon"] > life["budget"]:
        out.append(reason("fail", "budget", f"Lifetime epsilon {life['epsilon']:.2f} is over this dataset's "
                          f"lifetime budget {life['budget']:g}."))
    elif life["used_fraction"] >= NEARLY_SPENT:
        out.append(reason("attention", "budget", f"{life['used_fraction']:.0%} of the lifetime privacy budget is "
                          f"spent (epsilon {life['epsilon']:.2f} of {life['budget']:g}): few runs remain."))
    if not out and budget["runs"]:
        worst = max(budget["runs"], key=lambda r: r["used_fraction"])
        out.append(reason("pass", "budget", f"Privacy budget kept: at most epsilon {worst['epsilon']:.2f} per run "
                          f"(budget {worst['budget']:g}), {life['epsilon']:.2f} over the dataset's lifetime "
                          f"(budget {life['budget']:g}), delta {life['delta']:.2g}; Opacus, Google's "
                          "dp-accounting and the site's reports agree."))
    return out
