"""A DP round's privacy at a site, assessed once and passed along.

The site-policy mod must know, before any training, what the round will cost (to refuse it over
budget); the train reply must say what the site has spent after it. Both are the same figures: the
mod assesses the round once (one verified read of the privacy ledger, its running composition
extended by the lines added since: PrivacyLedger.spent) and leaves the assessment in the message's
Context, where the ClientApp's fit takes it instead of recomputing. The Context is the site's own
(it never leaves the site); the assessment is keyed by run and round so a stale one is never used.
The pre-flight asks the same question at the same ledger head: its epsilons are computed once and
reused (spent_budget.Spent.figures). The recalibration release is assessed by the same function,
with its own spend (`assess_round(..., spend=...)`).

The figures are the current patients' (issue 10), not only the current dataset id's: adding a dummy
row to clinical.csv, or removing a patient, is another dataset id with an empty ledger, so the round
is checked against that ledger composed with every other ledger that used any of the same patients
(privacy_ledger.spent_for_patients). The dataset's signed patient-set record is written before its
first round (privacy_ledger.record_patients), and checked against the data at every assessment.

Before a DP round, a missing or empty privacy ledger is checked against the egress ledger: a site
whose egress ledger shows DP train replies that no privacy ledger at the site accounts for had its
privacy ledger deleted, and refuses to train (`check_ledger_not_deleted`). Deleting both ledgers is
caught by the coordinator's record: the last privacy-ledger head the site's replies carried comes
back with every pre-flight, and a site whose ledger no longer holds it refuses
(`check_coordinator_head`).

A round already in the ledger (same run key and round: a coordinator restarted mid-round asks
again) is a replay: it is not charged again (`RoundPrivacy.replay`), and the site may only re-send
the reply it already paid for (client/privacy/charged_rounds.py).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context

from spine_fl.client.privacy.egress_ledger import dp_train_spending
from spine_fl.client.privacy.plan import DpPlan, plan_round
from spine_fl.client.privacy.privacy_ledger import (RESTORE, PrivacyLedger, PrivacyLedgerError, dataset_patients,
                                                    record_patients, spent_for_patients)
from spine_fl.client.privacy.spent_budget import Step
from spine_fl.client.site_config import Site
from spine_fl.shared.config import RunSettings
from spine_fl.shared.protocol import LEDGER_DATASET, LEDGER_LINES, LEDGER_SHA256
from spine_fl.shared.training.local import DpSpend

STATE_RECORD = "spine-fl.round-privacy"


@dataclass(frozen=True)
class RoundPrivacy:
    """What this round will use (`plan`) and the epsilon spent once it has trained, at `plan.delta`."""

    run_key: str
    round: int
    dataset: str  # the privacy ledger's dataset id, computed once for the round
    plan: DpPlan
    epsilon_run_after: float
    epsilon_lifetime_after: float
    steps_run_after: int
    replay: bool = False  # this run key and round are already in the ledger: charged once, never again
    rounds_in_run: int = 0  # rounds of this run key the ledger held before this one

    def epsilon_spent(self, accountant: str, site: Site, per_run: bool) -> float:
        """Spent before this round; only needed to explain a refusal, so computed only then."""
        spent = spent_for_patients(site.state_dir, self.dataset)
        return (spent.run(self.run_key) if per_run else spent.lifetime).epsilon(self.plan.delta, accountant)


def assess_round(site: Site, run: RunSettings, run_key: str, server_round: int, n_train: int,
                 spend: Step | None = None) -> RoundPrivacy:
    """The round's plan and what the run and the lifetime will have spent after it: a training round
    spends the plan's DP-SGD steps, another release (the recalibration histogram) its own `spend`."""
    plan = plan_round(run, n_train, site.policy.max_delta)  # never a larger delta than the site's own
    dataset, patients = dataset_patients(site.data_dir)
    ledger = PrivacyLedger(site.state_dir, dataset)
    own = ledger.spent()
    if not own.lines:
        check_ledger_not_deleted(ledger)
    recorded = record_patients(site.state_dir, dataset, patients)
    if own.patients is not None and own.patients != recorded.digest:
        raise PrivacyLedgerError(f"{ledger.path}'s signed lines name another patient-set record than the one of "
                                 f"its patients. {RESTORE}")
    spent = spent_for_patients(site.state_dir, dataset)  # every ledger that used any of these patients
    step = plan.round_spend
    replay = spent.charged(run_key, server_round)
    charge = spend if spend is not None else (step.noise_multiplier, step.sample_rate, step.steps)
    figures = spent.figures(run_key, None if replay else charge, plan.delta, run.accountant)
    return RoundPrivacy(run_key, server_round, ledger.dataset, plan, figures.epsilon_run_after,
                        figures.epsilon_lifetime_after, figures.steps_run_after, replay, figures.rounds_in_run)


def hand_over(context: Context, assessed: RoundPrivacy) -> None:
    context.state.config_records[STATE_RECORD] = ConfigRecord({"json": json.dumps(asdict(assessed))})


def take(context: Context, run_key: str, server_round: int) -> RoundPrivacy | None:
    """The assessment the policy mod made for this very round, if any (removed: used once)."""
    record = context.state.config_records.pop(STATE_RECORD, None)
    if record is None:
        return None
    raw = json.loads(str(record["json"]))
    plan = raw.pop("plan")
    assessed = RoundPrivacy(**raw, plan=DpPlan(**{**plan, "round_spend": DpSpend(**plan["round_spend"])}))
    return assessed if (assessed.run_key, assessed.round) == (run_key, server_round) else None


class PrivacyLedgerDeleted(PrivacyLedgerError):
    """The privacy ledger is gone while the egress ledger shows the site spent epsilon."""

    def __init__(self, message: str, epsilon_spent: float, delta: float | None):
        super().__init__(message)
        self.epsilon_spent, self.delta = epsilon_spent, delta


def check_ledger_not_deleted(ledger: PrivacyLedger) -> None:
    """Raise PrivacyLedgerDeleted when `ledger` (missing or empty) should hold spending: the egress
    ledger records more DP train replies than all of the site's verifying privacy ledgers hold
    rounds. Fewer or as many is a new dataset (other patients, their own budget), not a deletion."""
    spent, egress = dp_train_spending(ledger.state_dir)
    if not spent:
        return
    accounted, unverifiable = 0, []
    for path in sorted(ledger.path.parent.glob("*.jsonl")) if ledger.path.parent.is_dir() else []:
        if path == ledger.path:
            continue
        try:
            accounted += PrivacyLedger(ledger.state_dir, path.stem).spent().lines
        except PrivacyLedgerError:
            unverifiable.append(path.name)
    if len(spent) <= accounted:
        return
    top = max(spent, key=lambda e: e["epsilon"])
    delta = top.get("delta") if isinstance(top.get("delta"), (int, float)) else None
    at = f" (at delta {delta:.3g})" if delta is not None else ""
    notes = ""
    if not egress.ok:
        notes += f" The egress ledger itself does not verify ({egress.problem}); its lines were read as evidence."
    if unverifiable:
        notes += f" Privacy ledgers that do not verify: {', '.join(unverifiable)}."
    raise PrivacyLedgerDeleted(
        f"the privacy ledger {ledger.path} is missing or empty (deleted?) while the site's egress ledger shows "
        f"{len(spent)} DP train repl{'y' if len(spent) == 1 else 'ies'} that sent epsilon, spending epsilon "
        f"{top['epsilon']:.3f}{at}; no privacy ledger at the site accounts for {len(spent) - accounted} of them. "
        f"The site will not train on a fresh budget.{notes} {RESTORE}",
        epsilon_spent=float(top["epsilon"]), delta=delta)


class LedgerRolledBack(PrivacyLedgerError):
    """The site's privacy ledger no longer holds the head the coordinator recorded from its replies."""


def check_coordinator_head(state_dir: Path, head: dict[str, Any]) -> None:
    """Raise LedgerRolledBack unless the privacy ledger of `head`'s dataset still holds that head:
    the line count and last-line hash the site's own earlier reply carried. Deleting both ledgers,
    truncating one or restoring an older copy all fail here; only a longer ledger (later rounds)
    passes."""
    try:
        dataset, lines, sha = str(head[LEDGER_DATASET]), int(head[LEDGER_LINES]), str(head[LEDGER_SHA256])
    except (KeyError, TypeError, ValueError):
        raise PrivacyLedgerError(f"the coordinator's ledger head {head!r} is malformed; the site cannot check "
                                 "its ledger against it and will not train") from None
    ledger = PrivacyLedger(state_dir, dataset)
    recorded = (f"the coordinator's record of this site's earlier replies shows its privacy ledger for dataset "
                f"{dataset} with {lines} line(s), the last with SHA-256 {sha[:16]}…")
    if not ledger.log.exists():
        raise LedgerRolledBack(f"{recorded}, but {ledger.path} is missing (deleted?). The site will not train on a "
                               f"fresh budget. {RESTORE}")
    ledger.spent()  # verifies the whole ledger first (raises naming the broken line)
    if not ledger.log.contains(lines, sha):
        now, _ = ledger.log.last()
        raise LedgerRolledBack(f"{recorded}, but {ledger.path} now has {now} line(s) and does not contain that "
                               f"line: truncated, rolled back to an older copy or replaced. {RESTORE}")
