"""Real OTLP receivers for the bridge's tests, on 127.0.0.1, stopped after each test.

    def test_x(otlp_grpc):                  # an OTLP/gRPC TraceService (opentelemetry-proto's stubs on grpcio)
        ... BridgeConfig(otlp_endpoint=otlp_grpc.endpoint) ...
        spans = otlp_grpc.wait_for(6)       # flattened: {"trace_id", "span_id", "parent", "name", "attrs", ...}

`otlp_http` is the same for OTLP/HTTP (protobuf body, POST /v1/traces). Both can refuse the next
`fail_next` requests (gRPC PERMISSION_DENIED, which the SDK exporter does not retry itself; HTTP 503)
to show the bridge retries until the spans are accepted.
"""

from __future__ import annotations

import threading
import time
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as ts_pb
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as ts_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

KINDS = {trace_pb2.Span.SPAN_KIND_INTERNAL: "internal", trace_pb2.Span.SPAN_KIND_PRODUCER: "producer",
         trace_pb2.Span.SPAN_KIND_CONSUMER: "consumer", trace_pb2.Span.SPAN_KIND_SERVER: "server",
         trace_pb2.Span.SPAN_KIND_CLIENT: "client"}
STATUS = {0: "unset", 1: "ok", 2: "error"}


def any_value(v):
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, kind) if kind else None


def flatten(request: ts_pb.ExportTraceServiceRequest) -> list[dict]:
    out = []
    for rs in request.resource_spans:
        resource = {kv.key: any_value(kv.value) for kv in rs.resource.attributes}
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append({
                    "trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(), "parent": s.parent_span_id.hex(),
                    "name": s.name, "kind": KINDS.get(s.kind, "unspecified"),
                    "start": s.start_time_unix_nano, "end": s.end_time_unix_nano,
                    "attrs": {kv.key: any_value(kv.value) for kv in s.attributes},
                    "status": STATUS[s.status.code], "status_message": s.status.message,
                    "links": [(link.trace_id.hex(), link.span_id.hex()) for link in s.links],
                    "resource": resource, "scope": ss.scope.name,
                })
    return out


class Received:
    """What a receiver accepted, and the requests it refused on purpose."""

    def __init__(self):
        self.spans: list[dict] = []
        self.requests = 0
        self.refused = 0
        self.fail_next = 0
        self.lock = threading.Lock()

    def take(self, request: ts_pb.ExportTraceServiceRequest) -> bool:
        """False: refuse this request (a test asked for failures)."""
        with self.lock:
            self.requests += 1
            if self.fail_next > 0:
                self.fail_next -= 1
                self.refused += 1
                return False
            self.spans.extend(flatten(request))
            return True

    def wait_for(self, n: int, timeout_s: float = 60.0) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.spans) >= n:
                    return list(self.spans)
            time.sleep(0.05)
        with self.lock:
            raise AssertionError(f"{len(self.spans)} spans received within {timeout_s}s, expected {n}: "
                                 f"{sorted(s['name'] for s in self.spans)}")


class GrpcReceiver(Received, ts_grpc.TraceServiceServicer):
    def __init__(self):
        Received.__init__(self)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        ts_grpc.add_TraceServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.endpoint = f"127.0.0.1:{self.port}"
        self.server.start()

    def Export(self, request, context):  # noqa: N802 (the gRPC method name)
        if not self.take(request):
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "refused by the test")
        return ts_pb.ExportTraceServiceResponse()

    def stop(self):
        self.server.stop(grace=0).wait()


class HttpReceiver(Received):
    def __init__(self):
        super().__init__()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                req = ts_pb.ExportTraceServiceRequest()
                req.ParseFromString(body)
                ok = self.path == "/v1/traces" and receiver.take(req)
                payload = ts_pb.ExportTraceServiceResponse().SerializeToString() if ok else b""
                self.send_response(200 if ok else 503)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}/v1/traces"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def otlp_grpc():
    r = GrpcReceiver()
    yield r
    r.stop()


@pytest.fixture
def otlp_http():
    r = HttpReceiver()
    yield r
    r.stop()
