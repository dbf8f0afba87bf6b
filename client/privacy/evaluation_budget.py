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
could enter that sum.

The file is a SignedLog like both ledgers (client/privacy/signed_log.py: the site's Ed25519 key,
hash chain, a signed head `<dataset>.head`), so an edited line or lines dropped from its end stop
it verifying. Deleting it (with its head), or truncating it and re-signing the head with the site's
own key (an insider holds it), would still restart the count; so before every release the count is
held to the egress ledger, whose replies show every release that left (an evaluate reply with
held-out metrics, a recalibration histogram): every release took a line in some dataset's budget
before it left, so the egress ledger can never show more releases than the budgets hold lines. A
budget that does not verify, or holds fewer lines than the egress ledger shows releases, refuses
the evaluation (rule `evaluation_budget`, EvaluationBudgetRefused): it never restarts at zero.
"""

from __future__ import annotations

import fcntl
import time
from pathlib import Path
from typing import Any

import numpy as np

from spine_fl.client.privacy.egress_ledger import EgressLedger
from spine_fl.client.privacy.policy import SitePolicy
from spine_fl.client.privacy.privacy_ledger import dataset_id
from spine_fl.client.privacy.signed_log import SignedLog
from spine_fl.client.site_config import Site
from spine_fl.shared import protocol
from spine_fl.shared.refusal import Refusal

EVALUATIONS_DIR = "evaluations"
RULE = "evaluation_budget"
RESTORE = ("Restore the evaluation budget (the .jsonl and its .head) from backup; never delete or edit it to reset "
           "the count.")


class EvaluationBudgetRefused(RuntimeError):
    """The number of releases cannot be established: the evaluation is refused. Its text is the
    refusal's wire form (shared/refusal.py), so the coordinator and the audit read it as a refusal."""

    def __init__(self, refusal: Refusal):
        super().__init__(refusal.to_reason())
        self.refusal = refusal


def _is_release(entry: dict[str, Any]) -> bool:
    """An egress-ledger line that carried figures computed on held-out patients: an evaluate reply with
    metrics (not withheld) or a recalibration histogram."""
    metrics = entry.get("metrics") if isinstance(entry.get("metrics"), dict) else {}
    if entry.get("error"):
        return False
    if str(entry.get("kind", "")) == "evaluate":
        return not metrics.get(protocol.evaluate_metric(protocol.WITHHELD)) and bool(entry.get("num_examples"))
    return protocol.fit_metric(protocol.CALIBRATION_NOISE) in metrics


def releases_sent(state_dir: Path) -> int:
    """Releases of held-out figures the egress ledger records. When it does not verify its readable
    lines are still counted: releases they show are evidence, not something to trust away."""
    log = EgressLedger(state_dir).log
    result, snapshot = log.snapshot()
    lines = snapshot.payloads if result.ok else [e for e in log.readable_lines() if e is not None]
    return sum(1 for entry in lines if _is_release(entry))


class EvaluationBudget:
    """Releases of held-out metrics of one dataset, over every run ever."""

    def __init__(self, state_dir: Path, dataset: str):
        self.state_dir = Path(state_dir)
        self.dataset = dataset
        self.path = self.state_dir / "privacy" / EVALUATIONS_DIR / f"{dataset}.jsonl"
        self.head = self.path.with_suffix(".head")
        self.log = SignedLog(self.path, self.head, self.state_dir, self.path.parent / ".evaluations.lock")

    def _refuse(self, why: str) -> EvaluationBudgetRefused:
        return EvaluationBudgetRefused(Refusal(RULE, f"{self.path}: {why}. The number of held-out evaluations "
                                               f"released cannot be established, so none is made. {RESTORE}"))

    def used(self) -> int:
        """Releases so far, after verifying the file; EvaluationBudgetRefused when it does not verify."""
        if not self.log.exists():
            return 0
        result = self.log.verify()
        if not result.ok:
            where = f"line {result.first_broken_line}" if result.first_broken_line else "its head"
            raise self._refuse(f"does not verify at {where} ({result.problem})")
        return result.lines

    def _lines_elsewhere(self) -> int:
        """Lines in the other datasets' budgets at this site (releases of earlier data)."""
        return sum(len(path.read_bytes().splitlines()) for path in self.path.parent.glob("*.jsonl")
                   if path != self.path)

    def check_against_egress(self, used: int) -> None:
        """EvaluationBudgetRefused when the egress ledger shows more releases than the budgets hold."""
        sent = releases_sent(self.state_dir)
        held = used + self._lines_elsewhere()
        if sent > held:
            what = "is missing" if not self.log.exists() else f"holds {used} line(s)"
            raise self._refuse(f"{what}, yet the egress ledger records {sent} release(s) of held-out figures "
                               f"and this site's evaluation budgets hold only {held}: it was deleted or truncated "
                               "(its head re-signed)")

    def take(self, limit: int, run_key: str, server_round: int, patients: int) -> bool:
        """Record one release if fewer than `limit` were made (False: the budget is spent);
        EvaluationBudgetRefused when the count cannot be established."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.parent / f".{self.dataset}.take.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            used = self.used()
            self.check_against_egress(used)
            if used >= limit:
                return False
            self.log.append({"run_key": run_key, "round": server_round, "patients": patients, "time": time.time()})
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
    otherwise why they are withheld. Checked before anything is computed on the held-out patients.
    EvaluationBudgetRefused (rule evaluation_budget) when the count of releases cannot be established:
    the budget does not verify, or holds fewer releases than the egress ledger shows left."""
    small = too_small(site.policy, labels)
    if small is not None:
        return small
    budget = EvaluationBudget(site.state_dir, dataset_id(site.data_dir))
    try:
        if not budget.take(site.policy.max_evaluations, run_key, server_round, len(labels)):
            return (f"the dataset's evaluation budget is spent: {site.policy.max_evaluations} releases of "
                    f"held-out metrics (max_evaluations), counted in {budget.path}")
    except EvaluationBudgetRefused as exc:
        raise EvaluationBudgetRefused(Refusal(exc.refusal.rule, exc.refusal.message, site=site.name)) from None
    return None
