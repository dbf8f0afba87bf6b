"""Which site this ClientApp serves, and its validated data (loaded once per process).

Flower creates a fresh ClientApp object for every message; decoding a site's DICOMs each time
would dominate a round, so validated arrays are kept per process, keyed by what defines them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from flwr.app import Context

from spine_fl.shared.data_contract import SiteData, load_site
from spine_fl.shared.tasks import get_task

_CACHE: dict[tuple[str, str, int, float], SiteData] = {}


@dataclass(frozen=True)
class Site:
    name: str
    data_dir: Path


class SiteConfigError(ValueError):
    pass


def resolve_site(context: Context, site_dirs: Sequence[Path] | None) -> Site:
    """Simulation: the partition id picks one of site_dirs. Deployment: `--node-config 'site=... data-dir=...'`."""
    config = context.node_config
    if site_dirs is not None:
        index = int(config["partition-id"])
        return Site(Path(site_dirs[index]).name, Path(site_dirs[index]))
    if "data-dir" not in config:
        raise SiteConfigError("this SuperNode has no 'data-dir' in its node config; start it with "
                              "--node-config 'site=<name> data-dir=<folder>'")
    data_dir = Path(str(config["data-dir"]))
    return Site(str(config.get("site", data_dir.name)), data_dir)


def site_data(site: Site, task_name: str, image_size: int) -> SiteData:
    clinical = site.data_dir / "clinical.csv"
    stamp = clinical.stat().st_mtime if clinical.exists() else 0.0
    key = (str(site.data_dir.resolve()), task_name, image_size, stamp)
    if key not in _CACHE:
        _CACHE[key] = load_site(site.data_dir, get_task(task_name), image_size)
    return _CACHE[key]
