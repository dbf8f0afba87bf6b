"""The site's ClientApp worker: one long-lived process that serves every message its SuperNode
receives, with the site's installed spine-fl code.

Two reasons it replaces Flower's per-message `flwr-clientapp` processes:
- speed: torch, Opacus and the decoded DICOMs stay loaded for the whole run;
- control: a SuperNode would install and run whatever app bundle (FAB) the coordinator sends.
  Here the bundle is only hashed. A bundle whose SHA-256 is not in the site's policy
  (`allowed_bundles`) is refused, and the refusal goes into the egress ledger with the hash. No
  bundle's code is ever imported at the site: an allowed hash says the coordinator runs the same
  release the site has installed and reviewed.

Messages arrive packed by the coordinator's worker (shared/runtime/packing.py: fewer transfer
objects, the same records) and are unpacked before the app sees them; replies are packed after the
egress ledger has described them.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from typing import Callable

import httpx
from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.serde import context_from_proto, fab_from_proto
from flwr.proto.node_pb2 import Node  # pylint: disable=no-name-in-module
from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest  # pylint: disable=no-name-in-module
from flwr.supercore.constant import TaskType
from flwr.supercore.fab import Fab
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import ObjectPullError, pull_and_inflate_object_from_tree
from flwr.supercore.run import RunNotRunningException
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

from spine_fl.client.app import build_client_app
from spine_fl.client.privacy.mods import message_kind, record_egress, refuse
from spine_fl.client.site_config import Site
from spine_fl.shared.refusal import Refusal
from spine_fl.shared.runtime.flower import runtime_client, stop_heartbeat, wait_for_task
from spine_fl.shared.runtime.local_runtime import LocalRuntimeClient
from spine_fl.shared.runtime.packing import PackingError, pack_message, unpack_message
from spine_fl.shared.runtime.wakeup import Wakeup

log = logging.getLogger("spine_fl.client")
RuntimeClient = RuntimeHttpClient | LocalRuntimeClient

# The message comes from the site's own SuperNode on loopback. Flower waits up to 2 hours for its
# parts (sized for a WAN); a message whose parts never arrive (its run was stopped while the
# SuperNode fetched it) would block the site that long, so give up much earlier.
LOCAL_PULL_SECONDS = 60.0
# The SuperNode hands the task over as soon as the message is listed, while it is still fetching
# the message's parts from the coordinator; Flower's first retry waits 1 s, which every message
# paid. Asking again after 20 ms, then every 50 ms, costs a few loopback requests.
LOCAL_PULL_INITIAL_BACKOFF = 0.02
LOCAL_PULL_BACKOFF_CAP = 0.05


def pull_task_input(client: RuntimeClient) -> tuple[Message, Context, Fab]:
    """Flower's run_clientapp.pull_task_input, with a loopback-sized time limit."""
    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = res.task_id, res.run.run_id, res.context.node_id
    context = context_from_proto(res.context)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("the SuperNode handed over a task without a message")
    tree = pulled.message_object_trees[0]
    node = Node(node_id=context.node_id)
    message = pull_and_inflate_object_from_tree(
        tree, make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message, max_time=LOCAL_PULL_SECONDS, max_tries_per_object=None,
        initial_backoff=LOCAL_PULL_INITIAL_BACKOFF, backoff_cap=LOCAL_PULL_BACKOFF_CAP)
    message.metadata.__dict__["_message_id"] = tree.object_id  # as Flower does: not part of the deflated message
    return message, context, fab_from_proto(res.fab)


def bundle_refusal(site: Site, bundle: bytes) -> Refusal | None:
    digest = hashlib.sha256(bundle).hexdigest()
    if digest in site.policy.allowed_bundles:
        return None
    return Refusal("allowed_bundles", f"app bundle sha256 {digest} is not in this site's allowed_bundles; "
                   "nothing from it was run. If the consortium released it, add the hash printed by "
                   "`spine-fl bundle hash` to [policy] allowed_bundles")


def unpack_refusal(message: Message) -> Refusal | None:
    """Unpack the coordinator's packed array records in place (shared/runtime/packing.py); a
    refusal when they do not unpack exactly."""
    try:
        unpack_message(message)
    except PackingError as exc:
        return Refusal("message_format", f"the message's arrays could not be unpacked ({exc}); nothing was run")
    return None


def finish_task(client: RuntimeClient, context: Context | None, heartbeat: HeartbeatSender, status: str,
                details: str) -> None:
    """Report the task's end. The heartbeat stops first: once the task is finished its token is
    void, and a heartbeat sent after that would be refused (a message handled in a few tens of
    milliseconds finishes before a busy machine has even run the heartbeat's first beat)."""
    stop_heartbeat(heartbeat)
    push_task_output(client, context, status, details)


def serve_task(address: str, token: str, site: Site, app: ClientApp, local_runtime: str | None = None) -> str:
    """Handle one message end to end; returns what happened, for the site's log."""
    # A refused token (the task is over, e.g. its run was stopped) fails this task's requests; Flower
    # would end the whole process, which here is the site's worker for every message.
    client = LocalRuntimeClient(local_runtime, token=token) if local_runtime else runtime_client(
        address, insecure=True, token=token, component="flwr-clientapp", max_tries=3,
        unauthorized_ends_process=False)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    context = None
    try:
        message, context, fab = pull_task_input(client)
        refusal = bundle_refusal(site, fab.content) or unpack_refusal(message)
        if refusal is not None:
            reply = refuse(message, site, refusal)
            record_egress(site, str(context.run_id), message, message_kind(message), reply)
            log.error("spine-fl: %s refused run %s: %s", site.name, context.run_id, refusal.message)
            outcome = "refused"
        else:
            kind, started = message_kind(message), time.perf_counter()
            reply = app(message=message, context=context)
            outcome = "error" if reply.has_error() else "ok"
            log.info("%s round %s %s: %s in %.2f s", site.name, message.metadata.group_id or "-", kind, outcome,
                     time.perf_counter() - started)
        push_message(client, pack_message(reply), context)  # after the egress ledger described it
        finish_task(client, context, heartbeat, SubStatus.COMPLETED, "")
        return outcome
    except (RunNotRunningException, ObjectPullError):  # e.g. the coordinator restarted and stopped the run
        log.warning("%s: a message of a run that is no longer running was skipped", site.name)
        try:
            finish_task(client, context, heartbeat, SubStatus.FAILED, "stale message skipped")
        except Exception:  # noqa: BLE001 - nothing more to do for a dead run
            pass
        return "stale"
    except Exception as exc:  # a failing message must not take the site's worker down
        log.exception("spine-fl: message failed at %s", site.name)
        if context is not None:
            try:
                push_message(client, Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=str(exc)),
                                             reply_to=message), context)
            except Exception:  # noqa: BLE001 - the SuperNode may be gone too
                pass
        try:
            finish_task(client, context, heartbeat, SubStatus.FAILED, str(exc))
        except Exception:  # noqa: BLE001 - the SuperNode may be gone too
            pass
        return "failed"
    finally:
        stop_heartbeat(heartbeat)
        client.close()


def serve(address: str, site: Site, secret: bytes | None, stop: threading.Event,
          keep_going: Callable[[], bool] = lambda: True, wake: Wakeup | None = None,
          local_runtime: str | None = None) -> int:
    """Serve the SuperNode's ClientApp tasks until `stop` is set or `keep_going()` turns false;
    returns how many tasks were served. `wake`: woken by the SuperNode when a task's message is
    whole in its store (client/deployment/supernode_process.py); without it the SuperNode is polled every 0.1 s.
    `local_runtime`: the SuperNode's Unix socket for Runtime requests (shared/runtime/local_runtime.py),
    else its HTTP Runtime API at `address`."""
    acquirer = LocalRuntimeClient(local_runtime, secret=secret) if local_runtime else runtime_client(
        address, insecure=True, secret=secret, component="SuperExec", max_tries=3)
    app = build_client_app()
    served = 0
    try:
        while not stop.is_set() and keep_going():
            try:
                found = wait_for_task(acquirer, TaskType.CLIENT_APP, timeout=1.0, wake=wake)
            except httpx.HTTPError:
                continue  # the SuperNode is restarting or gone; keep_going() decides
            if found is not None:
                _, token = found
                serve_task(address, token, site, app, local_runtime)
                served += 1
    finally:
        acquirer.close()
    return served
