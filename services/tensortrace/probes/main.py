"""`tensortrace probes`: score every captured request with the probes of a directory, live.

    tensortrace probes --kafka-bootstrap-servers kafka:9092 --probe-dir /etc/tensortrace/probes
    curl -s 127.0.0.1:9468/metrics | grep tensortrace_probes_alerts_total

Flags: one per field of ProbesConfig (probes/config.py) plus the service runtime's
(tensortrace.service.runtime); `tensortrace probes --help` lists them. docs/probes.md, "The service".
"""

from __future__ import annotations

import sys

from tensortrace.probes.config import ProbesConfig
from tensortrace.probes.service import ProbesService
from tensortrace.service.runtime import ServiceSpec

HTTP_PORT = 9468   # /healthz, /readyz, /metrics (the bridge has 9467)

SERVICE = ServiceSpec("probes", ProbesConfig, ProbesService, http_port=HTTP_PORT,
                      description="Score every captured request on the activation topic with the probes of a "
                                  "directory (hot-reloaded); publish tensortrace.v1.ProbeScore to the scores topic "
                                  "and flagged requests to the escalation topic; Prometheus metrics.")


def main(argv: list[str] | None = None) -> int:
    return SERVICE.main(argv)


if __name__ == "__main__":
    sys.exit(main())
