"""`python -m spine_fl.client.deployment.supernode_process ARGS`: Flower's SuperNode (same arguments as
`flower-supernode`), with telemetry off, its waits shortened (see shared/runtime/polling.py), and the
site's worker woken whenever a task is stored for it (shared/runtime/wakeup.py)."""

from __future__ import annotations

import os

from spine_fl import QUIET_FLOWER_ENV
from spine_fl.shared.runtime.polling import fast_supernode_polling
from spine_fl.shared.runtime.wakeup import wake_after

if __name__ == "__main__":
    os.environ.update(QUIET_FLOWER_ENV)
    fast_supernode_polling()
    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

    wake_after(InMemoryNodeState, "create_task")
    from flwr.supernode.cli.flower_supernode import flower_supernode

    flower_supernode()
