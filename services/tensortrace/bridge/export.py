"""Where the bridge's spans go: OTLP (the real OpenTelemetry SDK exporters) and ClickHouse
(`otel_traces`, the OTel Collector ClickHouse exporter's shape: storage/otel.py).

    w = OtlpWriter.create("127.0.0.1:4317", protocol="grpc", resource=bridge_resource("tensortrace-bridge"))
    w.write(spans, stopping)       # True once the receiver accepted every span; False only if stopping
    ch = ClickHouseWriter(client, "otel", "otel_traces", resource=bridge_resource("tensortrace-bridge"))
    ch.write(spans, stopping)      # True once ClickHouse acknowledged the insert

Both writers return only when the spans are durable at the destination, retrying with the one
backoff of every service (`tensortrace.service.Backoff`) until then; they give up only when the
service is stopping (`stopping` set), and the caller then does not commit the Kafka offsets, so the
requests are read again and their spans re-sent with the same ids (spans.py).

The serving engine's own spans (received by the bridge's OTLP receiver, read back off the spans
topic) go through the same writers, as they came: `ClickHouseWriter.write_requests` (rows as the
Collector's ClickHouse exporter makes them, otlp.py) and `OtlpForwarder` (each request forwarded
unchanged through the SDK exporter's transport).

OTLP: the spans are `opentelemetry.sdk.trace.ReadableSpan`s with explicit ids, parent, times,
status, attributes and links, handed to the SDK's `OTLPSpanExporter.export()` in batches of
`batch_spans` — no tracer, no span processor: the spans describe what already happened, and a
BatchSpanProcessor would drop spans when full and acknowledge nothing (we need "accepted" before
committing). The gRPC exporter retries transient errors itself within its timeout; a FAILURE result
is retried here.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, TraceFlags
from opentelemetry.trace.status import Status, StatusCode

import tensortrace
from tensortrace.bridge.spans import SpanData, TraceColumns, string_map, trace_columns
from tensortrace.service.backoff import Backoff
from tensortrace.storage.otel import TRACES_COLUMNS

log = logging.getLogger("tensortrace.bridge.export")

SCOPE_NAME = "tensortrace.bridge"
MAX_REQUEST_BYTES = 3 << 20    # an OTLP export call stays under the usual 4 MiB receive limit
_SPAN_BYTES, _LINK_BYTES = 1500, 150   # generous estimates of an encoded span and link
SCOPE_VERSION = tensortrace.__version__
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)


def bridge_resource(service_name: str) -> Resource:
    """The resource of every span: service.name, the SDK's telemetry.sdk.* and whatever
    OTEL_RESOURCE_ATTRIBUTES adds (k8s.pod.name, ... from the pod spec)."""
    return Resource.create({"service.name": service_name})


def bridge_scope() -> InstrumentationScope:
    return InstrumentationScope(SCOPE_NAME, SCOPE_VERSION)


@dataclass
class WriterStats:
    spans: int = 0            # spans the destination accepted (re-sends included)
    batches: int = 0          # successful calls
    failures: int = 0         # failed attempts (retried)
    seconds: float = 0.0      # time spent in successful and failed calls
    last_error: str = ""


class SpanWriter(Protocol):
    destination: str          # "otlp" | "clickhouse": the metrics' label
    stats: WriterStats

    def write(self, spans: list[SpanData], stopping: threading.Event) -> bool:
        """True once every span is durable at the destination; False only when `stopping` was set."""

    def close(self) -> None: ...


def readable_span(s: SpanData, resource: Resource, scope: InstrumentationScope) -> ReadableSpan:
    """A finished SDK span with exactly our ids, parent, times, status, attributes and links."""
    tid = int.from_bytes(s.trace_id, "big")
    ctx = SpanContext(tid, int.from_bytes(s.span_id, "big"), is_remote=False, trace_flags=_SAMPLED)
    parent = (SpanContext(tid, int.from_bytes(s.parent_span_id, "big"), is_remote=True, trace_flags=_SAMPLED)
              if s.parent_span_id else None)
    links = [Link(SpanContext(int.from_bytes(t, "big"), int.from_bytes(sid, "big"), is_remote=True,
                              trace_flags=_SAMPLED), attrs) for t, sid, attrs in s.links]
    status = Status(s.status, s.status_message or None) if s.status is StatusCode.ERROR else Status(s.status)
    return ReadableSpan(name=s.name, context=ctx, parent=parent, resource=resource, attributes=s.attributes,
                        links=links, kind=s.kind, status=status, start_time=s.start_ns, end_time=s.end_ns,
                        instrumentation_scope=scope)


class OtlpWriter:
    destination = "otlp"

    def __init__(self, exporter, resource: Resource, *, batch_spans: int = 512, retry_initial_s: float = 0.2,
                 retry_max_s: float = 10.0):
        self.exporter = exporter
        self.resource = resource
        self.scope = bridge_scope()
        self.batch_spans = batch_spans
        self.retry = (retry_initial_s, retry_max_s)
        self.stats = WriterStats()

    @classmethod
    def create(cls, endpoint: str, *, protocol: str = "grpc", insecure: bool = True, timeout_s: float = 10.0,
               resource: Resource, batch_spans: int = 512, retry_initial_s: float = 0.2,
               retry_max_s: float = 10.0) -> "OtlpWriter":
        """An OTLP/gRPC (`host:port`) or OTLP/HTTP (`http://host:4318/v1/traces`) span exporter of the SDK."""
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            exporter = OTLPSpanExporter(endpoint=endpoint, insecure=insecure, timeout=timeout_s)
        elif protocol == "http/protobuf":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            exporter = OTLPSpanExporter(endpoint=endpoint, timeout=timeout_s)
        else:
            raise ValueError(f"OTLP protocol {protocol!r} is not grpc or http/protobuf")
        return cls(exporter, resource, batch_spans=batch_spans, retry_initial_s=retry_initial_s, retry_max_s=retry_max_s)

    def chunks(self, spans: list[SpanData]) -> list[list[SpanData]]:
        """At most `batch_spans` spans per export call, and about `MAX_REQUEST_BYTES` at most: a step
        span carries a link per request of its batch (~150 bytes each), so 512 of them could exceed
        a receiver's gRPC message limit (4 MiB by default, a Collector's and ours)."""
        out: list[list[SpanData]] = []
        cur: list[SpanData] = []
        size = 0
        for s in spans:
            est = _SPAN_BYTES + _LINK_BYTES * len(s.links)
            if cur and (len(cur) >= self.batch_spans or size + est > MAX_REQUEST_BYTES):
                out.append(cur)
                cur, size = [], 0
            cur.append(s)
            size += est
        if cur:
            out.append(cur)
        return out

    def write(self, spans: list[SpanData], stopping: threading.Event) -> bool:
        for part in self.chunks(spans):
            chunk = [readable_span(s, self.resource, self.scope) for s in part]
            backoff = Backoff(*self.retry)
            while True:
                t0 = time.perf_counter()
                try:
                    result = self.exporter.export(chunk)
                    error = "" if result is SpanExportResult.SUCCESS else f"export returned {result.name}"
                except Exception as e:   # the SDK logs and returns FAILURE; a raise is a bug or a closed channel
                    error = f"{type(e).__name__}: {e}"
                self.stats.seconds += time.perf_counter() - t0
                if not error:
                    self.stats.spans += len(chunk)
                    self.stats.batches += 1
                    break
                self.stats.failures += 1
                self.stats.last_error = error
                log.warning("OTLP export of %d spans failed (%s); retrying in %.1fs", len(chunk), error, backoff.delay)
                if backoff.wait(stopping):
                    return False
        return True

    def close(self) -> None:
        self.exporter.shutdown()


class ClickHouseWriter:
    destination = "clickhouse"

    def __init__(self, client, database: str, table: str, *, resource: Resource, retry_initial_s: float = 0.2,
                 retry_max_s: float = 10.0):
        self.client = client
        self.table = f"{database}.{table}"
        self.service_name = str(resource.attributes.get("service.name", ""))
        self.resource = string_map(dict(resource.attributes))
        self.retry = (retry_initial_s, retry_max_s)
        self.stats = WriterStats()

    def columns(self, spans: list[SpanData]) -> TraceColumns:
        return trace_columns(spans, self.service_name, self.resource, SCOPE_NAME, SCOPE_VERSION)

    def write(self, spans: list[SpanData], stopping: threading.Event) -> bool:
        if not spans:
            return True
        return self.insert(self.columns(spans), stopping)

    def write_requests(self, requests: list, stopping: threading.Event) -> bool:
        """The serving engine's spans (OTLP ExportTraceServiceRequests off the spans topic) as the
        Collector's ClickHouse exporter would write them (otlp.py), with their own resources and
        scopes; durable like `write`."""
        from tensortrace.bridge.otlp import otlp_trace_columns

        cols = otlp_trace_columns(requests)
        return True if not len(cols) else self.insert(cols, stopping)

    def insert(self, cols: TraceColumns, stopping: threading.Event) -> bool:
        """Insert otel_traces rows, retried with the backoff until ClickHouse acknowledged them;
        False only when `stopping` was set first."""
        backoff = Backoff(*self.retry)
        while True:
            t0 = time.perf_counter()
            try:
                self.client.insert(self.table, cols.columns, column_names=list(TRACES_COLUMNS), column_oriented=True)
                error = ""
            except Exception as e:   # server down, timeout, refused: retried
                error = f"{type(e).__name__}: {str(e)[:300]}"
            self.stats.seconds += time.perf_counter() - t0
            if not error:
                self.stats.spans += len(cols)
                self.stats.batches += 1
                return True
            self.stats.failures += 1
            self.stats.last_error = error
            log.warning("insert of %d spans into %s failed (%s); retrying in %.1fs", len(cols), self.table, error,
                        backoff.delay)
            if backoff.wait(stopping):
                return False

    def close(self) -> None:
        pass   # the service owns the client


class OtlpForwarder:
    """The serving engine's spans to the OTLP destination, each ExportTraceServiceRequest as it
    was received (its own resource, scope, ids, flags, dropped counts: nothing is re-encoded),
    through the SDK exporter's own transport (headers, TLS, compression and retries from the
    OTEL_EXPORTER_OTLP_* environment, as for the bridge's spans). Retried with the backoff until
    the receiver accepts; False only when stopping."""

    destination = "otlp"

    def __init__(self, exporter, *, retry_initial_s: float = 0.2, retry_max_s: float = 10.0):
        self.exporter = exporter
        self.retry = (retry_initial_s, retry_max_s)
        self.stats = WriterStats()

    @classmethod
    def create(cls, endpoint: str, *, protocol: str = "grpc", insecure: bool = True, timeout_s: float = 10.0,
               retry_initial_s: float = 0.2, retry_max_s: float = 10.0) -> "OtlpForwarder":
        if protocol == "grpc":
            exporter = _raw_grpc_exporter_class()(endpoint=endpoint, insecure=insecure, timeout=timeout_s)
        elif protocol == "http/protobuf":
            exporter = _raw_http_exporter_class()(endpoint=endpoint, timeout=timeout_s)
        else:
            raise ValueError(f"OTLP protocol {protocol!r} is not grpc or http/protobuf")
        return cls(exporter, retry_initial_s=retry_initial_s, retry_max_s=retry_max_s)

    def write_requests(self, requests: list, stopping: threading.Event) -> bool:
        for req in requests:
            n = sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans)
            if not n:
                continue
            backoff = Backoff(*self.retry)
            while True:
                t0 = time.perf_counter()
                try:
                    error = "" if self.exporter.export_request(req) else "the receiver refused the request"
                except Exception as e:
                    error = f"{type(e).__name__}: {e}"
                self.stats.seconds += time.perf_counter() - t0
                if not error:
                    self.stats.spans += n
                    self.stats.batches += 1
                    break
                self.stats.failures += 1
                self.stats.last_error = error
                log.warning("OTLP forward of %d engine spans failed (%s); retrying in %.1fs", n, error, backoff.delay)
                if backoff.wait(stopping):
                    return False
        return True

    def close(self) -> None:
        self.exporter.shutdown()


def _raw_grpc_exporter_class():
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    class RawGrpcExporter(OTLPSpanExporter):
        """The SDK's OTLP/gRPC span exporter, sending an ExportTraceServiceRequest as it is: its
        request translation hook (`_translate_data`, the mixin's abstract method) is the identity."""

        def _translate_data(self, data):
            return data

        def _count_data(self, data):
            return sum(len(ss.spans) for rs in data.resource_spans for ss in rs.scope_spans)

        def export_request(self, req) -> bool:
            return self._export(req) is SpanExportResult.SUCCESS

    return RawGrpcExporter


def _raw_http_exporter_class():
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    class RawHttpExporter(OTLPSpanExporter):
        """The SDK's OTLP/HTTP span exporter, POSTing an ExportTraceServiceRequest's bytes as they
        are through the exporter's own client (its headers, compression and retries)."""

        def export_request(self, req) -> bool:
            body = req.SerializeToString()
            client = getattr(self, "_client", None)
            if client is not None and hasattr(client, "export"):   # opentelemetry-exporter-otlp-proto-http >= 1.4x
                return bool(client.export(body).success)
            return bool(self._export(body).ok)                        # older: a requests.Response

    return RawHttpExporter


@dataclass
class Writers:
    """The configured writers, written to in order; each retries until durable."""
    items: list = field(default_factory=list)

    def write(self, spans: list[SpanData], stopping: threading.Event) -> bool:
        return all(w.write(spans, stopping) for w in self.items)

    def write_requests(self, requests: list, stopping: threading.Event) -> bool:
        """The serving engine's spans (ExportTraceServiceRequests) to every writer in turn."""
        return all(w.write_requests(requests, stopping) for w in self.items)

    def close(self) -> None:
        for w in self.items:
            try:
                w.close()
            except Exception:
                log.exception("closing the %s writer failed", w.destination)
