"""One way to run a service: `tensortrace exporter`, `tensortrace loader`, `tensortrace query-server`
(and the bridge and probes to come) all start through `service_main`.

    def main(argv=None) -> int:
        return service_main("exporter", ExporterConfig, lambda cfg: Exporter(cfg).start(), argv,
                            http_port=9464)

What every service gets from it, the same way:
  1. flags generated from its config dataclass (service.config), plus the runtime's own below;
  2. validation that reports every problem at once and exits 2:
         tensortrace loader: config: kafka.bootstrap_servers (--kafka-bootstrap-servers): 'x' is not host:port
         tensortrace loader: config: ttl_days (--ttl-days): 0 < 1
  3. one log format on stderr; `--log-level`, `-v/--verbose` (DEBUG, and kafka-python's own log);
  4. `build(config)` makes the service object (a `Service`, below), which then runs on its own
     thread;
  5. one HTTP port (`--http-port`, alias `--metrics-port`; -1: none) with `/healthz` (its live()),
     `/readyz` (its ready()) and `/metrics` (its own CollectorRegistry, never the process-global one);
  6. its bound ports reported as one JSON line on stderr, again whenever they change (a port that
     opens once a backend is reachable), and in `--status-file` (JSON, replaced atomically):
         {"service": "loader", "ports": {"http": 9465, "query": 50052}}
  7. SIGTERM/SIGINT: `stop()`, then up to `--drain-timeout-s` for `run()` to deliver what is in
     flight and return; exit 0. Exit 1 when the drain overruns, `run()` fails, or the service stops
     by itself (Kubernetes restarts it); a second signal exits without waiting.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable

from prometheus_client import CollectorRegistry

from tensortrace.service.config import (ConfigError, FlagParser, Problems, config_from_namespace,
                                        flag_for_problem, flags_from_dataclass)
from tensortrace.service.endpoint import HttpEndpoint, http_security_problems
from tensortrace.service.security import EndpointSecurity, security_option

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@runtime_checkable
class Service(Protocol):
    """What a long-running service implements for service_main (and for tests that run it in-process).

    `run()` is called once, on a thread of its own; it blocks until `stop()` (called from another
    thread, e.g. on SIGTERM), then delivers what is in flight, releases what it holds and returns.
    `live()` / `ready()` answer the probes (cheap; may be called concurrently from HTTP threads);
    `ready()` may be False for a long time (waiting for a backend) without the service being dead.
    `registry` holds the service's metrics. `ports()` maps a name to each port it listens on
    ({"control": 50051}); the runtime adds "http". Optional: `not_ready_reason()` and
    `not_live_reason()`, the text of a failing probe's 503."""

    registry: CollectorRegistry

    def run(self) -> None: ...

    def stop(self) -> None: ...

    def live(self) -> bool: ...

    def ready(self) -> bool: ...

    def ports(self) -> dict[str, int]: ...


@dataclass
class RuntimeConfig:
    """Options every service has, handled by the runtime rather than by the service."""
    http_host: str = field(default="0.0.0.0", metadata={
        "aliases": ("--metrics-host",), "help": "address of /healthz, /readyz, /metrics (the pod IP for kubelet and Prometheus)"})
    http_port: int = field(default=-1, metadata={
        "aliases": ("--metrics-port",), "help": "port of /healthz, /readyz, /metrics; 0: ephemeral, -1: none"})
    status_file: str = field(default="", metadata={
        "help": "write {service, pid, ports} here as JSON once the ports are bound (tests, scripts)"})
    drain_timeout_s: float = field(default=25.0, metadata={
        "aliases": ("--drain-timeout",),
        "help": "on SIGTERM, seconds the service gets to deliver what is in flight (keep it under the pod's "
                "terminationGracePeriodSeconds, 30 by default)"})
    # TLS of the HTTP port and a token for /metrics, where asked (plain HTTP needs no opt-in: no
    # user data here): --http-tls-cert, --http-tls-key, --http-token-file (service/endpoint.py)
    http_security: EndpointSecurity = security_option("http", "HTTP endpoint (/metrics; /healthz and /readyz stay open)")
    log_level: str = field(default="INFO", metadata={"help": "DEBUG, INFO, WARNING, ERROR"})
    verbose: bool = field(default=False, metadata={
        "aliases": ("-v",), "help": "log at DEBUG, including the Kafka client's own log"})

    def problems(self) -> list[str]:
        p = Problems()
        p.check(-1 <= self.http_port <= 65535, "http_port", f"{self.http_port} is not a port (0: ephemeral, -1: none)")
        p.check(self.drain_timeout_s > 0, "drain_timeout_s", f"{self.drain_timeout_s} must be > 0")
        p.extend(http_security_problems(self.http_security), prefix="http_security.")
        p.check(self.log_level.upper() in LOG_LEVELS, "log_level",
                f"{self.log_level!r} is not one of {', '.join(LOG_LEVELS)}")
        return p.items


def configure_logging(runtime: RuntimeConfig) -> None:
    level = logging.DEBUG if runtime.verbose else getattr(logging, runtime.log_level.upper())
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr)
    logging.getLogger().setLevel(level)
    # kafka-python logs every failed reconnect; the services summarise those in their own lines
    logging.getLogger("kafka").setLevel(level if runtime.verbose else logging.CRITICAL)


def config_problems(cfg: Any) -> list[str]:
    """Every problem of a config: its problems() when it has one, else what validate() raises."""
    if hasattr(cfg, "problems"):
        return list(cfg.problems())
    try:
        cfg.validate()
    except ConfigError as e:
        return e.problems
    return []


def write_status_file(path: str, service: str, ports: dict[str, int]) -> None:
    """{"service", "pid", "ports": {...}}, plus "<name>_port" per port and "metrics_port" (= http),
    the keys the exporter's status file always had. Replaced atomically: a reader never sees half."""
    doc: dict[str, Any] = {"service": service, "pid": os.getpid(), "ports": ports}
    doc.update({f"{k}_port": v for k, v in ports.items()})
    if "http" in ports:
        doc["metrics_port"] = ports["http"]
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, path)


@dataclass(frozen=True)
class ServiceSpec:
    """A runnable service: its CLI name, config class, how to build it, its default HTTP port."""
    name: str                                   # `tensortrace <name>`; also the log and port lines
    config_cls: type
    build: Callable[[Any], Service]
    http_port: int = -1                         # default --http-port
    description: str = ""

    def runtime_defaults(self) -> RuntimeConfig:
        return RuntimeConfig(http_port=self.http_port)

    def parser(self) -> tuple[argparse.ArgumentParser, dict[str, str]]:
        """The command-line parser and {field path: flag} (runtime fields under "runtime.")."""
        p = FlagParser(prog=f"tensortrace {self.name}", description=self.description,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
        flags = flags_from_dataclass(self.config_cls, p.add_argument_group(f"{self.name} options"))
        runtime = flags_from_dataclass(RuntimeConfig, p.add_argument_group("service options (every service)"),
                                       defaults=self.runtime_defaults(), dest_prefix="runtime.")
        flags.update(runtime)
        return p, flags

    def parse(self, argv: list[str]) -> tuple[Any, RuntimeConfig]:
        """(config, runtime) from the command line. argparse errors exit 2 (naming the flag); every
        validation problem is raised together as one ConfigError."""
        p, flags = self.parser()
        ns = vars(p.parse_args(argv))
        cfg = config_from_namespace(self.config_cls, ns)
        runtime = config_from_namespace(RuntimeConfig, ns, prefix="runtime.", base=self.runtime_defaults())
        problems = [flag_for_problem(x, flags) for x in config_problems(cfg)]
        problems += [flag_for_problem("runtime." + x, flags).removeprefix("runtime.") for x in runtime.problems()]
        if problems:
            raise ConfigError(problems, f"tensortrace {self.name}: config")
        return cfg, runtime

    def print_problems(self, e: ConfigError) -> None:
        for problem in e.problems:
            print(f"tensortrace {self.name}: config: {problem}", file=sys.stderr)

    def main(self, argv: list[str] | None = None) -> int:
        argv = list(sys.argv[1:] if argv is None else argv)
        try:
            cfg, runtime = self.parse(argv)
        except ConfigError as e:
            self.print_problems(e)
            return 2
        configure_logging(runtime)
        log = logging.getLogger(f"tensortrace.{self.name}")
        runner = ServiceRunner(self.name, runtime)
        runner.install_signal_handlers()
        try:
            service = self.build(cfg)
        except ConfigError as e:
            self.print_problems(e)
            return 2
        except Exception:
            log.exception("%s: cannot start", self.name)
            return 1
        return runner.run(service)


def service_main(name: str, config_cls: type, build: Callable[[Any], Service], argv: list[str] | None = None,
                 *, http_port: int = -1, description: str = "") -> int:
    """Parse, validate, log, build, serve /healthz /readyz /metrics, report ports, run until
    SIGTERM/SIGINT, drain; the process's exit code. See the module docstring."""
    return ServiceSpec(name, config_cls, build, http_port, description).main(argv)


class ServiceRunner:
    """Runs one built service: its HTTP endpoint, its run() thread, port reports, signals, drain."""

    def __init__(self, name: str, runtime: RuntimeConfig):
        self.name = name
        self.runtime = runtime
        self.stopping = threading.Event()
        self.forced = threading.Event()
        self.error: BaseException | None = None
        self.log = logging.getLogger(f"tensortrace.{name}")

    def install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # in-process callers (tests) stop it through `stopping`

        def on_signal(signum, frame):
            if self.stopping.is_set():
                self.log.warning("%s: second %s: exiting without waiting for the drain", self.name,
                                 signal.Signals(signum).name)
                self.forced.set()
            self.stopping.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def _run(self, service: Service) -> None:
        try:
            service.run()
        except BaseException as e:  # reported by the main thread, which decides the exit code
            self.error = e
            self.log.exception("%s: run() failed", self.name)

    def ports(self, service: Service, endpoint: HttpEndpoint | None) -> dict[str, int]:
        ports = {"http": endpoint.port} if endpoint is not None else {}
        ports.update(service.ports())
        return ports

    def report(self, ports: dict[str, int]) -> None:
        print(json.dumps({"service": self.name, "ports": ports}), file=sys.stderr, flush=True)
        if self.runtime.status_file:
            write_status_file(self.runtime.status_file, self.name, ports)

    def run(self, service: Service) -> int:
        rt = self.runtime
        endpoint = None
        try:
            if rt.http_port >= 0:
                endpoint = HttpEndpoint(service, rt.http_host, rt.http_port, security=rt.http_security).start()
        except OSError as e:
            self.log.error("%s: cannot listen on %s:%d: %s", self.name, rt.http_host, rt.http_port, e)
            service.stop()
            return 1
        thread = threading.Thread(target=self._run, args=(service,), name=f"{self.name}-run", daemon=True)
        thread.start()
        try:
            reported = None
            while True:
                ports = self.ports(service, endpoint)
                if ports != reported:
                    self.report(ports)
                    reported = ports
                if not thread.is_alive() or self.stopping.wait(0.2):
                    break
            if not thread.is_alive():
                if self.error is None and not self.stopping.is_set():
                    self.log.error("%s: run() returned without being stopped", self.name)
                    return 1
                if isinstance(self.error, ConfigError):   # e.g. a certificate file broken after the config was checked
                    return 2
                return 1 if self.error is not None else 0
            self.log.info("%s: stopping; draining for up to %.0fs", self.name, rt.drain_timeout_s)
            service.stop()
            deadline = time.monotonic() + rt.drain_timeout_s
            while thread.is_alive() and time.monotonic() < deadline and not self.forced.is_set():
                thread.join(0.1)
            if thread.is_alive():
                self.log.error("%s: still draining after %.0fs; exiting anyway (undelivered work is "
                               "redelivered by whoever takes over)", self.name, rt.drain_timeout_s)
                return 1
            return 1 if self.error is not None else 0
        finally:
            if endpoint is not None:
                endpoint.stop()
