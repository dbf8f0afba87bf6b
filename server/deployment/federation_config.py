"""The coordinator's federation file (`configs/federation.toml`), read by `spine-fl server`.

    [federation]
    address = "0.0.0.0:9092"            # where the SuperLink listens; sites connect out to it
    state_dir = "../coordinator-state"   # Flower's database and spine-fl's per-round checkpoint
    out_dir = "../results/federation"    # model, metrics.json, plots
    ca_certificate = "../credentials/ca.crt"
    certificate = "../credentials/server.crt"
    private_key = "../credentials/server.key"

    [run]                                # the same settings as a simulation's [run]
    task = "tfesi_radiograph"
    ...

    [sites.leiden]                       # the enrolled sites: only these keys may connect
    public_key = "../credentials/leiden_supernode_key.pub"
    ledger_key = "../credentials/leiden_ledger_key.pub"   # pins the key that signs the site's ledgers

Relative paths are resolved against the file's folder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from spine_fl.shared.config import ConfigError, RunSettings, read_toml, run_from_table, typed_from_table
from spine_fl.shared.typed_table import collect, raise_problems

SITE_NAME = re.compile(r"^[A-Za-z0-9_-]+$")  # a site's name names its files and folders


@dataclass(frozen=True)
class FederationConfig:
    path: Path
    address: str
    state_dir: Path
    out_dir: Path
    ca_certificate: Path
    certificate: Path
    private_key: Path
    run: RunSettings
    sites: dict[str, Path]  # enrolled site -> its SuperNode public key
    ledger_keys: dict[str, Path]  # enrolled site -> its ledger public key (pinned; absent: pinned on first reply)

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    @property
    def host(self) -> str:
        return self.address.rsplit(":", 1)[0]


@dataclass(frozen=True)
class FederationTable:
    """[federation]: every key is required; paths are relative to the file."""

    address: str
    state_dir: str
    out_dir: str
    ca_certificate: str
    certificate: str
    private_key: str

    def __post_init__(self) -> None:
        if ":" not in self.address or not self.address.rsplit(":", 1)[1].isdigit():
            raise ConfigError(f"address = {self.address!r}: expected host:port, such as \"0.0.0.0:9092\"")


@dataclass(frozen=True)
class EnrolledSite:
    """[sites.<name>]: the site's SuperNode public key and ledger public key (added by `spine-fl enroll`)."""

    public_key: str
    ledger_key: str = ""



def load_federation(path: Path) -> FederationConfig:
    """The federation file, every problem of it reported together (ConfigError) before anything starts."""
    raw = read_toml(path, "federation file (see configs/federation.toml)")
    problems: list[str] = []
    unknown = sorted(set(raw) - {"federation", "run", "sites"})
    if unknown:
        problems.append(f"{path}: unknown section(s) {', '.join(unknown)}; allowed: federation, run, sites")
    fed = collect(problems, typed_from_table, FederationTable, raw.get("federation", {}), f"{path} [federation]")
    run = collect(problems, run_from_table, raw.get("run", {}), f"{path} [run]", Path(path).parent)
    base = Path(path).parent
    enrolled = raw.get("sites", {})
    if not isinstance(enrolled, dict):
        problems.append(f"{path} sites: expected [sites.<name>] tables, each with public_key = \"<file>.pub\"")
        enrolled = {}
    sites, ledger_keys = {}, {}
    for name, table in enrolled.items():
        if not SITE_NAME.match(name):
            problems.append(f"{path} [sites.{name}]: a site name uses letters, digits, '-' and '_' only (it names "
                            "files and folders); rename the table")
        if not isinstance(table, dict):
            problems.append(f"{path} [sites.{name}]: expected a table with public_key = \"<file>.pub\" (and "
                            "ledger_key = \"<file>.pub\")")
            continue
        entry = collect(problems, typed_from_table, EnrolledSite, table, f"{path} [sites.{name}]")
        if entry is not None:
            sites[name] = base / entry.public_key
            if entry.ledger_key:
                ledger_keys[name] = base / entry.ledger_key
    written = raw.get("run", {})
    min_sites = run.min_sites if run is not None else (written.get("min_sites", RunSettings.min_sites)
                                                       if isinstance(written, dict) else None)
    if isinstance(min_sites, int) and len(enrolled) < min_sites:  # also when other [run] settings are wrong
        problems.append(f"{path}: {len(enrolled)} enrolled site(s) but [run] min_sites = {min_sites}; "
                        "enrol more sites with `spine-fl enroll` or lower min_sites")
    raise_problems(problems)
    assert fed is not None and run is not None  # raise_problems raised otherwise
    return FederationConfig(Path(path), fed.address, base / fed.state_dir, base / fed.out_dir,
                            base / fed.ca_certificate, base / fed.certificate, base / fed.private_key, run, sites, ledger_keys)
