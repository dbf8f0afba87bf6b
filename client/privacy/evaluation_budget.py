"""When a site's held-out metrics may leave: a large enough held-out split, and a budget per dataset.

Every evaluation that sends metrics computed on the held-out patients answers a question about
them. On a handful of patients an AUROC or a log loss says much about each one, and a coordinator
that may ask without limit (sending models that differ in one weight, say) can probe individual
patients. So a site sends held-out metrics only when its held-out split has at least
`min_eval_patients` patients and `min_eval_per_class` of each outcome, and at most
`max_evaluations` times per dataset; otherwise the evaluate reply says only that they were
withheld (shared/protocol.py WITHHELD).

The count is kept per dataset (the privacy ledger's dataset id: the same patients share one
count whatever the task or run) in `<state_dir>/privacy/evaluations/<dataset>.jsonl`, one line per
release, appended and fsync'd under a file lock before the metrics are computed. A file of its
own rather than records in the privacy ledger: every line of the privacy ledger is a DP-SGD spend
composed into epsilon (the audit reads it so too), and an evaluation is not a DP mechanism that
could enter that sum. A count that cannot be read withholds the metrics; it never restarts at zero.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

import numpy as np

from spine_fl.client.privacy.policy import SitePolicy
from spine_fl.client.privacy.privacy_ledger import dataset_id
from spine_fl.client.site_config import Site

EVALUATIONS_DIR = "evaluations"


class EvaluationBudget:
    """Releases of held-out metrics of one dataset, over every run ever."""

    def __init__(self, state_dir: Path, dataset: str):
        self.path = Path(state_dir) / "privacy" / EVALUATIONS_DIR / f"{dataset}.jsonl"

    def used(self) -> int:
        """Releases so far; ValueError naming the file and line when a line is unreadable."""
        if not self.path.exists():
            return 0
        count = 0
        with self.path.open() as handle:
            for number, line in enumerate(handle, start=1):
                try:
                    json.loads(line)["run_key"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ValueError(f"{self.path} line {number} is unreadable; the number of evaluations "
                                     "released cannot be established (restore it from backup)") from None
                count += 1
        return count

    def take(self, limit: int, run_key: str, server_round: int, patients: int) -> bool:
        """Record one release if fewer than `limit` were made (False: the budget is spent)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.parent / ".evaluations.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.used() >= limit:
                return False
            line = json.dumps({"run_key": run_key, "round": server_round, "patients": patients,
                               "time": time.time()}, sort_keys=True) + "\n"
            with self.path.open("a") as handle:
                handle.write(line)
                handle.flush()
                os.fsync(handle.fileno())
        return True


def too_small(policy: SitePolicy, labels: np.ndarray) -> str | None:
    """Why a held-out split is too small to report on, or None."""
    labels = np.asarray(labels)
    n, positive = len(labels), int((labels == 1).sum())
    if n < policy.min_eval_patients:
        return f"{n} held-out patient(s), fewer than min_eval_patients = {policy.min_eval_patients}"
    if min(positive, n - positive) < policy.min_eval_per_class:
        return (f"{positive} held-out patient(s) with the outcome and {n - positive} without, fewer than "
                f"min_eval_per_class = {policy.min_eval_per_class} in a class")
    return None


def withhold_reason(site: Site, labels: np.ndarray, run_key: str, server_round: int) -> str | None:
    """None when this evaluation's held-out metrics may leave (the release is then recorded);
    otherwise why they are withheld. Checked before anything is computed on the held-out patients."""
    small = too_small(site.policy, labels)
    if small is not None:
        return small
    budget = EvaluationBudget(site.state_dir, dataset_id(site.data_dir))
    try:
        if not budget.take(site.policy.max_evaluations, run_key, server_round, len(labels)):
            return (f"the dataset's evaluation budget is spent: {site.policy.max_evaluations} releases of "
                    f"held-out metrics (max_evaluations), counted in {budget.path}")
    except ValueError as exc:
        return str(exc)
    return None
