"""`tensortrace exporter [--ring-dir DIR] [--kafka-bootstrap-servers HOST:PORT] ...`

Drain the node's shared-memory rings into Kafka. Flags: one per field of ExporterConfig
(tensortrace/exporter/config.py) and the service runtime's (`--http-port`, `--status-file`,
`--drain-timeout-s`, `--log-level`); `--help` lists them. Runs until SIGTERM/SIGINT; then
delivers what is in flight, releases it and exits 0 (tensortrace.service.runtime).
"""

from __future__ import annotations

import sys

from tensortrace.exporter.config import ExporterConfig
from tensortrace.service.runtime import ServiceSpec

HTTP_PORT = 9464   # /healthz, /readyz, /metrics


def build(cfg: ExporterConfig):
    from tensortrace.exporter.service import Exporter

    return Exporter(cfg).start()


SERVICE = ServiceSpec("exporter", ExporterConfig, build, http_port=HTTP_PORT, description=__doc__)


def main(argv: list[str] | None = None) -> int:
    return SERVICE.main(argv)


if __name__ == "__main__":
    sys.exit(main())
