"""`tensortrace exporter`, `tensortrace loader` and other services as subprocesses on 127.0.0.1, with
their endpoints.

    exp = ExporterProcess(ring_dir, kafka.bootstrap, "tensortrace.activations", workdir).start()
    exp.status()                                  # ExporterStatus over the control gRPC
    loader = LoaderProcess(["--bootstrap", kafka.bootstrap, "--clickhouse", "chdb:///tmp/ch", "--query-port", "0"])
    loader.wait_for_query_service()               # "127.0.0.1:PORT"; read through it with grpc://
    loader.metrics("tensortrace_bridge_")         # its /metrics samples ({'name{labels}': value})
    loader.kill(signal.SIGTERM); exp.stop()
    probes = ServiceProcess("probes", ["--kafka-bootstrap-servers", kafka.bootstrap, "--probe-dir", d], workdir)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def samples(exposition: str, prefix: str) -> dict[str, float]:
    """The samples of a Prometheus text exposition whose names start with `prefix`:
    {'name{labels}': value}."""
    out: dict[str, float] = {}
    for line in exposition.splitlines():
        if line.startswith(prefix) and " " in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


class ExporterProcess:
    """`tensortrace exporter` as a subprocess, with its control and metrics endpoints (ports from its
    status file)."""

    def __init__(self, ring_dir: str, bootstrap: str, topic: str, workdir: str, extra: list[str] | None = None,
                 python: str = sys.executable, control_client=None):
        self.ring_dir, self.bootstrap, self.topic = ring_dir, bootstrap, topic
        self.control_client = control_client   # a ClientSecurity for a secured control endpoint (extra=--control-tls-...)
        self.workdir = workdir
        self.extra = list(extra or [])
        self.python = python
        self.proc: subprocess.Popen | None = None
        self.log_path = os.path.join(workdir, "exporter.log")
        self.control_port = self.metrics_port = -1
        self.starts = 0

    def start(self, wait_s: float = 60.0) -> "ExporterProcess":
        status = os.path.join(self.workdir, "exporter.status.json")
        if os.path.exists(status):
            os.unlink(status)
        args = [self.python, "-m", "tensortrace.cli", "exporter", "--ring-dir", self.ring_dir,
                "--bootstrap-servers", self.bootstrap, "--topic", self.topic, "--control-port", "0",
                "--metrics-port", "0", "--metrics-host", "127.0.0.1", "--control-host", "127.0.0.1",
                "--status-file", status, "--scan-interval-s", "0.1",
                "--cleanup-grace-s", "1", "--linger-ms", "2",
                # the devstack's rings are flat (<ring dir>/*.ring, identity from the header): the
                # development opt-in; `extra=["--no-allow-flat-rings"]` runs the production default
                "--allow-flat-rings", *self.extra]
        if not any(a.startswith(("--control-tls-", "--control-security-tls-", "--control-plaintext")) for a in self.extra):
            args.append("--control-plaintext")   # loopback development: plaintext by explicit opt-in
        self.starts += 1
        log = open(self.log_path, "a")
        log.write(f"---- start {self.starts}\n")
        log.flush()
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        log.close()
        deadline = time.monotonic() + wait_s
        while not os.path.exists(status):
            if self.proc.poll() is not None:
                raise RuntimeError(f"exporter exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"exporter did not start:\n{self.log()}")
            time.sleep(0.05)
        with open(status) as f:
            st = json.load(f)
        self.control_port, self.metrics_port = st["control_port"], st["metrics_port"]
        return self

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    # -- endpoints -------------------------------------------------------------------------
    def status(self):
        """ExporterStatus (control.proto) from the control endpoint."""
        from tensortrace.service.security import ClientSecurity
        from tensortrace.v1 import control_pb2, control_pb2_grpc

        with (self.control_client or ClientSecurity()).channel(f"127.0.0.1:{self.control_port}") as ch:
            return control_pb2_grpc.ExporterControlStub(ch).GetStatus(control_pb2.GetStatusRequest(), timeout=10)

    def ring(self, name: str):
        for r in self.status().rings:
            if r.ring == name:
                return r
        return None

    def http(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}{path}", timeout=10) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def metrics(self, prefix: str = "tensortrace_exporter_") -> dict[str, float]:
        """Its /metrics samples whose names start with `prefix` ({'name{labels}': value})."""
        status, body = self.http("/metrics")
        return samples(body, prefix) if status == 200 else {}

    def wait_for(self, cond, timeout_s: float = 60.0, what: str = "condition"):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            v = cond()
            if v:
                return v
            if not self.alive():
                raise AssertionError(f"exporter died while waiting for {what}:\n{self.log()}")
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}; status:\n{self.status()}\nlog:\n{self.log()[-4000:]}")


class LoaderProcess:
    """`tensortrace loader <args>` as a subprocess; its stderr JSON lines are parsed as they come:
    `stats` (the latest --stats-interval snapshot), `query_address` (with --query-port)."""

    def __init__(self, args: list[str], python: str = sys.executable, log_path: str | None = None):
        self.log_path = log_path   # its stderr is also written here (the demo's work directory)
        if not any(a.split("=")[0] in ("--http-port", "--metrics-port") for a in args):
            args = [*args, "--http-port", "0"]   # an ephemeral /healthz,/metrics port: loaders side by side never collide
        if not any(a.split("=")[0] in ("--http-host", "--metrics-host") for a in args):
            args = [*args, "--http-host", "127.0.0.1"]   # loopback only, like every other port here
        # the query service and the bridge's receiver on loopback: plaintext by explicit opt-in,
        # unless the caller secures them (--query-tls-cert ..., docs/security.md)
        flags = {a.split("=")[0] for a in args}
        if "--query-port" in flags and not any(f.startswith(("--query-tls-", "--query-security-", "--query-plaintext"))
                                               for f in flags):
            args = [*args, "--query-plaintext"]
        if "--bridge" in flags and not any(f.startswith(("--bridge-otlp-receiver-tls-", "--bridge-otlp-receiver-security-",
                                                         "--bridge-otlp-receiver-plaintext")) for f in flags):
            args = [*args, "--bridge-otlp-receiver-plaintext"]
        self.proc = subprocess.Popen([python, "-m", "tensortrace.cli", "loader", *args],
                                     stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=REPO)
        self.stats: dict = {}
        self.final_stats: dict = {}
        self.query_address: str | None = None
        self.ports: dict[str, int] = {}
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        log = open(self.log_path, "a") if self.log_path else None
        try:
            self._read_lines(log)
        finally:
            if log is not None:
                log.close()

    def _read_lines(self, log):
        for line in self.proc.stderr:
            self.lines.append(line)
            if log is not None:
                log.write(line)
                log.flush()
            if line.startswith("{"):
                try:
                    doc = json.loads(line)
                except ValueError:
                    continue
                if "ports" in doc:   # the service runtime's port report
                    self.ports = dict(doc["ports"])
                    if "query" in self.ports:
                        self.query_address = f"127.0.0.1:{self.ports['query']}"
                elif "query_service" in doc:
                    self.query_address = doc["query_service"]
                elif "final_stats" in doc:
                    self.final_stats = doc["final_stats"]
                elif "tensor_rows" in doc:
                    self.stats = doc

    def wait_for_query_service(self, timeout_s: float = 60.0) -> str:
        """The query service's host:port once the loader has opened ClickHouse and serves it."""
        deadline = time.monotonic() + timeout_s
        while self.query_address is None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"loader exited with {self.proc.returncode}:\n{''.join(self.lines[-20:])}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"loader query service not up in {timeout_s:.0f}s:\n{''.join(self.lines[-20:])}")
            time.sleep(0.05)
        return self.query_address

    def metrics(self, prefix: str = "tensortrace_") -> dict[str, float]:
        """Its /metrics samples whose names start with `prefix` ({'name{labels}': value}); {} while
        the HTTP port is not reported or does not answer."""
        port = self.ports.get("http")
        if not port:
            return {}
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                body = resp.read().decode()
        except OSError:
            return {}
        return samples(body, prefix)

    def kill(self, sig=signal.SIGKILL):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.reader.join(timeout=10)


class ServiceProcess:
    """`tensortrace <service> <args>` as a subprocess on 127.0.0.1 (ports from its status file,
    /metrics over HTTP), e.g. the probe service:

        probes = ServiceProcess("probes", ["--kafka-bootstrap-servers", bootstrap, "--probe-dir", d], workdir)
        probes.wait_ready(); probes.metrics("tensortrace_probes_"); probes.stop()
    """

    def __init__(self, service: str, args: list[str], workdir: str, python: str = sys.executable):
        self.service = service
        self.status_path = os.path.join(workdir, f"{service}.status.json")
        self.log_path = os.path.join(workdir, f"{service}.log")
        if os.path.exists(self.status_path):
            os.unlink(self.status_path)
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen([python, "-m", "tensortrace.cli", service, *args, "--status-file", self.status_path,
                                      "--http-port", "0", "--http-host", "127.0.0.1"],
                                     stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        log.close()
        self.ports: dict[str, int] = {}

    def wait_ready(self, timeout_s: float = 90.0) -> dict[str, int]:
        """Its ports once /readyz answers 200 (it holds its partitions, its outputs are open)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.service} exited with {self.proc.returncode}:\n{self.log_tail()}")
            if os.path.exists(self.status_path):
                try:
                    with open(self.status_path) as f:
                        self.ports = json.load(f)["ports"]
                except (OSError, ValueError, KeyError):
                    self.ports = {}
                if self.ports.get("http") and self.http("/readyz")[0] == 200:
                    return self.ports
            time.sleep(0.2)
        raise TimeoutError(f"{self.service} not ready after {timeout_s:.0f}s: {self.http('/readyz')}\n{self.log_tail()}")

    def http(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['http']}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except (OSError, KeyError) as e:
            return 0, str(e)

    def metrics(self, prefix: str = "tensortrace_") -> dict[str, float]:
        status, body = self.http("/metrics")
        return samples(body, prefix) if status == 200 else {}

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(10)

    def log_tail(self, n: int = 40) -> str:
        try:
            with open(self.log_path) as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""
