"""Attacks that only the coordinator's record stops (issue 10, parts 2, 3 and 9).

An insider with the site's disk deletes BOTH ledgers, or rolls the privacy ledger back to an older
copy, or makes a new key and re-signs edited ledgers: each ledger then verifies on its own. The
coordinator keeps, per site, the ledger key it pinned and the last privacy-ledger head the site's
replies carried; the pre-flight before every round sends the head back and checks the key, so the
site refuses (or is refused) before it trains, and the site's audit FAILs against the run result.
A coordinator restarted mid-round asks for the same round again: the site re-sends the reply it
was charged for instead of training (and paying) twice. A round that too few sites can afford ends
in the pre-flight, before anyone spends epsilon.

The unit tests call one site's real ClientApp (all mods) in this process; the slow ones run whole
federations on Flower's simulation engine with the sites' state kept across runs.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import FitIns, Parameters, parameters_to_ndarrays
from flwr.compat.common.recorddict_compat import recorddict_to_fitres
from test_attacks_site import RUN_KEY, instruction, make_site, run_settings, send
from test_privacy_simulation import run_scenario

from spine_fl.client.app import build_client_app
from spine_fl.client.audit.run import run_audit
from spine_fl.client.privacy.egress_ledger import HEAD_FILE, LEDGER_FILE
from spine_fl.client.privacy.policy import SitePolicy
from spine_fl.client.privacy.privacy_ledger import PrivacyLedger, dataset_id
from spine_fl.client.privacy.signed_log import KEY_FILE, PUBLIC_KEY_FILE, site_key_fingerprint
from spine_fl.client.site_config import Site
from spine_fl.server.coordinator_record import CoordinatorRecord, preflight_statement
from spine_fl.server.preflight import PreflightRequest
from spine_fl.server.preflight import preflight as server_preflight
from spine_fl.server.strategy import RoundLog
from spine_fl.shared import protocol
from spine_fl.shared.refusal import Refusal

RUN = run_settings()


def preflight(site: Site, heads: dict | None = None, server_round: int = 1) -> Message:
    """The coordinator's pre-flight for one round, as server/preflight.py builds it."""
    train = instruction(MessageType.TRAIN, RUN, site, server_round)
    config = dict(train.content.config_records[protocol.FIT_CONFIG])
    content = RecordDict({protocol.PREFLIGHT: ConfigRecord({**config, protocol.LEDGER_HEADS: json.dumps(heads or {})})})
    metadata = Metadata(run_id=1, message_id=f"m{time.time_ns()}", src_node_id=0, dst_node_id=1,
                        reply_to_message_id="", group_id=str(server_round), created_at=time.time(), ttl=3600,
                        message_type=MessageType.QUERY)
    message = Message(content=content, metadata=metadata)
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    return build_client_app([site])(message, context)


def refusal_of(reply: Message) -> dict:
    assert reply.has_error() and reply.error.code == protocol.REFUSAL_CODE, reply
    parsed = Refusal.parse(reply.error.reason)
    assert parsed is not None
    return parsed


def trained_head(site: Site, server_round: int = 1) -> dict:
    """Train one DP round; the head its reply carries (what the coordinator records)."""
    reply = send(site, MessageType.TRAIN, RUN, server_round=server_round)
    assert not reply.has_error(), reply.error
    metrics = dict(reply.content.config_records[protocol.FIT_METRICS])
    assert metrics[protocol.LEDGER_KEY] == site_key_fingerprint(site.state_dir)
    return {k: metrics[k] for k in protocol.LEDGER_HEAD}


def test_preflight_answers_ready_with_the_key_and_head_and_nothing_is_spent(tmp_path: Path) -> None:
    site = make_site(tmp_path)
    head = trained_head(site)
    ledger = PrivacyLedger(site.state_dir, dataset_id(site.data_dir))
    before = ledger.path.read_bytes()
    answer = dict(preflight(site, {site.name: head}, server_round=2).content.config_records[protocol.PREFLIGHT_REPLY])
    assert answer[protocol.READY] == 1 and answer[protocol.SITE] == site.name
    assert answer[protocol.LEDGER_KEY] == site_key_fingerprint(site.state_dir)
    assert {k: answer[k] for k in protocol.LEDGER_HEAD} == head  # nothing trained since
    assert ledger.path.read_bytes() == before  # asking costs nothing


def test_preflight_refuses_a_round_over_budget_before_training(tmp_path: Path) -> None:
    site = make_site(tmp_path, epsilon_per_run=0.5)
    refusal = refusal_of(preflight(site))
    assert refusal["rule"] == "epsilon_per_run" and refusal["epsilon_after"] > 0.5
    assert not PrivacyLedger(site.state_dir, dataset_id(site.data_dir)).log.exists()


def test_deleting_both_ledgers_is_refused_against_the_coordinators_head(tmp_path: Path) -> None:
    site = make_site(tmp_path)
    head = trained_head(site)
    shutil.rmtree(site.state_dir / "privacy")  # the privacy ledger, its head, the kept reply
    for name in (LEDGER_FILE, HEAD_FILE):  # and the egress ledger that would have shown the spending
        (site.state_dir / name).unlink()
    assert preflight(site).content.config_records[protocol.PREFLIGHT_REPLY][protocol.READY] == 1  # alone: fresh
    refusal = refusal_of(preflight(site, {site.name: head}, server_round=2))
    assert refusal["rule"] == "privacy_ledger"
    assert "coordinator's record" in refusal["message"] and "is missing (deleted?)" in refusal["message"]
    assert not (site.state_dir / "privacy").exists() or not list((site.state_dir / "privacy").glob("*.jsonl"))


def test_a_ledger_rolled_back_to_an_older_copy_is_refused(tmp_path: Path) -> None:
    site = make_site(tmp_path)
    trained_head(site, 1)
    older = tmp_path / "older"
    shutil.copytree(site.state_dir, older)  # a backup after round 1: verifies on its own
    head = trained_head(site, 2)
    shutil.rmtree(site.state_dir)
    shutil.copytree(older, site.state_dir)
    refusal = refusal_of(preflight(site, {site.name: head}, server_round=3))
    assert refusal["rule"] == "privacy_ledger" and "now has 1 line(s)" in refusal["message"]
    assert "rolled back" in refusal["message"]


def test_a_round_asked_again_is_re_sent_not_charged_twice(tmp_path: Path) -> None:
    """A coordinator restarted mid-round sends the same round with the same model: same reply, one charge."""
    site = make_site(tmp_path)
    ledger = PrivacyLedger(site.state_dir, dataset_id(site.data_dir))
    first = send(site, MessageType.TRAIN, RUN, server_round=1)
    again = send(site, MessageType.TRAIN, RUN, server_round=1)
    a, b = (recorddict_to_fitres(r.content, keep_input=True) for r in (first, again))
    for x, y in zip(parameters_to_ndarrays(a.parameters), parameters_to_ndarrays(b.parameters), strict=True):
        assert (x == y).all()  # the very update already charged, not a new draw of the noise
    assert a.metrics == b.metrics and a.num_examples == b.num_examples
    assert [(r.run_id, r.round) for r in ledger.records()] == [(RUN_KEY, 1)]  # charged once

    other = send(site, MessageType.TRAIN, run_settings(seed=5), server_round=1)  # another model, same round
    refusal = refusal_of(other)
    assert refusal["rule"] == "round_already_charged" and "another global model" in refusal["message"]
    assert len(ledger.records()) == 1

    (site.state_dir / "privacy" / "replies" / f"{RUN_KEY}.npz").unlink()  # the kept reply lost
    refusal = refusal_of(preflight(site, server_round=1))
    assert refusal["rule"] == "round_already_charged" and "not kept" in refusal["message"]


def _replace_key(state_dir: Path) -> None:
    new = Ed25519PrivateKey.generate()
    (state_dir / KEY_FILE).unlink()
    fd = os.open(state_dir / KEY_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(new.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    (state_dir / PUBLIC_KEY_FILE).write_bytes(new.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))


def _replace_key_and_re_sign(site: Site) -> None:
    """The insider: a new key, and the privacy ledger re-signed with it (the same records)."""
    ledger = PrivacyLedger(site.state_dir, dataset_id(site.data_dir))
    kept = ledger.records()
    _replace_key(site.state_dir)
    ledger.path.unlink()
    ledger.head.unlink()
    for record in kept:
        ledger.append(record)
    assert PrivacyLedger(site.state_dir, ledger.dataset).records() == kept  # verifies on its own


def test_a_new_key_that_re_signs_the_ledgers_is_refused_and_fails_the_audit(tmp_path: Path) -> None:
    site = make_site(tmp_path)
    record = CoordinatorRecord(tmp_path / "coordinator-record.json")
    pinned = site_key_fingerprint(site.state_dir)
    assert record.key_problem(site.name, pinned) is None  # pinned on the first reply
    head = trained_head(site)
    record.record_reply(site.name, {**head, protocol.LEDGER_KEY: pinned})

    _replace_key_and_re_sign(site)
    refusal = refusal_of(preflight(site, {site.name: head}, server_round=2))  # re-signed lines hash differently
    assert refusal["rule"] == "privacy_ledger" and "replaced" in refusal["message"]
    answer = preflight(site, server_round=2).content.config_records[protocol.PREFLIGHT_REPLY]
    assert answer[protocol.READY] == 1  # without the head the site sees nothing wrong: its files verify
    problem = CoordinatorRecord.load(record.path).key_problem(site.name, str(answer[protocol.LEDGER_KEY]))
    assert problem is not None and pinned in problem and "not accepted" in problem

    ledger_entry = record.summary([site.name])[site.name]
    assert ledger_entry["ledger_key"] == pinned and ledger_entry["key_pinned_by"] == "first reply"
    report = run_audit(site, tmp_path / "audit", shadow_models=0, bootstrap=100, coordinator_record=ledger_entry,
                       coordinator_record_source="test")
    assert report["verdict"]["verdict"] == "fail"
    whys = [r for r in report["verdict"]["reasons"] if r["topic"] == "coordinator record"]
    assert {r["level"] for r in whys} == {"fail"}
    assert any(pinned in r["text"] and "re-signed" in r["text"] for r in whys)  # the key
    assert any("does not hold that line" in r["text"] for r in whys)  # and the head: re-signed lines hash anew


def test_an_enrolled_key_wins_over_one_seen_first(tmp_path: Path) -> None:
    record = CoordinatorRecord.load(tmp_path / "r.json", {"leiden": "sha256:" + "a" * 64})
    assert record.key_problem("leiden", "sha256:" + "b" * 64) is not None
    assert record.key_problem("leiden", "sha256:" + "a" * 64) is None
    assert record.pinned_key("leiden") == ("sha256:" + "a" * 64, "enrolment")
    (tmp_path / "r.json").write_text("{not json")
    with pytest.raises(RuntimeError, match="Restore it from backup"):
        CoordinatorRecord.load(tmp_path / "r.json")


# --- the pre-flight proves the key: a signature over (run key, round, fresh nonce) ----------------

class SiteGrid:
    """The Grid the coordinator's pre-flight talks through (server/preflight.py, or the SecAgg+ setup
    stage's), delivering each message to one site's real ClientApp; `tamper(request, reply)` may put
    another reply on the wire."""

    def __init__(self, site: Site, tamper=None):
        self.site, self.tamper, self.replies = site, tamper, []

    def send_and_receive(self, messages, timeout):
        out = []
        for sent in messages:
            metadata = Metadata(run_id=1, message_id=f"m{time.time_ns()}", src_node_id=0,
                                dst_node_id=sent.metadata.dst_node_id, reply_to_message_id="",
                                group_id=sent.metadata.group_id, created_at=time.time(), ttl=3600,
                                message_type=sent.metadata.message_type)
            request = Message(content=sent.content, metadata=metadata)
            context = Context(run_id=1, node_id=sent.metadata.dst_node_id, node_config={"partition-id": 0},
                              state=RecordDict(), run_config={})
            reply = build_client_app([self.site])(request, context)
            if self.tamper is not None:
                reply = self.tamper(request, reply)
            self.replies.append(reply)
            out.append(reply)
        return out


class Proxy:
    def __init__(self, grid: SiteGrid, node_id: int = 7):
        self.grid, self.node_id = grid, node_id


def coordinator_preflight(site: Site, record: CoordinatorRecord, server_round: int = 1, tamper=None,
                          grid: SiteGrid | None = None):
    """server/preflight.py's pre-flight of one round for one site; (sites chosen, the round's log, grid)."""
    grid = grid or SiteGrid(site, tamper)
    grid.tamper = tamper
    config = dict(instruction(MessageType.TRAIN, RUN, site, server_round).content.config_records[protocol.FIT_CONFIG])
    log = RoundLog(sites=[site.name], min_sites=1)
    chosen = server_preflight(PreflightRequest([(Proxy(grid), FitIns(Parameters([], "numpy.ndarray"), config))],
                                               server_round, server_round, record, log))
    return chosen, log, grid


def answer_of(reply: Message) -> dict:
    return dict(reply.content.config_records[protocol.PREFLIGHT_REPLY])


def reply_with(request: Message, answer: dict) -> Message:
    return Message(RecordDict({protocol.PREFLIGHT_REPLY: ConfigRecord(answer)}), reply_to=request)


@pytest.fixture
def in_a_server_app(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's Message(dst_node_id=...) needs the ServerApp's run id, as inside a ServerApp."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 0)


def test_the_honest_site_proves_its_key_and_is_pinned_on_first_use(tmp_path: Path, in_a_server_app) -> None:
    site = make_site(tmp_path)
    record = CoordinatorRecord(tmp_path / "coordinator-record.json")
    chosen, log, grid = coordinator_preflight(site, record)
    assert len(chosen) == 1 and not log.refusals and not log.stopped
    answer = answer_of(grid.replies[0])
    assert answer[protocol.LEDGER_KEY] == site_key_fingerprint(site.state_dir)
    assert record.pinned_key(site.name) == (site_key_fingerprint(site.state_dir), "first reply")  # trust on first use
    assert record.pinned_public_key(site.name) == answer[protocol.LEDGER_PUBLIC_KEY]
    again = CoordinatorRecord.load(record.path)  # the public key is kept in the record, across runs
    chosen, log, _ = coordinator_preflight(site, again, server_round=2)
    assert len(chosen) == 1 and not log.refusals
    assert again.pinned_public_key(site.name) == answer[protocol.LEDGER_PUBLIC_KEY]
    enrolled = CoordinatorRecord.load(None, {site.name: answer[protocol.LEDGER_PUBLIC_KEY]})  # enrolled as public key
    assert enrolled.pinned_key(site.name) == (site_key_fingerprint(site.state_dir), "enrolment")
    assert len(coordinator_preflight(site, enrolled)[0]) == 1


def test_a_forged_fingerprint_without_the_key_is_left_out(tmp_path: Path, in_a_server_app) -> None:
    """Whoever answers in the site's name (an insider with a new key, a machine posing as the site)
    knows the protocol, the request's nonce and the pinned fingerprint and public key (both public),
    but not the pinned private key: it claims the fingerprint, and signs with a key of its own."""
    site = make_site(tmp_path)
    record = CoordinatorRecord(tmp_path / "coordinator-record.json")
    _, _, grid = coordinator_preflight(site, record)
    pinned = answer_of(grid.replies[0])
    own = Ed25519PrivateKey.generate()
    own_public = own.public_key().public_bytes_raw().hex()

    def forged(request, claims: dict) -> Message:
        config = request.content.config_records[protocol.PREFLIGHT]
        answer = {**pinned, **claims}
        signature = own.sign(preflight_statement(answer, str(config[protocol.RUN_KEY]), int(config[protocol.ROUND]),
                                                 str(config[protocol.PREFLIGHT_NONCE])))
        return reply_with(request, {**answer, protocol.PREFLIGHT_SIGNATURE_R: signature[:32].hex(),
                                    protocol.PREFLIGHT_SIGNATURE_S: signature[32:].hex()})

    def claim_fingerprint(request, reply):  # its own public key, the pinned fingerprint
        return forged(request, {protocol.LEDGER_PUBLIC_KEY: own_public})

    def claim_public_key(request, reply):  # the pinned fingerprint and public key; signed by its own key
        return forged(request, {})

    def no_proof(request, reply):  # a fingerprint and nothing else, as before the signature
        return reply_with(request, {k: pinned[k] for k in (protocol.SITE, protocol.READY, protocol.LEDGER_KEY)})

    for tamper, says in ((claim_fingerprint, "a copied fingerprint proves nothing"),
                         (claim_public_key, "forged, or replayed"), (no_proof, "carries no Ed25519 public key")):
        chosen, log, _ = coordinator_preflight(site, record, server_round=2, tamper=tamper)
        assert chosen == [] and "pre-flight" in log.stopped, tamper.__name__  # left out: nobody trains
        (refusal,) = log.refusals
        assert refusal["rule"] == "ledger_key" and refusal["by"] == "coordinator" and says in refusal["message"]
    assert record.pinned_key(site.name) == (pinned[protocol.LEDGER_KEY], "first reply")  # the pin stands
    assert record.pinned_public_key(site.name) == pinned[protocol.LEDGER_PUBLIC_KEY]

    stranger = CoordinatorRecord(None)  # trust on first use pins only a key that signed its reply
    assert coordinator_preflight(site, stranger, tamper=no_proof)[0] == []
    assert stranger.pinned_key(site.name) == (None, None)


def test_a_replayed_preflight_signature_is_left_out(tmp_path: Path, in_a_server_app) -> None:
    """Someone who saw an honest reply (a proxy, a stolen log) re-sends it for a later request."""
    site = make_site(tmp_path)
    record = CoordinatorRecord(tmp_path / "coordinator-record.json")
    chosen, _, grid = coordinator_preflight(site, record)
    assert len(chosen) == 1
    recorded = answer_of(grid.replies[0])

    def replay(request, reply):
        return reply_with(request, recorded)

    for server_round in (1, 2):  # the same round asked again (a fresh nonce), and the next one
        chosen, log, _ = coordinator_preflight(site, record, server_round=server_round, tamper=replay)
        assert chosen == [], server_round
        (refusal,) = log.refusals
        assert refusal["rule"] == "ledger_key" and "replayed" in refusal["message"]
    chosen, log, _ = coordinator_preflight(site, record, server_round=2)  # the honest site still takes part
    assert len(chosen) == 1 and not log.refusals


# --- whole federations, state kept across runs ----------------------------------------------------

@pytest.mark.slow
def test_deleting_both_ledgers_gets_no_fresh_budget_in_the_next_run(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = run_scenario(tmp_path, "first", run={"rounds": 2, "min_sites": 2}, state_dir=state)
    assert first["status"] == "completed" and first["ledgers"]["leiden"]["ledger_lines"] == 2
    shutil.rmtree(state / "leiden" / "privacy")
    for name in (LEDGER_FILE, HEAD_FILE):
        (state / "leiden" / name).unlink()

    site = Site("leiden", tmp_path / "first" / "sites" / "leiden", state / "leiden", SitePolicy())
    report = run_audit(site, tmp_path / "audit", shadow_models=0, bootstrap=100,
                       coordinator_record=first["ledgers"]["leiden"], coordinator_record_source="first")
    assert report["verdict"]["verdict"] == "fail"
    texts = [r["text"] for r in report["verdict"]["reasons"] if r["level"] == "fail"]
    assert any("deleted, truncated or rolled back" in t for t in texts)
    assert any("egress ledger is missing or empty, yet the coordinator recorded" in t for t in texts)

    second = run_scenario(tmp_path, "second", run={"rounds": 2, "min_sites": 2}, state_dir=state)
    refused = [r for r in second["privacy"]["refusals"] if r["site"] == "leiden"]
    assert refused and {r["rule"] for r in refused} == {"privacy_ledger"}
    assert "coordinator's record" in refused[0]["message"]
    assert second["status"] == "completed" and not second["privacy"]["per_site"]["leiden"]["trained"]
    assert not list((state / "leiden").glob("privacy/*.jsonl"))  # leiden trained nothing on a fresh budget


@pytest.mark.slow
def test_a_site_with_a_new_key_is_refused_by_the_coordinator_in_the_next_run(tmp_path: Path) -> None:
    """Without DP there is no privacy-ledger head to hold the site to: the pinned key alone catches it."""
    state, plain = tmp_path / "state", {"rounds": 1, "min_sites": 2, "dp": False, "secagg": False}
    policy = {"require_dp": False, "require_secagg": False}
    first = run_scenario(tmp_path, "first", run=plain, policy=policy, state_dir=state)
    pinned = first["ledgers"]["zurich"]["ledger_key"]
    assert pinned and first["ledgers"]["zurich"]["key_pinned_by"] == "first reply"
    _replace_key(state / "zurich")
    second = run_scenario(tmp_path, "second", run=plain, policy=policy, state_dir=state)
    refusals = [r for r in second["privacy"]["refusals"] if r["site"] == "zurich"]
    (refusal,) = [r for r in refusals if r.get("by") == "coordinator"]
    # its evaluation budget, signed by the old key, no longer verifies: no held-out figure leaves either
    assert {r["rule"] for r in refusals if r is not refusal} <= {"evaluation_budget"}
    assert refusal["rule"] == "ledger_key" and refusal["by"] == "coordinator" and pinned in refusal["message"]
    assert second["status"] == "completed" and not second["privacy"]["per_site"]["zurich"]["trained"]
    assert second["ledgers"]["zurich"]["ledger_key"] == pinned  # the pin stands


@pytest.mark.slow
def test_a_round_too_few_sites_can_afford_ends_before_anyone_spends(tmp_path: Path) -> None:
    """Two of three sites cannot afford round 1 and min_sites is 2: without the pre-flight the third
    would train (and spend) a round that is then thrown away."""
    metrics = run_scenario(tmp_path, "preflight", run={"rounds": 2, "min_sites": 2},
                           policy={"seoul": {"epsilon_per_run": 0.2}, "zurich": {"epsilon_per_run": 0.2}})
    assert metrics["status"] == "stopped" and "pre-flight" in metrics["stop_reason"]
    assert {r["site"] for r in metrics["privacy"]["refusals"]} == {"seoul", "zurich"}
    assert metrics["rounds"] == [] and metrics["failed_rounds"] == []
    for site in metrics["sites"]:
        assert not list((tmp_path / "preflight" / "site-state" / site).glob("privacy/*.jsonl")), site


# --- the pre-flight asked on the SecAgg+ setup stage (server/secure_aggregation.py) ----------------

def setup_stage_message(node_id: int = 7) -> Message:
    """Flower's SecAgg+ setup message to one site (secaggplus_workflow.setup_stage), before the
    coordinator adds the pre-flight question."""
    from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage

    config = ConfigRecord({Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: 2, Key.SHARE_NUMBER: 2, Key.THRESHOLD: 2,
                           Key.CLIPPING_RANGE: 8.0, Key.TARGET_RANGE: 2**22, Key.MOD_RANGE: 2**32,
                           Key.MAX_WEIGHT: 1000.0})
    return Message(RecordDict({protocol.SECAGG_CONFIGS: config}), dst_node_id=node_id,
                   message_type=MessageType.TRAIN, group_id="1")


def preflight_on_setup(site: Site, record: CoordinatorRecord, run=RUN, tamper=None):
    """One setup stage with the pre-flight riding on it; (the reply Flower's workflow gets, the log)."""
    from spine_fl.server.secure_aggregation import _PreflightOnSetup

    grid = SiteGrid(site, tamper)
    config = dict(instruction(MessageType.TRAIN, run, site, 1).content.config_records[protocol.FIT_CONFIG])
    log = RoundLog(sites=[site.name], min_sites=1)
    request = PreflightRequest([(Proxy(grid), FitIns(Parameters([], "numpy.ndarray"), config))], 1, 1, record, log)
    (reply,) = _PreflightOnSetup(grid, [request]).send_and_receive([setup_stage_message()], timeout=None)
    return reply, log, grid


def test_a_ready_site_answers_the_preflight_and_the_key_exchange_in_one_reply(tmp_path: Path,
                                                                             in_a_server_app) -> None:
    from flwr.common.secure_aggregation.secaggplus_constants import Key

    site = make_site(tmp_path)
    record = CoordinatorRecord(tmp_path / "coordinator-record.json")
    reply, log, grid = preflight_on_setup(site, record)
    assert not reply.has_error() and not log.refusals
    keys = reply.content.config_records[protocol.SECAGG_CONFIGS]
    assert keys[Key.PUBLIC_KEY_1] and keys[Key.PUBLIC_KEY_2]  # secaggplus_mod's own answer
    assert answer_of(reply)[protocol.LEDGER_KEY] == site_key_fingerprint(site.state_dir)
    assert record.pinned_key(site.name) == (site_key_fingerprint(site.state_dir), "first reply")
    (line,) = [json.loads(x) for x in (site.state_dir / LEDGER_FILE).read_text().splitlines()]
    assert line["kind"] == "train/secagg+setup"  # the egress ledger describes the reply that left, answer included
    assert any(protocol.PREFLIGHT_REPLY in key for key in json.dumps(line).split('"'))


def test_a_forged_answer_on_the_setup_stage_leaves_the_site_out(tmp_path: Path, in_a_server_app) -> None:
    """The key exchange goes through, but the answer beside it is signed by another key: Flower's
    workflow gets an error in its place (the site is left out of the round), and it is recorded."""
    site = make_site(tmp_path)
    record = CoordinatorRecord(tmp_path / "coordinator-record.json")
    honest, _, _ = preflight_on_setup(site, record)
    pinned = answer_of(honest)
    own = Ed25519PrivateKey.generate()

    def forged(request, reply):
        config = request.content.config_records[protocol.PREFLIGHT]
        signature = own.sign(preflight_statement(pinned, str(config[protocol.RUN_KEY]), int(config[protocol.ROUND]),
                                                 str(config[protocol.PREFLIGHT_NONCE])))
        reply.content.config_records[protocol.PREFLIGHT_REPLY] = ConfigRecord(
            {**pinned, protocol.PREFLIGHT_SIGNATURE_R: signature[:32].hex(),
             protocol.PREFLIGHT_SIGNATURE_S: signature[32:].hex()})
        return reply

    def keys_without_answer(request, reply):  # a site that ignores the question
        del reply.content.config_records[protocol.PREFLIGHT_REPLY]
        return reply

    for tamper in (forged, keys_without_answer):
        reply, log, _ = preflight_on_setup(site, record, tamper=tamper)
        assert reply.has_error() and "pre-flight" in reply.error.reason, tamper.__name__
    (refusal,) = preflight_on_setup(site, record, tamper=forged)[1].refusals
    assert refusal["rule"] == "ledger_key" and "forged, or replayed" in refusal["message"]


def test_a_site_over_budget_refuses_on_the_setup_stage_without_making_keys(tmp_path: Path,
                                                                         in_a_server_app) -> None:
    site = make_site(tmp_path, epsilon_per_run=0.01)
    reply, _, _ = preflight_on_setup(site, CoordinatorRecord(None), run=run_settings(dp=True))
    assert refusal_of(reply)["rule"] == "epsilon_per_run"
    assert not list((site.state_dir / "privacy").glob("*.jsonl"))  # nothing spent


def test_a_preflight_record_on_a_training_message_never_trains(tmp_path: Path) -> None:
    """A coordinator attaches a harmless-looking pre-flight to the message that carries the round's
    training (SecAgg+'s masked-vector stage): the site answers the pre-flight only, and neither
    trains nor spends, so the pre-flight cannot be used to skip the checks made before training."""
    from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage

    site = make_site(tmp_path)
    train = instruction(MessageType.TRAIN, run_settings(dp=True), site)
    config = dict(train.content.config_records[protocol.FIT_CONFIG])
    train.content.config_records[protocol.PREFLIGHT] = ConfigRecord({**config, protocol.LEDGER_HEADS: "{}"})
    train.content.config_records[protocol.SECAGG_CONFIGS] = ConfigRecord({Key.STAGE: Stage.COLLECT_MASKED_VECTORS})
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    reply = build_client_app([site])(train, context)
    assert not reply.has_error()
    assert set(reply.content.config_records) == {protocol.PREFLIGHT_REPLY} and not reply.content.array_records
    assert not list((site.state_dir / "privacy").glob("*.jsonl"))  # nothing trained, nothing spent
