"""`spine-fl client --site S`: one hospital joins the federation.

1. validate the site's data against the task's contract; refuse to join (with the report) when
   they are unusable, so a broken site never takes part;
2. check that the coordinator is reachable and presents a certificate from the consortium CA,
   retrying, then explaining what to check;
3. start a Flower SuperNode that connects *out* to the coordinator (no inbound port is opened
   beyond loopback) with the site's enrolled key and `site-config` in its node config;
4. serve its messages in this process (client/clientapp_worker.py) until stopped, starting the
   SuperNode again when the coordinator restarts under it or it exits after serving.
"""

from __future__ import annotations

import math
import signal
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Callable

from spine_fl.client.deployment.clientapp_worker import serve
from spine_fl.client.site_config import Site, SiteConnection
from spine_fl.client.site_data import validate_site_data
from spine_fl.shared.runtime import local_runtime
from spine_fl.shared.runtime.coordinator_instance import fetch_instance, instance_client
from spine_fl.shared.runtime.flower import write_secret
from spine_fl.shared.runtime.processes import ManagedProcess, ensure_port_free, start_python, wait_for_port
from spine_fl.shared.runtime.wakeup import env_for, open_wakeup

VALIDATION_IMAGE_SIZE = 64
REJOIN_WAIT_SECONDS = 600.0  # how long a site that was serving waits for a restarting coordinator
WATCH_SECONDS = 1.0  # how often a serving site asks which start of the coordinator it talks to


class SiteCannotJoin(RuntimeError):
    pass


def check_data(site: Site, connection: SiteConnection) -> str:
    report = validate_site_data(site, connection.task, VALIDATION_IMAGE_SIZE)
    if not report.usable:
        problems = "\n".join(f"  {p.severity.upper()} {p.where}: {p.what} -> {p.action}" for p in report.errors)
        raise SiteCannotJoin(f"{site.name}: the data in {site.data_dir} are not usable for {connection.task}; "
                             f"not joining. Fix these and start again:\n{problems}")
    return f"data valid for {connection.task}: {report.counts}"


def _probe(host: str, port: int, ca: Path | None) -> None:
    with socket.create_connection((host, port), timeout=5) as sock:
        if ca is not None:
            context = ssl.create_default_context(cafile=str(ca))
            with context.wrap_socket(sock, server_hostname=host):
                pass


def wait_for_coordinator(connection: SiteConnection, insecure: bool, attempts: int, pause: float,
                         say: Callable[[str], None], say_every: int = 1) -> None:
    host, port = connection.coordinator.rsplit(":", 1)
    ca = None if insecure else connection.ca_certificate
    if ca is not None and not ca.is_file():
        raise SiteCannotJoin(f"CA certificate {ca} not found: ask the coordinator for the consortium's ca.crt "
                             "and set [coordinator] ca_certificate")
    for attempt in range(1, attempts + 1):
        try:
            _probe(host, int(port), ca)
            return
        except ssl.SSLError as exc:
            raise SiteCannotJoin(f"the coordinator at {connection.coordinator} answered, but its TLS certificate "
                                 f"is not from the consortium CA {ca} ({exc.reason}); check [coordinator] "
                                 "ca_certificate, or that you are talking to the right coordinator") from None
        except OSError as exc:
            if (attempt - 1) % say_every == 0:
                say(f"coordinator {connection.coordinator} not reachable ({exc.strerror or exc}); "
                    f"attempt {attempt}/{attempts}, retrying in {pause:g} s")
            if attempt < attempts:
                time.sleep(pause)
    raise SiteCannotJoin(f"gave up: the coordinator at {connection.coordinator} did not answer after {attempts} "
                         "attempts. Check that it is running (`spine-fl server`), that [coordinator] address is "
                         "right, and that this site's firewall allows outbound TCP to that port")


def supernode_args(site_config: Path, connection: SiteConnection, secret: Path, runtime_port: int,
                   insecure: bool, attempts: int) -> list[str]:
    args = ["--superlink", connection.coordinator, "--isolation", "process", "--port", str(runtime_port),
            "--superexec-auth-secret-file", str(secret), "--max-retries", str(attempts),
            "--node-config", f'site-config="{site_config.resolve()}"']
    if insecure:
        return [*args, "--insecure"]
    return [*args, "--root-certificates", str(connection.ca_certificate),
            "--auth-supernode-private-key", str(connection.private_key)]


def why_node_stopped(node: ManagedProcess) -> str:
    log = node.log_path.read_text(errors="replace")
    if "[code: 2004]" in log:  # Flower's "Failed to activate SuperNode": the SuperLink rejected the key
        return ("the coordinator does not accept this site's key (not enrolled): send the .pub file from "
                "`spine-fl enroll` to the coordinator and ask them to enrol it.")
    if "could not establish a connection" in log:
        return ("it could not connect to the coordinator (with --insecure, a coordinator that uses TLS refuses "
                "the connection; otherwise check the address and the CA certificate).")
    return "see its log."


class CoordinatorWatch:
    """Asks, every WATCH_SECONDS while the site serves, which start of the coordinator it talks to
    (shared/runtime/coordinator_instance.py); `restarted` is set when the id changes. An unreachable
    coordinator changes nothing: the SuperNode rides out network trouble itself, and only a new start
    has forgotten its session."""

    def __init__(self, connection: SiteConnection, insecure: bool) -> None:
        self.address, self.ca = connection.coordinator, None if insecure else connection.ca_certificate
        self._client = instance_client(self.ca)
        self.known = self.seen = self._fetch()  # before the SuperNode starts
        self.restarted, self._done = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._watch, name="coordinator-watch", daemon=True)

    def _watch(self) -> None:
        while not self._done.wait(WATCH_SECONDS) and not self.look():
            pass

    def look(self) -> bool:
        """Ask the coordinator once; whether it is a new start (then `restarted` is set). Also called
        when the SuperNode exited by itself: the new start refuses its old node id (HTTP 401) and
        Flower's SuperNode stops on that, which can come before the watch's next look."""
        seen = self._fetch()
        if seen is not None and self.known is None:  # not known at the SuperNode's start: adopt it
            self.known = self.seen = seen
        elif seen is not None and seen != self.known:
            self.seen = seen
            self.restarted.set()
        return self.restarted.is_set()

    def __enter__(self) -> CoordinatorWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop asking in the background; look() still asks (its connection stays open until close())."""
        self._done.set()
        if self._thread.is_alive():
            self._thread.join()

    def close(self) -> None:
        self.stop()
        self._client.close()

    def __exit__(self, *_: object) -> None:
        self.close()

    def _fetch(self) -> str | None:
        return fetch_instance(self.address, self.ca, client=self._client)


def run_site(site_config: Path, site: Site, connection: SiteConnection, *, insecure: bool = False,
             runtime_port: int = 9094, attempts: int = 5, pause: float = 3.0,
             say: Callable[[str], None] = print) -> None:
    """Join and serve until stopped. The SuperNode is started again with fresh state when the
    coordinator restarts under it (its instance id changes), and when it exits after it has served
    messages (Flower's SuperNode gives up when its old session is refused), up to `attempts` times;
    both wait for the coordinator to answer (up to REJOIN_WAIT_SECONDS: a coordinator restart takes
    tens of seconds). An exit the coordinator's new start caused (its refusal of the old node id)
    counts as that restart. One that exits before serving anything for another reason (key not
    enrolled, coordinator unreachable) ends the site's run with the reason."""
    say(check_data(site, connection))
    if not insecure and not connection.private_key.is_file():
        raise SiteCannotJoin(f"site key {connection.private_key} not found: create it with "
                             f"`spine-fl enroll --site {site.name}` and send the .pub file to the coordinator")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    wait_for_coordinator(connection, insecure, attempts, pause, say)
    exits = 0
    while True:
        with CoordinatorWatch(connection, insecure) as watch:
            node, served = _serve_with_supernode(site_config, site, connection, insecure, runtime_port, attempts,
                                                 stop, say, watch.restarted)
            if stop.is_set():
                return
            watch.stop()
            restarted = watch.restarted.is_set() or watch.look()
        if restarted:
            say(f"{site.name}: the coordinator restarted (instance {watch.known} -> {watch.seen}); its SuperNode "
                "is started again with fresh state")
        else:
            stopped = (f"the SuperNode exited (code {node.popen.returncode}): {why_node_stopped(node)} "
                       f"Its log ({node.log_path}) ends:\n{node.log_tail(6)}")
            if not served or exits == attempts:
                raise SiteCannotJoin(stopped)
            exits += 1
            say(f"{site.name}: {stopped}\n{site.name}: it had served {served} message(s); starting it again "
                f"({exits} of {attempts})")
        # the coordinator may be restarting: wait longer than at the first join, saying so every tenth probe
        rejoin_pause = max(pause, 1.0)  # --retry-seconds 0 would otherwise divide by zero here
        wait_for_coordinator(connection, insecure, max(attempts, math.ceil(REJOIN_WAIT_SECONDS / rejoin_pause)),
                             rejoin_pause, say, say_every=10)


def _serve_with_supernode(site_config: Path, site: Site, connection: SiteConnection, insecure: bool,
                          runtime_port: int, attempts: int, stop: threading.Event, say: Callable[[str], None],
                          coordinator_restarted: threading.Event) -> tuple[ManagedProcess, int]:
    """Start the SuperNode and serve its messages until it exits, the coordinator restarts or the
    site is stopped."""
    ensure_port_free("127.0.0.1", runtime_port, "SuperNode's local Runtime API (--runtime-port)")
    secret = write_secret(site.state_dir / "superexec.secret")
    wake = open_wakeup()
    local = None if wake is None else local_runtime.socket_path(wake.folder)
    node = start_python("SuperNode", ["-m", "spine_fl.client.deployment.supernode_process",
                                      *supernode_args(site_config, connection, secret, runtime_port, insecure, attempts)],
                        site.state_dir / "supernode.log",
                        env={**env_for(wake), **({local_runtime.ENV: local} if local else {})})
    try:
        wait_for_port(node, "127.0.0.1", runtime_port)  # the socket is served before the port opens
        say(f"{site.name}: SuperNode PID {node.pid} connecting out to {connection.coordinator} "
            f"({'INSECURE' if insecure else 'TLS, enrolled key'}); the worker's requests to it "
            f"{'over a local socket' if local else 'over loopback HTTP'}; log {node.log_path}")
        served = serve(f"127.0.0.1:{runtime_port}", site, secret.read_bytes(), stop,
                       keep_going=lambda: node.alive() and not coordinator_restarted.is_set(), wake=wake,
                       local_runtime=local)
    finally:
        node.stop()
        say(f"{site.name}: SuperNode PID {node.pid} stopped")
        if wake is not None:
            wake.close()
    return node, served
