"""The checks a site makes before a round, in one place: before training (the site-policy mod) and
when the coordinator asks ahead (the pre-flight, client/privacy/preflight.py) they must agree.

In order: the site's policy rules; for an image task, the share of the site's patients excluded for
missing or unreadable images (policy max_missing_image_share); then, for a DP training round, the
delta the site allows for its training-set size; the privacy ledger (intact, not deleted, holding
the head the coordinator recorded); a round already charged only as a replay of the kept reply; the
lifetime and per-run budgets.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

from flwr.app import Error, Message

from spine_fl.client.privacy.charged_rounds import keeps_reply
from spine_fl.client.privacy.policy import delta_refusal, missing_images_refusal, rule_violations
from spine_fl.client.privacy.privacy_ledger import PrivacyLedgerError
from spine_fl.client.privacy.round_privacy import RoundPrivacy, assess_round, check_coordinator_head
from spine_fl.client.site_config import Site
from spine_fl.client.site_data import site_data
from spine_fl.shared.config import RunSettings
from spine_fl.shared.contract.data_contract import SiteDataError
from spine_fl.shared.contract.tasks import get_task
from spine_fl.shared.protocol import REFUSAL_CODE
from spine_fl.shared.refusal import Refusal

log = logging.getLogger("spine_fl.client")


@dataclass(frozen=True)
class RoundDecision:
    refusal: Refusal | None = None
    assessed: RoundPrivacy | None = None  # a DP training round the site will take part in


def decide_round(site: Site, run: RunSettings, run_key: str, server_round: int, secagg_in_use: bool,
                 training: bool, coordinator_head: dict[str, Any] | None = None) -> RoundDecision:
    violations = rule_violations(site.policy, run, secagg_in_use)
    if violations:
        return RoundDecision(violations[0])
    if get_task(run.task).image is not None:  # (loaded once per process: the round uses these arrays)
        try:
            data = site_data(site, run.task, run.image_size)
        except SiteDataError:
            if training and run.dp:
                raise
            return RoundDecision()  # unusable data fail the round where they always did, with every error
        refusal = missing_images_refusal(site.policy, data.images_missing, data.patients_listed)
        if refusal is not None:
            log.error("spine-fl: %s refuses: %s", site.name, refusal.message)
            return RoundDecision(refusal)
    if not (training and run.dp):
        return RoundDecision()
    data = site_data(site, run.task, run.image_size)
    n_train = int((data.split == "train").sum())
    refusal = delta_refusal(site.policy, run, n_train)
    if refusal is not None:
        return RoundDecision(refusal)
    try:
        if coordinator_head:
            check_coordinator_head(site.state_dir, coordinator_head)
        assessed = assess_round(site, run, run_key, server_round, n_train)
    except PrivacyLedgerError as exc:  # the spent budget cannot be established: never train
        log.error("spine-fl: %s refuses to train: %s", site.name, exc)
        return RoundDecision(ledger_refusal(exc))
    if assessed.replay:
        if not keeps_reply(site.state_dir, run_key, server_round):
            return RoundDecision(Refusal(
                "round_already_charged", f"round {server_round} of run {run_key} is already charged in this site's "
                "privacy ledger and the reply it sent is not kept; training it again would spend epsilon twice"))
        return RoundDecision(assessed=assessed)
    refusal = budget_refusal(site, run, assessed)
    return RoundDecision(refusal, None if refusal else assessed)


def refuse(msg: Message, site: Site, refusal: Refusal) -> Message:
    reason = replace(refusal, site=site.name).to_reason()
    return Message(Error(code=REFUSAL_CODE, reason=reason), reply_to=msg)


def ledger_refusal(exc: PrivacyLedgerError) -> Refusal:
    """Rule privacy_ledger: the ledger does not verify, cannot be read, was deleted or rolled back."""
    return Refusal("privacy_ledger", str(exc), epsilon_spent=getattr(exc, "epsilon_spent", None),
                   delta=getattr(exc, "delta", None))


@dataclass(frozen=True)
class OverBudget:
    """A budget the assessed spend would exceed: which, the epsilon it would reach, the budget."""

    rule: str  # epsilon_lifetime or epsilon_per_run
    after: float
    budget: float
    per_run: bool


def over_budget(site: Site, assessed: RoundPrivacy) -> OverBudget | None:
    """The first budget (lifetime, then per run) that spending the assessed round would exceed: the one
    check of every spend, a DP-SGD round (budget_refusal) or the recalibration release (client/calibration.py)."""
    for rule, after, budget, per_run in (
            ("epsilon_lifetime", assessed.epsilon_lifetime_after, site.policy.epsilon_lifetime, False),
            ("epsilon_per_run", assessed.epsilon_run_after, site.policy.epsilon_per_run, True)):
        if after > budget:
            return OverBudget(rule, after, budget, per_run)
    return None


def budget_refusal(site: Site, run: RunSettings, assessed: RoundPrivacy) -> Refusal | None:
    """Would this round take epsilon over the lifetime or the per-run budget?"""
    plan = assessed.plan
    if plan.noise_multiplier < site.policy.min_noise_multiplier:
        return Refusal("min_noise_multiplier", f"the run's target epsilon needs noise multiplier "
                       f"{plan.noise_multiplier:.3f}, below this site's minimum {site.policy.min_noise_multiplier:g}")
    over = over_budget(site, assessed)
    if over is None:
        return None
    spent = assessed.epsilon_spent(run.accountant, site, over.per_run)
    return Refusal(over.rule, f"training this round would raise epsilon to {over.after:.3f}, over the "
                   f"{over.rule.replace('_', ' ')} budget {over.budget:g} (spent so far {spent:.3f}; "
                   f"delta {plan.delta:.3g})",
                   epsilon_spent=round(spent, 6), epsilon_after=round(over.after, 6), budget=over.budget,
                   delta=plan.delta)
