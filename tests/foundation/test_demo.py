"""`make demo` (tensortrace.demo): the round trip runs and proves bit-identity; failures are one line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def run_demo(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    # A subprocess: the demo opens its own chDB engine path, and chDB allows one per process.
    return subprocess.run([sys.executable, "-m", "tensortrace.demo", *args], capture_output=True,
                          text=True, timeout=240, env={**os.environ, **(env or {})})


def test_demo_round_trips_real_model_tensors_bit_identically(tmp_path):
    r = run_demo("--tokens", "8", "--ch-path", str(tmp_path / "ch"))
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "RESULT: all 5 tensors bit-identical" in out
    assert out.count(" yes\n") == 5 and " NO\n" not in out
    assert "consumed and reassembled 5 records from Kafka" in out
    assert "chDB embedded" in out and "broker stopped" in out
    assert (tmp_path / "ch").is_dir()  # the data really went into the embedded engine's files


def test_demo_without_kafka_jars_fails_with_one_line(tmp_path):
    r = run_demo(env={"TENSORTRACE_KAFKA_LIBS": str(tmp_path)})
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"error: Kafka broker jars not found in {tmp_path}: run `make kafka-jars`"]
