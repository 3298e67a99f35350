"""Validation of query arguments. Values reach SQL only as bound parameters; these checks exist to
give a clear error early (a trace id with SQL in it is not a trace id), not to make SQL safe."""

from __future__ import annotations

import re

from tensortrace.query.errors import InvalidQuery

_HEX32 = re.compile(r"^[0-9a-fA-F]{32}$")
_HOOK = re.compile(r"^[a-z][a-z0-9_.]{0,63}$")
MAX_REQUEST_ID = 256
MAX_LAYER = 1_000_000


def trace_id_bytes(trace_id) -> bytes:
    """16 bytes of a W3C trace id given as 32 hex chars or 16 bytes."""
    if isinstance(trace_id, (bytes, bytearray)):
        b = bytes(trace_id)
        if len(b) != 16:
            raise InvalidQuery(f"trace id must be 16 bytes, got {len(b)}")
    elif isinstance(trace_id, str):
        s = trace_id.strip().lower()
        if not _HEX32.match(s):
            raise InvalidQuery(f"trace id {trace_id[:80]!r} is not 32 hex characters")
        b = bytes.fromhex(s)
    else:
        raise InvalidQuery(f"trace id must be a hex string or 16 bytes, not {type(trace_id).__name__}")
    if not any(b):
        raise InvalidQuery("trace id is all zeros (invalid in W3C trace context)")
    return b


def request_id(value) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidQuery("request id must be a non-empty string")
    if len(value) > MAX_REQUEST_ID:
        raise InvalidQuery(f"request id is {len(value)} characters, at most {MAX_REQUEST_ID}")
    if any(ord(ch) < 32 for ch in value):
        raise InvalidQuery("request id contains control characters")
    return value


def hooks(values) -> list[str] | None:
    if values is None:
        return None
    if isinstance(values, str):
        values = [values]
    out = []
    for h in values:
        if not isinstance(h, str) or not _HOOK.match(h):
            raise InvalidQuery(f"hook name {str(h)[:80]!r} is not a hook name ([a-z][a-z0-9_.]*, at most 64)")
        out.append(h)
    return out or None


def layers(values) -> list[int] | None:
    if values is None:
        return None
    if isinstance(values, (int, range)):
        values = [values] if isinstance(values, int) else list(values)
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or not -1 <= v <= MAX_LAYER:
            raise InvalidQuery(f"layer {v!r} is not an integer in [-1, {MAX_LAYER}]")
        out.append(v)
    return out or None
