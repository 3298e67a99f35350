"""Records -> column batches (Arrow tables) for the activations and requests tables.

    batch = ColumnBatch()
    batch.add_tensor(record, partition=0, offset=17)
    table = batch.activations_table(load_time_ns=time.time_ns())   # pyarrow.Table, insert_arrow-ready

Column-oriented on purpose: building Python lists per column and handing them to Arrow once per
batch is what makes the insert fast (docs/BENCHMARKS.md, loader section).
"""

from __future__ import annotations

import math
import time

import pyarrow as pa

from tensortrace.consume.deadletter import DeadLetterReason, InvalidRecord  # noqa: F401 (re-exported)
from tensortrace.consume.validate import check_tensor_record
from tensortrace.consume.validate import fixed_id as _fixed
from tensortrace.storage.schema import ACTIVATION_COLUMNS, REQUEST_COLUMNS
from tensortrace.v1 import records_pb2 as pb
from tensortrace.wire import codec

_NO_TRACE = b"\0" * 16
_NO_SPAN = b"\0" * 8
_TS = pa.timestamp("ns", tz="UTC")
# DType code -> (ClickHouse dtype name, element size); unknown codes take the slow path.
_DTYPE_INFO = {code: (codec.dtype_name(code), codec.element_size(code)) for code in pb.DType.values()
               if code != pb.DTYPE_UNSPECIFIED}


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

    @property
    def rows(self) -> int:
        return len(self.act["seq"]) + len(self.req["seq"])

    @property
    def tensor_rows(self) -> int:
        return len(self.act["seq"])

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
