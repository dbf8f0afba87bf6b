"""The SuperLink's held pulls (shared/runtime/held_pulls.py), driven as ASGI calls against a stand-in
for Flower's Fleet handler: an empty pull waits for a message for its own node only, everything else
is answered at once and untouched, and a message stored while Flower was answering is not missed.
The real SuperLink runs it in every deployment test (tests/test_deployment.py counts its pulls)."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

from flwr.proto.fleet_pb2 import PullMessagesRequest, PullMessagesResponse  # pylint: disable=E0611

from spine_fl.shared.runtime.held_pulls import PULL_PATH, Arrivals, HeldPulls, note_stored_messages

PATIENCE = 20.0  # a test's own limit; a hold that is not cut short lasts HOLD below
HOLD = 60.0


class FleetStandIn:
    """Flower's pull handler in miniature: the queued message ids of the asking node, one per pull;
    `status` other than 200 answers as Flower's authentication does for a bad signature."""

    def __init__(self, arrivals: Arrivals, status: int = 200) -> None:
        self.arrivals, self.status = arrivals, status
        self.queued: defaultdict[int, list[str]] = defaultdict(list)
        self.calls: list[str] = []
        self.during_call: Any = None

    def store(self, node_id: int, message_id: str) -> None:
        self.queued[node_id].append(message_id)
        self.arrivals.note(node_id)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.calls.append(scope["path"])
        answer = PullMessagesResponse()
        if scope["path"] == PULL_PATH and self.status == 200:
            node_id = PullMessagesRequest.FromString(body).node.node_id
            if self.queued[node_id]:
                answer.messages_list.add().metadata.message_id = self.queued[node_id].pop(0)
        if self.during_call is not None:
            self.during_call()
        await send({"type": "http.response.start", "status": self.status,
                    "headers": [(b"content-type", b"application/protobuf")]})
        await send({"type": "http.response.body", "body": answer.SerializeToString()})


async def ask(app: Any, node_id: int, path: str = PULL_PATH, leave: asyncio.Event | None = None) -> tuple[int, list[str]]:
    """One HTTP request through `app`: its status and the message ids it was given."""
    request = PullMessagesRequest()
    request.node.node_id = node_id
    incoming = [{"type": "http.request", "body": request.SerializeToString(), "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if incoming:
            return incoming.pop(0)
        await (leave or asyncio.Event()).wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app({"type": "http", "method": "POST", "path": path, "headers": []}, receive, send)
    if not sent:
        return 0, []  # nothing sent: the client had left
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return sent[0]["status"], [m.metadata.message_id for m in PullMessagesResponse.FromString(body).messages_list]


def run(coroutine: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coroutine, PATIENCE))


def test_an_empty_pull_is_answered_when_a_message_for_its_node_is_stored() -> None:
    arrivals = Arrivals()
    fleet = FleetStandIn(arrivals)
    app = HeldPulls(fleet, arrivals, hold_seconds=HOLD)

    async def scenario() -> tuple[int, list[str]]:
        pull = asyncio.ensure_future(ask(app, 7))
        await asyncio.sleep(0.2)
        assert not pull.done() and len(fleet.calls) == 1  # Flower answered "nothing"; the answer is held
        fleet.store(8, "for-another-site")
        await asyncio.sleep(0.2)
        assert not pull.done() and len(fleet.calls) == 1  # another node's message neither wakes nor answers it
        fleet.store(7, "round-1-train")
        return await pull

    assert run(scenario()) == (200, ["round-1-train"])
    assert len(fleet.calls) == 2  # asked Flower again, once, and sent what Flower gave
    assert fleet.queued[8] == ["for-another-site"]  # still waiting for its own site


def test_a_message_stored_while_flower_answered_empty_is_not_missed() -> None:
    arrivals = Arrivals()
    fleet = FleetStandIn(arrivals)
    app = HeldPulls(fleet, arrivals, hold_seconds=HOLD)
    fleet.during_call = lambda: (fleet.store(7, "just-in-time"), setattr(fleet, "during_call", None))
    assert run(ask(app, 7)) == (200, ["just-in-time"])  # else it would wait out HOLD and fail PATIENCE
    assert len(fleet.calls) == 2


def test_answers_with_a_message_refusals_and_other_routes_are_passed_on_at_once() -> None:
    arrivals = Arrivals()
    fleet = FleetStandIn(arrivals)
    app = HeldPulls(fleet, arrivals, hold_seconds=HOLD)
    fleet.store(7, "waiting-already")
    assert run(ask(app, 7)) == (200, ["waiting-already"])
    assert run(ask(app, 7, path="/v1/fleet/send-node-heartbeat")) == (200, [])
    unauthenticated = HeldPulls(FleetStandIn(arrivals, status=401), arrivals, hold_seconds=HOLD)
    assert run(ask(unauthenticated, 7)) == (401, [])  # a refused pull is not held: an outsider waits for nothing
    assert fleet.calls == [PULL_PATH, "/v1/fleet/send-node-heartbeat"]


def test_a_hold_ends_with_flowers_empty_answer_and_a_site_that_leaves_ends_its_wait() -> None:
    arrivals = Arrivals()
    fleet = FleetStandIn(arrivals)
    assert run(ask(HeldPulls(fleet, arrivals, hold_seconds=0.3), 7)) == (200, [])
    assert len(fleet.calls) == 1  # nothing arrived: not asked again

    async def leaving() -> tuple[int, list[str]]:
        left = asyncio.Event()
        pull = asyncio.ensure_future(ask(HeldPulls(fleet, arrivals, hold_seconds=HOLD), 7, leave=left))
        await asyncio.sleep(0.2)
        left.set()
        return await pull

    run(leaving())  # returns (PATIENCE not exceeded) although nothing arrived within HOLD
    assert len(fleet.calls) == 2
    assert not arrivals._waiters  # no waiter left behind


def test_unreadable_pulls_go_to_flower_unheld() -> None:
    arrivals = Arrivals()
    fleet = FleetStandIn(arrivals, status=400)
    app = HeldPulls(fleet, arrivals, hold_seconds=HOLD)
    sent: list[dict[str, Any]] = []

    async def garbage() -> None:
        incoming = [{"type": "http.request", "body": b"\xff\xff not protobuf", "more_body": False}]

        async def receive() -> dict[str, Any]:
            return incoming.pop(0) if incoming else {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await app({"type": "http", "method": "POST", "path": PULL_PATH, "headers": []}, receive, send)

    run(garbage())
    assert sent[0]["status"] == 400 and fleet.calls == [PULL_PATH]


def test_the_superlinks_state_counts_only_the_messages_it_stores() -> None:
    arrivals = Arrivals()

    class State:
        def store_message_ins(self, message: Any) -> str | None:
            return message.metadata.message_id or None  # Flower: None when it refuses a message

    note_stored_messages(State, arrivals)
    note_stored_messages(State, arrivals)  # applied twice, counts once
    stored = type("M", (), {"metadata": type("Meta", (), {"dst_node_id": 7, "message_id": "m1"})})()
    refused = type("M", (), {"metadata": type("Meta", (), {"dst_node_id": 7, "message_id": ""})})()
    State().store_message_ins(stored)
    State().store_message_ins(refused)
    assert arrivals.stored(7) == 1 and arrivals.stored(8) == 0
