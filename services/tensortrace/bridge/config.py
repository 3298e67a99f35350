"""Bridge configuration: the consumer settings every stream consumer has (ConsumerConfig: Kafka,
topic, group, dead letters, batching, retries), plus where the spans go.

>>> BridgeConfig(otlp_endpoint="127.0.0.1:4317", otlp_receiver_port=-1).problems()
[]
>>> BridgeConfig().problems()
['otlp_endpoint/clickhouse_dsn: set at least one destination for the spans', 'otlp_receiver_security.tls_cert: the OTLP receiver has no TLS: give tls_cert and tls_key, or opt into plaintext (development, loopback only)']

Destinations (one or both): `--otlp-endpoint` (an OTLP/gRPC `host:port`, or an OTLP/HTTP URL with
`--otlp-protocol http/protobuf`: a Collector, Tempo, Jaeger, a vendor) and `--clickhouse-dsn` (the
`otel_traces` table in the OTel Collector ClickHouse exporter's shape, storage/otel.py). OTLP
headers (auth) are not flags: the SDK exporter reads `OTEL_EXPORTER_OTLP_HEADERS` /
`OTEL_EXPORTER_OTLP_TRACES_HEADERS` from the environment (a Kubernetes Secret), as do its TLS
settings (`OTEL_EXPORTER_OTLP_CERTIFICATE`, ...).

The serving engine's own spans (SGLang `--enable-trace --otlp-traces-endpoint bridge:4317`):
`--otlp-receiver-port` (gRPC, 4317; -1: off; secured by `--otlp-receiver-tls-cert/-tls-key`,
`--otlp-receiver-token-file` (role `ingest`), or `--otlp-receiver-plaintext` on loopback:
docs/security.md) and `--otlp-http-receiver-port` (off) receive them,
publish them to `--spans-topic` and acknowledge only then; `--spans-consumer` (on) reads that topic
into the same destinations, in its own group `--spans-group-id`. docs/bridge.md, "Receiving the
engine's spans". `--probe-scores-consumer` (on) reads the probe service's scores
(`--probe-scores-topic`) into `tensortrace.probe` spans, in the group `--probe-scores-group-id`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from tensortrace.consume.config import ConsumerConfig
from tensortrace.service.config import option, raise_problems
from tensortrace.service.security import EndpointSecurity, security_option
from tensortrace.storage import schema
from tensortrace.storage.otel import DEFAULT_OTEL_DATABASE, DEFAULT_TRACES_TABLE

DEFAULT_GROUP = "tensortrace-bridge"
DEFAULT_SERVICE_NAME = "tensortrace-bridge"
DEFAULT_SPANS_TOPIC = "tensortrace.spans"
DEFAULT_SPANS_GROUP = "tensortrace-bridge-spans"
DEFAULT_PROBE_SCORES_TOPIC = "tensortrace.probe_scores"
DEFAULT_PROBE_SCORES_GROUP = "tensortrace-bridge-probes"
OTLP_PROTOCOLS = ("grpc", "http/protobuf")


@dataclass
class BridgeConfig(ConsumerConfig):
    group_id: str = option(DEFAULT_GROUP, "Kafka consumer group")
    request_timeout_s: float = option(30.0, "a request still missing records or summaries after this is released incomplete")
    max_open_requests: int = option(10_000, "requests held at once; beyond, the oldest is released incomplete")

    otlp_endpoint: str = option("", "OTLP destination: host:port (grpc) or http(s)://host:4318/v1/traces (http/protobuf); '': off")
    otlp_protocol: str = option("grpc", "grpc | http/protobuf")
    otlp_insecure: bool = option(True, "grpc: plaintext (no TLS) to the OTLP endpoint")
    otlp_timeout_s: float = option(10.0, "one OTLP export call, including the SDK exporter's own retries")
    otlp_batch_spans: int = option(512, "spans per OTLP export call")

    clickhouse_dsn: str = option("", "ClickHouse for otel_traces: http(s)://user:password@host:port or chdb:///path; '': off")
    traces_database: str = option(DEFAULT_OTEL_DATABASE, "database of the traces table")
    traces_table: str = option(DEFAULT_TRACES_TABLE, "traces table (the OTel Collector ClickHouse exporter's shape)")
    traces_ttl_days: int = option(schema.DEFAULT_TTL_DAYS, "span rows older than this are dropped; 0: kept forever")

    step_spans: bool = option(False, "also one tensortrace.step span per (producer, forward step), linked to every "
                                     "request in that batch; needs one bridge to read every partition (docs/bridge.md)")
    step_linger_s: float = option(2.0, "a step's span is made when no record of it arrived for this long")
    step_max_links: int = option(0, "links per step span; 0: every request of the batch on the step span; N: the "
                                    "rest on tensortrace.step.links child spans, N each (never dropped)")
    step_ids_max: int = option(32, "step span ids recorded on each capture span (--step-spans); the rest are "
                                   "counted and derivable (docs/bridge.md)")

    # The serving engine's own spans (SGLang --enable-trace --otlp-traces-endpoint bridge:4317):
    # received over OTLP, published to the spans topic (acks=all) before the export succeeds, then
    # read back by a second consumer into the same destinations (receiver.py, engine.py).
    otlp_receiver_port: int = option(4317, "OTLP/gRPC trace receiver for the serving engine's spans; 0: ephemeral, -1: off")
    otlp_receiver_host: str = option("0.0.0.0", "address of the OTLP receivers (the pod IP; 127.0.0.1 for local use)")
    otlp_http_receiver_port: int = option(-1, "OTLP/HTTP (protobuf) receiver, POST /v1/traces; 4318 is the usual port; 0: ephemeral, -1: off")
    # TLS / mTLS / tokens (role `ingest`) of the OTLP/gRPC receiver: --otlp-receiver-tls-cert,
    # --otlp-receiver-token-file, --otlp-receiver-plaintext (loopback), ... (docs/security.md)
    otlp_receiver_security: EndpointSecurity = security_option("otlp-receiver", "OTLP receiver")
    otlp_receiver_max_bytes: int = option(4 << 20, "largest OTLP request accepted (bytes); larger: INVALID_ARGUMENT")
    spans_topic: str = option(DEFAULT_SPANS_TOPIC, "Kafka topic of the received spans (ExportTraceServiceRequest bytes)")
    spans_publish_timeout_s: float = option(5.0, "an export waits this long for Kafka's acknowledgement; then UNAVAILABLE")
    spans_message_max_bytes: int = option(1_000_000, "largest spans-topic message (keep under the topic's "
                                                      "max.message.bytes); larger requests are split by span")
    spans_consumer: bool = option(True, "also consume the spans topic into the destinations (otel_traces / OTLP)")
    spans_group_id: str = option(DEFAULT_SPANS_GROUP, "Kafka consumer group of the spans-topic consumer")

    # The probe service's verdicts (tensortrace.v1.ProbeScore, keyed by request id): one tensortrace.probe
    # span per (request, probe, probe version), under the request's capture span (probes.py).
    probe_scores_consumer: bool = option(True, "consume the probe scores topic into tensortrace.probe spans")
    probe_scores_topic: str = option(DEFAULT_PROBE_SCORES_TOPIC, "Kafka topic of the probe service's scores "
                                                                 "(tensortrace.v1.ProbeScore)")
    probe_scores_group_id: str = option(DEFAULT_PROBE_SCORES_GROUP, "Kafka consumer group of the probe scores consumer")

    service_name: str = option(DEFAULT_SERVICE_NAME, "resource service.name of the spans")
    tensors_table: str = option(f"{schema.DEFAULT_DATABASE}.activations",
                                "where the tensors are (the capture span's tensortrace.table)")

    def problems(self) -> list[str]:
        out = self.consumer_problems()
        if not self.otlp_endpoint and not self.clickhouse_dsn:
            out.append("otlp_endpoint/clickhouse_dsn: set at least one destination for the spans")
        if self.otlp_protocol not in OTLP_PROTOCOLS:
            out.append(f"otlp_protocol: {self.otlp_protocol!r} is not one of {', '.join(OTLP_PROTOCOLS)}")
        elif self.otlp_endpoint:
            is_url = self.otlp_endpoint.startswith(("http://", "https://"))
            if self.otlp_protocol == "http/protobuf" and not is_url:
                out.append(f"otlp_endpoint: {self.otlp_endpoint!r}: http/protobuf needs a URL (http://host:4318/v1/traces)")
            if self.otlp_protocol == "grpc" and not is_url and ":" not in self.otlp_endpoint:
                out.append(f"otlp_endpoint: {self.otlp_endpoint!r} is not host:port")
        if self.otlp_timeout_s <= 0:
            out.append(f"otlp_timeout_s: {self.otlp_timeout_s} must be > 0")
        if self.otlp_batch_spans < 1:
            out.append(f"otlp_batch_spans: {self.otlp_batch_spans} < 1")
        if self.clickhouse_dsn and not self.clickhouse_dsn.startswith(("chdb://", "http://", "https://")):
            out.append(f"clickhouse_dsn: {self.clickhouse_dsn!r}: expected chdb:///path or http(s)://user:pw@host:port")
        for name in ("traces_database", "traces_table"):
            try:
                schema.check_identifier(getattr(self, name), name)
            except ValueError as e:
                out.append(f"{name}: {e}")
        if self.traces_ttl_days < 0:
            out.append(f"traces_ttl_days: {self.traces_ttl_days} < 0")
        if self.request_timeout_s <= 0:
            out.append(f"request_timeout_s: {self.request_timeout_s} must be > 0")
        if self.max_open_requests < 1:
            out.append(f"max_open_requests: {self.max_open_requests} < 1")
        if self.step_linger_s <= 0:
            out.append(f"step_linger_s: {self.step_linger_s} must be > 0")
        if self.step_max_links < 0:
            out.append(f"step_max_links: {self.step_max_links} < 0 (0: no limit)")
        if self.step_ids_max < 0:
            out.append(f"step_ids_max: {self.step_ids_max} < 0")
        if not self.service_name:
            out.append("service_name: empty")
        for name in ("otlp_receiver_port", "otlp_http_receiver_port"):
            if not -1 <= getattr(self, name) <= 65535:
                out.append(f"{name}: {getattr(self, name)} is not a port (0: ephemeral, -1: off)")
        if self.otlp_receiver_port > 0 and self.otlp_receiver_port == self.otlp_http_receiver_port:
            out.append(f"otlp_http_receiver_port: {self.otlp_http_receiver_port} is also the gRPC receiver's port")
        if not self.otlp_receiver_host:
            out.append("otlp_receiver_host: empty")
        elif self.receives_spans:
            out += ["otlp_receiver_security." + p for p in
                    self.otlp_receiver_security.problems(self.otlp_receiver_host, "OTLP receiver")]
        if self.otlp_receiver_max_bytes < 1024:
            out.append(f"otlp_receiver_max_bytes: {self.otlp_receiver_max_bytes} < 1024")
        if self.spans_message_max_bytes < 1024:
            out.append(f"spans_message_max_bytes: {self.spans_message_max_bytes} < 1024")
        if self.spans_publish_timeout_s <= 0:
            out.append(f"spans_publish_timeout_s: {self.spans_publish_timeout_s} must be > 0")
        if self.receives_spans or self.spans_consumer:
            if not self.spans_topic or any(ch.isspace() for ch in self.spans_topic):
                out.append(f"spans_topic: {self.spans_topic!r} must be a non-empty name without spaces")
            elif self.spans_topic in (self.topic, self.dlq_topic):
                out.append(f"spans_topic: {self.spans_topic!r} is also the activation or dead-letter topic")
        if self.spans_consumer:
            if not self.spans_group_id or any(ch.isspace() for ch in self.spans_group_id):
                out.append(f"spans_group_id: {self.spans_group_id!r} must be a non-empty name without spaces")
            elif self.spans_group_id == self.group_id:
                out.append("spans_group_id: must differ from group_id (the two consumers read different topics)")
        if self.probe_scores_consumer:
            if not self.probe_scores_topic or any(ch.isspace() for ch in self.probe_scores_topic):
                out.append(f"probe_scores_topic: {self.probe_scores_topic!r} must be a non-empty name without spaces")
            elif self.probe_scores_topic in (self.topic, self.dlq_topic, self.spans_topic):
                out.append(f"probe_scores_topic: {self.probe_scores_topic!r} is also the activation, dead-letter or "
                           "spans topic")
            if not self.probe_scores_group_id or any(ch.isspace() for ch in self.probe_scores_group_id):
                out.append(f"probe_scores_group_id: {self.probe_scores_group_id!r} must be a non-empty name without "
                           "spaces")
            elif self.probe_scores_group_id in (self.group_id, self.spans_group_id):
                out.append("probe_scores_group_id: must differ from group_id and spans_group_id")
        return out

    @property
    def receives_spans(self) -> bool:
        """An OTLP receiver (gRPC or HTTP) is on."""
        return self.otlp_receiver_port >= 0 or self.otlp_http_receiver_port >= 0

    def spans_consumer_config(self) -> ConsumerConfig:
        """The consumer settings of the spans-topic consumer: this config's, on the spans topic,
        its own group, dead letters to `<spans_topic>.dlq`."""
        return ConsumerConfig(**{f.name: getattr(self, f.name) for f in fields(ConsumerConfig)} | dict(
            topic=self.spans_topic, group_id=self.spans_group_id, dlq_topic=self.spans_topic + ".dlq"))

    def probe_scores_consumer_config(self) -> ConsumerConfig:
        """The probe scores consumer: this config's settings, on the probe scores topic, its own group,
        dead letters to `<probe_scores_topic>.dlq`."""
        return ConsumerConfig(**{f.name: getattr(self, f.name) for f in fields(ConsumerConfig)} | dict(
            topic=self.probe_scores_topic, group_id=self.probe_scores_group_id,
            dlq_topic=self.probe_scores_topic + ".dlq"))

    def validate(self) -> "BridgeConfig":
        return raise_problems(self, "bridge config")
