"""Which start of the coordinator a site is talking to.

Flower 1.41's SuperLink keeps its state in memory: a coordinator that restarts (crash, upgrade,
`spine-fl server` run again to resume from its checkpoint) forgets every SuperNode's session and
every message in flight. A site's SuperNode that survived the restart does not know that: it
reconnects with its old session and can carry the old run's half-delivered message into the new
run (measured: it pushed its reply to an old message and held back the reply to the resumed run's
first one, so the coordinator waited five minutes and left the site out). So each start of the
coordinator gets a random instance id, served by its front on a fixed path (public and harmless:
it says nothing but "this is a new start"), and a site whose coordinator's id changes starts its
SuperNode again with fresh state (client/deployment/site_node.py).
"""

from __future__ import annotations

import secrets
from pathlib import Path

import httpx

INSTANCE_PATH = "/spine-fl/instance"


def new_instance_id() -> str:
    return secrets.token_hex(8)


def instance_client(ca: Path | None, timeout: float = 5.0) -> httpx.Client:
    """A client for repeated asks: it keeps its TLS connection to the front open between them (a
    site asks every second; a fresh client each time cost a CA load and a TLS handshake on both ends)."""
    return httpx.Client(verify=True if ca is None else str(ca), timeout=timeout)


def fetch_instance(address: str, ca: Path | None, client: httpx.Client) -> str | None:
    """The id the coordinator at `address` (host:port) serves, asked with `client` (instance_client(ca):
    checked against the consortium CA; `ca` None: plain HTTP, --insecure); None when it does not
    answer or serves no id."""
    url = f"{'http' if ca is None else 'https'}://{address}{INSTANCE_PATH}"
    try:
        answer = client.get(url)
    except httpx.HTTPError:
        return None
    text = answer.text.strip()
    return text if answer.status_code == 200 and text.isalnum() and len(text) <= 64 else None
