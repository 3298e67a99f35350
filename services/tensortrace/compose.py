"""Services that must share a process, assembled here so that no service package imports another
(tests/repo/test_repo_contracts.py checks the rule).

`tensortrace loader` = the loader (loader/, with its second consumer that loads the probe service's
scores topic into `probe_scores`: loader/scores.py, `--scores-consumer`) + the gRPC query service
(query/) over the loader's own ClickHouse client. An embedded chDB engine can be opened by one process only, so with
`chdb://` the loader process is the only one that can serve reads (docs/storage.md, "One engine
path per process"):

    tensortrace loader --kafka-bootstrap-servers kafka:9092 --clickhouse-dsn chdb:///var/lib/tensortrace/chdb \\
        --query-host 0.0.0.0 --query-port 50052 --query-tls-cert /tls/tls.crt --query-tls-key /tls/tls.key \\
        --query-token-file /tokens/tokens
    tensortrace show <trace-id> --server query:50052 --tls-ca ca.crt --token-file token
    tensortrace loader ... --query-port 50052 --query-plaintext            # 127.0.0.1, development

The query service is secured by the `--query-*` block, the bridge's OTLP receiver by the
`--bridge-otlp-receiver-*` block (service/security.py, docs/security.md).

The query port opens once ClickHouse is open (the runtime reports it then:
`{"service": "loader", "ports": {"http": 9465, "query": 50052}}`).

`--bridge` also runs the OTel bridge (bridge/) in this process, so that spans land in the loader's
own embedded engine (`otel_traces`; the only way with chDB, whose path one process owns): the spans
of every captured request, and the serving engine's own spans received over OTLP
(`--bridge-otlp-receiver-port`; SGLang `--enable-trace --otlp-traces-endpoint 127.0.0.1:4317`).
With chDB the bridge writes through the loader's client (one engine, one lock); with a server it
opens its own connection. The bridge's metrics join the loader's /metrics, its receiver port is
reported as "otlp", and /readyz waits for both:

    tensortrace loader --clickhouse-dsn chdb:///var/lib/tensortrace/chdb --query-port 50052 \\
        --bridge --bridge-otlp-receiver-port 4317 --bridge-traces-ttl-days 30

`--bridge-traces-ttl-days` is the spans' retention (the bridge's `--traces-ttl-days`, 7 by default),
applied to `otel_traces` when the bridge opens it. Both of the bridge's receivers take the
`--bridge-otlp-receiver-*` block; a bad certificate or token file there fails the loader's start
(exit 2) naming the flag.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from dataclasses import dataclass, fields

from tensortrace.bridge.config import DEFAULT_GROUP as BRIDGE_GROUP
from tensortrace.bridge.config import DEFAULT_SPANS_TOPIC, BridgeConfig
from tensortrace.bridge.service import BridgeCollector, BridgeService
from tensortrace.consume.config import ConsumerConfig
from tensortrace.loader.config import LoaderConfig
from tensortrace.loader.main import HTTP_PORT as LOADER_HTTP_PORT
from tensortrace.loader.main import LoaderService
from tensortrace.query.config import DEFAULT_QUERY_PORT
from tensortrace.service.config import ConfigError, option
from tensortrace.service.runtime import ServiceSpec
from tensortrace.service.security import EndpointSecurity, security_option
from tensortrace.storage import schema
from tensortrace.storage.otel import DEFAULT_OTEL_DATABASE, DEFAULT_TRACES_TABLE, apply_otel_schema
from tensortrace.storage.schema import check_identifier


@dataclass
class LoaderWithQueryConfig(LoaderConfig):
    query_host: str = option("127.0.0.1", "address of the gRPC query service (0.0.0.0: reachable through a Service)")
    query_port: int = option(-1, f"also serve the gRPC query service from this process's engine on this port "
                                 f"(the chart's {DEFAULT_QUERY_PORT}); 0: ephemeral, -1: off")
    query_otel_database: str = option(DEFAULT_OTEL_DATABASE, "where the query service reads spans for "
                                                             "`tensortrace trace --server` (the bridge's database)")
    query_traces_table: str = option(DEFAULT_TRACES_TABLE, "the spans table (`tensortrace trace --server`)")
    query_probe_table: str = option("probe_scores", "probe scores, [db.]table (`tensortrace trace --server`)")
    query_security: EndpointSecurity = security_option("query", "query service")

    bridge: bool = option(False, "also run the OTel bridge in this process: spans of every captured request and the "
                                 "engine's OTLP spans into this process's ClickHouse (otel_traces)")
    bridge_group_id: str = option(BRIDGE_GROUP, "the bridge's consumer group (--bridge)")
    bridge_otlp_receiver_host: str = option("127.0.0.1", "address of the bridge's OTLP/gRPC receiver (--bridge)")
    bridge_otlp_receiver_port: int = option(4317, "the bridge's OTLP/gRPC receiver for the engine's spans (--bridge); "
                                                  "0: ephemeral, -1: off")
    bridge_spans_topic: str = option(DEFAULT_SPANS_TOPIC, "Kafka topic of the received engine spans (--bridge)")
    bridge_request_timeout_s: float = option(30.0, "a request still missing records after this gets incomplete "
                                                   "spans (--bridge)")
    bridge_otlp_receiver_security: EndpointSecurity = security_option("bridge-otlp-receiver",
                                                                      "the bridge's OTLP/gRPC receiver (--bridge)")
    bridge_traces_ttl_days: int = option(schema.DEFAULT_TTL_DAYS, "span rows (otel_traces) older than this are "
                                                                  "dropped (--bridge); 0: kept forever")

    def problems(self) -> list[str]:
        out = super().problems()
        if not -1 <= self.query_port <= 65535:
            out.append(f"query_port: {self.query_port} is not a port (0: ephemeral, -1: off)")
        elif self.query_port >= 0:
            out += ["query_security." + p for p in self.query_security.problems(self.query_host, "query service")]
        for name in ("query_otel_database", "query_traces_table", "query_probe_table"):
            for part in getattr(self, name).split(".") if name == "query_probe_table" else [getattr(self, name)]:
                try:
                    check_identifier(part, "table" if name != "query_otel_database" else "database")
                except ValueError as e:
                    out.append(f"{name}: {e}")
        if self.bridge:
            out += [("bridge_" + p) if p.startswith(("otlp_receiver_security.", "traces_ttl_days:")) else f"bridge: {p}"
                    for p in self.bridge_config().problems()]
            if self.bridge_group_id == self.group_id:
                out.append("bridge_group_id: must differ from group_id (the bridge reads every request too)")
        return out

    def listen_ports(self) -> dict[str, int]:
        ports = {"query": self.query_port}
        if self.bridge:
            ports["otlp"] = self.bridge_otlp_receiver_port
        return ports

    def bridge_config(self) -> BridgeConfig:
        """The bridge's config: this loader's consumer settings (Kafka, topic, dead letters,
        batching, retries) in the bridge's own group, writing otel_traces to this ClickHouse."""
        return BridgeConfig(**{f.name: getattr(self, f.name) for f in fields(ConsumerConfig)} | dict(
            group_id=self.bridge_group_id, clickhouse_dsn=self.clickhouse_dsn,
            otlp_receiver_host=self.bridge_otlp_receiver_host, otlp_receiver_port=self.bridge_otlp_receiver_port,
            otlp_receiver_security=self.bridge_otlp_receiver_security, spans_topic=self.bridge_spans_topic,
            request_timeout_s=self.bridge_request_timeout_s, traces_ttl_days=self.bridge_traces_ttl_days))


class LoaderWithQuery:
    """A LoaderService that, once its Loader has opened ClickHouse, also serves the query API
    from the same client (the insert thread and the query handlers share it, serialised by
    ThreadSafeClient)."""

    def __init__(self, cfg: LoaderWithQueryConfig):
        self.cfg = cfg
        self.loader = LoaderService(cfg)
        self.registry = self.loader.registry
        self.query_server = None
        self.query_port = -1
        if cfg.query_port >= 0:
            self.loader.on_open.append(self._serve_query)
        self.bridge: LoaderBridge | None = None
        self._bridge_thread: threading.Thread | None = None
        if cfg.bridge:
            # its receiver's authentication counters join the loader's /metrics
            self.bridge = LoaderBridge(cfg.bridge_config(), security_registry=self.registry)
            self.loader.on_open.append(self.bridge.use_loader_client)
            self.registry.register(BridgeCollector(self.bridge))

    def _serve_query(self, loader) -> None:
        from tensortrace.query.server import serve
        from tensortrace.query.trace import safe_dsn

        cfg = self.cfg
        self.query_server, self.query_port = serve(loader.client, database=cfg.database, host=cfg.query_host,
                                                   port=cfg.query_port, otel_database=cfg.query_otel_database,
                                                   traces_table=cfg.query_traces_table,
                                                   probe_table=cfg.query_probe_table,
                                                   where=safe_dsn(cfg.clickhouse_dsn),
                                                   security=cfg.query_security, registry=self.registry)
        # the line devstack.processes.LoaderProcess waits for: reads may start now
        print(json.dumps({"query_service": f"{cfg.query_host}:{self.query_port}"}), file=sys.stderr, flush=True)

    def run(self) -> None:
        if self.bridge is not None:
            self._bridge_thread = threading.Thread(target=self._run_bridge, name="bridge-run", daemon=True)
            self._bridge_thread.start()
        try:
            self.loader.run()
        finally:
            if self.bridge is not None:   # its last spans are written before the engine goes away
                self.bridge.stop()
                self._bridge_thread.join(timeout=self.cfg.rebalance_flush_timeout_s + 10)
            if self.query_server is not None:
                self.query_server.stop(grace=1).wait()

    def _run_bridge(self) -> None:
        try:
            self.bridge.run()
        except ConfigError:   # logged by the bridge as one line per problem; /healthz says so
            pass
        except Exception:   # the loader keeps loading; live() turns false, /healthz says so
            log.exception("bridge: run() failed")

    def stop(self) -> None:
        if self.bridge is not None:
            self.bridge.stop()
        self.loader.stop()

    def live(self) -> bool:
        bridge_ok = self.bridge is None or self.bridge.stopping or self._bridge_thread is None or (
            self._bridge_thread.is_alive() and self.bridge.live())   # None: run() has not started it yet
        return self.loader.live() and bridge_ok

    def ready(self) -> bool:
        return self.loader.ready() and (self.bridge is None or self.bridge.ready())

    def not_ready_reason(self) -> str:
        if not self.loader.ready():
            return self.loader.not_ready_reason()
        return f"bridge: {self.bridge.not_ready_reason()}" if self.bridge is not None else ""

    def ports(self) -> dict[str, int]:
        out = {"query": self.query_port} if self.query_port >= 0 else {}
        if self.bridge is not None:
            out.update(self.bridge.ports())
        return out


class LoaderBridge(BridgeService):
    """The bridge service inside the loader process (`--bridge`). With an embedded chDB engine it
    writes through the loader's client, once the loader has opened it: a second client on the same
    engine would run its inserts concurrently with the loader's, outside ThreadSafeClient's lock."""

    flag_prefix = "bridge-otlp-receiver-security"

    def __init__(self, cfg: BridgeConfig, *, security_registry=None):
        super().__init__(cfg, security_registry=security_registry)
        self.loader_client = None
        self.loader_opened = threading.Event()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def use_loader_client(self, loader) -> None:
        """Loader.on_open (the loader's run thread): its client (a ThreadSafeClient) is open."""
        self.loader_client = loader.client
        self.loader_opened.set()

    def _open_clickhouse(self):
        if not self.cfg.clickhouse_dsn.startswith("chdb://"):
            return super()._open_clickhouse()   # a server: a connection of its own
        while not self.loader_opened.wait(0.2):
            if self._stop.is_set():
                return None
        apply_otel_schema(self.loader_client, self.cfg.traces_database, self.cfg.traces_ttl_days,
                          self.cfg.traces_table)
        self._client = self.loader_client
        return self._client


log = logging.getLogger("tensortrace.loader")

LOADER = ServiceSpec("loader", LoaderWithQueryConfig, LoaderWithQuery, http_port=LOADER_HTTP_PORT,
                     description=__doc__)
