"""Talking to a Flower SuperLink/SuperNode Runtime API from spine-fl's own long-lived workers.

Flower's default isolation starts a fresh Python process (re-importing torch and Opacus) for
every message; with SecAgg+'s four messages per round that dominates a round. spine-fl runs the
SuperLink and SuperNodes with `--isolation process` and serves their tasks itself, in one
process per site that stays up for the whole run (see client/clientapp_worker.py and
server/serverapp_worker.py). This module holds what both workers share.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

import httpx

from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=no-name-in-module
from flwr.proto.task_pb2 import Task  # pylint: disable=no-name-in-module
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient

from spine_fl import QUIET_FLOWER_ENV
from spine_fl.shared.runtime.wakeup import WOKEN_POLL_SECONDS, Wakeup

ACQUIRE_METHODS = frozenset({"/flwr.proto.Runtime/AcquireTask"})


def flower_env() -> dict[str, str]:
    """Environment for every Flower process spine-fl starts."""
    return {**os.environ, **QUIET_FLOWER_ENV, "PYTHONUNBUFFERED": "1"}


def write_secret(path: Path) -> Path:
    """The shared secret that lets only spine-fl's worker acquire tasks from the Runtime API."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(os.urandom(32).hex().encode())
    return path


def runtime_client(address: str, *, insecure: bool, root_certificates: bytes | None = None,
                   token: str | None = None, secret: bytes | None = None, component: str,
                   max_tries: int | None = None, unauthorized_ends_process: bool = True) -> RuntimeHttpClient:
    """`max_tries` None retries without end (Flower's default); a worker polling its own local
    SuperNode passes a small number so that it notices when the SuperNode is gone.

    Flower's retry policy answers an HTTP 401 (a refused task token) by sending its own process
    SIGINT: right for Flower's one-process-per-message apps, fatal for a worker that serves every
    message. With `unauthorized_ends_process=False` the request fails with the HTTP error instead
    (nothing is retried: the token stays refused)."""
    interceptors: list = [RuntimeVersionHttpInterceptor(component_name=component)]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    if secret is not None:
        interceptors.append(SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods=ACQUIRE_METHODS))
    invoker = make_simple_http_retry_invoker()
    if max_tries is not None:
        invoker.max_tries = max_tries
    if not unauthorized_ends_process:
        invoker.should_giveup = _unauthorized_fails_request(invoker.should_giveup)
    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=insecure, root_certificates=root_certificates,
        interceptors=interceptors, retry_invoker=invoker,
    )


def _unauthorized_fails_request(flower_giveup: Callable[[Exception], bool] | None) -> Callable[[Exception], bool]:
    def should_giveup(exc: Exception) -> bool:
        if isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code == httpx.codes.UNAUTHORIZED:
            return True
        return flower_giveup(exc) if flower_giveup is not None else False

    return should_giveup


def stop_heartbeat(heartbeat: HeartbeatSender) -> None:
    """Stop a task's heartbeat and wait for a beat in flight; a no-op when its thread already ended
    (an exception in a beat ends it)."""
    try:
        heartbeat.stop()
    except RuntimeError:
        pass


def acquire_task(client: RuntimeHttpClient, task_type: TaskType) -> tuple[Task, str] | None:
    """One poll: a pending task of this type and its token, or None."""
    res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[task_type.value]))
    if res.HasField("task") and res.token:
        return res.task, res.token
    return None


def wait_for_task(client: RuntimeHttpClient, task_type: TaskType, poll_seconds: float = 0.1,
                  timeout: float | None = None, wake: Wakeup | None = None) -> tuple[Task, str] | None:
    """Poll every `poll_seconds`; with `wake` (the server wakes it when a task is ready:
    shared/runtime/wakeup.py), ask again when woken, else after `timeout` (or WOKEN_POLL_SECONDS)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while deadline is None or time.monotonic() < deadline:
        found = acquire_task(client, task_type)
        if found is not None:
            return found
        if wake is None:
            time.sleep(poll_seconds)
        else:
            wake.wait(WOKEN_POLL_SECONDS if deadline is None else deadline - time.monotonic())
    return None
