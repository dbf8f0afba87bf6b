"""What the coordinator keeps of each site from run to run: the key that signs the site's ledgers,
pinned, and the last privacy-ledger head the site's replies carried.

A site's own ledgers can be deleted, truncated or rolled back by someone with its disk; the
coordinator's copy of the head cannot be reached from there. Every pre-flight sends each site the
head recorded here, and a site whose ledger no longer holds it refuses to train (no fresh budget).
The key is pinned at enrolment (deployment: `ledger_key` beside the SuperNode key in the federation
file) or, when none was enrolled, on the site's first pre-flight reply (trust on first use, recorded
as "first reply": in simulation that is how every key is pinned); a site whose replies are signed by
another key takes no part, and every run result records the pinned fingerprints.

A fingerprint in a reply is only a claim. Every pre-flight reply must prove the key
(`preflight_problem`): it carries the public key, whose fingerprint must be the pinned one (or, once
recorded, the very public key pinned), and a signature by it over the run key, the round and the
nonce the coordinator sent in that request. A reply that does not verify (a copied fingerprint
without the key, a signature replayed from an earlier pre-flight) is treated like a wrong key. The
public key is pinned beside its fingerprint on the first reply that proves it; an enrolled key may be
given as the fingerprint or as the raw public key (64 hex digits).

The record is a JSON file: `<state_dir>/coordinator-record.json` in deployment, beside the virtual
sites' folders in simulation. Written atomically after every change.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from spine_fl.shared import protocol
from spine_fl.shared.files import atomic_write_json
from spine_fl.shared.runtime.credentials import key_fingerprint

RECORD_FILE = "coordinator-record.json"
ENROLMENT = "enrolment"
FIRST_REPLY = "first reply"


class CoordinatorRecordError(RuntimeError):
    pass


def _public_key(hex_key: str) -> Ed25519PublicKey | None:
    try:
        return Ed25519PublicKey.from_public_bytes(bytes.fromhex(hex_key))
    except ValueError:
        return None


def _enrolled(value: str) -> tuple[str, str | None]:
    """(fingerprint, raw public key in hex or None) of an enrolled key given either way."""
    public = None if value.startswith("sha256:") else _public_key(value)
    return (key_fingerprint(public), value.lower()) if public is not None else (value, None)


def preflight_statement(answer: Mapping[str, Any], run_key: str, server_round: int, nonce: str) -> bytes:
    """What a pre-flight reply's signature covers (shared/protocol.py, "Pre-flight"): the request's run
    key, round and nonce as the coordinator sent them, and the reply's PREFLIGHT_SIGNED fields."""
    statement = {"context": protocol.PREFLIGHT_CONTEXT, protocol.RUN_KEY: run_key, protocol.ROUND: server_round,
                 protocol.PREFLIGHT_NONCE: nonce, **{k: answer.get(k) for k in protocol.PREFLIGHT_SIGNED}}
    return json.dumps(statement, sort_keys=True, separators=(",", ":"), allow_nan=True).encode()


@dataclass
class CoordinatorRecord:
    path: Path | None  # None: kept in memory only (a test's or an ad-hoc run's)
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)
    enrolled_keys: Mapping[str, str] = field(default_factory=dict)  # site -> fingerprint from the federation file
    enrolled_public_keys: Mapping[str, str] = field(default_factory=dict)  # site -> raw public key (hex), if enrolled so

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
        enrolled = {site: _enrolled(str(value)) for site, value in (enrolled_keys or {}).items()}
        return cls(Path(path) if path is not None else None, sites, {site: fp for site, (fp, _) in enrolled.items()},
                   {site: public for site, (_, public) in enrolled.items() if public})

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

    def pinned_public_key(self, site: str) -> str | None:
        """The raw public key (hex) pinned for `site`: enrolled, or recorded from the first reply that proved it."""
        return self.enrolled_public_keys.get(site) or self.sites.get(site, {}).get(protocol.LEDGER_PUBLIC_KEY)

    def preflight_problem(self, site: str, answer: Mapping[str, Any], run_key: str, server_round: int,
                          nonce: str) -> str | None:
        """Why a ready pre-flight answer from `site` does not prove the pinned key, or None. It must carry
        a public key with the fingerprint it claims (the pinned one) and a signature by that key over
        this request's run key, round and `nonce`. A site without a pinned key gets this one pinned
        (trust on first use, recorded as such), public key and fingerprint, once the signature verifies."""
        claimed, hex_key = str(answer.get(protocol.LEDGER_KEY, "")), str(answer.get(protocol.LEDGER_PUBLIC_KEY, ""))
        public = _public_key(hex_key)
        if public is None:
            return (f"{site}'s pre-flight reply claims ledger key {claimed or '(none)'} but carries no Ed25519 "
                    "public key to prove it; its replies are not accepted")
        fingerprint = key_fingerprint(public)
        if claimed != fingerprint:
            return (f"{site}'s pre-flight reply claims ledger key {claimed} but carries the public key {fingerprint}: "
                    "a copied fingerprint proves nothing; its replies are not accepted")
        try:
            signature = bytes.fromhex(str(answer.get(protocol.PREFLIGHT_SIGNATURE_R, "")) +
                                      str(answer.get(protocol.PREFLIGHT_SIGNATURE_S, "")))
            public.verify(signature, preflight_statement(answer, run_key, server_round, nonce))
        except (ValueError, InvalidSignature):
            return (f"{site}'s pre-flight reply is not signed by the key {fingerprint} it names, for this request "
                    f"(run {run_key}, round {server_round}, the nonce just sent): forged, or replayed from an earlier "
                    "pre-flight; its replies are not accepted")
        problem = self.key_problem(site, fingerprint)
        if problem:
            return problem
        pinned = self.pinned_public_key(site)
        if pinned is None:
            self.sites.setdefault(site, {})[protocol.LEDGER_PUBLIC_KEY] = hex_key.lower()
            self.save()
        elif pinned != hex_key.lower():
            return (f"{site}'s pre-flight reply carries a public key other than the one pinned for it; its replies "
                    "are not accepted")
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
