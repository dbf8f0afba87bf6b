"""The app bundle (Flower FAB) a coordinator submits, and the hash sites allow.

Flower builds a FAB deterministically (fixed zip dates, sorted files), so the same source tree
always gives the same SHA-256: the consortium publishes the hash of a release, each site puts it
in its policy (`allowed_bundles`), and `spine-fl bundle hash` recomputes it from any checkout.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import spine_fl


class BundleError(RuntimeError):
    pass


@dataclass(frozen=True)
class Bundle:
    content: bytes
    sha256: str


def project_root() -> Path:
    """The spine-fl source checkout this installation runs from (editable install)."""
    root = Path(spine_fl.__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        raise BundleError(f"no pyproject.toml beside {Path(spine_fl.__file__).parent}: the app bundle is built "
                          "from a spine-fl source checkout; install spine-fl with `pip install -e <checkout>`")
    return root


def build_bundle(root: Path | None = None) -> Bundle:
    from flwr.cli.build import build_fab_from_disk

    try:
        content = build_fab_from_disk(root or project_root())
    except (ValueError, OSError) as exc:
        raise BundleError(f"could not build the app bundle from {root or project_root()}: {exc}") from None
    return Bundle(content, hashlib.sha256(content).hexdigest())


def read_bundle(path: Path) -> Bundle:
    try:
        content = Path(path).read_bytes()
    except OSError as exc:
        raise BundleError(f"{path}: cannot read the app bundle ({exc.strerror})") from None
    return Bundle(content, hashlib.sha256(content).hexdigest())
