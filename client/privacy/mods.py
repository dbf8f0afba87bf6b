"""Site-side concerns as Flower client mods, composed in one visible list in client/app.py:

    egress ledger  ->  site policy and budget  ->  SecAgg+ (only on SecAgg+ rounds)  ->  training

The egress ledger is outermost so that it records every reply, refusals included, before it leaves;
when anything inside raises, it builds the error reply Flower would have built, records it and
returns it, so that no reply leaves unrecorded.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Callable, Sequence

from flwr.app import Context, Error, Message
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.constant import ErrorCode

from spine_fl.client.privacy.egress_ledger import EgressLedger
from spine_fl.client.privacy.egress_record import describe
from spine_fl.client.privacy.policy import delta_refusal, rule_violations
from spine_fl.client.privacy.privacy_ledger import PrivacyLedgerError
from spine_fl.client.privacy.round_privacy import RoundPrivacy, assess_round, hand_over
from spine_fl.client.site_config import Site
from spine_fl.client.site_data import resolve_site, site_data
from spine_fl.shared import protocol
from spine_fl.shared.config import ConfigError, RunSettings, run_key_of
from spine_fl.shared.protocol import REFUSAL_CODE, SECAGG_CONFIGS
from spine_fl.shared.refusal import Refusal

SiteResolver = Callable[[Context], Site]
log = logging.getLogger("spine_fl.client")


def run_config_of(msg: Message) -> dict | None:
    """The coordinator's run settings carried by a legacy fit/evaluate instruction, if any."""
    for key in protocol.INSTRUCTION_RECORDS:
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
        "site": site.name,
        "run_id": run_id,
        "round": int(msg.metadata.group_id) if msg.metadata.group_id.isdigit() else None,
        "kind": kind,
        **desc,
        "epsilon": desc["metrics"].get(protocol.fit_metric(protocol.EPSILON_LIFETIME)),
        "delta": desc["metrics"].get(protocol.fit_metric(protocol.DELTA)),  # the delta that epsilon is at
    })


def exception_reply(msg: Message, exc: Exception) -> Message:
    """The error reply Flower builds for a ClientApp that raised (flwr.supernode.runtime.run_clientapp)."""
    reason = str(type(exc)) + ":<'" + str(exc) + "'>"
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)


def make_egress_ledger_mod(resolve: SiteResolver) -> Mod:
    def egress_ledger_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        kind = message_kind(msg)
        site = resolve(ctxt)
        try:
            reply = call_next(msg, ctxt)
        except Exception as exc:  # noqa: BLE001 - Flower would send it as an error reply, unrecorded
            log.exception("spine-fl: %s %s failed; the error reply is recorded and sent", site.name, kind)
            reply = exception_reply(msg, exc)
        record_egress(site, str(ctxt.run_id), msg, kind, reply)
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
            data = site_data(site, run.task, run.image_size)
            n_train = int((data.split == "train").sum())
            refusal = delta_refusal(site.policy, run, n_train)
            if refusal is not None:
                return refuse(msg, site, refusal)
            try:
                assessed = assess_round(site, run, run_key_of(config, str(ctxt.run_id)),
                                        int(config.get(protocol.ROUND, 0)), n_train)
                refusal = budget_refusal(site, run, assessed)
            except PrivacyLedgerError as exc:  # the spent budget cannot be established: never train
                log.error("spine-fl: %s refuses to train: %s", site.name, exc)
                return refuse(msg, site, ledger_refusal(exc))
            if refusal is not None:
                return refuse(msg, site, refusal)
            hand_over(ctxt, assessed)
        return call_next(msg, ctxt)

    return site_policy_mod


def ledger_refusal(exc: PrivacyLedgerError) -> Refusal:
    """Rule privacy_ledger: the ledger does not verify, cannot be read, or was deleted."""
    return Refusal("privacy_ledger", str(exc), epsilon_spent=getattr(exc, "epsilon_spent", None),
                   delta=getattr(exc, "delta", None))


def budget_refusal(site: Site, run: RunSettings, assessed: RoundPrivacy) -> Refusal | None:
    """Would this round take epsilon over the lifetime or the per-run budget?"""
    plan = assessed.plan
    if plan.noise_multiplier < site.policy.min_noise_multiplier:
        return Refusal("min_noise_multiplier", f"the run's target epsilon needs noise multiplier "
                       f"{plan.noise_multiplier:.3f}, below this site's minimum {site.policy.min_noise_multiplier:g}")
    for rule, after, budget, per_run in (
            ("epsilon_lifetime", assessed.epsilon_lifetime_after, site.policy.epsilon_lifetime, False),
            ("epsilon_per_run", assessed.epsilon_run_after, site.policy.epsilon_per_run, True)):
        if after > budget:
            spent = assessed.epsilon_spent(run.accountant, site, per_run)
            return Refusal(rule, f"training this round would raise epsilon to {after:.3f}, over the "
                               f"{rule.replace('_', ' ')} budget {budget:g} (spent so far {spent:.3f}; "
                               f"delta {plan.delta:.3g})",
                               epsilon_spent=round(spent, 6), epsilon_after=round(after, 6), budget=budget,
                               delta=plan.delta)
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
