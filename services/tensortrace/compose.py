"""Services that must share a process, assembled here so that no service package imports another
(tests/repo/test_repo_contracts.py checks the rule).

`tensortrace loader` = the loader (loader/) + the gRPC query service (query/) over the loader's
own ClickHouse client. An embedded chDB engine can be opened by one process only, so with
`chdb://` the loader process is the only one that can serve reads (docs/storage.md, "One engine
path per process"):

    tensortrace loader --kafka-bootstrap-servers kafka:9092 --clickhouse-dsn chdb:///var/lib/tensortrace/chdb \\
        --query-host 0.0.0.0 --query-port 50052
    tensortrace show <trace-id> --server 127.0.0.1:50052

The query port opens once ClickHouse is open (the runtime reports it then:
`{"service": "loader", "ports": {"http": 9465, "query": 50052}}`).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

from tensortrace.loader.config import LoaderConfig
from tensortrace.loader.main import HTTP_PORT as LOADER_HTTP_PORT
from tensortrace.loader.main import LoaderService
from tensortrace.query.config import DEFAULT_QUERY_PORT
from tensortrace.service.config import option
from tensortrace.service.runtime import ServiceSpec


@dataclass
class LoaderWithQueryConfig(LoaderConfig):
    query_host: str = option("127.0.0.1", "address of the gRPC query service (0.0.0.0: reachable through a Service)")
    query_port: int = option(-1, f"also serve the gRPC query service from this process's engine on this port "
                                 f"(the chart's {DEFAULT_QUERY_PORT}); 0: ephemeral, -1: off")

    def problems(self) -> list[str]:
        out = super().problems()
        if not -1 <= self.query_port <= 65535:
            out.append(f"query_port: {self.query_port} is not a port (0: ephemeral, -1: off)")
        return out

    def listen_ports(self) -> dict[str, int]:
        return {"query": self.query_port}


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

    def _serve_query(self, loader) -> None:
        from tensortrace.query.server import serve

        cfg = self.cfg
        self.query_server, self.query_port = serve(loader.client, database=cfg.database, host=cfg.query_host,
                                                   port=cfg.query_port)
        # the line devstack.processes.LoaderProcess waits for: reads may start now
        print(json.dumps({"query_service": f"{cfg.query_host}:{self.query_port}"}), file=sys.stderr, flush=True)

    def run(self) -> None:
        try:
            self.loader.run()
        finally:
            if self.query_server is not None:
                self.query_server.stop(grace=1).wait()

    def stop(self) -> None:
        self.loader.stop()

    def live(self) -> bool:
        return self.loader.live()

    def ready(self) -> bool:
        return self.loader.ready()

    def not_ready_reason(self) -> str:
        return self.loader.not_ready_reason()

    def ports(self) -> dict[str, int]:
        return {"query": self.query_port} if self.query_port >= 0 else {}


LOADER = ServiceSpec("loader", LoaderWithQueryConfig, LoaderWithQuery, http_port=LOADER_HTTP_PORT,
                     description=__doc__)
