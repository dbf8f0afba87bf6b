"""What a DP round at this site will use and cost, computed before any training."""

from __future__ import annotations

from dataclasses import dataclass

from spine_fl.shared.config import RunSettings
from spine_fl.shared.training.accounting import default_delta, noise_for_target
from spine_fl.shared.training.local import DpSpend, planned_spend


@dataclass(frozen=True)
class DpPlan:
    noise_multiplier: float
    max_grad_norm: float
    delta: float
    round_spend: DpSpend


def plan_round(run: RunSettings, n_train: int) -> DpPlan:
    """A target epsilon is turned into this site's noise multiplier for the whole run."""
    delta = run.delta or default_delta(n_train)
    per_round = planned_spend(n_train, run.batch_size, run.local_epochs, run.noise_multiplier)
    noise = run.noise_multiplier
    if run.target_epsilon > 0:
        noise = noise_for_target(run.target_epsilon, delta, per_round.sample_rate,
                                 per_round.steps * run.rounds, run.accountant)
    return DpPlan(noise, run.max_grad_norm, delta, DpSpend(noise, per_round.sample_rate, per_round.steps))
