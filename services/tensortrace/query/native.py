"""A reader for ClickHouse's Native output format, for the few column types the read path selects.

    cols = read_native(memoryview(chdb_conn.query(sql, "Native").get_memview()))
    cols["layer"]            # numpy array (fixed-width integer columns)
    cols["payload"]          # StringColumn: .data (the memoryview) and .offsets (row i = data[o[i]:o[i+1]])

Why: the read-back of one request is tens of MiB of payload. Arrow output costs ClickHouse an
extra conversion and the Python side a copy (160 ms for 67 MB here); Native output is about half
that (docs/BENCHMARKS.md, loader section), and its String column is length-prefixed bytes, so each
payload can stay a zero-copy view of the result buffer until it is copied once into its tensor.

Format (one or more blocks, no block info in the output format): varint column count, varint row
count, then per column its name, its type name and its data. Fixed-width integers are little-endian
arrays; String is (varint length, bytes) per row. Any other type raises NativeFormatError: the
caller casts to a supported type in SQL (LowCardinality -> String, arrays -> arrayStringConcat).
"""

from __future__ import annotations

import numpy as np

_FIXED = {
    "Int8": np.int8, "Int16": np.int16, "Int32": np.int32, "Int64": np.int64,
    "UInt8": np.uint8, "UInt16": np.uint16, "UInt32": np.uint32, "UInt64": np.uint64,
}


class NativeFormatError(ValueError):
    """The Native stream is truncated, malformed, or holds a column type this reader does not read."""


class StringColumn:
    """Row i is data[offsets[i]:offsets[i + 1]] (a list of len(rows) + 1 ints, over possibly
    several blocks: `data` is the whole result buffer, so offsets index into it directly)."""
    __slots__ = ("data", "starts", "ends")

    def __init__(self, data: memoryview):
        self.data = data
        self.starts: list[int] = []
        self.ends: list[int] = []

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> memoryview:
        return self.data[self.starts[i]:self.ends[i]]

    def as_str(self) -> list[str]:
        d = self.data
        return [str(d[a:b], "utf-8") for a, b in zip(self.starts, self.ends)]


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if pos >= len(buf):
            raise NativeFormatError("truncated Native stream (in a varint)")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise NativeFormatError("malformed varint in Native stream")


def _string(buf: memoryview, pos: int) -> tuple[str, int]:
    n, pos = _varint(buf, pos)
    if pos + n > len(buf):
        raise NativeFormatError("truncated Native stream (in a column header)")
    return str(buf[pos:pos + n], "utf-8"), pos + n


def read_native(buf) -> dict[str, object]:
    """All blocks of a Native result, concatenated per column: numpy arrays for integer columns,
    StringColumn for String columns. An empty result gives {}."""
    buf = memoryview(buf).cast("B")
    end = len(buf)
    pos = 0
    fixed: dict[str, list[np.ndarray]] = {}
    strings: dict[str, StringColumn] = {}
    order: list[str] = []
    while pos < end:
        ncols, pos = _varint(buf, pos)
        nrows, pos = _varint(buf, pos)
        for _ in range(ncols):
            name, pos = _string(buf, pos)
            typ, pos = _string(buf, pos)
            if name not in fixed and name not in strings:
                order.append(name)
            if typ in _FIXED:
                dt = np.dtype(_FIXED[typ]).newbyteorder("<")
                size = nrows * dt.itemsize
                if pos + size > end:
                    raise NativeFormatError(f"truncated Native stream (column {name!r})")
                fixed.setdefault(name, []).append(np.frombuffer(buf, dtype=dt, count=nrows, offset=pos))
                pos += size
            elif typ == "String":
                col = strings.get(name)
                if col is None:
                    col = strings[name] = StringColumn(buf)
                starts, ends = col.starts, col.ends
                for _ in range(nrows):
                    # inline varint: payload lengths are one to three bytes
                    n = buf[pos]
                    pos += 1
                    if n >= 0x80:
                        n, pos = _varint(buf, pos - 1)
                    starts.append(pos)
                    pos += n
                    ends.append(pos)
                if pos > end:
                    raise NativeFormatError(f"truncated Native stream (column {name!r})")
            else:
                raise NativeFormatError(f"column {name!r} has type {typ}, which this reader does not read; "
                                        "cast it in SQL (e.g. to String)")
    out: dict[str, object] = {}
    for name in order:
        if name in fixed:
            parts = fixed[name]
            out[name] = parts[0] if len(parts) == 1 else np.concatenate(parts)
        else:
            out[name] = strings[name]
    return out
