"""spine-fl: federated outcome prediction for spine clinics (Flower + Opacus + SecAgg+)."""

import os

# Hospitals allow no unsolicited outbound traffic, and a run must never install packages: every
# process that imports spine-fl (CLI, ServerApp, ClientApp, Ray workers) runs with Flower's and
# Ray's phone-home and Flower's dependency installation switched off; the SuperLink and SuperNode
# processes spine-fl starts get these values forced (shared/runtime/flower.py: flower_env).
QUIET_FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    # Ray's future default (leave the GPU list alone for an actor that asks for no GPU), taken now:
    # without it every simulation prints a FutureWarning before its first round.
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}
for _name, _value in QUIET_FLOWER_ENV.items():
    os.environ.setdefault(_name, _value)

# One logging set-up, before Opacus' import-time logging.basicConfig can install another one.
from spine_fl.shared.runtime.logs import configure_logging  # noqa: E402

configure_logging()

__version__ = "0.1.0"
