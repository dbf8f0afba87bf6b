"""What the coordinator keeps of each site from run to run: the key that signs the site's ledgers,
pinned, and the last privacy-ledger head the site's replies carried.

A site's own ledgers can be deleted, truncated or rolled back by someone with its disk; the
coordinator's copy of the head cannot be reached from there. Every pre-flight sends each site the
head recorded here, and a site whose ledger no longer holds it refuses to train (no fresh budget).
The key is pinned at enrolment (deployment: `ledger_key` beside the SuperNode key in the federation
file) or, when none was enrolled, on the site's first reply; a site whose replies are signed by
another key takes no part, and every run result records the pinned fingerprints.

The record is a JSON file: `<state_dir>/coordinator-record.json` in deployment, beside the virtual
sites' folders in simulation. Written atomically after every change.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from spine_fl.shared import protocol
from spine_fl.shared.files import atomic_write_json

RECORD_FILE = "coordinator-record.json"
ENROLMENT = "enrolment"
FIRST_REPLY = "first reply"


class CoordinatorRecordError(RuntimeError):
    pass


@dataclass
class CoordinatorRecord:
    path: Path | None  # None: kept in memory only (a test's or an ad-hoc run's)
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)
    enrolled_keys: Mapping[str, str] = field(default_factory=dict)  # site -> fingerprint from the federation file

    @classmethod
    def load(cls, path: Path | None, enrolled_keys: Mapping[str, str] | None = None) -> "CoordinatorRecord":
        sites: dict[str, dict[str, Any]] = {}
        if path is not None and Path(path).exists():
            try:
                raw = json.loads(Path(path).read_text())
                sites = dict(raw["sites"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise CoordinatorRecordError(
                    f"{path} cannot be read ({exc}); it holds the sites' pinned keys and ledger heads. Restore it "
                    "from backup; deleting it would let a site with a deleted ledger start from a fresh budget"
                ) from None
        return cls(Path(path) if path is not None else None, sites, dict(enrolled_keys or {}))

    def save(self) -> None:
        if self.path is not None:
            atomic_write_json(self.path, {"sites": self.sites})

    def pinned_key(self, site: str) -> tuple[str | None, str | None]:
        """(fingerprint, how it was pinned), or (None, None) when the site has none yet."""
        if site in self.enrolled_keys:
            return self.enrolled_keys[site], ENROLMENT
        entry = self.sites.get(site, {})
        return entry.get(protocol.LEDGER_KEY), entry.get("key_pinned_by")

    def key_problem(self, site: str, fingerprint: str) -> str | None:
        """Why a reply signed by `fingerprint` is not accepted from `site`, or None. A site without a
        pinned key gets this one pinned (trust on first use, recorded as such)."""
        pinned, how = self.pinned_key(site)
        if pinned is None:
            self.sites.setdefault(site, {}).update({protocol.LEDGER_KEY: fingerprint, "key_pinned_by": FIRST_REPLY,
                                                    "key_pinned_at": time.time()})
            self.save()
            return None
        if fingerprint != pinned:
            return (f"{site}'s ledgers are now signed by key {fingerprint}, not the key {pinned} pinned at {how}; its "
                    "replies are not accepted. If the site really replaced its key, re-enrol it "
                    "(`spine-fl enroll ... --ledger-key ... --replace`) after checking why")
        return None

    def heads(self) -> str:
        """LEDGER_HEADS for the pre-flight: each site's last recorded head (count and hash only)."""
        return json.dumps({site: {k: entry[k] for k in protocol.LEDGER_HEAD}
                           for site, entry in self.sites.items() if all(k in entry for k in protocol.LEDGER_HEAD)},
                          sort_keys=True)

    def record_reply(self, site: str, metrics: Mapping[str, Any]) -> None:
        """Keep the privacy-ledger head (and the lifetime epsilon at its delta) a train reply carried."""
        if not all(k in metrics for k in protocol.LEDGER_HEAD):
            return
        entry = self.sites.setdefault(site, {})
        entry.update({k: metrics[k] for k in protocol.LEDGER_HEAD})
        for key in (protocol.EPSILON_LIFETIME, protocol.DELTA):
            if key in metrics:
                entry[key] = float(metrics[key])
        entry["head_recorded_at"] = time.time()
        self.save()

    def summary(self, sites: list[str]) -> dict[str, dict[str, Any]]:
        """Per site, for the run result: the pinned key and how, and the last head recorded."""
        out = {}
        for site in sites:
            key, how = self.pinned_key(site)
            entry = self.sites.get(site, {})
            out[site] = {"ledger_key": key, "key_pinned_by": how,
                         **{k: entry.get(k) for k in (*protocol.LEDGER_HEAD, protocol.EPSILON_LIFETIME, protocol.DELTA)}}
        return out
