"""The site's persistent privacy ledger: every DP-SGD round it ever ran, per dataset.

Flower creates a fresh ClientApp per message, and processes restart; an accountant kept in
memory would forget (Flower's Opacus example resets epsilon every round). Here each round is
appended to `<state_dir>/privacy/<dataset_id>.jsonl` and fsync'd before the update leaves, and
epsilon is always recomputed from the whole file: across rounds, runs and reboots.

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
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import pandas as pd

from spine_fl.client.privacy.signed_log import SignedLog, canonical
from spine_fl.shared.training.accounting import History, epsilon

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


def _read_table(path: Path) -> pd.DataFrame:
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except Exception as exc:  # noqa: BLE001 - pandas raises several parser errors
        raise DatasetIdError(f"{path} is not a readable CSV ({exc}); the dataset's identity, and so its spent "
                             "privacy budget, cannot be established. Run `spine-fl validate` on the site folder.") from None
    table.columns = [str(c).strip() for c in table.columns]
    if "patient_id" not in table.columns:
        raise DatasetIdError(f"{path} has no patient_id column; the dataset's identity cannot be established")
    return table.apply(lambda col: col.str.strip())


_FILE_HASHES: dict[tuple[str, int, int, int], str] = {}


def _file_sha256(path: Path) -> str:
    """SHA-256 of an image's bytes (cached per process by path, size, inode and mtime)."""
    try:
        st = path.stat()
    except OSError:
        raise DatasetIdError(f"{path} (in manifest.csv) is missing; the dataset's identity cannot be established. "
                             "Restore the image or remove it from the manifest.") from None
    key = (str(path.resolve()), st.st_size, st.st_ino, st.st_mtime_ns)
    if key not in _FILE_HASHES:
        h = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                h.update(block)
        _FILE_HASHES[key] = h.hexdigest()
    return _FILE_HASHES[key]


def _inside(site_dir: Path, rel: str, manifest: Path) -> Path:
    """A manifest path, refused when it resolves outside the site folder (never read, never hashed)."""
    path = (site_dir / rel).resolve()
    if not path.is_relative_to(site_dir.resolve()):
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
        patients = sorted(_read_table(clinical)["patient_id"])
    identity: dict = {"version": DATASET_ID_VERSION, "patients": patients}
    manifest = site_dir / "manifest.csv"
    if manifest.exists():
        images = _read_table(manifest)
        missing = [c for c in ("view", "path") if c not in images.columns]
        if missing:
            raise DatasetIdError(f"{manifest} lacks column(s) {', '.join(missing)}; the dataset's identity cannot be "
                                 "established")
        identity["images"] = sorted([pid, view, _file_sha256(_inside(site_dir, rel, manifest))]
                                    for pid, view, rel in images[["patient_id", "view", "path"]].itertuples(index=False))
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
        result, entries = self.log.entries()
        if not result.ok:
            where = f"line {result.first_broken_line}" if result.first_broken_line else "its head"
            raise PrivacyLedgerError(
                f"{self.path} does not verify at {where}: {result.problem}. The site's spent privacy budget "
                f"cannot be established, so it will not train. {RESTORE}")
        out = []
        for number, entry in enumerate(entries, start=1):
            try:
                out.append(SpendRecord(**{k: v for k, v in entry.items() if k in SPEND_FIELDS}))
            except TypeError as exc:
                raise PrivacyLedgerError(f"{self.path} line {number} is not a spending record ({exc}). {RESTORE}") from None
        return out

    def history(self, run_id: str | None = None) -> History:
        return as_history(self.records(), run_id)

    def epsilon(self, delta: float, accountant: str, run_id: str | None = None) -> float:
        return epsilon(self.history(run_id), delta, accountant)

    def append(self, record: SpendRecord) -> None:
        """Sign, append and fsync one round (under a file lock), before the update leaves the site."""
        self.log.append(asdict(record) | {"time": record.time or time.time()})
