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
"""

from __future__ import annotations

import hashlib
import io
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import pandas as pd

from spine_fl.client.privacy.signed_log import SignedLog, Snapshot, canonical
from spine_fl.client.privacy.spent_budget import NOTHING, Spent
from spine_fl.shared.training.accounting import History

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
        _SPENT[key] = spent
        return spent

    def history(self, run_id: str | None = None) -> History:
        return as_history(self.records(), run_id)

    def epsilon(self, delta: float, accountant: str, run_id: str | None = None) -> float:
        spent = self.spent()
        return (spent.lifetime if run_id is None else spent.run(run_id)).epsilon(delta, accountant)

    def append(self, record: SpendRecord) -> None:
        """Sign, append and fsync one round (under a file lock), before the update leaves the site."""
        self.log.append(asdict(record) | {"time": record.time or time.time()})

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
