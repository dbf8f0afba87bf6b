"""The site's answer to the coordinator's pre-flight (shared/protocol.py, "Pre-flight").

Before a round, the coordinator asks every site whether it will take part; the site runs the very
checks it runs before training (round_checks.decide_round), without training or charging, and
answers with a refusal or with READY, the fingerprint of its ledger-signing key and its privacy
ledger's head. So a round that too few sites can afford ends before anyone spends epsilon, and the
coordinator can hold each site to the key it pinned and the head it last recorded.
"""

from __future__ import annotations

import json
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict

from spine_fl.client.privacy.privacy_ledger import PrivacyLedger
from spine_fl.client.privacy.round_checks import decide_round, refuse
from spine_fl.client.privacy.signed_log import site_key_fingerprint
from spine_fl.client.site_config import Site
from spine_fl.shared import protocol
from spine_fl.shared.config import ConfigError, RunSettings, run_key_of
from spine_fl.shared.refusal import Refusal


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
    answer: dict[str, Any] = {protocol.SITE: site.name, protocol.READY: 1,
                              protocol.LEDGER_KEY: site_key_fingerprint(site.state_dir)}
    if decision.assessed is not None:
        lines, sha = PrivacyLedger(site.state_dir, decision.assessed.dataset).log.last()
        if lines:
            answer |= {protocol.LEDGER_DATASET: decision.assessed.dataset, protocol.LEDGER_LINES: lines,
                       protocol.LEDGER_SHA256: sha}
    return Message(RecordDict({protocol.PREFLIGHT_REPLY: ConfigRecord(answer)}), reply_to=msg)
