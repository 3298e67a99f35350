"""The bridge inside the loader (`tensortrace loader --bridge`, compose.py): its spans' retention
(`--bridge-traces-ttl-days`) reaches otel_traces in the loader's own engine (the real chDB), and its
receiver's authentication counters join the loader's registry."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry

from tensortrace.compose import LOADER, LoaderBridge
from tensortrace.service.config import ConfigError
from tensortrace.storage import ThreadSafeClient
from tensortrace.storage.retention import current_ttl

BASE = ["--kafka-bootstrap-servers", "127.0.0.1:9", "--clickhouse-dsn", "chdb:///tmp/not-opened", "--bridge",
        "--bridge-otlp-receiver-plaintext"]


def test_bridge_traces_ttl_days_is_a_loader_flag_passed_to_the_bridge():
    cfg, _ = LOADER.parse(BASE)
    assert cfg.bridge_config().traces_ttl_days == 7                 # the bridge's own default
    cfg, _ = LOADER.parse(BASE + ["--bridge-traces-ttl-days", "30"])
    assert cfg.bridge_config().traces_ttl_days == 30
    assert LOADER.parse(BASE + ["--bridge-traces-ttl-days", "0"])[0].bridge_config().traces_ttl_days == 0
    with pytest.raises(ConfigError) as e:
        LOADER.parse(BASE + ["--bridge-traces-ttl-days", "-1"])
    assert any(p.startswith("bridge_traces_ttl_days (--bridge-traces-ttl-days): -1 < 0") for p in e.value.problems), \
        e.value.problems


@pytest.mark.integration
def test_the_embedded_bridge_applies_its_ttl_to_otel_traces_in_the_loaders_engine(ch_client, ch_database):
    cfg, _ = LOADER.parse(BASE + ["--bridge-traces-ttl-days", "30", "--bridge-otlp-receiver-port", "0"])
    registry = CollectorRegistry()
    bridge = LoaderBridge(dataclasses.replace(cfg.bridge_config(), traces_database=ch_database),
                          security_registry=registry)
    bridge.use_loader_client(SimpleNamespace(client=ThreadSafeClient(ch_client)))
    assert bridge._open_clickhouse() is not None
    assert "toIntervalDay(30)" in current_ttl(ch_client, ch_database, "otel_traces")
    # the receiver's security counters are in the registry given (the loader's /metrics)
    assert registry.get_sample_value("tensortrace_security_auth_failures_total",
                                     {"endpoint": "otlp", "reason": "no_token"}) == 0
    assert bridge.registry.get_sample_value("tensortrace_security_auth_failures_total",
                                            {"endpoint": "otlp", "reason": "no_token"}) is None
