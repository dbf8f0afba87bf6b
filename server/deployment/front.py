"""The coordinator's public front: nginx between the sites and the SuperLink.

Flower 1.41's SuperLink serves three APIs as protobuf over HTTP on one `--host/--port` (uvicorn):
the Fleet API (`/v1/fleet/...`, what SuperNodes call), the Control API (`/v1/control/...`: submit
and stop runs, list, register and unregister nodes) and the Runtime API (`/v1/runtime/...`, what
the ServerApp calls). Open-source Flower authenticates the Control API with a no-op plugin only
(`FLWR_OIDC_ENABLED` needs Flower Enterprise and an OIDC identity service), so anyone who reached
that port with ca.crt could list the sites' keys, evict a site or stop the run.

So the SuperLink listens on 127.0.0.1 only, on a port of its own, and the federation's public
address belongs to nginx, which terminates TLS with the coordinator's certificate and forwards
exactly the Fleet API's routes (taken from the SuperLink's own Fleet router), POST only, each
to that one path (the SuperLink never sees a client-written path). Everything else, the Control
and Runtime APIs, `/docs`, `/health`, any other method, is answered 403 by nginx itself. The
coordinator (run submission, the ServerApp) talks to the SuperLink on loopback.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import httpx

from spine_fl.shared.runtime.coordinator_instance import INSTANCE_PATH
from spine_fl.shared.runtime.processes import ManagedProcess, ProcessStartError, start_command, wait_for_port

NGINX_HINT = ("install nginx, which serves the coordinator's public address (only the Fleet API reaches the "
              "SuperLink): `sudo apt-get install nginx` on Debian/Ubuntu, `sudo dnf install nginx` on "
              "Fedora/RHEL, `brew install nginx` on macOS")
REFUSED_BODY = "spine-fl coordinator: only the Fleet API (SuperNodes) is served on this address\\n"


NGINX_LOCATIONS = ("/usr/sbin/nginx", "/usr/local/sbin/nginx")  # tried when nginx is not on PATH


def find_nginx() -> str:
    found = shutil.which("nginx") or next((p for p in NGINX_LOCATIONS if os.access(p, os.X_OK)), None)
    if found is None:
        raise ProcessStartError(f"nginx not found: {NGINX_HINT}")
    return found


def fleet_paths() -> list[str]:
    """Every route of the SuperLink's Fleet API, as the SuperLink itself declares them."""
    from fastapi.routing import APIRoute
    from flwr.superlink.routers.fleet.router import router

    paths = sorted({route.path for route in router.routes if isinstance(route, APIRoute)})
    if not paths or any(not p.startswith("/v1/fleet/") for p in paths):
        raise ProcessStartError(f"unexpected Fleet API routes in this Flower version: {paths}")
    return paths


@dataclass(frozen=True)
class FrontConfig:
    listen_host: str
    listen_port: int
    backend_port: int  # the SuperLink, on 127.0.0.1
    folder: Path  # nginx.conf, logs, PID file, temp folders (under the coordinator's state dir)
    tls: tuple[Path, Path, Path] | None  # (ca.crt, server.crt, server.key); None: --insecure
    instance: str  # this start's id, served on INSTANCE_PATH (shared/runtime/coordinator_instance.py)

    @property
    def conf_path(self) -> Path:
        return self.folder / "nginx.conf"

    @property
    def log_path(self) -> Path:
        return self.folder / "nginx.log"


def _q(path: Path) -> str:
    text = str(Path(path).resolve())
    if any(c in text for c in '";{}\n\\$'):
        raise ProcessStartError(f"{text}: path not usable in nginx's configuration (quote, brace, $ or backslash)")
    return f'"{text}"'


def nginx_config(cfg: FrontConfig) -> str:
    """The whole configuration: one server, the Fleet routes forwarded, the instance id answered,
    everything else refused."""
    if not cfg.instance.isalnum():
        raise ProcessStartError(f"coordinator instance id {cfg.instance!r} must be letters and digits")
    folder = cfg.folder.resolve()
    listen_host = f"[{cfg.listen_host}]" if ":" in cfg.listen_host else cfg.listen_host
    if cfg.tls is None:
        listen, upstream_scheme, tls = f"listen {listen_host}:{cfg.listen_port};", "http", ""
    else:
        ca, cert, key = cfg.tls
        listen, upstream_scheme = f"listen {listen_host}:{cfg.listen_port} ssl;", "https"
        tls = f"""
        ssl_certificate {_q(cert)};
        ssl_certificate_key {_q(key)};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:spine_fl_tls:1m;
        # plain HTTP on this TLS port: close the connection instead of answering (as the SuperLink did)
        error_page 497 = @close;
        # the SuperLink's own TLS certificate is checked against the consortium CA, on loopback too
        proxy_ssl_verify on;
        proxy_ssl_trusted_certificate {_q(ca)};
        proxy_ssl_name localhost;
        proxy_ssl_session_reuse on;"""
    fleet = "\n".join(f"""
        location = {path} {{
            limit_except POST {{ deny all; }}
            proxy_pass {upstream_scheme}://superlink{path};
        }}""" for path in fleet_paths())
    return f"""# Written by `spine-fl server` (server/deployment/front.py) at every start; edits are lost.
daemon off;
worker_processes 1;
pid {_q(folder / "master.pid")};
error_log {_q(cfg.log_path)} notice;
events {{ worker_connections 1024; }}
http {{
    # time of the request, seconds nginx spent on it and of those the SuperLink's: where a slow round goes
    log_format timed '$time_iso8601 $msec $remote_addr "$request" $status $request_length '
                     '$body_bytes_sent $request_time $upstream_response_time';
    access_log {_q(folder / "access.log")} timed;
    server_tokens off;
    client_body_temp_path {_q(folder / "tmp" / "body")};
    proxy_temp_path {_q(folder / "tmp" / "proxy")};
    fastcgi_temp_path {_q(folder / "tmp" / "fastcgi")};
    uwsgi_temp_path {_q(folder / "tmp" / "uwsgi")};
    scgi_temp_path {_q(folder / "tmp" / "scgi")};
    upstream superlink {{
        server 127.0.0.1:{cfg.backend_port};
        keepalive 16;
    }}
    server {{
        {listen}{tls}
        default_type text/plain;
        client_max_body_size 2g;
        # streamed both ways: nginx's workers never write message bodies to disk
        proxy_request_buffering off;
        proxy_buffering off;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header X-Forwarded-For $remote_addr;
        proxy_read_timeout 300s;
        proxy_send_timeout 300s;
{fleet}

        # which start of the coordinator this is: a site restarts its SuperNode when it changes
        location = {INSTANCE_PATH} {{
            access_log off;
            return 200 "{cfg.instance}";
        }}

        location / {{
            return 403 "{REFUSED_BODY}";
        }}
        location @close {{
            return 444;
        }}
    }}
}}
"""


def write_front_config(cfg: FrontConfig) -> Path:
    (cfg.folder / "tmp").mkdir(parents=True, exist_ok=True)
    cfg.conf_path.write_text(nginx_config(cfg))
    return cfg.conf_path


def _nginx_argv(nginx: str, cfg: FrontConfig, *extra: str) -> list[str]:
    return [nginx, "-p", str(cfg.folder.resolve()), "-c", str(cfg.conf_path.resolve()),
            "-e", str(cfg.log_path.resolve()), *extra]


def check_front(cfg: FrontConfig, ca: Path | None, timeout: float = 10.0) -> None:
    """Through the public address: a Fleet route reaches the SuperLink (which answers an unsigned
    call itself, not nginx's 502), the instance id is served, and a Control route is refused."""
    host = "127.0.0.1" if cfg.listen_host in ("0.0.0.0", "", "::") else cfg.listen_host
    if ":" in host:
        host = f"[{host}]"
    base = f"{'http' if cfg.tls is None else 'https'}://{host}:{cfg.listen_port}"
    verify = True if ca is None else str(ca)
    try:
        with httpx.Client(verify=verify, timeout=timeout) as client:
            headers = {"content-type": "application/protobuf"}
            fleet = client.post(f"{base}/v1/fleet/send-node-heartbeat", content=b"", headers=headers)
            control = client.post(f"{base}/v1/control/list-nodes", content=b"", headers=headers)
            instance = client.get(f"{base}{INSTANCE_PATH}")
    except httpx.HTTPError as exc:
        raise ProcessStartError(f"the front at {cfg.listen_host}:{cfg.listen_port} does not answer as expected "
                                f"({exc}); see {cfg.log_path}") from None
    if fleet.status_code in (502, 503, 504):
        raise ProcessStartError(f"the front at {cfg.listen_host}:{cfg.listen_port} does not reach the SuperLink "
                                f"on 127.0.0.1:{cfg.backend_port} (HTTP {fleet.status_code}); see {cfg.log_path}")
    if instance.status_code != 200 or instance.text != cfg.instance:
        raise ProcessStartError(f"the front at {cfg.listen_host}:{cfg.listen_port} did not serve this start's "
                                f"instance id on {INSTANCE_PATH} (HTTP {instance.status_code}); see {cfg.log_path}")
    if control.status_code != 403:
        raise ProcessStartError(f"the front at {cfg.listen_host}:{cfg.listen_port} did not refuse the Control API "
                                f"(HTTP {control.status_code}); not starting")


def start_front(cfg: FrontConfig) -> ManagedProcess:
    """Write the configuration, test it, start nginx in the foreground (its own process group,
    stopped by PID with the SuperLink), wait until it listens and answers as it should."""
    nginx = find_nginx()
    write_front_config(cfg)
    test = subprocess.run(_nginx_argv(nginx, cfg, "-t", "-q"), capture_output=True, text=True, timeout=30, check=False,
                          stdin=subprocess.DEVNULL)
    if test.returncode != 0:
        raise ProcessStartError(f"nginx rejected the front's configuration {cfg.conf_path}:\n"
                                f"{(test.stderr or test.stdout).strip()}")
    proc = start_command("front (nginx)", _nginx_argv(nginx, cfg), cfg.log_path)
    try:
        host = "127.0.0.1" if cfg.listen_host in ("0.0.0.0", "", "::") else cfg.listen_host
        wait_for_port(proc, host, cfg.listen_port, timeout=30)
        check_front(cfg, None if cfg.tls is None else cfg.tls[0])
    except BaseException:
        proc.stop()
        raise
    return proc
