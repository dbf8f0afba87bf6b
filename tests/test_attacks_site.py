"""Attacks on a site's privacy promises, each by the attacker it is meant to stop (issue 10).

- A curious coordinator sets the run's delta to 0.5 (a delta that protects nobody) or asks for
  any delta larger than the site's own 1 / (10 n) or its policy's max_delta: every site refuses
  before any training, naming rule max_delta, the delta asked and the delta it allows; a run that
  asks for a smaller delta is trained at it, and every epsilon the site reports or records names
  its delta.
- An insider (or a bug) makes the ClientApp raise mid-training, hoping the error reply that
  Flower sends leaves the site unrecorded: the egress ledger records it and still verifies.
- A curious coordinator reads held-out metrics of a tiny held-out split (a 10-patient AUROC says
  much about each patient), or evaluates without end to probe individual patients: the site sends
  only that it withheld them (policy min_eval_patients, min_eval_per_class, max_evaluations per
  dataset), and the coordinator's round averages cope. The loss on the training patients, which
  would leave in the clear beside a SecAgg+-masked update, is not sent at all.
- A privacy officer handed a folder of several sites' state folders runs `spine-fl ledger verify
  --site S`: the command verifies S's ledger, and says when a folder is another site's or when it
  cannot tell whose it is (instead of quietly verifying something else).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tomlkit
from flwr.app import Context, Message, Metadata, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import EvaluateIns, FitIns, ndarrays_to_parameters
from flwr.common.constant import ErrorCode
from flwr.compat.common.recorddict_compat import evaluateins_to_recorddict, fitins_to_recorddict
from typer.testing import CliRunner

from spine_fl.cli import app as cli_app
from spine_fl.client.app import build_client_app
from spine_fl.client.privacy.egress_ledger import LEDGER_FILE, EgressLedger, verify
from spine_fl.client.privacy.evaluation_budget import EvaluationBudget
from spine_fl.client.privacy.plan import plan_round
from spine_fl.client.privacy.policy import SitePolicy
from spine_fl.client.privacy.privacy_ledger import PrivacyLedger, dataset_id
from spine_fl.client.privacy.signed_log import SignedLog, load_or_create_key
from spine_fl.client.site_config import Site, policy_from_table
from spine_fl.server.strategy import RoundLog, weighted_mean
from spine_fl.shared import protocol
from spine_fl.shared.config import ConfigError, RunSettings, load_scenario
from spine_fl.shared.contract.tasks import get_task
from spine_fl.shared.models.registry import build_model
from spine_fl.shared.refusal import Refusal
from spine_fl.shared.training.local import get_weights
from spine_fl.simulations import runner
from spine_fl.simulations.synthetic.consortium import synthesize_consortium

RUN_KEY = "a" * 32
TASK = "rbp_tabular"


# --- one site, its ClientApp called in this process with the coordinator's messages -------------

def make_site(root: Path, test_patients: int | None = None, positives: int | None = None, **policy) -> Site:
    """A synthetic rbp_tabular site (128 training patients); optionally a held-out split cut to
    `test_patients` patients (`positives` of them with the outcome), the rest moved to training."""
    (site_dir,) = synthesize_consortium(root / "data", 1, 11, ())
    if test_patients is not None:
        cut_test_split(site_dir, test_patients, positives)
    return Site(site_dir.name, site_dir, root / "state",
                SitePolicy(**{"require_secagg": False, **policy}))


def cut_test_split(site_dir: Path, keep: int, positives: int | None = None) -> None:
    table = pd.read_csv(site_dir / "clinical.csv")
    test = table[table.split == "test"]
    if positives is None:
        kept = test.index[:keep]
    else:
        pos, neg = test.index[test.residual_pain == 1], test.index[test.residual_pain == 0]
        kept = pos[:positives].append(neg[:keep - positives])
    table.loc[test.index.difference(kept), "split"] = "train"
    table.to_csv(site_dir / "clinical.csv", index=False)


def instruction(kind: str, run: RunSettings, site: Site, server_round: int = 1, run_key: str = RUN_KEY) -> Message:
    """What the coordinator sends: the run settings, the round, the site list, the model."""
    config = {**run.to_run_config(), protocol.ROUND: server_round, protocol.SITES: site.name,
              protocol.RUN_KEY: run_key}
    params = ndarrays_to_parameters(get_weights(build_model(get_task(run.task), run.seed)))
    content = (fitins_to_recorddict(FitIns(params, config), keep_input=True) if kind == MessageType.TRAIN
               else evaluateins_to_recorddict(EvaluateIns(params, config), keep_input=True))
    metadata = Metadata(run_id=1, message_id=f"m{time.time_ns()}", src_node_id=0, dst_node_id=1,
                        reply_to_message_id="", group_id=str(server_round), created_at=time.time(), ttl=3600,
                        message_type=kind)
    return Message(content=content, metadata=metadata)


def send(site: Site, kind: str, run: RunSettings, **kwargs) -> Message:
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    return build_client_app([site])(instruction(kind, run, site, **kwargs), context)


def ledger_lines(state: Path) -> list[dict]:
    return [json.loads(line) for line in (state / LEDGER_FILE).read_text().splitlines()]


def reply_metrics(reply: Message, record: str) -> dict:
    return dict(reply.content.config_records[record])


def run_settings(**kw) -> RunSettings:
    return RunSettings(**{"task": TASK, "rounds": 2, "batch_size": 16, "secagg": False, "min_sites": 1, **kw})


# --- 1. delta belongs to the site ---------------------------------------------------------------

def test_a_coordinators_delta_of_one_half_is_refused_before_any_training(tmp_path: Path) -> None:
    site = make_site(tmp_path)
    reply = send(site, MessageType.TRAIN, run_settings(delta=0.5))
    assert reply.has_error() and reply.error.code == protocol.REFUSAL_CODE
    refusal = Refusal.parse(reply.error.reason)
    assert refusal is not None and refusal["rule"] == "max_delta" and refusal["site"] == site.name
    assert refusal["delta_asked"] == 0.5 and refusal["delta_allowed"] == pytest.approx(1 / (10 * 128))
    assert not PrivacyLedger(site.state_dir, dataset_id(site.data_dir)).path.exists()  # nothing trained or spent
    (line,) = ledger_lines(site.state_dir)  # the refusal itself is recorded before it leaves
    assert line["kind"] == MessageType.TRAIN and "max_delta" in line["error"]["reason"] and verify(site.state_dir).ok


def test_a_delta_above_the_policys_max_delta_is_refused_and_a_smaller_one_is_used(tmp_path: Path) -> None:
    site = make_site(tmp_path, max_delta=1e-5)
    refused = Refusal.parse(send(site, MessageType.TRAIN, run_settings(delta=1e-4)).error.reason)
    assert refused["rule"] == "max_delta" and refused["delta_asked"] == 1e-4 and refused["delta_allowed"] == 1e-5

    own = send(site, MessageType.TRAIN, run_settings(delta=0.0))  # 0: each site's own delta
    assert reply_metrics(own, protocol.FIT_METRICS)[protocol.DELTA] == 1e-5  # below 1 / 1280: the policy's
    smaller = send(site, MessageType.TRAIN, run_settings(delta=1e-7), server_round=2)
    reported = reply_metrics(smaller, protocol.FIT_METRICS)
    assert reported[protocol.DELTA] == 1e-7
    records = PrivacyLedger(site.state_dir, dataset_id(site.data_dir)).records()
    assert [r.delta for r in records] == [1e-5, 1e-7]
    trained = [line for line in ledger_lines(site.state_dir) if line["kind"] == MessageType.TRAIN and not line.get("error")]
    for line, delta in zip(trained, (1e-5, 1e-7)):  # every recorded epsilon names its delta
        assert line["epsilon"] > 0 and line["delta"] == delta
    assert trained[1]["epsilon"] == pytest.approx(reported[protocol.EPSILON_LIFETIME])


def test_without_the_policy_mod_no_larger_delta_is_ever_planned() -> None:
    assert plan_round(run_settings(delta=0.5), 128).delta == pytest.approx(1 / 1280)  # the site's own
    assert plan_round(run_settings(delta=0.5), 128, max_delta=1e-6).delta == 1e-6
    assert plan_round(run_settings(), 128).delta == pytest.approx(1 / 1280)
    assert plan_round(run_settings(), 128, max_delta=1e-6).delta == 1e-6
    assert plan_round(run_settings(delta=1e-8), 128, max_delta=1e-6).delta == 1e-8
    for bad in (0.0, 1.0, 1.5, -1e-5):
        with pytest.raises(ConfigError, match="max_delta"):
            policy_from_table({"max_delta": bad}, "test [policy]")


# --- 2. every reply recorded ----------------------------------------------------------------------

def test_a_client_app_that_raises_still_leaves_a_recorded_error_reply(tmp_path: Path, monkeypatch) -> None:
    import spine_fl.client.app as client_app

    def broken_train(*args, **kwargs):
        raise RuntimeError("training blew up")

    monkeypatch.setattr(client_app, "train", broken_train)
    site = make_site(tmp_path)
    reply = send(site, MessageType.TRAIN, run_settings())
    # what Flower itself would have sent (flwr.supernode.runtime.run_clientapp)
    assert reply.has_error() and reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert reply.error.reason == "<class 'RuntimeError'>:<'training blew up'>"
    (line,) = ledger_lines(site.state_dir)
    assert line["kind"] == MessageType.TRAIN and line["site"] == site.name
    assert line["error"] == {"code": ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "reason": reply.error.reason}
    assert verify(site.state_dir).ok


def test_an_egress_ledger_truncated_and_re_signed_fails_the_audit_naming_the_missing_rounds(tmp_path: Path) -> None:
    """The insider holds the site's key: dropping the last replies and re-signing the head leaves a
    ledger that verifies on its own. The privacy ledger (and the coordinator's record) still count
    every DP reply that left, each of which named its privacy-ledger line."""
    from spine_fl.client.audit.run import run_audit
    from spine_fl.client.privacy.signed_log import site_key_fingerprint

    site = make_site(tmp_path)
    for r in (1, 2, 3):
        reply = send(site, MessageType.TRAIN, run_settings(rounds=3), server_round=r)
        assert not reply.has_error(), reply.error
    last = reply_metrics(reply, protocol.FIT_METRICS)
    truncate_and_re_sign(EgressLedger(site.state_dir).log, site.state_dir, 2)  # rounds 2 and 3 gone
    assert verify(site.state_dir).ok and len(ledger_lines(site.state_dir)) == 1

    recorded = {"ledger_key": site_key_fingerprint(site.state_dir), "key_pinned_by": "first reply",
                **{k: last[k] for k in protocol.LEDGER_HEAD}}
    report = run_audit(site, tmp_path / "audit", shadow_models=0, bootstrap=100, coordinator_record=recorded,
                       coordinator_record_source="test")
    assert report["verdict"]["verdict"] == "fail"
    fails = {r["topic"]: r["text"] for r in report["verdict"]["reasons"] if r["level"] == "fail"}
    assert f"run {RUN_KEY} round(s) 2, 3" in fails["ledger"] and "line(s) 2, 3" in fails["ledger"]
    assert "lacks 2 of them" in fails["coordinator record"] and "line(s) 2, 3" in fails["coordinator record"]
    assert [m["round"] for m in report["integrity"]["activity"]["dp_replies_missing"]] == [2, 3]

    without = run_audit(site, tmp_path / "audit2", shadow_models=0, bootstrap=100)  # no run result: still FAIL
    assert without["verdict"]["verdict"] == "fail"


# --- 3. small-site protection ---------------------------------------------------------------------

WITHHELD_KEYS = {protocol.evaluate_metric(protocol.SITE_INDEX), protocol.evaluate_metric(protocol.WITHHELD),
                 "evaluateres.loss/loss", protocol.EVALUATE_NUM_EXAMPLES, "evaluateres.status/code",
                 "evaluateres.status/message"}


def assert_withheld(reply: Message, line: dict) -> None:
    assert reply_metrics(reply, protocol.EVALUATE_METRICS) == {protocol.SITE_INDEX: 0, protocol.WITHHELD: 1}
    assert line["kind"] == MessageType.EVALUATE and set(line["metrics"]) == WITHHELD_KEYS
    assert line["metrics"]["evaluateres.loss/loss"] == 0.0 and line["num_examples"] == 0


def test_a_ten_patient_held_out_split_sends_no_held_out_metric(tmp_path: Path, caplog) -> None:
    site = make_site(tmp_path, test_patients=10, positives=3)
    with caplog.at_level(logging.WARNING, logger="spine_fl"):
        reply = send(site, MessageType.EVALUATE, run_settings())
    assert_withheld(reply, ledger_lines(site.state_dir)[-1])
    assert "withheld" in caplog.text and "min_eval_patients = 20" in caplog.text  # the site says so


def test_too_few_patients_of_one_outcome_withholds_too(tmp_path: Path) -> None:
    site = make_site(tmp_path, test_patients=40, positives=3)
    assert_withheld(send(site, MessageType.EVALUATE, run_settings()), ledger_lines(site.state_dir)[-1])
    bigger = make_site(tmp_path / "b", test_patients=40, positives=5)
    metrics = reply_metrics(send(bigger, MessageType.EVALUATE, run_settings()), protocol.EVALUATE_METRICS)
    assert protocol.WITHHELD not in metrics and set(protocol.EVALUATION_METRICS) <= set(metrics)


def test_the_evaluation_budget_per_dataset_cannot_be_reset_by_a_new_run(tmp_path: Path) -> None:
    site = make_site(tmp_path, max_evaluations=2)
    released = [send(site, MessageType.EVALUATE, run_settings(), server_round=r) for r in (1, 2)]
    assert all(protocol.WITHHELD not in reply_metrics(r, protocol.EVALUATE_METRICS) for r in released)
    another_run = send(site, MessageType.EVALUATE, run_settings(seed=5), run_key="b" * 32)
    assert_withheld(another_run, ledger_lines(site.state_dir)[-1])
    budget = EvaluationBudget(site.state_dir, dataset_id(site.data_dir))
    assert budget.used() == 2
    assert budget.path.parent.parent == site.state_dir / "privacy" and budget.path.suffix == ".jsonl"

    fresh = make_site(tmp_path / "corrupt")
    bad = EvaluationBudget(fresh.state_dir, dataset_id(fresh.data_dir)).path
    bad.parent.mkdir(parents=True)
    bad.write_text("{not json\n")  # an unreadable count refuses; it never restarts at zero
    assert evaluation_refusal(send(fresh, MessageType.EVALUATE, run_settings()))["rule"] == "evaluation_budget"


def evaluation_refusal(reply: Message) -> dict:
    """The refusal an evaluate reply carries (rule evaluation_budget): no figure left the site."""
    assert reply.has_error(), reply.content
    assert reply.error.code == protocol.REFUSAL_CODE, reply.error  # a refusal, not a crash
    refusal = Refusal.parse(reply.error.reason)
    assert refusal is not None and refusal["rule"] == "evaluation_budget", reply.error.reason
    return refusal


def truncate_and_re_sign(log: SignedLog, state_dir: Path, drop: int) -> None:
    """The insider, who holds the site's key: drop the last `drop` lines and sign a matching head."""
    raw = log.raw_lines()[:-drop]
    log.path.write_bytes(b"".join(line + b"\n" for line in raw))
    log._write_head(load_or_create_key(state_dir), len(raw) - 1, hashlib.sha256(raw[-1]).hexdigest())
    assert log.verify().ok  # it verifies on its own


@pytest.mark.parametrize("attack", ["delete", "truncate", "truncate_and_re_sign", "edit"])
def test_an_evaluation_budget_deleted_truncated_or_edited_is_refused(tmp_path: Path, attack: str) -> None:
    site = make_site(tmp_path, max_evaluations=3)
    for r in (1, 2):
        reply = send(site, MessageType.EVALUATE, run_settings(), server_round=r)
        assert protocol.WITHHELD not in reply_metrics(reply, protocol.EVALUATE_METRICS)
    budget = EvaluationBudget(site.state_dir, dataset_id(site.data_dir))
    assert budget.used() == 2 and budget.log.verify().ok  # signed and chained like the ledgers
    if attack == "delete":  # the count would restart at zero
        budget.path.unlink()
        budget.head.unlink()
    elif attack == "truncate":
        budget.path.write_bytes(budget.path.read_bytes().splitlines(keepends=True)[0])
    elif attack == "truncate_and_re_sign":
        truncate_and_re_sign(budget.log, site.state_dir, 1)
    else:
        budget.path.write_text(budget.path.read_text().replace('"round":2', '"round":7'))
    before = len(ledger_lines(site.state_dir))
    refusal = evaluation_refusal(send(site, MessageType.EVALUATE, run_settings(), server_round=3))
    assert refusal["site"] == site.name and str(budget.path) in refusal["message"]
    expected = {"delete": "is missing, yet the egress ledger records 2 release(s)",
                "truncate": "does not verify", "edit": "does not verify at line 2",
                "truncate_and_re_sign": "holds 1 line(s), yet the egress ledger records 2 release(s)"}[attack]
    assert expected in refusal["message"] and "Restore the evaluation budget" in refusal["message"]
    (line,) = ledger_lines(site.state_dir)[before:]  # the refusal is recorded; no held-out figure left
    assert line["error"] and not any(k.startswith(protocol.EVALUATE_METRICS) for k in line["metrics"])
    assert not budget.path.exists() or len(budget.log.raw_lines()) < 3  # nothing taken


def test_train_replies_carry_no_train_loss(tmp_path: Path) -> None:
    site = make_site(tmp_path)
    for dp in (True, False):
        policy_site = Site(site.name, site.data_dir, site.state_dir,
                           SitePolicy(require_secagg=False, require_dp=dp))
        reply = send(policy_site, MessageType.TRAIN, run_settings(dp=dp), server_round=1 + int(not dp))
        assert "train_loss" not in reply_metrics(reply, protocol.FIT_METRICS)
    assert "train_loss" not in protocol.TRAIN_METRICS
    assert not any("loss" in key for line in ledger_lines(site.state_dir) for key in line["metrics"])


def test_the_coordinator_averages_cope_with_a_site_that_withheld() -> None:
    log = RoundLog(sites=["leiden", "seoul", "zurich"], min_sites=2)
    reports = [(40, {protocol.SITE_INDEX: 0, "auroc": 0.8, "brier": 0.2}),
               (60, {protocol.SITE_INDEX: 1, "auroc": 0.6, "brier": 0.1}),
               (0, {protocol.SITE_INDEX: 2, protocol.WITHHELD: 1})]
    log.record_evaluate(1, reports, failures=0)
    entry = log.rounds[-1]
    assert entry["auroc"] == pytest.approx(0.68) and entry["brier"] == pytest.approx(0.14)
    assert set(entry["per_site"]) == {"leiden", "seoul"} and entry["withheld"] == ["zurich"]
    assert weighted_mean(reports[2:]) == {}
    log.record_evaluate(2, reports[2:], failures=0)  # every site withheld: no figure, no crash
    assert np.isnan(log.rounds[-1]["auroc"]) and log.rounds[-1]["withheld"] == ["zurich"]


def test_a_round_where_every_site_withheld_does_not_stop_flowers_strategy() -> None:
    """Flower's FedAvg divides by the examples evaluated: withheld replies (0 examples) must not reach it."""
    from flwr.common import Code, EvaluateRes, Status
    from flwr.server.strategy import FedAvg

    from spine_fl.server.coordinator_record import CoordinatorRecord
    from spine_fl.server.strategy import RecordingStrategy

    log = RoundLog(sites=["leiden", "seoul"], min_sites=2)
    strategy = RecordingStrategy(FedAvg(), log, CoordinatorRecord(None))
    withheld = [(None, EvaluateRes(Status(Code.OK, ""), 0.0, 0, {protocol.SITE_INDEX: i, protocol.WITHHELD: 1}))
                for i in range(2)]
    loss, _ = strategy.aggregate_evaluate(1, withheld, [])
    assert loss is None and log.rounds[-1]["withheld"] == ["leiden", "seoul"]


# --- 4. `spine-fl ledger verify --site` verifies that site's ledger ---------------------------------

def test_ledger_verify_picks_the_sites_folder_and_says_whose_ledger_it_checked(tmp_path: Path) -> None:
    root = tmp_path / "site-state"
    for name in ("leiden", "seoul"):
        for i in range(3):
            EgressLedger(root / name).append({"site": name, "kind": "evaluate", "round": i, "metrics": {}})
    leiden = root / "leiden" / LEDGER_FILE
    leiden.write_text(leiden.read_text().replace('"round":1', '"round":7'))  # leiden's ledger is broken

    def verify_cli(*args: str):
        return CliRunner().invoke(cli_app, ["ledger", "verify", *args])

    seoul = verify_cli("--site", "seoul", "--state-dir", str(root))
    assert seoul.exit_code == 0 and "seoul" in seoul.output and "names seoul" in seoul.output
    broken = verify_cli("--site", "leiden", "--state-dir", str(root))
    assert broken.exit_code == 1 and "line 2" in broken.output
    wrong = verify_cli("--site", "seoul", "--state-dir", str(root / "leiden"))
    assert wrong.exit_code == 2 and "not seoul's ledger" in wrong.output
    missing = verify_cli("--site", "zurich", "--state-dir", str(root))
    assert missing.exit_code == 2 and "leiden, seoul" in missing.output

    anonymous = tmp_path / "copy-of-some-site"  # lines that do not name their site
    EgressLedger(anonymous).append({"kind": "train", "round": 1, "metrics": {}})
    unsure = verify_cli("--site", "zurich", "--state-dir", str(anonymous))
    assert unsure.exit_code == 0 and "NOT confirmed" in " ".join(unsure.output.split())


# --- on Flower's simulation engine ----------------------------------------------------------------

BASE_RUN = {"task": TASK, "rounds": 2, "local_epochs": 1, "batch_size": 16, "learning_rate": 0.3,
            "noise_multiplier": 1.0, "min_sites": 3, "seed": 1}


def simulate_scenario(out: Path, run: dict) -> dict:
    out.mkdir(parents=True)
    path = out / "scenario.toml"
    path.write_text(tomlkit.dumps({"name": "attack", "consortium": {"source": "synthetic", "sites": 3, "seed": 11},
                                   "run": {**BASE_RUN, **run}, "policy": {}}))
    return runner.simulate(load_scenario(path), out)


@pytest.mark.slow
def test_simulated_coordinator_asking_delta_one_half_trains_no_site(tmp_path: Path) -> None:
    metrics = simulate_scenario(tmp_path / "half", {"delta": 0.5})
    assert metrics["status"] == "stopped"  # under SecAgg+: every attempt at round 1 failed, retries used up
    assert not any(r["trained"] for r in metrics["rounds"])
    refusals = {r["site"]: r for r in metrics["privacy"]["refusals"]}
    assert set(refusals) == set(metrics["sites"])
    for site, refusal in refusals.items():
        assert refusal["rule"] == "max_delta" and refusal["delta_asked"] == 0.5
        assert refusal["delta_allowed"] == pytest.approx(1 / (10 * metrics["patients"][site]["train"]))
        state = tmp_path / "half" / "site-state" / site
        assert not list(state.glob("privacy/*.jsonl")) and verify(state).ok  # nothing spent; refusal recorded
    assert not any(p["trained"] for p in metrics["privacy"]["per_site"].values())


@pytest.mark.slow
def test_simulated_smaller_delta_is_used_and_a_small_site_withholds(tmp_path: Path, monkeypatch) -> None:
    build = runner.build_consortium

    def with_small_zurich(scenario, data_dir):
        dirs = build(scenario, data_dir)
        cut_test_split(next(d for d in dirs if d.name == "zurich"), 10, positives=3)
        return dirs

    monkeypatch.setattr(runner, "build_consortium", with_small_zurich)
    out = tmp_path / "small"
    metrics = simulate_scenario(out, {"delta": 1e-5})
    assert metrics["status"] == "completed" and metrics["patients"]["zurich"]["test"] == 10
    for site, p in metrics["privacy"]["per_site"].items():
        assert p["trained"] and p["delta"] == 1e-5, site
    for entry in metrics["rounds"]:
        assert entry["withheld"] == ["zurich"] and set(entry["per_site"]) == {"leiden", "seoul"}
        assert np.isfinite(entry["auroc"])
    for site in metrics["sites"]:
        lines = ledger_lines(out / "site-state" / site)
        assert verify(out / "site-state" / site).ok
        assert not any(k.endswith("train_loss") for line in lines for k in line["metrics"])
        for line in lines:
            if line["epsilon"] is not None:
                assert line["delta"] == 1e-5
        evaluations = [line for line in lines if line["kind"] == MessageType.EVALUATE]
        assert len(evaluations) == 2
        if site == "zurich":  # no figure computed on its 10 held-out patients left
            assert all(set(line["metrics"]) == WITHHELD_KEYS for line in evaluations)
        else:
            assert all(protocol.evaluate_metric("auroc") in line["metrics"] for line in evaluations)
    cli = CliRunner().invoke(cli_app, ["ledger", "verify", "--site", "zurich", "--state-dir", str(out / "site-state")])
    assert cli.exit_code == 0 and "zurich" in cli.output
