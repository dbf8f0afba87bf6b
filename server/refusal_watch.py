"""See every site reply the workflows receive, so refusals are logged whichever workflow ran.

SecAgg+ treats a refusing site as a dropout and never hands the reply to the strategy; wrapping
the Grid (which every Flower workflow uses to talk to sites) is the one place that sees them all.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from flwr.app import Message
from flwr.serverapp import Grid

from spine_fl.shared.refusal import Refusal


class RefusalWatchingGrid:
    def __init__(self, grid: Grid, on_refusal: Callable[[int | None, dict[str, Any]], None]):
        self._grid = grid
        self._on_refusal = on_refusal

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            if reply.has_error():
                refusal = Refusal.parse(reply.error.reason or "")
                if refusal is not None:
                    group = reply.metadata.group_id
                    self._on_refusal(int(group) if group.isdigit() else None,
                                     {**refusal, "kind": reply.metadata.message_type})
        return replies
