"""One way to run a service (tensortrace.service.runtime): probes and metrics on one HTTP port from
the service's own registry, ports reported as one JSON line and a status file, SIGTERM -> stop ->
bounded drain -> exit 0; bad configuration -> exit 2 listing every problem."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import pytest
from prometheus_client import CollectorRegistry, Counter

from tensortrace.service.config import Problems
from tensortrace.service.runtime import RuntimeConfig, Service, ServiceRunner, ServiceSpec, service_main
from tensortrace.testing.waiting import wait_until

pytestmark = pytest.mark.unit
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class FakeService:
    def __init__(self, drain_s: float = 0.0, fail: Exception | None = None):
        self.registry = CollectorRegistry()
        self.steps = Counter("fake_steps", "steps taken", registry=self.registry)
        self.drain_s, self.fail = drain_s, fail
        self.is_ready = False
        self.drained = False
        self.open_ports: dict[str, int] = {}
        self._stop = threading.Event()

    def run(self):
        if self.fail:
            raise self.fail
        self.steps.inc()
        self._stop.wait()
        time.sleep(self.drain_s)
        self.drained = True

    def stop(self):
        self._stop.set()

    def live(self):
        return True

    def ready(self):
        return self.is_ready

    def not_ready_reason(self):
        return "warming up"

    def ports(self):
        return dict(self.open_ports)


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _start(service, tmp_path, **runtime):
    runner = ServiceRunner("fake", RuntimeConfig(http_host="127.0.0.1", http_port=0,
                                                 status_file=str(tmp_path / "st.json"), **runtime))
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("rc", runner.run(service)), daemon=True)
    t.start()
    return runner, t, result


def _status(tmp_path):
    p = tmp_path / "st.json"
    return json.loads(p.read_text()) if p.exists() else None


def test_a_fake_service_satisfies_the_protocol():
    assert isinstance(FakeService(), Service)


def test_probes_and_metrics_on_one_port_ports_reported_and_stop_drains(tmp_path, capsys):
    svc = FakeService(drain_s=0.2)
    runner, t, result = _start(svc, tmp_path)
    st = wait_until(lambda: _status(tmp_path), 20, 0.02)
    assert st, "no status file"
    port = st["ports"]["http"]
    assert (st["service"], st["pid"], st["http_port"], st["metrics_port"]) == ("fake", os.getpid(), port, port)
    assert _get(port, "/healthz") == (200, "ok\n")
    assert _get(port, "/readyz") == (503, "warming up\n")
    svc.is_ready = True
    assert _get(port, "/readyz") == (200, "ready\n")
    code, text = _get(port, "/metrics")
    assert code == 200 and "fake_steps_total 1.0" in text
    assert "python_gc_objects_collected_total" not in text, "/metrics serves the service's registry, not the global one"
    assert _get(port, "/nope")[0] == 404
    svc.open_ports = {"query": 50052}   # a port opened later is reported again
    assert wait_until(lambda: _status(tmp_path)["ports"] == {"http": port, "query": 50052}, 20, 0.02)
    runner.stopping.set()               # what SIGTERM does
    t.join(10)
    assert result["rc"] == 0 and svc.drained
    lines = [json.loads(x) for x in capsys.readouterr().err.splitlines() if x.startswith("{")]
    assert lines == [{"service": "fake", "ports": {"http": port}},
                     {"service": "fake", "ports": {"http": port, "query": 50052}}]


def test_a_drain_longer_than_the_timeout_exits_1(tmp_path):
    svc = FakeService(drain_s=30)
    runner, t, result = _start(svc, tmp_path, drain_timeout_s=0.3)
    assert wait_until(lambda: _status(tmp_path), 20, 0.02), "no status file"
    t0 = time.monotonic()
    runner.stopping.set()
    t.join(10)
    assert result["rc"] == 1 and time.monotonic() - t0 < 5 and not svc.drained


def test_a_failing_run_exits_1(tmp_path):
    runner, t, result = _start(FakeService(fail=RuntimeError("boom")), tmp_path)
    t.join(10)
    assert result["rc"] == 1


@dataclass
class TinyConfig:
    size: int = 1
    name: str = "n"

    def problems(self):
        p = Problems()
        p.check(self.size > 0, "size", f"{self.size} must be > 0")
        p.check(self.name.isidentifier(), "name", f"{self.name!r} is not a name")
        return p.items


def test_bad_configuration_exits_2_listing_every_problem_with_its_flag(capsys):
    built = []
    rc = service_main("tiny", TinyConfig, built.append, ["--size", "0", "--name", "a b", "--drain-timeout-s", "0"])
    assert rc == 2 and not built
    assert capsys.readouterr().err.splitlines() == [
        "tensortrace tiny: config: size (--size): 0 must be > 0",
        "tensortrace tiny: config: name (--name): 'a b' is not a name",
        "tensortrace tiny: config: drain_timeout_s (--drain-timeout-s): 0.0 must be > 0",
    ]


def test_every_service_has_the_runtime_flags_and_its_own_http_port():
    spec = ServiceSpec("tiny", TinyConfig, FakeService, http_port=9999)
    cfg, runtime = spec.parse(["--size", "2", "--metrics-port", "0", "-v", "--drain-timeout", "3"])
    assert (cfg.size, runtime.http_port, runtime.verbose, runtime.drain_timeout_s) == (2, 0, True, 3.0)
    assert spec.parse([])[1].http_port == 9999


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_sigterm_stops_a_real_service_process_with_exit_0(tmp_path):
    """`tensortrace query-server` against a ClickHouse that is not there: alive, not ready (the reason
    says why), backing off; SIGTERM ends the backoff at once and the process exits 0."""
    status = tmp_path / "st.json"
    p = subprocess.Popen([sys.executable, "-m", "tensortrace.cli", "query-server", "--clickhouse-dsn",
                          f"http://u:p@127.0.0.1:{_free_port()}", "--http-port", "0", "--http-host", "127.0.0.1",
                          "--status-file", str(status), "--plaintext"], cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: status.exists() or p.poll() is not None, 60, 0.02)
        assert p.poll() is None, p.stderr.read()
        port = json.loads(status.read_text())["ports"]["http"]
        assert _get(port, "/healthz")[0] == 200
        assert _get(port, "/readyz") == (503, "ClickHouse not reachable yet\n")
        p.send_signal(signal.SIGTERM)
        assert p.wait(20) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
    err = p.stderr.read()
    assert json.dumps({"service": "query-server", "ports": {"http": port}}) in err
