"""A site's policy: the rules a hospital sets for what its data may be used for.

Read only at the site (`configs/sites/<site>.toml`, section `[policy]`). A run that breaks a rule
is refused before any training, with the rule named; a round that would push epsilon over a
budget is refused with the numbers. Both travel to the coordinator as a machine-readable refusal.

δ is the site's (see plan.py): at most 1 / (10 n) for its n training patients and at most
`max_delta` when set; a run asking for more is refused (rule `max_delta`). Held-out metrics leave
only from a large enough held-out split (`min_eval_patients`, `min_eval_per_class`) and only
`max_evaluations` times per dataset (evaluation_budget.py); otherwise the site withholds them.
"""

from __future__ import annotations

from dataclasses import dataclass

from spine_fl.client.privacy.plan import allowed_delta
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
    # false lets `spine-fl client --insecure` run (no TLS, no site key): local experiments only.
    require_tls: bool = True
    # SHA-256 of each app bundle (FAB) this site will run, as printed by `spine-fl bundle hash`.
    # Empty: the site runs no bundle at all on Flower's deployment engine (simulation has none).
    allowed_bundles: tuple[str, ...] = ()
    # The largest δ this site trains at (below its own 1 / (10 n) when set); unset: 1 / (10 n).
    max_delta: float | None = None
    # Held-out metrics leave only when the held-out split has this many patients, and this many of
    # each outcome class; below either the evaluate reply says only that they were withheld.
    min_eval_patients: int = 20
    min_eval_per_class: int = 5
    # Releases of held-out metrics per dataset, over every run ever; past it they are withheld.
    max_evaluations: int = 2000

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
        if self.max_delta is not None and not 0 < self.max_delta < 1:
            raise ValueError(f"max_delta must be in (0, 1) when set; got {self.max_delta!r}")
        for name in ("min_eval_patients", "min_eval_per_class", "max_evaluations"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)!r}")


def delta_refusal(policy: SitePolicy, run: RunSettings, n_train: int) -> Refusal | None:
    """A DP run asking for a δ larger than this site's (1 / (10 n), or max_delta) is refused."""
    allowed = allowed_delta(n_train, policy.max_delta)
    if not run.dp or run.delta <= allowed:
        return None
    source = ("its policy's max_delta" if allowed < allowed_delta(n_train)
              else f"1 / (10 n) for its {n_train} training patients")
    return Refusal("max_delta", f"the run asks for delta = {run.delta:g}; this site allows at most "
                       f"{allowed:.3g} ({source}). Set delta = 0 to let each site use its own",
                       delta_asked=run.delta, delta_allowed=allowed)


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
