"""Fewer transfer objects per message on the deployment engine: a lossless framing of a message's
records, applied by spine-fl's two long-lived workers (the coordinator's ServerApp worker and each
site's ClientApp worker) and undone by the other one before any app code sees the message.

Why: Flower 1.41 moves a message as a tree of objects, one HTTP request per object on every hop
(ServerApp -> SuperLink -> SuperNode -> ClientApp and back), each through the SuperLink's single
Python process, which every site and the coordinator share. Each Array is two objects (the array
and its chunk), each record one more: the small CNN's 16 arrays cost about 35 requests per message
and hop, about 3 s for each message carrying the model on 2 cores, twice a round; a fit or evaluate
reply's four or five small records (status, loss, counts, metrics, SecAgg+ values) one request each.
Packed:
- an array record with more than one array is one Array (one chunk per 5 MB): 3 objects instead
  of 1 + 2 x arrays;
- a message's config and metric records, when there are two or more, are one ConfigRecord holding
  their deflated bytes: a reply is Message + RecordDict + one record.

What it changes: nothing but the framing. Each array's dtype, shape, serialisation type and bytes,
each record's items (Flower's own serialisation of the record) and the records' order arrive
exactly as sent; the site's egress ledger describes and hashes the reply as the app produced it,
before it is packed. A packed record is recognised by its reserved name and shape; anything
malformed is refused with a clear error, never guessed at. The simulation engine and `flwr run`
neither pack nor unpack.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode

PACKED_KEY = "spine-fl.packed"
PACKED_STYPE = "spine-fl.packed-arrays/v1"
PACKED_RECORDS = "spine-fl.packed-records/v1"  # the RecordDict entry holding the packed small records
_RECORD_KINDS: dict[str, type[ConfigRecord] | type[MetricRecord]] = {"config": ConfigRecord, "metric": MetricRecord}
_HEADER_LENGTH = struct.Struct(">Q")
MAX_HEADER_BYTES = 64 * 1024 * 1024


class PackingError(ValueError):
    """A packed record that cannot be unpacked exactly."""


def _frame(header: dict[str, Any], bodies: list[bytes]) -> bytes:
    encoded = json.dumps(header, separators=(",", ":")).encode()
    return b"".join([_HEADER_LENGTH.pack(len(encoded)), encoded, *bodies])


def _unframe(data: bytes, what: str) -> tuple[dict[str, Any], int]:
    """The header and the offset where the bodies start."""
    if len(data) < _HEADER_LENGTH.size:
        raise PackingError(f"{what}: shorter than its header")
    (header_len,) = _HEADER_LENGTH.unpack_from(data)
    start = _HEADER_LENGTH.size + header_len
    if header_len > MAX_HEADER_BYTES or start > len(data):
        raise PackingError(f"{what}: header length beyond the data")
    try:
        header = json.loads(data[_HEADER_LENGTH.size:start])
    except ValueError as exc:
        raise PackingError(f"{what}: unreadable header ({exc})") from None
    if not isinstance(header, dict):
        raise PackingError(f"{what}: unreadable header")
    return header, start


def _slices(data: bytes, start: int, entries: Any, what: str) -> list[tuple[dict[str, Any], bytes]]:
    """(entry, body) for each entry's "size" bytes, in order; every byte accounted for."""
    if not isinstance(entries, list):
        raise PackingError(f"{what}: header lists nothing")
    out, view = [], memoryview(data)
    for entry in entries:
        size = entry.get("size") if isinstance(entry, dict) else None
        if not isinstance(size, int) or size < 0:
            raise PackingError(f"{what}: malformed entry {entry!r:.200}")
        if start + size > len(data):
            raise PackingError(f"{what}: entry {entry.get('key')!r} runs past the end of the data")
        out.append((entry, bytes(view[start:start + size])))
        start += size
    if start != len(data):
        raise PackingError(f"{what}: {len(data) - start} byte(s) after the last entry")
    return out


# --- arrays --------------------------------------------------------------------------------------

def pack_record(record: ArrayRecord) -> ArrayRecord:
    """One Array holding every array of `record` (names, dtypes, shapes, types and bytes in order)."""
    entries = [{"key": key, "dtype": a.dtype, "shape": list(a.shape), "stype": a.stype, "size": len(a.data)}
               for key, a in record.items()]
    data = _frame({"arrays": entries}, [a.data for a in record.values()])
    return ArrayRecord({PACKED_KEY: Array(dtype="uint8", shape=(len(data),), stype=PACKED_STYPE, data=data)})


def is_packed(record: Any) -> bool:
    return (isinstance(record, ArrayRecord) and len(record) == 1 and PACKED_KEY in record
            and record[PACKED_KEY].stype == PACKED_STYPE)


def unpack_record(record: ArrayRecord) -> ArrayRecord:
    what = "packed array record"
    data = record[PACKED_KEY].data
    header, start = _unframe(data, what)
    arrays: dict[str, Array] = {}
    for entry, body in _slices(data, start, header.get("arrays"), what):
        key, dtype, stype, shape = entry.get("key"), entry.get("dtype"), entry.get("stype"), entry.get("shape")
        if not (isinstance(key, str) and isinstance(dtype, str) and isinstance(stype, str)
                and isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise PackingError(f"{what}: malformed entry {entry!r:.200}")
        if key in arrays:
            raise PackingError(f"{what}: array {key!r} appears twice")
        arrays[key] = Array(dtype=dtype, shape=tuple(shape), stype=stype, data=body)
    return ArrayRecord(arrays, keep_input=True)


# --- config and metric records -------------------------------------------------------------------

def _small(record: Any) -> str | None:
    return next((kind for kind, cls in _RECORD_KINDS.items() if type(record) is cls), None)  # noqa: E721


def pack_small_records(content: RecordDict) -> RecordDict | None:
    """A copy of `content` whose config and metric records are one ConfigRecord; None when there are
    fewer than two (nothing to gain) or the reserved name is taken."""
    small = [(name, kind) for name, record in content.items() if (kind := _small(record))]
    if len(small) < 2 or PACKED_RECORDS in content:
        return None
    bodies = [content[name].deflate() for name, _ in small]
    header = {"order": list(content.keys()),
              "records": [{"key": name, "kind": kind, "size": len(body)} for (name, kind), body in zip(small, bodies)]}
    out = RecordDict()
    for name, record in content.items():
        if not _small(record):
            out[name] = record
    out[PACKED_RECORDS] = ConfigRecord({"records": _frame(header, bodies)})
    return out


def unpack_small_records(content: RecordDict) -> RecordDict:
    what = "packed records"
    packed = content[PACKED_RECORDS]
    data = packed.get("records") if isinstance(packed, ConfigRecord) and len(packed) == 1 else None
    if not isinstance(data, bytes):
        raise PackingError(f"{what}: not a single bytes value")
    header, start = _unframe(data, what)
    records: dict[str, Any] = {name: record for name, record in content.items() if name != PACKED_RECORDS}
    for entry, body in _slices(data, start, header.get("records"), what):
        name, cls = entry.get("key"), _RECORD_KINDS.get(entry.get("kind"))
        if not isinstance(name, str) or cls is None or name in records:
            raise PackingError(f"{what}: malformed or repeated entry {entry!r:.200}")
        try:
            records[name] = cls.inflate(body)
        except Exception as exc:  # Flower's own checks: header, type name, protobuf
            raise PackingError(f"{what}: record {name!r} does not inflate ({exc})") from None
    order = header.get("order")
    if not (isinstance(order, list) and all(isinstance(name, str) for name in order)
            and len(set(order)) == len(order) == len(records) and set(order) == set(records)):
        raise PackingError(f"{what}: the record order does not name exactly the records")
    out = RecordDict()
    for name in order:
        out[name] = records[name]
    return out


# --- messages ------------------------------------------------------------------------------------

def pack_message(message: Message) -> Message:
    """Pack the message's content (in place; returns it): see the module docstring."""
    if not message.has_content():
        return message
    content = message.content
    if any(isinstance(r, ArrayRecord) and len(r) > 1 for r in content.values()):
        content = RecordDict({name: pack_record(r) if isinstance(r, ArrayRecord) and len(r) > 1 else r
                              for name, r in content.items()})
    content = pack_small_records(content) or content
    if content is not message.content:
        message.content = content
    return message


def unpack_message(message: Message) -> Message:
    """Undo `pack_message` (in place; returns it). Raises PackingError on a malformed record."""
    if not message.has_content():
        return message
    content = message.content
    if PACKED_RECORDS in content:
        content = unpack_small_records(content)
    if any(is_packed(r) for r in content.values()):
        content = RecordDict({name: unpack_record(r) if is_packed(r) else r for name, r in content.items()})
    if content is not message.content:
        message.content = content
    return message


class PackingGrid:
    """The ServerApp's Grid with each outgoing message packed and each reply unpacked; everything
    else is the wrapped Grid's."""

    def __init__(self, grid: Any):
        self._grid = grid

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def push_messages(self, messages: Any) -> Any:
        return self._grid.push_messages([pack_message(m) for m in messages])

    def pull_messages(self, message_ids: Any) -> Any:
        return [unpacked_reply(m) for m in self._grid.pull_messages(message_ids)]

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> Any:
        replies = self._grid.send_and_receive([pack_message(m) for m in messages], timeout=timeout)
        return [unpacked_reply(m) for m in replies]


def unpacked_reply(reply: Message) -> Message:
    """A site's reply unpacked; one that does not unpack exactly becomes an error reply from that
    site (the run goes on without it, as for any failed reply), never a guess and never a crash of
    the coordinator."""
    try:
        return unpack_message(reply)
    except PackingError as exc:
        return Message(metadata=reply.metadata, error=Error(
            code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
            reason=f"spine-fl: the site's reply could not be unpacked ({exc}); it was discarded"))
