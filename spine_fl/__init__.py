"""spine-fl: federated outcome prediction for spine clinics (Flower + Opacus + SecAgg+)."""

import logging
import os

# Hospitals allow no unsolicited outbound traffic, and a run must never install packages: every
# process that imports spine-fl (CLI, ServerApp, ClientApp, Ray workers) runs with Flower's and
# Ray's phone-home and Flower's dependency installation switched off; the SuperLink and SuperNode
# processes spine-fl starts get these values forced (shared/flower_runtime.flower_env).
QUIET_FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}
for _name, _value in QUIET_FLOWER_ENV.items():
    os.environ.setdefault(_name, _value)

# Opacus calls logging.basicConfig at import, which would print every DEBUG line of Flower a second
# time through the root logger. A root handler of our own (what Python's last resort shows:
# WARNING and above) makes that call a no-op.
if not logging.getLogger().handlers:
    _handler = logging.StreamHandler()
    _handler.setLevel(logging.WARNING)
    logging.getLogger().addHandler(_handler)

__version__ = "0.1.0"
