"""A signed, hash-chained JSON-lines log with a signed head: the machinery both site ledgers share.

Each line is the canonical JSON of an entry plus `seq` (0-based), `prev_sha256` (the SHA-256 of the
previous line's bytes, 64 zeros for the first) and `signature` (Ed25519, base64, by the site's key,
over the canonical JSON of the line without its signature). A head file beside the log holds the
last line's `seq` and `sha256`, signed too, so dropping lines from the end is caught. Verification
detects an edited, deleted, inserted or reordered line and names the first one that breaks.

The site key (`site_ed25519.pem`, mode 0600, created on first use) and its public half
(`site_ed25519.pub`) live in the site's state folder; the egress ledger (egress_ledger.py) and the
privacy ledger (privacy_ledger.py) are two SignedLogs signed by that one key.
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

from spine_fl.shared.runtime.credentials import key_fingerprint

GENESIS = "0" * 64
KEY_FILE = "site_ed25519.pem"
PUBLIC_KEY_FILE = "site_ed25519.pub"
CHAIN_FIELDS = ("seq", "prev_sha256", "signature")  # what the log adds to each entry


def canonical(payload: dict[str, Any]) -> bytes:
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


def site_key_fingerprint(state_dir: Path) -> str:
    """The fingerprint of the key that signs this site's ledgers (created on first use)."""
    return key_fingerprint(load_or_create_key(state_dir).public_key())


def load_public_key(state_dir: Path) -> Ed25519PublicKey | None:
    """The site's public key (`site_ed25519.pub`), or None when the file is missing."""
    path = Path(state_dir) / PUBLIC_KEY_FILE
    if not path.exists():
        return None
    loaded = serialization.load_pem_public_key(path.read_bytes())
    assert isinstance(loaded, Ed25519PublicKey)
    return loaded


@dataclass
class Verification:
    ok: bool
    lines: int
    first_broken_line: int | None = None
    problem: str = ""


class SignedLog:
    """One signed log file (`path`), its head (`head`), signed by the key in `key_dir`."""

    def __init__(self, path: Path, head: Path, key_dir: Path, lock: Path):
        self.path, self.head, self.key_dir, self.lock = Path(path), Path(head), Path(key_dir), Path(lock)

    def exists(self) -> bool:
        return self.path.exists() or self.head.exists()

    def append(self, entry: dict[str, Any]) -> dict[str, Any]:
        """Sign and append one line, fsync'd, under a file lock; returns the line as written."""
        key = load_or_create_key(self.key_dir)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            seq, prev = self._tail()
            payload = {**entry, "seq": seq, "prev_sha256": prev}
            payload["signature"] = base64.b64encode(key.sign(canonical(payload))).decode()
            line = canonical(payload) + b"\n"
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
        head: dict[str, Any] = {"seq": seq, "sha256": sha}
        head["signature"] = base64.b64encode(key.sign(canonical(head))).decode()
        tmp = self.head.with_suffix(".tmp")
        tmp.write_bytes(canonical(head))
        os.replace(tmp, self.head)

    def contains(self, lines: int, sha256: str) -> bool:
        """Does line number `lines` (1-based) exist with SHA-256 `sha256`? A log that was truncated,
        rolled back or replaced since someone noted that head does not."""
        raw = self.raw_lines()
        return 1 <= lines <= len(raw) and hashlib.sha256(raw[lines - 1]).hexdigest() == sha256

    def last(self) -> tuple[int, str]:
        """(number of lines, SHA-256 of the last line): the head another party can hold the log to."""
        raw = self.raw_lines()
        return len(raw), hashlib.sha256(raw[-1]).hexdigest() if raw else GENESIS

    def raw_lines(self) -> list[bytes]:
        return self.path.read_bytes().splitlines() if self.path.exists() else []

    def readable_lines(self) -> list[dict[str, Any] | None]:
        """Every line parsed as it stands, unverified (None where a line is not a JSON object): for
        readers that must see what a broken log still shows, line numbers kept."""
        out: list[dict[str, Any] | None] = []
        for raw in self.raw_lines():
            try:
                entry = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                entry = None
            out.append(entry if isinstance(entry, dict) else None)
        return out

    def verify(self, public_key: Ed25519PublicKey | None = None) -> Verification:
        """Check every signature and link; line numbers are 1-based lines of the log file."""
        return self.snapshot(public_key)[0]

    def entries(self, public_key: Ed25519PublicKey | None = None) -> tuple[Verification, list[dict[str, Any]]]:
        """The verification and, when it passes, every line's entry without the chain fields."""
        result, snapshot = self.snapshot(public_key)
        return result, snapshot.entries() if result.ok else []

    def snapshot(self, public_key: Ed25519PublicKey | None = None) -> tuple[Verification, Snapshot]:
        """The verification and the log as it was verified (empty when it does not verify): one read of
        the file, in time proportional to the lines added since this process last verified it."""
        if public_key is None:
            public_key = load_public_key(self.key_dir)
            if public_key is None:
                return Verification(False, 0, None, f"{self.key_dir / PUBLIC_KEY_FILE} missing: "
                                    "cannot check signatures"), Snapshot([], [])
        raw_lines = self.raw_lines()
        cache_key = (str(self.path.resolve()), public_key.public_bytes(serialization.Encoding.Raw,
                                                                       serialization.PublicFormat.Raw))
        result, verified = _verify_lines(raw_lines, self.head, public_key, _still_verified(cache_key, raw_lines))
        if not result.ok:
            _VERIFIED.pop(cache_key, None)
            return result, Snapshot([], [])
        _VERIFIED[cache_key] = verified
        return result, Snapshot(raw_lines, verified.payloads)


@dataclass(frozen=True)
class Snapshot:
    """A log as it verified: its lines' bytes and their payloads (signature removed; shared with the
    verification cache, so read through `entries`, which copies)."""

    raw: list[bytes]
    payloads: list[dict[str, Any]]

    @property
    def lines(self) -> int:
        return len(self.raw)

    def line_sha256(self, number: int) -> str:
        """SHA-256 of line `number` (1-based; GENESIS for 0). In a log that verifies, each line names
        the hash of the one before it, so this one hash pins every line up to `number`."""
        return hashlib.sha256(self.raw[number - 1]).hexdigest() if number else GENESIS

    def entries(self, start: int = 0) -> list[dict[str, Any]]:
        """The entries of the lines after the first `start`, without the chain fields."""
        return [{k: v for k, v in p.items() if k not in CHAIN_FIELDS} for p in self.payloads[start:]]


@dataclass(frozen=True)
class _Verified:
    """The lines of a log already verified in this process: their bytes' hash, their payloads, and the
    hashes of the last two lines (where the chain goes on, and what a head one line behind names)."""

    lines: int
    prefix_sha256: str
    payloads: list[dict[str, Any]]
    prev: str = GENESIS
    before_last: str = GENESIS


# Verification in time proportional to the new lines: a log that only grew since this process last
# verified it (its earlier lines byte for byte the same: checked by one hash over them) has only
# its new lines' signatures and links checked, and its head always. Any change to an earlier line
# changes that hash, and the whole log is verified again.
_VERIFIED: dict[tuple[str, bytes], _Verified] = {}


def _prefix_sha256(raw_lines: list[bytes]) -> str:
    return hashlib.sha256(b"\n".join(raw_lines)).hexdigest()


def _still_verified(key: tuple[str, bytes], raw_lines: list[bytes]) -> _Verified:
    known = _VERIFIED.get(key)
    if known is None or len(raw_lines) < known.lines or _prefix_sha256(raw_lines[:known.lines]) != known.prefix_sha256:
        return _Verified(0, _prefix_sha256([]), [])
    return known


def _verify_lines(raw_lines: list[bytes], head_path: Path, public_key: Ed25519PublicKey,
                  done: _Verified) -> tuple[Verification, _Verified]:
    n = len(raw_lines)
    payloads = list(done.payloads)
    before_last, prev = done.before_last, done.prev
    for number, raw in enumerate(raw_lines[done.lines:], start=done.lines + 1):
        try:
            payload = json.loads(raw)
            signature = base64.b64decode(payload.pop("signature"))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, ValueError, TypeError, AttributeError):
            return Verification(False, n, number, "not a signed ledger line"), done
        try:
            public_key.verify(signature, canonical(payload))
        except InvalidSignature:
            return Verification(False, n, number, "signature does not match the line's content"), done
        if payload.get("seq") != number - 1 or payload.get("prev_sha256") != prev:
            return Verification(False, n, number, "chain broken: a line before it was removed, "
                                "inserted or reordered"), done
        before_last, prev = prev, hashlib.sha256(raw).hexdigest()
        payloads.append(payload)
    if head_path.exists():
        try:
            head = json.loads(head_path.read_bytes())
            signature = base64.b64decode(head.pop("signature"))
            seq, sha = int(head["seq"]), head["sha256"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, ValueError, TypeError, AttributeError):
            return Verification(False, n, None, "head file unreadable"), done
        try:
            public_key.verify(signature, canonical(head))
        except InvalidSignature:
            return Verification(False, n, None, "head file signature invalid"), done
        # A process killed between a line's fsync and the head's replacement leaves the head one
        # line behind a signed, chained last line: that is a crash, not a truncation, and the line's
        # spending counts. Anything else that disagrees with the head is refused.
        crashed_before_head = n >= 2 and seq == n - 2 and sha == before_last
        if (seq != n - 1 or sha != prev) and not crashed_before_head:
            return Verification(False, n, min(n, seq + 1) + 1,
                                f"ledger ends at line {n} but the signed head records line "
                                f"{seq + 1}: lines were deleted from the end or the ledger was replaced"), done
    elif raw_lines:
        return Verification(False, n, None, "head file missing"), done
    prefix = done.prefix_sha256 if n == done.lines else _prefix_sha256(raw_lines)  # hashed once when nothing new
    return Verification(True, n), _Verified(n, prefix, payloads, prev, before_last)
