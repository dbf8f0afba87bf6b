"""A DP round's privacy at a site, assessed once and passed along.

The site-policy mod must know, before any training, what the round will cost (to refuse it over
budget); the train reply must say what the site has spent after it. Both are the same figures: the
mod assesses the round once (one read of the privacy ledger, one epsilon per budget) and leaves the
assessment in the message's Context, where the ClientApp's fit takes it instead of recomputing.
The Context is the site's own (it never leaves the site); the assessment is keyed by run and round
so a stale one is never used.

Before a DP round, a missing or empty privacy ledger is checked against the egress ledger: a site
whose egress ledger shows DP train replies that no privacy ledger at the site accounts for had its
privacy ledger deleted, and refuses to train (`check_ledger_not_deleted`). Deleting both ledgers is
caught only by the coordinator's record of the site's past spending (not here).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from flwr.app import ConfigRecord, Context

from spine_fl.client.privacy.egress_ledger import dp_train_spending
from spine_fl.client.privacy.plan import DpPlan, plan_round
from spine_fl.client.privacy.privacy_ledger import RESTORE, PrivacyLedger, PrivacyLedgerError, as_history, dataset_id
from spine_fl.client.site_config import Site
from spine_fl.shared.config import RunSettings
from spine_fl.shared.training.accounting import epsilon
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

    def epsilon_spent(self, accountant: str, site: Site, per_run: bool) -> float:
        """Spent before this round; only needed to explain a refusal, so computed only then."""
        ledger = PrivacyLedger(site.state_dir, self.dataset)
        return epsilon(ledger.history(self.run_key if per_run else None), self.plan.delta, accountant)


def assess_round(site: Site, run: RunSettings, run_key: str, server_round: int, n_train: int) -> RoundPrivacy:
    plan = plan_round(run, n_train, site.policy.max_delta)  # never a larger delta than the site's own
    ledger = PrivacyLedger(site.state_dir, dataset_id(site.data_dir))
    records = ledger.records()
    if not records:
        check_ledger_not_deleted(ledger)
    step = plan.round_spend
    lifetime, this_run = as_history(records), as_history(records, run_key)
    nxt = [(step.noise_multiplier, step.sample_rate, step.steps)]
    return RoundPrivacy(run_key, server_round, ledger.dataset, plan,
                        epsilon_run_after=epsilon([*this_run, *nxt], plan.delta, run.accountant),
                        epsilon_lifetime_after=epsilon([*lifetime, *nxt], plan.delta, run.accountant),
                        steps_run_after=sum(n for _, _, n in this_run) + step.steps)


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
            accounted += len(PrivacyLedger(ledger.state_dir, path.stem).records())
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
