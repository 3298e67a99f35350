"""`tensortrace query-server` configuration, and the query service's default port (one place:
the loader's embedded query service, the chart and the docs use the same 50052).

>>> cfg = QueryServerConfig(clickhouse_dsn="http://user:pw@clickhouse:8123",
...                         security=EndpointSecurity(plaintext=True)).validate()
>>> cfg.listen_ports()
{'query': 50052}
>>> QueryServerConfig().problems()[0]
'clickhouse_dsn: empty; give http(s)://user:password@host:port or chdb:///path'
>>> QueryServerConfig().problems()[1]
'security.tls_cert: the query service has no TLS: give tls_cert and tls_key, or opt into plaintext (development, loopback only)'

The endpoint's security (service/security.py, docs/security.md): `--tls-cert/--tls-key`
[`--tls-client-ca`] and `--token-file`; or `--plaintext` on a loopback address (development).
"""

from __future__ import annotations

from dataclasses import dataclass

from tensortrace.service.config import Problems, option, raise_problems
from tensortrace.service.security import EndpointSecurity, security_option
from tensortrace.storage import DEFAULT_DATABASE, check_identifier
from tensortrace.storage.otel import DEFAULT_OTEL_DATABASE, DEFAULT_TRACES_TABLE

DEFAULT_QUERY_PORT = 50052


@dataclass
class QueryServerConfig:
    clickhouse_dsn: str = option("", "http(s)://user:password@host:port, or a chdb:///path no loader holds "
                                     "(required; CLICKHOUSE_USER / CLICKHOUSE_PASSWORD also supply credentials)",
                                 aliases=("--clickhouse",))
    database: str = option(DEFAULT_DATABASE, "ClickHouse database")
    otel_database: str = option(DEFAULT_OTEL_DATABASE, "database of the spans table (`tensortrace trace --server`)")
    traces_table: str = option(DEFAULT_TRACES_TABLE, "the spans table (`tensortrace trace --server`)")
    probe_table: str = option("probe_scores", "probe scores table, [db.]table (`tensortrace trace --server`; "
                                              "skipped if absent)")
    query_host: str = option("127.0.0.1", "gRPC listen address", aliases=("--host",))
    query_port: int = option(DEFAULT_QUERY_PORT, "gRPC listen port; 0: ephemeral", aliases=("--port",))
    workers: int = option(4, "gRPC worker threads (concurrent reads)")
    retry_initial_s: float = option(0.2, "while ClickHouse is unreachable, retry after this, doubling ...")
    retry_max_s: float = option(10.0, "... up to this")
    security: EndpointSecurity = security_option("", "query service")

    def problems(self) -> list[str]:
        p = Problems()
        if p.check(bool(self.clickhouse_dsn), "clickhouse_dsn", "empty; give http(s)://user:password@host:port or chdb:///path"):
            p.check(self.clickhouse_dsn.startswith(("chdb://", "http://", "https://", "clickhouse://", "clickhouses://")),
                    "clickhouse_dsn", f"{self.clickhouse_dsn!r}: expected http(s)://user:password@host:port or chdb:///path")
        for name, value, kind in (("database", self.database, "database"),
                                  ("otel_database", self.otel_database, "database"),
                                  ("traces_table", self.traces_table, "table"),
                                  ("probe_table", self.probe_table.rpartition(".")[2], "table"),
                                  ("probe_table", self.probe_table.rpartition(".")[0] or self.database, "database")):
            try:
                check_identifier(value, kind)
            except ValueError as e:
                p.add(name, str(e))
        p.check(0 <= self.query_port <= 65535, "query_port", f"{self.query_port} is not a TCP port (0: ephemeral)")
        p.extend(self.security.problems(self.query_host, "query service"), prefix="security.")
        p.check(self.workers >= 1, "workers", f"{self.workers} < 1")
        p.check(0 < self.retry_initial_s <= self.retry_max_s, "retry_initial_s/retry_max_s",
                f"need 0 < {self.retry_initial_s} <= {self.retry_max_s}")
        return p.items

    def validate(self) -> "QueryServerConfig":
        return raise_problems(self, "query-server config")

    def listen_ports(self) -> dict[str, int]:
        return {"query": self.query_port}
