"""Shorter waits in Flower's deployment polling loops.

Flower 1.41's SuperNode sleeps 3 s whenever it finds no message, and the ServerApp's HttpGrid
sleeps 3 s between polls for replies. A SecAgg+ round is five request/reply exchanges, so these
fixed sleeps alone cost about 30 s a round (measured: 44 s/round on 2 cores for work that takes
about 4 s in simulation). Both loops call `time.sleep` through their module's `time` import;
replacing that name with a clock whose sleep is capped keeps Flower's logic and only shortens the
wait. Applied only in processes spine-fl starts (the coordinator and `spine-fl client`'s SuperNode).
"""

from __future__ import annotations

import time
from types import ModuleType
from typing import Any

DEFAULT_POLL_SECONDS = 0.1


class _CappedClock:
    def __init__(self, cap: float):
        self.cap = cap

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap))


def cap_sleeps(module: ModuleType, cap: float = DEFAULT_POLL_SECONDS) -> None:
    module.time = _CappedClock(cap)  # type: ignore[attr-defined]


def fast_serverapp_polling(cap: float = DEFAULT_POLL_SECONDS) -> None:
    from flwr.superlink.grid import http_grid

    cap_sleeps(http_grid, cap)


def fast_supernode_polling(cap: float = DEFAULT_POLL_SECONDS) -> None:
    from flwr.supernode import start_client_internal

    cap_sleeps(start_client_internal, cap)
