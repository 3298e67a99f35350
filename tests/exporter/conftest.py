"""Fixtures for exporter tests: an exporter *process* (`tensortrace exporter`, launched by
tensortrace.devstack.processes.ExporterProcess, with its control client). The ring directory and
the Kafka broker come from the shared `ring_dir`, `kafka_broker` and `fresh_topic` fixtures
(tests/conftest.py, a real Apache Kafka)."""

from __future__ import annotations

import pytest

from tensortrace.devstack.processes import ExporterProcess


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
