"""The outsider: someone who reaches the coordinator's public address and holds the consortium's
ca.crt (every site has it), calling Flower's Control API with Flower's own client. Listing the
sites, evicting one, registering a node, submitting or stopping a run are all refused by the
coordinator's front while the run is under way, and the enrolled sites train to completion.
Processes on 127.0.0.1, stopped by PID (also when the test fails)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
from flwr.cli.typing import SuperLinkConnection
from flwr.cli.utils import init_http_client_from_connection
from flwr.proto.control_pb2 import (  # pylint: disable=no-name-in-module
    ListNodesRequest,
    ListRunsRequest,
    RegisterNodeRequest,
    StartRunRequest,
    StopRunRequest,
    UnregisterNodeRequest,
)

from spine_fl.server.checkpoint import STATE_FILE
from spine_fl.shared.runtime.credentials import create_site_keys, load_site_public_key
from spine_fl.simulations.loopback import build_loopback, wait_for

pytestmark = pytest.mark.slow

RUN = dict(task="tfesi_radiograph", image_size=32, rounds=2, local_epochs=1, batch_size=32, learning_rate=0.3,
           min_sites=3, dp=True, secagg=True)
POLICY = {"epsilon_per_run": 40.0, "epsilon_lifetime": 200.0}


def _refused(call) -> int:
    with pytest.raises(httpx.HTTPStatusError) as caught:
        call()
    return caught.value.response.status_code


def _alive_nginx(pid: int) -> bool:
    try:
        return b"nginx" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


@pytest.fixture
def loop(tmp_path):
    made = build_loopback(tmp_path, RUN, 3, POLICY)
    yield made
    made.stop_all()


def test_outsider_with_the_ca_certificate_cannot_use_the_control_api(loop):
    server = loop.start_server()
    for site in loop.sites:
        loop.start_client(site)
    checkpoint = loop.root / "coordinator-state" / "checkpoint" / STATE_FILE
    wait_for(lambda: checkpoint.exists() or server.poll() is not None, 240, "round 1 to complete")
    assert server.poll() is None, loop.output("server")[-3000:]
    out = loop.output("server")
    run_id = int(re.search(r"run (\d+): bundle sha256", out).group(1))
    front_pid = int(re.search(r"front \(nginx\) PID (\d+) listening on 127\.0\.0\.1:", out).group(1))
    assert f"listening on 127.0.0.1:{loop.port}" in out
    superlink = re.search(r"SuperLink PID \d+ on (127\.0\.0\.1:\d+) \(loopback only\)", out).group(1)
    assert superlink != f"127.0.0.1:{loop.port}"

    outsider = init_http_client_from_connection(SuperLinkConnection(
        name="outsider", address=f"127.0.0.1:{loop.port}", insecure=False,
        root_certificates=str(loop.root / "credentials" / "ca.crt")))
    try:
        assert _refused(lambda: outsider.ListNodes(ListNodesRequest())) == 403
        assert _refused(lambda: outsider.ListRuns(ListRunsRequest())) == 403
        for node_id in range(1, 4):  # whatever the sites' node ids are: none may be evicted
            assert _refused(lambda n=node_id: outsider.UnregisterNode(UnregisterNodeRequest(node_id=n))) == 403
        assert _refused(lambda: outsider.StopRun(StopRunRequest(run_id=run_id))) == 403
        assert _refused(lambda: outsider.StartRun(StartRunRequest(federation=""))) == 403
        rogue = load_site_public_key(create_site_keys(loop.root / "outsider", "rogue").public_key)
        assert _refused(lambda: outsider.RegisterNode(RegisterNodeRequest(public_key=rogue, name="rogue"))) == 403
    finally:
        outsider.close()
    # the rest of the SuperLink is not reachable either; the Fleet API is, and wants an enrolled key
    base = f"https://127.0.0.1:{loop.port}"
    with httpx.Client(verify=str(loop.root / "credentials" / "ca.crt")) as raw:
        for path in ("/v1/runtime/get-nodes", "/v1/runtime/acquire-task", "/docs", "/openapi.json", "/health",
                     "/v1/fleet/../control/list-nodes", "/v1/fleet/%2e%2e/control/list-nodes"):
            assert raw.post(base + path, content=b"").status_code == 403, path
        assert raw.get(base + "/v1/fleet/pull-messages").status_code == 403  # POST only
        unsigned = raw.post(base + "/v1/fleet/pull-messages", content=b"",
                            headers={"content-type": "application/protobuf"})
        assert unsigned.status_code == 401 and "SuperNode authentication" in unsigned.text

    assert server.wait(420) == 0, loop.output("server")[-3000:]
    metrics = json.loads((loop.out_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    assert set(metrics["rounds"][-1]["per_site"]) == set(loop.sites)  # nobody was evicted
    assert not metrics["dropouts"]
    assert "front (nginx) PID" in loop.output("server") and "stopped" in loop.output("server")
    assert not _alive_nginx(front_pid)  # stopped by PID with the SuperLink
    access = (loop.root / "coordinator-state" / "front" / "access.log").read_text()
    assert '"POST /v1/control/list-nodes HTTP/1.1" 403' in access
    assert '"POST /v1/fleet/pull-messages HTTP/1.1" 200' in access  # the sites came through the front
