"""The audit's list of checks (client/audit/checks.py): every check keeps the one interface, a new
check is one module plus one line in CHECKS, and the verdict is the worst of all checks' reasons.
Plus the scipy-based statistics of the membership-inference check (exact binomial interval,
stratified bootstrap) against simple references; the privacy budget's cross-check (Opacus, Google's
dp-accounting PLD and the site's reports) on long synthetic ledgers; the rule for a missing egress
ledger; epsilon in plain words. Fast: no federated run."""

from __future__ import annotations

import inspect
import json
import math
import re
import time
import types
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pytest
from opacus.accountants import RDPAccountant
from privacy_reference import independent_epsilon as rdp_reference
from privacy_reference import pld_epsilon
from scipy.stats import beta
from sklearn.metrics import roc_auc_score, roc_curve

from spine_fl.client.audit import budget, checks, ledger_integrity, membership_inference
from spine_fl.client.audit import run as audit_run
from spine_fl.client.audit.inputs import LEVELS, AuditInputs, reason
from spine_fl.client.audit.membership_inference import (
    FPRS,
    clopper_pearson,
    evaluate_attack,
    roc_statistics,
    tpr_at_fpr,
)
from spine_fl.client.audit.verdict import verdict
from spine_fl.client.privacy.egress_ledger import EgressLedger
from spine_fl.client.privacy.policy import SitePolicy
from spine_fl.client.privacy.privacy_ledger import SpendRecord
from spine_fl.client.site_config import Site
from spine_fl.shared.training.accounting import dp_tpr_ceiling, epsilon, epsilon_in_plain_words

# the numbers of epsilon_in_plain_words' sentence, as a reader finds them
PLAIN = re.compile(r"\u03b5 = (?P<eps>[\d.]+), \u03b4 = (?P<delta>[\d.e-]+) means: .*? e\^\u03b5 \u2248 "
                   r"(?P<odds>[\d,.^]+) .*? identify at most (?P<tpr>[\d.]+)% of patients")
REPORT_KEYS = ["site", "generated_at", "inputs", "integrity", "egress", "coordinator_record", "payload_scan",
               "privacy_budget", "policy", "membership_inference", "verdict"]


def test_every_listed_check_keeps_the_interface() -> None:
    assert [m.__name__.rsplit(".", 1)[-1] for m in checks.CHECKS] == [
        "ledger_integrity", "coordinator_record", "egress_scan", "budget", "policy_compliance",
        "membership_inference"]
    sections: list[str] = []
    for check in checks.CHECKS:
        assert isinstance(check, checks.AuditCheck), check.__name__
        assert isinstance(check.SECTIONS, tuple) and check.SECTIONS, check.__name__
        assert all(isinstance(s, str) for s in check.SECTIONS)
        assert list(inspect.signature(check.run).parameters) == ["audit", "report"], check.__name__
        assert list(inspect.signature(check.reasons).parameters) == ["report"], check.__name__
        sections += check.SECTIONS
    # in CHECKS order, the sections are exactly the report's between its header and the verdict
    assert ["site", "generated_at", "inputs", *sections, "verdict"] == REPORT_KEYS


def test_something_without_the_interface_is_not_a_check() -> None:
    assert not isinstance(types.SimpleNamespace(SECTIONS=("x",), run=lambda audit, report: {}), checks.AuditCheck)


def _quiet_site(tmp_path: Path) -> Site:
    """A site whose ledger holds one signed evaluate reply and nothing else: every real check runs and
    the verdict is 'attention' (no final model to attack), never 'fail'."""
    state, data = tmp_path / "state", tmp_path / "data"
    data.mkdir(parents=True)
    EgressLedger(state).append({"run_id": "r1", "round": 1, "kind": "evaluate", "arrays": [], "total_bytes": 0,
                                "metrics": {"evaluateres.metrics/auroc": 0.7}})
    return Site("quiet", data, state, SitePolicy())


def _fake_check(level: str, seen: dict[str, Any]) -> types.ModuleType:
    """What a newcomer writes in client/audit/<check>.py, as a module object."""
    module = types.ModuleType("spine_fl.client.audit.bundle_check")
    module.SECTIONS = ("bundle_check",)  # type: ignore[attr-defined]

    def run(audit: AuditInputs, report: Mapping[str, Any]) -> dict[str, Any]:
        seen["earlier_sections"] = list(report)
        seen["lines"] = len(audit.lines)  # inputs are shared with the real checks
        return {"bundle_check": {"bundles": 1, "unsigned": int(level == "fail")}}

    def reasons(report: Mapping[str, Any]) -> list[Any]:
        unsigned = report["bundle_check"]["unsigned"]
        return [reason(level, "bundle", f"{unsigned} unsigned app bundle(s) ran at the site.")]

    module.run, module.reasons = run, reasons  # type: ignore[attr-defined]
    return module


def test_a_new_check_is_one_module_and_one_line_in_checks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written: list[dict[str, Any]] = []
    monkeypatch.setattr(audit_run, "write_report", lambda out_dir, report: written.append(report))
    site = _quiet_site(tmp_path)
    baseline = audit_run.run_audit(site, tmp_path / "before", shadow_models=0, bootstrap=100)
    assert list(baseline) == REPORT_KEYS
    assert baseline["verdict"]["verdict"] == "attention", baseline["verdict"]

    seen: dict[str, Any] = {}
    new = _fake_check("fail", seen)
    assert isinstance(new, checks.AuditCheck)
    monkeypatch.setattr(checks, "CHECKS", (*checks.CHECKS, new))  # the one line
    report = audit_run.run_audit(site, tmp_path / "after", shadow_models=0, bootstrap=100)

    assert list(report) == [*REPORT_KEYS[:-1], "bundle_check", "verdict"]
    assert report["bundle_check"] == {"bundles": 1, "unsigned": 1}
    assert seen == {"earlier_sections": REPORT_KEYS[:-1], "lines": 1}
    assert report["verdict"]["verdict"] == "fail"
    first = report["verdict"]["reasons"][0]
    assert first == {"level": "fail", "topic": "bundle", "text": "1 unsigned app bundle(s) ran at the site."}
    # every other section is as before the check was added
    assert {k: v for k, v in report.items() if k not in ("generated_at", "bundle_check", "verdict")} == {
        k: v for k, v in baseline.items() if k not in ("generated_at", "verdict")}
    assert json.loads(json.dumps(written[-1]))["bundle_check"] == {"bundles": 1, "unsigned": 1}  # as written


def test_a_passing_new_check_adds_its_reason_without_changing_the_verdict(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit_run, "write_report", lambda out_dir, report: None)
    monkeypatch.setattr(checks, "CHECKS", (*checks.CHECKS, _fake_check("pass", {})))
    report = audit_run.run_audit(_quiet_site(tmp_path), tmp_path / "out", shadow_models=0, bootstrap=100)
    assert report["verdict"]["verdict"] == "attention"
    assert report["verdict"]["reasons"][-1]["topic"] == "bundle"


def test_a_check_must_write_exactly_its_sections(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit_run, "write_report", lambda out_dir, report: None)
    real = checks.CHECKS
    wrong = _fake_check("pass", {})
    wrong.SECTIONS = ("something_else",)  # type: ignore[attr-defined]
    monkeypatch.setattr(checks, "CHECKS", (*real, wrong))
    with pytest.raises(ValueError, match="bundle_check"):
        audit_run.run_audit(_quiet_site(tmp_path), tmp_path / "out", shadow_models=0, bootstrap=100)
    clash = _fake_check("pass", {})
    clash.SECTIONS = ("policy",)  # type: ignore[attr-defined]
    monkeypatch.setattr(checks, "CHECKS", (*real, clash))
    with pytest.raises(ValueError, match="already in the report"):
        audit_run.run_audit(_quiet_site(tmp_path / "again"), tmp_path / "out", shadow_models=0, bootstrap=100)


def test_verdict_is_the_worst_level_with_reasons_ordered_fail_attention_pass() -> None:
    def fixed(*levels: str) -> types.SimpleNamespace:
        return types.SimpleNamespace(SECTIONS=(), run=None,
                                     reasons=lambda report: [reason(lv, "t", f"{lv} {i}") for i, lv in enumerate(levels)])

    result = verdict({}, [fixed("pass", "attention"), fixed("fail", "pass"), fixed("attention")])
    assert result["verdict"] == "fail"
    assert [r["text"] for r in result["reasons"]] == ["fail 0", "attention 1", "attention 0", "pass 0", "pass 1"]
    assert verdict({}, [fixed("pass"), fixed("attention")])["verdict"] == "attention"
    assert verdict({}, [fixed("pass")])["verdict"] == "pass"
    assert verdict({}, [])["verdict"] == "pass"
    assert LEVELS == ("pass", "attention", "fail")
    with pytest.raises(ValueError):
        reason("bad", "t", "x")  # type: ignore[arg-type]


@pytest.mark.parametrize(("k", "n", "low", "high"), [
    (0, 10, 0.0, 0.3085),  # exact Clopper-Pearson 95% intervals
    (5, 10, 0.1871, 0.8129),
    (10, 10, 0.6915, 1.0),
    (1, 100, 0.0003, 0.0545),
])
def test_exact_binomial_interval_matches_known_values(k: int, n: int, low: float, high: float) -> None:
    got = clopper_pearson(k, n, 0.05)
    assert got == pytest.approx((low, high), abs=1e-4)
    # and the beta-quantile form it replaced, at the audit's Bonferroni level too
    for alpha in (0.05, 0.0125):
        ref = (beta.ppf(alpha / 2, k, n - k + 1) if k else 0.0, beta.ppf(1 - alpha / 2, k + 1, n - k) if k < n else 1.0)
        assert clopper_pearson(k, n, alpha) == pytest.approx(ref, abs=1e-9)
    assert clopper_pearson(0, 0, 0.05) == (0.0, 1.0)


def _scores(seed: int, members: int, others: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    is_member = np.r_[np.ones(members, bool), np.zeros(others, bool)]
    return is_member, rng.normal(size=members + others) + shift * is_member


@pytest.mark.parametrize("ties", [False, True])
def test_bootstrap_statistic_equals_sklearn(ties: bool) -> None:
    is_member, scores = _scores(1, 150, 250, 0.7)
    if ties:
        scores = np.round(scores, 1)
    got = roc_statistics(scores[is_member], scores[~is_member])
    assert got[0] == pytest.approx(roc_auc_score(is_member, scores), abs=1e-12)
    if not ties:  # with ties sklearn drops collinear ROC points; the statistic keeps every threshold
        assert got[1:] == pytest.approx([tpr_at_fpr(is_member, scores, limit) for limit in FPRS], abs=1e-12)
    # one row per resample along a leading axis
    stacked = roc_statistics(np.stack([scores[is_member]] * 3), np.stack([scores[~is_member]] * 3))
    assert stacked.shape == (1 + len(FPRS), 3) and np.allclose(stacked, got[:, None])


def _reference_intervals(is_member: np.ndarray, scores: np.ndarray, resamples: int,
                         seed: int) -> tuple[list[float], list[list[float]]]:
    """The hand-written stratified percentile bootstrap that scipy.stats.bootstrap replaced."""
    rng = np.random.default_rng(seed)
    members, others = np.flatnonzero(is_member), np.flatnonzero(~is_member)
    aucs, tprs = np.zeros(resamples), np.zeros((resamples, len(FPRS)))
    for b in range(resamples):
        idx = np.concatenate([rng.choice(members, len(members)), rng.choice(others, len(others))])
        aucs[b] = roc_auc_score(is_member[idx], scores[idx])
        fpr, tpr, _ = roc_curve(is_member[idx], scores[idx])
        tprs[b] = [tpr[fpr <= limit + 1e-12].max() for limit in FPRS]
    return list(np.percentile(aucs, [2.5, 97.5])), [list(np.percentile(tprs[:, j], [2.5, 97.5]))
                                                     for j in range(len(FPRS))]


def test_scipy_bootstrap_intervals_match_the_hand_written_stratified_bootstrap() -> None:
    is_member, scores = _scores(2, 130, 200, 0.5)
    got = evaluate_attack(is_member, scores, bootstrap=1000, seed=0)
    auc_ci, tpr_cis = _reference_intervals(is_member, scores, 1000, seed=0)
    assert got["auc_ci"] == pytest.approx(auc_ci, abs=0.015)
    assert got["auc_ci"][0] < got["auc"] < got["auc_ci"][1]
    for point, ref in zip(got["tpr_at_fpr"], tpr_cis, strict=True):
        assert point["ci"] == pytest.approx(ref, abs=0.03), point
    again = evaluate_attack(is_member, scores, bootstrap=1000, seed=0)
    assert again["auc_ci"] == got["auc_ci"]  # seeded: reproducible
    assert set(got) == {"auc", "auc_ci", "tpr_at_fpr", "roc"}
    assert [set(p) for p in got["tpr_at_fpr"]] == [{"fpr", "tpr", "ci"}] * len(FPRS)


def test_bootstrap_resamples_members_and_non_members_separately(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every resample keeps the group sizes (the stratified scheme): scipy resamples each sample on its own."""
    sizes: set[tuple[int, int]] = set()
    statistic = membership_inference.roc_statistics

    def counting(members: np.ndarray, others: np.ndarray, axis: int = -1) -> np.ndarray:
        sizes.add((members.shape[axis], others.shape[axis]))
        return statistic(members, others, axis=axis)

    monkeypatch.setattr(membership_inference, "roc_statistics", counting)
    is_member, scores = _scores(3, 40, 1, 1.0)  # a single non-member is resampled too
    result = evaluate_attack(is_member, scores, bootstrap=200, seed=0)
    assert sizes == {(40, 2)}  # the one non-member counted twice: the same shares
    assert result["auc_ci"][0] <= result["auc"] <= result["auc_ci"][1]


# -- the privacy budget's three figures: Opacus, dp-accounting's PLD, and what the site reported ----------

def _records(plan: list[tuple[str, int]], noise: float, rate: float, steps: int, delta: float) -> list[SpendRecord]:
    """A correct privacy ledger: (run id, rounds) per run, every round the same mechanism."""
    return [SpendRecord(run_id, r, noise, rate, steps, 1.0, delta, "rdp") for run_id, rounds in plan
            for r in range(1, rounds + 1)]


def _reported(records: list[SpendRecord], scale: float = 1.0, at: int | None = None) -> dict:
    """What a correct site reported after each round (budget.reported_epsilons' shape), its own Opacus
    figures; with `at`, the report after that round (0-based) is multiplied by `scale` (an edited ledger)."""
    out, runs = {}, {}
    for index, record in enumerate(records):
        runs.setdefault(record.run_id, []).append((record.noise_multiplier, record.sample_rate, record.steps))
        lifetime = [(r.noise_multiplier, r.sample_rate, r.steps) for r in records[:index + 1]]
        factor = scale if index == at else 1.0
        out[(record.run_id, sum(s for _, _, s in runs[record.run_id]))] = {
            "epsilon_run": factor * epsilon(runs[record.run_id], record.delta),
            "epsilon_lifetime": factor * epsilon(lifetime, record.delta), "line": 2 * index + 1}
    return out


LONG_LIFETIME = _records([(f"run{i:02d}", 10) for i in range(30)], 1.0, 0.2, 10, 1e-4)  # 300 rounds, 3,000 steps
# the README's default run at leiden: 135 training patients, batch 32 (rate 1/5, 5 steps a round), 10 rounds
DEFAULT_RUN = _records([("default", 10)], 1.0, 0.2, 5, 1 / 1350)
DEFAULT_RUN_HISTORY = [(1.0, 0.2, 50)]
GENEROUS = SitePolicy(epsilon_per_run=1000.0, epsilon_lifetime=1000.0)


def test_pld_second_opinion_is_dp_accountings_pld_accountant() -> None:
    for history, delta in [([(1.0, 0.2, 3000)], 1e-4), ([(1.0, 0.2, 50)], 1 / 1350), ([(2.0, 0.01, 1000)], 1e-5),
                           ([(1.0, 0.2, 500), (1.3, 0.1, 400), (1.0, 0.2, 20)], 1e-4)]:
        accounted = epsilon(history, delta)
        got = budget.independent_epsilon(history, delta, scale=accounted)
        assert got == pytest.approx(pld_epsilon(history, delta, grid=budget.pld_grid(accounted)), rel=1e-9)
        assert got == pytest.approx(pld_epsilon(history, delta, grid=1e-4), rel=2e-3)  # the grid costs < 0.2%
        assert budget.independent_epsilon(history, delta) == pytest.approx(got, rel=2e-3)  # its own scale
        assert budget.consistent(accounted, got, "rdp"), (history, accounted, got)
        assert got < accounted  # RDP is an upper bound, PLD (nearly) exact


def test_opacus_epsilon_with_cached_rdp_is_opacus_rdp_accountant_bit_for_bit() -> None:
    """shared/training/accounting.py caches Opacus' one-step RDP per mechanism (what makes a 300-round series
    fast); the figure spine-fl enforces must stay exactly RDPAccountant's."""
    for history in ([(1.0, 0.2, 3000)], [(1.0, 0.2, 50)], [(1.0, 0.2, 500), (1.3, 0.1, 400), (0.8, 0.25, 7)]):
        for delta in (1e-5, 1 / 1350):
            reference = RDPAccountant()
            reference.history = list(history)
            assert epsilon(history, delta) == float(reference.get_epsilon(delta=delta))
    assert epsilon([(1.0, 0.2, 5)] * 12, 1e-3) == epsilon([(1.0, 0.2, 60)], 1e-3)


def test_pld_on_a_few_thousand_steps_takes_well_under_a_second() -> None:
    budget._one_step.cache_clear()
    start = time.perf_counter()
    figure = budget.independent_epsilon([(1.0, 0.2, 3000)], 1e-4)
    took = time.perf_counter() - start
    print(f"PLD, 3,000 steps of (1.0, 0.2), delta 1e-4: epsilon {figure:.3f} in {took:.3f} s "
          f"(Opacus RDP {epsilon([(1.0, 0.2, 3000)], 1e-4):.3f})")
    assert took < 1.0


@pytest.mark.parametrize("records", [LONG_LIFETIME, DEFAULT_RUN], ids=["300 rounds", "default run"])
def test_a_correct_ledger_agrees_everywhere(records: list[SpendRecord]) -> None:
    section = budget.budget_report(records, _reported(records), GENEROUS)
    assert all(row["agree"] and row["agree_dp_accounting"] and row["agree_reported"] for row in section["rounds"])
    assert all(row["agree"] for row in section["runs"])
    assert all(row["reported_epsilon_run"] is not None for row in section["rounds"])
    (passed,) = budget.reasons({"privacy_budget": section})
    assert passed["level"] == "pass" and "agree" in passed["text"]
    life = section["lifetime"]
    steps = sum(r.steps for r in records)  # one mechanism throughout: it composes exactly into one entry
    assert life["epsilon"] == pytest.approx(epsilon([(1.0, 0.2, steps)], records[0].delta), rel=1e-12)
    assert life["epsilon_dp_accounting"] == pytest.approx(pld_epsilon([(1.0, 0.2, steps)], records[0].delta), rel=2e-3)
    print(f"{len(records)} rounds: Opacus RDP {life['epsilon']:.3f}, dp-accounting PLD "
          f"{life['epsilon_dp_accounting']:.3f} (ratio {life['epsilon'] / life['epsilon_dp_accounting']:.3f})")


def test_dp_accountings_rdp_would_have_flagged_the_long_lifetime() -> None:
    """Why PLD: on 3,000 steps dp-accounting's RDP orders do not converge, and its figure is far off Opacus'."""
    ours = epsilon([(1.0, 0.2, 3000)], 1e-4)
    assert rdp_reference(1.0, 0.2, 3000, 1e-4, "rdp") > ours * 1.2
    assert epsilon(DEFAULT_RUN_HISTORY, 1 / 1350) == pytest.approx(8.46, abs=0.01)  # the README's figure


@pytest.mark.parametrize(("records", "scale"), [(LONG_LIFETIME, 1.2), (DEFAULT_RUN, 1.2), (DEFAULT_RUN, 0.8)],
                         ids=["300 rounds, 20% high", "default run, 20% high", "default run, 20% low"])
def test_a_reported_epsilon_off_by_20_percent_is_flagged(records: list[SpendRecord], scale: float) -> None:
    at = len(records) - 4
    section = budget.budget_report(records, _reported(records, scale=scale, at=at), GENEROUS)
    flagged = [index for index, row in enumerate(section["rounds"]) if not row["agree"]]
    assert flagged == [at]
    assert section["rounds"][at]["agree_dp_accounting"] and not section["rounds"][at]["agree_reported"]
    (why,) = [r for r in budget.reasons({"privacy_budget": section}) if r["level"] != "pass"]
    assert why["level"] == "attention" and "reported differs" in why["text"]
    assert f"ledger line {2 * at + 1}" in why["text"] and records[at].run_id in why["text"]


def test_an_accountant_that_claims_less_than_pld_is_flagged(monkeypatch: pytest.MonkeyPatch) -> None:
    """The second opinion catches a wrong Opacus figure even when the site reported that same figure."""
    monkeypatch.setattr(budget, "epsilon", lambda history, delta, accountant="rdp": 0.8 * epsilon(history, delta))
    section = budget.budget_report(DEFAULT_RUN, {}, GENEROUS)
    # RDP's margin over PLD is largest early on (1.27 after one round of the default run, 1.16 after ten),
    # so an accountant 20% low shows from round 3 on
    assert [row["agree_dp_accounting"] for row in section["rounds"]] == [True] * 2 + [False] * 8
    assert not section["runs"][0]["agree_dp_accounting"]
    (why,) = [r for r in budget.reasons({"privacy_budget": section}) if r["level"] != "pass"]
    assert why["level"] == "attention" and "dp-accounting (PLD)" in why["text"]


def test_agreement_is_one_sided_within_the_measured_gap() -> None:
    assert budget.consistent(8.46, 7.29, "rdp")  # the default run
    assert budget.consistent(7.29 * 1.019, 7.29, "rdp") and not budget.consistent(7.29 / 1.03, 7.29, "rdp")
    assert budget.consistent(0.153, 0.0746, "rdp")  # the largest measured RDP / PLD, 2.05, at a tiny epsilon
    assert not budget.consistent(7.29 * 1.5 + 0.6, 7.29, "rdp")  # absurdly above
    assert budget.consistent(7.30, 7.29, "prv") and not budget.consistent(7.29 * 1.1, 7.29, "prv")
    assert budget.consistent(None, 7.29, "rdp") is None


# -- a missing egress ledger, and epsilon in plain words -------------------------------------------

def _integrity_section(lines: int, dp_rounds: int, models: int) -> dict:
    return {"integrity": {"ledger": "/state/egress.jsonl", "lines": lines, "ok": True, "first_broken_line": None,
                          "problem": "", "activity": {"dp_rounds_recorded": dp_rounds,
                                                      "dp_runs_recorded": ["r1"] * bool(dp_rounds),
                                                      "final_models_received": models}}}


def test_an_empty_egress_ledger_fails_when_the_site_took_part() -> None:
    (why,) = ledger_integrity.reasons(_integrity_section(0, 30, 1))
    assert why["level"] == "fail" and "deleted or never written" in why["text"] and "30 DP round(s)" in why["text"]
    (why,) = ledger_integrity.reasons(_integrity_section(0, 0, 1))  # a site without DP that received a model
    assert why["level"] == "fail" and "1 final shared model(s)" in why["text"]
    (why,) = ledger_integrity.reasons(_integrity_section(0, 0, 0))  # nothing says the site ever took part
    assert why["level"] == "attention"
    assert ledger_integrity.reasons(_integrity_section(15, 3, 1))[0]["level"] == "pass"


@pytest.mark.parametrize(("eps", "delta"), [(8.46, 1 / 1350), (1.0, 1e-5), (4.7, 7e-4), (0.0, 1e-5), (130.6, 1e-4)])
def test_epsilon_in_plain_words_states_the_hypothesis_testing_bound(eps: float, delta: float) -> None:
    sentence = epsilon_in_plain_words(eps, delta)
    ceiling = min(1.0, math.exp(eps) * 0.01 + delta, 1 - math.exp(-eps) * (1 - delta - 0.01))
    assert float(dp_tpr_ceiling(0.01, eps, delta)) == pytest.approx(max(ceiling, 0.0), abs=1e-12)
    shown = PLAIN.search(sentence)
    assert shown, sentence
    assert float(shown["eps"]) == pytest.approx(eps, abs=0.005)
    assert float(shown["delta"]) == pytest.approx(delta, rel=0.05)
    odds = shown["odds"].replace(",", "")
    if "^" in odds:  # beyond a million, a power of ten
        assert float(odds.split("^")[1]) == pytest.approx(eps / math.log(10), abs=0.5)
    else:
        assert float(odds) == pytest.approx(math.exp(eps), rel=0.05)
    assert float(shown["tpr"]) / 100 == pytest.approx(ceiling, abs=5e-4) and float(shown["tpr"]) / 100 <= 1.0
    if ceiling < 1:
        assert float(shown["tpr"]) < 100  # a bound just below 100% never reads as 100%
    assert "wrongly accuses 1% of non-patients" in sentence


def test_a_delta_above_what_the_site_allows_is_a_policy_breach() -> None:
    """The audit holds each run's δ to the site's max_delta and to 1 / (10 n) for its training patients."""
    from spine_fl.client.audit.policy_compliance import _delta_check
    from spine_fl.shared.config import RunSettings

    settings = RunSettings(task="rbp_tabular", batch_size=16)
    run = {"delta": 5e-4, "sample_rate": [1 / 8]}  # 8 batches of 16: 113 to 128 training patients
    assert _delta_check(SitePolicy(), settings, run)["ok"] is True  # 5e-4 < 1 / (10 * 113)
    assert _delta_check(SitePolicy(max_delta=1e-4), settings, run) == {
        "rule": "max_delta", "run": 5e-4, "policy": 1e-4, "ok": False}
    over = _delta_check(SitePolicy(), settings, {**run, "delta": 0.5})  # a coordinator's δ = 0.5
    assert over["ok"] is False and over["policy"] == pytest.approx(1 / (10 * 113))
    assert _delta_check(SitePolicy(), None, run)["ok"] is None  # settings unknown, no max_delta: not judged
