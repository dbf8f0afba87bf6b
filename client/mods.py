"""Site-side concerns as Flower client mods, composed in one visible list in client/app.py:

    egress ledger  ->  site policy and budget  ->  SecAgg+ (only on SecAgg+ rounds)  ->  training

The egress ledger is outermost so that it records every reply, refusals included, before it leaves.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable, Sequence

from flwr.app import Context, Error, Message
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable, Mod

from spine_fl.shared.config import ConfigError, RunSettings, run_key_of
from spine_fl.shared.privacy_accounting import epsilon
from spine_fl.shared.refusal import REFUSAL_CODE, Refusal

from .egress_ledger import EgressLedger
from .egress_record import SECAGG_CONFIGS, describe
from .policy import rule_violations
from .privacy_ledger import PrivacyLedger, dataset_id
from .privacy_plan import plan_round
from .site_config import Site
from .site_data import resolve_site, site_data

SiteResolver = Callable[[Context], Site]


def run_config_of(msg: Message) -> dict | None:
    """The coordinator's run settings carried by a legacy fit/evaluate instruction, if any."""
    for key in ("fitins.config", "evaluateins.config"):
        if key in msg.content.config_records:
            return dict(msg.content.config_records[key])
    return None


def message_kind(msg: Message) -> str:
    """The message type, with the SecAgg+ stage (read before secaggplus_mod consumes it)."""
    secagg = msg.content.config_records.get(SECAGG_CONFIGS) if msg.has_content() else None
    stage = str(secagg.get("stage", "")) if secagg is not None else ""
    return msg.metadata.message_type + (f"/secagg+{stage}" if stage else "")


def record_egress(site: Site, run_id: str, msg: Message, kind: str, reply: Message) -> None:
    """Append what `reply` carries out of the site to the signed egress ledger (before it leaves)."""
    desc = describe(reply)
    EgressLedger(site.state_dir).append({
        "time": time.time(),
        "run_id": run_id,
        "round": int(msg.metadata.group_id) if msg.metadata.group_id.isdigit() else None,
        "kind": kind,
        **desc,
        "epsilon": desc["metrics"].get("fitres.metrics/epsilon_lifetime"),
    })


def make_egress_ledger_mod(resolve: SiteResolver) -> Mod:
    def egress_ledger_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        kind = message_kind(msg)
        reply = call_next(msg, ctxt)
        record_egress(resolve(ctxt), str(ctxt.run_id), msg, kind, reply)
        return reply

    return egress_ledger_mod


def refuse(msg: Message, site: Site, refusal: Refusal) -> Message:
    reason = replace(refusal, site=site.name).to_reason()
    return Message(Error(code=REFUSAL_CODE, reason=reason), reply_to=msg)


def make_site_policy_mod(resolve: SiteResolver) -> Mod:
    """Refuse, before any computation on the data, what the site's policy or budget forbids."""

    def site_policy_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        config = run_config_of(msg) if msg.has_content() else None
        if config is None:
            return call_next(msg, ctxt)  # SecAgg+ key-exchange stages carry no instruction
        site = resolve(ctxt)
        try:
            run = RunSettings.from_run_config(config)
        except (ConfigError, TypeError, ValueError) as exc:
            return refuse(msg, site, Refusal("run_config", f"the run's settings are invalid: {exc}"))
        training = msg.metadata.message_type == MessageType.TRAIN
        violations = rule_violations(site.policy, run, SECAGG_CONFIGS in msg.content.config_records or not training)
        if violations:
            return refuse(msg, site, violations[0])
        if training and run.dp:
            refusal = budget_refusal(site, run, run_key_of(config, str(ctxt.run_id)))
            if refusal is not None:
                return refuse(msg, site, refusal)
        return call_next(msg, ctxt)

    return site_policy_mod


def budget_refusal(site: Site, run: RunSettings, run_id: str) -> Refusal | None:
    """Would this round take epsilon over the lifetime or the per-run budget?"""
    data = site_data(site, run.task, run.image_size)
    plan = plan_round(run, int((data.split == "train").sum()))
    if plan.noise_multiplier < site.policy.min_noise_multiplier:
        return Refusal("min_noise_multiplier", f"the run's target epsilon needs noise multiplier "
                       f"{plan.noise_multiplier:.3f}, below this site's minimum {site.policy.min_noise_multiplier:g}")
    ledger = PrivacyLedger(site.state_dir, dataset_id(site.data_dir))
    lifetime, this_run = ledger.history(), ledger.history(run_id)
    nxt = [(plan.noise_multiplier, plan.round_spend.sample_rate, plan.round_spend.steps)]
    for rule, history, budget in (("epsilon_lifetime", lifetime, site.policy.epsilon_lifetime),
                                  ("epsilon_per_run", this_run, site.policy.epsilon_per_run)):
        spent = epsilon(history, plan.delta, run.accountant)
        after = epsilon([*history, *nxt], plan.delta, run.accountant)
        if after > budget:
            return Refusal(rule, f"training this round would raise epsilon to {after:.3f}, over the "
                           f"{rule.replace('_', ' ')} budget {budget:g} (spent so far {spent:.3f})",
                           epsilon_spent=round(spent, 6), epsilon_after=round(after, 6), budget=budget)
    return None


def secagg_if_requested_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Flower's secaggplus_mod, applied only to SecAgg+ messages (it raises on any other train message)."""
    if msg.has_content() and SECAGG_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


def site_mods(sites: Sequence[Site] | None) -> list[Mod]:
    def resolve(ctxt: Context) -> Site:
        return resolve_site(ctxt, sites)

    return [make_egress_ledger_mod(resolve), make_site_policy_mod(resolve), secagg_if_requested_mod]
