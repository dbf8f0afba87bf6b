"""A site's own configuration file (`configs/sites/<site>.toml`), read only at the site.

    [site]
    name = "leiden"
    data_dir = "/data/spine-fl/leiden"        # the site data contract's folder
    state_dir = "/var/lib/spine-fl/leiden"    # privacy ledger, egress ledger, signing key

    task = "tfesi_radiograph"                 # what the data serve; checked before joining

    [coordinator]                             # only for `spine-fl client` (deployment)
    address = "coordinator.example.org:9092"
    ca_certificate = "../credentials/ca.crt"  # the consortium CA: TLS to the coordinator

    [identity]
    private_key = "../credentials/leiden_supernode_key"  # from `spine-fl enroll`; never leaves the site

    [policy]                                  # see client/privacy/policy.py for every rule and default
    epsilon_lifetime = 20.0
    allowed_bundles = ["<sha256 of the released app bundle>"]
    ...

Relative paths are resolved against the file's folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from spine_fl.client.privacy.policy import SitePolicy
from spine_fl.shared.config import ConfigError, read_toml, typed_from_table


@dataclass(frozen=True)
class Site:
    name: str
    data_dir: Path
    state_dir: Path
    policy: SitePolicy


class SiteConfigFileError(ConfigError):
    pass


@dataclass(frozen=True)
class SiteConnection:
    """How `spine-fl client` reaches the coordinator, and what the site's data are for."""

    coordinator: str
    ca_certificate: Path
    private_key: Path
    task: str


def _read(path: Path) -> dict:
    return read_toml(path, "site config", SiteConfigFileError)


def load_site_connection(path: Path) -> SiteConnection:
    raw = _read(path)
    wanted = {("coordinator", "address"), ("coordinator", "ca_certificate"), ("identity", "private_key"),
              ("site", "task")}
    missing = [f"[{section}] {key}" for section, key in sorted(wanted) if key not in raw.get(section, {})]
    if missing:
        raise SiteConfigFileError(f"{path}: {', '.join(missing)} missing; needed to join a federation "
                                  "(see configs/sites/leiden.toml)")
    address = str(raw["coordinator"]["address"])
    if ":" not in address or not address.rsplit(":", 1)[1].isdigit():
        raise SiteConfigFileError(f"{path} [coordinator] address: expected host:port, got {address!r}")
    base = Path(path).parent
    return SiteConnection(address, base / raw["coordinator"]["ca_certificate"],
                          base / raw["identity"]["private_key"], str(raw["site"]["task"]))


def load_site_config(path: Path) -> Site:
    raw = _read(path)
    site = raw.get("site", {})
    for key in ("name", "data_dir", "state_dir"):
        if key not in site:
            raise SiteConfigFileError(f"{path} [site]: '{key}' missing")
    base = Path(path).parent
    return Site(site["name"], base / site["data_dir"], base / site["state_dir"],
                policy_from_table(raw.get("policy", {}), f"{path} [policy]"))


def policy_from_table(table: dict, where: str) -> SitePolicy:
    return typed_from_table(SitePolicy, table, where)
