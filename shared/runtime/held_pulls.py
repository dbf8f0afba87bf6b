"""Long polls for the sites' message pulls: the SuperLink holds a site's empty pull until a message
for that site arrives, or HOLD_SECONDS pass.

Why: a SuperNode asks the SuperLink for its next message (Flower's Fleet API, `pull-messages`)
and, finding none, sleeps before asking again (0.1 s here, shared/runtime/polling.py). A message
the coordinator sends therefore waits on average half a poll before its site sees it, at each of
a round's five exchanges, and every idle site costs ten TLS requests a second, each signed by the
site and checked by the SuperLink, which every site and the coordinator share. Held, an empty pull
is answered as soon as a message for that site is stored, and an idle site asks about once every
HOLD_SECONDS.

How: an outer layer of the SuperLink's HTTP app, in front of Flower's own. A pull goes through
Flower's layers (the site's authentication included) and its handler as before; only when
Flower's answer lists no message does this layer wait, for the SuperLink's in-memory state to
store a message addressed to that node (`note_stored_messages`, which counts them per node) or for
the hold to end, and then asks Flower again with the same request, which is authenticated again.
What the site receives is always an answer Flower produced for it. A request that is not a
readable pull, or any answer that is not an empty 200, is passed on untouched; a site that hangs up
while held ends its wait.
"""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict
from typing import Any, Awaitable, Callable

from flwr.proto.fleet_pb2 import PullMessagesRequest, PullMessagesResponse  # pylint: disable=E0611
from google.protobuf.message import DecodeError

PULL_PATH = "/v1/fleet/pull-messages"
# Well inside Flower's timestamp window (300 s) for the repeated request, and short enough that a
# stopping SuperLink (uvicorn waits for requests in flight) or an evicted site is not held long.
HOLD_SECONDS = 2.0
MAX_PULL_REQUEST_BYTES = 64 * 1024  # a PullMessagesRequest is a node id; anything bigger is passed on

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class Arrivals:
    """Messages stored per destination node, counted, with asyncio waiters woken from any thread
    (Flower stores messages in its request threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stored: defaultdict[int, int] = defaultdict(int)
        self._waiters: defaultdict[int, list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]]] = \
            defaultdict(list)

    def stored(self, node_id: int) -> int:
        with self._lock:
            return self._stored.get(node_id, 0)

    def note(self, node_id: int) -> None:
        with self._lock:
            self._stored[node_id] += 1
            waiters = self._waiters.pop(node_id, [])
        for loop, future in waiters:
            loop.call_soon_threadsafe(_finish, future)

    async def wait(self, node_id: int, seen: int, seconds: float) -> None:
        """Return once more than `seen` messages for `node_id` were stored, or after `seconds`."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if self._stored.get(node_id, 0) > seen:
                return
            self._waiters[node_id].append((loop, future))
        try:
            await asyncio.wait_for(future, seconds)
        except asyncio.TimeoutError:
            pass
        finally:
            with self._lock:
                waiting = self._waiters.get(node_id, [])
                if (loop, future) in waiting:
                    waiting.remove((loop, future))
                if not waiting:
                    self._waiters.pop(node_id, None)


def _finish(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


ARRIVALS = Arrivals()


def note_stored_messages(state_class: type, arrivals: Arrivals = ARRIVALS) -> None:
    """In the SuperLink process: each message `state_class.store_message_ins` stores (it returns the
    message id; None when it refused the message) is counted for its destination node."""
    original = state_class.store_message_ins
    if getattr(original, "_spine_fl_counts", False):
        return

    def store_message_ins(self: Any, message: Any) -> Any:
        message_id = original(self, message)
        if message_id is not None:
            arrivals.note(message.metadata.dst_node_id)
        return message_id

    store_message_ins._spine_fl_counts = True  # type: ignore[attr-defined]
    state_class.store_message_ins = store_message_ins


class _Answer:
    """An HTTP answer of the inner app, kept to be sent later or dropped."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    async def keep(self, message: dict[str, Any]) -> None:
        self.messages.append(message)

    def is_empty_pull(self) -> bool:
        start = self.messages[0] if self.messages else {}
        if start.get("type") != "http.response.start" or start.get("status") != 200:
            return False
        if any(name.lower() == b"content-encoding" for name, _ in start.get("headers", [])):
            return False
        body = b"".join(m.get("body", b"") for m in self.messages[1:])
        try:
            return not PullMessagesResponse.FromString(body).messages_list
        except DecodeError:
            return False

    async def send(self, send: Send) -> None:
        for message in self.messages:
            await send(message)


async def _read_body(receive: Receive, limit: int) -> tuple[list[dict[str, Any]], bytes | None]:
    """The request's body messages, and its bytes (None once it is over `limit` or the client left)."""
    messages, size = [], 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return messages, None
        size += len(message.get("body", b""))
        if not message.get("more_body", False):
            return messages, (b"".join(m.get("body", b"") for m in messages) if size <= limit else None)


def _node_id(body: bytes) -> int | None:
    try:
        request = PullMessagesRequest.FromString(body)
    except DecodeError:
        return None
    return request.node.node_id if request.HasField("node") else None


class HeldPulls:
    """ASGI middleware: empty `pull-messages` answers held until a message for the node is stored."""

    def __init__(self, app: Any, arrivals: Arrivals = ARRIVALS, hold_seconds: float = HOLD_SECONDS) -> None:
        self.app, self.arrivals, self.hold_seconds = app, arrivals, hold_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") != PULL_PATH:
            await self.app(scope, receive, send)
            return
        received, body = await _read_body(receive, MAX_PULL_REQUEST_BYTES)
        node_id = None if body is None else _node_id(body)
        if node_id is None:
            await self.app(scope, _replay(received, receive), send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.hold_seconds
        left = asyncio.ensure_future(_disconnected(receive))
        try:
            while True:
                seen = self.arrivals.stored(node_id)
                answer = _Answer()
                await self.app(scope, _replay(received, None), answer.keep)
                remaining = deadline - loop.time()
                if remaining <= 0 or left.done() or not answer.is_empty_pull():
                    break
                waiting = asyncio.ensure_future(self.arrivals.wait(node_id, seen, remaining))
                await asyncio.wait({waiting, left}, return_when=asyncio.FIRST_COMPLETED)
                waiting.cancel()
                if left.done() or self.arrivals.stored(node_id) == seen:
                    break  # the site left, or the hold ended with nothing new: the empty answer stands
        finally:
            left.cancel()
        await answer.send(send)


def _replay(received: list[dict[str, Any]], then: Receive | None) -> Receive:
    """A `receive` that gives the request's body again, then defers to `then` (or waits forever:
    the inner app only asks after the body to learn of a disconnect, which this layer watches)."""
    pending = list(received)

    async def receive() -> dict[str, Any]:
        if pending:
            return pending.pop(0)
        if then is not None:
            return await then()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    return receive


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def hold_empty_pulls() -> None:
    """In the SuperLink process, before Flower builds its app: count the messages its in-memory
    state stores, and put HeldPulls in front of Flower's HTTP layers."""
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
    from flwr.superlink import main
    from starlette.middleware import Middleware

    note_stored_messages(InMemoryLinkState)
    original = main._get_middleware
    if not getattr(original, "_spine_fl_holds", False):
        def middleware() -> list[Middleware]:
            return [Middleware(HeldPulls), *original()]

        middleware._spine_fl_holds = True  # type: ignore[attr-defined]
        main._get_middleware = middleware  # type: ignore[attr-defined]
