"""The gRPC query service (proto/tensortrace/v1/query.proto) over a ClickHouseBackend.

    tensortrace query-server --clickhouse-dsn http://user:pw@clickhouse:8123    # query/main.py, port 50052

    server, port = serve(client, port=0, security=EndpointSecurity.loopback_plaintext())   # in-process
    server.stop(grace=1)

Every read RPC needs the `read` role when the service has a token file, and each call is one audit
line (who, which RPC, trace / request id, hooks, result) and one count of
`tensortrace_audit_reads_total{identity,rpc,result}` (service/security.py, docs/security.md).

Forget (`tensortrace forget --server`) runs storage/forget.py's Forgetter in this process: with an
embedded chDB engine the loader that serves this is the only process that can open the data path,
so this is how a data-subject request is served without stopping it. It needs the `forget` role
(reading and steering capture do not imply erasing), and its audit line carries the ids and the
per-table counts (`tensortrace_audit_control_changes_total{rpc="Forget"}`).

Trace and SlowestTraces (`tensortrace trace --server`) run query/tracedata.py's TraceSource against
this service's client, on the tables named when it was started (`--otel-database`, `--traces-table`,
`--probe-table`: the defaults of `tensortrace trace`), and send what it read (query/tracewire.py).

A chDB path can be opened by one process only, so for an embedded engine this service runs inside
the loader (`tensortrace loader --query-port`), sharing its client; `tensortrace query-server`
is for ClickHouse servers (or a chDB path no loader holds).
"""

from __future__ import annotations

from concurrent import futures
from dataclasses import dataclass

import grpc

from tensortrace.query import validate
from tensortrace.query.backend import ClickHouseBackend, RequestRef
from tensortrace.query.errors import BackendUnavailable, InvalidQuery, NotFound, QueryError
from tensortrace.service.security import EndpointGuard, EndpointSecurity, Role, RpcPolicy, audit_note
from tensortrace.storage.otel import DEFAULT_OTEL_DATABASE, DEFAULT_TRACES_TABLE
from tensortrace.v1 import query_pb2 as qpb
from tensortrace.v1 import query_pb2_grpc as qgrpc

MAX_MESSAGE_BYTES = 256 << 20  # one reassembled record can exceed gRPC's 4 MiB default
BATCH_BYTES = 4 << 20          # records per Fetch message: fewer, larger messages


def ref_to_pb(ref: RequestRef) -> qpb.RequestRef:
    return qpb.RequestRef(trace_id=ref.trace_id, request_id=ref.request_id, model=ref.model,
                          first_capture_unix_nano=ref.first_capture_ns, last_capture_unix_nano=ref.last_capture_ns)


def ref_from_pb(m: qpb.RequestRef) -> RequestRef:
    return RequestRef(validate.trace_id_bytes(m.trace_id), validate.request_id(m.request_id), m.model,
                      m.first_capture_unix_nano, m.last_capture_unix_nano)


def _abort(context, e: Exception):
    code = {InvalidQuery: grpc.StatusCode.INVALID_ARGUMENT, NotFound: grpc.StatusCode.NOT_FOUND,
            BackendUnavailable: grpc.StatusCode.UNAVAILABLE}
    for cls, status in code.items():
        if isinstance(e, cls):
            context.abort(status, str(e))
    context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")


DEFAULT_PROBE_TABLE = "probe_scores"


@dataclass(frozen=True)
class TraceTables:
    """Where the Trace RPCs read: `tensortrace trace`'s --database / --otel-database /
    --traces-table / --probe-table, chosen by whoever starts the service."""
    database: str = "tensortrace"
    otel_database: str = DEFAULT_OTEL_DATABASE
    traces_table: str = DEFAULT_TRACES_TABLE
    probe_table: str = DEFAULT_PROBE_TABLE
    where: str = ""          # for messages: the ClickHouse read (no password)


def _abort_trace(context, e: Exception):
    """As _abort; an unreachable ClickHouse says so (the client tells it from an unreachable service)."""
    from tensortrace.query.tracewire import CLICKHOUSE_UNAVAILABLE

    if isinstance(e, BackendUnavailable):
        context.abort(grpc.StatusCode.UNAVAILABLE, f"{CLICKHOUSE_UNAVAILABLE}{e}")
    _abort(context, e)


class QueryServicer(qgrpc.QueryServiceServicer):
    def __init__(self, backend: ClickHouseBackend, tables: TraceTables | None = None):
        self.backend = backend
        self.tables = tables or TraceTables(database=backend.db)
        self.trace_source()   # names that are not identifiers fail here, when the service starts

    def trace_source(self):
        """A TraceSource per call: it caches which tables exist, and they may appear later."""
        from tensortrace.query.tracedata import TraceSource

        t = self.tables
        return TraceSource(self.backend.client, t.database, t.otel_database, t.traces_table, t.probe_table, t.where)

    def Trace(self, request, context):
        from tensortrace.query.tracewire import read_to_pb

        try:
            tid = validate.trace_id_bytes(request.trace_id).hex() if request.trace_id else None
            rid = validate.request_id(request.request_id) if request.request_id else None
            if tid is None and rid is None:
                raise InvalidQuery("give trace_id or request_id")
            resp = read_to_pb(self.trace_source().read(tid, rid, norms=request.residual_norms))
        except Exception as e:   # QueryError -> its code; anything else INTERNAL, named
            _abort_trace(context, e)
        size = resp.ByteSize()
        if size > MAX_MESSAGE_BYTES:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"trace {resp.trace_id}: the response would be {size / 2**20:,.0f} MiB, over the query "
                          f"service's {MAX_MESSAGE_BYTES >> 20} MiB message bound (read it with --clickhouse)")
        return resp

    def SlowestTraces(self, request, context):
        from tensortrace.query.tracedata import MAX_SLOWEST
        from tensortrace.query.tracewire import slow_to_pb

        try:
            if not 1 <= request.limit <= MAX_SLOWEST:
                raise InvalidQuery(f"limit {request.limit}: expected 1 to {MAX_SLOWEST}")
            src = self.trace_source()
            rows = src.slowest(request.limit, request.since_unix_nano)
            return qpb.SlowestTracesResponse(requests=slow_to_pb(rows), where=src.where())
        except Exception as e:
            _abort_trace(context, e)

    def Forget(self, request, context):
        """`tensortrace forget --server`: storage/forget.py's Forgetter on this service's client and
        tables (the process that holds an embedded engine). The audit line gets the per-table
        counts."""
        from tensortrace.storage.forget import ForgetInputError, Forgetter, Target

        try:
            target = Target.parse(request.trace_id or None, request.request_id or None)
        except ForgetInputError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"forget: {e}")
        t = self.tables
        try:
            rep = Forgetter(self.backend.client, t.database, t.otel_database, t.traces_table, t.where).forget(
                target, dry_run=request.dry_run)
        except Exception as e:   # ClickHouse failed mid-way: what was deleted stays deleted; forget again
            audit_note(error=f"{type(e).__name__}: {str(e)[:300]}")
            _abort_trace(context, e if isinstance(e, QueryError) else
                         QueryError(f"forget {target} at {t.where or 'ClickHouse'} failed: {type(e).__name__}: "
                                    f"{str(e)[:300]} (tables forgotten before the failure stay forgotten; run it "
                                    "again)"))
        audit_note(rows_before=rep.counts, deleted=rep.deleted, whole_traces=rep.whole_traces,
                   tables_absent=rep.absent, recorded=rep.recorded)
        return forget_report_to_pb(rep)

    def Lookup(self, request, context):
        try:
            tid = validate.trace_id_bytes(request.trace_id) if request.trace_id else None
            rid = validate.request_id(request.request_id) if request.request_id else None
            if tid is None and rid is None:
                raise InvalidQuery("give trace_id or request_id")
            refs = self.backend.lookup(tid, rid)
        except QueryError as e:
            _abort(context, e)
        return qpb.LookupResponse(requests=[ref_to_pb(r) for r in refs])

    def Status(self, request, context):
        try:
            st = self.backend.status(ref_from_pb(request))
        except QueryError as e:
            _abort(context, e)
        return qpb.StatusResponse(request=ref_to_pb(st.ref), summaries=st.summaries, records_loaded=st.records_loaded)

    def Describe(self, request, context):
        try:
            stats = self.backend.describe(ref_from_pb(request))
        except QueryError as e:
            _abort(context, e)
        return qpb.DescribeResponse(hooks=[qpb.HookLayerStats(**s.__dict__) for s in stats])

    def Fetch(self, request, context):
        try:
            ref = ref_from_pb(request.request)
            hooks = validate.hooks(list(request.hooks))
            layers = validate.layers(list(request.layers))
            if request.assembled:
                yield from self._fetch_assembled(ref, hooks, layers)
                return
            total: list[int] = []
            batch, size = [], 0
            for rec in self.backend.fetch(ref, hooks, layers, progress=lambda done, n: total.append(n) if not total else None):
                if len(total) == 1:
                    yield qpb.FetchResponse(total_records=total[0])
                    total.append(-1)
                batch.append(rec.to_record())
                size += len(rec.payload) + 128
                if size >= BATCH_BYTES:
                    yield qpb.FetchResponse(records=qpb.RecordBatch(records=batch))
                    batch, size = [], 0
            if len(total) == 1:
                yield qpb.FetchResponse(total_records=total[0])
            if batch:
                yield qpb.FetchResponse(records=qpb.RecordBatch(records=batch))
        except QueryError as e:
            _abort(context, e)


    def _fetch_assembled(self, ref, hooks, layers):
        from tensortrace.query.assemble import iter_assembled
        from tensortrace.wire import codec

        # Streamed: each (hook, layer) goes out as soon as it is assembled, so the client decodes
        # one while the next is built.
        total: list[int] = []
        pages = self.backend.fetch_pages(ref, hooks, layers, progress=lambda done, n: total.append(n) if not total else None)
        for (hook, layer), c in iter_assembled(pages):
            if len(total) == 1:
                yield qpb.FetchResponse(total_records=total[0])
                total.append(-1)
            t = c.tensor.contiguous()
            data = t.reshape(-1).view(torch_uint8()).numpy().tobytes() if t.numel() else b""
            yield qpb.FetchResponse(tensor=qpb.AssembledTensor(
                hook=hook, layer=layer, dtype=codec.dtype_code(t.dtype), shape=list(t.shape), start=c.start,
                end=c.end, gap_starts=[g[0] for g in c.gaps], gap_ends=[g[1] for g in c.gaps],
                positions=c.positions or [], records=c.records, prefill_rows=c.prefill_rows,
                decode_rows=c.decode_rows, data=data))
        if len(total) <= 1:
            yield qpb.FetchResponse(total_records=total[0] if total else 0)


def forget_report_to_pb(rep) -> qpb.ForgetResponse:
    return qpb.ForgetResponse(
        selector=rep.target.selector, id=rep.target.value, dry_run=rep.dry_run, where=rep.where,
        requests=[qpb.RequestRef(trace_id=bytes.fromhex(tid), request_id=rid) for tid, rid in rep.requests],
        whole_traces=rep.whole_traces,
        tables=[qpb.ForgetTable(table=k, rows_before=n, deleted=rep.deleted.get(k, 0)) for k, n in rep.counts.items()],
        tables_absent=rep.absent, previously_forgotten=rep.previously_forgotten, recorded=rep.recorded)


def forget_report_from_pb(m: qpb.ForgetResponse):
    from tensortrace.storage.forget import ForgetReport, Target

    return ForgetReport(target=Target(m.selector, m.id), dry_run=m.dry_run,
                        requests=[(r.trace_id.hex(), r.request_id) for r in m.requests],
                        whole_traces=list(m.whole_traces), counts={t.table: t.rows_before for t in m.tables},
                        absent=list(m.tables_absent),
                        deleted={} if m.dry_run else {t.table: t.deleted for t in m.tables},
                        previously_forgotten=m.previously_forgotten, recorded=m.recorded, where=m.where)


def torch_uint8():
    import torch

    return torch.uint8


def _ref_fields(ref) -> dict:
    return {"trace_id": ref.trace_id.hex(), "request_id": ref.request_id}


def _fetch_fields(req) -> dict:
    return {**_ref_fields(req.request), "hooks": list(req.hooks), "layers": list(req.layers),
            "assembled": req.assembled}


def _ids_fields(req) -> dict:
    return {"trace_id": req.trace_id.hex(), "request_id": req.request_id}


# what each RPC needs and what its audit line says (service/security.py)
QUERY_POLICIES = {
    "Lookup": RpcPolicy((Role.READ,), "read", _ids_fields),
    "Status": RpcPolicy((Role.READ,), "read", _ref_fields),
    "Describe": RpcPolicy((Role.READ,), "read", _ref_fields),
    "Fetch": RpcPolicy((Role.READ,), "read", _fetch_fields),
    "Trace": RpcPolicy((Role.READ,), "read", lambda r: {**_ids_fields(r), "residual_norms": r.residual_norms}),
    "SlowestTraces": RpcPolicy((Role.READ,), "read", lambda r: {"limit": r.limit, "since_unix_nano": r.since_unix_nano}),
    # erasure: its own role (neither `read` nor `control` implies it: docs/security.md), audited with
    # the ids and, once done, the per-table counts
    "Forget": RpcPolicy((Role.FORGET,), "forget", lambda r: {"trace_id": r.trace_id, "request_id": r.request_id,
                                                            "dry_run": r.dry_run}),
}


def serve(client, database: str = "tensortrace", host: str = "127.0.0.1", port: int = 0, workers: int = 4,
          otel_database: str = DEFAULT_OTEL_DATABASE, traces_table: str = DEFAULT_TRACES_TABLE,
          probe_table: str = DEFAULT_PROBE_TABLE, where: str = "", *, security: EndpointSecurity,
          registry=None):
    """Start the service on host:port (0: any free port). Returns (grpc.Server, bound port).
    otel_database / traces_table / probe_table: where the Trace RPCs read spans and probe scores;
    where: the ClickHouse read, for messages (no password). `security`: TLS / tokens, or the
    plaintext opt-in (EndpointSecurity.loopback_plaintext() on 127.0.0.1); `registry`: where the
    audit and authentication counters go (the service's). A name that is not an identifier
    raises ValueError; plaintext on a non-loopback address without the force, or a bad
    certificate / token file, SecurityError (a ConfigError)."""
    tables = TraceTables(database, otel_database, traces_table, probe_table, where)
    servicer = QueryServicer(ClickHouseBackend(client, database), tables)
    guard = EndpointGuard("query", security, QUERY_POLICIES, registry=registry)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="query"),
                         interceptors=[guard.interceptor()],
                         options=[("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                                  ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
    qgrpc.add_QueryServiceServicer_to_server(servicer, server)
    bound = guard.add_port(server, host, port)
    server.start()
    server.guard = guard   # tests and the embedding service reach the audit counters through it
    return server, bound
