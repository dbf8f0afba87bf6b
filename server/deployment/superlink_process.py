"""`python -m spine_fl.server.deployment.superlink_process ARGS`: Flower's SuperLink (same arguments
as `flower-superlink`), its state in memory, its HTTP middleware only where it acts
(shared/runtime/middleware.py), the sites' empty pulls held (shared/runtime/held_pulls.py), and the
coordinator's ServerApp worker's Runtime requests also answered over a Unix socket
(shared/runtime/local_runtime.py).

Why in memory: with `--database FILE` every Fleet request (each poll, each object of a message) goes
through SQLAlchemy and SQLite in the SuperLink's one Python process, which all sites and the
coordinator share. On 2 cores that made a deployment round 13.4 s against 8.0 s with the in-memory
state (`spine-fl benchmark deployment`, benchmarks/deployment.json). Nothing spine-fl relies on
lives in that database: the enrolled keys are registered again at every start (coordinator.py
`enrol_sites`), a restarted coordinator resumes from its own checkpoint with a new run, and the
messages of a run that died with the old SuperLink are void anyway.

Why Flower's own (random) node ids: each start of the SuperLink registers the enrolled keys
afresh and gives each a new id, and Flower's node authentication refuses (HTTP 401, "Invalid node
ID") every request signed with an id the key no longer has. A SuperNode left running from the
coordinator's previous start can therefore take no message of the new run (CI saw one take a new
run's pre-flight and vanish with it when its site restarted it); only a fresh SuperNode, which asks
for its id when it starts, serves the new run (client/deployment/site_node.py restarts it).
"""

from __future__ import annotations

import os

from spine_fl import QUIET_FLOWER_ENV
from spine_fl.shared.runtime.held_pulls import hold_empty_pulls
from spine_fl.shared.runtime.local_runtime import serve_runtime_beside_flowers
from spine_fl.shared.runtime.middleware import lean_superlink_middleware
from spine_fl.shared.runtime.wakeup import wake_after

IN_MEMORY_DATABASE = ":flwr-in-memory:"  # Flower's FLWR_IN_MEMORY_DB_NAME


if __name__ == "__main__":
    os.environ.update(QUIET_FLOWER_ENV)
    lean_superlink_middleware()  # each request crosses only the layers that act on it
    hold_empty_pulls()  # a site's empty pull is answered when a message for it is stored
    from flwr.superlink import main

    serve_runtime_beside_flowers(main)  # the ServerApp worker's Runtime requests over a Unix socket too
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

    wake_after(InMemoryLinkState, "store_message_res")  # the ServerApp asks for replies at once
    from flwr.superlink.cli.flower_superlink import flower_superlink

    flower_superlink()
