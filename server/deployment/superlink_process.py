"""`python -m spine_fl.server.deployment.superlink_process ARGS`: Flower's SuperLink (same arguments
as `flower-superlink`), its state in memory, each registered site's node id fixed by its key.

Why in memory: with `--database FILE` every Fleet request (each poll, each object of a message) goes
through SQLAlchemy and SQLite in the SuperLink's one Python process, which all sites and the
coordinator share. On 2 cores that made a deployment round 13.4 s against 8.0 s with the in-memory
state (`spine-fl benchmark deployment`, benchmarks/deployment.json). Nothing spine-fl relies on
lives in that database: the enrolled keys are registered again at every start (coordinator.py
`enrol_sites`), a restarted coordinator resumes from its own checkpoint with a new run, and the
messages of a run that died with the old SuperLink are void anyway.

Why fixed node ids: a SuperNode learns its node id once, when it connects, and signs every request
with it. Flower draws node ids at random, so after a coordinator restart with a fresh state a site's
SuperNode would sign with an id the new SuperLink gave to nobody (or to another key) and be refused
(HTTP 401) until the site restarted. Here a key's node id is derived from the key (SHA-256, 8 bytes,
as Flower's node ids): the restarted SuperLink registers the same key under the same id, and the
running SuperNodes carry on. A node id is not a secret either way (requests are authenticated by the
key's signature, not by the id).
"""

from __future__ import annotations

import hashlib
import os
from functools import wraps
from typing import Any, Callable

from spine_fl import QUIET_FLOWER_ENV
from spine_fl.shared.runtime.wakeup import wake_after

IN_MEMORY_DATABASE = ":flwr-in-memory:"  # Flower's FLWR_IN_MEMORY_DB_NAME


def key_node_id(public_key: bytes) -> int:
    """The node id of an enrolled key: never 0 nor the SuperLink's own id (1)."""
    from flwr.common.constant import NODE_ID_NUM_BYTES, SUPERLINK_NODE_ID

    digest = hashlib.sha256(b"spine-fl node id\0" + public_key).digest()
    node_id = int.from_bytes(digest[:NODE_ID_NUM_BYTES], "little", signed=False)
    return node_id if node_id not in (0, SUPERLINK_NODE_ID) else node_id ^ 0xFF


def _keyed_create_node(create_node: Callable[..., int]) -> Callable[..., int]:
    @wraps(create_node)
    def create(self: Any, owner_aid: str, owner_name: str, public_key: bytes, heartbeat_interval: float,
               **kwargs: Any) -> int:
        node_id = create_node(self, owner_aid, owner_name, public_key, heartbeat_interval, **kwargs)
        if not public_key or not node_id:  # no key (insecure runs) or Flower refused: Flower's own id
            return node_id
        wanted = key_node_id(public_key)
        with self.lock:
            if wanted in self.nodes:  # only a SHA-256 collision could get here: keep Flower's id
                return node_id
            info = self.nodes.pop(node_id)
            info.node_id = wanted
            self.nodes[wanted] = info
            self.node_public_key_to_node_id[public_key] = wanted
            owned = self.owner_to_node_ids.setdefault(owner_aid, set())
            owned.discard(node_id)
            owned.add(wanted)
        return wanted

    create._spine_fl_keyed = True  # type: ignore[attr-defined]
    return create


def key_derived_node_ids() -> None:
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

    if not getattr(InMemoryLinkState.create_node, "_spine_fl_keyed", False):
        InMemoryLinkState.create_node = _keyed_create_node(InMemoryLinkState.create_node)  # type: ignore[method-assign]


if __name__ == "__main__":
    os.environ.update(QUIET_FLOWER_ENV)
    key_derived_node_ids()
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

    wake_after(InMemoryLinkState, "store_message_res")  # the ServerApp asks for replies at once
    from flwr.superlink.cli.flower_superlink import flower_superlink

    flower_superlink()
