"""The audit's list of checks (client/audit/checks.py): every check keeps the one interface, a new
check is one module plus one line in CHECKS, and the verdict is the worst of all checks' reasons.
Plus the scipy-based statistics of the membership-inference check (exact binomial interval,
stratified bootstrap) against simple references. Fast: no federated run."""

from __future__ import annotations

import inspect
import json
import types
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pytest
from scipy.stats import beta
from sklearn.metrics import roc_auc_score, roc_curve

from spine_fl.client.audit import checks, membership_inference
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
from spine_fl.client.site_config import Site

REPORT_KEYS = ["site", "generated_at", "inputs", "integrity", "egress", "payload_scan", "privacy_budget", "policy",
               "membership_inference", "verdict"]


def test_every_listed_check_keeps_the_interface() -> None:
    assert [m.__name__.rsplit(".", 1)[-1] for m in checks.CHECKS] == [
        "ledger_integrity", "egress_scan", "budget", "policy_compliance", "membership_inference"]
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
