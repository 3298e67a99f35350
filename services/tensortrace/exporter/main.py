"""`tensortrace exporter [--ring-dir DIR] [--bootstrap-servers HOST:PORT] ...`

Runs until SIGTERM/SIGINT; then delivers what is in flight, releases it and exits 0.
Flags: one per field of ExporterConfig (tensortrace/exporter/config.py), `--help` lists them.
"""

from __future__ import annotations

import logging
import signal
import sys

from tensortrace.exporter.config import parse_args
from tensortrace.exporter.service import Exporter


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.CRITICAL)  # its retries are summarised by our own lines
    exporter = Exporter(cfg).start()
    signal.signal(signal.SIGTERM, lambda *_: exporter.stop())
    signal.signal(signal.SIGINT, lambda *_: exporter.stop())
    exporter.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
