"""tensortrace.devkafka without a broker: cluster and SASL_SSL properties, config errors, the sweep
of a dead cluster's data dir, the JVM class-data archive."""

from __future__ import annotations

import os

import pytest

from tensortrace.devkafka import LocalKafka, LocalKafkaCluster, LocalKafkaConfig, LocalKafkaError, broker_properties
from tensortrace.devkafka.broker import sweep_stale_data_dirs

pytestmark = pytest.mark.unit


def test_cluster_properties_replicate_and_add_the_sasl_ssl_listener():
    p = broker_properties(9092, 9093, "/tmp/x", node_id=2, voters="1@h:1,2@h:2,3@h:3", replication=3,
                          secure_port=9094, keystore="/k.p12", keystore_password="pw", plain_users={"u": "p"})
    assert p["node.id"] == "2" and p["controller.quorum.voters"] == "1@h:1,2@h:2,3@h:3"
    assert (p["default.replication.factor"], p["min.insync.replicas"], p["offsets.topic.replication.factor"],
            p["transaction.state.log.replication.factor"], p["transaction.state.log.min.isr"]) == ("3", "2", "3", "3", "2")
    assert "SASL_SSL://127.0.0.1:9094" in p["listeners"] and "SASL_SSL:SASL_SSL" in p["listener.security.protocol.map"]
    assert p["sasl.enabled.mechanisms"] == "SCRAM-SHA-512,SCRAM-SHA-256,PLAIN"
    assert p["inter.broker.listener.name"] == "PLAINTEXT"
    assert 'user_u="p"' in p["listener.name.sasl_ssl.plain.sasl.jaas.config"]
    single = broker_properties(9092, 9093, "/tmp/x")
    assert single["default.replication.factor"] == "1" and "sasl.enabled.mechanisms" not in single


def test_config_problems_are_named():
    with pytest.raises(LocalKafkaError, match="security must be one of"):
        LocalKafkaConfig(security="SSL").validate()
    with pytest.raises(LocalKafkaError, match="sasl_password may not contain"):
        LocalKafkaConfig(security="SASL_SSL", sasl_password='a"b').validate()
    with pytest.raises(LocalKafkaError, match="leave the ports 0"):
        LocalKafkaCluster(broker_port=9092)
    with pytest.raises(LocalKafkaError, match="no SASL_SSL listener"):
        LocalKafka().secure_bootstrap  # noqa: B018


def test_sweep_removes_a_dead_clusters_dir_but_not_a_live_one(tmp_path):
    import subprocess
    import sys

    dead_pid = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_pid.wait()
    for name, broker_pid in (("tensortrace-kafka-dead", dead_pid.pid), ("tensortrace-kafka-live", os.getpid())):
        d = tmp_path / name
        (d / "node-2").mkdir(parents=True)
        (d / "owner.pid").write_text(str(dead_pid.pid))
        (d / "node-2" / "broker.pid").write_text(str(broker_pid))   # a node outlived its owner
    assert sweep_stale_data_dirs(str(tmp_path)) == [str(tmp_path / "tensortrace-kafka-dead")]
    assert (tmp_path / "tensortrace-kafka-live").is_dir()


def test_class_data_archive_is_written_once_renamed_on_a_clean_stop_and_reused(tmp_path, monkeypatch):
    monkeypatch.delenv("TENSORTRACE_KAFKA_CDS", raising=False)
    libs = tmp_path / "libs"
    libs.mkdir()
    (libs / "kafka_2.13-4.1.1.jar").write_bytes(b"x")
    java = __import__("shutil").which("java") or "/bin/sh"
    a, b = LocalKafka(libs_dir=str(libs)), LocalKafka(libs_dir=str(libs))
    try:
        flags = a._cds_flags(java, dump=True)
        assert len(flags) == 2 and flags[0].startswith("-XX:ArchiveClassesAtExit=")
        assert b._cds_flags(java, dump=True) == []            # one writer at a time (lock file)
        tmp = flags[0].split("=", 1)[1]
        old = libs / ".cds" / "kafka-0000000000000000.jsa"   # made for other jars
        old.write_bytes(b"old")
        open(tmp, "wb").write(b"archive")                    # what the JVM writes at its clean exit
        a._end_cds_dump(keep=True)
        final = b._cds_flags(java, dump=True)
        assert final[0].startswith("-XX:SharedArchiveFile=") and os.path.exists(final[0].split("=", 1)[1])
        assert sorted(os.listdir(libs / ".cds")) == [os.path.basename(final[0].split("=", 1)[1])]
        (libs / "kafka-clients-4.1.1.jar").write_bytes(b"y")  # other jars: another archive
        assert b._cds_flags(java, dump=False) == []
        monkeypatch.setenv("TENSORTRACE_KAFKA_CDS", "0")
        assert a._cds_flags(java, dump=True) == []
    finally:
        a.close()
        b.close()
