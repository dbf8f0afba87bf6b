"""The site's signed, hash-chained egress ledger: one JSON line per message that leaves the site.

Each line carries the SHA-256 of the previous line and an Ed25519 signature (the site's key,
created on first use with 0600 permissions) over its canonical JSON. A signed head file holds the
last line's number and hash, so truncating the ledger is caught too. Verification therefore
detects an edited, deleted, inserted or reordered line, and names the first one that breaks.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

GENESIS = "0" * 64
LEDGER_FILE = "egress.jsonl"
HEAD_FILE = "egress.head"
KEY_FILE = "site_ed25519.pem"
PUBLIC_KEY_FILE = "site_ed25519.pub"


def _canonical(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=True).encode()


def load_or_create_key(state_dir: Path) -> Ed25519PrivateKey:
    path = Path(state_dir) / KEY_FILE
    if path.exists():
        if path.stat().st_mode & 0o077:
            raise PermissionError(f"{path} is readable by others; run: chmod 600 {path}")
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        assert isinstance(key, Ed25519PrivateKey)
        return key
    path.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (Path(state_dir) / PUBLIC_KEY_FILE).write_bytes(public)
    return key


class EgressLedger:
    def __init__(self, state_dir: Path):
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / LEDGER_FILE
        self.head = self.state_dir / HEAD_FILE

    def append(self, entry: dict[str, Any]) -> dict[str, Any]:
        """Sign and append one line (under a file lock); returns the line as written."""
        key = load_or_create_key(self.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / ".egress.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            seq, prev = self._tail()
            payload = {**entry, "seq": seq, "prev_sha256": prev}
            payload["signature"] = base64.b64encode(key.sign(_canonical(payload))).decode()
            line = _canonical(payload) + b"\n"
            with self.path.open("ab") as handle:
                handle.write(line)
                handle.flush()
                os.fsync(handle.fileno())
            self._write_head(key, seq, hashlib.sha256(line.rstrip(b"\n")).hexdigest())
        return payload

    def _tail(self) -> tuple[int, str]:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return 0, GENESIS
        last = self.path.read_bytes().rstrip(b"\n").split(b"\n")[-1]
        return int(json.loads(last)["seq"]) + 1, hashlib.sha256(last).hexdigest()

    def _write_head(self, key: Ed25519PrivateKey, seq: int, sha: str) -> None:
        head = {"seq": seq, "sha256": sha}
        head["signature"] = base64.b64encode(key.sign(_canonical(head))).decode()
        tmp = self.head.with_suffix(".tmp")
        tmp.write_bytes(_canonical(head))
        os.replace(tmp, self.head)


@dataclass
class Verification:
    ok: bool
    lines: int
    first_broken_line: int | None = None
    problem: str = ""


def verify(state_dir: Path, public_key: Ed25519PublicKey | None = None) -> Verification:
    """Check every signature and link; the line numbers are 1-based lines of egress.jsonl."""
    state_dir = Path(state_dir)
    if public_key is None:
        pub_path = state_dir / PUBLIC_KEY_FILE
        if not pub_path.exists():
            return Verification(False, 0, None, f"{pub_path} missing: cannot check signatures")
        loaded = serialization.load_pem_public_key(pub_path.read_bytes())
        assert isinstance(loaded, Ed25519PublicKey)
        public_key = loaded
    ledger = EgressLedger(state_dir)
    raw_lines = ledger.path.read_bytes().splitlines() if ledger.path.exists() else []
    prev = GENESIS
    for number, raw in enumerate(raw_lines, start=1):
        try:
            payload = json.loads(raw)
            signature = base64.b64decode(payload.pop("signature"))
        except (json.JSONDecodeError, KeyError, ValueError):
            return Verification(False, len(raw_lines), number, "not a signed ledger line")
        try:
            public_key.verify(signature, _canonical(payload))
        except InvalidSignature:
            return Verification(False, len(raw_lines), number, "signature does not match the line's content")
        if payload.get("seq") != number - 1 or payload.get("prev_sha256") != prev:
            return Verification(False, len(raw_lines), number, "chain broken: a line before it was removed, "
                                "inserted or reordered")
        prev = hashlib.sha256(raw).hexdigest()
    if ledger.head.exists():
        head = json.loads(ledger.head.read_bytes())
        signature = base64.b64decode(head.pop("signature"))
        try:
            public_key.verify(signature, _canonical(head))
        except InvalidSignature:
            return Verification(False, len(raw_lines), None, "head file signature invalid")
        if head["seq"] != len(raw_lines) - 1 or head["sha256"] != prev:
            return Verification(False, len(raw_lines), min(len(raw_lines), head["seq"] + 1) + 1,
                                f"ledger ends at line {len(raw_lines)} but the signed head records line "
                                f"{head['seq'] + 1}: lines were deleted from the end or the ledger was replaced")
    elif raw_lines:
        return Verification(False, len(raw_lines), None, "head file missing")
    return Verification(True, len(raw_lines))
