"""`tensortrace bridge`: every captured request as spans in its own trace (OTLP and/or otel_traces).

    tensortrace bridge --kafka-bootstrap-servers kafka:9092 --otlp-endpoint otel-collector:4317
    tensortrace bridge --kafka-bootstrap-servers kafka:9092 --clickhouse-dsn http://user:pw@clickhouse:8123
    # + the serving engine's spans: SGLang --enable-trace --otlp-traces-endpoint <bridge>:4317 (on by default)

Flags: one per field of BridgeConfig (bridge/config.py) plus the service runtime's
(tensortrace.service.runtime); `tensortrace bridge --help` lists them. docs/bridge.md has the spans.
"""

from __future__ import annotations

import sys

from tensortrace.bridge.config import BridgeConfig
from tensortrace.bridge.service import BridgeService
from tensortrace.service.runtime import ServiceSpec

HTTP_PORT = 9467   # /healthz, /readyz, /metrics

SERVICE = ServiceSpec("bridge", BridgeConfig, BridgeService, http_port=HTTP_PORT,
                      description="Turn every captured request on the activation topic into OpenTelemetry spans "
                                  "in the request's own trace (OTLP, and/or otel_traces in ClickHouse); receive the serving "
                                  "engine's own spans over OTLP (through Kafka) into the same destinations.")


def main(argv: list[str] | None = None) -> int:
    return SERVICE.main(argv)


if __name__ == "__main__":
    sys.exit(main())
