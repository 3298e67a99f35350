"""Fixtures for exporter tests: an exporter *process* (`tensortrace exporter`), its control client,
and a ring directory. The Kafka broker comes from the shared `kafka_broker` / `fresh_topic` fixtures
(tests/conftest.py, a real Apache Kafka)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest

sys.path.insert(0, os.path.dirname(__file__))

from tensortrace.v1 import control_pb2, control_pb2_grpc  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def ring_dir(tmp_path):
    d = tmp_path / "rings"
    d.mkdir(mode=0o700)
    return str(d)


class ExporterProcess:
    """`tensortrace exporter` as a subprocess, with its control and metrics endpoints."""

    def __init__(self, ring_dir: str, bootstrap: str, topic: str, workdir: str, extra: list[str] | None = None):
        self.ring_dir, self.bootstrap, self.topic = ring_dir, bootstrap, topic
        self.workdir = workdir
        self.extra = list(extra or [])
        self.proc: subprocess.Popen | None = None
        self.log_path = os.path.join(workdir, "exporter.log")
        self.control_port = self.metrics_port = -1
        self.starts = 0

    def start(self, wait_s: float = 60.0) -> "ExporterProcess":
        status = os.path.join(self.workdir, "exporter.status.json")
        if os.path.exists(status):
            os.unlink(status)
        args = [sys.executable, "-m", "tensortrace.cli", "exporter", "--ring-dir", self.ring_dir,
                "--bootstrap-servers", self.bootstrap, "--topic", self.topic, "--control-port", "0",
                "--metrics-port", "0", "--metrics-host", "127.0.0.1", "--control-host", "127.0.0.1", "--status-file", status, "--scan-interval-s", "0.1",
                "--cleanup-grace-s", "1", "--linger-ms", "2", *self.extra]
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
    def status(self) -> control_pb2.ExporterStatus:
        with grpc.insecure_channel(f"127.0.0.1:{self.control_port}") as ch:
            return control_pb2_grpc.ExporterControlStub(ch).GetStatus(control_pb2.GetStatusRequest(), timeout=10)

    def ring(self, name: str) -> control_pb2.RingStatus | None:
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


@pytest.fixture
def exporter_factory(tmp_path):
    """exporter_factory(ring_dir, bootstrap, topic, extra=[...]) -> started ExporterProcess (stopped at teardown)."""
    started = []

    def make(ring_dir, bootstrap, topic, extra=None, start=True):
        e = ExporterProcess(ring_dir, bootstrap, topic, str(tmp_path), extra)
        started.append(e)
        return e.start() if start else e

    yield make
    for e in started:
        e.stop()
