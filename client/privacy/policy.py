"""A site's policy: the rules a hospital sets for what its data may be used for.

Read only at the site (`configs/sites/<site>.toml`, section `[policy]`). A run that breaks a rule
is refused before any training, with the rule named; a round that would push epsilon over a
budget is refused with the numbers. Both travel to the coordinator as a machine-readable refusal.

δ is the site's (see plan.py): at most 1 / (10 n) for its n training patients and at most
`max_delta` when set; a run asking for more is refused (rule `max_delta`). Held-out metrics leave
only from a large enough held-out split (`min_eval_patients`, `min_eval_per_class`) and only
`max_evaluations` times per dataset (evaluation_budget.py); otherwise the site withholds them.

An image task's patients whose required views are missing or unreadable are excluded with a warning
(shared/contract/data_contract.py: never a placeholder image; none left to train on is an error).
When the excluded share of the site's patients exceeds `max_missing_image_share` (default 1.0:
whatever the share), the site refuses to take part before training (rule `max_missing_image_share`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from spine_fl.client.privacy.plan import allowed_delta
from spine_fl.shared.config import RunSettings, problem, raise_problems, toml_value
from spine_fl.shared.contract.tasks import SHIPPED_SHA256, TASKS
from spine_fl.shared.refusal import Refusal


@dataclass(frozen=True)
class SitePolicy:
    epsilon_lifetime: float = 20.0  # per dataset, over every run ever
    epsilon_per_run: float = 12.0
    min_noise_multiplier: float = 0.5
    max_rounds: int = 100
    max_local_epochs: int = 10
    # Tasks this site trains, each a shipped name (its definition as shipped in this release) or
    # "name@sha256" (a task file, as `spine-fl validate --task FILE` prints its hash): a coordinator
    # cannot change a task's definition under a familiar name.
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
    # The largest share (0 to 1) of this site's patients that an image task may exclude because a
    # required image is missing or unreadable; above it the site refuses to take part. 1.0: exclude
    # them with a warning whatever the share (a site with no patient left is unusable regardless).
    max_missing_image_share: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "allowed_tasks", tuple(self.allowed_tasks))
        object.__setattr__(self, "allowed_bundles", tuple(h.strip().lower() for h in self.allowed_bundles))
        raise_problems(self.problems())

    def problems(self) -> list[str]:
        """Every rule that cannot work, each with what to write instead (ConfigError lines)."""
        return [*_list_problems(self), *_budget_problems(self), *_count_problems(self)]


def _list_problems(policy: SitePolicy) -> list[str]:
    out = []
    for i, digest in enumerate(policy.allowed_bundles, 1):
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            out.append(problem("allowed_bundles", list(policy.allowed_bundles),
                               f"entry {i} ({toml_value(digest)}) is not a 64-character SHA-256 hex digest",
                               "copy the hash `spine-fl bundle hash` prints for the released bundle"))
    unknown = [t for t in policy.allowed_tasks if "@" not in t and t not in TASKS]
    if unknown:
        out.append(problem("allowed_tasks", list(policy.allowed_tasks), f"unknown task(s) {', '.join(unknown)}",
                           f"list shipped tasks ({', '.join(sorted(TASKS))}) or a task file's name@sha256 "
                           "(`spine-fl validate --task FILE` prints it)"))
    for entry in policy.allowed_tasks:
        name, _, digest = entry.partition("@")
        if "@" in entry and not (name and _is_sha256(digest)):
            out.append(problem("allowed_tasks", list(policy.allowed_tasks),
                               f"{toml_value(entry)} is not name@sha256 (a task name, @, 64 hex digits)",
                               "copy the name@sha256 that `spine-fl validate --task FILE` prints"))
    return out


def _is_sha256(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def allowed_task_hashes(policy: SitePolicy) -> dict[str, list[str]]:
    """name -> the SHA-256 of each definition of it this site approves (a bare name: the shipped file's)."""
    out: dict[str, list[str]] = {}
    for entry in policy.allowed_tasks:
        name, _, digest = entry.partition("@")
        if digest or name in SHIPPED_SHA256:
            out.setdefault(name, []).append(digest or SHIPPED_SHA256[name])
    return out


def task_refusal(policy: SitePolicy, run: RunSettings) -> Refusal | None:
    """Rule allowed_tasks: the run's task, by name and by the SHA-256 of the definition it carries."""
    allowed = allowed_task_hashes(policy).get(run.task, [])
    got = run.task_sha256
    if got in allowed:
        return None
    if not allowed:
        return Refusal("allowed_tasks", f"task {run.task} (sha256 {got}) is not in this site's allowed_tasks "
                       f"({', '.join(policy.allowed_tasks)})")
    return Refusal("allowed_tasks", f"task {run.task} arrived with definition sha256 {got}, but this site allows "
                   f"{run.task} only with sha256 {', '.join(allowed)}: the coordinator's task definition is not the "
                   f"one this site approved. Compare the task files; to accept this one, add "
                   f"\"{run.task}@{got}\" to allowed_tasks")


def _budget_problems(policy: SitePolicy) -> list[str]:
    out = [problem(key, getattr(policy, key), "must be a finite number above 0", f"set {key} to {what}")
           for key, what in (("epsilon_lifetime", "the privacy budget per dataset over every run, e.g. 20.0"),
                             ("epsilon_per_run", "the privacy budget one run may spend, e.g. 12.0"))
           if not (math.isfinite(getattr(policy, key)) and getattr(policy, key) > 0)]
    if policy.max_delta is not None and not 0 < policy.max_delta < 1:
        out.append(problem("max_delta", policy.max_delta, "must be above 0 and below 1",
                           "set max_delta to the largest delta this site trains at, e.g. 1e-5, or leave it out "
                           "to use 1 / (10 n)"))
    if not (math.isfinite(policy.min_noise_multiplier) and policy.min_noise_multiplier >= 0):
        out.append(problem("min_noise_multiplier", policy.min_noise_multiplier, "must be 0 or more",
                           "set min_noise_multiplier to the least DP noise this site accepts, e.g. 0.5"))
    share = policy.max_missing_image_share
    if not (isinstance(share, (int, float)) and not isinstance(share, bool) and math.isfinite(share)
            and 0 <= share <= 1):
        out.append(problem("max_missing_image_share", share, "must be a number from 0 to 1",
                           "set max_missing_image_share to the largest share of this site's patients that may be "
                           "excluded for missing or unreadable images, e.g. 0.2, or leave it out (1.0: exclude "
                           "them with a warning whatever the share)"))
    return out


_COUNTS = {
    "max_rounds": "the most rounds a run may have, e.g. 100",
    "max_local_epochs": "the most local epochs per round, e.g. 10",
    "min_eval_patients": "the held-out patients needed before metrics leave, e.g. 20",
    "min_eval_per_class": "the held-out patients of each class needed before metrics leave, e.g. 5",
    "max_evaluations": "the releases of held-out metrics per dataset, e.g. 2000",
}


def _count_problems(policy: SitePolicy) -> list[str]:
    return [problem(key, getattr(policy, key), "must be 0 or more", f"set {key} to {what}")
            for key, what in _COUNTS.items() if getattr(policy, key) < 0]


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


def _percent(share: float) -> str:
    text = f"{100 * share:.1f}".rstrip("0").rstrip(".")
    return f"{text} %"


def missing_images_refusal(policy: SitePolicy, excluded: int, patients: int) -> Refusal | None:
    """Rule max_missing_image_share: too many of the site's patients excluded for missing or unreadable
    images (an image task; `excluded` of its `patients`) and the site does not take part."""
    if patients <= 0 or excluded <= 0:
        return None
    share = excluded / patients
    limit = policy.max_missing_image_share
    if share <= limit:
        return None
    return Refusal("max_missing_image_share",
                   f"{excluded} of this site's {patients} patients ({_percent(share)}) are excluded because a "
                   f"required image is missing or unreadable, more than the site policy's max_missing_image_share "
                   f"{limit:g} ({_percent(limit)}); restore the missing images (`spine-fl validate` lists each "
                   "patient and file), or raise max_missing_image_share in the site's policy")


def rule_violations(policy: SitePolicy, run: RunSettings, secagg_in_use: bool) -> list[Refusal]:
    """Static rules: checked for every message before anything is computed on the data."""
    out = []
    task = task_refusal(policy, run)
    if task is not None:
        out.append(task)
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
