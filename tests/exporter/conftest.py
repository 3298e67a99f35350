"""Fixtures for exporter tests: an exporter *process* (`tensortrace exporter`, launched by
tensortrace.devstack.processes.ExporterProcess, with its control client), and a ring directory.
The Kafka broker comes from the shared `kafka_broker` / `fresh_topic` fixtures (tests/conftest.py,
a real Apache Kafka)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from tensortrace.devstack.processes import ExporterProcess  # noqa: E402


@pytest.fixture
def ring_dir(tmp_path):
    d = tmp_path / "rings"
    d.mkdir(mode=0o700)
    return str(d)


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
