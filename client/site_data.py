"""Which site this ClientApp serves, and its validated data (loaded once per process).

Flower creates a fresh ClientApp object for every message; decoding a site's DICOMs each time
would dominate a round, so validated arrays are kept per process, keyed by what defines them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from flwr.app import Context

from spine_fl.client.site_config import Site, load_site_config
from spine_fl.shared.contract.data_contract import SiteData, ValidationReport, load_site, validate_and_load
from spine_fl.shared.contract.task_file import task_sha256
from spine_fl.shared.contract.tasks import get_task

_CACHE: dict[tuple[str, str, int, float], SiteData] = {}


class SiteConfigError(ValueError):
    pass


def resolve_site(context: Context, sites: Sequence[Site] | None) -> Site:
    """Simulation: the partition id picks one of `sites`. Deployment: `--node-config 'site-config=FILE'`."""
    config = context.node_config
    if sites is not None:
        return sites[int(config["partition-id"])]
    if "site-config" not in config:
        raise SiteConfigError("this SuperNode has no 'site-config' in its node config; start it with "
                              "--node-config 'site-config=configs/sites/<site>.toml'")
    return load_site_config(Path(str(config["site-config"])))


def _key(site: Site, task_name: str, image_size: int) -> tuple[str, str, int, float]:
    """The folder, the task's definition (by hash: a changed definition under the same name loads anew),
    the size and the table's modification time."""
    clinical = site.data_dir / "clinical.csv"
    stamp = clinical.stat().st_mtime if clinical.exists() else 0.0
    return str(site.data_dir.resolve()), task_sha256(get_task(task_name)), image_size, stamp


def validate_site_data(site: Site, task_name: str, image_size: int) -> ValidationReport:
    """Validate the site's data; usable arrays are kept, so a round at this size need not decode again."""
    data, report = validate_and_load(site.data_dir, get_task(task_name), image_size)
    if data is not None:
        _CACHE[_key(site, task_name, image_size)] = data
    return report


def site_data(site: Site, task_name: str, image_size: int) -> SiteData:
    key = _key(site, task_name, image_size)
    if key not in _CACHE:
        _CACHE[key] = load_site(site.data_dir, get_task(task_name), image_size)
    return _CACHE[key]
