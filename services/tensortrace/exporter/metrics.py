"""Exporter metrics, on the exporter's own registry (served at /metrics by the service runtime's
HTTP endpoint, tensortrace.service.endpoint, with /healthz and /readyz).

Every metric is declared here and documented in docs/exporter.md. Names follow Prometheus
conventions: the unit last (`_bytes`, `_seconds`, `_ratio`), counters get `_total` from
prometheus_client.

>>> m = ExporterMetrics()
>>> m.records_in.labels("pod-a-r0.ring").inc()
>>> [line for line in m.exposition().decode().splitlines() if line.startswith("tensortrace_exporter_records_in_total")]
['tensortrace_exporter_records_in_total{ring="pod-a-r0.ring"} 1.0']
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

P = "tensortrace_exporter_"


class ExporterMetrics:
    def __init__(self):
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.records_in = Counter(P + "records_in", "TensorRecords and summaries built from ring frames", ["ring"], registry=r)
        self.bytes_in = Counter(P + "payload_read_bytes", "Payload bytes read from rings", ["ring"], registry=r)
        self.frames_in = Counter(P + "frames_in", "Frames read from rings (PAD excluded)", ["ring"], registry=r)
        self.records_out = Counter(P + "records_out", "Records acknowledged by Kafka", ["ring", "topic"], registry=r)
        self.bytes_out = Counter(P + "payload_published_bytes", "Payload bytes acknowledged by Kafka", ["ring", "topic"], registry=r)
        self.messages_out = Counter(P + "messages_out", "Kafka messages acknowledged", ["topic"], registry=r)
        self.message_bytes_out = Counter(P + "message_published_bytes", "Kafka message value bytes acknowledged", ["topic"], registry=r)
        self.frames_dropped = Counter(P + "frames_dropped", "Frames dropped, by where and why (producer_dropped = counted by the agent in the ring header)", ["ring", "reason"], registry=r)
        self.ring_frames = Gauge(P + "ring_frames", "Frame accounting of a ring (header counters): committed and "
                                 "producer_dropped by the agent, released by the exporter, pending = committed - released",
                                 ["ring", "kind"], registry=r)
        # A counter the producing agent keeps (the ring header's thread-ns slot): mirrored at scrape
        # time as a counter family, so it is `_total` and `rate()`-able like any counter.
        self.agent_thread = _MirroredCounter(P + "agent_thread_seconds", "Inference-thread time the producing "
                                             "agent has spent capturing (from the ring header; rate() of it is "
                                             "the share of one inference thread that capture costs)", "ring")
        r.register(self.agent_thread)
        self.ring_fill = Gauge(P + "ring_fill_ratio", "Fraction of a ring's data area not yet released", ["ring"], registry=r)
        self.rings_attached = Gauge(P + "rings_attached", "Rings being drained", registry=r)
        self.rings_quarantined = Counter(P + "rings_quarantined", "Rings quarantined (unreadable, corrupt, or claiming another pod than their directory)", ["reason"], registry=r)
        self.rings_refused = Counter(P + "rings_refused", "Ring files refused (permissions, owner, not a regular file, pod directory, flat layout)", ["reason"], registry=r)
        self.rings_removed = Counter(P + "rings_removed", "Drained rings of gone producers deleted after the grace period", registry=r)
        self.kafka_errors = Counter(P + "kafka_errors", "Kafka send failures, by error type", ["error"], registry=r)
        self.kafka_connected = Gauge(P + "kafka_connected", "1 when a Kafka producer is connected", registry=r)
        self.send_latency = Histogram(P + "kafka_send_latency_seconds", "Time from send to acknowledgement",
                                      buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
                                      registry=r)
        self.inflight_bytes = Gauge(P + "inflight_bytes", "Message bytes sent and not yet acknowledged", registry=r)
        self.inflight_messages = Gauge(P + "inflight_messages", "Messages sent and not yet acknowledged", registry=r)
        self.oldest_undelivered_age = Gauge(P + "oldest_undelivered_age_seconds",
                                            "Age (since capture) of the oldest record read but not yet acknowledged", registry=r)
        self.passes = Counter(P + "main_loop_passes", "Main-loop passes: `work` (acknowledgements handled or frames "
                              "read), `empty` (the pass that ends a run of passes; a wait follows it)", ["result"],
                              registry=r)
        self.backpressure = Counter(P + "backpressure_passes", "Drain passes skipped because the in-flight buffer was full", registry=r)
        self.rewinds = Counter(P + "ring_rewinds", "Rings re-read from their tail after a failed delivery", ["ring"], registry=r)
        self.passes_record_limited = Counter(P + "pass_record_limited", "Drain passes stopped at max_pass_records "
                                             "(the rest is read by the next pass; many: a ring writing tiny rows)",
                                             ["ring"], registry=r)

    def forget_ring(self, ring: str) -> None:
        """Drop the label sets of a removed ring (bounded cardinality)."""
        for metric in (self.records_in, self.bytes_in, self.frames_in, self.ring_fill, self.rewinds,
                       self.passes_record_limited):
            try:
                metric.remove(ring)
            except KeyError:
                pass
        self.agent_thread.values.pop(ring, None)
        for kind in ("committed", "producer_dropped", "released", "pending"):
            try:
                self.ring_frames.remove(ring, kind)
            except KeyError:
                pass

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _MirroredCounter:
    """A counter whose value another process keeps (per label value), reported as it was last read."""

    def __init__(self, name: str, documentation: str, label: str):
        self.name, self.documentation, self.label = name, documentation, label
        self.values: dict[str, float] = {}

    def set(self, label_value: str, value: float) -> None:
        self.values[label_value] = value

    def collect(self):
        family = CounterMetricFamily(self.name, self.documentation, labels=[self.label])
        for label_value, value in sorted(self.values.items()):
            family.add_metric([label_value], value)
        yield family

    def describe(self):
        return [CounterMetricFamily(self.name, self.documentation, labels=[self.label])]

