"""Processes spine-fl starts (SuperLink, SuperNode, the coordinator's nginx front): own process
group, log file, PID file, stopped by PID (SIGTERM, then SIGKILL) so nothing outlives the command
that started it."""

from __future__ import annotations

import ctypes
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from spine_fl.shared.runtime.flower import flower_env

PR_SET_PDEATHSIG = 1


class ProcessStartError(RuntimeError):
    pass


@dataclass
class ManagedProcess:
    name: str
    popen: subprocess.Popen
    log_path: Path
    pid_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, grace: float = 10.0) -> None:
        if self.alive():
            try:
                os.killpg(self.pid, signal.SIGTERM)
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.popen.wait()
            except ProcessLookupError:
                pass
        self.pid_path.unlink(missing_ok=True)


def _die_with_parent() -> None:
    """Linux: the child gets SIGTERM when the spine-fl process that started it dies, even by SIGKILL."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def start_python(name: str, code_or_module: list[str], log_path: Path,
                 env: dict[str, str] | None = None) -> ManagedProcess:
    """`python <args>` with Flower's telemetry, update checks and dependency installation off."""
    return start_command(name, [sys.executable, *code_or_module], log_path, env)


def start_command(name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> ManagedProcess:
    """Any program (e.g. the coordinator's nginx front), started and stopped like the Flower processes;
    `env` is added to Flower's quiet environment."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env={**flower_env(), **(env or {})}, start_new_session=True,
                                 preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    pid_path = log_path.with_suffix(".pid")
    pid_path.write_text(str(popen.pid))
    return ManagedProcess(name, popen, log_path, pid_path)


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _outgoing_ports_start() -> int:
    """The lowest local port the OS gives outgoing connections (Linux; 32768 elsewhere)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


# Ray's own fixed ports end here: its workers listen on 10002-19999 and its client server on 10001
# by default, so a port below would collide with a Ray cluster on the same machine (a CI run's Ray
# head refused a --port that fell inside its worker range).
LOWEST_PORT = 20000


def free_loopback_port() -> int:
    """A port nothing listens on at 127.0.0.1 right now, from LOWEST_PORT up to the range the OS
    draws outgoing connections' local ports from. The OS's own choice (bind to port 0) comes from
    that range, so any outgoing connection could take the port before the server binds it: a CI
    run's nginx failed with "Address already in use" that way."""
    start = _outgoing_ports_start()
    if start > LOWEST_PORT + 1000:
        for port in random.SystemRandom().sample(range(LOWEST_PORT, start), 64):
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_port_free(host: str, port: int, what: str) -> None:
    if port_in_use(host, port):
        raise ProcessStartError(f"{host}:{port} is already in use, so the {what} cannot listen there: stop what "
                                "holds it (an earlier spine-fl process?) or choose another port")


def wait_for_port(proc: ManagedProcess, host: str, port: int, timeout: float = 60.0) -> None:
    """Until `proc` listens on host:port (and is still alive once something answers there)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise ProcessStartError(f"{proc.name} exited (code {proc.popen.returncode}) before listening on "
                                    f"{host}:{port}; its log ({proc.log_path}) ends:\n{proc.log_tail()}")
        if port_in_use(host, port):
            time.sleep(0.3)
            if proc.alive():
                return
            continue
        time.sleep(0.2)
    raise ProcessStartError(f"{proc.name} did not listen on {host}:{port} within {timeout:g} s; "
                            f"see {proc.log_path}")
