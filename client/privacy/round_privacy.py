"""A DP round's privacy at a site, assessed once and passed along.

The site-policy mod must know, before any training, what the round will cost (to refuse it over
budget); the train reply must say what the site has spent after it. Both are the same figures: the
mod assesses the round once (one read of the privacy ledger, one epsilon per budget) and leaves the
assessment in the message's Context, where the ClientApp's fit takes it instead of recomputing.
The Context is the site's own (it never leaves the site); the assessment is keyed by run and round
so a stale one is never used.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from flwr.app import ConfigRecord, Context

from spine_fl.client.privacy.plan import DpPlan, plan_round
from spine_fl.client.privacy.privacy_ledger import PrivacyLedger, dataset_id
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
    plan: DpPlan
    epsilon_run_after: float
    epsilon_lifetime_after: float
    steps_run_after: int

    def epsilon_spent(self, accountant: str, site: Site, per_run: bool) -> float:
        """Spent before this round; only needed to explain a refusal, so computed only then."""
        ledger = PrivacyLedger(site.state_dir, dataset_id(site.data_dir))
        history = ledger.history(self.run_key) if per_run else ledger.history()
        return epsilon(history, self.plan.delta, accountant)


def assess_round(site: Site, run: RunSettings, run_key: str, server_round: int, n_train: int) -> RoundPrivacy:
    plan = plan_round(run, n_train)
    records = PrivacyLedger(site.state_dir, dataset_id(site.data_dir)).records()
    step = plan.round_spend
    lifetime = [(r.noise_multiplier, r.sample_rate, r.steps) for r in records]
    this_run = [(r.noise_multiplier, r.sample_rate, r.steps) for r in records if r.run_id == run_key]
    nxt = [(step.noise_multiplier, step.sample_rate, step.steps)]
    return RoundPrivacy(run_key, server_round, plan,
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
