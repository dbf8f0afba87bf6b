"""Site-side concerns as Flower client mods, composed in one visible list in client/app.py:

    egress ledger  ->  site policy and budget  ->  SecAgg+ (only on SecAgg+ rounds)  ->  training

The egress ledger is outermost so that it records every reply, refusals included, before it leaves;
when anything inside raises, it builds the error reply Flower would have built, records it and
returns it, so that no reply leaves unrecorded.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Sequence

from flwr.app import Context, Error, Message
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.constant import ErrorCode

from spine_fl.client.privacy.charged_rounds import ReplayRefused
from spine_fl.client.privacy.evaluation_budget import EvaluationBudgetRefused
from spine_fl.client.privacy.egress_ledger import EgressLedger
from spine_fl.client.privacy.egress_record import describe
from spine_fl.client.privacy.preflight import answer_preflight, is_preflight
from spine_fl.client.privacy.round_checks import decide_round, refuse
from spine_fl.client.privacy.round_privacy import hand_over
from spine_fl.client.site_config import Site
from spine_fl.client.site_data import resolve_site
from spine_fl.shared import protocol
from spine_fl.shared.config import ConfigError, RunSettings, run_key_of
from spine_fl.shared.protocol import SECAGG_CONFIGS
from spine_fl.shared.refusal import Refusal

SiteResolver = Callable[[Context], Site]
log = logging.getLogger("spine_fl.client")


def run_config_of(msg: Message) -> dict | None:
    """The coordinator's run settings carried by a legacy fit/evaluate instruction, if any."""
    for key in protocol.INSTRUCTION_RECORDS:
        if key in msg.content.config_records:
            return dict(msg.content.config_records[key])
    return None


def secagg_stage(msg: Message) -> str:
    """The SecAgg+ stage a message asks for ("" for any other message)."""
    secagg = msg.content.config_records.get(SECAGG_CONFIGS) if msg.has_content() else None
    return str(secagg.get("stage", "")) if secagg is not None else ""


def is_secagg_setup(msg: Message) -> bool:
    """Flower's SecAgg+ setup message: a train message with no instruction, at stage "setup"."""
    return (secagg_stage(msg) == "setup" and run_config_of(msg) is None
            and msg.metadata.message_type == MessageType.TRAIN)


def message_kind(msg: Message) -> str:
    """The message type, with the SecAgg+ stage (read before secaggplus_mod consumes it)."""
    stage = secagg_stage(msg)
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
        except ReplayRefused as exc:
            log.error("spine-fl: %s refuses: %s", site.name, exc)
            reply = refuse(msg, site, Refusal("round_already_charged", str(exc)))
        except EvaluationBudgetRefused as exc:  # the count of held-out releases cannot be established
            log.error("spine-fl: %s refuses: %s", site.name, exc.refusal.message)
            reply = refuse(msg, site, exc.refusal)
        except Exception as exc:  # noqa: BLE001 - Flower would send it as an error reply, unrecorded
            log.exception("spine-fl: %s %s failed; the error reply is recorded and sent", site.name, kind)
            reply = exception_reply(msg, exc)
        record_egress(site, str(ctxt.run_id), msg, kind, reply)
        return reply

    return egress_ledger_mod


def make_site_policy_mod(resolve: SiteResolver) -> Mod:
    """Refuse, before any computation on the data, what the site's policy or budget forbids; answer
    the coordinator's pre-flight with the same checks (on its own, or inside a SecAgg+ setup message,
    whose key exchange then goes ahead only when the site is ready)."""

    def site_policy_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        if is_preflight(msg):
            answer = answer_preflight(msg, resolve(ctxt), str(ctxt.run_id))
            if answer.has_error() or not is_secagg_setup(msg):
                return answer  # nothing else in the message is acted on: a pre-flight never trains
            # asked in the SecAgg+ setup stage (key generation only): ready, so the setup's reply too
            reply = call_next(msg, ctxt)
            if not reply.has_error():
                reply.content.config_records[protocol.PREFLIGHT_REPLY] = answer.content.config_records[
                    protocol.PREFLIGHT_REPLY]
            return reply
        config = run_config_of(msg) if msg.has_content() else None
        if config is None:
            return call_next(msg, ctxt)  # SecAgg+ key-exchange stages carry no instruction
        site = resolve(ctxt)
        try:
            run = RunSettings.from_run_config(config)
        except (ConfigError, TypeError, ValueError) as exc:
            return refuse(msg, site, Refusal("run_config", f"the run's settings are invalid: {exc}"))
        training = msg.metadata.message_type == MessageType.TRAIN
        decision = decide_round(site, run, run_key_of(config, str(ctxt.run_id)), int(config.get(protocol.ROUND, 0)),
                                SECAGG_CONFIGS in msg.content.config_records or not training, training)
        if decision.refusal is not None:
            return refuse(msg, site, decision.refusal)
        if decision.assessed is not None:
            hand_over(ctxt, decision.assessed)
        return call_next(msg, ctxt)

    return site_policy_mod


def secagg_if_requested_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Flower's secaggplus_mod, applied only to SecAgg+ messages (it raises on any other train message)."""
    if msg.has_content() and SECAGG_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


def site_mods(sites: Sequence[Site] | None) -> list[Mod]:
    def resolve(ctxt: Context) -> Site:
        return resolve_site(ctxt, sites)

    return [make_egress_ledger_mod(resolve), make_site_policy_mod(resolve), secagg_if_requested_mod]
