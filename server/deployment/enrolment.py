"""Adding a site's public key to the federation file's enrolled sites, keeping the file valid.

The file is edited with tomlkit, so every comment, blank line and the order of its tables survive;
it is replaced atomically, never left half-written."""

from __future__ import annotations

import tomllib
from pathlib import Path

import tomlkit
from tomlkit.exceptions import TOMLKitError
from tomlkit.items import InlineTable

from spine_fl.server.deployment.federation_config import SITE_NAME
from spine_fl.shared.config import ConfigError
from spine_fl.shared.files import atomic_write_bytes
from spine_fl.shared.runtime.credentials import ledger_key_fingerprint, load_site_public_key


def _relative(path: Path, federation: Path) -> str:
    resolved = Path(path).resolve()
    try:
        return resolved.relative_to(federation.resolve().parent).as_posix()
    except ValueError:
        return resolved.as_posix()


def enrol_public_key(federation: Path, site: str, key_file: Path, replace: bool = False,
                     ledger_key: Path | None = None) -> bool:
    """Set [sites.<site>] public_key (and ledger_key) in the federation file; True if it replaced the
    site's earlier entry.

    An enrolled site's keys are replaced only when asked (`replace`): a SuperNode key swapped by
    mistake or by someone else would let another machine train as that site, and a swapped ledger key
    would let someone re-sign the site's ledgers."""
    if not SITE_NAME.match(site):
        raise ConfigError(f"site name {site!r}: use letters, digits, '-' and '_' only")
    load_site_public_key(key_file)  # refuse a key Flower could not use
    if ledger_key is not None:
        ledger_key_fingerprint(ledger_key)  # refuse a file that is not an Ed25519 public key
    text = federation.read_text() if federation.exists() else ""
    try:
        tomllib.loads(text)  # tomlkit's parser is more lenient; refuse what the coordinator could not read
        document = tomlkit.parse(text)
    except (tomllib.TOMLDecodeError, TOMLKitError) as exc:
        raise ConfigError(f"{federation}: not valid TOML ({exc})") from None
    keys = {"public_key": _relative(key_file, federation)}
    if ledger_key is not None:
        keys["ledger_key"] = _relative(ledger_key, federation)
    sites = document.get("sites")
    if sites is None:
        sites = tomlkit.table(is_super_table=True)  # written as [sites.<name>] headers, no bare [sites]
        document.append("sites", sites)
    elif not isinstance(sites, dict):
        raise ConfigError(f"{federation}: `sites` is not a table; enrolled sites are [sites.<name>] tables")
    existing = sites.get(site)
    replaced = existing is not None
    if replaced and not replace:
        raise ConfigError(f"{federation}: {site} is already enrolled; pass --replace to change its key (only "
                          "when the site has sent a new one)")
    try:
        if isinstance(existing, dict):
            existing.update(keys)  # the table keeps its place and its comments
        else:
            entry = tomlkit.inline_table() if isinstance(sites, InlineTable) else tomlkit.table()
            entry.update(keys)
            if not isinstance(entry, InlineTable) and list(document)[-1] != "sites":
                entry.add(tomlkit.nl())  # a blank line before the table that follows
            if replaced:
                sites[site] = entry
            else:
                sites.append(site, entry)
        updated = tomlkit.dumps(document)
        tomllib.loads(updated)
    except (tomllib.TOMLDecodeError, TOMLKitError) as exc:
        raise ConfigError(f"{federation}: cannot set [sites.{site}] in this file ({exc}); edit it by hand") from None
    atomic_write_bytes(federation, updated.encode())
    return replaced
