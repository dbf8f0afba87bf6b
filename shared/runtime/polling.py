"""Shorter waits in Flower's deployment polling loops.

Two kinds of fixed wait in Flower 1.41 dominate a deployment round on loopback; both are shortened
here, in the processes spine-fl starts (the coordinator and `spine-fl client`'s SuperNode), without
changing what Flower sends or checks:

- idle sleeps: the SuperNode sleeps 3 s whenever it finds no message (0.5 s while it waits for its
  ClientApp's reply), and the ServerApp's HttpGrid sleeps 3 s between polls for replies. A SecAgg+
  round was then six request/reply exchanges (pre-flight, four SecAgg+ stages, evaluation), so these
  sleeps alone cost about 30 s a round (measured: 44 s/round on 2 cores for work that takes about
  4 s in simulation). Both loops call `time.sleep` through their module's `time` import; replacing
  that name with a clock whose sleep is capped keeps Flower's logic and only shortens the wait:
  the SuperNodes' polls of the SuperLink (through the front, all the time) to 0.1 s, the
  ServerApp's (on loopback, only while it awaits replies) to 50 ms, the SuperNode's checks of its
  own state to 10 ms (they cost no request).
- object pull back-off: a message is listed (PullMessages / the Fleet API's pull) as soon as it is
  registered, before its parts (arrays, records) are uploaded. A receiver that asks for a part that
  is not there yet waits Flower's initial back-off, 1 s, doubling to 10 s. That happened on most
  messages: the ServerApp pulling replies the SuperNodes were still uploading, the SuperNode pulling
  instructions the ServerApp was still uploading (measured: 1-2 s per exchange, 6 exchanges per
  round). A part is usually there a few tens of milliseconds later, so here the back-off starts at
  10 ms and is capped at 0.2 s (measured with a 50 ms start: the replies still reached the
  ServerApp 0.3-0.5 s after the last site had pushed its own); the overall patience stays Flower's
  (`max_time`, 2 hours), not a count of tries that the shorter waits would use up sooner.

The ServerApp's poll for replies is also woken by its SuperLink when a reply is stored, and then
waits at most WOKEN_POLL_SECONDS between polls (shared/runtime/wakeup.py).
"""

from __future__ import annotations

import time
from functools import wraps
from types import ModuleType
from typing import Any, Callable

from spine_fl.shared.runtime.wakeup import WOKEN_POLL_SECONDS, Wakeup

DEFAULT_POLL_SECONDS = 0.1
SERVERAPP_POLL_SECONDS = 0.05
# The SuperNode's other waits (0.5 s in Flower) are checks of its own in-memory state: is the
# ClientApp's reply there yet, is an object's content stored yet. They cost no request, so they are
# made short enough not to add to a round: each message waited on average a quarter of a second.
LOCAL_WAIT_SECONDS = 0.01
LOCAL_WAIT_BELOW = 1.0  # Flower's local waits are 0.5 s, its polls of the SuperLink 3 s
PULL_INITIAL_BACKOFF = 0.01
PULL_BACKOFF_CAP = 0.2


class _CappedClock:
    """`time` with `sleep` capped: at `cap` for polls of a server, at `local_cap` for waits shorter
    than LOCAL_WAIT_BELOW (checks of the process's own state), when given. With `wake`, a poll's
    wait ends at the server's wake-up, or after WOKEN_POLL_SECONDS (shared/runtime/wakeup.py)."""

    def __init__(self, cap: float, local_cap: float | None = None, wake: Wakeup | None = None):
        self.cap = cap
        self.local_cap = local_cap
        self.wake = wake

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        local = self.local_cap is not None and seconds < LOCAL_WAIT_BELOW
        if local:
            time.sleep(min(seconds, self.local_cap))  # type: ignore[type-var]
        elif self.wake is not None:
            self.wake.wait(min(seconds, WOKEN_POLL_SECONDS))
        else:
            time.sleep(min(seconds, self.cap))


def cap_sleeps(module: ModuleType, cap: float = DEFAULT_POLL_SECONDS, local_cap: float | None = None,
               wake: Wakeup | None = None) -> None:
    module.time = _CappedClock(cap, local_cap, wake)  # type: ignore[attr-defined]


def quick_pulls(pull_objects: Callable[..., Any], initial_backoff: float = PULL_INITIAL_BACKOFF,
                backoff_cap: float = PULL_BACKOFF_CAP) -> Callable[..., Any]:
    """Flower's `pull_objects` with a short back-off; bounded by its `max_time`, not by tries."""
    if getattr(pull_objects, "_spine_fl_quick", False):
        return pull_objects

    @wraps(pull_objects)
    def pull(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("initial_backoff", initial_backoff)
        kwargs.setdefault("backoff_cap", backoff_cap)
        kwargs.setdefault("max_tries_per_object", None)
        return pull_objects(*args, **kwargs)

    pull._spine_fl_quick = True  # type: ignore[attr-defined]
    return pull


def quick_object_pulls(module: ModuleType) -> None:
    """Make `module`'s own `pull_objects` name (its `from ... import pull_objects`) the quick one."""
    module.pull_objects = quick_pulls(module.pull_objects)  # type: ignore[attr-defined]


def fast_serverapp_polling(cap: float = SERVERAPP_POLL_SECONDS, wake: Wakeup | None = None) -> None:
    """`wake`: woken by the SuperLink when a reply is stored (server/deployment/superlink_process.py)."""
    from flwr.superlink.grid import http_grid

    cap_sleeps(http_grid, cap, wake=wake)
    quick_object_pulls(http_grid)


def fast_supernode_polling(cap: float = DEFAULT_POLL_SECONDS) -> None:
    from flwr.supernode import start_client_internal

    cap_sleeps(start_client_internal, cap, LOCAL_WAIT_SECONDS)
    quick_object_pulls(start_client_internal)
