"""The site's persistent privacy ledger: every DP-SGD round it ever ran, per dataset.

Flower creates a fresh ClientApp per message, and processes restart; an accountant kept in
memory would forget (Flower's Opacus example resets epsilon every round). Here each round is
appended to `<state_dir>/privacy/<dataset_id>.jsonl` and fsync'd before the update leaves, and
epsilon is always recomputed from the whole file: across rounds, runs and reboots.
A ledger that cannot be read stops the site: it never silently restarts from zero.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from spine_fl.shared.training.accounting import History, epsilon


class PrivacyLedgerError(RuntimeError):
    pass


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


def dataset_id(site_dir: Path) -> str:
    """Content hash of the patient table (and image manifest): the same patients, the same budget."""
    h = hashlib.sha256()
    for name in ("clinical.csv", "manifest.csv"):
        path = Path(site_dir) / name
        if path.exists():
            h.update(name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:32]


class PrivacyLedger:
    def __init__(self, state_dir: Path, dataset: str):
        self.path = Path(state_dir) / "privacy" / f"{dataset}.jsonl"

    def records(self) -> list[SpendRecord]:
        if not self.path.exists():
            return []
        out = []
        with self.path.open() as handle:
            for number, line in enumerate(handle, start=1):
                try:
                    out.append(SpendRecord(**json.loads(line)))
                except (json.JSONDecodeError, TypeError) as exc:
                    raise PrivacyLedgerError(
                        f"{self.path} line {number} is unreadable ({exc}); the site's spent privacy budget "
                        "cannot be established. Restore the ledger from backup; never delete it to reset epsilon."
                    ) from None
        return out

    def history(self, run_id: str | None = None) -> History:
        return [(r.noise_multiplier, r.sample_rate, r.steps) for r in self.records()
                if run_id is None or r.run_id == run_id]

    def epsilon(self, delta: float, accountant: str, run_id: str | None = None) -> float:
        return epsilon(self.history(run_id), delta, accountant)

    def append(self, record: SpendRecord) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(asdict(record) | {"time": record.time or time.time()}, sort_keys=True) + "\n"
        with self.path.open("a") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
