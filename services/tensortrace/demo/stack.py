"""The demo's server side: a local Kafka broker, an exporter process draining the ring directory,
a loader process writing into chDB, serving the query service and running the OTel bridge
(`tensortrace loader --bridge`: spans into the same embedded engine, and an OTLP receiver for the
serving engine's own spans). All on 127.0.0.1, free ports.

    with PipelineStack(workdir, log) as stack:
        stack.otlp_endpoint                # "127.0.0.1:PORT", known before start(): SGLang's --otlp-traces-endpoint
        stack.start()                      # broker, topics, exporter, loader (+ query service + bridge)
        stack.query_address                # "127.0.0.1:PORT" for grpc:// reads
        stack.wait_for_spans(4, 1)         # the bridge wrote spans of 4 requests and some engine spans
        stack.stop_loader()                # the chDB path is free: `tensortrace trace --clickhouse chdb://...`
"""

from __future__ import annotations

import os
import signal
import time

from tensortrace.devkafka import LocalKafka
from tensortrace.devstack.processes import ExporterProcess, LoaderProcess
from tensortrace.devstack.sglang_server import free_port

TOPIC = "tensortrace.activations.demo"
SPANS_TOPIC = "tensortrace.spans.demo"
SCORES_TOPIC = "tensortrace.probe_scores"      # the probe service's and the loader's scores consumer's default
ESCALATION_TOPIC = "tensortrace.escalations"   # the probe service's default: flagged requests


class PipelineStack:
    def __init__(self, workdir: str, log):
        self.workdir, self.log = workdir, log
        self.ring_dir = os.path.join(workdir, "rings")
        os.makedirs(self.ring_dir, mode=0o700, exist_ok=True)
        self.ch_path = os.path.join(workdir, "chdb")
        self.kafka: LocalKafka | None = None
        self.exporter: ExporterProcess | None = None
        self.loader: LoaderProcess | None = None
        self.query_address: str | None = None
        # Chosen now: the SGLang server is launched (with --otlp-traces-endpoint) before the loader
        # runs; its exporter sends spans only once requests arrive, by then the receiver listens.
        self.otlp_endpoint = f"127.0.0.1:{free_port()}"
        self.loader_exit: int | None = None

    def __enter__(self) -> "PipelineStack":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        t0 = time.monotonic()
        self.kafka = LocalKafka()
        self.kafka.start()  # LocalKafkaError: one line, the caller prints it
        self._create_topics()
        self.log(f"   Kafka broker (Apache Kafka, KRaft, local jars) at {self.kafka.bootstrap}, "
                 f"topic {TOPIC}  [{time.monotonic() - t0:.1f}s]")
        t0 = time.monotonic()
        self.exporter = ExporterProcess(self.ring_dir, self.kafka.bootstrap, TOPIC, self.workdir,
                                        # keep drained rings of gone producers (the HF agent closes its
                                        # ring before the read-back) in the status until the demo ends
                                        extra=["--cleanup-grace-s", "3600"]).start()
        self.log(f"   exporter process pid {self.exporter.proc.pid}: drains {self.ring_dir}, control "
                 f"127.0.0.1:{self.exporter.control_port}  [{time.monotonic() - t0:.1f}s]")
        t0 = time.monotonic()
        self.loader = LoaderProcess(["--bootstrap", self.kafka.bootstrap, "--topic", TOPIC,
                                     "--dlq-topic", TOPIC + ".dlq", "--group", "demo-loader",
                                     "--clickhouse", f"chdb://{self.ch_path}", "--query-port", "0",
                                     "--batch-max-delay", "0.05", "--stats-interval", "0.5",
                                     "--bridge", "--bridge-group-id", "demo-bridge", "--bridge-spans-topic", SPANS_TOPIC,
                                     "--bridge-otlp-receiver-host", "127.0.0.1",
                                     "--bridge-otlp-receiver-port", self.otlp_endpoint.rsplit(":", 1)[1],
                                     # a request's spans wait for its summary (its end): longer than the
                                     # slowest request on a busy CPU
                                     "--bridge-request-timeout-s", "300"],
                                    log_path=os.path.join(self.workdir, "loader.log"))
        self.query_address = self.loader.wait_for_query_service(timeout_s=90)
        self.log(f"   loader process pid {self.loader.proc.pid}: Kafka -> ClickHouse (chDB embedded, "
                 f"{self.ch_path}), query service grpc://{self.query_address}, OTel bridge (spans -> otel_traces, "
                 f"OTLP receiver {self.otlp_endpoint})  [{time.monotonic() - t0:.1f}s]")

    def _create_topics(self) -> None:
        from kafka.admin import KafkaAdminClient, NewTopic

        admin = KafkaAdminClient(bootstrap_servers=self.kafka.bootstrap, request_timeout_ms=30000)
        try:
            admin.create_topics([NewTopic(TOPIC, num_partitions=2, replication_factor=1),
                                 NewTopic(TOPIC + ".dlq", num_partitions=1, replication_factor=1),
                                 NewTopic(SPANS_TOPIC, num_partitions=1, replication_factor=1),
                                 NewTopic(SPANS_TOPIC + ".dlq", num_partitions=1, replication_factor=1),
                                 NewTopic(SCORES_TOPIC, num_partitions=1, replication_factor=1),
                                 NewTopic(SCORES_TOPIC + ".dlq", num_partitions=1, replication_factor=1),
                                 NewTopic(ESCALATION_TOPIC, num_partitions=1, replication_factor=1)])
        finally:
            admin.close()

    def exporter_drained(self, timeout_s: float = 60.0):
        """The exporter's status once every ring's committed frames are released (acknowledged by
        Kafka or dropped with a reason); the last status seen if that takes longer than timeout_s."""
        deadline = time.monotonic() + timeout_s
        while True:
            st = self.exporter.status()
            if st.rings and all(r.frames_pending == 0 for r in st.rings):
                return st
            if time.monotonic() > deadline:
                return st
            time.sleep(0.1)

    def wait_for_spans(self, requests: int, engine_spans: int, timeout_s: float = 60.0, quiet_s: float = 1.5) -> dict:
        """The bridge's counters (from the loader's /metrics) once it has written the spans of at
        least `requests` captured requests and `engine_spans` of the engine's spans to otel_traces
        and nothing new came for `quiet_s` (the engine exports its spans in batches); the last
        counters seen after timeout_s otherwise."""
        deadline = time.monotonic() + timeout_s
        last, since, m = None, time.monotonic(), {}
        while time.monotonic() < deadline:
            m = self.loader.metrics("tensortrace_bridge_")
            now = (sum(v for k, v in m.items() if k.startswith("tensortrace_bridge_requests_total")),
                   m.get('tensortrace_bridge_engine_spans_total{destination="clickhouse"}', 0.0))
            if now != last:
                last, since = now, time.monotonic()
            if now[0] >= requests and now[1] >= engine_spans and time.monotonic() - since >= quiet_s:
                break
            time.sleep(0.1)
        return m

    def stop_loader(self) -> int | None:
        """SIGTERM the loader (it drains: its last inserts and spans are written) and wait: the chDB
        path has one owner process, and a reader may open it now."""
        if self.loader is not None and self.loader_exit is None:
            self.loader.kill(signal.SIGTERM)
            self.loader_exit = self.loader.proc.returncode
        return self.loader_exit

    def close(self) -> None:
        # Reverse order of start; each step runs even if an earlier one fails.
        try:
            self.stop_loader()
        finally:
            self.loader = None
        if self.exporter is not None:
            try:
                self.exporter.stop()
            finally:
                self.exporter = None
        if self.kafka is not None:
            try:
                self.kafka.close()
            finally:
                self.kafka = None
