"""Each long-lived worker and its own Flower server talk through a Unix socket: a site's worker and
its SuperNode, the coordinator's ServerApp worker and its SuperLink. The worker's Runtime API
requests are answered by Flower's own Runtime handlers, called in the server's process, instead of
by that server's HTTP stack on loopback.

Why: a SecAgg+ round sends each site five messages one after another, and each message costs
about a dozen Runtime requests between the site's worker and its SuperNode (acquire the task, its
input, the message and each of its parts, confirm, the reply and each of its parts, the task's
end, heartbeats); the coordinator's ServerApp makes a few dozen per exchange for three sites (each
site's message and parts out, each reply and parts in). Over Flower's HTTP API each went through
uvicorn, Starlette and FastAPI in a Python process that also serves the sites: measured at a
site's worker, a median of 137 ms per message outside the app itself, on a 2-core machine that
also trains three sites (README "Round time").

What stays Flower's: the handlers (the ones Flower's own Runtime routes call: the server app's
`runtime_handlers`, and the task heartbeat's), the state and object store they work on, the task
tokens (resolved by the state as Flower's TaskDependency does; an unknown or missing token is
refused with 401), the SuperExec secret that alone may acquire a task (compared in constant time),
and Flower's error codes with their HTTP status (403: the run is no longer running, which the
client turns into Flower's RunNotRunningException as Flower's own HTTP client does). The client
raises httpx's errors, so a worker handles a server that is gone or refuses as it did over HTTP.

Who can connect: the socket lies in the worker process's private folder (0700, shared/runtime/
wakeup.py), so only the same user can, the same reach as the secret file and loopback port the
HTTP API relies on. Flower's HTTP API keeps running beside it for everything else.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import socket
import socketserver
import struct
import threading
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable

import httpx
from flwr.proto.message_pb2 import (  # pylint: disable=no-name-in-module
    ConfirmMessageReceivedRequest,
    ConfirmMessageReceivedResponse,
    PullObjectRequest,
    PullObjectResponse,
    PushObjectRequest,
    PushObjectResponse,
)
from flwr.proto.runtime_pb2 import (  # pylint: disable=no-name-in-module
    AcquireTaskRequest,
    AcquireTaskResponse,
    GetNodesRequest,
    GetNodesResponse,
    PullAppMessagesRequest,
    PullAppMessagesResponse,
    PullTaskInputRequest,
    PullTaskInputResponse,
    PushAppMessagesRequest,
    PushAppMessagesResponse,
    PushTaskOutputRequest,
    PushTaskOutputResponse,
    SendTaskHeartbeatRequest,
    SendTaskHeartbeatResponse,
)
from flwr.supercore.error import ApiErrorCode, FlowerError
from flwr.supercore.error.catalog import API_ERROR_MAP
from flwr.supercore.run import RunNotRunningException
from flwr.supercore.servicer.runtime import runtime_handlers as core_handlers
from google.protobuf.message import DecodeError, Message

ENV = "SPINE_FL_RUNTIME_SOCKET"
SOCKET_NAME = "runtime"  # beside the wake-up socket, in the same private folder
ACQUIRE = "AcquireTask"
MAX_FRAME_BYTES = 2 * 1024 * 1024 * 1024  # Flower's own object limit is below this
CALL_SECONDS = 120.0  # one answer from the server; every handler answers at once

_REQUEST_HEAD = struct.Struct(">HHQ")  # method length, credential length, body length
_ANSWER_HEAD = struct.Struct(">HQ")  # HTTP status, body length

log = logging.getLogger("spine_fl")


@dataclass(frozen=True)
class _Method:
    request: type[Message]
    handler: Callable[..., Message]


def _methods(handlers: Any) -> dict[str, _Method]:
    """The Runtime routes the workers use, each with the handler Flower's route calls: `handlers` is
    the server app's own (app.state.runtime_handlers), the heartbeat's is shared by both servers."""
    return {ACQUIRE: _Method(AcquireTaskRequest, handlers.acquire_task),
            "PullTaskInput": _Method(PullTaskInputRequest, handlers.pull_task_input),
            "PullMessages": _Method(PullAppMessagesRequest, handlers.pull_messages),
            "PullObject": _Method(PullObjectRequest, handlers.pull_object),
            "ConfirmMessageReceived": _Method(ConfirmMessageReceivedRequest, handlers.confirm_message_received),
            "PushMessages": _Method(PushAppMessagesRequest, handlers.push_messages),
            "PushObject": _Method(PushObjectRequest, handlers.push_object),
            "PushTaskOutput": _Method(PushTaskOutputRequest, handlers.push_task_output),
            "GetNodes": _Method(GetNodesRequest, handlers.get_nodes),
            "SendTaskHeartbeat": _Method(SendTaskHeartbeatRequest, core_handlers.send_task_heartbeat)}


def socket_path(folder: str) -> str:
    return os.path.join(folder, SOCKET_NAME)


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError("the other end closed the connection")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _error_body(code: int, detail: str) -> bytes:
    """Flower's HTTP error payload (FlowerError.to_json)."""
    return json.dumps({"code": code, "detail": detail}).encode()


class RuntimeDispatcher:
    """Answers one request the way the server's HTTP Runtime API would: (status, body)."""

    def __init__(self, state_factory: Any, secret: bytes | None, handlers: Any) -> None:
        self.state_factory, self.secret, self.methods = state_factory, secret, _methods(handlers)

    def answer(self, method: str, credential: bytes, body: bytes) -> tuple[int, bytes]:
        spec = self.methods.get(method)
        if spec is None:
            return 404, _error_body(0, f"no Runtime method {method!r}")
        try:
            request = spec.request.FromString(body)
        except DecodeError:
            return 400, _error_body(0, f"{method}: unreadable request")
        state = self.state_factory.state()
        try:
            if method == ACQUIRE:
                if self.secret is not None and not hmac.compare_digest(credential, self.secret):
                    return 401, _error_body(int(ApiErrorCode.RUNTIME_AUTHENTICATION_FAILED),
                                            "SuperExec authentication failed.")
                return 200, spec.handler(request, state).SerializeToString()
            task = state.get_task_by_token(credential.decode(errors="replace")) if credential else None
            if task is None:
                return 401, _error_body(int(ApiErrorCode.RUNTIME_AUTHENTICATION_FAILED),
                                        "Runtime task-token authentication failed.")
            return 200, spec.handler(request, state, task).SerializeToString()
        except FlowerError as err:
            known = API_ERROR_MAP.get(err.code)
            if known is None:
                return 500, _error_body(int(err.code), "Internal server error.")
            return known.http_status_code, json.dumps(err.to_json(known.public_message)).encode()
        except Exception:  # noqa: BLE001 - as Flower's HTTP layer: a 500, logged here, never the details
            log.exception("spine-fl: local Runtime API %s failed", method)
            return 500, _error_body(0, "Internal server error.")


class _Connection(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        sock = self.request
        while True:
            try:
                head = _read_exactly(sock, _REQUEST_HEAD.size)
            except (ConnectionError, OSError):
                return
            method_len, credential_len, body_len = _REQUEST_HEAD.unpack(head)
            if body_len > MAX_FRAME_BYTES:
                return
            try:
                method = _read_exactly(sock, method_len).decode("ascii", "replace")
                credential = _read_exactly(sock, credential_len)
                body = _read_exactly(sock, body_len)
            except (ConnectionError, OSError):
                return
            status, answer = self.server.dispatcher.answer(method, credential, body)
            try:
                sock.sendall(_ANSWER_HEAD.pack(status, len(answer)) + answer)
            except OSError:
                return


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    dispatcher: RuntimeDispatcher


def serve_runtime(path: str, state_factory: Any, secret: bytes | None, handlers: Any) -> _Server:
    """In the server's process: answer the worker's Runtime requests at `path`, in a thread."""
    server = _Server(path, _Connection)
    server.dispatcher = RuntimeDispatcher(state_factory, secret, handlers)
    threading.Thread(target=server.serve_forever, name="spine-fl-local-runtime", daemon=True).start()
    return server


def serve_runtime_beside_flowers(main: ModuleType) -> None:
    """In a SuperNode or SuperLink process, before Flower builds its HTTP app (`main.create_app`,
    flwr.supernode.main or flwr.superlink.main): when the worker's process asked for it
    (SPINE_FL_RUNTIME_SOCKET), the app's Runtime state, secret and handlers are also served there."""
    path = os.environ.get(ENV)
    if not path:
        return
    original = main.create_app
    if getattr(original, "_spine_fl_local", False):
        return

    def create_app(*args: Any, **kwargs: Any) -> Any:
        app = original(*args, **kwargs)
        factory = getattr(app.state, "runtime_state_factory", None)
        if factory is not None:
            serve_runtime(path, factory, app.state.superexec_auth_secret, app.state.runtime_handlers)
        return app

    create_app._spine_fl_local = True  # type: ignore[attr-defined]
    main.create_app = create_app


class LocalRuntimeClient:
    """The worker's side: the methods of Flower's RuntimeHttpClient that the workers (and the
    ServerApp's HttpGrid) use, each one request and answer over the socket. `token`: the task's;
    `secret`: for AcquireTask."""

    def __init__(self, path: str, token: str | None = None, secret: bytes | None = None) -> None:
        self.path, self.token, self.secret = path, token, secret
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def _call(self, method: str, request: Message, answer_type: type[Message]) -> Any:
        credential = (self.secret or b"") if method == ACQUIRE else (self.token or "").encode()
        name = method.encode("ascii")
        body = request.SerializeToString()
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    self._sock.settimeout(CALL_SECONDS)
                    self._sock.connect(self.path)
                self._sock.sendall(_REQUEST_HEAD.pack(len(name), len(credential), len(body)) + name + credential
                                   + body)
                status, size = _ANSWER_HEAD.unpack(_read_exactly(self._sock, _ANSWER_HEAD.size))
                answer = _read_exactly(self._sock, size)
            except (OSError, ConnectionError) as exc:
                self._close()
                raise httpx.ConnectError(f"the local Runtime API at {self.path}: {exc}") from None
        if status == 200:
            return answer_type.FromString(answer)
        if status == 403 and not _connector_error(answer):
            raise RunNotRunningException  # as Flower's HTTP client does with a 403
        url = f"http://spine-fl-local-runtime/{method}"
        response = httpx.Response(status, content=answer, request=httpx.Request("POST", url))
        raise httpx.HTTPStatusError(f"{status} from the local Runtime API ({method}): "
                                    f"{answer[:300].decode(errors='replace')}", request=response.request,
                                    response=response)

    def _close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def close(self) -> None:
        with self._lock:
            self._close()

    def AcquireTask(self, request: AcquireTaskRequest) -> AcquireTaskResponse:  # noqa: N802 - Flower's names
        return self._call(ACQUIRE, request, AcquireTaskResponse)

    def PullTaskInput(self, request: PullTaskInputRequest) -> PullTaskInputResponse:  # noqa: N802
        return self._call("PullTaskInput", request, PullTaskInputResponse)

    def PullMessages(self, request: PullAppMessagesRequest) -> PullAppMessagesResponse:  # noqa: N802
        return self._call("PullMessages", request, PullAppMessagesResponse)

    def PullObject(self, request: PullObjectRequest) -> PullObjectResponse:  # noqa: N802
        return self._call("PullObject", request, PullObjectResponse)

    def ConfirmMessageReceived(self, request: ConfirmMessageReceivedRequest) -> ConfirmMessageReceivedResponse:  # noqa: N802
        return self._call("ConfirmMessageReceived", request, ConfirmMessageReceivedResponse)

    def GetNodes(self, request: GetNodesRequest) -> GetNodesResponse:  # noqa: N802
        return self._call("GetNodes", request, GetNodesResponse)

    def PushMessages(self, request: PushAppMessagesRequest) -> PushAppMessagesResponse:  # noqa: N802
        return self._call("PushMessages", request, PushAppMessagesResponse)

    def PushObject(self, request: PushObjectRequest) -> PushObjectResponse:  # noqa: N802
        return self._call("PushObject", request, PushObjectResponse)

    def PushTaskOutput(self, request: PushTaskOutputRequest) -> PushTaskOutputResponse:  # noqa: N802
        return self._call("PushTaskOutput", request, PushTaskOutputResponse)

    def SendTaskHeartbeat(self, request: SendTaskHeartbeatRequest) -> SendTaskHeartbeatResponse:  # noqa: N802
        return self._call("SendTaskHeartbeat", request, SendTaskHeartbeatResponse)


def _connector_error(answer: bytes) -> bool:
    """Flower's one 403 that does not mean the run stopped (http_retry.py keeps it an HTTP error)."""
    error = FlowerError.from_json(answer.decode(errors="replace"))
    return error is not None and error.code == ApiErrorCode.RUNTIME_CONNECTOR_NOT_AVAILABLE
