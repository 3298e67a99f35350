"""`tensortrace <command> [args]`: one CLI, one subcommand per service or tool.

A command is `module:attribute`, imported only when chosen (so `tensortrace loader` never imports
torch): a `ServiceSpec` (tensortrace.service.runtime) for a long-running service, which then
starts through the one service runtime, or a `main(argv) -> int` function for a tool.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "exporter": ("tensortrace.exporter.main:SERVICE", "drain the node's shared-memory rings into Kafka"),
    "exporterctl": ("tensortrace.exporter.ctl:main", "change capture selection / read status via an exporter's control endpoint"),
    "loader": ("tensortrace.compose:LOADER", "load the activations topic into ClickHouse (and serve reads: --query-port)"),
    "query-server": ("tensortrace.query.main:SERVICE", "serve the gRPC read-back API in front of ClickHouse"),
    "bridge": ("tensortrace.bridge.main:SERVICE", "turn captured requests into OpenTelemetry spans (OTLP, otel_traces)"),
    "probes": ("tensortrace.probes.main:SERVICE", "score every captured request with online probes (scores topic, alerts)"),
    "probe-train": ("tensortrace.devstack.probe_train:main", "train a probe from labelled requests (query SDK, a capture run, or bastioncorpus)"),
    "show": ("tensortrace.query.show:main", "print what was captured for a request (by trace id)"),
    "forget": ("tensortrace.query.forget:main", "delete one request's tensors, scores and spans everywhere (--trace-id / --request-id)"),
    "trace": ("tensortrace.query.trace:main", "one request end to end: timeline, where the time went, picture (--html/--png)"),
    "ring-dir": ("tensortrace.ring.ringdir:main", "prepare the ring directory (owner, group, setgid mode) for agents and the exporter"),
    "kafka": ("tensortrace.devkafka.main:main", "run a local Apache Kafka broker (development and tests)"),
    "demo": ("tensortrace.demo:main", "run the end-to-end demo"),
}


def resolve(name: str):
    """The object behind a command: a ServiceSpec or a main function."""
    module, _, attr = COMMANDS[name][0].partition(":")
    return getattr(importlib.import_module(module), attr)


def service_spec(name: str):
    """The ServiceSpec of a service command (`exporter`, `loader`, `query-server`)."""
    from tensortrace.service.runtime import ServiceSpec

    target = resolve(name)
    if not isinstance(target, ServiceSpec):
        raise KeyError(f"{name} is a tool, not a service")
    return target


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
    target = resolve(name)
    run = getattr(target, "main", target)   # ServiceSpec.main or the tool's main
    return int(run(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
