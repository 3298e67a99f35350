"""`tensortrace trace --server`: a TraceRead (query/tracedata.py) as a query.proto TraceResponse and
back, and the CLI's source that asks the query service for it.

    src = GrpcTraceSource(GrpcBackend("127.0.0.1:50052"), "127.0.0.1:50052")
    read = src.read("4bf92f3577b34da6a3ce929d0e0e4736", norms=True)   # the same TraceRead as TraceSource.read

The server runs TraceSource.read against its own ClickHouse client and sends what it returns, field
by field; the client rebuilds the same TraceRead (completeness recomputed from the summaries by
the one rule, wire/completeness.py; verdicts and slow rows built by the same functions), so
`build_story` and everything after it run on equal inputs either way: `--json` is byte-identical.

Bounds: the spans are TraceSource's (MAX_SPANS, truncation noted in the story and flagged in
`spans_truncated`); the residual norms at most NORMS_MAX_BYTES (the first positions; the HTML/PNG
then says how many were sent); the whole response at most the service's message bound, else
RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import grpc
import numpy as np

from tensortrace.query.backend import HookLayerStats, RequestRef
from tensortrace.query.errors import BackendUnavailable, InvalidQuery, NotFound, QueryError, QueryTimeout
from tensortrace.query.remote import access_hint
from tensortrace.query.timeline import Span, StepTimes, Timing, TraceInputs
from tensortrace.query.tracedata import ResidualNorms, TraceRead, slow_row, verdict_dict
from tensortrace.v1 import query_pb2 as qpb
from tensortrace.wire.completeness import completeness

NORMS_MAX_BYTES = 64 << 20   # the heatmap's float32 matrix in one response; more: the first positions
# The server's UNAVAILABLE when its ClickHouse is down, told apart from "no server answered".
CLICKHOUSE_UNAVAILABLE = "the query service cannot reach ClickHouse: "


class AccessRefused(QueryError):
    """The query service refused the call: no / unknown token (UNAUTHENTICATED) or a token without
    the `read` role (PERMISSION_DENIED); the message says which token to give."""


def _ref_pb(ref: RequestRef) -> qpb.RequestRef:
    return qpb.RequestRef(trace_id=ref.trace_id, request_id=ref.request_id, model=ref.model,
                          first_capture_unix_nano=ref.first_capture_ns, last_capture_unix_nano=ref.last_capture_ns)


def read_to_pb(read: TraceRead) -> qpb.TraceResponse:
    """The response for a TraceRead (TraceSource.read on the server)."""
    inp = read.inputs
    m = qpb.TraceResponse(trace_id=inp.trace_id, request_id=inp.request_id, model=inp.model,
                          request_ids=inp.request_ids, where=inp.where, notes=inp.notes,
                          spans_truncated=read.spans_truncated)
    for s in inp.spans:
        m.spans.add(span_id=s.span_id, parent_span_id=s.parent_span_id, name=s.name, kind=s.kind, service=s.service,
                    start_unix_nano=s.start_ns, duration_nano=s.duration_ns, status=s.status,
                    status_message=s.status_message, attributes={str(k): str(v) for k, v in s.attributes.items()})
    if read.ref is not None:
        m.request.CopyFrom(_ref_pb(read.ref))
        m.summaries.extend(read.summaries)
        m.records_loaded = read.records_loaded
        m.stats.extend(qpb.HookLayerStats(**s.__dict__) for s in inp.stats)
    t = inp.timing
    if t is not None:
        m.timing.SetInParent()
        for st in t.steps:
            m.timing.steps.add(step=st.step, phase=st.phase, first_capture_unix_nano=st.first_capture_ns,
                               last_capture_unix_nano=st.last_capture_ns, last_export_unix_nano=st.last_export_ns,
                               last_load_unix_nano=st.last_load_ns)
        m.timing.summary_start_unix_nano, m.timing.summary_end_unix_nano = t.summary_start_ns, t.summary_end_ns
        m.timing.summary_export_unix_nano, m.timing.summary_load_unix_nano = t.summary_export_ns, t.summary_load_ns
        m.timing.producer_node, m.timing.producer_pod = t.producer_node, t.producer_pod
    for name, (pos, scores) in (inp.probes or {}).items():
        m.probe_curves.add(name=name, positions=np.asarray(pos).tolist(), scores=np.asarray(scores).tolist())
    for v in inp.probe_verdicts:
        m.probe_verdicts.add(probe=v["probe"], name=v["name"], probe_hash=v["probe_hash"], score=v["score"],
                             threshold=v["threshold"], label=v["label"], complete=v["complete"],
                             incomplete_reason=v["incomplete_reason"], hook=v["hook"], layers=v["layers"],
                             pooling=v["pooling"], tokens_scored=v["tokens_scored"],
                             request_end_unix_nano=v["request_end_unix_nano"], scored_unix_nano=v["scored_unix_nano"],
                             request_id=v["request_id"])
    n = read.norms
    if n is not None:
        total = n.norms.shape[1]
        keep = max(0, min(total, NORMS_MAX_BYTES // (4 * max(1, len(n.layers)))))
        mat = np.ascontiguousarray(n.norms[:, :keep], dtype="<f4")
        m.residual_norms.CopyFrom(qpb.ResidualNorms(hook=n.hook, layers=n.layers, start=n.start, shape=list(mat.shape),
                                                    norms=mat.tobytes(), positions_total=total))
    return m


def read_from_pb(m: qpb.TraceResponse) -> TraceRead:
    """The TraceRead the server read (norms cut to the bound carry `truncated_from`)."""
    inp = TraceInputs(trace_id=m.trace_id, request_id=m.request_id, model=m.model,
                      request_ids=list(m.request_ids), where=m.where, notes=list(m.notes))
    inp.spans = [Span(s.span_id, s.parent_span_id, s.name, s.kind, s.service, s.start_unix_nano, s.duration_nano,
                      s.status, s.status_message, dict(s.attributes)) for s in m.spans]
    ref = None
    if m.HasField("request"):
        r = m.request
        ref = RequestRef(r.trace_id, r.request_id, r.model, r.first_capture_unix_nano, r.last_capture_unix_nano)
        inp.completeness = completeness(list(m.summaries), m.records_loaded)
        inp.stats = [HookLayerStats(h.hook, h.layer, h.records, h.token_start, h.token_end, h.tokens, h.raw_bytes,
                                    h.stored_bytes, h.capture_to_export_ms_p50, h.export_to_load_ms_p50,
                                    h.capture_to_load_ms_max) for h in m.stats]
    if m.HasField("timing"):
        t = m.timing
        inp.timing = Timing([StepTimes(s.step, s.phase, s.first_capture_unix_nano, s.last_capture_unix_nano,
                                       s.last_export_unix_nano, s.last_load_unix_nano) for s in t.steps],
                            t.summary_start_unix_nano, t.summary_end_unix_nano, t.summary_export_unix_nano,
                            t.summary_load_unix_nano, t.producer_node, t.producer_pod)
    inp.probes = {c.name: (np.asarray(c.positions, dtype=np.int64), np.asarray(c.scores, dtype=np.float32))
                  for c in m.probe_curves} or None
    inp.probe_verdicts = [verdict_dict(v.probe, v.name, v.probe_hash, v.score, v.threshold, v.label, v.complete,
                                       v.incomplete_reason, v.hook, list(v.layers), v.pooling, v.tokens_scored,
                                       v.request_end_unix_nano, v.scored_unix_nano, v.request_id)
                          for v in m.probe_verdicts]
    norms = None
    if m.HasField("residual_norms"):
        n = m.residual_norms
        rows, cols = (int(x) for x in n.shape)
        if len(n.norms) != rows * cols * 4 or rows != len(n.layers):
            raise QueryError(f"residual norms of shape {list(n.shape)} for {len(n.layers)} layers in {len(n.norms)} bytes")
        mat = np.frombuffer(n.norms, dtype="<f4").astype(np.float32).reshape(rows, cols)
        norms = ResidualNorms(list(n.layers), n.start, mat, n.hook,
                              int(n.positions_total) if n.positions_total > cols else 0)
    return TraceRead(inp, ref, norms, list(m.summaries), m.records_loaded, m.spans_truncated)


def slow_to_pb(rows: list[dict]) -> list[qpb.SlowTrace]:
    out = []
    for r in rows:
        m = qpb.SlowTrace(trace_id=r["trace_id"], request_id=r["request_id"] or "", start_unix_nano=r["start_unix_nano"],
                          duration_ms=r["duration_ms"], model=r["model"] or "", found_in=r["from"])
        if r["prompt_tokens"] is not None:
            m.prompt_tokens, m.generated_tokens = r["prompt_tokens"], r["generated_tokens"]
        if r["complete"] is not None:
            m.complete = r["complete"]
        out.append(m)
    return out


def slow_from_pb(rows) -> list[dict]:
    return [slow_row(m.trace_id, m.request_id, m.start_unix_nano, m.duration_ms,
                     m.prompt_tokens if m.HasField("prompt_tokens") else None,
                     m.generated_tokens if m.HasField("generated_tokens") else None,
                     m.complete if m.HasField("complete") else None, m.model, list(m.found_in)) for m in rows]


class GrpcTraceSource:
    """TraceSource's read side over the query service (`tensortrace trace --server`): `read()`,
    `slowest()`, `where()`. Errors name the service and say whose fault they are:

        cannot reach the query service at 127.0.0.1:50052: failed to connect ...   (BackendUnavailable)
        the query service at 127.0.0.1:50052 cannot reach ClickHouse: ...          (BackendUnavailable)
        no request or span with trace id ... (through the query service at ...)    (NotFound)
        the query service at ... does not serve Trace (an older tensortrace): ...  (QueryError)
        the query service at ... refused Trace: not authenticated (UNAUTHENTICATED: ...)   (AccessRefused)
          Trace needs a bearer token with the `read` role ...: give --token-file FILE ...
        the query service at ... refused Trace: permission denied (PERMISSION_DENIED: query: ops may
          not call Trace: it needs role read, the token has control)               (AccessRefused)
          Trace needs a token with the `read` role; the token given is known but lacks it: ...
    """

    def __init__(self, backend, address: str):
        self.backend = backend          # a remote.GrpcBackend: its channel, stub and timeout
        self.address = address
        self._where = ""

    def where(self) -> str:
        return (self._where or "the query service's ClickHouse") + f" (through the query service at {self.address})"

    def _error(self, e: grpc.RpcError, rpc: str) -> QueryError:
        code, detail = e.code(), e.details() or ""
        at = f"the query service at {self.address}"
        if code == grpc.StatusCode.UNAVAILABLE:
            if detail.startswith(CLICKHOUSE_UNAVAILABLE):
                return BackendUnavailable(f"{at} cannot reach ClickHouse: {detail.removeprefix(CLICKHOUSE_UNAVAILABLE)}")
            return BackendUnavailable(f"cannot reach the query service at {self.address}: {detail}")
        if code == grpc.StatusCode.NOT_FOUND:
            return NotFound(f"{detail} (through {at})")
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return InvalidQuery(f"{at}: {detail}")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return QueryTimeout(f"{at} did not answer {rpc} within {self.backend.timeout_s:g} s")
        if code == grpc.StatusCode.UNIMPLEMENTED:
            return QueryError(f"{at} does not serve {rpc} (an older tensortrace): upgrade it, or read ClickHouse "
                              "with --clickhouse")
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return AccessRefused(f"{at} refused {rpc}: not authenticated (UNAUTHENTICATED: {detail})\n  "
                                 f"{access_hint(code, rpc, 'read')}")
        if code == grpc.StatusCode.PERMISSION_DENIED:
            return AccessRefused(f"{at} refused {rpc}: permission denied (PERMISSION_DENIED: {detail})\n  "
                                 f"{access_hint(code, rpc, 'read')}")
        return QueryError(f"{at}: {code.name}: {detail}")

    def read(self, trace_id: str | None, request_id: str | None = None, norms: bool = False) -> TraceRead:
        req = qpb.TraceRequest(trace_id=bytes.fromhex(trace_id) if trace_id else b"", request_id=request_id or "",
                               residual_norms=norms)
        try:
            m = self.backend.stub.Trace(req, timeout=self.backend.timeout_s)
        except grpc.RpcError as e:
            raise self._error(e, "Trace") from None
        self._where = m.where
        return read_from_pb(m)

    def slowest(self, n: int, since_ns: int) -> list[dict]:
        try:
            m = self.backend.stub.SlowestTraces(qpb.SlowestTracesRequest(limit=n, since_unix_nano=max(0, since_ns)),
                                                timeout=self.backend.timeout_s)
        except grpc.RpcError as e:
            raise self._error(e, "SlowestTraces") from None
        self._where = m.where
        return slow_from_pb(m.requests)
