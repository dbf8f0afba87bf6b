"""`python -m spine_fl.client.deployment.supernode_process ARGS`: Flower's SuperNode (same arguments as
`flower-supernode`), with telemetry off, its waits shortened (see shared/runtime/polling.py), its
HTTP middleware only where it acts (shared/runtime/middleware.py), and the
site's worker woken whenever a message for it is whole in the SuperNode's store (shared/runtime/wakeup.py),
and the worker's Runtime API requests also answered over a Unix socket (shared/runtime/local_runtime.py).

The wake-up follows `_pull_and_store_message`, not the task's creation: Flower creates the task
before it pulls the message's objects from the SuperLink, and a worker woken then asked for parts
not there yet and retried: measured in 5-round runs, 5.8-8.6 object requests per message before,
4.1 (what the messages hold) after."""

from __future__ import annotations

import os

from spine_fl import QUIET_FLOWER_ENV
from spine_fl.shared.runtime.local_runtime import serve_runtime_beside_flowers
from spine_fl.shared.runtime.middleware import lean_supernode_middleware
from spine_fl.shared.runtime.polling import fast_supernode_polling
from spine_fl.shared.runtime.wakeup import wake_after

if __name__ == "__main__":
    os.environ.update(QUIET_FLOWER_ENV)
    fast_supernode_polling()
    lean_supernode_middleware()
    from flwr.supernode import main

    serve_runtime_beside_flowers(main)  # the worker's Runtime requests over a Unix socket too
    from flwr.supernode import start_client_internal

    wake_after(start_client_internal, "_pull_and_store_message")  # called by name in the SuperNode's loop
    from flwr.supernode.cli.flower_supernode import flower_supernode

    flower_supernode()
