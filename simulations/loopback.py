"""A real consortium on 127.0.0.1: credentials, a federation file, one site config per hospital,
and `spine-fl server` / `spine-fl client` started as separate processes and stopped by PID.

Used by the deployment tests and by the deployment-vs-simulation benchmark; everything lives in
one folder, generated at run time.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomlkit

from spine_fl.client.privacy.signed_log import PUBLIC_KEY_FILE, load_or_create_key
from spine_fl.shared.runtime.bundle import build_bundle
from spine_fl.shared.runtime.credentials import create_server_credentials, create_site_keys
from spine_fl.shared.runtime.flower import flower_env
from spine_fl.shared.runtime.processes import free_loopback_port
from spine_fl.simulations.synthetic.consortium import synthesize_consortium


@dataclass
class Loopback:
    root: Path
    port: int
    sites: list[str]
    run: dict[str, Any]
    policy: dict[str, Any] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def federation_file(self) -> Path:
        return self.root / "federation.toml"

    @property
    def out_dir(self) -> Path:
        return self.root / "results"

    def site_file(self, site: str) -> Path:
        return self.root / "sites" / f"{site}.toml"

    def write_site(self, site: str, data_dir: Path, allowed: list[str], **site_extra: Any) -> None:
        cred = self.root / "credentials"
        self.site_file(site).parent.mkdir(parents=True, exist_ok=True)
        self.site_file(site).write_text(tomlkit.dumps({
            "site": {"name": site, "data_dir": str(data_dir), "state_dir": str(self.root / "state" / site),
                     "task": self.run["task"], **site_extra},
            "coordinator": {"address": f"127.0.0.1:{self.port}", "ca_certificate": str(cred / "ca.crt")},
            "identity": {"private_key": str(cred / f"{site}_supernode_key")},
            "policy": {**self.policy, "allowed_bundles": allowed}}))

    def set_policy(self, site: str, **values: Any) -> None:
        """Change keys of one site's [policy] (e.g. require_tls = False before a client with --insecure)."""
        doc = tomlkit.parse(self.site_file(site).read_text())
        doc["policy"].update(values)
        self.site_file(site).write_text(tomlkit.dumps(doc))

    def start_server(self, insecure: bool = False) -> subprocess.Popen:
        return self._start("server", ["server", "--config", str(self.federation_file),
                                      *(["--insecure"] if insecure else [])])

    def start_client(self, site: str, insecure: bool = False, attempts: int = 20, retry_seconds: float = 1.0,
                     name: str | None = None, threads: int = 1) -> subprocess.Popen:
        return self._start(name or site, ["client", "--site", site, "--config", str(self.site_file(site)),
                                          "--runtime-port", str(free_loopback_port()), "--threads", str(threads),
                                          "--attempts", str(attempts), "--retry-seconds", str(retry_seconds),
                                          *(["--insecure"] if insecure else [])])

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        with open(self.root / f"{name}.out", "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "spine_fl.cli", *args], stdout=log,
                                    stderr=subprocess.STDOUT, env={**flower_env(), "COLUMNS": "200"},
                                    start_new_session=True)
        self.processes[name] = proc
        return proc

    def output(self, name: str) -> str:
        return (self.root / f"{name}.out").read_text(errors="replace")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Stop one process by PID (its SuperLink/SuperNode follows it: they die with their parent)."""
        proc = self.processes[name]
        if proc.poll() is None:
            os.kill(proc.pid, sig)
            proc.wait(30)

    def stop_all(self) -> None:
        """SIGTERM every process group still running, then SIGKILL what did not stop."""
        for proc in self.processes.values():
            if proc.poll() is None:
                _signal_group(proc, signal.SIGTERM)
        for proc in self.processes.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def build_loopback(root: Path, run: dict[str, Any], n_sites: int = 3, policy: dict[str, Any] | None = None,
                   seed: int = 7) -> Loopback:
    """Synthetic hospitals, a CA and server certificate, enrolled site keys, all site configs."""
    task_modalities = ("mri",) if "mri" in run["task"] or "fusion" in run["task"] else ("radiograph",)
    data_dirs = synthesize_consortium(root / "data", n_sites, seed, task_modalities)
    loop = Loopback(root, free_loopback_port(), [d.name for d in data_dirs], run, policy or {})
    create_server_credentials(root / "credentials", ["localhost", "127.0.0.1"])
    bundle = build_bundle()
    for d in data_dirs:
        create_site_keys(root / "credentials", d.name)
        load_or_create_key(root / "state" / d.name)  # the ledger key, pinned in the federation file
        shutil.copy(root / "state" / d.name / PUBLIC_KEY_FILE, root / "credentials" / f"{d.name}_ledger_key.pub")
        loop.write_site(d.name, d, [bundle.sha256])
    loop.federation_file.write_text(tomlkit.dumps({
        "federation": {"address": f"127.0.0.1:{loop.port}", "state_dir": "coordinator-state", "out_dir": "results",
                       "ca_certificate": "credentials/ca.crt", "certificate": "credentials/server.crt",
                       "private_key": "credentials/server.key"},
        "run": run,
        "sites": {s: {"public_key": f"credentials/{s}_supernode_key.pub",
                      "ledger_key": f"credentials/{s}_ledger_key.pub"} for s in loop.sites}}))
    return loop


def wait_for(predicate, timeout: float, what: str, poll: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
