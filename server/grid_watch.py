"""See every site reply the workflows receive, so refusals and dropouts are logged whichever
workflow ran, and talk only to enrolled sites.

SecAgg+ treats a refusing or vanished site as a dropout and never hands the reply to the strategy;
wrapping the Grid (which every Flower workflow uses to talk to sites) is the one place that sees
them all. In deployment the Grid also lists only the SuperNodes registered from the enrolled keys.
It also bounds every wait for replies (`reply_wait_seconds`): Flower's fit and evaluation workflows
wait without limit, so a site that stays connected but never answers would stall the run forever.
"""

from __future__ import annotations

from typing import Any, Iterable

from flwr.app import Message
from flwr.serverapp import Grid

from spine_fl.server.strategy import RoundLog
from spine_fl.shared.refusal import Refusal


class WatchingGrid:
    def __init__(self, grid: Grid, log: RoundLog, node_sites: dict[int, str] | None = None, offset: int = 0,
                 reply_wait_seconds: float | None = None):
        self._grid = grid
        self._reply_wait = reply_wait_seconds
        self._log = log
        self._node_sites = node_sites
        self._offset = offset

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
        sent = list(messages)
        if self._reply_wait is not None:
            timeout = self._reply_wait if timeout is None else min(timeout, self._reply_wait)
        replies = list(self._grid.send_and_receive(sent, timeout=timeout))
        answered = {r.metadata.src_node_id for r in replies}
        for message in sent:
            if message.metadata.dst_node_id not in answered:
                self._log.record_dropout(self._round(message), self._site(message.metadata.dst_node_id),
                                         message.metadata.message_type)
        for reply in replies:
            if reply.has_error():
                refusal = Refusal.parse(reply.error.reason or "")
                if refusal is not None:
                    self._log.record_refusal(self._round(reply), {**refusal, "kind": reply.metadata.message_type})
        return replies
