"""The coordinator's pre-flight: before a round's training, ask every selected site whether it will
take part (shared/protocol.py, "Pre-flight"), and send the round only to those that answer ready
with their pinned ledger key. When fewer than min_sites are left the run ends here, before anyone
trains, so nobody spends epsilon on a round that would be thrown away.

Each request carries a fresh nonce (one per site and request); a ready answer must carry a signature
by the site's ledger key over the run key, the round and that nonce (CoordinatorRecord.preflight_problem).
A forged fingerprint, a reply signed by another key or one replayed from an earlier pre-flight is
treated like a wrong key: the site is left out of the round, and that is recorded.

Refusals and silent sites are logged by the WatchingGrid the message goes through (it sees every
reply); a wrong or unproven key is the coordinator's own refusal, logged here.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import FitIns
from flwr.server.client_proxy import ClientProxy

from spine_fl.server.coordinator_record import CoordinatorRecord
from spine_fl.shared import protocol

if TYPE_CHECKING:
    from spine_fl.server.strategy import RoundLog

PREFLIGHT_TIMEOUT = 300.0  # seconds a site has to answer (it reads its ledger; it loads its data once)


def _grid(instructions: list[tuple[ClientProxy, FitIns]]) -> Any:
    """The Grid the legacy client proxies talk through (the WatchingGrid in spine-fl's ServerApp)."""
    return instructions[0][0].grid  # type: ignore[attr-defined]


def preflight(instructions: list[tuple[ClientProxy, FitIns]], server_round: int, absolute_round: int,
              record: CoordinatorRecord, log: "RoundLog") -> list[tuple[ClientProxy, FitIns]]:
    """The instructions of the sites that will take part; [] (and the run stopped) when too few will."""
    heads = record.heads()
    nonces = {proxy.node_id: secrets.token_hex(16) for proxy, _ in instructions}  # type: ignore[attr-defined]
    sent = {proxy.node_id: ins.config for proxy, ins in instructions}  # type: ignore[attr-defined]
    messages = [Message(RecordDict({protocol.PREFLIGHT: ConfigRecord({
                    **ins.config, protocol.LEDGER_HEADS: heads,
                    protocol.PREFLIGHT_NONCE: nonces[proxy.node_id]})}),  # type: ignore[attr-defined]
                        dst_node_id=proxy.node_id,  # type: ignore[attr-defined]
                        message_type=MessageType.QUERY, group_id=str(server_round))
               for proxy, ins in instructions]
    ready: set[int] = set()
    for reply in _grid(instructions).send_and_receive(messages, timeout=PREFLIGHT_TIMEOUT):
        answer = None if reply.has_error() else reply.content.config_records.get(protocol.PREFLIGHT_REPLY)
        if answer is None or not answer.get(protocol.READY):
            continue  # a refusal or an error: the WatchingGrid logged it
        node = reply.metadata.src_node_id
        site = str(answer.get(protocol.SITE, "?"))
        config = sent.get(node)
        problem = (f"{site}'s pre-flight reply came from node {node}, which was not asked" if config is None else
                   record.preflight_problem(site, dict(answer), str(config.get(protocol.RUN_KEY, "")),
                                            int(config.get(protocol.ROUND, 0)), nonces[node]))
        if problem:
            log.record_refusal(absolute_round, {"site": site, "rule": "ledger_key", "message": problem,
                                                "by": "coordinator"})
            continue
        ready.add(node)
    chosen = [(proxy, ins) for proxy, ins in instructions if proxy.node_id in ready]  # type: ignore[attr-defined]
    if len(chosen) < log.min_sites:
        log.stop(f"round {absolute_round}: only {len(chosen)} site(s) can take part (pre-flight), fewer than "
                 f"min_sites = {log.min_sites}; the run ends before anyone trains in this round")
        return []
    return chosen
