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

Relative paths are resolved against the file's folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from spine_fl.shared.config import ConfigError, RunSettings, read_toml, typed_from_table


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

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    @property
    def host(self) -> str:
        return self.address.rsplit(":", 1)[0]


FEDERATION_KEYS = {"address", "state_dir", "out_dir", "ca_certificate", "certificate", "private_key"}


def load_federation(path: Path) -> FederationConfig:
    raw = read_toml(path, "federation file (see configs/federation.toml)")
    unknown = sorted(set(raw) - {"federation", "run", "sites"})
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {', '.join(unknown)}; allowed: federation, run, sites")
    fed = raw.get("federation", {})
    missing = sorted(FEDERATION_KEYS - set(fed))
    extra = sorted(set(fed) - FEDERATION_KEYS)
    if missing or extra:
        raise ConfigError(f"{path} [federation]: " + "; ".join(
            ([f"missing {', '.join(missing)}"] if missing else []) + ([f"unknown {', '.join(extra)}"] if extra else [])))
    if ":" not in str(fed["address"]) or not str(fed["address"]).rsplit(":", 1)[1].isdigit():
        raise ConfigError(f"{path} [federation] address: expected host:port, got {fed['address']!r}")
    base = Path(path).parent
    sites = {}
    for name, table in raw.get("sites", {}).items():
        if not isinstance(table, dict) or set(table) != {"public_key"}:
            raise ConfigError(f"{path} [sites.{name}]: expected exactly one key, public_key = \"<file>.pub\"")
        sites[name] = base / table["public_key"]
    run = typed_from_table(RunSettings, raw.get("run", {}), f"{path} [run]")
    if len(sites) < run.min_sites:
        raise ConfigError(f"{path}: {len(sites)} enrolled site(s) but [run] min_sites = {run.min_sites}; "
                          "enrol more sites with `spine-fl enroll` or lower min_sites")
    return FederationConfig(Path(path), str(fed["address"]), base / fed["state_dir"], base / fed["out_dir"],
                            base / fed["ca_certificate"], base / fed["certificate"], base / fed["private_key"],
                            run, sites)
