"""The shared fixtures' guarantees, checked by running a small pytest session with tests/conftest.py:
GPU tests skip with a reason without CUDA, the backends are reported, a test that stops the broker
and fails does not break the next one, and no broker outlives the session."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tensortrace.testing.waiting import wait_for_exit

ROOT = Path(__file__).resolve().parents[2]

INNER_TESTS = '''
import os, pytest

@pytest.mark.gpu
def test_needs_a_gpu():
    import torch
    assert torch.cuda.is_available()

def test_stops_the_broker_and_fails(kafka_broker):
    kafka_broker.stop()
    assert False, "deliberate failure with the broker stopped"

def test_next_test_gets_a_running_broker(kafka_broker, fresh_topic):
    assert kafka_broker.running
    with open(os.environ["BROKER_PID_FILE"], "w") as f:
        f.write(str(kafka_broker.pid))  # the restarted broker: must be gone after the session
    assert fresh_topic().startswith("tt-")
'''


@pytest.mark.integration
@pytest.mark.slow
def test_inner_session_reports_backends_skips_gpu_recovers_broker_and_leaves_nothing(tmp_path):
    project = tmp_path / "project"
    (project / "tests").mkdir(parents=True)
    shutil.copy(ROOT / "tests" / "conftest.py", project / "tests" / "conftest.py")
    shutil.copy(ROOT / "pyproject.toml", project / "pyproject.toml")  # markers, strict-markers
    (project / "tests" / "test_inner.py").write_text(INNER_TESTS)
    pid_file = tmp_path / "broker.pid"
    env = {**os.environ, "TENSORTRACE_TEST_DOCKER": "0", "BROKER_PID_FILE": str(pid_file)}
    r = subprocess.run([sys.executable, "-m", "pytest", "-rs", "-p", "no:cacheprovider", "tests"],
                       cwd=project, env=env, capture_output=True, text=True, timeout=240)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out  # exactly the deliberate failure
    assert "tensortrace backends: kafka = local Apache Kafka" in out
    assert "kafka:      local Apache Kafka" in out and "clickhouse: not used by the selected tests" in out
    import torch

    if torch.cuda.is_available():
        assert "2 passed, 1 failed" in out or "1 failed, 2 passed" in out, out
    else:
        assert "needs CUDA: torch.cuda.is_available() is False" in out, out
        assert "1 failed, 1 passed, 1 skipped" in out, out
    assert "deliberate failure with the broker stopped" in out
    # The session's broker is gone once the inner pytest exited.
    broker_pid = int(pid_file.read_text())
    if not wait_for_exit(broker_pid, 20):
        pytest.fail(f"broker pid {broker_pid} outlived the test session")
