"""The bridge's OTLP/gRPC receiver with TLS and tokens: the real OpenTelemetry SDK exporter
(OTLPSpanExporter with TLS credentials and an authorization header) -> the receiver -> the real
Kafka spans topic. Without the token, or with a token of another role, nothing is published."""

from __future__ import annotations

import grpc
import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult

from security_pki import INGEST_TOKEN, READ_TOKEN
from tensortrace.bridge.config import BridgeConfig
from tensortrace.bridge.receiver import OtlpGrpcReceiver, ReceiverStats, SpansIntake, SpansPublisher
from tensortrace.service.kafka import KafkaConfig
from tensortrace.service.security import EndpointSecurity
from tensortrace.testing.waiting import wait_until
from tensortrace.testing.traces import RecordingExporter

pytestmark = pytest.mark.integration




def _send_one(endpoint: str, ca: bytes, token: str | None) -> SpanExportResult:
    exporter = OTLPSpanExporter(endpoint=endpoint, credentials=grpc.ssl_channel_credentials(ca),
                                headers={"authorization": f"Bearer {token}"} if token else None, timeout=5)
    rec = RecordingExporter(exporter)
    provider = TracerProvider(resource=Resource.create({"service.name": "sglang-sim"}))
    provider.add_span_processor(SimpleSpanProcessor(rec))
    provider.get_tracer("sglang").start_span("prefill_forward").end()
    provider.shutdown()
    return rec.results[0]


@pytest.fixture
def receiver(kafka_broker, fresh_topic, pki):
    topic = fresh_topic(partitions=1)
    publisher = SpansPublisher(KafkaConfig(bootstrap_servers=kafka_broker.bootstrap), topic).start()
    assert wait_until(lambda: publisher.connected, 60, 0.1), publisher.error
    stats = ReceiverStats()
    sec = EndpointSecurity(tls_cert=pki.path("server.crt"), tls_key=pki.path("server.key"),
                           token_file=pki.path("tokens"))
    rx = OtlpGrpcReceiver(SpansIntake(publisher, stats), "127.0.0.1", 0, security=sec).start()
    yield rx, stats
    rx.stop()
    publisher.close()


def test_the_otel_sdk_exporter_with_tls_and_an_ingest_token_is_accepted(receiver, pki):
    rx, stats = receiver
    ca = open(pki.path("ca.crt"), "rb").read()
    endpoint = f"localhost:{rx.port}"
    assert _send_one(endpoint, ca, None) == SpanExportResult.FAILURE           # UNAUTHENTICATED: not retried
    assert _send_one(endpoint, ca, READ_TOKEN) == SpanExportResult.FAILURE     # a reader may not write spans
    assert stats.requests["accepted"] == 0 and stats.messages == 0
    assert _send_one(endpoint, ca, INGEST_TOKEN) == SpanExportResult.SUCCESS
    assert stats.requests["accepted"] == 1 and stats.spans == 1 and stats.messages == 1   # acknowledged by Kafka
    fails = {tuple(sorted(s.labels.items())): s.value for m in rx.guard.audit.registry.collect() for s in m.samples
             if s.name == "tensortrace_security_auth_failures_total"}
    assert fails[(("endpoint", "otlp"), ("reason", "no_token"))] == 1
    assert fails[(("endpoint", "otlp"), ("reason", "wrong_role"))] == 1


def test_the_bridge_config_names_the_receiver_security_problem():
    cfg = BridgeConfig(otlp_endpoint="127.0.0.1:4317", otlp_receiver_host="0.0.0.0",
                       otlp_receiver_security=EndpointSecurity(plaintext=True))
    assert cfg.problems() == ["otlp_receiver_security.plaintext: refusing plaintext on 0.0.0.0, which is not a "
                              "loopback address: give tls_cert/tls_key, bind 127.0.0.1, or force it with "
                              "plaintext_any_address"]
    assert BridgeConfig(otlp_endpoint="127.0.0.1:4317", otlp_receiver_port=-1).problems() == []   # no receiver
