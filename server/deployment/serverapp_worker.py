"""The coordinator's ServerApp worker: serves the SuperLink's ServerApp task in the `spine-fl server`
process itself, with the installed spine-fl ServerApp (the SuperLink runs with `--isolation
process`, so it never starts code from a bundle on its own).

It mirrors flwr.superlink.runtime.run_serverapp without the bundle installation and without
exiting the process; like Flower's own runtime it uses HttpGrid, whose Runtime requests go over the
SuperLink's Unix socket where there is one (shared/runtime/local_runtime.py). The ServerApp
sees the Grid through PackingGrid (shared/runtime/packing.py), which the sites' workers mirror.
"""

from __future__ import annotations

from flwr.common.constant import SubStatus
from flwr.common.serde import context_from_proto, context_to_proto, run_from_proto
from flwr.proto.runtime_pb2 import PullTaskInputRequest, PushTaskOutputRequest  # pylint: disable=no-name-in-module
from flwr.serverapp import ServerApp
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.grid import HttpGrid

from spine_fl.server.app import RunStopped
from spine_fl.shared.runtime.flower import runtime_client, stop_heartbeat, wait_for_task
from spine_fl.shared.runtime.local_runtime import LocalRuntimeClient
from spine_fl.shared.runtime.packing import PackingGrid


class ServerAppTaskError(RuntimeError):
    pass


def serve_run(address: str, run_id: int, server_app: ServerApp, *, insecure: bool,
              root_certificates: bytes | None, secret: bytes | None, timeout: float = 120.0,
              local_runtime: str | None = None) -> None:
    """Acquire the ServerApp task of `run_id` and run `server_app` on it to the end. `local_runtime`:
    the SuperLink's Unix socket for Runtime requests (shared/runtime/local_runtime.py), else its HTTP
    Runtime API at `address`."""
    acquirer = LocalRuntimeClient(local_runtime, secret=secret) if local_runtime else runtime_client(
        address, insecure=insecure, root_certificates=root_certificates, secret=secret, component="SuperExec")
    try:
        found = wait_for_task(acquirer, TaskType.SERVER_APP, timeout=timeout)
    finally:
        acquirer.close()
    if found is None:
        raise ServerAppTaskError(f"the SuperLink offered no ServerApp task for run {run_id} within {timeout:g} s")
    task, token = found
    if task.run_id != run_id:
        raise ServerAppTaskError(f"the SuperLink offered a ServerApp task for run {task.run_id}, not run {run_id}")
    grid = HttpGrid(runtime_api_address=address, insecure=insecure, root_certificates=root_certificates, token=token)
    if local_runtime:
        grid._client = LocalRuntimeClient(local_runtime, token=token)  # HttpGrid's one client, made before its own
    client = grid._runtime_client  # as in Flower's run_serverapp
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    context, status, details = None, SubStatus.FAILED, "spine-fl ServerApp failed"
    try:
        res = client.PullTaskInput(PullTaskInputRequest())
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = res.task_id, res.run.run_id, res.context.node_id
        context = context_from_proto(res.context)
        grid.set_run(run_from_proto(res.run))
        server_app(grid=PackingGrid(grid), context=context)  # type: ignore[arg-type]  (the sites' workers unpack)
        status, details = SubStatus.COMPLETED, ""
    except RunStopped as exc:  # results are written; the Flower run ends as failed, with the reason
        details = str(exc)
    except Exception as exc:
        details = f"spine-fl ServerApp failed: {exc}"
        raise
    finally:
        stop_heartbeat(heartbeat)  # before the task ends: a heartbeat after that would be refused (HTTP 401)
        try:
            client.PushTaskOutput(PushTaskOutputRequest(context=context_to_proto(context) if context else None,
                                                        sub_status=status, details=details))
        except Exception:  # noqa: BLE001 - the SuperLink may be gone; the original error matters more
            pass
        finally:
            grid.close()
