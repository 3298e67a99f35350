"""`tensortrace query-server`: the gRPC read-back API in front of a ClickHouse server (or a chDB
path no loader holds; with an embedded engine the loader serves it: tensortrace/compose.py).

    tensortrace query-server --clickhouse-dsn http://user:pw@clickhouse:8123 [--query-port 50052] \
        --tls-cert /tls/tls.crt --tls-key /tls/tls.key --token-file /tokens/tokens
    tensortrace query-server --clickhouse-dsn chdb:///tmp/ch --plaintext        # loopback development

Flags: one per field of QueryServerConfig (query/config.py) plus the service runtime's
(tensortrace.service.runtime); `--help` lists them.
"""

from __future__ import annotations

import logging
import sys
import threading

from prometheus_client import CollectorRegistry

from tensortrace.query.config import QueryServerConfig
from tensortrace.query.server import serve
from tensortrace.service.backoff import Backoff
from tensortrace.service.runtime import ServiceSpec

HTTP_PORT = 9466   # /healthz, /readyz, /metrics

log = logging.getLogger("tensortrace.query")


class QueryServer:
    """`tensortrace query-server` as a `tensortrace.service.Service`: connects to ClickHouse
    (backing off while it is unreachable), serves the gRPC API until stopped."""

    def __init__(self, cfg: QueryServerConfig):
        self.cfg = cfg.validate()
        self.registry = CollectorRegistry(auto_describe=True)
        self.server = None
        self.port = -1
        self._stop = threading.Event()

    def run(self) -> None:
        from tensortrace.storage import ThreadSafeClient, connect

        cfg = self.cfg
        backoff = Backoff(cfg.retry_initial_s, cfg.retry_max_s)
        while True:
            try:
                client = ThreadSafeClient(connect(cfg.clickhouse_dsn))
                break
            except Exception as e:  # connection refused, auth, DNS: report and retry
                log.warning("ClickHouse not reachable (%s: %s); retrying in %.1fs", type(e).__name__, e, backoff.delay)
                if backoff.wait(self._stop):
                    return
        from tensortrace.query.trace import safe_dsn

        self.server, self.port = serve(client, cfg.database, cfg.query_host, cfg.query_port, cfg.workers,
                                       otel_database=cfg.otel_database, traces_table=cfg.traces_table,
                                       probe_table=cfg.probe_table, where=safe_dsn(cfg.clickhouse_dsn),
                                       security=cfg.security, registry=self.registry)
        log.info("query service on %s:%d (database %s; %s)", cfg.query_host, self.port, cfg.database,
                 cfg.security.describe())
        self._stop.wait()
        self.server.stop(grace=2).wait()

    def stop(self) -> None:
        self._stop.set()

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return self.server is not None and not self._stop.is_set()

    def not_ready_reason(self) -> str:
        return "ClickHouse not reachable yet" if self.server is None else "stopping"

    def ports(self) -> dict[str, int]:
        return {"query": self.port} if self.port >= 0 else {}


SERVICE = ServiceSpec("query-server", QueryServerConfig, QueryServer, http_port=HTTP_PORT,
                      description="Serve the gRPC read-back API (proto/tensortrace/v1/query.proto) in front of ClickHouse.")


def main(argv: list[str] | None = None) -> int:
    return SERVICE.main(argv)


if __name__ == "__main__":
    sys.exit(main())
