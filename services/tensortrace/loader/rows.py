"""Records -> column batches (Arrow tables) for the activations and requests tables.

    batch = ColumnBatch()
    batch.add_tensor(record, partition=0, offset=17)
    table = batch.activations_table(load_time_ns=time.time_ns())   # pyarrow.Table, insert_arrow-ready

Column-oriented on purpose: building Python lists per column and handing them to Arrow once per
batch is what makes the insert fast (docs/BENCHMARKS.md, loader section).

Natively scanned envelopes (`add_scan`, tensortrace.wire.native) skip the lists: the batch keeps
each message and its column matrix, and `activations_table` builds every Arrow column of those rows
at once from them (strings gathered in C, payloads left where they are, packed shapes and positions unpacked in C):
no Python object per row. Summaries, and records that fail a check, still go through add_summary /
check_tensor_record one at a time. The two ways give the same rows (tests/loader/test_native_rows.py).

The scanned rows come out in the activations table's ORDER BY (schema.ACTIVATION_SORT_KEY): the sort
order is computed from the key columns alone and every column is built in that order, so ClickHouse,
which checks whether an inserted block is already sorted, skips its own permutation of every column
(a 64 MiB copy per batch). Their payload column is not copied at all: it is an Arrow binary_view
array whose views point into the Kafka messages the batch already holds (16 bytes per row); the
engine reads the bytes from there (storage/client.py turns it into plain large_binary for any insert
path that may not read views). docs/BENCHMARKS.md, loader section, session 6.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tensortrace.consume.deadletter import DeadLetterReason, InvalidRecord  # noqa: F401 (re-exported)
from tensortrace.consume.validate import check_tensor_record
from tensortrace.consume.validate import fixed_id as _fixed
from tensortrace.storage.client import plain_binary
from tensortrace.storage.schema import ACTIVATION_COLUMNS, ACTIVATION_SORT_KEY, REQUEST_COLUMNS
from tensortrace.v1 import records_pb2 as pb
from tensortrace.wire import codec, native

_NO_TRACE = b"\0" * 16
_NO_SPAN = b"\0" * 8
_TS = pa.timestamp("ns", tz="UTC")
# DType code -> (ClickHouse dtype name, element size); unknown codes take the slow path.
_DTYPE_INFO = {code: (codec.dtype_name(code), codec.element_size(code)) for code in pb.DType.values()
               if code != pb.DTYPE_UNSPECIFIED}
# DType code -> its name, as an Arrow array indexed by code (the scanner admits known codes only)
_DTYPE_NAMES = pa.array([_DTYPE_INFO.get(code, ("",))[0] for code in range(max(_DTYPE_INFO) + 1)], pa.string())


def _append_origin(cols: dict, rec, partition: int, offset: int) -> None:
    """The columns both tables share: who produced the record (its dedup identity) and where in
    Kafka it was read."""
    p = rec.producer
    cols["producer_node"].append(p.node)
    cols["producer_pod"].append(p.pod)
    cols["producer_pid"].append(p.pid)
    cols["producer_rank"].append(p.tp_rank)
    cols["producer_generation"].append(p.generation)
    cols["seq"].append(rec.seq)
    cols["kafka_partition"].append(partition)
    cols["kafka_offset"].append(offset)


def _origin_columns(cols: dict) -> dict:
    return {
        "producer_node": pa.array(cols["producer_node"], pa.string()),
        "producer_pod": pa.array(cols["producer_pod"], pa.string()),
        "producer_pid": pa.array(cols["producer_pid"], pa.uint32()),
        "producer_rank": pa.array(cols["producer_rank"], pa.uint32()),
        "producer_generation": pa.array(cols["producer_generation"], pa.uint64()),
        "seq": pa.array(cols["seq"], pa.uint64()),
        "kafka_partition": pa.array(cols["kafka_partition"], pa.uint32()),
        "kafka_offset": pa.array(cols["kafka_offset"], pa.uint64()),
    }


class ColumnBatch:
    """Accumulates rows of both tables column by column; bounded by its owner (rows, bytes)."""

    def __init__(self) -> None:
        self.act: dict[str, list] = {c: [] for c in ACTIVATION_COLUMNS if c != "load_time"}
        self.req: dict[str, list] = {c: [] for c in REQUEST_COLUMNS if c != "load_time"}
        self.payload_bytes = 0
        self.first_capture_ns: list[int] = []  # per activation row, for freshness metrics
        self.scans: list[tuple] = []           # (Scan, row indexes or None for all, partition, offset)
        self.scan_rows = 0

    @property
    def rows(self) -> int:
        return len(self.act["seq"]) + self.scan_rows + len(self.req["seq"])

    @property
    def tensor_rows(self) -> int:
        return len(self.act["seq"]) + self.scan_rows

    def add_scan(self, sc: native.Scan, partition: int, offset: int) -> list[tuple[int, InvalidRecord]]:
        """A natively scanned envelope (no chunked records in it): its valid tensor records become
        rows without a Python object each; summaries go through add_summary; records that fail a
        check are returned as (index, InvalidRecord) with check_tensor_record's own error."""
        kind, status = sc.cols[:, native.C_KIND], sc.cols[:, native.C_STATUS]
        good = (kind == native.KIND_TENSOR) & (status == native.S_OK)
        n = int(np.count_nonzero(good))
        failed = []
        if n:
            idx = None if n == sc.n else np.flatnonzero(good)
            self.scans.append((sc, idx, partition, offset))
            self.scan_rows += n
            self.payload_bytes += int(sc.cols[:, native.C_PAYLOAD_LEN][good].sum())
        if n != sc.n:
            for i in np.flatnonzero(~good).tolist():
                rec = sc.record(i)
                try:
                    if kind[i] == native.KIND_SUMMARY:
                        self.add_summary(rec, partition, offset)
                    else:
                        self.add_tensor(rec, partition, offset)   # raises check_tensor_record's error
                except InvalidRecord as e:
                    failed.append((i, e))
        return failed

    def capture_times(self) -> np.ndarray:
        """capture_time of every activation row (ns), as inserted."""
        parts = [np.asarray(self.act["capture_time"], dtype=np.int64)]
        if self.scans:
            parts.append(self._scan_matrix()[1])
        return np.concatenate(parts)

    @property
    def summary_rows(self) -> int:
        return len(self.req["seq"])

    def add_tensor(self, r: pb.TensorRecord, partition: int, offset: int) -> None:
        """Append one (reassembled) record. Hot path: each protobuf field is read once (reading
        `payload` copies it), and the checks of check_tensor_record are inlined."""
        shape = list(r.shape)
        dtype = r.dtype
        info = _DTYPE_INFO.get(dtype)
        raw_size = r.raw_size
        payload = r.payload
        kind = r.positions_kind
        token_start = r.token_start
        token_end = r.token_end
        positions = list(r.positions)
        trace_id = r.trace_id
        span_id = r.span_id
        if (info is None or raw_size != math.prod(shape) * info[1] or min(shape, default=0) < 0
                or (r.encoding == pb.RAW and len(payload) != raw_size)
                or (kind == pb.TOKEN_RANGE and shape and token_end - token_start != shape[0])
                or (kind == pb.TOKEN_LIST and shape and len(positions) != shape[0])
                or not r.request_id or not r.hook
                or len(trace_id) not in (0, 16) or len(span_id) not in (0, 8)):
            check_tensor_record(r)  # slow path: raises InvalidRecord naming the problem
        a = self.act
        a["trace_id"].append(trace_id or _NO_TRACE)
        a["span_id"].append(span_id or _NO_SPAN)
        a["request_id"].append(r.request_id)
        a["model"].append(r.model_id)
        a["hook"].append(r.hook)
        a["layer"].append(r.layer)
        a["tp_rank"].append(r.tp_rank)
        a["tp_size"].append(r.tp_size or 1)
        a["positions_kind"].append(kind)
        a["token_start"].append(token_start)
        a["token_end"].append(token_end)
        a["positions"].append(positions)
        a["phase"].append(r.phase)
        a["step"].append(r.step)
        a["dtype"].append(info[0])
        a["shape"].append(shape)
        a["encoding"].append(r.encoding)
        a["raw_size"].append(raw_size)
        a["payload"].append(payload)
        # A zero timestamp would land in 1970 and be deleted by the TTL at once: fall back to the
        # next-best clock rather than lose the row.
        a["capture_time"].append(r.capture_time_unix_nano or r.export_time_unix_nano or time.time_ns())
        a["export_time"].append(r.export_time_unix_nano)
        _append_origin(a, r, partition, offset)
        self.payload_bytes += len(payload)

    def add_summary(self, s: pb.RequestSummary, partition: int, offset: int) -> None:
        if not s.request_id:
            raise InvalidRecord(DeadLetterReason.MISSING_FIELD, "request summary has no request_id")
        q = self.req
        q["trace_id"].append(_fixed(s.trace_id, 16, "trace_id"))
        q["span_id"].append(_fixed(s.span_id, 8, "span_id"))
        q["request_id"].append(s.request_id)
        q["model"].append(s.model_id)
        q["records_captured"].append(s.records_captured)
        q["records_dropped"].append(s.records_dropped)
        q["dropped_by_reason"].append(list(s.dropped_by_reason.items()))
        q["bytes_captured"].append(s.bytes_captured)
        q["complete"].append(s.complete)
        q["incomplete_reason"].append(s.incomplete_reason)
        q["prompt_tokens"].append(s.prompt_tokens)
        q["generated_tokens"].append(s.generated_tokens)
        q["finish_reason"].append(s.finish_reason)
        q["hooks"].append(list(s.hooks))
        q["sampled"].append(s.sampled)
        q["producers"].append(s.producers or 1)
        q["start_time"].append(s.start_time_unix_nano)
        q["end_time"].append(s.end_time_unix_nano or s.export_time_unix_nano or time.time_ns())
        q["export_time"].append(s.export_time_unix_nano)
        _append_origin(q, s, partition, offset)

    def activations_table(self, load_time_ns: int) -> pa.Table:
        """The batch's activation rows. Natively scanned rows carry their payload as binary_view (module
        docstring); rows added one at a time, and a batch of both kinds, as large_binary."""
        if not self.scans:
            return self._list_table(load_time_ns)
        scanned = self._scan_table(load_time_ns)
        if not self.act["seq"]:
            return scanned
        return pa.concat_tables([self._list_table(load_time_ns), plain_binary(scanned)])

    def _scan_matrix(self) -> tuple[np.ndarray, np.ndarray]:
        """(the scanned rows' column matrix, their capture_time as inserted)."""
        mats = [sc.cols if idx is None else sc.cols[idx] for sc, idx, _, _ in self.scans]
        m = mats[0] if len(mats) == 1 else np.concatenate(mats)
        cap, exp = m[:, native.C_CAPTURE_NS], m[:, native.C_EXPORT_NS]
        # a zero capture time falls back to the export time, then to now (add_tensor's rule)
        capture = np.where(cap != 0, cap, np.where(exp != 0, exp, time.time_ns()))
        return m, capture

    def _scan_table(self, load_time_ns: int) -> pa.Table:
        m, capture = self._scan_matrix()
        n = len(m)
        bufs = [sc.data for sc, _, _, _ in self.scans]
        counts = [sc.n if idx is None else len(idx) for sc, idx, _, _ in self.scans]
        which = np.repeat(np.arange(len(self.scans), dtype=np.int64), counts)
        partitions = np.repeat(np.array([p for _, _, p, _ in self.scans], dtype=np.int64), counts)
        offsets = np.repeat(np.array([o for _, _, _, o in self.scans], dtype=np.int64), counts)

        def col(c, typ):
            return pa.array(np.ascontiguousarray(m[:, c])).cast(typ)

        def ucol(c, typ):
            return pa.array(np.ascontiguousarray(m[:, c]).view(np.uint64)).cast(typ)

        def gathered(c, typ, width=0):
            values, offsets = native.gather(bufs, which, m[:, c], m[:, c + 1], width)
            if width:
                return pa.FixedSizeBinaryArray.from_buffers(typ, n, [None, pa.py_buffer(values)])
            if typ == pa.large_binary():
                return pa.Array.from_buffers(typ, n, [None, pa.py_buffer(offsets), pa.py_buffer(values)])
            return pa.Array.from_buffers(pa.large_string(), n, [None, pa.py_buffer(offsets), pa.py_buffer(values)]).cast(typ)

        def listed(c, kind, typ):
            values, offsets = native.unpack(bufs, which, m[:, c], m[:, c + 1], kind)
            vals = np.frombuffer(values, dtype=np.int64 if kind else np.uint32)
            return pa.ListArray.from_arrays(pa.array(np.frombuffer(offsets, dtype=np.int32)), pa.array(vals)).cast(typ)

        # The table's ORDER BY, from the key columns only; then every column is built in that order.
        key = {"trace_id": gathered(native.C_TRACE_OFF, pa.binary(16), 16), "hook": gathered(native.C_HOOK_OFF, pa.string()),
               "layer": col(native.C_LAYER, pa.int32()), "token_start": col(native.C_TOKEN_START, pa.uint32()),
               "tp_rank": col(native.C_TP_RANK, pa.uint16()), "producer_pod": gathered(native.C_POD_OFF, pa.string()),
               "producer_pid": col(native.C_PID, pa.uint32()),
               "producer_generation": ucol(native.C_GENERATION, pa.uint64()), "seq": ucol(native.C_SEQ, pa.uint64())}
        order = pc.sort_indices(pa.table({k: key[k] for k in ACTIVATION_SORT_KEY}),
                                sort_keys=[(k, "ascending") for k in ACTIVATION_SORT_KEY]).to_numpy()
        if not np.array_equal(order, np.arange(n)):
            key = {k: v.take(order) for k, v in key.items()}
            m, capture, which, partitions, offsets = m[order], capture[order], which[order], partitions[order], offsets[order]
        tp_size = np.ascontiguousarray(m[:, native.C_TP_SIZE])
        return pa.table({
            "trace_id": key["trace_id"],
            "span_id": gathered(native.C_SPAN_OFF, pa.binary(8), 8),
            "request_id": gathered(native.C_RID_OFF, pa.string()),
            "model": gathered(native.C_MODEL_OFF, pa.string()),
            "hook": key["hook"],
            "layer": key["layer"],
            "tp_rank": key["tp_rank"],
            "tp_size": pa.array(np.where(tp_size == 0, 1, tp_size)).cast(pa.uint16()),
            "positions_kind": col(native.C_POS_KIND, pa.int8()),
            "token_start": key["token_start"],
            "token_end": col(native.C_TOKEN_END, pa.uint32()),
            "positions": listed(native.C_POS_OFF, 0, pa.list_(pa.uint32())),
            "phase": col(native.C_PHASE, pa.int8()),
            "step": ucol(native.C_STEP, pa.uint64()),
            "dtype": _DTYPE_NAMES.take(pa.array(np.ascontiguousarray(m[:, native.C_DTYPE]))),
            "shape": listed(native.C_SHAPE_OFF, 1, pa.list_(pa.int64())),
            "encoding": col(native.C_ENCODING, pa.int8()),
            "raw_size": ucol(native.C_RAW_SIZE, pa.uint64()),
            "payload": self._views(bufs, which, m[:, native.C_PAYLOAD_OFF], m[:, native.C_PAYLOAD_LEN]),
            "capture_time": pa.array(capture, pa.int64()).cast(_TS),
            "export_time": col(native.C_EXPORT_NS, pa.int64()).cast(_TS),
            "load_time": pa.array(np.full(n, load_time_ns, dtype=np.int64)).cast(_TS),
            "producer_node": gathered(native.C_NODE_OFF, pa.string()),
            "producer_pod": key["producer_pod"],
            "producer_pid": key["producer_pid"],
            "producer_rank": col(native.C_PRANK, pa.uint32()),
            "producer_generation": key["producer_generation"],
            "seq": key["seq"],
            "kafka_partition": pa.array(partitions).cast(pa.uint32()),
            "kafka_offset": pa.array(offsets).cast(pa.uint64()),
        })

    @staticmethod
    def _views(bufs: list, which: np.ndarray, off: np.ndarray, length: np.ndarray) -> pa.Array:
        """The slices (which[i], off[i], length[i]) of `bufs` as an Arrow binary_view array without
        copying them: each view is (int32 length, then 12 inline bytes for a value of at most 12
        bytes, else its first 4 bytes, int32 buffer index, int32 offset)."""
        n = len(off)
        length = np.ascontiguousarray(length, dtype=np.int64)
        head, hoff = native.gather(bufs, which, off, np.minimum(length, 12), 0)   # <= 12 bytes per row
        hoff = np.frombuffer(hoff, dtype=np.int64)
        hlen = np.diff(hoff)
        v = np.zeros((n, 16), dtype=np.uint8)
        v[:, 0:4] = length.astype("<i4").view(np.uint8).reshape(n, 4)
        v[np.repeat(np.arange(n), hlen), np.arange(hoff[-1]) - np.repeat(hoff[:-1], hlen) + 4] = np.frombuffer(head, np.uint8)
        long = length > 12        # prefix (bytes 4-8) stays; buffer index and offset replace the rest
        v[long, 8:12] = np.asarray(which, dtype="<i4")[long].view(np.uint8).reshape(-1, 4)
        v[long, 12:16] = np.asarray(off, dtype="<i4")[long].view(np.uint8).reshape(-1, 4)
        return pa.Array.from_buffers(pa.binary_view(), n, [None, pa.py_buffer(v)] + [pa.py_buffer(b) for b in bufs])

    def _list_table(self, load_time_ns: int) -> pa.Table:
        a = self.act
        n = len(a["seq"])
        return pa.table({
            "trace_id": pa.array(a["trace_id"], pa.binary(16)),
            "span_id": pa.array(a["span_id"], pa.binary(8)),
            "request_id": pa.array(a["request_id"], pa.string()),
            "model": pa.array(a["model"], pa.string()),
            "hook": pa.array(a["hook"], pa.string()),
            "layer": pa.array(a["layer"], pa.int32()),
            "tp_rank": pa.array(a["tp_rank"], pa.uint16()),
            "tp_size": pa.array(a["tp_size"], pa.uint16()),
            "positions_kind": pa.array(a["positions_kind"], pa.int8()),
            "token_start": pa.array(a["token_start"], pa.uint32()),
            "token_end": pa.array(a["token_end"], pa.uint32()),
            "positions": pa.array(a["positions"], pa.list_(pa.uint32())),
            "phase": pa.array(a["phase"], pa.int8()),
            "step": pa.array(a["step"], pa.uint64()),
            "dtype": pa.array(a["dtype"], pa.string()),
            "shape": pa.array(a["shape"], pa.list_(pa.int64())),
            "encoding": pa.array(a["encoding"], pa.int8()),
            "raw_size": pa.array(a["raw_size"], pa.uint64()),
            "payload": pa.array(a["payload"], pa.large_binary()),
            "capture_time": pa.array(a["capture_time"], pa.int64()).cast(_TS),
            "export_time": pa.array(a["export_time"], pa.int64()).cast(_TS),
            "load_time": pa.array([load_time_ns] * n, pa.int64()).cast(_TS),
            **_origin_columns(a),
        })

    def requests_table(self, load_time_ns: int) -> pa.Table:
        q = self.req
        n = len(q["seq"])
        return pa.table({
            "trace_id": pa.array(q["trace_id"], pa.binary(16)),
            "span_id": pa.array(q["span_id"], pa.binary(8)),
            "request_id": pa.array(q["request_id"], pa.string()),
            "model": pa.array(q["model"], pa.string()),
            "records_captured": pa.array(q["records_captured"], pa.uint64()),
            "records_dropped": pa.array(q["records_dropped"], pa.uint64()),
            "dropped_by_reason": pa.array(q["dropped_by_reason"], pa.map_(pa.string(), pa.uint64())),
            "bytes_captured": pa.array(q["bytes_captured"], pa.uint64()),
            "complete": pa.array(q["complete"], pa.bool_()),
            "incomplete_reason": pa.array(q["incomplete_reason"], pa.string()),
            "prompt_tokens": pa.array(q["prompt_tokens"], pa.uint32()),
            "generated_tokens": pa.array(q["generated_tokens"], pa.uint32()),
            "finish_reason": pa.array(q["finish_reason"], pa.string()),
            "hooks": pa.array(q["hooks"], pa.list_(pa.string())),
            "sampled": pa.array(q["sampled"], pa.bool_()),
            "producers": pa.array(q["producers"], pa.uint16()),
            "start_time": pa.array(q["start_time"], pa.int64()).cast(_TS),
            "end_time": pa.array(q["end_time"], pa.int64()).cast(_TS),
            "export_time": pa.array(q["export_time"], pa.int64()).cast(_TS),
            "load_time": pa.array([load_time_ns] * n, pa.int64()).cast(_TS),
            **_origin_columns(q),
        })
