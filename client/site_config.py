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
from dataclasses import dataclass, fields
from pathlib import Path

from .policy import SitePolicy


@dataclass(frozen=True)
class Site:
    name: str
    data_dir: Path
    state_dir: Path
    policy: SitePolicy


class SiteConfigFileError(ValueError):
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
    allowed = {f.name for f in fields(SitePolicy)}
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise SiteConfigFileError(f"{where}: unknown rule(s) {', '.join(unknown)}; rules: {', '.join(sorted(allowed))}")
    try:
        return SitePolicy(**table)
    except (TypeError, ValueError) as exc:
        raise SiteConfigFileError(f"{where}: {exc}") from None
