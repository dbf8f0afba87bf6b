"""Attacks on a site's privacy budget by an insider with the site's disk (issue 10).

The insider wants a fresh or smaller privacy budget so the site trains on more than its policy
allows. With write access to `<state_dir>` and the site folder they can:
- edit a privacy-ledger line (fewer steps, more noise), drop the last line, or delete a line in the
  middle: the ledger is signed and hash-chained with a signed head, so it no longer verifies, the
  error names the first broken line, and the site refuses to train (rule privacy_ledger);
- re-save clinical.csv (another column order, CRLF line endings) hoping for a new dataset id: the id
  comes from the patients, not the bytes, so the earlier spending still counts;
- add a dummy patient row to clinical.csv (or remove a patient): that is a new dataset id and an
  empty ledger, but the budget follows the patients: every ledger that used any of the current
  patients is composed in (its signed patient-set record says whose data it spent), so the earlier
  spending counts and an exhausted budget stays exhausted; only a cohort sharing no patient gets its
  own budget. A patient-set record edited or re-signed (another key, or the site's own key: the
  ledger's signed lines name its digest) is refused (rule privacy_ledger);
- delete `<state_dir>/privacy/`: the egress ledger still shows the DP replies that spent epsilon, so
  the next DP round is refused (rule privacy_ledger), with the epsilon the egress ledger shows.
Not stopped by the site's own files: replacing the site key and re-signing everything, and deleting
both ledgers. The coordinator's record (pinned key, last ledger head) stops those:
tests/test_attacks_coordinator.py.

The same attacks with the site's running budget warm (issue 14: the ledger composed once per line
and kept in the process, keyed by the ledger's verified head): edits between rounds are still
refused; a ledger re-signed with the site's key, truncated with a matching head, or grown by another
process is composed afresh from what it now holds (never a stale figure), and the coordinator's head
still refuses the shorter or re-signed ones.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app.message_type import MessageType
from test_attacks_site import ledger_lines, make_site, run_settings, send

from spine_fl.client.privacy.egress_ledger import verify
from spine_fl.client.privacy.privacy_ledger import PrivacyLedger, PrivacyLedgerError, SpendRecord, dataset_id
from spine_fl.client.privacy.round_privacy import assess_round
from spine_fl.client.privacy.policy import SitePolicy
from spine_fl.client.privacy.signed_log import KEY_FILE, PUBLIC_KEY_FILE
from spine_fl.client.site_config import Site
from spine_fl.shared import protocol
from spine_fl.shared.refusal import Refusal

RUN = "r" * 32


def _ledger_of(site: Site, rounds: int = 3) -> PrivacyLedger:
    ledger = PrivacyLedger(site.state_dir, dataset_id(site.data_dir))
    for rnd in range(1, rounds + 1):
        ledger.append(SpendRecord(RUN, rnd, 1.0, 0.125, 8, 1.0, 1e-4, "rdp"))
    return ledger


def _refusal(site: Site, server_round: int = 1) -> dict:
    reply = send(site, MessageType.TRAIN, run_settings(), server_round=server_round)
    assert reply.has_error() and reply.error.code == protocol.REFUSAL_CODE, reply
    refusal = Refusal.parse(reply.error.reason)
    assert refusal is not None
    return refusal


def _rewrite(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))


@pytest.mark.parametrize("tamper,line,problem", [
    ("edit", 2, "signature does not match"),     # fewer steps on round 2
    ("truncate", 3, "signed head records line 3"),  # the last round dropped
    ("delete", 2, "chain broken"),               # the middle round dropped
])
def test_a_tampered_privacy_ledger_is_named_and_the_site_refuses(tmp_path: Path, tamper: str, line: int,
                                                                 problem: str) -> None:
    site = make_site(tmp_path)
    ledger = _ledger_of(site)
    lines = ledger.path.read_bytes().splitlines()
    if tamper == "edit":
        assert b'"steps":8' in lines[1]
        lines[1] = lines[1].replace(b'"steps":8', b'"steps":1')
    elif tamper == "truncate":
        lines = lines[:-1]
    else:
        del lines[1]
    _rewrite(ledger.path, lines)
    with pytest.raises(PrivacyLedgerError, match=f"at line {line}: .*{problem}"):
        ledger.records()
    refusal = _refusal(site)
    assert refusal["rule"] == "privacy_ledger" and refusal["site"] == site.name
    assert f"line {line}" in refusal["message"] and "never delete" in refusal["message"]
    assert len(ledger.path.read_bytes().splitlines()) == len(lines)  # nothing trained, nothing appended
    assert verify(site.state_dir).ok and "privacy_ledger" in ledger_lines(site.state_dir)[-1]["error"]["reason"]


def test_a_replaced_key_that_re_signs_everything_verifies_on_its_own(tmp_path: Path) -> None:
    """At the site alone a new key is indistinguishable from the site's own: the insider who replaces
    site_ed25519.pem and re-signs a smaller ledger gets one that verifies. The key pinned by the
    coordinator catches it (tests/test_attacks_coordinator.py). What the swap breaks here is every
    line the old key signed, e.g. the egress ledger."""
    site = make_site(tmp_path)
    ledger = _ledger_of(site)
    send(site, MessageType.EVALUATE, run_settings())  # one egress line signed by the original key
    assert verify(site.state_dir).ok
    kept = ledger.records()[:1]

    new = Ed25519PrivateKey.generate()
    (site.state_dir / KEY_FILE).unlink()
    fd = os.open(site.state_dir / KEY_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(new.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    (site.state_dir / PUBLIC_KEY_FILE).write_bytes(new.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    ledger.path.unlink()
    ledger.head.unlink()
    for record in kept:  # re-signed with the new key: one round instead of three
        ledger.append(record)

    assert PrivacyLedger(site.state_dir, ledger.dataset).records() == kept  # verifies: not detected here
    result = verify(site.state_dir)  # but the egress ledger signed by the old key no longer does
    assert not result.ok and result.first_broken_line == 1


def _resave_reordered_crlf(site_dir: Path) -> None:
    path = site_dir / "clinical.csv"
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    table = table[list(reversed(table.columns))].iloc[::-1]
    before = path.read_bytes()
    table.to_csv(path, index=False, lineterminator="\r\n")
    assert path.read_bytes() != before and b"\r\n" in path.read_bytes()


def test_re_saving_the_patient_table_keeps_the_dataset_and_its_spending(tmp_path: Path) -> None:
    site = make_site(tmp_path / "a")
    fresh = make_site(tmp_path / "b")  # the same synthetic patients, a state folder with nothing spent
    original = dataset_id(site.data_dir)
    _ledger_of(site)
    _resave_reordered_crlf(site.data_dir)
    assert dataset_id(site.data_dir) == original

    run = run_settings()
    after = assess_round(site, run, RUN, 4, n_train=128).epsilon_lifetime_after
    assert after > assess_round(fresh, run, RUN, 4, n_train=128).epsilon_lifetime_after  # spending counts

    table = pd.read_csv(site.data_dir / "clinical.csv", dtype=str, keep_default_na=False)
    edited = table.assign(extra_column="x")  # an added column, changed values: the same patients
    edited[edited.columns[1]] = edited[edited.columns[1]].iloc[::-1].to_numpy()
    edited.to_csv(site.data_dir / "clinical.csv", index=False)
    assert dataset_id(site.data_dir) == original
    renamed = table.copy()
    renamed.loc[0, "patient_id"] = renamed.loc[0, "patient_id"] + "x"
    renamed.to_csv(site.data_dir / "clinical.csv", index=False)
    assert dataset_id(site.data_dir) != original  # another patient id: another dataset
    pd.concat([table, table.iloc[[0]].assign(patient_id="new-patient")]).to_csv(site.data_dir / "clinical.csv",
                                                                                index=False)
    assert dataset_id(site.data_dir) != original  # one more patient: another dataset


def test_an_unreadable_patient_table_is_a_clear_error(tmp_path: Path) -> None:
    site = make_site(tmp_path)
    (site.data_dir / "clinical.csv").write_text("id,age\n1,2\n")
    with pytest.raises(PrivacyLedgerError, match="no patient_id column"):
        dataset_id(site.data_dir)


def test_deleting_the_privacy_ledger_after_a_dp_round_is_refused(tmp_path: Path) -> None:
    site = make_site(tmp_path)
    reply = send(site, MessageType.TRAIN, run_settings())
    assert not reply.has_error()
    spent = dict(reply.content.config_records[protocol.FIT_METRICS])[protocol.EPSILON_LIFETIME]
    egress = [line for line in ledger_lines(site.state_dir) if line["kind"] == MessageType.TRAIN]
    assert egress[-1]["epsilon"] == pytest.approx(spent)

    for path in sorted((site.state_dir / "privacy").rglob("*"), reverse=True):  # rm -r <state>/privacy
        path.rmdir() if path.is_dir() else path.unlink()
    (site.state_dir / "privacy").rmdir()

    refusal = _refusal(site, server_round=2)
    assert refusal["rule"] == "privacy_ledger" and refusal["site"] == site.name
    assert refusal["epsilon_spent"] == pytest.approx(spent) and refusal["delta"] == egress[-1]["delta"]
    assert "deleted" in refusal["message"] and f"{spent:.3f}" in refusal["message"]
    assert "Restore" in refusal["message"] and "never delete" in refusal["message"]
    assert not (site.state_dir / "privacy").exists()  # nothing trained on a fresh budget
    assert verify(site.state_dir).ok  # the refusal itself is recorded before it leaves


def _with_dummy_patient(site_dir: Path) -> None:
    table = pd.read_csv(site_dir / "clinical.csv", dtype=str, keep_default_na=False)
    pd.concat([table, table.iloc[[0]].assign(patient_id="dummy")]).to_csv(site_dir / "clinical.csv", index=False)


def _without_a_patient(site_dir: Path) -> None:
    table = pd.read_csv(site_dir / "clinical.csv", dtype=str, keep_default_na=False)
    table.drop(index=table.index[table.split == "train"][0]).to_csv(site_dir / "clinical.csv", index=False)


def _other_cohort(site_dir: Path) -> None:
    """Every patient another: no patient shared with the data before."""
    table = pd.read_csv(site_dir / "clinical.csv", dtype=str, keep_default_na=False)
    table.assign(patient_id="other-" + table.patient_id).to_csv(site_dir / "clinical.csv", index=False)


def _n_train(site: Site) -> int:
    return int((pd.read_csv(site.data_dir / "clinical.csv", dtype=str).split == "train").sum())


def _trained_once(site: Site) -> float:
    """One DP round through the ClientApp; the lifetime epsilon its reply reported."""
    reply = send(site, MessageType.TRAIN, run_settings())
    assert not reply.has_error(), reply.error
    return dict(reply.content.config_records[protocol.FIT_METRICS])[protocol.EPSILON_LIFETIME]


@pytest.mark.parametrize("change", [_with_dummy_patient, _without_a_patient])
def test_adding_or_removing_a_patient_does_not_reset_the_budget(tmp_path: Path, change) -> None:
    """The insider's attack: one dummy row in clinical.csv (or one patient dropped) is another dataset
    id and so another, empty ledger; but the same real patients. Their earlier spending still counts,
    lifetime and per run, and a budget that was exhausted stays exhausted."""
    from spine_fl.client.privacy.privacy_ledger import spent_for_patients
    from test_attacks_site import RUN_KEY

    site = make_site(tmp_path / "a")
    fresh = make_site(tmp_path / "b")  # the same synthetic patients, nothing spent
    spent = _trained_once(site)
    before = dataset_id(site.data_dir)
    old = PrivacyLedger(site.state_dir, before)
    change(site.data_dir)
    change(fresh.data_dir)
    assert dataset_id(site.data_dir) != before  # a new dataset id: an empty ledger of its own

    assessed = assess_round(site, run_settings(), RUN_KEY, 2, _n_train(site))
    unspent = assess_round(fresh, run_settings(), RUN_KEY, 2, _n_train(fresh))
    assert assessed.epsilon_lifetime_after > unspent.epsilon_lifetime_after  # the earlier round counts
    assert assessed.epsilon_run_after > unspent.epsilon_run_after  # and in the run it was spent in
    composed = spent_for_patients(site.state_dir, assessed.dataset)
    assert composed.also == (before,) and composed.lines == 0  # the old ledger composed in, nothing charged yet
    assert composed.lifetime.epsilon(assessed.plan.delta, "rdp") == pytest.approx(
        old.epsilon(assessed.plan.delta, "rdp"))

    tight = Site(site.name, site.data_dir, site.state_dir,
                 SitePolicy(require_secagg=False, epsilon_lifetime=spent * 1.01))  # exhausted by round 1
    refusal = _refusal(tight, server_round=2)
    assert refusal["rule"] == "epsilon_lifetime"  # spent so far: round 1's, at this round's delta
    assert refusal["epsilon_spent"] == pytest.approx(old.epsilon(refusal["delta"], "rdp"), abs=1e-5)
    assert not PrivacyLedger(site.state_dir, assessed.dataset).path.exists()  # nothing trained on a fresh budget
    tight_run = Site(site.name, site.data_dir, site.state_dir,
                     SitePolicy(require_secagg=False, epsilon_per_run=spent * 1.01))
    assert _refusal(tight_run, server_round=2)["rule"] == "epsilon_per_run"


def test_adding_a_patient_after_a_round_charged_to_the_new_dataset_still_counts_both(tmp_path: Path) -> None:
    """The budget keeps following the patients across several changes: back and forth, every ledger
    that used them counts, and the reported lifetime epsilon only grows."""
    site = make_site(tmp_path)
    first = _trained_once(site)
    _with_dummy_patient(site.data_dir)
    reply = send(site, MessageType.TRAIN, run_settings(), server_round=2)
    assert not reply.has_error()
    second = dict(reply.content.config_records[protocol.FIT_METRICS])[protocol.EPSILON_LIFETIME]
    assert second > first
    _without_a_patient(site.data_dir)  # a third dataset id
    third = assess_round(site, run_settings(), RUN, 1, _n_train(site))
    assert third.epsilon_lifetime_after > second
    assert len(list((site.state_dir / "privacy").glob("*.jsonl"))) == 2


def test_a_disjoint_cohort_gets_its_own_budget(tmp_path: Path) -> None:
    """Patients who share no one with any ledger's patients are a new cohort: their own budget. And
    this is not mistaken for a deletion: the egress ledger's spending is the old dataset's ledger's."""
    from spine_fl.client.privacy.privacy_ledger import spent_for_patients

    site = make_site(tmp_path / "a")
    fresh = make_site(tmp_path / "b")
    _trained_once(site)
    _other_cohort(site.data_dir)
    _other_cohort(fresh.data_dir)
    assessed = assess_round(site, run_settings(), RUN, 1, _n_train(site))
    assert assessed.epsilon_lifetime_after == assessed.epsilon_run_after  # a fresh budget for other patients
    assert assessed.epsilon_lifetime_after == assess_round(fresh, run_settings(), RUN, 1,
                                                           _n_train(fresh)).epsilon_lifetime_after
    assert spent_for_patients(site.state_dir, assessed.dataset).also == ()
    assert not send(site, MessageType.TRAIN, run_settings(), server_round=2).has_error()
    records = [json.loads(x) for x in next(iter(sorted((site.state_dir / "privacy").glob("*.jsonl")))).read_text()
               .splitlines()]
    assert {"seq", "prev_sha256", "signature", "patients"} <= set(records[0])  # signed lines name their patients


def test_a_ledger_without_a_patient_record_counts_for_every_cohort(tmp_path: Path) -> None:
    """A ledger written before the patient-set record existed (or whose record was deleted) may have
    used any patient: it is counted, even for a cohort that shares no patient with it."""
    from spine_fl.client.privacy.privacy_ledger import patient_set_path, spent_for_patients

    site = make_site(tmp_path)
    legacy = _ledger_of(site)  # appended without a record: lines that name no patient set
    _other_cohort(site.data_dir)
    assessed = assess_round(site, run_settings(), "o" * 32, 1, _n_train(site))  # another run: its own run budget
    assert spent_for_patients(site.state_dir, assessed.dataset).also == (legacy.dataset,)
    assert assessed.epsilon_lifetime_after > assessed.epsilon_run_after > 0

    other = make_site(tmp_path / "deleted")
    _trained_once(other)
    old = dataset_id(other.data_dir)
    patient_set_path(other.state_dir, old).unlink()  # the record deleted: whose data it spent is unknown
    _other_cohort(other.data_dir)
    assessed = assess_round(other, run_settings(), RUN, 1, _n_train(other))
    assert spent_for_patients(other.state_dir, assessed.dataset).also == (old,)


def _forged_record(state_dir: Path, dataset: str, key: Ed25519PrivateKey | None) -> None:
    """The old dataset's patient-set record rewritten to name patients no one has (so it looks disjoint
    from the current cohort), signed by `key` (None: the signature left as it was)."""
    import base64

    from spine_fl.client.privacy.privacy_ledger import patient_set_path
    from spine_fl.client.privacy.signed_log import canonical

    path = patient_set_path(state_dir, dataset)
    record = json.loads(path.read_bytes())
    record["patients_sha256"] = sorted("0" * 63 + str(i) for i in range(3))
    if key is not None:
        record.pop("signature")
        record["signature"] = base64.b64encode(key.sign(canonical(record))).decode()
    path.write_bytes(canonical(record))


def _site_key(state_dir: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key((state_dir / KEY_FILE).read_bytes(), password=None)
    assert isinstance(key, Ed25519PrivateKey)
    return key


@pytest.mark.parametrize("signer,problem", [
    ("none", "signature does not match"),        # edited, the signature left
    ("another", "signature does not match"),     # re-signed with another key
    ("site", "not the patient-set record that the signed lines"),  # re-signed with the site's own key
])
def test_a_forged_patient_record_is_refused(tmp_path: Path, signer: str, problem: str) -> None:
    """The insider adds a dummy patient and rewrites the old ledger's patient-set record so that it no
    longer shares a patient with the new cohort: the record's signature, or (re-signed with the
    site's own key) the digest the old ledger's signed lines name, gives it away."""
    site = make_site(tmp_path)
    _trained_once(site)
    old = dataset_id(site.data_dir)
    key = {"none": None, "another": Ed25519PrivateKey.generate(), "site": _site_key(site.state_dir)}[signer]
    _forged_record(site.state_dir, old, key)
    _with_dummy_patient(site.data_dir)
    with pytest.raises(PrivacyLedgerError, match=problem):
        assess_round(site, run_settings(), RUN, 1, _n_train(site))
    refusal = _refusal(site, server_round=2)
    assert refusal["rule"] == "privacy_ledger" and f"{old}.patients" in refusal["message"]
    assert "Restore" in refusal["message"]


def test_the_current_datasets_patient_record_must_match_its_patients(tmp_path: Path) -> None:
    """The record of the dataset being trained is checked against the data at every round: a record
    re-signed with the site's key naming other patients is refused, not trusted."""
    site = make_site(tmp_path)
    _trained_once(site)
    _forged_record(site.state_dir, dataset_id(site.data_dir), _site_key(site.state_dir))
    refusal = _refusal(site, server_round=2)
    assert refusal["rule"] == "privacy_ledger" and "does not record the patients" in refusal["message"]


@pytest.mark.slow
def test_a_privacy_ledger_deleted_alone_fails_the_sites_audit(tmp_path: Path) -> None:
    """The reviewer's check: `<state_dir>/privacy/` deleted after a DP round, the egress ledger kept:
    the site's own audit says FAIL (the egress ledger shows DP replies no privacy ledger accounts for)."""
    import shutil

    from spine_fl.client.audit.run import run_audit

    site = make_site(tmp_path)
    _trained_once(site)
    shutil.rmtree(site.state_dir / "privacy")
    report = run_audit(site, tmp_path / "audit", shadow_models=0, bootstrap=100)
    assert report["verdict"]["verdict"] == "fail", report["verdict"]
    fails = [r["text"] for r in report["verdict"]["reasons"] if r["level"] == "fail"]
    assert any("privacy spending is not in the privacy ledger" in text for text in fails), fails


def test_a_kill_between_a_line_and_its_head_is_recovered_but_truncation_is_not(tmp_path: Path) -> None:
    """SIGKILL after a line's fsync but before the head is replaced leaves the head one line behind
    a signed, chained line: the spending counts. Dropping lines from the end is still caught."""
    ledger = PrivacyLedger(tmp_path, "d" * 32)
    ledger.append(SpendRecord("r" * 32, 1, 1.0, 0.2, 5, 1.0, 1e-3, "rdp"))
    head_after_one = ledger.head.read_bytes()
    ledger.append(SpendRecord("r" * 32, 2, 1.0, 0.2, 5, 1.0, 1e-3, "rdp"))
    full = ledger.path.read_bytes()
    ledger.head.write_bytes(head_after_one)  # the kill: line 2 written, head still at line 1
    assert [r.round for r in ledger.records()] == [1, 2]
    ledger.append(SpendRecord("r" * 32, 3, 1.0, 0.2, 5, 1.0, 1e-3, "rdp"))  # the next append repairs the head
    assert [r.round for r in ledger.records()] == [1, 2, 3]
    ledger.head.write_bytes(head_after_one)  # two lines behind: not a crash
    with pytest.raises(PrivacyLedgerError, match="signed head records line 1"):
        ledger.records()
    ledger.path.write_bytes(full.splitlines(keepends=True)[0])  # truncated to line 1 while the head...
    ledger.append(SpendRecord("r" * 32, 2, 1.0, 0.2, 5, 1.0, 1e-3, "rdp"))
    ledger.path.write_bytes(ledger.path.read_bytes().splitlines(keepends=True)[0])  # ...says line 2
    with pytest.raises(PrivacyLedgerError, match="deleted from the end"):
        ledger.records()


def test_the_dataset_id_never_reads_a_file_outside_the_site_folder(tmp_path: Path) -> None:
    """The budget's identity hashes each image: a manifest path out of the folder is refused, not read."""
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    (site_dir / "clinical.csv").write_text("patient_id\np1\n")
    (tmp_path / "secret.dcm").write_bytes(b"not the site's")
    (site_dir / "manifest.csv").write_text("patient_id,view,path\np1,ap,../secret.dcm\n")
    with pytest.raises(PrivacyLedgerError, match=r"'\.\./secret\.dcm' resolves to .*outside the site folder"):
        dataset_id(site_dir)


def test_a_symlink_retargeted_outside_after_the_identity_was_cached_is_refused(tmp_path: Path) -> None:
    """The identity is cached per file (device, inode, size, mtime), but a path that comes to name
    another file is resolved and checked again before that file is read: swapping an image's symlink
    to a file outside the folder between two rounds is refused, not hashed from the cache."""
    site_dir = tmp_path / "site"
    (site_dir / "dicom").mkdir(parents=True)
    (site_dir / "clinical.csv").write_text("patient_id\np1\n")
    (site_dir / "dicom" / "real.dcm").write_bytes(b"the site's image")
    (site_dir / "dicom" / "p1.dcm").symlink_to(site_dir / "dicom" / "real.dcm")
    (site_dir / "manifest.csv").write_text("patient_id,view,path\np1,ap,dicom/p1.dcm\n")
    first = dataset_id(site_dir)
    assert dataset_id(site_dir) == first  # cached, same answer
    (tmp_path / "secret.dcm").write_bytes(b"not the site's image at all")
    (site_dir / "dicom" / "p1.dcm").unlink()
    (site_dir / "dicom" / "p1.dcm").symlink_to(tmp_path / "secret.dcm")
    with pytest.raises(PrivacyLedgerError, match=r"'dicom/p1\.dcm' resolves to .*outside the site folder"):
        dataset_id(site_dir)
    (site_dir / "dicom" / "p1.dcm").unlink()
    (site_dir / "dicom" / "p1.dcm").write_bytes(b"another image inside")  # replaced in place: hashed again
    assert dataset_id(site_dir) != first


def test_a_ledger_verified_before_is_verified_again_in_full_when_an_earlier_line_changes(tmp_path: Path) -> None:
    """Verification is incremental within a process (only new lines' signatures are checked) but never
    blind: an earlier line edited after the process verified it is found, and named."""
    site = make_site(tmp_path)
    ledger = _ledger_of(site)
    assert len(ledger.records()) == 3  # verified in full, remembered
    ledger.append(SpendRecord(RUN, 4, 1.0, 0.125, 8, 1.0, 1e-4, "rdp"))
    assert [r.round for r in ledger.records()] == [1, 2, 3, 4]  # the new line checked on its own
    lines = ledger.path.read_bytes().splitlines()
    edited = json.loads(lines[1])
    edited["steps"] = 1  # fewer steps on round 2, after the process verified it
    _rewrite(ledger.path, [lines[0], json.dumps(edited, sort_keys=True, separators=(",", ":")).encode(), *lines[2:]])
    with pytest.raises(PrivacyLedgerError, match="does not verify at line 2"):
        ledger.records()


def test_incremental_verification_reads_the_same_records_as_a_full_one(tmp_path: Path) -> None:
    from spine_fl.client.privacy import signed_log

    site = make_site(tmp_path)
    ledger = _ledger_of(site, rounds=5)
    ledger.records()
    for rnd in range(6, 9):  # each appended line is verified on its own
        ledger.append(SpendRecord(RUN, rnd, 1.5, 0.1, 9, 1.0, 1e-4, "rdp"))
        incremental = ledger.records()
    signed_log._VERIFIED.clear()  # a fresh process: everything verified again
    assert ledger.records() == incremental and len(incremental) == 8


# --- the same attacks with the running budget warm (issue 14) ------------------------------------

def _warm(site: Site, ledger: PrivacyLedger) -> float:
    """A round's check has composed the ledger in this process; the lifetime epsilon it holds."""
    from spine_fl.client.privacy import privacy_ledger

    assess_round(site, run_settings(), RUN, len(ledger.records()) + 1, 128)
    assert privacy_ledger._SPENT[str(ledger.path.resolve())].lines == len(ledger.records())
    return ledger.epsilon(1e-4, "rdp")


def _composed_afresh(ledger: PrivacyLedger, delta: float = 1e-4) -> float:
    """The audit's figure: the ledger's records composed from nothing."""
    from spine_fl.shared.training.accounting import epsilon

    return epsilon([(r.noise_multiplier, r.sample_rate, r.steps) for r in ledger.records()], delta, "rdp")


def _re_signed(ledger: PrivacyLedger, records: list[SpendRecord]) -> None:
    """What an insider holding the site's key can do: write the ledger anew, every line and head signed."""
    ledger.path.unlink()
    ledger.head.unlink()
    for record in records:
        ledger.append(record)


@pytest.mark.parametrize("tamper,line", [("edit", 2), ("truncate", 3), ("delete", 2), ("edit_last", 3)])
def test_tampering_between_rounds_is_refused_with_the_running_budget_warm(tmp_path: Path, tamper: str,
                                                                           line: int) -> None:
    site = make_site(tmp_path)
    ledger = _ledger_of(site)
    _warm(site, ledger)
    lines = ledger.path.read_bytes().splitlines()
    if tamper == "edit":
        lines[1] = lines[1].replace(b'"steps":8', b'"steps":1')
    elif tamper == "edit_last":  # the very line the running budget's head names
        lines[2] = lines[2].replace(b'"steps":8', b'"steps":1')
    elif tamper == "truncate":
        lines = lines[:-1]
    else:
        del lines[1]
    _rewrite(ledger.path, lines)
    with pytest.raises(PrivacyLedgerError, match=f"does not verify at line {line}"):
        ledger.spent()
    refusal = _refusal(site)
    assert refusal["rule"] == "privacy_ledger" and f"line {line}" in refusal["message"]
    with pytest.raises(PrivacyLedgerError):  # and again: a refusal leaves nothing usable behind
        ledger.epsilon(1e-4, "rdp")


@pytest.mark.parametrize("rewrite", ["fewer_steps_early", "fewer_steps_last", "truncated"])
def test_a_re_signed_ledger_is_composed_afresh_and_the_coordinator_head_refuses(tmp_path: Path,
                                                                                rewrite: str) -> None:
    """With the site's key an insider can write a smaller ledger that verifies. The running budget then
    holds nothing stale: whatever the rewrite, the ledger's head (line count, last line's hash) no
    longer matches, so the figure is composed from the ledger as it stands, as the audit composes it;
    and the coordinator's record of the last head refuses the round (rule privacy_ledger)."""
    from spine_fl.client.privacy.round_checks import decide_round
    from spine_fl.client.privacy.round_privacy import LedgerRolledBack, check_coordinator_head

    site = make_site(tmp_path)
    ledger = _ledger_of(site, rounds=5)
    spent_before = _warm(site, ledger)
    lines, sha = ledger.log.last()
    head = {protocol.LEDGER_DATASET: ledger.dataset, protocol.LEDGER_LINES: lines, protocol.LEDGER_SHA256: sha}
    records = ledger.records()
    if rewrite == "truncated":
        records = records[:3]
    else:  # an early line rewritten changes every later line too: each names its predecessor's hash
        index = 1 if rewrite == "fewer_steps_early" else 4
        records[index] = replace(records[index], steps=1)
    _re_signed(ledger, records)

    assert ledger.epsilon(1e-4, "rdp") == _composed_afresh(ledger) < spent_before
    with pytest.raises(LedgerRolledBack, match="truncated, rolled back to an older copy or replaced"):
        check_coordinator_head(site.state_dir, head)
    decision = decide_round(site, run_settings(), RUN, 9, secagg_in_use=True, training=True, coordinator_head=head)
    assert decision.refusal is not None and decision.refusal.rule == "privacy_ledger"


def test_lines_another_process_appended_count_before_the_next_check(tmp_path: Path) -> None:
    """A running budget that missed lines would serve a stale, lower epsilon: a second process (another
    run on the same patients) charges rounds after this one composed the ledger; the next check here
    composes them and refuses the round that the stale figure would have allowed."""
    site = make_site(tmp_path)
    ledger = _ledger_of(site)
    _warm(site, ledger)
    allowed = assess_round(site, run_settings(), "o" * 32, 1, 128)
    other = PrivacyLedger(site.state_dir, ledger.dataset)  # the other process's view: its own appends
    for rnd in (4, 5, 6):
        other.append(SpendRecord(RUN, rnd, 1.0, 0.125, 8, 1.0, 1e-4, "rdp"))
    budget = allowed.epsilon_lifetime_after + 0.01  # room for the round as it looked before the appends
    tight = Site(site.name, site.data_dir, site.state_dir, SitePolicy(require_secagg=False, epsilon_lifetime=budget))
    from spine_fl.client.privacy.round_checks import budget_refusal

    assessed = assess_round(tight, run_settings(), "o" * 32, 1, 128)
    assert assessed.epsilon_lifetime_after > allowed.epsilon_lifetime_after
    assert ledger.spent().lines == 6
    assert ledger.epsilon(allowed.plan.delta, "rdp") == _composed_afresh(ledger, allowed.plan.delta)
    refusal = budget_refusal(tight, run_settings(), assessed)
    assert refusal is not None and refusal.rule == "epsilon_lifetime"



def test_the_dataset_id_follows_the_patient_table_even_when_its_size_and_times_are_kept(tmp_path: Path) -> None:
    """The identity is parsed once per table content (issue 14), never once per file name or time: a
    table swapped for other patients of the same size, its modification time put back, is a new
    dataset at once; the same bytes again are the old one."""
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    clinical = site_dir / "clinical.csv"
    clinical.write_text("patient_id\np1\np2\n")
    before, stat = dataset_id(site_dir), clinical.stat()
    clinical.write_text("patient_id\np1\np3\n")
    os.utime(clinical, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert clinical.stat().st_size == stat.st_size and clinical.stat().st_mtime_ns == stat.st_mtime_ns
    assert dataset_id(site_dir) != before
    clinical.write_text("patient_id\np1\np2\n")
    assert dataset_id(site_dir) == before
