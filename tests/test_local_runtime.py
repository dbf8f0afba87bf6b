"""A worker's Runtime requests over its server's Unix socket (shared/runtime/local_runtime.py), against
a real Flower SuperNode state and its handlers: only the SuperExec secret acquires a task, only a live task's
token reaches a task's data, Flower's errors keep their meaning, and a SuperNode that is gone looks
like one that is gone over HTTP. Every deployment test runs the site workers and the coordinator's
ServerApp through it end to end (tests/test_deployment.py checks that both used it)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import httpx
import pytest
from flwr.proto.runtime_pb2 import AcquireTaskRequest, PullTaskInputRequest  # pylint: disable=no-name-in-module
from flwr.supercore.constant import TaskType
from flwr.supercore.error import ApiErrorCode, FlowerError
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import RunNotRunningException
from flwr.supernode.nodestate import NodeStateFactory
from flwr.supernode.servicer.runtime import runtime_handlers

from spine_fl.shared.runtime import local_runtime
from spine_fl.shared.runtime.local_runtime import LocalRuntimeClient, RuntimeDispatcher, serve_runtime
from spine_fl.shared.runtime.wakeup import Wakeup

SECRET = b"the-superexec-secret-of-this-site"


@pytest.fixture
def supernode():
    """A real SuperNode state served at a socket in a wake-up folder, as site_node.py sets it up."""
    with Wakeup() as wake:
        path = local_runtime.socket_path(wake.folder)
        server = serve_runtime(path, NodeStateFactory(ObjectStoreFactory()), SECRET, runtime_handlers)
        try:
            yield wake.folder, path
        finally:
            server.shutdown()
            server.server_close()


def acquire() -> AcquireTaskRequest:
    return AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value])


def test_only_the_superexec_secret_acquires_and_only_a_live_tasks_token_reads(supernode) -> None:
    folder, path = supernode
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700  # only the site's own user reaches the socket
    answered = LocalRuntimeClient(path, secret=SECRET).AcquireTask(acquire())
    assert not answered.HasField("task")  # accepted; nothing is pending
    refusals = [lambda: LocalRuntimeClient(path, secret=b"guessed").AcquireTask(acquire()),
                lambda: LocalRuntimeClient(path).AcquireTask(acquire()),  # no secret at all
                lambda: LocalRuntimeClient(path, token="forged-task-token").PullTaskInput(PullTaskInputRequest()),
                lambda: LocalRuntimeClient(path).PullTaskInput(PullTaskInputRequest())]  # no token
    for refused_call in refusals:
        with pytest.raises(httpx.HTTPStatusError) as refused:
            refused_call()
        assert refused.value.response.status_code == 401


def test_flowers_errors_keep_their_meaning(supernode, monkeypatch) -> None:
    _, path = supernode
    dispatcher = RuntimeDispatcher(NodeStateFactory(ObjectStoreFactory()), SECRET, runtime_handlers)

    def not_running(request, state):
        raise FlowerError(ApiErrorCode.FLEET_RUN_STATUS_NOT_ALLOWED, "the run was stopped")

    def broken(request, state):
        raise ValueError("internal detail that must not leave the SuperNode")

    for handler, status in ((not_running, 403), (broken, 500)):
        dispatcher.methods[local_runtime.ACQUIRE] = local_runtime._Method(AcquireTaskRequest, handler)
        answer_status, body = dispatcher.answer(local_runtime.ACQUIRE, SECRET, acquire().SerializeToString())
        assert answer_status == status and b"internal detail" not in body
    status, _ = dispatcher.answer("DeleteEverything", SECRET, b"")
    assert status == 404
    status, _ = dispatcher.answer(local_runtime.ACQUIRE, SECRET, b"\xff\xff not protobuf")
    assert status == 400

    # over the socket, a 403 is Flower's "run not running", as its HTTP client makes it
    monkeypatch.setattr(local_runtime, "_methods", lambda handlers: {local_runtime.ACQUIRE: local_runtime._Method(
        AcquireTaskRequest, not_running)})
    with Wakeup() as wake:
        other = local_runtime.socket_path(wake.folder)
        server = serve_runtime(other, NodeStateFactory(ObjectStoreFactory()), SECRET, runtime_handlers)
        try:
            with pytest.raises(RunNotRunningException):
                LocalRuntimeClient(other, secret=SECRET).AcquireTask(acquire())
        finally:
            server.shutdown()
            server.server_close()


def test_a_supernode_that_is_gone_is_an_http_transport_error(tmp_path: Path) -> None:
    with pytest.raises(httpx.ConnectError):  # the worker's loop catches httpx.HTTPError and asks again
        LocalRuntimeClient(str(tmp_path / "runtime"), secret=SECRET).AcquireTask(acquire())
