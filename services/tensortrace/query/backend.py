"""Where the read-back SDK gets rows from: ClickHouse directly (this module) or the gRPC query
service (remote.py). Both return the same small types, so assembly happens in one place.

    backend = ClickHouseBackend(clickhouse_connect.get_client(dsn="http://localhost:8123"))
    [ref] = backend.lookup(trace_id=bytes.fromhex("4bf92f3577b34da6a3ce929d0e0e4736"))
    records = list(backend.fetch(ref, hooks=["resid_pre"], layers=None))

Every value reaches SQL as a bound parameter ({name:Type}); only the database name is spliced in,
and it is validated as an identifier when the backend is made.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from tensortrace.storage.schema import DEFAULT_DATABASE, check_identifier
from tensortrace.query.errors import BackendUnavailable, InvalidQuery, QueryError
from tensortrace.query.native import read_native
from tensortrace.v1 import records_pb2 as pb
from tensortrace.wire import codec


def _owned_view(result) -> memoryview:
    """A read-only view of a chDB query result's buffer that keeps the result alive.

    chDB's `get_memview().view()` points into memory the result object owns but does not hold a
    reference to it; a view (or a slice of it) that outlived the result would read freed memory.
    A ctypes array over the same address carries the owner, and every memoryview slice taken from
    it references that array, so the buffer lives exactly as long as some view of it."""
    import ctypes

    raw = result.get_memview().view()
    n = len(raw)
    if n == 0:
        return memoryview(b"")
    addr = np.frombuffer(raw, dtype=np.uint8).ctypes.data
    arr = (ctypes.c_ubyte * n).from_address(addr)
    arr._owner = result
    return memoryview(arr).cast("B").toreadonly()


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",")] if text else []


def _query_error(e: Exception) -> QueryError:
    """Connection problems -> BackendUnavailable; anything else the engine says -> QueryError."""
    from clickhouse_connect.driver.exceptions import OperationalError

    msg = f"ClickHouse query failed: {type(e).__name__}: {str(e)[:300]}"
    if isinstance(e, (OperationalError, ConnectionError, OSError)):
        return BackendUnavailable(msg)
    return QueryError(msg)


@dataclass
class RequestRef:
    """One stored request: the result of a trace id / request id lookup."""
    trace_id: bytes
    request_id: str
    model: str = ""
    first_capture_ns: int = 0   # 0: no tensors loaded (yet)
    last_capture_ns: int = 0


class StoredTensor:
    """One stored tensor record as read back: metadata plus its payload bytes (stored encoding).
    Lighter than a TensorRecord: the read path builds thousands of these per request."""

    __slots__ = ("hook", "layer", "tp_rank", "tp_size", "positions_kind", "token_start", "token_end",
                 "positions", "phase", "step", "dtype", "shape", "encoding", "raw_size", "payload",
                 "producer_rank", "seq")

    def __init__(self, hook, layer, tp_rank, tp_size, positions_kind, token_start, token_end, positions,
                 phase, step, dtype, shape, encoding, raw_size, payload, producer_rank=0, seq=0):
        self.hook, self.layer, self.tp_rank, self.tp_size = hook, layer, tp_rank, tp_size
        self.positions_kind, self.token_start, self.token_end, self.positions = positions_kind, token_start, token_end, positions
        self.phase, self.step, self.dtype, self.shape = phase, step, dtype, shape
        self.encoding, self.raw_size, self.payload = encoding, raw_size, payload
        self.producer_rank, self.seq = producer_rank, seq

    @classmethod
    def from_record(cls, r: pb.TensorRecord) -> "StoredTensor":
        return cls(r.hook, r.layer, r.tp_rank, r.tp_size, r.positions_kind, r.token_start, r.token_end,
                   list(r.positions), r.phase, r.step, r.dtype, list(r.shape), r.encoding, r.raw_size, r.payload,
                   r.producer.tp_rank, r.seq)

    def to_record(self) -> pb.TensorRecord:
        return pb.TensorRecord(hook=self.hook, layer=self.layer, tp_rank=self.tp_rank, tp_size=self.tp_size,
                               positions_kind=self.positions_kind, token_start=self.token_start,
                               token_end=self.token_end, positions=self.positions, phase=self.phase,
                               step=self.step, dtype=self.dtype, shape=self.shape, encoding=self.encoding,
                               raw_size=self.raw_size, payload=bytes(self.payload),
                               producer=pb.Producer(tp_rank=self.producer_rank), seq=self.seq)


@dataclass
class HookLayerStats:
    hook: str
    layer: int
    records: int
    token_start: int
    token_end: int
    tokens: int               # rows over all records (TOKEN_RANGE / TOKEN_LIST)
    raw_bytes: int
    stored_bytes: int
    capture_to_export_ms_p50: float = 0.0
    export_to_load_ms_p50: float = 0.0
    capture_to_load_ms_max: float = 0.0


@dataclass
class RequestStatus:
    ref: RequestRef
    summaries: list[pb.RequestSummary] = field(default_factory=list)
    records_loaded: int = 0   # distinct records (dedup identity) stored for this request


class ClickHouseBackend:
    def __init__(self, client, database: str = DEFAULT_DATABASE):
        self.client = client
        self.db = check_identifier(database)

    def _chdb_handle(self):
        """The embedded engine's connection handle behind a chdb:// client, or None for a server.

        Reading the result straight from chDB's buffer skips clickhouse-connect's copy of the whole
        result (the payloads of one request are tens of MiB; docs/BENCHMARKS.md, loader section).
        It relies on clickhouse-connect's chdb backend layout; if that changes, reads fall back to
        raw_query, the path a server read takes."""
        if not hasattr(self, "_handle_cache"):
            inner = getattr(self.client, "client", self.client)  # unwrap ThreadSafeClient
            handle = getattr(getattr(inner, "_backend", None), "_handle", None)
            ok = handle is not None and hasattr(handle, "conn") and hasattr(handle, "lock")
            self._handle_cache = handle if ok else None
        return self._handle_cache

    def _query_native(self, sql: str, params: dict) -> memoryview:
        """The result in ClickHouse's Native format: straight from chDB's buffer for the embedded
        engine (no copy), through clickhouse-connect's raw_query for a server."""
        handle = self._chdb_handle()
        try:
            if handle is not None:
                from clickhouse_connect.driver.binding import format_bind_value

                bound = {k: format_bind_value(v) for k, v in params.items()}  # server-side binding, as the client does
                with handle.lock:
                    res = handle.conn.query(sql, "Native", params=bound)
                return _owned_view(res)
            return memoryview(self.client.raw_query(sql, parameters=params, fmt="Native"))
        except Exception as e:
            raise _query_error(e) from e

    def _query(self, sql: str, params: dict):
        try:
            return self.client.query(sql, parameters=params)
        except Exception as e:
            raise _query_error(e) from e

    # -- lookups ------------------------------------------------------------------------------

    def lookup(self, trace_id: bytes | None = None, request_id: str | None = None) -> list[RequestRef]:
        """Requests stored under a trace id and/or request id (from tensors and from summaries)."""
        if trace_id is None and request_id is None:
            raise InvalidQuery("give trace_id or request_id")
        conds, params = [], {}
        if trace_id is not None:
            conds.append("trace_id = unhex({tid:String})")
            params["tid"] = trace_id.hex()
        if request_id is not None:
            conds.append("request_id = {rid:String}")
            params["rid"] = request_id
        where = " AND ".join(conds)
        sql = f"""
            SELECT hex(trace_id), request_id, anyIf(model, model != ''), minIf(first, first > 0), max(last) FROM (
                SELECT trace_id, request_id, model, toUnixTimestamp64Nano(first_capture) AS first,
                       toUnixTimestamp64Nano(last_capture) AS last
                FROM {self.db}.activation_traces WHERE {where}
                UNION ALL
                SELECT trace_id, request_id, model, 0 AS first, 0 AS last
                FROM {self.db}.requests WHERE {where}
            ) GROUP BY trace_id, request_id ORDER BY request_id"""
        rows = self._query(sql, params).result_rows
        # a request known only from its summary has no tensors: bounds 0 (minIf of nothing is 0)
        return [RequestRef(bytes.fromhex(tid), rid, model or "", int(first or 0), int(last or 0))
                for tid, rid, model, first, last in rows]

    def _scope(self, ref: RequestRef) -> tuple[str, dict]:
        where = "trace_id = unhex({tid:String}) AND request_id = {rid:String}"
        params = {"tid": ref.trace_id.hex(), "rid": ref.request_id}
        if ref.first_capture_ns:
            # Partition pruning: only the days this request's tensors were captured on.
            where += (" AND capture_time BETWEEN fromUnixTimestamp64Nano({t0:Int64}, 'UTC')"
                      " AND fromUnixTimestamp64Nano({t1:Int64}, 'UTC')")
            params.update(t0=ref.first_capture_ns, t1=ref.last_capture_ns)
        return where, params

    def status(self, ref: RequestRef) -> RequestStatus:
        where, params = self._scope(ref)
        loaded = self._query(
            f"SELECT uniqExact(producer_pod, producer_pid, producer_generation, seq) FROM {self.db}.activations WHERE {where}",
            params).result_rows[0][0]
        rows = self._query(
            f"""SELECT request_id, hex(trace_id), hex(span_id), model, records_captured, records_dropped,
                       dropped_by_reason, bytes_captured, complete, incomplete_reason, prompt_tokens,
                       generated_tokens, finish_reason, hooks, sampled, toUnixTimestamp64Nano(start_time),
                       toUnixTimestamp64Nano(end_time), toUnixTimestamp64Nano(export_time),
                       producer_node, producer_pod, producer_pid, producer_rank, producer_generation, seq, producers
                FROM {self.db}.requests FINAL
                WHERE trace_id = unhex({{tid:String}}) AND request_id = {{rid:String}}
                ORDER BY producer_rank, producer_pod, producer_pid, producer_generation, seq""",
            {"tid": ref.trace_id.hex(), "rid": ref.request_id}).result_rows
        summaries = []
        for r in rows:
            summaries.append(pb.RequestSummary(
                request_id=r[0], trace_id=bytes.fromhex(r[1]), span_id=bytes.fromhex(r[2]), model_id=r[3],
                records_captured=r[4], records_dropped=r[5], dropped_by_reason=dict(r[6]), bytes_captured=r[7],
                complete=bool(r[8]), incomplete_reason=r[9], prompt_tokens=r[10], generated_tokens=r[11],
                finish_reason=r[12], hooks=list(r[13]), sampled=bool(r[14]), start_time_unix_nano=r[15],
                end_time_unix_nano=r[16], export_time_unix_nano=r[17],
                producer=pb.Producer(node=r[18], pod=r[19], pid=r[20], tp_rank=r[21], generation=r[22]), seq=r[23],
                producers=r[24]))
        return RequestStatus(ref, summaries, int(loaded))

    def describe(self, ref: RequestRef) -> list[HookLayerStats]:
        """Per (hook, layer): counts, token coverage, bytes and latencies; reads no payloads."""
        where, params = self._scope(ref)
        rows = self._query(
            f"""SELECT hook, layer, count(), min(token_start), max(token_end),
                       sum(toUInt64(if(positions_kind = 'token_range', toUInt64(token_end - token_start), toUInt64(length(positions))))),
                       sum(raw_size), sum(length(payload)),
                       quantileExactIf(0.5)(toUnixTimestamp64Nano(export_time) - toUnixTimestamp64Nano(capture_time), toUnixTimestamp64Nano(export_time) > 0) / 1e6,
                       quantileExactIf(0.5)(toUnixTimestamp64Nano(load_time) - toUnixTimestamp64Nano(export_time), toUnixTimestamp64Nano(export_time) > 0) / 1e6,
                       max(toUnixTimestamp64Nano(load_time) - toUnixTimestamp64Nano(capture_time)) / 1e6
                FROM (SELECT * FROM {self.db}.activations WHERE {where}
                      LIMIT 1 BY producer_pod, producer_pid, producer_generation, seq)
                GROUP BY hook, layer ORDER BY hook, layer""", params).result_rows
        return [HookLayerStats(r[0], int(r[1]), int(r[2]), int(r[3]), int(r[4]), int(r[5]), int(r[6]), int(r[7]),
                               float(r[8]), float(r[9]), float(r[10])) for r in rows]

    def scan_hook_layer(self, model: str | None, hook: str, layer: int, start_ns: int, end_ns: int,
                        limit: int) -> list[RequestRef]:
        """Requests that captured (hook, layer) in [start_ns, end_ns): the probe-training read,
        served by the by_hook_layer projection (no payload is read)."""
        where = ("hook = {hook:String} AND layer = {layer:Int32} AND capture_time >= fromUnixTimestamp64Nano({t0:Int64}, 'UTC') "
                 "AND capture_time < fromUnixTimestamp64Nano({t1:Int64}, 'UTC')")
        params = {"hook": hook, "layer": layer, "t0": start_ns, "t1": end_ns, "limit": limit}
        if model is not None:
            where += " AND model = {model:String}"
            params["model"] = model
        rows = self._query(
            f"SELECT hex(trace_id), request_id, any(model), toUnixTimestamp64Nano(min(capture_time)), "
            f"toUnixTimestamp64Nano(max(capture_time)) FROM {self.db}.activations WHERE {where} "
            f"GROUP BY trace_id, request_id ORDER BY min(capture_time) LIMIT {{limit:UInt32}}", params).result_rows
        return [RequestRef(bytes.fromhex(r[0]), r[1], r[2], int(r[3]), int(r[4])) for r in rows]

    # -- tensors ------------------------------------------------------------------------------

    def fetch(self, ref: RequestRef, hooks: list[str] | None = None, layers: list[int] | None = None,
              progress: Callable[[int, int], None] | None = None,
              page_records: int = 16384) -> Iterator[StoredTensor]:
        """The request's tensor records (one per dedup identity), payload in its stored encoding."""
        for page in self.fetch_pages(ref, hooks, layers, progress, page_records):
            yield from page.records()

    def fetch_pages(self, ref: RequestRef, hooks: list[str] | None = None, layers: list[int] | None = None,
                    progress: Callable[[int, int], None] | None = None,
                    page_records: int = 16384) -> Iterator["RecordPage"]:
        """The request's tensor records as column pages, each holding whole (hook, layer) groups of
        about `page_records` records, so a long read reports progress and never holds one huge
        result. Duplicates (same dedup identity) are already dropped."""
        where, params = self._scope(ref)
        if hooks:
            where += " AND hook IN {hooks:Array(String)}"
            params["hooks"] = hooks
        if layers:
            where += " AND layer IN {layers:Array(Int32)}"
            params["layers"] = layers
        groups = self._query(
            f"SELECT hook, layer, uniqExact(producer_pod, producer_pid, producer_generation, seq) "
            f"FROM {self.db}.activations WHERE {where} GROUP BY hook, layer ORDER BY hook, layer", params).result_rows
        total = sum(int(g[2]) for g in groups)
        if progress is not None:
            progress(0, total)
        pages: list[tuple[str, list[int]]] = []
        size = 0
        for hook, layer, n in groups:
            if not pages or pages[-1][0] != hook or size >= page_records:
                pages.append((hook, []))
                size = 0
            pages[-1][1].append(int(layer))
            size += int(n)
        # Duplicates (at-least-once delivery, not yet merged away) are dropped in RecordPage rather
        # than with LIMIT 1 BY in SQL: the engine's LIMIT 1 BY costs more than a set of tuples.
        sql = f"""
            SELECT layer, tp_rank, tp_size, CAST(positions_kind, 'Int8') AS positions_kind,
                   token_start, token_end, arrayStringConcat(positions, ',') AS positions, CAST(phase, 'Int8') AS phase,
                   step, CAST(dtype, 'String') AS dtype, arrayStringConcat(shape, ',') AS shape,
                   CAST(encoding, 'Int8') AS encoding, raw_size, payload, producer_rank, seq,
                   CAST(producer_pod, 'String') AS producer_pod, producer_pid, producer_generation
            FROM {self.db}.activations WHERE {where} AND hook = {{page_hook:String}} AND layer IN {{page_layers:Array(Int32)}}"""
        done = 0
        cache: dict = {}
        for hook, page_layers in pages:
            # Native output: each payload stays a zero-copy view of the result buffer (native.py).
            cols = read_native(self._query_native(sql, {**params, "page_hook": hook, "page_layers": page_layers}))
            if not cols:
                continue
            page = RecordPage(hook, cols, cache)
            done += len(page)
            yield page
            if progress is not None:
                progress(done, total)


class RecordPage:
    """Stored records in columns (numpy arrays, one payload buffer), as one fetch query returned
    them, duplicates dropped. `records()` gives StoredTensor objects; assemble.assemble_pages reads
    the columns directly, which for thousands of one-row decode records is several times cheaper."""

    INT_COLUMNS = ("layer", "tp_rank", "tp_size", "positions_kind", "token_start", "token_end", "phase", "step",
                   "encoding", "raw_size", "producer_rank", "seq")

    def __init__(self, hook: str, cols: dict, cache: dict | None = None):
        cache = {} if cache is None else cache
        self.hook = hook   # one page holds one hook (its query selects it)
        pay = cols["payload"]
        keep = None
        identity = list(zip(cols["producer_pod"].as_str(), cols["producer_pid"].tolist(),
                            cols["producer_generation"].tolist(), cols["seq"].tolist()))
        if len(set(identity)) != len(identity):
            seen: set = set()
            keep = np.array([not (k in seen or seen.add(k)) for k in identity], dtype=bool)
        pick = (lambda xs: xs) if keep is None else (lambda xs: [x for x, k in zip(xs, keep) if k])
        for name in self.INT_COLUMNS:
            col = cols[name]
            if name not in ("step", "seq"):   # UInt64 identities keep their type (no int64 wrap)
                col = col.astype(np.int64)
            setattr(self, name, col if keep is None else col[keep])
        # dtype and shape repeat for thousands of rows: parse each distinct value once
        codes = cache.setdefault("dtype", {})
        shapes = cache.setdefault("shape", {})
        dt = []
        for name in pick(cols["dtype"].as_str()):
            code = codes.get(name)
            if code is None:
                code = codes[name] = codec.dtype_code(name)
            dt.append(code)
        self.dtype: list[int] = dt
        self.shape: list[list[int]] = [shapes.get(x) or shapes.setdefault(x, _int_list(x))
                                       for x in pick(cols["shape"].as_str())]
        self.positions: list = [_int_list(x) if x else () for x in pick(cols["positions"].as_str())]  # () shared
        self.data = pay.data
        starts, ends = np.asarray(pay.starts, dtype=np.int64), np.asarray(pay.ends, dtype=np.int64)
        self.starts, self.ends = (starts, ends) if keep is None else (starts[keep], ends[keep])

    def __len__(self) -> int:
        return len(self.layer)

    def records(self) -> Iterator[StoredTensor]:
        data = self.data
        h = self.hook
        rows = zip(self.layer.tolist(), self.tp_rank.tolist(), self.tp_size.tolist(),
                   self.positions_kind.tolist(), self.token_start.tolist(), self.token_end.tolist(), self.positions,
                   self.phase.tolist(), self.step.tolist(), self.dtype, self.shape, self.encoding.tolist(),
                   self.raw_size.tolist(), self.starts.tolist(), self.ends.tolist(), self.producer_rank.tolist(),
                   self.seq.tolist())
        for layer, tp_rank, tp_size, kind, t0, t1, pos, phase, step, dt, shape, enc, raw_size, a, b, prank, sq in rows:
            yield StoredTensor(h, layer, tp_rank, tp_size, kind, t0, t1, pos, phase, step, dt, shape, enc,
                               raw_size, data[a:b], prank, sq)
