"""Building v1 Envelope bytes without copying payloads twice.

`codec.encode_envelope` builds protobuf messages and serializes them: the payload is copied into
the TensorRecord and again into the serialized bytes. Here a record's metadata is serialized by
protobuf (payload field empty) and the payload field is appended by hand: protobuf decoders accept
fields in any order, so the bytes decode with `codec.decode_envelope` to exactly the same records
(tests/exporter/test_envelopes.py checks that). The payload is copied once: from the ring mapping
into the message.

    b = EnvelopeBatcher(max_message_bytes=1_000_000)
    b.add(b"r1", tensor_entry(rec, payload_view))
    for key, value, n_records in b.messages(): producer.send(topic, value, key)
"""

from __future__ import annotations

from tensortrace.v1 import records_pb2 as pb

_ENVELOPE_VERSION = b"\x08\x01"          # field 1 (version), varint 1
_ENVELOPE_RECORD = b"\x12"               # field 2 (records), length-delimited
_RECORD_TENSOR = b"\x0a"                 # Record.tensor (field 1)
_RECORD_SUMMARY = b"\x12"                # Record.summary (field 2)
_TENSOR_PAYLOAD = b"\x9a\x01"            # TensorRecord.payload (field 19), length-delimited


def _varint_slow(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_VARINTS = [_varint_slow(i) for i in range(1 << 14)]


def varint(n: int) -> bytes:
    """Protobuf base-128 varint of a non-negative int."""
    return _VARINTS[n] if n < 16384 else _varint_slow(n)


class Entry:
    """One Record of an envelope as a list of byte pieces (payload pieces are views, not copies)."""

    __slots__ = ("pieces", "size")

    def __init__(self, pieces: list, size: int):
        self.pieces = pieces
        self.size = size


def tensor_entry(rec: pb.TensorRecord, payload) -> Entry:
    """`rec` (payload field empty) with `payload` (bytes or memoryview) as its payload."""
    return tensor_entry_bytes(rec.SerializeToString(), payload)


def tensor_entry_bytes(meta: bytes, payload) -> Entry:
    """A serialized TensorRecord without payload, plus `payload` as its payload field."""
    plen = len(payload)
    if plen:
        plen_v = varint(plen)
        tensor_len = len(meta) + 2 + len(plen_v) + plen
    else:
        tensor_len = len(meta)
    tensor_len_v = varint(tensor_len)
    record_len = 1 + len(tensor_len_v) + tensor_len
    record_len_v = varint(record_len)
    head = b"".join((_ENVELOPE_RECORD, record_len_v, _RECORD_TENSOR, tensor_len_v, meta))
    pieces = [head + _TENSOR_PAYLOAD + plen_v, payload] if plen else [head]
    return Entry(pieces, 1 + len(record_len_v) + record_len)


def summary_entry(summary: pb.RequestSummary) -> Entry:
    body = summary.SerializeToString()
    record = _RECORD_SUMMARY + varint(len(body)) + body
    data = _ENVELOPE_RECORD + varint(len(record)) + record
    return Entry([data], len(data))


class EnvelopeBatcher:
    """Groups entries per Kafka key, in order, into envelopes of at most `max_message_bytes`.

    Records of one key keep their order across the envelopes of that key; keys come out in the
    order they were first seen.
    """

    def __init__(self, max_message_bytes: int):
        self.max_message_bytes = max_message_bytes - len(_ENVELOPE_VERSION)
        self._by_key: dict[bytes, list[Entry]] = {}

    def __len__(self) -> int:
        return len(self._by_key)

    def add(self, key: bytes, entry: Entry) -> None:
        lst = self._by_key.get(key)
        if lst is None:
            self._by_key[key] = [entry]
        else:
            lst.append(entry)

    def messages(self):
        """Yield (key, value bytes, number of records) and empty the batcher."""
        limit = self.max_message_bytes
        for key, entries in self._by_key.items():
            pieces = [_ENVELOPE_VERSION]
            size = 0
            n = 0
            for e in entries:
                if n and size + e.size > limit:
                    yield key, b"".join(pieces), n
                    pieces = [_ENVELOPE_VERSION]
                    size = n = 0
                pieces.extend(e.pieces)
                size += e.size
                n += 1
            if n:
                yield key, b"".join(pieces), n
        self._by_key = {}
