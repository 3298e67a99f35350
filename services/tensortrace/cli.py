"""`tensortrace <service> [args]`: one CLI, one subcommand per service.

Each subcommand lives in its service's package as `main(argv) -> int`; it is imported only when
chosen, so `tensortrace loader` never imports torch.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "exporter": ("tensortrace.exporter.main", "drain the node's shared-memory rings into Kafka"),
    "exporterctl": ("tensortrace.exporter.ctl", "change capture selection / read status via an exporter's control endpoint"),
    "loader": ("tensortrace.loader.main", "load the activations topic into ClickHouse"),
    "query-server": ("tensortrace.query.server", "serve the gRPC read-back API"),
    "show": ("tensortrace.query.show", "print what was captured for a request (by trace id)"),
    "kafka": ("tensortrace.devkafka.main", "run a local Apache Kafka broker (development and tests)"),
    "demo": ("tensortrace.demo", "run the end-to-end demo"),
}


def usage() -> str:
    lines = ["usage: tensortrace <command> [args]", "", "commands:"]
    lines += [f"  {name:<14}{help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"tensortrace: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
