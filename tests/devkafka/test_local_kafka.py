"""The local Kafka broker (tensortrace.devkafka) and the shared Kafka / ClickHouse fixtures."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from tensortrace.devkafka import LocalKafka, LocalKafkaConfig, LocalKafkaError
from tensortrace.devkafka.broker import sweep_stale_data_dirs
from tensortrace.testing.kafka import consume_all, produce
from tensortrace.testing.waiting import wait_for_exit

pytestmark = pytest.mark.integration


def test_produce_consume_round_trip_on_a_real_broker(kafka_broker, fresh_topic):
    topic = fresh_topic(partitions=3)
    values = [os.urandom(100 + i) for i in range(30)]
    produce(kafka_broker.bootstrap, topic, values)
    got = consume_all(kafka_broker.bootstrap, topic, len(values), partitions=3)
    assert sorted(v for p in got.values() for _, v in p) == sorted(values)


def test_fresh_topic_is_unique_and_has_the_requested_partitions(kafka_broker, fresh_topic, kafka_admin):
    a, b = fresh_topic(), fresh_topic(partitions=4)
    assert a != b
    [desc] = kafka_admin.describe_topics([b])
    assert len(desc["partitions"]) == 4


def test_broker_stop_start_keeps_data_and_address(kafka_broker, fresh_topic):
    if not isinstance(kafka_broker, LocalKafka):
        pytest.skip("restart-keeps-data is a LocalKafka property (the container backend pauses)")
    topic = fresh_topic()
    bootstrap = kafka_broker.bootstrap
    produce(bootstrap, topic, [b"before-outage"])
    kafka_broker.stop()
    assert not kafka_broker.running
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", kafka_broker.broker_port), timeout=1).close()
    kafka_broker.start()
    assert kafka_broker.bootstrap == bootstrap
    produce(bootstrap, topic, [b"after-outage"])
    assert [v for _, v in consume_all(bootstrap, topic, 2)[0]] == [b"before-outage", b"after-outage"]


def test_requested_port_taken_fails_fast_with_one_line():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        kafka = LocalKafka(broker_port=port)
        t0 = time.monotonic()
        with pytest.raises(LocalKafkaError) as e:
            kafka.start()
        kafka.close()
    assert time.monotonic() - t0 < 5  # fails before any JVM is started
    msg = str(e.value)
    assert f"127.0.0.1:{port}" in msg and "already in use" in msg and "\n" not in msg
    assert not kafka.running


def test_missing_jars_say_run_make_kafka_jars(tmp_path):
    kafka = LocalKafka(libs_dir=str(tmp_path / "no-jars-here"))
    with pytest.raises(LocalKafkaError, match=r"run `make kafka-jars`") as e:
        kafka.start()
    kafka.close()
    assert "\n" not in str(e.value)


def test_missing_java_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty dir: no java on PATH
    kafka = LocalKafka()
    with pytest.raises(LocalKafkaError, match=r"java not found on PATH \(need Java 17\+") as e:
        kafka.start()
    kafka.close()
    assert "\n" not in str(e.value)


def test_broker_that_exits_during_startup_reports_it_and_leaves_nothing(tmp_path, capsys):
    # A data dir "formatted" for another node id: the real broker refuses to start on it.
    (tmp_path / "kraft-log").mkdir()
    (tmp_path / "kraft-log" / "meta.properties").write_text(
        "version=1\ncluster.id=AAAAAAAAAAAAAAAAAAAAAA\nnode.id=7\ndirectory.id=AAAAAAAAAAAAAAAAAAAAAQ\n")
    kafka = LocalKafka(data_dir=str(tmp_path))
    with pytest.raises(LocalKafkaError, match=r"exited with code \d+ during startup") as e:
        kafka.start()
    kafka.close()
    assert not kafka.running and "\n" not in str(e.value)
    assert "last lines of" in capsys.readouterr().err


def test_not_ready_in_time_fails_with_one_line(tmp_path, capsys):
    kafka = LocalKafka(ready_timeout_s=0.5)
    with pytest.raises(LocalKafkaError, match=r"not ready after") as e:
        kafka.start()
    pid_was_stopped = not kafka.running
    kafka.close()
    assert pid_was_stopped and "\n" not in str(e.value)


def test_config_validate_names_the_bad_field():
    with pytest.raises(LocalKafkaError, match="broker_port must be"):
        LocalKafkaConfig(broker_port=70000).validate()
    with pytest.raises(LocalKafkaError, match="heap must look like"):
        LocalKafkaConfig(heap="lots").validate()


_CHILD = r"""
import sys, time
from tensortrace.devkafka import LocalKafka
k = LocalKafka(ready_timeout_s=90).start()
print(k.pid, k.data_dir, flush=True)
time.sleep(600)
"""


@pytest.mark.slow
def test_no_broker_survives_a_killed_test_process_and_its_dir_is_swept():
    """SIGKILL of the process that started the broker (no finalizer, no atexit) still stops it."""
    child = subprocess.Popen([sys.executable, "-c", _CHILD], stdout=subprocess.PIPE, text=True)
    try:
        pid, data_dir = child.stdout.readline().split()
        broker_pid = int(pid)
        os.kill(broker_pid, 0)  # alive
        child.kill()
        child.wait(10)
        if not wait_for_exit(broker_pid, 30):
            os.killpg(broker_pid, 9)
            pytest.fail(f"broker pid {broker_pid} outlived its parent")
        # The data dir the dead owner could not remove is swept by the next LocalKafka.
        assert os.path.isdir(data_dir) and os.path.exists(os.path.join(data_dir, "owner.pid"))
        sweep_stale_data_dirs(os.path.dirname(data_dir))
        assert not os.path.exists(data_dir)
    finally:
        if child.poll() is None:
            child.kill()


def test_kafka_cli_fails_with_one_line_on_missing_jars(tmp_path):
    r = subprocess.run([sys.executable, "-m", "tensortrace.cli", "kafka", "--libs-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"error: Kafka broker jars not found in {tmp_path}: run `make kafka-jars`"]


def test_ch_client_is_a_real_clickhouse_engine_with_a_private_database(ch_client, ch_dsn):
    import clickhouse_connect

    ch_client.command("CREATE TABLE t (x UInt64, s String) ENGINE = MergeTree ORDER BY x")
    ch_client.insert("t", [[1, "a"], [2, "b"]], column_names=["x", "s"])
    other = clickhouse_connect.get_client(dsn=ch_dsn)  # a second client shares the engine
    try:
        rows = other.query(f"SELECT x, s FROM {ch_client.database}.t ORDER BY x").result_rows
    finally:
        other.close()
    assert rows == [(1, "a"), (2, "b")]
    with pytest.raises(Exception, match="UNKNOWN_TABLE|does not exist"):
        ch_client.query("SELECT * FROM no_such_table")


def test_sweep_keeps_data_dirs_whose_owner_lives(tmp_path):
    live = tmp_path / "tensortrace-kafka-live"
    live.mkdir()
    (live / "owner.pid").write_text(str(os.getpid()))
    foreign = tmp_path / "tensortrace-kafka-foreign"  # no owner.pid: not ours to judge
    foreign.mkdir()
    dead = tmp_path / "tensortrace-kafka-dead"
    dead.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    (dead / "owner.pid").write_text(str(proc.pid))
    assert sweep_stale_data_dirs(str(tmp_path)) == [str(dead)]
    assert live.is_dir() and foreign.is_dir() and not dead.exists()
