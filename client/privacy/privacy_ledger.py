"""The site's persistent privacy ledger: every DP-SGD round it ever ran, per dataset.

Flower creates a fresh ClientApp per message, and processes restart; an accountant kept in
memory would forget (Flower's Opacus example resets epsilon every round). Here each round is
appended to `<state_dir>/privacy/<dataset_id>.jsonl` and fsync'd before the update leaves, and
epsilon is composed from the whole file: across rounds, runs and reboots.

Composed once, not every round (issue 14): `spent()` keeps, per ledger file and process, the
composition of its lines at the head it was composed at (spent_budget.Spent). Every call verifies
the ledger first (incrementally: signed_log), then adds only the lines after that head when the
verified ledger still holds it (line count and last line's SHA-256: in a verified chain that hash
pins every earlier line); otherwise, and at the first use in a process, it composes every line
again. An edited, truncated or replaced ledger therefore never meets a stale composition: it either
fails verification (the site refuses) or is composed afresh from what it now holds.

The ledger is signed and hash-chained exactly like the egress ledger (client/privacy/signed_log.py:
the site's Ed25519 key, each line's `seq`, `prev_sha256` and `signature`, a signed head
`<dataset_id>.head` with the last line's number and hash). `records()` verifies it first: a ledger
that does not verify (an edited, deleted, inserted line, lines dropped from the end) or cannot be
read stops the site, naming the first broken line; it never silently restarts from zero.

The dataset id comes from the patients, not the files' bytes (`dataset_id`), so re-saving the same
table in another column order or with other line endings keeps its budget.

A budget follows the patients, not the dataset id (issue 10): one dummy row added to clinical.csv, or
one patient removed, is another dataset id and so another, empty ledger, but the same real patients.
A patient's privacy loss is the composition of every release that used that patient, so the spent
budget a round is checked against (`spent_for_patients`) composes the current dataset's ledger with
every other ledger in `<state_dir>/privacy/` whose patients overlap the current ones. For that each
ledger carries its patient set: `<dataset_id>.patients`, the SHA-256 of each patient id, signed by the
site key (`record_patients`, written once per dataset before its first round), and every ledger line
names that record's digest (`patients`), so the record is covered by the ledger's signatures and hash
chain too: editing it, re-signing it with another key, or swapping in another dataset's record is
refused (PrivacyLedgerError), and re-signing it together with the ledger changes the ledger head the
coordinator holds the site to.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import pandas as pd
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from spine_fl.client.privacy.signed_log import (
    PUBLIC_KEY_FILE,
    SignedLog,
    Snapshot,
    canonical,
    load_or_create_key,
    load_public_key,
)
from spine_fl.client.privacy.spent_budget import NOTHING, Spent
from spine_fl.shared.files import atomic_write_bytes
from spine_fl.shared.training.accounting import History

log = logging.getLogger("spine_fl.client")

RESTORE = "Restore the privacy ledger (and its .head file) from backup; never delete or edit it to reset epsilon."


class PrivacyLedgerError(RuntimeError):
    pass


class DatasetIdError(PrivacyLedgerError):
    """The patients cannot be read, so neither can the dataset's identity or its spent budget."""


@dataclass(frozen=True)
class SpendRecord:
    run_id: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    delta: float
    accountant: str
    time: float = 0.0


SPEND_FIELDS = frozenset(f.name for f in fields(SpendRecord))

# The budget follows the patients: the identity is who they are (and their images), not any column
# of their records, so adding, relabelling, re-splitting or re-saving columns never resets it, and
# neither does a task that reads another column.
DATASET_ID_VERSION = "spine-fl dataset id v3"


def _read_table(path: Path, columns: tuple[str, ...]) -> list[tuple[str, ...]]:
    """The stripped values of `columns` in every row. Parsed once per content: cached per process by
    the SHA-256 of the file's bytes (a dataset's identity is asked for several times a round; hashing
    the bytes costs far less than parsing them, and no edit to the file can meet a stale parse)."""
    data = path.read_bytes()
    key = (hashlib.sha256(data).hexdigest(), columns)
    if key not in _TABLES:
        try:
            table = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False, skipinitialspace=True)
        except Exception as exc:  # noqa: BLE001 - pandas raises several parser errors
            raise DatasetIdError(f"{path} is not a readable CSV ({exc}); the dataset's identity, and so its spent "
                                 "privacy budget, cannot be established. Run `spine-fl validate` on the site "
                                 "folder.") from None
        table.columns = [str(c).strip() for c in table.columns]
        if "patient_id" not in table.columns:
            raise DatasetIdError(f"{path} has no patient_id column; the dataset's identity cannot be established")
        missing = [c for c in columns if c not in table.columns]
        if missing:
            raise DatasetIdError(f"{path} lacks column(s) {', '.join(missing)}; the dataset's identity cannot be "
                                 "established")
        _TABLES[key] = list(table[list(columns)].apply(lambda col: col.str.strip()).itertuples(index=False, name=None))
    return _TABLES[key]


_TABLES: dict[tuple, list[tuple[str, ...]]] = {}
_FILE_HASHES: dict[tuple[str, int, int, int, int], str] = {}


def _image_sha256(root: Path, rel: str, manifest: Path) -> str:
    """SHA-256 of a manifest image's bytes, cached per process by the file it names (device, inode,
    size, mtime): a site's identity is asked for several times a round, and resolving every path
    each time cost more than the round's DP training. A path is resolved and checked to stay inside
    the site folder before its file is first read, and again whenever it names another file (a
    symlink retargeted, a file replaced): no file outside the folder is ever read."""
    named = root / rel
    try:
        st = os.stat(named)
    except OSError:
        raise DatasetIdError(f"{named} (in manifest.csv) is missing; the dataset's identity cannot be established. "
                             "Restore the image or remove it from the manifest.") from None
    key = (str(named), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _FILE_HASHES:
        h = hashlib.sha256()
        with _inside(root, rel, manifest).open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                h.update(block)
        _FILE_HASHES[key] = h.hexdigest()
    return _FILE_HASHES[key]


def _inside(root: Path, rel: str, manifest: Path) -> Path:
    """A manifest path, refused when it resolves outside the (resolved) site folder."""
    path = (root / rel).resolve()
    if not path.is_relative_to(root):
        raise DatasetIdError(f"{manifest}: path {rel!r} resolves to {path}, outside the site folder; the site reads "
                             "nothing outside its folder. Run `spine-fl validate` on the site folder.")
    return path


def dataset_id(site_dir: Path) -> str:
    """Identity of the patients, not of the files: the same patients, the same budget.

    The hash of canonical JSON holding (1) clinical.csv's patient ids, stripped and sorted; (2) when
    manifest.csv exists, (patient_id, view, SHA-256 of the image's bytes) for every row, sorted.
    Column order, line endings, quoting, other columns' values and file paths do not change it;
    another patient id, another patient or another image does.
    """
    site_dir = Path(site_dir)
    clinical = site_dir / "clinical.csv"
    patients: list[str] = []  # no table, no patients (nothing can train on it: the validator says so)
    if clinical.exists():
        patients = sorted(pid for (pid,) in _read_table(clinical, ("patient_id",)))
    identity: dict = {"version": DATASET_ID_VERSION, "patients": patients}
    manifest = site_dir / "manifest.csv"
    if manifest.exists():
        rows = _read_table(manifest, ("patient_id", "view", "path"))
        root = site_dir.resolve()
        identity["images"] = sorted([pid, view, _image_sha256(root, rel, manifest)] for pid, view, rel in rows)
    return hashlib.sha256(canonical(identity)).hexdigest()[:32]


PATIENT_SET_VERSION = "spine-fl patient set v1"
_PATIENT_HASHES: dict[str, frozenset[str]] = {}


def dataset_patients(site_dir: Path) -> tuple[str, frozenset[str]]:
    """The dataset id and its patients as SHA-256 hex digests of each patient id (clinical.csv's and
    manifest.csv's): what the dataset's privacy ledger records as whose data it spent. Cached by the
    dataset id, which is itself a hash of these very ids."""
    site_dir = Path(site_dir)
    dataset = dataset_id(site_dir)
    if dataset not in _PATIENT_HASHES:
        ids: set[str] = set()
        for name in ("clinical.csv", "manifest.csv"):
            if (site_dir / name).exists():
                ids.update(pid for (pid,) in _read_table(site_dir / name, ("patient_id",)))
        _PATIENT_HASHES[dataset] = frozenset(hashlib.sha256(pid.encode()).hexdigest() for pid in ids)
    return dataset, _PATIENT_HASHES[dataset]


@dataclass(frozen=True)
class PatientSet:
    """A ledger's signed patient-set record, verified: its digest (what every ledger line names) and the
    SHA-256 of each patient id."""

    digest: str
    hashes: frozenset[str]


def patient_set_path(state_dir: Path, dataset: str) -> Path:
    return Path(state_dir) / "privacy" / f"{dataset}.patients"


def _patient_payload(dataset: str, hashes: frozenset[str]) -> dict:
    return {"version": PATIENT_SET_VERSION, "dataset": dataset, "patients_sha256": sorted(hashes)}


def read_patient_set(state_dir: Path, dataset: str) -> PatientSet | None:
    """The patient-set record of `dataset`'s ledger, verified (the site key's signature, naming this
    dataset); None when there is none (a ledger from before issue 10, or the record deleted). Raises
    PrivacyLedgerError when it exists and does not verify. Parsed and verified once per content."""
    path = patient_set_path(state_dir, dataset)
    if not path.exists():
        return None
    data = path.read_bytes()
    public = load_public_key(Path(state_dir))
    raw_key = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw) if public else b""
    key = (str(path.resolve()), hashlib.sha256(data).hexdigest(), raw_key)
    if key not in _PATIENT_SETS:
        def broken(why: str) -> PrivacyLedgerError:
            return PrivacyLedgerError(f"{path} (the signed record of whose data the privacy ledger {dataset}.jsonl "
                                      f"spent) does not verify: {why}. The site's spent privacy budget cannot be "
                                      f"established, so it will not train. {RESTORE}")
        try:
            payload = json.loads(data)
            signature = base64.b64decode(payload.pop("signature"))
            hashes = payload["patients_sha256"]
            if not (isinstance(hashes, list) and all(isinstance(h, str) for h in hashes)):
                raise TypeError
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, ValueError, TypeError, AttributeError):
            raise broken("not a signed patient-set record") from None
        if public is None:
            raise broken(f"{Path(state_dir) / PUBLIC_KEY_FILE} missing: cannot check its signature")
        try:
            public.verify(signature, canonical(payload))
        except InvalidSignature:
            raise broken("its signature does not match its content or the site's key") from None
        if payload.get("version") != PATIENT_SET_VERSION or payload.get("dataset") != dataset:
            raise broken(f"it is the record of dataset {payload.get('dataset')!r}, not of {dataset}")
        _PATIENT_SETS[key] = PatientSet(hashlib.sha256(canonical(payload)).hexdigest(), frozenset(hashes))
    return _PATIENT_SETS[key]


def record_patients(state_dir: Path, dataset: str, hashes: frozenset[str]) -> PatientSet:
    """Write `dataset`'s signed patient-set record once (atomically), before its ledger's first line.

    `hashes` come from the data whose dataset id is `dataset`, so the record is a function of the data
    alone (and its digest, which the ledger's lines name, leaves the signature out). A record that does
    not verify (e.g. signed by a key since replaced) is therefore written again from the data, which
    only ever restores the truth; one that verifies but records other patients was written with the
    site's key to lie, and is refused (PrivacyLedgerError). Other datasets' records are never rewritten:
    there a record that does not verify stops the site (PrivacyLedger.overlaps)."""
    expected = _patient_payload(dataset, hashes)
    digest = hashlib.sha256(canonical(expected)).hexdigest()
    try:
        found = read_patient_set(state_dir, dataset)
    except PrivacyLedgerError as exc:
        log.warning("spine-fl: %s; written again from the site's data, whose dataset id it names", exc)
        found = None
    if found is None:
        key = load_or_create_key(Path(state_dir))
        signed = canonical(expected | {"signature": base64.b64encode(key.sign(canonical(expected))).decode()})
        atomic_write_bytes(patient_set_path(state_dir, dataset), signed, durable=True)
        found = read_patient_set(state_dir, dataset)
        assert found is not None
    if found.digest != digest:
        raise PrivacyLedgerError(f"{patient_set_path(state_dir, dataset)} does not record the patients of the data "
                                 f"whose dataset id {dataset} it names (edited or replaced). {RESTORE}")
    return found


def spent_for_patients(state_dir: Path, dataset: str) -> Spent:
    """What the current dataset's patients have spent: `dataset`'s ledger composed with every other
    ledger in `<state_dir>/privacy/` that used any of its patients (Spent.plus; `.also` names them).

    Conservative by design: a patient's privacy loss is the composition of every release that used
    that patient, and a ledger's spending is not split per patient (DP-SGD's guarantee for one record
    is the whole composition of the mechanisms it took part in), so ONE shared patient counts that
    ledger's whole spending. Where overlap cannot be shown absent it is assumed: a ledger with no
    patient-set record or with a line naming none (written before this check existed, or its record
    deleted), and every ledger when the current dataset's own record is missing. Only a cohort that
    provably shares no patient with a ledger (both records signed, the other bound to its ledger's
    lines) gets a budget apart from it. A record or ledger that does not verify stops the site
    (PrivacyLedgerError): its spending cannot be established.

    Per round: each ledger verified incrementally and composed at its head (PrivacyLedger.spent), the
    overlap of two records decided once per pair, and the sum kept per set of heads, so the pre-flight
    and the round's own check (and every round in which no other ledger grew) reuse it and its figures.
    """
    state_dir = Path(state_dir)
    own = PrivacyLedger(state_dir, dataset).spent()
    current = read_patient_set(state_dir, dataset)
    folder = state_dir / "privacy"
    counted: list[tuple[str, Spent]] = []
    for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
        if path.stem == dataset:
            continue
        other = PrivacyLedger(state_dir, path.stem)
        spent = other.spent()  # raises naming the first broken line
        if spent.lines and other.overlaps(spent, current):
            counted.append((path.stem, spent))
    if not counted:
        return own
    key = (str(folder.resolve()), dataset)
    heads = (own.lines, own.last_sha256, tuple((name, s.lines, s.last_sha256) for name, s in counted))
    known = _COMBINED.get(key)
    if known is None or known[0] != heads:
        known = (heads, own.plus(counted))
        _COMBINED[key] = known
    return known[1]


def as_history(records: list[SpendRecord], run_id: str | None = None) -> History:
    """The (noise, sample rate, steps) entries the accountants compose: every run's, or one run's."""
    return [(r.noise_multiplier, r.sample_rate, r.steps) for r in records if run_id is None or r.run_id == run_id]


class PrivacyLedger:
    def __init__(self, state_dir: Path, dataset: str):
        self.state_dir = Path(state_dir)
        self.dataset = dataset
        self.path = self.state_dir / "privacy" / f"{dataset}.jsonl"
        self.head = self.path.with_suffix(".head")
        self.log = SignedLog(self.path, self.head, self.state_dir, self.path.parent / f".{dataset}.lock")

    def records(self) -> list[SpendRecord]:
        """Every round recorded, after verifying the whole ledger; raises PrivacyLedgerError naming
        the first line that does not verify."""
        if not self.log.exists():
            return []
        return [self._record(number, entry) for number, entry in enumerate(self._verified().entries(), start=1)]

    def spent(self) -> Spent:
        """The ledger composed (lifetime and per run key) at its verified head: verified on every call,
        composed from the lines added since this process last composed it (all of them at start-up)."""
        key = str(self.path.resolve())
        if not self.log.exists():
            _SPENT.pop(key, None)
            return NOTHING
        try:
            snapshot = self._verified()
        except PrivacyLedgerError:
            _SPENT.pop(key, None)  # nothing composed from a ledger that no longer verifies is kept
            raise
        known = _SPENT.get(key, NOTHING)
        if known.lines > snapshot.lines or snapshot.line_sha256(known.lines) != known.last_sha256:
            known = NOTHING  # restored, replaced or re-signed: composed again from every line
        added = [self._record(number, entry) for number, entry in enumerate(snapshot.entries(known.lines),
                                                                            start=known.lines + 1)]
        spent = known.then(((r.run_id, r.round, r.noise_multiplier, r.sample_rate, r.steps) for r in added),
                           snapshot.lines, snapshot.line_sha256(snapshot.lines)) if added else known
        if added:  # the patient-set digest every line names (None once one names none or another)
            entries = snapshot.payloads[known.lines:]
            digest = entries[0].get("patients") if not known.lines else known.patients
            if any(entry.get("patients") != digest for entry in entries):
                digest = None
            spent = replace(spent, patients=digest if isinstance(digest, str) else None, also=())
        _SPENT[key] = spent
        return spent

    def overlaps(self, spent: Spent, patients: PatientSet | None) -> bool:
        """Could this ledger (composed at `spent`) have used any of `patients`? True unless both patient
        sets are known and disjoint (see spent_for_patients); raises when its record does not verify or
        is not the record its signed lines name."""
        recorded = read_patient_set(self.state_dir, self.dataset)
        if recorded is None or spent.patients is None:
            return True  # no record, or lines from before the record: whose data they spent is unknown
        if recorded.digest != spent.patients:
            raise PrivacyLedgerError(f"{patient_set_path(self.state_dir, self.dataset)} is not the patient-set "
                                     f"record that the signed lines of {self.path} name (edited, replaced or "
                                     f"re-signed). {RESTORE}")
        if patients is None:
            return True
        pair = (recorded.digest, patients.digest)
        if pair not in _OVERLAPS:
            _OVERLAPS[pair] = not recorded.hashes.isdisjoint(patients.hashes)
        return _OVERLAPS[pair]

    def history(self, run_id: str | None = None) -> History:
        return as_history(self.records(), run_id)

    def epsilon(self, delta: float, accountant: str, run_id: str | None = None) -> float:
        spent = self.spent()
        return (spent.lifetime if run_id is None else spent.run(run_id)).epsilon(delta, accountant)

    def append(self, record: SpendRecord) -> None:
        """Sign, append and fsync one round (under a file lock), before the update leaves the site. The
        line names the digest of the dataset's patient-set record, when there is one (see the module
        docstring); without one that verifies, the line names none (conservative: a ledger with such a
        line counts for every cohort)."""
        try:
            patients = read_patient_set(self.state_dir, self.dataset)
        except PrivacyLedgerError:  # a charge is always recorded; a line naming no record counts for everyone
            patients = None
        self.log.append(asdict(record) | {"time": record.time or time.time()}
                        | ({"patients": patients.digest} if patients else {}))

    def _verified(self) -> Snapshot:
        result, snapshot = self.log.snapshot()
        if not result.ok:
            where = f"line {result.first_broken_line}" if result.first_broken_line else "its head"
            raise PrivacyLedgerError(
                f"{self.path} does not verify at {where}: {result.problem}. The site's spent privacy budget "
                f"cannot be established, so it will not train. {RESTORE}")
        return snapshot

    def _record(self, number: int, entry: dict) -> SpendRecord:
        try:
            return SpendRecord(**{k: v for k, v in entry.items() if k in SPEND_FIELDS})
        except TypeError as exc:
            raise PrivacyLedgerError(f"{self.path} line {number} is not a spending record ({exc}). {RESTORE}") from None


# Each ledger file's composition at the head it was composed at, for this process (see the module
# docstring): the running budget. Never trusted without verifying the ledger first.
_SPENT: dict[str, Spent] = {}
# Per (privacy folder, dataset): the heads of the ledgers last composed together, and their sum.
_COMBINED: dict[tuple[str, str], tuple[tuple, Spent]] = {}
# Per (record digest, record digest): do the two patient sets share a patient? Records are immutable
# (a digest names one content), so this never goes stale.
_OVERLAPS: dict[tuple[str, str], bool] = {}
# Verified patient-set records, per (file, SHA-256 of its bytes, public key).
_PATIENT_SETS: dict[tuple[str, str, bytes], PatientSet] = {}
