"""The bridge as a consumer service: captured requests off the activation topic -> spans.

    svc = BridgeService(BridgeConfig(kafka=KafkaConfig(bootstrap_servers="127.0.0.1:9092"),
                                     otlp_endpoint="127.0.0.1:4317"))
    threading.Thread(target=svc.run).start(); ...; svc.stop()

    Kafka ──> ConsumerCore ──> BridgeSink ──(RequestView: group by request, de-duplicate, decide
                                   │          completeness by the shared rule)
                                   └─ flush: released requests -> request_spans (spans.py)
                                             -> OTLP / otel_traces (export.py), durable
                                             -> only then the offsets are committed

Why a sink around the RequestView rather than a plain RequestHandler: a handler is called once per
request and must make that request durable before returning, i.e. one OTLP call and one ClickHouse
insert per request. The bridge takes the view's whole sealed batch of released requests and writes
their spans in one go (the view's grouping, de-duplication, completeness, timeouts, eviction and
held offsets are used as they are).

Per-record metadata without payloads. The spans need the records' capture and export times, hooks,
layers and steps, but never their payloads. The view's `keep(record)` is called once for each
distinct record of an open request (after de-duplication, never for a late one); the bridge uses
it to fold the record into a small `RecordStats` (bounds and sets, O(hooks + layers + steps) per
request) and keeps nothing (returns False): memory per open request does not grow with its
records (measured in scripts/bench/bridge_throughput.py). The stats travel with the request when
the view seals it (consume thread), so the flush thread shares no mutable state with it.

Offsets: the view keeps commits behind every request it holds and never inside one it released
(`RequestView.commit_offset`), and the consumer core commits nothing after a batch that was not
made durable; the sink adds only its pending step spans' records (`commit_offset`).

Step spans (`step_spans`, opt-in): the same keep() observer folds each record into the StepStats of
its (producer, step); a step is sealed with the next batch once it is whole, and its records'
offsets are held like a request's until its span is durable. Whole: no record of it arrived for
`step_linger_s`, and no assigned partition can still hold one — each is either read up to its end
(no lag: `lagging()`), or has delivered a record of the same producer pod (the same exporter,
publishing in about export order within a partition) exported more than `step_linger_s` after the
step's last record (the margin covers the exporter's packing of several steps into one message,
and its batching delay). Quiet time
alone is not enough: a bridge catching up on a backlog reads one partition's fetch after another,
seconds apart, so one step's records arrive spread over that time.

The OTLP receivers (gRPC and HTTP) are secured by the one `--otlp-receiver-*` block
(service/security.py): their guards are built with the service, so a certificate, key or token
file that cannot work, or plaintext on a non-loopback address without the force, is a ConfigError
at build time (the runtime exits 2 naming the flag) rather than a failure of the run thread.

Idempotent by construction: span ids are derived from (trace id, request id, stage), so a request
the view releases again after a crash or a replay re-sends spans with the same ids.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from tensortrace.bridge.config import BridgeConfig
from tensortrace.bridge.engine import EngineSpansSink, EngineStats
from tensortrace.bridge.export import ClickHouseWriter, OtlpForwarder, OtlpWriter, Writers, bridge_resource
from tensortrace.bridge.otlp import decode_message
from tensortrace.bridge.probes import ProbeSpansSink, ProbeStats, decode_probe_score
from tensortrace.bridge.receiver import (HTTP_ENDPOINT, OTLP_POLICIES, OtlpGrpcReceiver, OtlpHttpReceiver,
                                         ReceiverStats, SpansIntake, SpansPublisher)
from tensortrace.bridge.spans import (RecordStats, SpanData, SpanSource, StepStats, request_spans, skip_reason,
                                      step_span)
from tensortrace.consume import CapturedRequest, ConsumerCore, Release, RequestView
from tensortrace.consume.metrics import lag_family
from tensortrace.consume.sink import SealedBatch, Source
from tensortrace.service.backoff import Backoff
from tensortrace.service.config import ConfigError
from tensortrace.service.security import EndpointGuard, SecurityError
from tensortrace.v1 import records_pb2 as pb

log = logging.getLogger("tensortrace.bridge")


@dataclass
class BridgeStats:
    requests: dict[str, int] = field(default_factory=dict)   # completeness state -> requests turned into spans
    skipped: dict[str, int] = field(default_factory=dict)    # skip reason -> requests without spans
    spans: int = 0                                           # spans made durable (every destination)
    steps: int = 0                                           # step spans made durable (step_spans on)
    step_late_records: int = 0                               # records of a step already emitted (not in its span)
    steps_emitted_early: int = 0                             # pending steps over max_pending_steps, emitted early
    derive_seconds: float = 0.0                              # flush thread: request -> spans
    write_seconds: float = 0.0                               # flush thread: spans -> destinations


@dataclass
class Released:
    """A sealed batch: the requests the view released, each with its records' metadata."""
    seq: int
    requests: list[tuple[CapturedRequest, RecordStats | None]]
    steps: list[StepStats] = field(default_factory=list)


class BridgeSink:
    """A `tensortrace.consume.Sink`: a RequestView whose released requests become spans, a whole
    sealed batch at a time (module docstring)."""

    def __init__(self, write: Callable[[list[SpanData], threading.Event], bool], source: SpanSource, *,
                 timeout_s: float = 30.0, max_requests: int = 10_000, retry_initial_s: float = 0.2,
                 retry_max_s: float = 10.0, stats: BridgeStats | None = None, clock_ns: Callable[[], int] = time.time_ns,
                 step_spans: bool = False, step_linger_s: float = 2.0, step_max_links: int = 0,
                 max_pending_steps: int = 10_000, monotonic: Callable[[], float] = time.monotonic,
                 lagging: Callable[[], set[int] | None] | None = None):
        self.write = write
        self.source = source
        self.stats = stats if stats is not None else BridgeStats()
        self.clock_ns = clock_ns
        self.view = RequestView(self, timeout_s=timeout_s, keep=self._observe, max_requests=max_requests,
                                retry_initial_s=retry_initial_s, retry_max_s=retry_max_s)
        self._records: dict[tuple[bytes, str], RecordStats] = {}
        self._source = Source("", -1, -1)
        # per forward step (opt-in): (pod, pid, generation, step) -> StepStats while records arrive;
        # emitted ones are remembered (bounded) so a late record never makes a second, partial span
        self.step_spans = step_spans
        self.step_linger_s = step_linger_s
        self.step_max_links = step_max_links
        self.max_pending_steps = max_pending_steps
        self.monotonic = monotonic
        self._steps: OrderedDict[tuple, StepStats] = OrderedDict()
        self._emitted_steps: OrderedDict[tuple, None] = OrderedDict()
        self._export_marks: dict[tuple[int, str], int] = {}   # (partition, pod) -> latest export time read
        self.lagging = lagging          # -> partitions not read up to their end (None: unknown, none assumed)
        self._seq = 0

    # -- Sink: consume thread -------------------------------------------------------------------

    def _observe(self, rec: pb.TensorRecord) -> bool:
        """RequestView's keep(): once per distinct record of an open request. Folds its metadata
        into the request's RecordStats; keeps no payload."""
        key = (rec.trace_id, rec.request_id)
        st = self._records.get(key)
        if st is None:
            st = self._records[key] = RecordStats()
            st.partition = self._source.partition
        st.add(rec)
        st.last_seen_ns = self.clock_ns()
        if self.step_spans:
            p = rec.producer
            skey = (p.pod, p.pid, p.generation, rec.step)
            ss = self._steps.get(skey)
            if ss is None:
                if skey in self._emitted_steps:
                    self.stats.step_late_records += 1
                    return False
                ss = self._steps[skey] = StepStats(rec)
            ss.add(rec, self._source.partition, self._source.offset, self.monotonic())
            mark = (self._source.partition, p.pod)
            if rec.export_time_unix_nano > self._export_marks.get(mark, 0):
                self._export_marks[mark] = rec.export_time_unix_nano
        return False

    def add_tensor(self, rec: pb.TensorRecord, source: Source) -> None:
        self._source = source
        self.view.add_tensor(rec, source)

    def add_summary(self, s: pb.RequestSummary, source: Source) -> None:
        self.view.add_summary(s, source)

    def due(self) -> bool:
        return self.view.due()

    def seal(self) -> Released | None:
        released = self.view.seal() or []
        steps = self._ready_steps() if self._steps else []
        if not released and not steps:
            return None
        self._seq += 1
        return Released(self._seq, [(req, self._records.pop(req.key, None)) for req in released], steps)

    def _ready_steps(self) -> list[StepStats]:
        """Whole steps (module docstring: quiet for step_linger_s, no partition that can still
        hold one of their records), and the oldest beyond max_pending_steps (counted)."""
        now = self.monotonic()
        quiet = [k for k, ss in self._steps.items() if now - ss.last_seen >= self.step_linger_s]
        lagging = (self.lagging() or set()) if quiet and self.lagging is not None else set()
        if lagging:
            marks, margin = self._export_marks, int(self.step_linger_s * 1e9)
            ready = [k for k in quiet
                     if all(marks.get((p, k[0]), 0) > self._steps[k].last_export_ns + margin for p in lagging)]
        else:
            ready = quiet
        over = len(self._steps) - len(ready) - self.max_pending_steps
        if over > 0:
            chosen = set(ready)
            early = [k for k in self._steps if k not in chosen][:over]
            self.stats.steps_emitted_early += len(early)
            ready += early
        out = []
        for k in ready:
            out.append(self._steps.pop(k))
            self._emitted_steps[k] = None
        while len(self._emitted_steps) > 200_000:
            self._emitted_steps.popitem(last=False)
        return out

    def commit_offset(self, partition: int, candidate: int) -> int:
        """Where a commit may go: behind the records of steps whose spans are not out yet, then
        wherever the view says (behind open requests, never inside a released one)."""
        at = candidate
        for ss in self._steps.values():
            span = ss.offsets.get(partition)
            if span is not None and span[0] < at:
                at = span[0]
        return self.view.commit_offset(partition, at)

    def revoked(self, partitions: set[int]) -> None:
        self.view.revoked(partitions)
        for key in [k for k, st in self._records.items() if st.partition in partitions]:
            del self._records[key]
        for ss in self._steps.values():
            for partition in partitions:
                ss.offsets.pop(partition, None)
        for mark in [m for m in self._export_marks if m[0] in partitions]:
            del self._export_marks[mark]

    @property
    def open_record_stats(self) -> int:
        return len(self._records)

    @property
    def open_steps(self) -> int:
        return len(self._steps)

    # -- Sink: flush thread ---------------------------------------------------------------------

    def spans_of(self, released: list[tuple[CapturedRequest, RecordStats | None]]) -> tuple[list[SpanData], dict, dict]:
        """The spans of a batch of released requests, and the per-state / per-skip-reason counts."""
        spans: list[SpanData] = []
        states: dict[str, int] = {}
        skipped: dict[str, int] = {}
        for req, st in released:
            why = skip_reason(req)
            if why is not None:
                skipped[why] = skipped.get(why, 0) + 1
                continue
            # When the bridge received the request's last message: a COMPLETE release happens on
            # that message; a timed-out one happens timeout_s later, so use the last arrival.
            received = req.released_ns
            if req.release is not Release.COMPLETE and st is not None and st.last_seen_ns:
                received = st.last_seen_ns
            spans.extend(request_spans(req, st, self.source, received))
            state = req.completeness.state
            states[state] = states.get(state, 0) + 1
        return spans, states, skipped

    def flush(self, batch: SealedBatch, stopping: threading.Event) -> bool:
        t0 = time.perf_counter()
        spans, states, skipped = self.spans_of(batch.data.requests)
        for ss in batch.data.steps:
            spans += step_span(ss, self.step_max_links)
        t1 = time.perf_counter()
        self.stats.derive_seconds += t1 - t0
        if spans and not self.write(spans, stopping):
            return False   # stopping: the core commits nothing from here on; the next owner re-sends
        self.stats.write_seconds += time.perf_counter() - t1
        self.stats.spans += len(spans)
        self.stats.steps += len(batch.data.steps)
        for k, n in states.items():
            self.stats.requests[k] = self.stats.requests.get(k, 0) + n
        for k, n in skipped.items():
            self.stats.skipped[k] = self.stats.skipped.get(k, 0) + n
        return True

    def on_request(self, request: CapturedRequest) -> None:
        """RequestHandler (the view's flush is never called: `flush` above takes whole batches)."""
        raise RuntimeError("BridgeSink.flush handles released requests; RequestView.flush must not be used")


def _name_flags(problem: str, prefix: str) -> str:
    """"plaintext: refusing ..." -> "otlp_receiver_security.plaintext (--otlp-receiver-security-plaintext):
    refusing ..." (a build-time problem is not mapped to its flag by the runtime's parser)."""
    field, sep, why = problem.partition(": ")
    if not sep:
        return f"otlp_receiver_security: {problem}"
    flags = "/".join(f"--{prefix}-{f.replace('_', '-')}" for f in field.split("/"))
    return f"otlp_receiver_security.{field} ({flags}): {why}"


class BridgeService:
    """`tensortrace bridge` as a `tensortrace.service.Service`."""

    flag_prefix = "otlp-receiver-security"   # the receivers' security flags, as errors name them

    def __init__(self, cfg: BridgeConfig, *, security_registry=None):
        """`security_registry`: where the OTLP receivers' authentication counters go (the loader's
        registry when the bridge runs inside it; default this service's own). Raises ConfigError
        (exit 2 from the runtime) for a bad config, including a receiver security block that
        cannot work where it listens."""
        self.cfg = cfg.validate()
        self.stats = BridgeStats()
        self.writers = Writers()
        self.sink = BridgeSink(self._write, SpanSource(cfg.topic, cfg.group_id, cfg.tensors_table,
                                                       step_spans=cfg.step_spans, step_ids_max=cfg.step_ids_max),
                               timeout_s=cfg.request_timeout_s, max_requests=cfg.max_open_requests,
                               retry_initial_s=cfg.retry_initial_s, retry_max_s=cfg.retry_max_s, stats=self.stats,
                               step_spans=cfg.step_spans, step_linger_s=cfg.step_linger_s,
                               step_max_links=cfg.step_max_links, lagging=self._lagging)
        self.core = ConsumerCore(cfg, self.sink, name="bridge")
        # the serving engine's spans: OTLP receiver(s) -> spans topic -> a second consumer
        self.receiver_stats = ReceiverStats()
        self.publisher: SpansPublisher | None = None
        self.intake: SpansIntake | None = None
        self.grpc_receiver: OtlpGrpcReceiver | None = None
        self.http_receiver: OtlpHttpReceiver | None = None
        self.engine_writers = Writers()
        self.engine_stats = EngineStats()
        self.engine_sink = EngineSpansSink(self._write_engine, stats=self.engine_stats)
        self.spans_core = (ConsumerCore(cfg.spans_consumer_config(), self.engine_sink, name="bridge-spans",
                                        decode=decode_message) if cfg.spans_consumer else None)
        # the probe service's scores -> tensortrace.probe spans (a third consumer, same destinations)
        self.probe_stats = ProbeStats()
        self.probe_writers = Writers()   # writers of their own: their own flush thread and counters
        self.probe_sink = ProbeSpansSink(self._write_probes, stats=self.probe_stats)
        self.probe_core = (ConsumerCore(cfg.probe_scores_consumer_config(), self.probe_sink, name="bridge-probes",
                                        decode=decode_probe_score) if cfg.probe_scores_consumer else None)
        self._stop = threading.Event()
        self._opened = threading.Event()
        self._client = None
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(BridgeCollector(self))
        self.grpc_guard, self.http_guard = self._receiver_guards(
            self.registry if security_registry is None else security_registry)

    def _receiver_guards(self, registry) -> tuple[EndpointGuard | None, EndpointGuard | None]:
        """The receivers' security, built when the service is built: the certificate, key, client
        CA and token files are read and checked now, and plaintext off loopback without the force
        is refused now, each a ConfigError naming the flag (the runtime exits 2) rather than a
        traceback from the run thread. Both receivers take the one `--otlp-receiver-*` block."""
        cfg = self.cfg
        sec = cfg.otlp_receiver_security
        grpc_guard = http_guard = None
        if cfg.otlp_receiver_port >= 0:   # BridgeConfig.problems() checked this block for this host
            grpc_guard = EndpointGuard("otlp", sec, OTLP_POLICIES, registry=registry)
        if cfg.otlp_http_receiver_port >= 0:
            problems = sec.problems(cfg.otlp_receiver_host, "OTLP/HTTP receiver")
            if problems:
                raise SecurityError([_name_flags(p, self.flag_prefix) for p in problems], "bridge config")
            http_guard = EndpointGuard(HTTP_ENDPOINT, sec, OTLP_POLICIES, registry=registry)
        return grpc_guard, http_guard

    def _write(self, spans: list[SpanData], stopping: threading.Event) -> bool:
        return self.writers.write(spans, stopping)

    def _write_probes(self, spans: list[SpanData], stopping: threading.Event) -> bool:
        return self.probe_writers.write(spans, stopping)

    def _lagging(self) -> set[int] | None:
        """Partitions of the activation topic not read up to their high watermark (consume thread,
        from the step spans' seal). None when the consumer is not open."""
        return self.core.unread_partitions()

    def _write_engine(self, requests: list, stopping: threading.Event) -> bool:
        return self.engine_writers.write_requests(requests, stopping)

    # -- Service ----------------------------------------------------------------------------------

    def run(self) -> None:
        # The receivers first: they need Kafka only, so the engine's spans are taken (and kept in
        # the spans topic) while ClickHouse is still unreachable.
        self._start_receivers()
        threads = []
        try:
            if not self._open_writers():
                return   # stopped while a destination was unreachable
            for core, name in ((self.spans_core, "bridge-spans-consume"), (self.probe_core, "bridge-probes-consume")):
                if core is not None:
                    t = threading.Thread(target=core.run, name=name, daemon=True)
                    t.start()
                    threads.append((core, t))
            self.core.run()
        finally:
            for core, t in threads:
                core.stop()
                t.join(timeout=self.cfg.rebalance_flush_timeout_s + 5)
            self._stop_receivers()
            self.writers.close()
            self.engine_writers.close()
            self.probe_writers.close()
            # An embedded chDB engine is one per process and may be shared (tests, a composed
            # process): closing a client must not end it. A server connection is closed.
            if self._client is not None and not self.cfg.clickhouse_dsn.startswith("chdb://"):
                self._client.close()

    def stop(self) -> None:
        self._stop.set()
        self.core.stop()
        if self.spans_core is not None:
            self.spans_core.stop()
        if self.probe_core is not None:
            self.probe_core.stop()

    def live(self) -> bool:
        # Readiness does not wait for the probe scores consumer: its topic exists only once a probe
        # service runs, and the bridge serves its other inputs meanwhile.
        return (self.core.live() and (self.spans_core is None or self.spans_core.live())
                and (self.probe_core is None or self.probe_core.live()))

    def ready(self) -> bool:
        return (self._opened.is_set() and self.core.ready.is_set()
                and (self.spans_core is None or self.spans_core.ready.is_set())
                and (self.publisher is None or self.publisher.connected))

    def not_ready_reason(self) -> str:
        if not self._opened.is_set():
            return "ClickHouse not reachable yet"
        if not self.core.ready.is_set():
            return self.core.kafka_error or "consumer has not joined the group (no partitions assigned)"
        if self.spans_core is not None and not self.spans_core.ready.is_set():
            return self.spans_core.kafka_error or f"spans-topic consumer has no partitions of {self.cfg.spans_topic} yet"
        if self.publisher is not None and not self.publisher.connected:
            return f"OTLP receiver: spans topic {self.cfg.spans_topic} not writable: {self.publisher.error}"
        return ""

    def ports(self) -> dict[str, int]:
        out = {}
        if self.grpc_receiver is not None:
            out["otlp"] = self.grpc_receiver.port
        if self.http_receiver is not None:
            out["otlp_http"] = self.http_receiver.port
        return out

    # -- the OTLP receivers -------------------------------------------------------------------------

    def _start_receivers(self) -> None:
        cfg = self.cfg
        if not cfg.receives_spans:
            return
        self.publisher = SpansPublisher(cfg.kafka, cfg.spans_topic, timeout_s=cfg.spans_publish_timeout_s,
                                        max_message_bytes=cfg.spans_message_max_bytes,
                                        retry_initial_s=cfg.retry_initial_s, retry_max_s=cfg.retry_max_s).start()
        self.intake = SpansIntake(self.publisher, self.receiver_stats, max_request_bytes=cfg.otlp_receiver_max_bytes,
                                  max_message_bytes=cfg.spans_message_max_bytes)
        sec = cfg.otlp_receiver_security
        try:
            if cfg.otlp_receiver_port >= 0:
                self.grpc_receiver = OtlpGrpcReceiver(self.intake, cfg.otlp_receiver_host, cfg.otlp_receiver_port,
                                                      security=sec, registry=self.registry,
                                                      guard=self.grpc_guard).start()
                log.info("OTLP/gRPC trace receiver on %s:%d (%s) -> Kafka topic %s", cfg.otlp_receiver_host,
                         self.grpc_receiver.port, sec.describe(), cfg.spans_topic)
            if cfg.otlp_http_receiver_port >= 0:
                self.http_receiver = OtlpHttpReceiver(self.intake, cfg.otlp_receiver_host, cfg.otlp_http_receiver_port,
                                                      security=sec, registry=self.registry,
                                                      guard=self.http_guard).start()
                log.info("OTLP/HTTP trace receiver on %s://%s:%d/v1/traces (%s) -> Kafka topic %s",
                         "https" if sec.tls else "http", cfg.otlp_receiver_host, self.http_receiver.port,
                         sec.describe(), cfg.spans_topic)
        except ConfigError as e:
            # the guards checked the files when the service was built, so this is one that changed
            # since (deleted, half-written) before the bind re-checked it: each problem on one line,
            # then the run thread fails (the runtime exits 1 for that)
            self._stop_receivers()
            for line in str(e).splitlines():
                log.error("OTLP receiver: %s", line)
            raise
        except OSError:
            self._stop_receivers()
            raise

    def _stop_receivers(self) -> None:
        """Refuse new exports, let the ones in flight finish publishing, then close the producer."""
        if self.grpc_receiver is not None:
            self.grpc_receiver.stop()
        if self.http_receiver is not None:
            self.http_receiver.stop()
        if self.publisher is not None:
            self.publisher.close()

    # -- startup ----------------------------------------------------------------------------------

    def _open_writers(self) -> bool:
        cfg = self.cfg
        resource = bridge_resource(cfg.service_name)
        retry = dict(retry_initial_s=cfg.retry_initial_s, retry_max_s=cfg.retry_max_s)
        if cfg.otlp_endpoint:
            self.writers.items.append(OtlpWriter.create(cfg.otlp_endpoint, protocol=cfg.otlp_protocol,
                                                        insecure=cfg.otlp_insecure, timeout_s=cfg.otlp_timeout_s,
                                                        resource=resource, batch_spans=cfg.otlp_batch_spans, **retry))
            if cfg.spans_consumer:
                self.engine_writers.items.append(OtlpForwarder.create(
                    cfg.otlp_endpoint, protocol=cfg.otlp_protocol, insecure=cfg.otlp_insecure,
                    timeout_s=cfg.otlp_timeout_s, **retry))
            if cfg.probe_scores_consumer:
                self.probe_writers.items.append(OtlpWriter.create(
                    cfg.otlp_endpoint, protocol=cfg.otlp_protocol, insecure=cfg.otlp_insecure,
                    timeout_s=cfg.otlp_timeout_s, resource=resource, batch_spans=cfg.otlp_batch_spans, **retry))
        if cfg.clickhouse_dsn:
            client = self._open_clickhouse()
            if client is None:
                return False
            self.writers.items.append(ClickHouseWriter(client, cfg.traces_database, cfg.traces_table,
                                                       resource=resource, **retry))
            if cfg.spans_consumer:   # its own instance: its own counters (engine spans)
                self.engine_writers.items.append(ClickHouseWriter(client, cfg.traces_database, cfg.traces_table,
                                                                  resource=resource, **retry))
            if cfg.probe_scores_consumer:
                self.probe_writers.items.append(ClickHouseWriter(client, cfg.traces_database, cfg.traces_table,
                                                                 resource=resource, **retry))
        self._opened.set()
        return True

    def _open_clickhouse(self):
        """A client once ClickHouse answers and the traces tables exist; None if stopped meanwhile."""
        from tensortrace.storage import ThreadSafeClient, connect
        from tensortrace.storage.otel import OtelSchemaError, apply_otel_schema

        cfg = self.cfg
        backoff = Backoff(cfg.retry_initial_s, cfg.retry_max_s)
        while not self._stop.is_set():
            try:
                client = ThreadSafeClient(connect(cfg.clickhouse_dsn))
                apply_otel_schema(client, cfg.traces_database, cfg.traces_ttl_days, cfg.traces_table)
                self._client = client
                return client
            except OtelSchemaError:
                raise   # retrying will not add the columns
            except Exception as e:   # connection refused, auth, DNS: report and retry
                if "EmbeddedServer" in str(e) or "Cannot lock file" in str(e):
                    raise   # another process holds this chdb path
                log.warning("ClickHouse not reachable (%s: %s); retrying in %.1fs", type(e).__name__, e, backoff.delay)
                if backoff.wait(self._stop):
                    return None
        return None


P = "tensortrace_bridge_"


class BridgeCollector:
    """The bridge's metrics, read from its counters at every scrape (docs/bridge.md lists them)."""

    def __init__(self, service: BridgeService):
        self.service = service

    def collect(self):
        svc = self.service
        s, core, view = svc.stats, svc.core.stats, svc.sink.view.stats
        req = CounterMetricFamily(P + "requests", "released requests turned into spans, by completeness state",
                                  labels=["state"])
        for state, n in sorted(s.requests.items()):
            req.add_metric([state], n)
        yield req
        skipped = CounterMetricFamily(P + "requests_skipped", "released requests that get no spans, by reason",
                                      labels=["reason"])
        for reason, n in sorted(s.skipped.items()):
            skipped.add_metric([reason], n)
        yield skipped
        spans = CounterMetricFamily(P + "spans", "spans accepted by a destination (re-sends included)",
                                    labels=["destination"])
        fails = CounterMetricFamily(P + "export_failures", "failed export attempts (retried)", labels=["destination"])
        for w in svc.writers.items:
            spans.add_metric([w.destination], w.stats.spans)
            fails.add_metric([w.destination], w.stats.failures)
        yield spans
        yield fails
        yield CounterMetricFamily(P + "messages", "Kafka messages read", value=core.messages)
        dl = CounterMetricFamily(P + "dead_letters", "messages sent to the dead-letter topic", labels=["reason"])
        for reason, n in sorted(core.dlq_by_reason.items()):
            dl.add_metric([reason], n)
        yield dl
        yield CounterMetricFamily(P + "duplicate_records", "re-delivered records collapsed by identity",
                                  value=view.duplicate_records)
        yield CounterMetricFamily(P + "late_records", "records that arrived after their request was released",
                                  value=view.late_records)
        busy = CounterMetricFamily(P + "busy_seconds", "time spent per stage", labels=["stage"])
        busy.add_metric(["decode"], core.decode_seconds)
        busy.add_metric(["derive"], s.derive_seconds)
        busy.add_metric(["write"], s.write_seconds)
        yield busy
        yield GaugeMetricFamily(P + "open_requests", "requests waiting for their records and summaries",
                                value=view.requests_open)
        yield CounterMetricFamily(P + "steps", "tensortrace.step spans made durable (--step-spans)", value=s.steps)
        yield CounterMetricFamily(P + "step_late_records", "records of a step whose span was already emitted",
                                  value=s.step_late_records)
        yield GaugeMetricFamily(P + "open_steps", "forward steps waiting for their linger time (--step-spans)",
                                value=svc.sink.open_steps)
        yield GaugeMetricFamily(P + "ready", "1 once a destination is open and the consumer holds partitions",
                                value=1.0 if svc.ready() else 0.0)
        yield lag_family(P, svc.core)   # the activation topic's consumer lag (tensortrace.consume.metrics)
        # the serving engine's spans: receiver (OTLP -> spans topic) and the spans-topic consumer
        rx = svc.receiver_stats
        with rx.lock:
            results, rejected = dict(rx.requests), dict(rx.rejected)
            rx_spans, rx_messages, rx_bytes, rx_seconds = rx.spans, rx.messages, rx.bytes, rx.publish_seconds
        req = CounterMetricFamily(P + "otlp_requests", "OTLP export requests received, by result "
                                  "(accepted: in Kafka; rejected: INVALID_ARGUMENT; unavailable: UNAVAILABLE)",
                                  labels=["result"])
        for result, n in sorted(results.items()):
            req.add_metric([result], n)
        yield req
        rej = CounterMetricFamily(P + "otlp_rejected", "OTLP export requests refused, by reason", labels=["reason"])
        for reason, n in sorted(rejected.items()):
            rej.add_metric([reason], n)
        yield rej
        yield CounterMetricFamily(P + "otlp_spans_received", "spans of accepted OTLP requests (in the spans topic)",
                                  value=rx_spans)
        yield CounterMetricFamily(P + "otlp_messages_published", "spans-topic messages Kafka acknowledged",
                                  value=rx_messages)
        yield CounterMetricFamily(P + "otlp_bytes_received", "bytes of accepted OTLP requests", value=rx_bytes)
        yield CounterMetricFamily(P + "otlp_publish_seconds", "time spent waiting for Kafka's acknowledgements",
                                  value=rx_seconds)
        yield GaugeMetricFamily(P + "otlp_kafka_connected", "1 while the receiver can publish to the spans topic",
                                value=1.0 if svc.publisher is not None and svc.publisher.connected else 0.0)
        espans = CounterMetricFamily(P + "engine_spans", "engine spans (spans topic) accepted by a destination "
                                     "(re-sends included)", labels=["destination"])
        efails = CounterMetricFamily(P + "engine_export_failures", "failed attempts to write engine spans (retried)",
                                     labels=["destination"])
        for w in svc.engine_writers.items:
            espans.add_metric([w.destination], w.stats.spans)
            efails.add_metric([w.destination], w.stats.failures)
        yield espans
        yield efails
        if svc.spans_core is not None:
            sc = svc.spans_core.stats
            yield CounterMetricFamily(P + "spans_topic_messages", "spans-topic messages read", value=sc.messages)
            sdl = CounterMetricFamily(P + "spans_dead_letters", "spans-topic messages sent to <spans topic>.dlq",
                                      labels=["reason"])
            for reason, n in sorted(sc.dlq_by_reason.items()):
                sdl.add_metric([reason], n)
            yield sdl
        ps = svc.probe_stats
        yield CounterMetricFamily(P + "probe_scores", "probe scores read off the probe scores topic", value=ps.scores)
        yield CounterMetricFamily(P + "probe_spans", "tensortrace.probe spans made durable (re-sends included)",
                                  value=ps.spans)
        pskip = CounterMetricFamily(P + "probe_scores_skipped", "probe scores without a span, by reason",
                                    labels=["reason"])
        for reason, n in sorted(ps.skipped.items()):
            pskip.add_metric([reason], n)
        yield pskip
        if svc.probe_core is not None:
            pdl = CounterMetricFamily(P + "probe_dead_letters", "probe scores messages sent to "
                                      "<probe scores topic>.dlq", labels=["reason"])
            for reason, n in sorted(svc.probe_core.stats.dlq_by_reason.items()):
                pdl.add_metric([reason], n)
            yield pdl
