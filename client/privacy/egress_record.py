"""Describe an outgoing Flower message for the egress ledger: what exactly leaves the site."""

from __future__ import annotations

import hashlib
from typing import Any

from flwr.app import Message

from spine_fl.shared import protocol


def _describe_value(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"bytes": len(value), "sha256": hashlib.sha256(value).hexdigest()}
    if isinstance(value, list) and value and isinstance(value[0], bytes):
        joined = b"".join(value)
        return {"items": len(value), "bytes": len(joined), "sha256": hashlib.sha256(joined).hexdigest()}
    if isinstance(value, list):
        return {"items": len(value), "sha256": hashlib.sha256(repr(value).encode()).hexdigest()}
    return value


def describe(message: Message) -> dict[str, Any]:
    """Arrays with name/shape/dtype/SHA-256, every config and metric value, byte totals."""
    if message.has_error():
        return {"error": {"code": message.error.code, "reason": message.error.reason}, "arrays": [],
                "metrics": {}, "total_bytes": len((message.error.reason or "").encode())}
    content = message.content
    arrays, total = [], 0
    for record_name, record in content.array_records.items():
        for name, array in record.items():
            data = array.data
            total += len(data)
            nd = array.numpy()
            arrays.append({"name": f"{record_name}/{name}", "shape": list(nd.shape), "dtype": str(nd.dtype),
                           "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    values: dict[str, Any] = {}
    for kind in ("config_records", "metric_records"):
        for record_name, record in getattr(content, kind).items():
            for key, value in record.items():
                described = _describe_value(value)
                if isinstance(described, dict) and "bytes" in described:
                    total += described["bytes"]
                values[f"{record_name}/{key}"] = described
    num_examples = values.get(protocol.FIT_NUM_EXAMPLES, values.get(protocol.EVALUATE_NUM_EXAMPLES))
    return {"arrays": arrays, "metrics": values, "total_bytes": total, "num_examples": num_examples}
