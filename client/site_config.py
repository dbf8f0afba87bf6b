"""A site's own configuration file (`configs/sites/<site>.toml`), read only at the site.

    [site]
    name = "leiden"
    data_dir = "/data/spine-fl/leiden"        # the site data contract's folder
    state_dir = "/var/lib/spine-fl/leiden"    # privacy ledger, egress ledger, signing key

    [policy]                                  # see client/policy.py for every rule and default
    epsilon_lifetime = 20.0
    ...

Relative paths are resolved against the file's folder.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from spine_fl.shared.config import ConfigError, typed_from_table

from .policy import SitePolicy


@dataclass(frozen=True)
class Site:
    name: str
    data_dir: Path
    state_dir: Path
    policy: SitePolicy


class SiteConfigFileError(ConfigError):
    pass


def load_site_config(path: Path) -> Site:
    try:
        raw = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SiteConfigFileError(f"{path}: site config not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise SiteConfigFileError(f"{path}: not valid TOML ({exc})") from None
    site = raw.get("site", {})
    for key in ("name", "data_dir", "state_dir"):
        if key not in site:
            raise SiteConfigFileError(f"{path} [site]: '{key}' missing")
    base = Path(path).parent
    return Site(site["name"], base / site["data_dir"], base / site["state_dir"],
                policy_from_table(raw.get("policy", {}), f"{path} [policy]"))


def policy_from_table(table: dict, where: str) -> SitePolicy:
    return typed_from_table(SitePolicy, table, where)
