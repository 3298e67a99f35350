"""Shared fixtures: a real Kafka broker and a real ClickHouse engine for the whole session.

    def test_x(kafka_broker, fresh_topic, ch_client):
        topic = fresh_topic(partitions=3)            # unique, created, leaders elected
        KafkaProducer(bootstrap_servers=kafka_broker.bootstrap).send(topic, b"...")
        ch_client.command("CREATE TABLE t (x UInt8) ENGINE = MergeTree ORDER BY x")  # per-test database

    def test_y(tt_db, ring_dir):
        client, db = tt_db                           # the per-test database, migrated to the loader schema
        # ring_dir: an empty directory (mode 0700) for ring files

Fixtures live here when more than one test folder uses them; helpers that are plain functions
(topics, offsets, waits, test data) are in tensortrace.testing.

Backends: where a Docker engine answers, testcontainers' Kafka and ClickHouse server; otherwise the
local Apache Kafka broker (tensortrace.devkafka, jars from Maven Central) and chDB embedded through
clickhouse-connect's `chdb://` DSN. TENSORTRACE_TEST_DOCKER=0 forces the local ones. The header and
the summary of every run say which were used.

chDB allows one engine path per process, so the whole session shares one path (`ch_dsn`); each
test gets its own database (`ch_database`, dropped afterwards). Open extra clients only with
`ch_dsn` — a client on another chdb:// path in this process fails.

No broker outlives the run: fixture finalizers stop it, an atexit hook stops it, and the broker
process is told by the kernel to exit when this process dies (LocalKafkaConfig.die_with_parent).
"""

from __future__ import annotations

import os
import re
import signal
import time
import uuid

import pytest

from tensortrace.devkafka import LocalKafka, LocalKafkaError
from tensortrace.devkafka.container import ContainerKafka, docker_answers
from tensortrace.testing.kafka import admin_client, create_topics

_BACKENDS_KEY = pytest.StashKey[dict]()
_started_brokers: list = []  # the session broker once it started (for _broker_running_after_each_test)


def _use_docker() -> bool:
    if os.environ.get("TENSORTRACE_TEST_DOCKER", "") == "0":
        return False
    return docker_answers(timeout_s=2.0)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# -- session-wide setup / reporting --------------------------------------------------------

def pytest_configure(config: pytest.Config) -> None:
    # kafka-python loads its protocol schemas with a deprecated importlib.resources call (hundreds
    # of identical warnings per run that hide the ones worth reading).
    config.addinivalue_line("filterwarnings", r"ignore:(read|open)_text is deprecated:DeprecationWarning")
    docker = _use_docker()
    config.stash[_BACKENDS_KEY] = {
        "docker": docker,
        "kafka": "testcontainers Kafka (Docker)" if docker else "local Apache Kafka 4.1 (KRaft, Maven Central jars)",
        "clickhouse": "testcontainers ClickHouse server (Docker) over HTTP" if docker else "chDB embedded via clickhouse-connect chdb://",
        "kafka_used": None,
        "clickhouse_used": None,
    }
    # SIGTERM (a CI timeout, `kill`) becomes KeyboardInterrupt, so pytest tears fixtures down.
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        def _interrupt(signum, frame):
            raise KeyboardInterrupt(f"signal {signum}")
        signal.signal(signal.SIGTERM, _interrupt)


def pytest_report_header(config: pytest.Config) -> list[str]:
    b = config.stash[_BACKENDS_KEY]
    return [f"tensortrace backends: kafka = {b['kafka']}; clickhouse = {b['clickhouse']}"]


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    b = config.stash.get(_BACKENDS_KEY, None)
    if not b:
        return
    kafka = b["kafka_used"] or "not used by the selected tests"
    ch = b["clickhouse_used"] or "not used by the selected tests"
    terminalreporter.write_sep("-", "backends used")
    terminalreporter.write_line(f"kafka:      {kafka}")
    terminalreporter.write_line(f"clickhouse: {ch}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [it for it in items if it.get_closest_marker("gpu")]
    if gpu_items and not _cuda_available():
        skip = pytest.mark.skip(reason="needs CUDA: torch.cuda.is_available() is False on this machine")
        for it in gpu_items:
            it.add_marker(skip)


# -- Kafka ---------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def kafka_broker(request: pytest.FixtureRequest):
    """A real Kafka broker for the session: `.bootstrap`, `.stop()`, `.start()` (same address, same data)."""
    backends = request.config.stash[_BACKENDS_KEY]
    broker = ContainerKafka() if backends["docker"] else LocalKafka()
    request.addfinalizer(broker.close)  # registered before start: a failed start still cleans up
    request.addfinalizer(_started_brokers.clear)
    t0 = time.monotonic()
    try:
        broker.start()
    except LocalKafkaError as e:
        pytest.fail(f"could not start the Kafka broker: {e}", pytrace=False)
    _started_brokers.append(broker)
    backends["kafka_used"] = f"{broker.kind} at {broker.bootstrap} (ready in {time.monotonic() - t0:.1f}s)"
    return broker


@pytest.fixture(autouse=True)
def _broker_running_after_each_test(request: pytest.FixtureRequest):
    """A test that stopped the session broker and failed before restarting it must not break the next."""
    yield
    for broker in _started_brokers:
        if not broker.running:
            broker.start()


@pytest.fixture
def kafka_admin(kafka_broker):
    """A KafkaAdminClient for this test. Per test, not per session: after a broker outage a
    long-lived kafka-python client can sit in reconnect backoff for many seconds."""
    admin = admin_client(kafka_broker.bootstrap)
    yield admin
    admin.close()


def _safe_name(s: str, n: int = 40) -> str:
    return re.sub(r"[^a-zA-Z0-9_-]+", "-", s)[:n].strip("-") or "t"


@pytest.fixture
def fresh_topic(request: pytest.FixtureRequest, kafka_broker):
    """Factory: `fresh_topic(partitions=1, dlq=False, **configs)` creates a uniquely named topic (and
    `<name>.dlq` with dlq=True) and returns its name once every partition has a leader (retried
    while a just restarted broker cannot be reached). Config keys use underscores: retention_ms="1000"."""

    def make(partitions: int = 1, dlq: bool = False, **configs: str) -> str:
        kafka_broker.start()  # no-op while running
        return create_topics(kafka_broker.bootstrap, partitions, prefix=f"tt-{_safe_name(request.node.name)}",
                             dlq=dlq, configs={k.replace("_", "."): str(v) for k, v in configs.items()})

    return make


# -- ClickHouse ------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def ch_dsn(request: pytest.FixtureRequest, tmp_path_factory) -> str:
    """The session's ClickHouse DSN: `chdb://<tmp>/chdb` (embedded) or an http:// server (Docker)."""
    backends = request.config.stash[_BACKENDS_KEY]
    if backends["docker"]:
        from testcontainers.community.clickhouse import ClickHouseContainer

        container = ClickHouseContainer("clickhouse/clickhouse-server:25.8")
        container.start()
        request.addfinalizer(container.stop)
        host, port = container.get_container_host_ip(), container.get_exposed_port(8123)
        dsn = f"http://{container.username}:{container.password}@{host}:{port}"
        kind = f"ClickHouse server (testcontainers) at {host}:{port}"
    else:
        dsn = f"chdb://{tmp_path_factory.mktemp('chdb')}"
        kind = f"chDB embedded at {dsn}"
    import clickhouse_connect

    client = clickhouse_connect.get_client(dsn=dsn)
    version = client.query("SELECT version()").result_rows[0][0]
    backends["clickhouse_used"] = f"{kind} (ClickHouse {version})"
    request.addfinalizer(client.close)  # keeps the embedded engine open for the whole session
    return dsn


@pytest.fixture(scope="session")
def clickhouse_dsn(ch_dsn) -> str:
    """Alias of ch_dsn."""
    return ch_dsn


@pytest.fixture
def ch_database(request: pytest.FixtureRequest, ch_dsn) -> str:
    """A fresh database for this test (dropped afterwards)."""
    import clickhouse_connect

    name = f"t_{_safe_name(request.node.name, 30).replace('-', '_')}_{uuid.uuid4().hex[:8]}"
    admin = clickhouse_connect.get_client(dsn=ch_dsn)
    admin.command(f"CREATE DATABASE {name}")
    yield name
    try:
        admin.command(f"DROP DATABASE IF EXISTS {name} SYNC")
    finally:
        admin.close()


@pytest.fixture
def ch_client(ch_dsn, ch_database):
    """A clickhouse-connect client whose default database is this test's own (`ch_client.database`)."""
    import clickhouse_connect

    client = clickhouse_connect.get_client(dsn=ch_dsn, database=ch_database)
    yield client
    client.close()


@pytest.fixture
def tt_db(ch_client, ch_database):
    """(client, database): this test's own database, migrated to the loader schema."""
    from tensortrace.storage.schema import apply_migrations

    apply_migrations(ch_client, ch_database)
    return ch_client, ch_database


# -- rings ---------------------------------------------------------------------------------------

@pytest.fixture
def ring_dir(tmp_path) -> str:
    """An empty directory for ring files, mode 0700 (as the capture agent creates one)."""
    d = tmp_path / "rings"
    d.mkdir(mode=0o700)
    return str(d)
