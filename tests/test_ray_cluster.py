"""A simulation attached to an existing Ray cluster (README "Scale": 1,000 virtual sites on several machines).

The test starts a Ray head node of its own (`ray start --head --block`, a child process in its own
process group), runs a two-site simulation on it through `[simulation] ray_address`, checks that the
sites' ClientApps ran in that cluster's workers, and stops the head by its PID. The head keeps its
files in a private temporary folder: `ray start` records "the latest cluster on this machine" in its
temp folder, and a record left in the default /tmp/ray would make every later plain `ray.init()` on
the machine (each simulation's own Ray) try to join it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from spine_fl.shared.config import ConfigError, load_scenario
from spine_fl.shared.runtime.processes import free_loopback_port
from spine_fl.simulations.runner import backend_config, load, ray_address, simulate

RAY = Path(sys.executable).with_name("ray")

SCENARIO = """name = "on-a-cluster"
[consortium]
source = "synthetic"
sites = 2
seed = 7
[run]
task = "rbp_tabular"
rounds = 1
local_epochs = 1
min_sites = 2
dp = true
secagg = true
[simulation]
cpus_per_site = 1
ray_address = "{address}"
[policy]
epsilon_per_run = 12.0
epsilon_lifetime = 30.0
"""


def _stop(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM to the head's PID (`ray start --block` then ends its GCS, raylet and workers), then
    SIGKILL to its process group for anything still there."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the group is the head's own (start_new_session)
    except ProcessLookupError:
        pass
    proc.wait(5)


@pytest.fixture
def ray_head() -> Iterator[tuple[str, Path]]:
    """(address, temp folder) of a one-node Ray cluster on this machine, 2 CPUs, stopped afterwards."""
    temp_dir = Path(tempfile.mkdtemp(prefix="sfray-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    port = free_loopback_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = (temp_dir / "head.log").open("w")
    proc = subprocess.Popen([str(RAY), "start", "--head", "--port", str(port), "--node-ip-address", "127.0.0.1",
                             "--num-cpus", "2", "--temp-dir", str(temp_dir), "--include-dashboard=false",
                             "--disable-usage-stats", "--block"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (temp_dir / "ray_current_cluster").exists():  # written once the head is up
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the Ray head did not start:\n{(temp_dir / 'head.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield f"127.0.0.1:{port}", temp_dir
    finally:
        _stop(proc)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert proc.returncode is not None


@pytest.mark.slow  # an end-to-end run, like the other simulations: ~55 s on a loaded 2-core machine
def test_a_simulation_runs_on_an_existing_ray_cluster(ray_head: tuple[str, Path], tmp_path: Path) -> None:
    import ray

    address, temp_dir = ray_head
    path = tmp_path / "cluster.toml"
    path.write_text(SCENARIO.format(address=address))
    scenario = load(path)
    assert scenario.ray_address == address
    assert backend_config(scenario, 2)["init_args"] == {"include_dashboard": False, "address": address}

    metrics = simulate(scenario, tmp_path / "out")

    assert metrics["status"] == "completed", metrics["stop_reason"]
    assert [r["round"] for r in metrics["rounds"]] == [1]
    assert not ray.is_initialized()  # Flower disconnected this process from the cluster afterwards
    # the sites' ClientApps ran as actors of that cluster: their workers' logs are in its temp folder
    logs = [p for p in temp_dir.glob("session_*/logs/worker-*") if "ClientAppActor" in p.read_text(errors="replace")]
    assert logs, sorted(p.name for p in temp_dir.glob("session_*/logs/*"))[:40]
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert written["status"] == "completed"
    assert f'ray_address = "{address}"' in (tmp_path / "out" / "scenario.toml").read_text()


def test_the_cluster_address_comes_from_the_scenario_or_ray_address(monkeypatch: pytest.MonkeyPatch,
                                                                    tmp_path: Path) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    own = load("kyphoplasty")
    assert ray_address(own) is None
    assert backend_config(own, 5)["init_args"] == {"include_dashboard": False, "num_cpus": os.cpu_count() or 1}
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")  # Ray's own variable: Ray refuses num_cpus with it
    assert backend_config(own, 5)["init_args"] == {"include_dashboard": False, "address": "10.0.0.5:6379"}
    path = tmp_path / "bad.toml"
    path.write_text(SCENARIO.format(address="ray://10.0.0.5:10001"))
    with pytest.raises(ConfigError, match=r"\[simulation\] ray_address = \"ray://10.0.0.5:10001\": not a Ray "
                                          r"cluster address"):
        load_scenario(path)
