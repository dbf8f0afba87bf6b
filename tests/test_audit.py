"""The site's privacy audit (`spine-fl audit`): on simulated runs (DP + SecAgg+, and a leaky run
without DP), on a tampered ledger and on a planted identifier; plus the attack and scan units."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import typer
from privacy_reference import independent_rdp_epsilon, pld_epsilon
from typer.testing import CliRunner

from spine_fl.client.audit.budget import consistent
from spine_fl.client.audit.cli import audit, locate_site
from spine_fl.client.audit.egress_scan import DeclaredModel, Identifiers, scan_payloads
from spine_fl.client.audit.membership_inference import dp_auc_ceiling, evaluate_attack, lira_scores, proven_epsilon
from spine_fl.client.audit.run import run_audit
from spine_fl.client.privacy.egress_ledger import HEAD_FILE, LEDGER_FILE, EgressLedger, verify
from spine_fl.client.privacy.received_models import load_received
from spine_fl.client.site_config import Site
from spine_fl.shared.config import load_scenario
from spine_fl.shared.training.accounting import dp_tpr_ceiling
from spine_fl.shared.training.calibration import LOCATE_NOISE_STD, NOISE_STD
from spine_fl.simulations.runner import simulate

DP_RUN = {"task": "rbp_tabular", "rounds": 3, "local_epochs": 1, "batch_size": 16, "learning_rate": 0.3,
          "noise_multiplier": 1.0, "min_sites": 3, "seed": 1, "dp": True, "secagg": True}
# Deliberately leaky: one small hospital, no DP, 40 epochs of Adam on its ~130 training patients.
LEAKY_RUN = {"task": "rbp_tabular", "rounds": 4, "local_epochs": 10, "batch_size": 16, "optimizer": "adam",
             "learning_rate": 0.02, "min_sites": 1, "seed": 1, "dp": False, "secagg": False}
SITES = ("leiden", "seoul", "zurich")


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return f'"{value}"' if isinstance(value, str) else repr(value)


def _simulate(out: Path, sites: int, run: dict, policy: dict) -> dict:
    """A scenario saved as <out>/scenario.toml (where `audit --run-dir` finds the policy), then run."""
    out.mkdir(parents=True)
    lines = ['name = "audit-test"', "[consortium]", 'source = "synthetic"', f"sites = {sites}", "seed = 11",
             "[run]", *(f"{k} = {_toml(v)}" for k, v in run.items()),
             "[policy]", *(f"{k} = {_toml(v)}" for k, v in policy.items())]
    (out / "scenario.toml").write_text("\n".join(lines) + "\n")
    return simulate(load_scenario(out / "scenario.toml"), out)


def _cli(*args: str) -> tuple[int, str]:
    app = typer.Typer()
    app.command()(audit)
    app.command("help")(lambda: None)  # a second command keeps typer's subcommand layout, as in spine_fl.cli
    result = CliRunner().invoke(app, ["audit", *args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("audit") / "dp"
    return out, _simulate(out, 3, DP_RUN, {"epsilon_per_run": 12.0, "epsilon_lifetime": 30.0})


def _copy_site(run_dir: Path, site: str, to: Path) -> Path:
    """A copy of one site's state, so a test can tamper with it."""
    state = to / "state"
    shutil.copytree(run_dir / "site-state" / site, state)
    return state


@pytest.mark.slow
def test_dp_secagg_run_passes_with_epsilon_matching_ledger_and_dp_accounting(dp_run, tmp_path: Path) -> None:
    run_dir, metrics = dp_run
    code, output = _cli("--site", "leiden", "--run-dir", str(run_dir), "--out", str(tmp_path / "leiden"),
                        "--shadow-models", "4", "--bootstrap", "300")
    assert code == 0, output
    assert "verdict: PASS" in output
    report = json.loads((tmp_path / "leiden" / "audit.json").read_text())
    page = (tmp_path / "leiden" / "audit.html").read_text()
    assert report["verdict"]["verdict"] == "pass", report["verdict"]
    assert report["inputs"]["policy_found"] and report["inputs"]["policy_source"].endswith("scenario.toml")
    assert page.index("Verdict: PASS") < page.index("<section>")  # the verdict comes first
    assert page.count('src="data:image/png;base64,') == 3 and "<script" not in page and "http" not in page

    budget, reported = report["privacy_budget"], metrics["privacy"]["per_site"]["leiden"]
    (run,) = budget["runs"]
    # 3 training rounds and the two recalibration histograms (Gaussian mechanisms: rate 1, one step)
    assert run["rounds"] == 5 and run["delta"] == reported["delta"]
    history = [(reported["noise_multiplier"], reported["sample_rate"], reported["steps"]),
               (LOCATE_NOISE_STD, 1.0, 1), (NOISE_STD, 1.0, 1)]
    for figure in (run["reported_epsilon"], reported["epsilon_total"],
                   independent_rdp_epsilon(history, reported["delta"])):  # RDP against RDP: like with like
        assert run["epsilon"] == pytest.approx(figure, rel=0.02)
    assert reported["epsilon_total"] > reported["epsilon"]  # training alone spent less
    # the independent figure is dp-accounting's PLD: (nearly) exact, so below Opacus' RDP upper bound
    assert run["epsilon_dp_accounting"] == pytest.approx(pld_epsilon(history, reported["delta"]), rel=3e-3)
    assert run["epsilon_dp_accounting"] < run["epsilon"] and consistent(run["epsilon"], run["epsilon_dp_accounting"],
                                                                        "rdp")
    assert budget["lifetime"]["epsilon"] == pytest.approx(run["epsilon"])
    assert all(row["agree"] for row in budget["rounds"])
    assert [r["epsilon_run"] for r in budget["rounds"]] == sorted(r["epsilon_run"] for r in budget["rounds"])

    assert report["payload_scan"]["clean"]
    record = report["coordinator_record"]  # --run-dir: compared with the run's metrics.json
    assert record["compared"] and record["key_matches"] and record["head"]["held"], record
    assert record["pinned_key"] == metrics["ledgers"]["leiden"]["ledger_key"] == record["site_key"]
    # 3 rounds x (4 SecAgg+ stages, the pre-flight answered in the setup stage's reply, + evaluate), then the
    # two recalibration rounds' 4 SecAgg+ stages
    assert report["integrity"]["ok"] and report["integrity"]["lines"] == 23
    assert report["policy"]["runs"][0]["status"] == "complied"
    mia = report["membership_inference"]
    assert mia["members"] + mia["non_members"] == sum(metrics["patients"]["leiden"].values())
    for name, attack in mia["attacks"].items():
        low, high = attack["auc_ci"]
        assert low <= attack["auc"] <= high and high - low < 0.3, name
        assert attack["auc_ceiling"] > 0.9 and not attack["exceeds_dp_ceiling"]
        assert attack["proven_epsilon"] <= mia["epsilon"] == pytest.approx(run["epsilon"])
        print(f"default DP run, leiden, {name}: AUC {attack['auc']:.3f} (95% CI {low:.3f}-{high:.3f}); "
              + ", ".join(f"TPR@{p['fpr']:.1%} {p['tpr']:.3f} ({p['ci'][0]:.3f}-{p['ci'][1]:.3f}), ceiling "
                          f"{p['ceiling']:.3f}" for p in attack["tpr_at_fpr"]))
    assert set(mia["attacks"]) == {"loss_threshold", "lira"}
    _assert_plain_words(page, budget["lifetime"], mia)
    # the attacked model is the published one: the trained model the recalibration rounds (4 and 5)
    # delivered, whose output layer the coordinator then scaled by Platt's map (a monotone map: the
    # attacks' AUCs are the same for both)
    (kept,) = load_received(run_dir / "site-state" / "leiden")
    bundle = torch.load(run_dir / "model.pt", weights_only=True)
    published = list(bundle["state_dict"].values())
    assert mia["run_id"] == kept.run_id and kept.round == 5
    folded = bundle.get("calibration", {}).get("folded", False)
    assert folded == (metrics["calibration"]["status"] == "fitted")  # no map fitted: the model as trained
    a, b = (bundle["calibration"]["a"], bundle["calibration"]["b"]) if folded else (1.0, 0.0)
    for received, saved in zip(kept.weights[:-2], published[:-2], strict=True):  # SecAgg+: float64; model.pt float32
        assert np.allclose(received, saved.numpy(), rtol=0, atol=1e-6)
    assert np.allclose(a * kept.weights[-2], published[-2].numpy(), rtol=1e-5, atol=1e-6)  # the output layer
    assert np.allclose(a * kept.weights[-1] + b, published[-1].numpy(), rtol=1e-5, atol=1e-6)

    for site in SITES[1:]:  # every site passes (loss attack only, to keep the test short)
        site_report = run_audit(_site(run_dir, site), tmp_path / site, shadow_models=0, bootstrap=200,
                                coordinator_record=metrics["ledgers"][site], coordinator_record_source="metrics.json")
        assert site_report["verdict"]["verdict"] == "pass", site_report["verdict"]
        assert site_report["privacy_budget"]["runs"][0]["epsilon"] == pytest.approx(
            metrics["privacy"]["per_site"][site]["epsilon_total"], rel=0.02)


def _assert_plain_words(page: str, lifetime: dict, mia: dict) -> None:
    """The budget section reads the lifetime (epsilon, delta) as an attack bound, with LiRA's measured figure
    beside it; every number recomputed here from the report."""
    eps, delta = lifetime["epsilon"], lifetime["delta"]
    bound = min(1.0, math.exp(eps) * 0.01 + delta, 1 - math.exp(-eps) * (1 - delta - 0.01))
    shown = re.search(r"In plain words: \u03b5 = ([\d.]+), \u03b4 = ([\d.e-]+) means: .*? e\^\u03b5 \u2248 ([\d,]+) "
                      r".*?correctly identify at most ([\d.]+)% of patients\.", page)
    assert shown, "plain-words sentence missing"
    assert float(shown[1]) == pytest.approx(eps, abs=0.005) and float(shown[2]) == pytest.approx(delta, rel=0.05)
    assert float(shown[3].replace(",", "")) == pytest.approx(math.exp(eps), rel=0.05)
    assert float(shown[4]) / 100 == pytest.approx(bound, abs=5e-4)
    assert page.index("In plain words") < page.index("Per round (cumulative)")  # in the privacy-budget section
    lira = mia["attacks"]["lira"]["tpr_at_fpr"][0]
    assert lira["fpr"] == 0.01
    measured = re.search(r"Measured: the LiRA \(shadow models\) attack .*? correctly identified ([\d.]+)% \(95% CI "
                         r"([\d.]+)% to ([\d.]+)%\) .*? allows at most ([\d.]+)%\.", page)
    assert measured, "measured LiRA figure missing"
    assert float(measured[1]) / 100 == pytest.approx(lira["tpr"], abs=5e-3)
    assert [float(measured[i]) / 100 for i in (2, 3)] == pytest.approx(lira["ci"], abs=5e-3)
    run_bound = float(dp_tpr_ceiling(0.01, mia["epsilon"], mia["delta"]))
    assert float(measured[4]) / 100 == pytest.approx(run_bound, abs=5e-4)


def _site(run_dir: Path, site: str, state_dir: Path | None = None) -> Site:
    """The simulated site as `audit --run-dir` finds it, optionally with a copied state folder."""
    located, policy_found, _ = locate_site(site, None, run_dir, state_dir, None, None)
    assert policy_found
    return located


@pytest.mark.slow
def test_edited_ledger_line_fails_and_is_named(dp_run, tmp_path: Path) -> None:
    run_dir, _ = dp_run
    state = _copy_site(run_dir, "seoul", tmp_path)
    ledger = state / "egress.jsonl"
    lines = ledger.read_text().splitlines()
    edited = json.loads(lines[7])
    edited["metrics"]["fitres.metrics/train_loss"] = 0.123  # line 8: the round-2 masked update
    lines[7] = json.dumps(edited, sort_keys=True, separators=(",", ":"))
    ledger.write_text("\n".join(lines) + "\n")

    report = run_audit(_site(run_dir, "seoul", state), tmp_path / "report", shadow_models=0, bootstrap=200)
    assert report["verdict"]["verdict"] == "fail"
    assert report["integrity"]["first_broken_line"] == 8
    first = report["verdict"]["reasons"][0]
    assert first["level"] == "fail" and "line 8" in first["text"], first
    assert "line 8" in (tmp_path / "report" / "audit.html").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["deleted", "emptied", "truncated"])
def test_a_deleted_or_truncated_egress_ledger_fails(dp_run, tmp_path: Path, damage: str) -> None:
    """The privacy ledger records the site's DP rounds, so an egress ledger without them is a failure: the
    record of what left the site was deleted (with its head file) or cut short."""
    run_dir, _ = dp_run
    state = _copy_site(run_dir, "leiden", tmp_path)
    ledger, head = state / LEDGER_FILE, state / HEAD_FILE
    assert ledger.exists() and head.exists() and verify(state).ok
    lines = ledger.read_bytes().splitlines(keepends=True)
    head.unlink()
    if damage == "deleted":
        ledger.unlink()
    elif damage == "emptied":
        ledger.write_bytes(b"")
    else:
        ledger.write_bytes(b"".join(lines[:-9]))  # the recalibration rounds and the last evaluate reply
    report = run_audit(_site(run_dir, "leiden", state), tmp_path / "report", shadow_models=0, bootstrap=100)
    assert report["verdict"]["verdict"] == "fail"
    first = report["verdict"]["reasons"][0]
    assert first["level"] == "fail" and first["topic"] == "ledger", first
    if damage == "truncated":  # the signed head is gone: the ledger as a whole cannot be trusted
        assert "head file missing" in first["text"]
    else:
        # 3 training rounds and the two recalibration histograms, each a DP release in the privacy ledger
        assert "deleted or never written" in first["text"] and "5 DP round(s)" in first["text"], first
        assert report["integrity"]["activity"]["dp_rounds_recorded"] == 5
        assert "deleted or never written" in (tmp_path / "report" / "audit.html").read_text()


@pytest.mark.slow
def test_planted_identifier_in_an_outgoing_metric_is_flagged(dp_run, tmp_path: Path) -> None:
    run_dir, _ = dp_run
    state = _copy_site(run_dir, "zurich", tmp_path)
    patient = str(pd.read_csv(run_dir / "sites" / "zurich" / "clinical.csv").patient_id[7])
    EgressLedger(state).append({"run_id": "planted", "round": 1, "kind": "evaluate", "arrays": [], "total_bytes": 0,
                                "metrics": {"evaluateres.metrics/auroc": 0.7, "evaluateres.metrics/note": patient}})
    assert verify(state).ok  # properly signed: only the scan can catch it

    report = run_audit(_site(run_dir, "zurich", state), tmp_path / "report", shadow_models=0, bootstrap=200)
    findings = report["payload_scan"]["findings"]
    planted = 3 * 5 + 8 + 1  # after 3 rounds x (4 SecAgg+ stages with the pre-flight + evaluate) and recalibration
    assert len(findings) == 1 and findings[0]["line"] == planted and findings[0]["severity"] == "fail"
    assert patient in findings[0]["what"] and "patient_id" in findings[0]["what"]
    assert report["verdict"]["verdict"] == "fail"
    assert any(r["topic"] == "payload" and f"line {planted}" in r["text"] for r in report["verdict"]["reasons"])


@pytest.mark.slow
def test_leaky_run_without_dp_is_flagged_and_membership_inference_finds_the_leak(tmp_path: Path) -> None:
    out = tmp_path / "leaky"
    _simulate(out, 1, LEAKY_RUN, {"require_dp": False, "require_secagg": False})
    code, output = _cli("--site", "leiden", "--run-dir", str(out), "--out", str(tmp_path / "report"),
                        "--shadow-models", "8", "--bootstrap", "300")
    report = json.loads((tmp_path / "report" / "audit.json").read_text())
    assert report["verdict"]["verdict"] in ("attention", "fail")
    assert code == (1 if report["verdict"]["verdict"] == "fail" else 0), output
    dp_reasons = [r for r in report["verdict"]["reasons"] if r["topic"] == "policy" and "DP off" in r["text"]]
    assert dp_reasons and dp_reasons[0]["level"] == "attention"
    mia = report["membership_inference"]
    assert mia["epsilon"] is None and not any(a["exceeds_dp_ceiling"] for a in mia["attacks"].values())
    for name, attack in mia["attacks"].items():
        print(f"leaky run (no DP, 1 site), leiden, {name}: AUC {attack['auc']:.3f} (95% CI "
              f"{attack['auc_ci'][0]:.3f}-{attack['auc_ci'][1]:.3f}); TPR@1% FPR {attack['tpr_at_fpr'][0]['tpr']:.3f}")
    lira = mia["attacks"]["lira"]
    assert lira["auc_ci"][0] > 0.55, lira["auc_ci"]
    assert mia["attacks"]["loss_threshold"]["auc"] > 0.55


def test_dp_ceiling_is_chance_at_epsilon_zero_and_loosens_with_epsilon() -> None:
    fpr = np.array([0.0, 0.001, 0.01, 0.5, 1.0])
    assert dp_tpr_ceiling(fpr, 0.0, 0.0) == pytest.approx(fpr)
    assert dp_auc_ceiling(0.0, 0.0) == pytest.approx(0.5, abs=1e-4)
    assert dp_tpr_ceiling(0.01, 1.0, 1e-5) == pytest.approx(np.e * 0.01 + 1e-5)
    assert dp_auc_ceiling(1.0, 1e-5) < dp_auc_ceiling(4.0, 1e-5) < 1.0


def test_attack_metrics_separate_a_perfect_attack_from_guessing() -> None:
    rng = np.random.default_rng(0)
    member = np.repeat([True, False], 200)
    perfect = evaluate_attack(member, member + rng.normal(0, 0.1, 400), bootstrap=200, seed=0)
    assert perfect["auc"] == 1.0 and perfect["tpr_at_fpr"][0]["tpr"] == 1.0
    guess = evaluate_attack(member, rng.normal(size=400), bootstrap=200, seed=0)
    assert guess["auc_ci"][0] < 0.5 < guess["auc_ci"][1]
    assert guess["tpr_at_fpr"][1]["ci"][1] < 0.1
    # what each proves: 200 members all caught at FPR 0 of 200 bounds epsilon below by log(~0.97 / ~0.02)
    assert 3.0 < proven_epsilon(member, member.astype(float), 1e-5) < 4.5
    assert proven_epsilon(member, rng.normal(size=400), 1e-5) < 0.5


def test_lira_ranks_by_each_patients_own_in_out_gap() -> None:
    # Two patients with the same confidence under the target model. Shadows show that patient 0 is
    # confidently predicted only when trained on, while patient 1 is an easy case either way:
    # the same confidence is evidence of membership for patient 0 only.
    inside = np.array([[True, False], [False, True], [True, False], [False, True]])
    phis = np.array([[3.0, 2.0], [0.0, 2.0], [3.1, 2.1], [0.1, 2.1]])
    scores = lira_scores(np.array([3.0, 3.0]), phis, inside)
    assert scores[0] > scores[1]


def test_scan_flags_identifiers_dates_undeclared_arrays_and_oversized_secagg_payloads() -> None:
    ids = Identifiers()
    ids.add("LEI0042", "clinical.csv column patient_id", True)
    ids.add("20230315", "DICOM header StudyDate", True)
    model = DeclaredModel((((32, 16), (32,)),), image_pixels=32 * 32)
    lines = [
        {"line": 1, "run": "r", "arrays": [{"name": "fitres.parameters/0", "shape": [32, 16]},
                                              {"name": "fitres.parameters/1", "shape": [32]}],
         "metrics": {"fitres.status/message": "Success", "fitres.metrics/dp": 1}},
        {"line": 2, "run": "r", "arrays": [], "metrics": {"evaluateres.metrics/comment": "seen LEI0042 today"}},
        {"line": 3, "run": "r", "arrays": [], "metrics": {"evaluateres.metrics/auroc": 20230315}},
        {"line": 4, "run": "r", "arrays": [{"name": "fitres.extra/x", "shape": [1, 64, 64]}], "metrics": {}},
        {"line": 5, "run": "r", "arrays": [],
         "metrics": {"secaggplus_configs/masked_params": {"items": 3, "bytes": 8 * 4096, "sha256": "0"}}},
        {"line": 6, "run": "r", "arrays": [], "error": {"code": 4403, "reason": "refused for 2023-03-15"},
         "metrics": {}},
        {"line": 7, "run": "r", "arrays": [], "metrics": {"evaluateres.metrics/extra": 0.3}},
    ]
    findings = scan_payloads(lines, ids, {}, model)
    flagged = {(f.line, f.severity) for f in findings}
    assert {line for line, _ in flagged} == {2, 3, 4, 5, 6, 7}
    assert {line for line, severity in flagged if severity == "fail"} == {2, 3, 4, 5, 6}
    what = {f.line: " ".join(g.what for g in findings if g.line == f.line) for f in findings}
    assert "patient_id" in what[2] and "StudyDate" in what[3] and "raw image" in what[4]
    assert "room for other data" in what[5] and "error text" in what[6] and "not declared" in what[7]


def test_audit_names_a_missing_site_folder_without_a_traceback(tmp_path: Path) -> None:
    code, output = _cli("--site", "leiden", "--state-dir", str(tmp_path / "nowhere"), "--data-dir", str(tmp_path))
    assert code == 2 and "nowhere" in output and "does not exist" in output and "Traceback" not in output
