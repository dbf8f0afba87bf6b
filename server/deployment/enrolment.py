"""Adding a site's public key to the federation file's enrolled sites, keeping the file valid."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

from spine_fl.shared.config import ConfigError
from spine_fl.shared.files import atomic_write_bytes
from spine_fl.shared.runtime.credentials import load_site_public_key

SITE_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def enrol_public_key(federation: Path, site: str, key_file: Path) -> None:
    if not SITE_NAME.match(site):
        raise ConfigError(f"site name {site!r}: use letters, digits, '-' and '_' only")
    load_site_public_key(key_file)  # refuse a key Flower could not use
    text = federation.read_text() if federation.exists() else ""
    try:
        enrolled = tomllib.loads(text).get("sites", {})
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{federation}: not valid TOML ({exc})") from None
    if site in enrolled:
        raise ConfigError(f"{federation}: site {site} is already enrolled; edit [sites.{site}] to replace its key")
    relative = Path(key_file).resolve()
    try:
        relative = relative.relative_to(federation.resolve().parent)
    except ValueError:
        pass
    updated = text.rstrip("\n") + f"\n\n[sites.{site}]\npublic_key = {json.dumps(relative.as_posix())}\n"
    try:
        tomllib.loads(updated)
    except tomllib.TOMLDecodeError as exc:  # e.g. an inline `sites = {...}` table already in the file
        raise ConfigError(f"{federation}: cannot add [sites.{site}] to this file ({exc}); add it by hand") from None
    atomic_write_bytes(federation, updated.encode())
