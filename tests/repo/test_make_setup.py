"""The Makefile's setup steps fail fast with one clear line when a tool is missing."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
MAKE = shutil.which("make")


def run_make(target: str, path_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    # PATH holds only what the test puts in path_dir; make itself is called by absolute path.
    env = {**os.environ, "PATH": str(path_dir)}
    return subprocess.run([MAKE, "-s", "-C", str(ROOT), target, *overrides], env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(MAKE is None, reason="make is not installed")
def test_kafka_jars_without_java_says_so(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    r = run_make("kafka-jars", bin_dir, f"KAFKA_LIBS={tmp_path / 'libs'}")
    assert r.returncode != 0
    assert "error: java not found (need Java 17+ to run the local Kafka broker)" in r.stdout + r.stderr
    assert not (tmp_path / "libs").exists()


@pytest.mark.skipif(MAKE is None or shutil.which("java") is None, reason="needs make and java")
def test_kafka_jars_without_maven_says_so(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "java").symlink_to(shutil.which("java"))
    r = run_make("kafka-jars", bin_dir, f"KAFKA_LIBS={tmp_path / 'libs'}")
    assert r.returncode != 0
    assert "error: mvn not found (need Maven to resolve the Kafka jars)" in r.stdout + r.stderr


@pytest.mark.skipif(MAKE is None, reason="make is not installed")
def test_setup_without_python_says_so(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # A venv path that does not exist forces the venv step to run.
    r = run_make("setup", bin_dir, f"VENV={tmp_path / 'venv'}", "PYTHON=python3-not-here")
    assert r.returncode != 0
    assert "error: python3-not-here not found (need Python >= 3.10)" in r.stdout + r.stderr
