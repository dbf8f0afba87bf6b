"""The site's answer to the coordinator's pre-flight (shared/protocol.py, "Pre-flight").

Before a round, the coordinator asks every site whether it will take part; the site runs the very
checks it runs before training (round_checks.decide_round), without training or charging, and
answers with a refusal or with READY, the fingerprint of its ledger-signing key and its privacy
ledger's head. So a round that too few sites can afford ends before anyone spends epsilon, and the
coordinator can hold each site to the key it pinned and the head it last recorded.

A fingerprint alone is only a claim: anyone can copy it. So the answer also carries the public key
and a signature by the ledger key over the run key, the round and the fresh nonce the coordinator
sent (with the answer's own fields): only the holder of the pinned key can make it, and it is good
for that one request only. The signed statement has a "context" field no ledger line or head has,
so the site's key signs nothing here that could pass for a ledger line.
"""

from __future__ import annotations

import json
import re
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict

from spine_fl.client.privacy.privacy_ledger import PrivacyLedger
from spine_fl.client.privacy.round_checks import decide_round, refuse
from spine_fl.client.privacy.signed_log import canonical, load_or_create_key
from spine_fl.client.site_config import Site
from spine_fl.shared import protocol
from spine_fl.shared.config import ConfigError, RunSettings, run_key_of
from spine_fl.shared.refusal import Refusal
from spine_fl.shared.runtime.credentials import key_fingerprint

NONCE = re.compile(r"[0-9a-f]{32}")


def signed_statement(answer: dict[str, Any], run_key: str, server_round: int, nonce: str) -> bytes:
    """What the pre-flight signature covers (shared/protocol.py, "Pre-flight"); the coordinator
    rebuilds it from what it sent and the fields the answer carries."""
    return canonical({"context": protocol.PREFLIGHT_CONTEXT, protocol.RUN_KEY: run_key, protocol.ROUND: server_round,
                      protocol.PREFLIGHT_NONCE: nonce, **{k: answer.get(k) for k in protocol.PREFLIGHT_SIGNED}})


def is_preflight(msg: Message) -> bool:
    return msg.has_content() and protocol.PREFLIGHT in msg.content.config_records


def _own_head(config: dict[str, Any], site: str) -> dict[str, Any] | None:
    try:
        heads = json.loads(str(config.get(protocol.LEDGER_HEADS, "{}")))
    except json.JSONDecodeError:
        heads = {"": "unreadable"}
    head = heads.get(site) if isinstance(heads, dict) else "unreadable"
    return head if head is None or isinstance(head, dict) else {"unreadable": head}


def answer_preflight(msg: Message, site: Site, run_id: str) -> Message:
    config = dict(msg.content.config_records[protocol.PREFLIGHT])
    try:
        run = RunSettings.from_run_config(config)
    except (ConfigError, TypeError, ValueError) as exc:
        return refuse(msg, site, Refusal("run_config", f"the run's settings are invalid: {exc}"))
    decision = decide_round(site, run, run_key_of(config, run_id), int(config.get(protocol.ROUND, 0)),
                            secagg_in_use=run.secagg, training=True,
                            coordinator_head=_own_head(config, site.name))
    if decision.refusal is not None:
        return refuse(msg, site, decision.refusal)
    key = load_or_create_key(site.state_dir)
    public = key.public_key()
    answer: dict[str, Any] = {protocol.SITE: site.name, protocol.READY: 1, protocol.LEDGER_KEY: key_fingerprint(public),
                              protocol.LEDGER_PUBLIC_KEY: public.public_bytes_raw().hex()}
    if decision.assessed is not None:
        lines, sha = PrivacyLedger(site.state_dir, decision.assessed.dataset).log.last()
        if lines:
            answer |= {protocol.LEDGER_DATASET: decision.assessed.dataset, protocol.LEDGER_LINES: lines,
                       protocol.LEDGER_SHA256: sha}
    nonce = str(config.get(protocol.PREFLIGHT_NONCE, ""))
    if NONCE.fullmatch(nonce):  # without a well-formed nonce nothing is signed (the coordinator leaves it out)
        signature = key.sign(signed_statement(answer, run_key_of(config, run_id), int(config.get(protocol.ROUND, 0)),
                                              nonce))
        answer |= {protocol.PREFLIGHT_SIGNATURE_R: signature[:32].hex(), protocol.PREFLIGHT_SIGNATURE_S: signature[32:].hex()}
    return Message(RecordDict({protocol.PREFLIGHT_REPLY: ConfigRecord(answer)}), reply_to=msg)
