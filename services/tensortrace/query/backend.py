"""Where the read-back SDK gets rows from: ClickHouse directly (this module) or the gRPC query
service (remote.py). Both return the same small types, so assembly happens in one place.

>>> backend = ClickHouseBackend(clickhouse_connect.get_client(dsn="http://localhost:8123"))
>>> [ref] = backend.lookup(trace_id=bytes.fromhex("4bf92f3577b34da6a3ce929d0e0e4736"))
>>> records = list(backend.fetch(ref, hooks=["resid_pre"], layers=None))

Every value reaches SQL as a bound parameter ({name:Type}); only the database name is spliced in,
and it is validated as an identifier when the backend is made.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

from tensortrace.loader.schema import DEFAULT_DATABASE, check_identifier
from tensortrace.query.errors import BackendUnavailable, InvalidQuery, QueryError
from tensortrace.v1 import records_pb2 as pb
from tensortrace.wire import codec


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
            SELECT hex(trace_id), request_id, any(model), min(first), max(last) FROM (
                SELECT trace_id, request_id, model, toUnixTimestamp64Nano(first_capture) AS first,
                       toUnixTimestamp64Nano(last_capture) AS last
                FROM {self.db}.activation_traces WHERE {where}
                UNION ALL
                SELECT trace_id, request_id, model, 0 AS first, 0 AS last
                FROM {self.db}.requests WHERE {where}
            ) GROUP BY trace_id, request_id ORDER BY request_id"""
        rows = self._query(sql, params).result_rows
        out = []
        for tid, rid, model, first, last in rows:
            # min() over a union with the summary's 0 would hide the tensors' bounds: recompute.
            out.append(RequestRef(bytes.fromhex(tid), rid, model, int(first), int(last)))
        if out:
            bounds = self._query(
                f"SELECT request_id, toUnixTimestamp64Nano(min(first_capture)), toUnixTimestamp64Nano(max(last_capture)) "
                f"FROM {self.db}.activation_traces WHERE {where} GROUP BY request_id", params).result_rows
            by_rid = {r[0]: (int(r[1]), int(r[2])) for r in bounds}
            for ref in out:
                ref.first_capture_ns, ref.last_capture_ns = by_rid.get(ref.request_id, (0, 0))
        return out

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
                       producer_node, producer_pod, producer_pid, producer_rank, producer_generation, seq
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
                producer=pb.Producer(node=r[18], pod=r[19], pid=r[20], tp_rank=r[21], generation=r[22]), seq=r[23]))
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

    # -- tensors ------------------------------------------------------------------------------

    def fetch(self, ref: RequestRef, hooks: list[str] | None = None, layers: list[int] | None = None,
              progress: Callable[[int, int], None] | None = None,
              page_records: int = 4096) -> Iterator[pb.TensorRecord]:
        """The request's tensor records (one per dedup identity), payload in its stored encoding.

        Read in pages of whole (hook, layer) groups of about `page_records` records, so a long read
        reports progress and never holds one huge result.
        """
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
        sql = f"""
            SELECT model, hook, layer, tp_rank, tp_size, CAST(positions_kind, 'Int8'), token_start, token_end,
                   positions, CAST(phase, 'Int8'), step, dtype, shape, CAST(encoding, 'Int8'), raw_size, payload,
                   toUnixTimestamp64Nano(capture_time), toUnixTimestamp64Nano(export_time),
                   producer_node, producer_pod, producer_pid, producer_rank, producer_generation, seq, span_id
            FROM {self.db}.activations WHERE {where} AND hook = {{page_hook:String}} AND layer IN {{page_layers:Array(Int32)}}
            LIMIT 1 BY producer_pod, producer_pid, producer_generation, seq"""
        done = 0
        dtype_codes: dict[str, int] = {}
        for hook, page_layers in pages:
            try:
                cols = self.client.query(sql, parameters={**params, "page_hook": hook, "page_layers": page_layers},
                                         column_formats={"payload": "bytes"}).result_columns
            except Exception as e:
                raise _query_error(e) from e
            if not cols:
                continue
            n = len(cols[0])
            for i in range(n):
                dname = cols[11][i]
                code = dtype_codes.get(dname)
                if code is None:
                    code = dtype_codes[dname] = codec.dtype_code(dname)
                yield pb.TensorRecord(
                    model_id=cols[0][i], request_id=ref.request_id, trace_id=ref.trace_id,
                    span_id=cols[24][i], hook=cols[1][i], layer=cols[2][i], tp_rank=cols[3][i],
                    tp_size=cols[4][i], positions_kind=cols[5][i], token_start=cols[6][i],
                    token_end=cols[7][i], positions=cols[8][i], phase=cols[9][i], step=cols[10][i],
                    dtype=code, shape=cols[12][i], encoding=cols[13][i], raw_size=cols[14][i],
                    payload=cols[15][i], capture_time_unix_nano=cols[16][i],
                    export_time_unix_nano=cols[17][i],
                    producer=pb.Producer(node=cols[18][i], pod=cols[19][i], pid=cols[20][i],
                                         tp_rank=cols[21][i], generation=cols[22][i]),
                    seq=cols[23][i])
            done += n
            if progress is not None:
                progress(done, total)
