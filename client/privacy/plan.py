"""What a DP round at this site will use and cost, computed before any training.

δ belongs to the site: it is at most 1 / (10 n) for the site's n training patients, and at most
the policy's `max_delta` when the site sets one. A run's `delta = 0` leaves δ to each site; a run
may ask for a smaller δ (the site then uses the run's); a larger one is never used: the site-policy
mod refuses such a run before any training (policy.delta_refusal), and whatever plans a round
without that mod (a ClientApp without mods, the simulation's baselines) gets the site's own δ.
"""

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


def allowed_delta(n_train: int, max_delta: float | None = None) -> float:
    """The largest δ this site trains at: 1 / (10 n), or its policy's max_delta when that is smaller."""
    own = default_delta(n_train)
    return own if max_delta is None else min(own, max_delta)


def site_delta(run: RunSettings, n_train: int, max_delta: float | None = None) -> float:
    """The δ of this site's DP rounds: the run's when it asks for a smaller one, else the site's own
    (never larger: a run asking for more is refused before it gets here)."""
    allowed = allowed_delta(n_train, max_delta)
    return run.delta if 0 < run.delta <= allowed else allowed


def plan_round(run: RunSettings, n_train: int, max_delta: float | None = None) -> DpPlan:
    """A target epsilon is turned into this site's noise multiplier for the whole run."""
    delta = site_delta(run, n_train, max_delta)
    per_round = planned_spend(n_train, run.batch_size, run.local_epochs, run.noise_multiplier)
    noise = run.noise_multiplier
    if run.target_epsilon > 0:
        noise = noise_for_target(run.target_epsilon, delta, per_round.sample_rate,
                                 per_round.steps * run.rounds, run.accountant)
    return DpPlan(noise, run.max_grad_norm, delta, DpSpend(noise, per_round.sample_rate, per_round.steps))
