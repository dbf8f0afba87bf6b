"""The coordinator's pre-flight: before a round's training, ask every selected site whether it will
take part (shared/protocol.py, "Pre-flight"), and send the round only to those that answer ready
with their pinned ledger key. When fewer than min_sites are left the run ends here, before anyone
trains, so nobody spends epsilon on a round that would be thrown away. In a SecAgg+ round the
question rides on the setup stage's messages (server/secure_aggregation.py), which come before
any training; otherwise it is an exchange of its own.

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


class PreflightRequest:
    """One round's pre-flight: the record each selected site is sent (with its own fresh nonce) and
    the judgement of the answers. Sent on its own (`preflight`) or, in a SecAgg+ round, inside the
    setup stage's messages (server/secure_aggregation.py): one exchange fewer per round."""

    def __init__(self, instructions: list[tuple[ClientProxy, FitIns]], server_round: int, absolute_round: int,
                 record: CoordinatorRecord, log: "RoundLog"):
        self.instructions, self.server_round, self.absolute_round = instructions, server_round, absolute_round
        self.record, self.log = record, log
        self.nonces = {proxy.node_id: secrets.token_hex(16) for proxy, _ in instructions}  # type: ignore[attr-defined]
        self.sent = {proxy.node_id: ins.config for proxy, ins in instructions}  # type: ignore[attr-defined]
        self._heads = record.heads()

    def record_for(self, node_id: int) -> ConfigRecord:
        return ConfigRecord({**self.sent[node_id], protocol.LEDGER_HEADS: self._heads,
                             protocol.PREFLIGHT_NONCE: self.nonces[node_id]})

    def ready(self, reply: Message) -> bool:
        """Whether `reply` is a ready answer that proves the pinned key; a wrong or unproven key is
        recorded as the coordinator's refusal (refusals and silence are logged by the WatchingGrid)."""
        answer = None if reply.has_error() else reply.content.config_records.get(protocol.PREFLIGHT_REPLY)
        if answer is None or not answer.get(protocol.READY):
            return False
        node = reply.metadata.src_node_id
        site = str(answer.get(protocol.SITE, "?"))
        config = self.sent.get(node)
        problem = (f"{site}'s pre-flight reply came from node {node}, which was not asked" if config is None else
                   self.record.preflight_problem(site, dict(answer), str(config.get(protocol.RUN_KEY, "")),
                                                 int(config.get(protocol.ROUND, 0)), self.nonces[node]))
        if problem:
            self.log.record_refusal(self.absolute_round, {"site": site, "rule": "ledger_key", "message": problem,
                                                          "by": "coordinator"})
            return False
        return True

    def enough(self, ready: int) -> bool:
        """Whether `ready` sites reach min_sites; if not, the run stops here, before anyone trains."""
        if ready >= self.log.min_sites:
            return True
        self.log.stop(f"round {self.absolute_round}: only {ready} site(s) can take part (pre-flight), fewer than "
                      f"min_sites = {self.log.min_sites}; the run ends before anyone trains in this round")
        return False


def preflight(request: PreflightRequest) -> list[tuple[ClientProxy, FitIns]]:
    """The pre-flight as an exchange of its own (rounds without SecAgg+): the instructions of the
    sites that will take part; [] (and the run stopped) when too few will."""
    instructions = request.instructions
    messages = [Message(RecordDict({protocol.PREFLIGHT: request.record_for(proxy.node_id)}),  # type: ignore[attr-defined]
                        dst_node_id=proxy.node_id,  # type: ignore[attr-defined]
                        message_type=MessageType.QUERY, group_id=str(request.server_round))
                for proxy, _ in instructions]
    replies = _grid(instructions).send_and_receive(messages, timeout=PREFLIGHT_TIMEOUT)
    ready = {reply.metadata.src_node_id for reply in replies if request.ready(reply)}
    chosen = [(proxy, ins) for proxy, ins in instructions if proxy.node_id in ready]  # type: ignore[attr-defined]
    return chosen if request.enough(len(chosen)) else []
