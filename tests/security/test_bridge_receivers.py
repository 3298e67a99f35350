"""The bridge's OTLP receivers take their security block from the service's flags: the standalone
`tensortrace bridge` (a real process) with `--otlp-receiver-tls-cert/-key` and a token file
receives the real OTel SDK exporter's spans over TLS with an ingest token into the real Kafka spans
topic; without them on 0.0.0.0 it exits 2 naming the flag. The OTLP/HTTP receiver: TLS from the
same certificate files, 401/403 by token and role (the real OTel SDK HTTP exporter), mTLS, and
plaintext refused off loopback."""

from __future__ import annotations

import http.client
import json
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
import uuid

import grpc
import pytest
from google.rpc import status_pb2
from kafka import KafkaConsumer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult

from security_pki import INGEST_TOKEN, READ_TOKEN
from tensortrace.bridge.receiver import OtlpHttpReceiver, ReceiverStats, SpansIntake, SpansPublisher
from tensortrace.service.kafka import KafkaConfig
from tensortrace.service.security import EndpointSecurity, SecurityError
from tensortrace.testing.kafka import create_topics
from tensortrace.testing.waiting import wait_until
from tensortrace.testing.traces import RecordingExporter

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _ca_from_the_exporter(monkeypatch):
    """requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE (set on some machines) override the
    session's `verify`, i.e. the OTel HTTP exporter's certificate_file: drop them here."""
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)




def send_one(exporter, name: str) -> SpanExportResult:
    rec = RecordingExporter(exporter)
    provider = TracerProvider(resource=Resource.create({"service.name": "sglang-sim"}))
    provider.add_span_processor(SimpleSpanProcessor(rec))
    provider.get_tracer("sglang").start_span(name).end()
    provider.shutdown()
    return rec.results[0]


def spans_in_topic(bootstrap: str, topic: str, n: int, timeout_s: float = 30.0) -> list[str]:
    """The span names in the first `n` messages of the spans topic (ExportTraceServiceRequest bytes)."""
    c = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False,
                      group_id=None, consumer_timeout_ms=1000)
    names, deadline = [], time.monotonic() + timeout_s
    try:
        while len(names) < n and time.monotonic() < deadline:
            for m in c:
                req = ExportTraceServiceRequest.FromString(m.value)
                names += [s.name for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans]
    finally:
        c.close()
    return names


def bridge(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tensortrace.cli", "bridge", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_the_standalone_bridge_serves_its_receiver_with_the_tls_and_token_flags(kafka_broker, pki, tmp_path):
    bs = kafka_broker.bootstrap
    topic = create_topics(bs, 1, prefix="tt-sec-bridge", dlq=True)
    spans_topic = create_topics(bs, 1, prefix="tt-sec-spans")
    status = tmp_path / "status.json"
    proc = bridge("--kafka-bootstrap-servers", bs, "--topic", topic, "--dlq-topic", topic + ".dlq",
                  "--group-id", f"b-{uuid.uuid4().hex[:8]}", "--otlp-endpoint", "127.0.0.1:9",
                  "--spans-consumer", "false", "--probe-scores-consumer", "false", "--spans-topic", spans_topic,
                  "--http-port", "0", "--http-host", "127.0.0.1", "--status-file", str(status),
                  "--otlp-receiver-host", "127.0.0.1", "--otlp-receiver-port", "0", "--otlp-http-receiver-port", "0",
                  "--otlp-receiver-tls-cert", pki.path("server.crt"), "--otlp-receiver-tls-key", pki.path("server.key"),
                  "--otlp-receiver-token-file", pki.path("tokens"))
    try:
        assert wait_until(lambda: status.exists() and "otlp_http" in json.loads(status.read_text())["ports"], 60), \
            "no status file with the receivers' ports"
        ports = json.loads(status.read_text())["ports"]
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        ca = open(pki.path("ca.crt"), "rb").read()

        def grpc_exporter(token):
            return GrpcExporter(endpoint=f"localhost:{ports['otlp']}", credentials=grpc.ssl_channel_credentials(ca),
                                headers={"authorization": f"Bearer {token}"} if token else None, timeout=10)

        def http_exporter(token):
            return HttpExporter(endpoint=f"https://localhost:{ports['otlp_http']}/v1/traces",
                                certificate_file=pki.path("ca.crt"), timeout=10,
                                headers={"authorization": f"Bearer {token}"} if token else None)
        # Kafka may still be connecting: the receiver answers UNAVAILABLE (retried by the SDK) until then
        assert wait_until(lambda: send_one(grpc_exporter(INGEST_TOKEN), "grpc-span") == SpanExportResult.SUCCESS, 60)
        assert send_one(http_exporter(INGEST_TOKEN), "http-span") == SpanExportResult.SUCCESS
        assert send_one(grpc_exporter(None), "no-token") == SpanExportResult.FAILURE
        assert send_one(http_exporter(READ_TOKEN), "reader") == SpanExportResult.FAILURE
        names = spans_in_topic(bs, spans_topic, 2)
        assert "grpc-span" in names and "http-span" in names and not {"no-token", "reader"} & set(names)

        body = urllib.request.urlopen(f"http://127.0.0.1:{ports['http']}/metrics", timeout=5).read().decode()
        assert 'tensortrace_security_auth_failures_total{endpoint="otlp",reason="no_token"} 1.0' in body
        assert 'tensortrace_security_auth_failures_total{endpoint="otlp_http",reason="wrong_role"} 1.0' in body
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0]
        assert proc.returncode == 0, out[-3000:]
        assert "OTLP/gRPC trace receiver on 127.0.0.1" in out and "(TLS, bearer tokens)" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("args, flag", [
    # the gRPC receiver on 0.0.0.0 without TLS: refused when the flags are parsed
    ([], "otlp_receiver_security.tls_cert (--otlp-receiver-security-tls-cert): the OTLP receiver has no TLS"),
    (["--otlp-receiver-plaintext"], "otlp_receiver_security.plaintext (--otlp-receiver-security-plaintext): "
                                    "refusing plaintext on 0.0.0.0"),
    # only the HTTP receiver: refused when the flags are parsed too, naming the flag the same way
    (["--otlp-receiver-port", "-1", "--otlp-http-receiver-port", "0"],
     "otlp_receiver_security.tls_cert (--otlp-receiver-security-tls-cert): the OTLP receiver has no TLS"),
    (["--otlp-receiver-port", "-1", "--otlp-http-receiver-port", "0", "--otlp-receiver-plaintext"],
     "otlp_receiver_security.plaintext (--otlp-receiver-security-plaintext): refusing plaintext on 0.0.0.0"),
])
def test_the_standalone_bridge_without_tls_on_0_0_0_0_exits_2_naming_the_flag(args, flag):
    proc = bridge("--kafka-bootstrap-servers", "127.0.0.1:9", "--otlp-endpoint", "127.0.0.1:9",
                  "--otlp-receiver-host", "0.0.0.0", "--http-port", "-1", *args)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 2, out
    assert flag in out, out
    assert "Traceback" not in out


def test_a_broken_token_file_fails_the_build_with_exit_2(pki):
    bad = pki.write("bad-tokens", "engine ingest short\n")
    proc = bridge("--kafka-bootstrap-servers", "127.0.0.1:9", "--otlp-endpoint", "127.0.0.1:9", "--http-port", "-1",
                  "--otlp-receiver-host", "127.0.0.1", "--otlp-receiver-port", "-1", "--otlp-http-receiver-port", "0",
                  "--otlp-receiver-plaintext", "--otlp-receiver-token-file", bad)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 2, out
    assert f"{bad}: line 1 (engine): the token must be at least 16 printable characters" in out and "Traceback" not in out


# -- the OTLP/HTTP receiver in-process ---------------------------------------------------------------

@pytest.fixture
def http_receiver(kafka_broker, fresh_topic, pki):
    topic = fresh_topic(partitions=1)
    publisher = SpansPublisher(KafkaConfig(bootstrap_servers=kafka_broker.bootstrap), topic).start()
    assert wait_until(lambda: publisher.connected, 60, 0.1), publisher.error
    stats = ReceiverStats()
    rxs = []

    def make(**sec):
        rx = OtlpHttpReceiver(SpansIntake(publisher, stats), "127.0.0.1", 0, security=EndpointSecurity(
            tls_cert=pki.path("server.crt"), tls_key=pki.path("server.key"), **sec)).start()
        rxs.append(rx)
        return rx
    yield make, stats
    for rx in rxs:
        rx.stop()
    publisher.close()


def post(port: int, headers: dict, ctx: ssl.SSLContext, body: bytes = b"") -> tuple[int, dict, str]:
    conn = http.client.HTTPSConnection("localhost", port, context=ctx, timeout=10)
    try:
        conn.request("POST", "/v1/traces", body=body, headers={"Content-Type": "application/x-protobuf", **headers})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), status_pb2.Status.FromString(r.read()).message
    finally:
        conn.close()


def test_the_http_receiver_needs_an_ingest_token_over_tls(http_receiver, pki):
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    make, stats = http_receiver
    rx = make(token_file=pki.path("tokens"))
    url = f"https://localhost:{rx.port}/v1/traces"
    exp = lambda token: OTLPSpanExporter(endpoint=url, certificate_file=pki.path("ca.crt"), timeout=10,  # noqa: E731
                                         headers={"authorization": f"Bearer {token}"} if token else None)
    assert send_one(exp(None), "none") == SpanExportResult.FAILURE
    assert send_one(exp(READ_TOKEN), "reader") == SpanExportResult.FAILURE
    assert send_one(exp("not-a-token-of-the-file-0123456789"), "unknown") == SpanExportResult.FAILURE
    assert stats.requests["accepted"] == 0 and stats.messages == 0          # nothing reached Kafka
    assert send_one(exp(INGEST_TOKEN), "ingest") == SpanExportResult.SUCCESS
    assert stats.requests["accepted"] == 1 and stats.messages == 1

    ctx = ssl.create_default_context(cafile=pki.path("ca.crt"))
    st, headers, msg = post(rx.port, {}, ctx, b"x" * 10)
    assert st == 401 and headers["WWW-Authenticate"].startswith("Bearer") and "needs a bearer token with the ingest role" in msg
    st, _, msg = post(rx.port, {"Authorization": f"Bearer {READ_TOKEN}"}, ctx, b"x" * 10)
    assert st == 403 and msg == "OTLP/HTTP receiver: alice may not send spans: it needs role ingest, the token has read"
    fails = {tuple(sorted(s.labels.items())): s.value for m in rx.guard.audit.registry.collect() for s in m.samples
             if s.name == "tensortrace_security_auth_failures_total"}
    assert fails[(("endpoint", "otlp_http"), ("reason", "no_token"))] == 2
    assert fails[(("endpoint", "otlp_http"), ("reason", "wrong_role"))] == 2
    assert fails[(("endpoint", "otlp_http"), ("reason", "unknown_token"))] == 1
    # plain HTTP to the TLS port gets nothing
    with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
        c = http.client.HTTPConnection("127.0.0.1", rx.port, timeout=5)
        c.request("POST", "/v1/traces", body=b"", headers={"Authorization": f"Bearer {INGEST_TOKEN}"})
        c.getresponse().read()


def test_the_http_receiver_with_mtls_refuses_a_client_without_a_certificate_of_the_ca(http_receiver, pki):
    make, stats = http_receiver
    rx = make(tls_client_ca=pki.path("ca.crt"))
    good = pki.client("engine-client")
    other = pki.client("intruder", issuer=pki.other_ca)
    for cert in (None, other):
        ctx = ssl.create_default_context(cafile=pki.path("ca.crt"))
        if cert:
            ctx.load_cert_chain(*cert)
        with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException, OSError)):
            post(rx.port, {}, ctx)
    ctx = ssl.create_default_context(cafile=pki.path("ca.crt"))
    ctx.load_cert_chain(*good)
    st, _, msg = post(rx.port, {}, ctx, b"\xff\xff not protobuf")
    assert st == 400 and "not an OTLP ExportTraceServiceRequest" in msg   # through the handshake: parsed


def test_the_http_receiver_refuses_plaintext_off_loopback_and_binds_nothing():
    intake = SpansIntake(None, ReceiverStats())
    with pytest.raises(SecurityError, match="tls_cert: the OTLP/HTTP receiver has no TLS"):
        OtlpHttpReceiver(intake, "0.0.0.0", 0, security=EndpointSecurity())
    with pytest.raises(SecurityError, match="plaintext: refusing plaintext on 0.0.0.0"):
        OtlpHttpReceiver(intake, "0.0.0.0", 0)          # no block: the loopback plaintext default
    rx = OtlpHttpReceiver(intake, "127.0.0.1", 0).start()   # loopback plaintext: the development default
    rx.stop()
