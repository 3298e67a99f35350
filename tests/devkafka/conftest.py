"""One three-node Kafka cluster (with a SASL_SSL listener) for every test in tests/devkafka/.

`kafka_cluster` is module-scoped for pytest, but the modules share one cluster: it starts with the
first test that asks for it and stops after the last test of the session that asks for it (not at
the session's end, so the rest of the suite does not run next to three idle JVMs)."""

from __future__ import annotations

import pytest

from tensortrace.devkafka import LocalKafkaCluster, LocalKafkaError

_shared: dict = {}


@pytest.fixture(scope="module")
def kafka_cluster(request: pytest.FixtureRequest):
    cluster = _shared.get("cluster")
    if cluster is None:
        cluster = LocalKafkaCluster(security="SASL_SSL")
        try:
            cluster.start()
        except LocalKafkaError as e:
            cluster.close()
            pytest.fail(f"could not start the Kafka cluster: {e}", pytrace=False)
        _shared["cluster"] = cluster
        print(f"\nKafka cluster of {len(cluster.brokers)} nodes ready in {cluster.last_start_s:.1f}s ("
              + ", ".join(f"{k} {v:.1f}s" for k, v in cluster.start_phases.items()) + ")")
    yield cluster
    for n in cluster.brokers:  # a test that failed between kill() and start() must not break the next
        if not n.running:
            n.start()
    items = request.session.items
    mine = [i for i, it in enumerate(items) if it.module is request.module]
    later = items[mine[-1] + 1:] if mine else []
    if not any("kafka_cluster" in getattr(it, "fixturenames", ()) for it in later):
        _shared.pop("cluster", None)
        cluster.close()
