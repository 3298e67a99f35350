"""The demo's server side: a local Kafka broker, an exporter process draining the ring directory,
a loader process writing into chDB and serving the query service. All on 127.0.0.1, free ports.

    with PipelineStack(workdir, log) as stack:
        stack.start()                      # broker, topic, exporter, loader (+ its query service)
        stack.query_address                # "127.0.0.1:PORT" for grpc:// reads
"""

from __future__ import annotations

import os
import signal
import time

from tensortrace.devkafka import LocalKafka
from tensortrace.devstack.processes import ExporterProcess, LoaderProcess

TOPIC = "tensortrace.activations.demo"


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
                                     "--batch-max-delay", "0.05", "--stats-interval", "0.5"])
        self.query_address = self.loader.wait_for_query_service(timeout_s=90)
        self.log(f"   loader process pid {self.loader.proc.pid}: Kafka -> ClickHouse (chDB embedded, "
                 f"{self.ch_path}), query service grpc://{self.query_address}  [{time.monotonic() - t0:.1f}s]")

    def _create_topics(self) -> None:
        from kafka.admin import KafkaAdminClient, NewTopic

        admin = KafkaAdminClient(bootstrap_servers=self.kafka.bootstrap, request_timeout_ms=30000)
        try:
            admin.create_topics([NewTopic(TOPIC, num_partitions=2, replication_factor=1),
                                 NewTopic(TOPIC + ".dlq", num_partitions=1, replication_factor=1)])
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

    def close(self) -> None:
        # Reverse order of start; each step runs even if an earlier one fails.
        if self.loader is not None:
            try:
                self.loader.kill(signal.SIGTERM)
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
