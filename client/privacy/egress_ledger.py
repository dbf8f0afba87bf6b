"""The site's signed, hash-chained egress ledger: one JSON line per message that leaves the site.

A SignedLog (client/privacy/signed_log.py: hash chain, Ed25519 signatures by the site's key, a
signed head against truncation), shared with the privacy ledger; verification names the first
edited, deleted, inserted or reordered line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from spine_fl.client.privacy.signed_log import (
    GENESIS,
    KEY_FILE,
    PUBLIC_KEY_FILE,
    SignedLog,
    Verification,
    load_or_create_key,
)
from spine_fl.shared import protocol
from spine_fl.shared.refusal import Refusal

__all__ = ["GENESIS", "HEAD_FILE", "KEY_FILE", "LEDGER_FILE", "PUBLIC_KEY_FILE", "EgressLedger", "Verification",
           "dp_train_spending", "load_or_create_key", "sites_named", "verify"]

LEDGER_FILE = "egress.jsonl"
HEAD_FILE = "egress.head"


class EgressLedger:
    def __init__(self, state_dir: Path):
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / LEDGER_FILE
        self.head = self.state_dir / HEAD_FILE
        self.log = SignedLog(self.path, self.head, self.state_dir, self.state_dir / ".egress.lock")

    def append(self, entry: dict[str, Any]) -> dict[str, Any]:
        """Sign and append one line (under a file lock); returns the line as written."""
        return self.log.append(entry)


def sites_named(state_dir: Path) -> set[str]:
    """The site names the ledger's lines carry: each line's `site` (recorded since issue 10) and the
    site inside any refusal it records. Unreadable lines are skipped (`verify` names them)."""
    names: set[str] = set()
    for line in EgressLedger(state_dir).log.readable_lines():
        if line is None:
            continue
        if isinstance(line.get("site"), str):
            names.add(line["site"])
        error = line.get("error")
        refusal = Refusal.parse(str(error.get("reason", ""))) if isinstance(error, dict) else None
        if refusal and isinstance(refusal.get("site"), str) and refusal["site"]:
            names.add(refusal["site"])
    return names


def dp_train_spending(state_dir: Path) -> tuple[list[dict[str, Any]], Verification]:
    """The DP train replies the egress ledger records (a train reply without error that reported a
    lifetime epsilon), and the ledger's verification. When the ledger does not verify, its readable
    lines are still read: spending they show is evidence, not something to trust away."""
    ledger = EgressLedger(state_dir)
    result, entries = ledger.log.entries()
    if not result.ok:
        entries = [entry for entry in ledger.log.readable_lines() if entry is not None]
    spent = []
    for entry in entries:
        metrics = entry.get("metrics") if isinstance(entry.get("metrics"), dict) else {}
        eps = entry.get("epsilon", metrics.get(protocol.fit_metric(protocol.EPSILON_LIFETIME)))
        if (str(entry.get("kind", "")).startswith("train") and not entry.get("error")
                and isinstance(eps, (int, float)) and not isinstance(eps, bool)):
            spent.append({**entry, "epsilon": float(eps)})
    return spent, result


def verify(state_dir: Path, public_key: Ed25519PublicKey | None = None) -> Verification:
    """Check every signature and link; the line numbers are 1-based lines of egress.jsonl."""
    return EgressLedger(state_dir).log.verify(public_key)
