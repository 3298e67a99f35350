"""The bridge's OTLP trace receiver: the serving engine (SGLang `--enable-trace
--otlp-traces-endpoint bridge:4317`) sends its spans here, and they go to Kafka, not to a database.

    publisher = SpansPublisher(KafkaConfig(bootstrap_servers="kafka:9092"), "tensortrace.spans").start()
    intake = SpansIntake(publisher, ReceiverStats())
    grpc_rx = OtlpGrpcReceiver(intake, "0.0.0.0", 4317, security=cfg.otlp_receiver_security).start()
    http_rx = OtlpHttpReceiver(intake, "0.0.0.0", 4318, security=cfg.otlp_receiver_security).start()  # POST /v1/traces
    ...; grpc_rx.stop(); http_rx.stop(); publisher.close()

An Export succeeds only once Kafka acknowledged every message of it (acks=all): the spans are then
as safe as the activation records, and a ClickHouse outage loses none (the spans-topic consumer,
engine.py, writes them when it can). The outcomes, the same over gRPC and HTTP:

| outcome | gRPC | HTTP | when |
|---|---|---|---|
| accepted | OK | 200 | parsed, every span's ids well formed, published and acknowledged |
| refused | INVALID_ARGUMENT | 400 | not an ExportTraceServiceRequest, over --otlp-receiver-max-bytes, a malformed id (otlp.py); the message names the problem; the client must not retry |
| unavailable | UNAVAILABLE | 503 | Kafka not connected, or it did not acknowledge within --spans-publish-timeout-s; OTLP clients retry these with backoff |

A refused request changes nothing else: other requests keep flowing; refusals are counted by reason
(`tensortrace_bridge_otlp_rejected_total{reason}`) and logged at most once per reason per 10 s.
The gRPC receiver is secured by the bridge's `--otlp-receiver-*` block (service/security.py,
docs/security.md): TLS / mTLS, and with a token file every Export needs a bearer token with the
`ingest` role (UNAUTHENTICATED / PERMISSION_DENIED otherwise, counted in
`tensortrace_security_auth_failures_total`). The OTel SDK exporter sends one with
`OTEL_EXPORTER_OTLP_TRACES_HEADERS=authorization=Bearer%20<token>` and trusts the CA with
`OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE`. The OTLP/HTTP receiver takes the same block (the same
flags, one Secret for both ports): TLS on the whole port from the same certificate files (re-read
when they change, checked at most once a second on a new connection), mTLS with the client CA, and
with a token file every POST needs `Authorization: Bearer <token>` with the `ingest` role — 401
(google.rpc.Status UNAUTHENTICATED, `WWW-Authenticate: Bearer`) without one or with an unknown one,
403 (PERMISSION_DENIED) with another role, checked before the body is read and counted in
`tensortrace_security_auth_failures_total{endpoint="otlp_http"}`. Plaintext HTTP is the same opt-in
(`--otlp-receiver-plaintext`), refused off loopback unless `--otlp-receiver-plaintext-any-address`.

Kafka sees at-least-once delivery (a retried Export that had been published is published again):
the copies are rows of the same span ids, which readers of otel_traces collapse (docs/bridge.md).
"""

from __future__ import annotations

import gzip
import logging
import threading
import time
import zlib
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler

import grpc
from google.rpc import status_pb2
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from tensortrace.bridge.otlp import Rejected, check_request, kafka_messages, parse_request
from tensortrace.service.backoff import Backoff
from tensortrace.service.endpoint import http_server
from tensortrace.service.kafka import KafkaConfig
from tensortrace.service.security import EndpointGuard, EndpointSecurity, Role, RpcPolicy, is_loopback

HTTP_ENDPOINT = "otlp_http"   # the endpoint label of the OTLP/HTTP receiver's security counters

log = logging.getLogger("tensortrace.bridge.receiver")

TRACE_SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"
_OK_RESPONSE = ExportTraceServiceResponse().SerializeToString()
OTLP_POLICIES = {"Export": RpcPolicy((Role.INGEST,))}   # spans in: not audited, refusals counted


class Unavailable(RuntimeError):
    """Kafka cannot take the spans now (not connected, no acknowledgement in time): retryable."""


@dataclass
class ReceiverStats:
    requests: dict[str, int] = field(default_factory=lambda: {"accepted": 0, "rejected": 0, "unavailable": 0})
    rejected: dict[str, int] = field(default_factory=dict)      # reason -> requests
    spans: int = 0                  # spans in accepted requests
    messages: int = 0               # spans-topic messages acknowledged by Kafka
    bytes: int = 0                  # bytes of accepted requests
    publish_seconds: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class SpansPublisher:
    """A Kafka producer for the spans topic (acks=all), connected in the background with the
    service backoff; `publish` waits for the acknowledgement of every message."""

    def __init__(self, kafka: KafkaConfig, topic: str, *, timeout_s: float = 5.0, max_message_bytes: int = 1_000_000,
                 retry_initial_s: float = 0.2, retry_max_s: float = 10.0):
        self.kafka = kafka
        self.topic = topic
        self.timeout_s = timeout_s
        self.max_message_bytes = max_message_bytes
        self.retry = (retry_initial_s, retry_max_s)
        self.error = "connecting"
        self._producer = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def connected(self) -> bool:
        return self._producer is not None

    def start(self) -> "SpansPublisher":
        self._thread = threading.Thread(target=self._connect_loop, name="bridge-spans-producer", daemon=True)
        self._thread.start()
        return self

    def _connect_loop(self) -> None:
        from kafka import KafkaProducer

        backoff = Backoff(*self.retry)
        timeout_ms = max(1000, int(self.timeout_s * 1000))
        while not self._stop.is_set():
            producer = None
            try:
                self.kafka.check_connection(timeout_s=10.0)
                producer = KafkaProducer(
                    **self.kafka.client_kwargs(client_id="tensortrace-bridge-spans"), acks="all", linger_ms=2,
                    compression_type="lz4", max_request_size=self.max_message_bytes + (64 << 10),
                    request_timeout_ms=timeout_ms, delivery_timeout_ms=timeout_ms + 1000, max_block_ms=timeout_ms,
                    retry_backoff_ms=100, reconnect_backoff_ms=100, reconnect_backoff_max_ms=1000)
                if not producer.partitions_for(self.topic):
                    raise RuntimeError(f"spans topic {self.topic} does not exist (and the broker did not create it)")
                self._producer = producer
                if self.error != "connecting":
                    log.info("spans topic %s: Kafka works again (was: %s)", self.topic, self.error)
                self.error = ""
                return
            except Exception as e:   # KafkaUnavailable (named cause), NoBrokersAvailable, no topic
                if producer is not None:
                    producer.close(timeout=1)
                text = str(e) if str(e).startswith(type(e).__name__) else f"{type(e).__name__}: {e}"
                if text != self.error:
                    log.error("spans topic %s: Kafka not usable: %s; OTLP exports get UNAVAILABLE until it is; "
                              "retrying", self.topic, text)
                self.error = text
                backoff.wait(self._stop)

    def publish(self, messages: list[tuple[bytes | None, bytes, int]], timeout_s: float | None = None) -> None:
        """Send (key, value, spans) messages; return once Kafka acknowledged all of them.
        Unavailable when it cannot within `timeout_s`; Rejected(too_large) when Kafka refuses a
        message as too large (a configuration problem that retrying does not fix)."""
        from kafka.errors import KafkaError, MessageSizeTooLargeError

        producer = self._producer
        if producer is None:
            raise Unavailable(f"Kafka is not connected ({self.error}); retry later")
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        try:
            sent = [producer.send(self.topic, key=key, value=value) for key, value, _ in messages]
            for f in sent:
                f.get(timeout=max(0.001, deadline - time.monotonic()))
        except MessageSizeTooLargeError as e:
            raise Rejected("too_large", f"Kafka refused a spans-topic message as too large ({e}); set "
                                        "--spans-message-max-bytes below the topic's max.message.bytes") from None
        except KafkaError as e:   # KafkaTimeoutError (no ack in time, buffer full), broker errors
            raise Unavailable(f"Kafka did not acknowledge the spans within {self.timeout_s:g}s "
                              f"({type(e).__name__}: {e}); retry later") from None

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)
        if self._producer is not None:
            self._producer.flush(timeout=10)
            self._producer.close(timeout=10)
            self._producer = None


@dataclass
class Outcome:
    status: str            # "accepted" | "rejected" | "unavailable"
    message: str = ""
    reason: str = ""       # why rejected (otlp.REASONS)
    spans: int = 0


class SpansIntake:
    """What both receivers do with a request body: parse and check it (otlp.py), publish it to the
    spans topic, count the outcome."""

    def __init__(self, publisher, stats: ReceiverStats, *, max_request_bytes: int = 4 << 20,
                 max_message_bytes: int = 1_000_000):
        self.publisher = publisher
        self.stats = stats
        self.max_request_bytes = max_request_bytes
        self.max_message_bytes = max_message_bytes
        self._logged: dict[str, float] = {}

    def accept(self, raw: bytes) -> Outcome:
        try:
            req = parse_request(raw, self.max_request_bytes)
            n = check_request(req)
            messages = kafka_messages(raw, req, self.max_message_bytes)
            t0 = time.perf_counter()
            if messages:
                self.publisher.publish(messages)
        except Rejected as e:
            with self.stats.lock:
                self.stats.requests["rejected"] += 1
                self.stats.rejected[e.reason] = self.stats.rejected.get(e.reason, 0) + 1
            self._log(e.reason, f"OTLP export refused (INVALID_ARGUMENT, {e.reason}): {e}")
            return Outcome("rejected", str(e), e.reason)
        except Unavailable as e:
            with self.stats.lock:
                self.stats.requests["unavailable"] += 1
            self._log("unavailable", f"OTLP export answered UNAVAILABLE: {e}")
            return Outcome("unavailable", str(e))
        with self.stats.lock:
            self.stats.requests["accepted"] += 1
            self.stats.spans += n
            self.stats.messages += len(messages)
            self.stats.bytes += len(raw)
            self.stats.publish_seconds += time.perf_counter() - t0
        return Outcome("accepted", spans=n)

    def _log(self, key: str, text: str) -> None:
        now = time.monotonic()
        if now - self._logged.get(key, -1e9) >= 10.0:
            self._logged[key] = now
            log.warning("%s", text)


class OtlpGrpcReceiver:
    """`opentelemetry.proto.collector.trace.v1.TraceService/Export` on grpcio. The request is taken
    as raw bytes (no generated deserializer), so a body that is not a protobuf gets
    INVALID_ARGUMENT with the reason rather than grpc's own INTERNAL "Exception deserializing"."""

    def __init__(self, intake: SpansIntake, host: str, port: int, *, max_workers: int = 8,
                 max_concurrent_rpcs: int = 64, security: EndpointSecurity | None = None, registry=None,
                 guard: EndpointGuard | None = None):
        """`security`: TLS / tokens (the bridge's otlp_receiver_security). None (a caller that
        predates it): plaintext, which the loopback rule then allows on 127.0.0.1 only. `guard`:
        one built earlier from that block (the bridge builds it when the service is built, so that
        a bad certificate or token file is a configuration error then, exit 2)."""
        self.intake = intake
        self.guard = guard or EndpointGuard("otlp", security or EndpointSecurity.loopback_plaintext(), OTLP_POLICIES,
                                            registry=registry)
        # grpc's own limit is kept above ours, so that an oversized request reaches accept() and
        # gets INVALID_ARGUMENT naming the limit (beyond twice it, grpc answers RESOURCE_EXHAUSTED).
        limit = 2 * intake.max_request_bytes + (1 << 20)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="otlp-grpc"),
                                  options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", limit)],
                                  maximum_concurrent_rpcs=max_concurrent_rpcs, interceptors=[self.guard.interceptor()])
        handler = grpc.method_handlers_generic_handler(TRACE_SERVICE, {
            "Export": grpc.unary_unary_rpc_method_handler(self._export)})
        self.server.add_generic_rpc_handlers((handler,))
        self.address = f"{host}:{port}"
        try:
            self.port = self.guard.add_port(self.server, host, port)
        except OSError as e:
            raise OSError(f"OTLP/gRPC receiver cannot listen on {self.address}: {e}") from None

    def start(self) -> "OtlpGrpcReceiver":
        self.server.start()
        return self

    def _export(self, raw: bytes, context: grpc.ServicerContext) -> bytes:
        out = self.intake.accept(raw)
        if out.status == "accepted":
            return _OK_RESPONSE
        code = grpc.StatusCode.INVALID_ARGUMENT if out.status == "rejected" else grpc.StatusCode.UNAVAILABLE
        context.abort(code, out.message)

    def stop(self, grace_s: float = 2.0) -> None:
        self.server.stop(grace=grace_s).wait(grace_s + 1)


class OtlpHttpReceiver:
    """OTLP/HTTP with protobuf bodies: `POST /v1/traces` (Content-Type application/x-protobuf,
    optionally Content-Encoding gzip). 200 with an ExportTraceServiceResponse; 400 / 503 with a
    google.rpc.Status whose message names the problem (OTLP/HTTP's error shape); OTLP/JSON: 415."""

    PATH = "/v1/traces"

    def __init__(self, intake: SpansIntake, host: str, port: int, *, security: EndpointSecurity | None = None,
                 registry=None, guard: EndpointGuard | None = None):
        """`security`: the same block as the gRPC receiver's (module docstring); None: plaintext,
        on a loopback address only. Raises SecurityError (a ConfigError) for plaintext off
        loopback without the force, or a certificate / token file that cannot work; OSError when
        the port cannot be bound."""
        receiver = self
        self.intake = intake
        self.guard = guard or EndpointGuard(HTTP_ENDPOINT, security or EndpointSecurity.loopback_plaintext(),
                                            OTLP_POLICIES, registry=registry)
        security = self.guard.security
        security.validate(host, "OTLP/HTTP receiver")

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):  # noqa: N802
                receiver._post(self)

            def log_message(self, *args):
                pass

        if not security.tls and not is_loopback(host):
            log.warning("OTLP/HTTP receiver: plaintext on %s (plaintext_any_address): the spans and any "
                        "token cross the network in the clear", host)
        try:
            self.server = http_server(host, port, Handler, security)   # the runtime's (HTTPS with reloading certs)
        except OSError as e:
            raise OSError(f"OTLP/HTTP receiver cannot listen on {host}:{port}: {e}") from None
        self.port = self.server.server_address[1]
        log.info("OTLP/HTTP receiver on %s:%d: %s", host, self.port, security.describe())
        self._thread = threading.Thread(target=self.server.serve_forever, name="otlp-http", daemon=True)

    def start(self) -> "OtlpHttpReceiver":
        self._thread.start()
        return self

    def _post(self, h: BaseHTTPRequestHandler) -> None:
        path = h.path.split("?", 1)[0]
        refused = self._authorize(h.headers.get("Authorization") or "")
        if refused is not None:   # before the body is read: an unauthenticated client costs no parsing
            http_status, grpc_code, message = refused
            return self._reply(h, http_status, grpc_code, message,
                               www_authenticate=http_status == 401)
        if path != self.PATH:
            return self._reply(h, 404, 5, f"no OTLP endpoint at {path}; traces go to {self.PATH}")
        ctype = (h.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        if ctype != "application/x-protobuf":
            return self._reply(h, 415, 3, f"Content-Type {ctype or 'none'!r} is not supported: send OTLP "
                                          "protobuf (application/x-protobuf); OTLP/JSON is not accepted")
        try:
            length = int(h.headers.get("Content-Length", ""))
        except ValueError:
            return self._reply(h, 411, 3, "Content-Length is required")
        limit = self.intake.max_request_bytes
        if length > 2 * limit:
            return self._reply(h, 400, 3, f"the request is {length} bytes, more than this receiver accepts "
                                          f"({limit} bytes, --otlp-receiver-max-bytes)")
        body = h.rfile.read(length)
        encoding = (h.headers.get("Content-Encoding") or "").strip().lower()
        if encoding == "gzip":
            try:
                d = zlib.decompressobj(16 + zlib.MAX_WBITS)
                body = d.decompress(body, limit + 1)
            except (zlib.error, gzip.BadGzipFile) as e:
                return self._reply(h, 400, 3, f"the gzip body does not decompress: {e}")
        elif encoding not in ("", "identity"):
            return self._reply(h, 415, 3, f"Content-Encoding {encoding!r} is not supported (gzip is)")
        out = self.intake.accept(body)
        if out.status == "accepted":
            return self._reply(h, 200, 0, "", payload=_OK_RESPONSE)
        if out.status == "rejected":
            return self._reply(h, 400, 3, out.message)
        return self._reply(h, 503, 14, out.message, retry_after=True)

    def _authorize(self, header: str) -> tuple[int, int, str] | None:
        """None when the request may be served; else (HTTP status, google.rpc code, message), the
        refusal counted by reason. Without a token file every request that completed the TLS
        handshake (or reached the loopback port) may send."""
        tokens = self.guard.tokens
        if tokens is None:
            return None
        scheme, _, token = header.strip().partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else ""
        fails = self.guard.audit.auth_failures
        if not token:
            fails.labels(self.guard.endpoint, "no_token").inc()
            return (401, 16, "OTLP/HTTP receiver: POST /v1/traces needs a bearer token with the ingest role "
                             "(Authorization: Bearer <token>; the OTel SDK: "
                             "OTEL_EXPORTER_OTLP_TRACES_HEADERS=authorization=Bearer%20<token>)")
        entry = tokens.get().match(token)
        if entry is None:
            fails.labels(self.guard.endpoint, "unknown_token").inc()
            return 401, 16, "OTLP/HTTP receiver: the bearer token is not in the receiver's token file (rotated?)"
        if Role.INGEST.value not in entry.roles:
            fails.labels(self.guard.endpoint, "wrong_role").inc()
            return (403, 7, f"OTLP/HTTP receiver: {entry.identity} may not send spans: it needs role ingest, the "
                            f"token has {','.join(sorted(entry.roles))}")
        return None

    @staticmethod
    def _reply(h: BaseHTTPRequestHandler, http_status: int, grpc_code: int, message: str, *, payload: bytes | None = None,
               retry_after: bool = False, www_authenticate: bool = False) -> None:
        if payload is None:
            payload = status_pb2.Status(code=grpc_code, message=message).SerializeToString()
        h.send_response(http_status)
        if http_status >= 400:
            h.send_header("Connection", "close")   # the body may not have been read: never parse it as a request
        h.send_header("Content-Type", "application/x-protobuf")
        h.send_header("Content-Length", str(len(payload)))
        if retry_after:
            h.send_header("Retry-After", "1")
        if www_authenticate:
            h.send_header("WWW-Authenticate", 'Bearer realm="tensortrace-otlp"')
        h.end_headers()
        h.wfile.write(payload)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
