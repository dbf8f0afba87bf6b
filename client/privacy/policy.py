"""A site's policy: the rules a hospital sets for what its data may be used for.

Read only at the site (`configs/sites/<site>.toml`, section `[policy]`). A run that breaks a rule
is refused before any training, with the rule named; a round that would push epsilon over a
budget is refused with the numbers. Both travel to the coordinator as a machine-readable refusal.
"""

from __future__ import annotations

from dataclasses import dataclass

from spine_fl.shared.config import RunSettings
from spine_fl.shared.contract.tasks import TASKS
from spine_fl.shared.refusal import Refusal


@dataclass(frozen=True)
class SitePolicy:
    epsilon_lifetime: float = 20.0  # per dataset, over every run ever
    epsilon_per_run: float = 12.0
    min_noise_multiplier: float = 0.5
    max_rounds: int = 100
    max_local_epochs: int = 10
    allowed_tasks: tuple[str, ...] = tuple(TASKS)
    require_dp: bool = True
    require_secagg: bool = True
    # SHA-256 of each app bundle (FAB) this site will run, as printed by `spine-fl bundle hash`.
    # Empty: the site runs no bundle at all on Flower's deployment engine (simulation has none).
    allowed_bundles: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "allowed_tasks", tuple(self.allowed_tasks))
        object.__setattr__(self, "allowed_bundles", tuple(h.strip().lower() for h in self.allowed_bundles))
        malformed = [h for h in self.allowed_bundles if len(h) != 64 or any(c not in "0123456789abcdef" for c in h)]
        if malformed:
            raise ValueError(f"allowed_bundles entries must be 64-character SHA-256 hex digests; got {malformed[0]!r}")
        unknown = sorted(set(self.allowed_tasks) - set(TASKS))
        if unknown:
            raise ValueError(f"allowed_tasks names unknown task(s) {', '.join(unknown)}")
        if self.epsilon_lifetime <= 0 or self.epsilon_per_run <= 0:
            raise ValueError("epsilon budgets must be > 0")


def rule_violations(policy: SitePolicy, run: RunSettings, secagg_in_use: bool) -> list[Refusal]:
    """Static rules: checked for every message before anything is computed on the data."""
    out = []
    if run.task not in policy.allowed_tasks:
        out.append(Refusal("allowed_tasks", f"task {run.task} is not in this site's allowed_tasks "
                           f"({', '.join(policy.allowed_tasks)})"))
    if policy.require_dp and not run.dp:
        out.append(Refusal("require_dp", "the run has dp = false; this site requires differential privacy"))
    if run.dp and run.target_epsilon <= 0 and run.noise_multiplier < policy.min_noise_multiplier:
        out.append(Refusal("min_noise_multiplier", f"noise multiplier {run.noise_multiplier:g} is below this "
                           f"site's minimum {policy.min_noise_multiplier:g}"))
    if policy.require_secagg and not secagg_in_use:
        out.append(Refusal("require_secagg", "the update would be sent without secure aggregation; "
                           "this site requires SecAgg+"))
    if run.rounds > policy.max_rounds:
        out.append(Refusal("max_rounds", f"{run.rounds} rounds exceed this site's maximum {policy.max_rounds}"))
    if run.local_epochs > policy.max_local_epochs:
        out.append(Refusal("max_local_epochs", f"{run.local_epochs} local epochs exceed this site's maximum "
                           f"{policy.max_local_epochs}"))
    return out
