"""See every site reply the workflows receive, so refusals and dropouts are logged whichever
workflow ran, and talk only to enrolled sites.

SecAgg+ treats a refusing or vanished site as a dropout and never hands the reply to the strategy;
wrapping the Grid (which every Flower workflow uses to talk to sites) is the one place that sees
them all. In deployment the Grid also lists only the SuperNodes registered from the enrolled keys.
It also bounds every wait for replies (`reply_wait_seconds`): Flower's fit and evaluation workflows
wait without limit, so a site that stays connected but never answers would stall the run forever.
Such a site is waited for once: until its late reply to that request reaches the coordinator, it
is left out of the requests that follow (a dropout of each) instead of costing every later
request another `reply_wait_seconds` (five per round: half an hour each by default).
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

from flwr.app import Message
from flwr.serverapp import Grid

from spine_fl.server.strategy import RoundLog
from spine_fl.shared.refusal import Refusal

logger = logging.getLogger("spine_fl.server")


class WatchingGrid:
    def __init__(self, grid: Grid, log: RoundLog, node_sites: dict[int, str] | None = None, offset: int = 0,
                 reply_wait_seconds: float | None = None):
        self._grid = grid
        self._reply_wait = reply_wait_seconds
        self._log = log
        self._node_sites = node_sites
        self._offset = offset
        self._unanswered: dict[int, tuple[str, int | None]] = {}  # node -> (its unanswered request's id, round)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def get_node_ids(self) -> Iterable[int]:
        ids = self._grid.get_node_ids()
        return [i for i in ids if i in self._node_sites] if self._node_sites is not None else ids

    def _site(self, node_id: int) -> str:
        return (self._node_sites or {}).get(node_id, f"node {node_id}")

    def _round(self, message: Message) -> int | None:
        group = message.metadata.group_id
        return int(group) + self._offset if group.isdigit() else None

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        self._readmit_late_repliers()
        sent = []
        for message in messages:
            node = message.metadata.dst_node_id
            if node in self._unanswered:
                self._log.record_dropout(self._round(message), self._site(node), message.metadata.message_type,
                                         unanswered_since_round=self._unanswered[node][1])
            else:
                sent.append(message)
        if self._reply_wait is not None:
            timeout = self._reply_wait if timeout is None else min(timeout, self._reply_wait)
        replies = list(self._grid.send_and_receive(sent, timeout=timeout)) if sent else []
        answered = {r.metadata.src_node_id for r in replies}
        for message in sent:
            node = message.metadata.dst_node_id
            if node not in answered:
                self._log.record_dropout(self._round(message), self._site(node), message.metadata.message_type)
                if message.metadata.message_id:  # pushed: its late reply would be stored under this id
                    self._unanswered[node] = (message.metadata.message_id, self._round(message))
        for reply in replies:
            if reply.has_error():
                refusal = Refusal.parse(reply.error.reason or "")
                if refusal is not None:
                    self._log.record_refusal(self._round(reply), {**refusal, "kind": reply.metadata.message_type})
        return replies

    def _readmit_late_repliers(self) -> None:
        """A late reply (or an error the SuperLink stored for that request) shows the site is back;
        the reply itself answers a request that is over, so it is dropped."""
        if not self._unanswered:
            return
        waiting = {message_id: node for node, (message_id, _) in self._unanswered.items()}
        for reply in self._grid.pull_messages(list(waiting)):
            node = waiting.get(reply.metadata.reply_to_message_id)
            if node is not None and node in self._unanswered:
                since = self._unanswered.pop(node)[1]
                how = (f"ended with an error ({reply.error.reason})" if reply.has_error()
                       else "was answered late")
                logger.info("spine-fl: site %s: its request of round %s %s; it is asked again", self._site(node),
                            since, how)
