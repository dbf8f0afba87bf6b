"""`spine-fl server`: the coordinator of a real consortium on Flower's deployment engine.

1. start a Flower SuperLink on 127.0.0.1 only (TLS, SuperNode authentication, `--isolation
   process`, its state in memory and each site's node id fixed by its key: superlink_process.py)
   and, on the federation's public address, the nginx front that forwards only the Fleet API to it
   (server/deployment/front.py: the Control API, which open-source Flower does not authenticate,
   stays unreachable from outside);
   stop both by PID when done;
2. register the enrolled sites' public keys (only those SuperNodes may connect; the ServerApp
   sends nothing to any other node);
3. submit the run with the app bundle (sites check its hash against their policy);
4. serve the ServerApp task in this process: it waits until `min_sites` enrolled sites are
   connected, runs, checkpoints after every round (a restart resumes at the next round) and
   writes the results folder (model, federation.json, metrics.json, plots).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from flwr.cli.typing import SuperLinkConnection
from flwr.cli.utils import init_http_client_from_connection
from flwr.common.serde import fab_to_proto, user_config_to_proto
from flwr.proto.control_pb2 import RegisterNodeRequest, StartRunRequest  # pylint: disable=no-name-in-module
from flwr.supercore.fab import Fab

from spine_fl.server.app import build_server_app
from spine_fl.server.coordinator_record import RECORD_FILE
from spine_fl.server.deployment.federation_config import FederationConfig
from spine_fl.server.deployment.front import FrontConfig, find_nginx, start_front
from spine_fl.server.deployment.run_result import write_deployment_results
from spine_fl.server.deployment.serverapp_worker import serve_run
from spine_fl.server.deployment.superlink_process import IN_MEMORY_DATABASE
from spine_fl.server.reporting.run_result import RunResult
from spine_fl.shared.config import ConfigError
from spine_fl.shared.runtime import local_runtime
from spine_fl.shared.runtime.bundle import build_bundle, read_bundle
from spine_fl.shared.runtime.coordinator_instance import new_instance_id
from spine_fl.shared.runtime.credentials import ledger_key_fingerprint, load_site_public_key
from spine_fl.shared.runtime.flower import write_secret
from spine_fl.shared.runtime.polling import fast_serverapp_polling
from spine_fl.shared.runtime.processes import (
    ManagedProcess,
    ensure_port_free,
    free_loopback_port,
    port_in_use,
    start_python,
    wait_for_port,
)
from spine_fl.shared.runtime.wakeup import Wakeup, env_for, open_wakeup

log = logging.getLogger("spine_fl.server")
# Flower's legacy gRPC Control/Fleet servers (on their own default ports, 0.0.0.0) stay off whatever
# the environment says: the SuperLink is reachable through the front only.
SUPERLINK_ENV = {"FLWR_INTERNAL_GRPC_CONTROL_API": "0", "FLWR_INTERNAL_GRPC_FLEET_API": "0"}
SUPERLINK_HOST = "127.0.0.1"


@dataclass(frozen=True)
class Endpoint:
    """Where this process reaches its own SuperLink, the CA that signed its certificate, and the
    SuperLink's Runtime socket (shared/runtime/local_runtime.py; None where Unix sockets are missing)."""

    address: str
    root_certificates: bytes | None
    local_runtime: str | None = None


def superlink_args(fed: FederationConfig, secret: Path, insecure: bool, port: int) -> list[str]:
    args = ["--isolation", "process", "--database", IN_MEMORY_DATABASE,
            "--disable-runtime-dependency-installation", "--superexec-auth-secret-file", str(secret),
            "--host", SUPERLINK_HOST, "--port", str(port)]
    if insecure:
        return [*args, "--insecure"]
    return [*args, "--ssl-ca-certfile", str(fed.ca_certificate), "--ssl-certfile", str(fed.certificate),
            "--ssl-keyfile", str(fed.private_key), "--enable-supernode-auth"]


def wait_until_port_free(host: str, port: int, what: str, timeout: float = 10.0) -> None:
    """A coordinator restarted right after being killed: its front may take a moment to let go of the port."""
    deadline = time.monotonic() + timeout
    while port_in_use(host, port) and time.monotonic() < deadline:
        time.sleep(0.2)
    ensure_port_free(host, port, what)


def public_probe_host(fed: FederationConfig) -> str:
    return "127.0.0.1" if fed.host in ("0.0.0.0", "") else fed.host


def start_superlink(fed: FederationConfig, insecure: bool,
                    wake: Wakeup | None = None) -> tuple[ManagedProcess, Endpoint, bytes]:
    """The SuperLink on 127.0.0.1, on a free port of its own (the public port is the front's); it
    wakes `wake` whenever it stores a site's reply, and serves the Runtime API at the socket in
    `wake`'s folder too (`Endpoint.local_runtime`)."""
    if not insecure:
        for path in (fed.ca_certificate, fed.certificate, fed.private_key):
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: create the consortium's certificates with "
                                        f"`spine-fl certs --out {path.parent}` (or run with --insecure for a "
                                        "local experiment)")
    find_nginx()  # before anything starts: a missing front is a clear error, not a half-started coordinator
    wait_until_port_free(public_probe_host(fed), fed.port, "coordinator's public front (nginx)")
    port = free_loopback_port()
    secret = write_secret(fed.state_dir / "superexec.secret")
    local = None if wake is None else local_runtime.socket_path(wake.folder)
    proc = start_python("SuperLink", ["-m", "spine_fl.server.deployment.superlink_process",
                                      *superlink_args(fed, secret, insecure, port)],
                        fed.state_dir / "superlink.log",
                        env={**SUPERLINK_ENV, **env_for(wake), **({local_runtime.ENV: local} if local else {})})
    try:
        wait_for_port(proc, SUPERLINK_HOST, port)
    except BaseException:
        proc.stop()
        raise
    certs = None if insecure else fed.ca_certificate.read_bytes()
    return proc, Endpoint(f"{SUPERLINK_HOST}:{port}", certs, local), secret.read_bytes()


def front_config(fed: FederationConfig, endpoint: Endpoint, insecure: bool) -> FrontConfig:
    return FrontConfig(fed.host, fed.port, int(endpoint.address.rsplit(":", 1)[1]), fed.state_dir / "front",
                       None if insecure else (fed.ca_certificate, fed.certificate, fed.private_key),
                       new_instance_id())


def enrol_sites(control: Any, fed: FederationConfig, insecure: bool) -> dict[int, str]:
    """Register exactly the enrolled keys (the SuperLink starts empty each time and gives each key a
    new node id, so a SuperNode left from a previous start is refused); node id -> site."""
    if insecure:
        return {}
    wanted = {site: load_site_public_key(key_file) for site, key_file in fed.sites.items()}
    if len(set(wanted.values())) < len(wanted):
        raise ConfigError(f"{fed.path}: two enrolled sites share one public key; each site needs its own")
    return {control.RegisterNode(RegisterNodeRequest(public_key=key, name=site)).node_id: site
            for site, key in wanted.items()}


def run_coordinator(fed: FederationConfig, insecure: bool = False,
                    on_round: Callable[[dict[str, Any]], None] | None = None,
                    say: Callable[[str], None] = print, bundle_file: Path | None = None) -> RunResult:
    """`bundle_file`: submit this FAB instead of the one built from the checkout (sites judge it by hash)."""
    fed.state_dir.mkdir(parents=True, exist_ok=True)
    enrolled_keys = {site: ledger_key_fingerprint(path) for site, path in fed.ledger_keys.items()}
    for site in sorted(set(fed.sites) - set(enrolled_keys)):
        say(f"{site} has no ledger_key enrolled: the key that signs its ledgers is pinned on its first reply "
            "(enrol it with `spine-fl enroll --ledger-key` to pin it before any run)")
    bundle = read_bundle(bundle_file) if bundle_file else build_bundle()
    wake = open_wakeup()
    try:
        proc, endpoint, secret = start_superlink(fed, insecure, wake)
    except BaseException:
        if wake is not None:
            wake.close()
        raise
    front: ManagedProcess | None = None
    started = time.perf_counter()
    try:
        front_cfg = front_config(fed, endpoint, insecure)
        front = start_front(front_cfg)
        say(f"SuperLink PID {proc.pid} on {endpoint.address} (loopback only); the ServerApp's requests to it "
            f"{'over a local socket' if endpoint.local_runtime else 'over loopback HTTP'}; log {proc.log_path}")
        say(f"front (nginx) PID {front.pid} listening on {fed.address} ({'INSECURE' if insecure else 'TLS'}), "
            f"forwarding only the Fleet API; coordinator instance {front_cfg.instance}; log {front.log_path}")
        control = init_http_client_from_connection(SuperLinkConnection(
            name="spine-fl", address=endpoint.address, insecure=insecure,
            root_certificates=None if insecure else str(fed.ca_certificate.resolve())))
        try:
            node_sites = enrol_sites(control, fed, insecure)
            res = control.StartRun(StartRunRequest(fab=fab_to_proto(Fab(bundle.sha256, bundle.content, {})),
                                                   override_config=user_config_to_proto({}), federation=""))
        finally:
            control.close()
        say(f"run {res.run_id}: bundle sha256 {bundle.sha256}; waiting for {fed.run.min_sites} of "
            f"{len(fed.sites)} enrolled sites ({', '.join(fed.sites)})")
        fast_serverapp_polling(wake=wake)
        app = build_server_app(fed.run, list(fed.sites), fed.out_dir, on_round, node_sites or None,
                               fed.state_dir / "checkpoint", fed.state_dir / RECORD_FILE, enrolled_keys,
                               fail_when_stopped=True)
        serve_run(endpoint.address, res.run_id, app, insecure=insecure,
                  root_certificates=endpoint.root_certificates, secret=secret, local_runtime=endpoint.local_runtime)
    finally:
        if front is not None:
            front.stop()
            say(f"front (nginx) PID {front.pid} stopped")
        proc.stop()
        say(f"SuperLink PID {proc.pid} stopped")
        if wake is not None:
            fast_serverapp_polling()  # this process's Grid must not wait on a closed socket later
            wake.close()
    return write_deployment_results(fed, bundle.sha256, time.perf_counter() - started)
