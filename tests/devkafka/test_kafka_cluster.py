"""A real three-node Kafka cluster with a SASL_SSL listener (tensortrace.devkafka.LocalKafkaCluster),
and the clear errors of tensortrace.service.kafka.probe on it.

One cluster for tests/devkafka (conftest.py: started once, ~5 s on two cores). The SIGKILL test
restarts the node it killed before it returns, so the tests after it see three brokers again."""

from __future__ import annotations

import os
import stat
import threading
import time
import uuid

import pytest
from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import KafkaError

from tensortrace.devkafka import LocalKafka
from tensortrace.service.kafka import KafkaAuthError, KafkaConfig, KafkaUnavailable, probe
from tensortrace.testing.kafka import consume_all, create_topics, produce
from tensortrace.testing.waiting import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def cluster(kafka_cluster):
    return kafka_cluster


@pytest.fixture
def admin(cluster):
    a = KafkaAdminClient(bootstrap_servers=cluster.bootstrap, request_timeout_ms=30_000)
    yield a
    a.close()


def _topic(admin, partitions=3, rf=3, **configs) -> str:
    name = create_topics(admin.config["bootstrap_servers"], partitions, prefix="tt-cluster", replication=rf,
                         configs={k.replace("_", "."): str(v) for k, v in configs.items()})
    # create_topics saw every leader through its own client; this test's admin client may ask a
    # broker that has not applied the new topic's metadata yet (describe_topics then answers nothing)
    _wait(lambda: len([p for p in _partitions(admin, name) if p["leader"] >= 0]) == partitions, 30,
          f"{name}'s {partitions} partitions with a leader, as this admin client sees them")
    return name


def _partitions(admin, topic) -> list[dict]:
    try:
        [d] = admin.describe_topics([topic])
    except Exception:
        return []
    return [{"partition": p["partition_index"], "leader": p["leader_id"], "replicas": list(p["replica_nodes"]),
             "isr": list(p["isr_nodes"])} for p in d.get("partitions") or [] if p.get("error_code", 0) == 0]


def _wait(pred, timeout_s, what):
    assert wait_until(pred, timeout_s, 0.1), f"timed out after {timeout_s}s waiting for {what}"


# -- the cluster ---------------------------------------------------------------------------

def test_three_unfenced_brokers_with_replicated_test_defaults(cluster, admin):
    desc = admin.describe_cluster()
    assert sorted(b["broker_id"] for b in desc["brokers"]) == [1, 2, 3]
    assert not any(b.get("is_fenced") for b in desc["brokers"])
    assert cluster.bootstrap.count(",") == 2 and cluster.secure_bootstrap.count(",") == 2
    assert len({n.data_dir for n in cluster.brokers}) == 3 and all(n.running for n in cluster.brokers)
    # a topic created without a replication factor gets the cluster defaults: RF 3, min.insync 2
    name = f"tt-defaults-{uuid.uuid4().hex[:8]}"
    admin.create_topics([NewTopic(name, num_partitions=2, replication_factor=-1)])
    _wait(lambda: len(_partitions(admin, name)) == 2, 30, "the topic")
    assert all(len(p["replicas"]) == 3 for p in _partitions(admin, name))
    from kafka.admin import ConfigResource, ConfigResourceType

    def min_insync():
        # right after creation a broker may answer before the topic's configs are visible to it
        try:
            res = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, name, ["min.insync.replicas"])],
                                         config_filter="all")
        except KafkaError:
            return None
        entry = res.get("topic", {}).get(name, {}).get("min.insync.replicas")
        return entry.get("value") if isinstance(entry, dict) else entry
    assert wait_until(lambda: min_insync() is not None, 30, 0.2), "min.insync.replicas never visible"
    assert min_insync() == "2"


@pytest.mark.slow
def test_acks_all_through_a_sigkilled_and_restarted_broker_loses_and_duplicates_nothing(cluster, admin):
    """An idempotent acks=all producer sends without pause while the leader of partition 0 is
    SIGKILLed and later restarted: every send succeeds, and the topic holds exactly what was sent,
    in send order per partition."""
    partitions = 3
    topic = _topic(admin, partitions=partitions, rf=3, min_insync_replicas=2)
    victim_id = _partitions(admin, topic)[0]["leader"]
    victim = cluster.brokers[victim_id - 1]
    sent: list[tuple[bytes, bytes]] = []
    acked: list[tuple[int, int]] = []   # (partition, offset)
    failures: list[BaseException] = []
    stop = threading.Event()

    producer = KafkaProducer(bootstrap_servers=cluster.bootstrap, acks="all", enable_idempotence=True,
                             linger_ms=2, request_timeout_ms=5000, delivery_timeout_ms=60_000,
                             retry_backoff_ms=100, reconnect_backoff_ms=100, reconnect_backoff_max_ms=1000,
                             metadata_max_age_ms=5000)

    def send_forever():
        i = 0
        while not stop.is_set():
            key = f"k{i % 7}".encode()
            value = f"{i:06d}|".encode() + os.urandom(64)
            sent.append((key, value))
            fut = producer.send(topic, key=key, value=value)
            fut.add_callback(lambda md: acked.append((md.partition, md.offset)))
            fut.add_errback(failures.append)
            i += 1
            time.sleep(0.004)

    sender = threading.Thread(target=send_forever, name="acks-all-sender")
    sender.start()
    try:
        _wait(lambda: len(acked) >= 150 or failures, 60, "acks before the kill")
        victim.kill()                                    # SIGKILL, from this (the main) thread
        assert not victim.running
        n_at_kill = len(acked)
        _wait(lambda: len(acked) >= n_at_kill + 150 or failures, 60, "acks with one broker dead")
        victim.start()                                   # same ports and data; back once unfenced
        n_at_restart = len(acked)
        _wait(lambda: len(acked) >= n_at_restart + 150 or failures, 60, "acks after the restart")
    finally:
        stop.set()
        sender.join(30)
        producer.flush(90)
        producer.close(10)
    assert not failures, f"{len(failures)} sends failed, first: {failures[0]!r}"
    assert len(acked) == len(sent)
    # the restarted broker catches up: every partition has all three replicas in sync again
    _wait(lambda: all(len(p["isr"]) == 3 for p in _partitions(admin, topic)), 60, "the ISR to be 3 again")

    got = consume_all(cluster.bootstrap, topic, len(sent), partitions)
    flat = [kv for p in range(partitions) for kv in got[p]]
    assert len(flat) == len(sent), f"consumed {len(flat)} records, sent {len(sent)}"
    assert sorted(flat) == sorted(sent), "the records consumed are not the records sent"
    order = {v: i for i, (_, v) in enumerate(sent)}
    for p in range(partitions):  # per partition: exactly the send order
        idx = [order[v] for _, v in got[p]]
        assert idx == sorted(idx), f"partition {p} is not in send order"
    print(f"\n{len(sent)} records, broker {victim_id} (leader of partition 0) SIGKILLed after {n_at_kill} acks "
          f"and restarted after {n_at_restart} (restart {victim.last_start_s:.1f}s)")


# -- SASL_SSL --------------------------------------------------------------------------------

@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"])
def test_sasl_ssl_produce_consume_with_client_kwargs(cluster, admin, mechanism):
    kc = cluster.client_config(mechanism)
    assert kc.problems() == []
    assert (kc.security_protocol, kc.sasl_mechanism, kc.bootstrap_servers) == ("SASL_SSL", mechanism, cluster.secure_bootstrap)
    assert stat.S_IMODE(os.stat(kc.sasl_password_file).st_mode) == 0o600
    assert open(kc.ssl_cafile).read().startswith("-----BEGIN CERTIFICATE-----")
    topic = _topic(admin, partitions=2)
    values = [os.urandom(50 + i) for i in range(20)]
    client = kc.client_kwargs("tt-test")
    bootstrap = client.pop("bootstrap_servers")
    produce(bootstrap, topic, values, **client)
    got = consume_all(bootstrap, topic, len(values), 2, **client)
    assert sorted(v for p in got.values() for _, v in p) == sorted(values)


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-512", "PLAIN"])
def test_sasl_ssl_consume_with_rdkafka_conf_the_consumer_cores_client(cluster, admin, mechanism):
    # the consumer core reads with librdkafka: the same KafkaConfig, mapped by rdkafka_conf, must
    # authenticate, verify the brokers' certificate (hostname included) and read every record
    from confluent_kafka import Consumer

    kc = cluster.client_config(mechanism)
    conf = kc.rdkafka_conf("tt-test")
    assert (conf["security.protocol"], conf["sasl.mechanisms"], conf["ssl.ca.location"]) == ("SASL_SSL", mechanism, kc.ssl_cafile)
    assert conf["ssl.endpoint.identification.algorithm"] == "https"
    topic = _topic(admin, partitions=2)
    values = [os.urandom(40 + i) for i in range(12)]
    client = kc.client_kwargs("tt-test")
    produce(client.pop("bootstrap_servers"), topic, values, **client)
    c = Consumer({**conf, "group.id": f"g-{topic}", "auto.offset.reset": "earliest", "enable.auto.commit": False})
    try:
        c.subscribe([topic])
        got, deadline = [], time.monotonic() + 60
        while len(got) < len(values) and time.monotonic() < deadline:
            got += [m.value() for m in c.consume(100, 0.5) if m.error() is None]
    finally:
        c.close()
    assert sorted(got) == sorted(values)


def test_probe_on_good_credentials_names_the_server_and_the_brokers(cluster):
    r = probe(cluster.client_config(), timeout_s=10)
    assert r.server in cluster.secure_bootstrap.split(",") and r.brokers == 3
    assert cluster.client_config().check_connection(10).brokers == 3
    assert probe(KafkaConfig(bootstrap_servers=cluster.bootstrap), 10).brokers == 3


def test_wrong_password_is_a_clear_auth_error_within_a_bounded_time(cluster, tmp_path):
    wrong = tmp_path / "password"
    wrong.write_text("not-the-password\n")
    right = cluster.client_config().password()
    kc = cluster.client_config(sasl_password_file=str(wrong))
    t0 = time.monotonic()
    with pytest.raises(KafkaAuthError) as e:
        probe(kc, timeout_s=10)
    assert time.monotonic() - t0 < 5
    msg = str(e.value)
    assert msg.startswith(kc.describe()), msg            # the listener, the user and the mechanism
    assert f"as '{kc.sasl_username}' (SCRAM-SHA-512)" in msg
    assert "authentication failed: wrong password or unknown user" in msg
    assert right not in msg and "not-the-password" not in msg
    # an unknown user reads the same (the broker does not say which), PLAIN too
    with pytest.raises(KafkaAuthError, match="wrong password or unknown user"):
        probe(cluster.client_config(sasl_username="mallory"), timeout_s=10)
    with pytest.raises(KafkaAuthError, match=r"\(PLAIN\): authentication failed"):
        probe(cluster.client_config("PLAIN", sasl_password_file=str(wrong)), timeout_s=10)


def test_no_ca_is_a_clear_tls_error(cluster):
    kc = cluster.client_config(ssl_cafile="")
    t0 = time.monotonic()
    with pytest.raises(KafkaAuthError) as e:
        probe(kc, timeout_s=10)
    assert time.monotonic() - t0 < 5
    msg = str(e.value)
    assert msg.startswith(kc.describe())
    assert "TLS: certificate verify failed" in msg and "ssl_cafile" in msg, msg


def test_protocol_mismatches_and_unreachable_servers_are_named(cluster):
    with pytest.raises(KafkaAuthError, match="answered with TLS: it is a TLS listener"):
        probe(KafkaConfig(bootstrap_servers=cluster.brokers[0].secure_bootstrap), 5)
    with pytest.raises(KafkaAuthError, match="TLS: handshake with .* failed"):
        probe(cluster.client_config(bootstrap_servers=cluster.brokers[0].bootstrap), 5)
    kc = cluster.client_config(security_protocol="SSL", sasl_mechanism="", sasl_username="", sasl_password_file="")
    with pytest.raises(KafkaAuthError, match="expects SASL authentication"):
        probe(kc, 5)
    with pytest.raises(KafkaUnavailable, match="cannot connect: Connection refused") as e:
        probe(cluster.client_config(bootstrap_servers="127.0.0.1:1"), 5)
    assert not isinstance(e.value, KafkaAuthError)


def test_probe_tries_the_next_server_when_one_is_down(cluster):
    kc = cluster.client_config(bootstrap_servers="127.0.0.1:1," + cluster.brokers[2].secure_bootstrap)
    assert probe(kc, 10).server == cluster.brokers[2].secure_bootstrap


# -- one node with SASL_SSL ------------------------------------------------------------------

@pytest.mark.slow
def test_single_node_broker_with_sasl_ssl_and_a_restart(tmp_path):
    with LocalKafka(security="SASL_SSL") as k:
        kc = k.client_config()
        assert kc.bootstrap_servers == k.secure_bootstrap != k.bootstrap
        assert probe(kc, 10).brokers == 1
        client = kc.client_kwargs()
        bootstrap = client.pop("bootstrap_servers")
        produce(bootstrap, "tt-single", [b"before"], **client)
        k.stop()
        k.start()   # same ports, data, certificates and SCRAM credentials
        produce(bootstrap, "tt-single", [b"after"], **client)
        got = consume_all(bootstrap, "tt-single", 2, **client)
        assert [v for _, v in got[0]] == [b"before", b"after"]
        (tmp_path / "pw").write_text("wrong\n")
        with pytest.raises(KafkaAuthError, match="authentication failed"):
            probe(k.client_config(sasl_password_file=str(tmp_path / "pw")), 10)
