"""The pipeline on a real three-node Kafka cluster: rings -> `tensortrace exporter` process -> Kafka
(topic RF 3, min.insync.replicas 2) -> `tensortrace loader` process -> chDB.

- a broker (the leader of partition 0) is SIGKILLed mid-stream and restarted: every record is in
  ClickHouse exactly once, bit-exact, and every request's summary says it is complete;
- the whole pipeline over SASL_SSL with SCRAM-SHA-512: a wrong password gets a clear error that
  names the listener, in the exporter (which keeps running; the records stay in its rings) and in
  the loader (which keeps retrying), and once the password file is fixed nothing is lost.

Traffic comes from tensortrace.testing.ringgen (payload bytes are a pure function of request, step,
hook and row, so what ClickHouse holds is checked byte for byte). The cluster is shared with the
other modules here (conftest.py)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import pytest
from kafka.admin import KafkaAdminClient

from tensortrace.devstack.processes import ExporterProcess, LoaderProcess
from tensortrace.ring.format import RingIdentity, RingWriter
from tensortrace.testing.kafka import committed, create_topics, end_offsets
from tensortrace.testing.ringgen import TrafficGen
from tensortrace.testing.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.slow]

PARTITIONS = 3
AUTH_FAILED = "authentication failed: wrong password or unknown user"


# -- helpers -----------------------------------------------------------------------------------

def make_topics(bootstrap: str) -> tuple[str, str]:
    name = create_topics(bootstrap, PARTITIONS, prefix="tt-pipe", dlq=True, replication=3,
                         configs={"min.insync.replicas": "2"})
    return name, name + ".dlq"


def leader_of(bootstrap: str, topic: str, partition: int) -> int:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30_000)
    try:
        [d] = admin.describe_topics([topic])
        return next(p["leader_id"] for p in d["partitions"] if p["partition_index"] == partition)
    finally:
        admin.close()


def lag_is_zero(bootstrap: str, group: str, topic: str) -> bool:
    """The group's committed offsets equal the end offsets of every partition (all loaded)."""
    try:
        return committed(bootstrap, group, topic, PARTITIONS) == end_offsets(bootstrap, topic, PARTITIONS)
    except Exception:   # a broker just killed or restarting: not yet
        return False


def without_bootstrap(args: list[str]) -> list[str]:
    """KafkaConfig.cli_args() minus --kafka-bootstrap-servers (ExporterProcess passes it itself)."""
    i = args.index("--kafka-bootstrap-servers")
    return args[:i] + args[i + 2:]


def loader_args(topic: str, dlq: str, group: str, path, kafka_args: list[str]) -> list[str]:
    return [*kafka_args, "--topic", topic, "--dlq-topic", dlq, "--group", group,
            "--clickhouse", f"chdb://{path}", "--batch-max-rows", "50", "--batch-max-delay", "0.05",
            "--stats-interval", "0.05", "--session-timeout-ms", "6000"]


def exporter_args() -> list[str]:
    return ["--payload-encoding", "RAW", "--request-timeout-ms", "5000"]


def traffic(tmp_path, pod: str, **gen) -> tuple[str, RingWriter, TrafficGen]:
    """(ring dir, writer, generator): the ring <tmp_path>/rings/<pod>-r0.ring (dir 0700) and a
    TrafficGen(**gen) writing into it."""
    ring_dir = tmp_path / "rings"
    ring_dir.mkdir(mode=0o700)
    w = RingWriter.create(str(ring_dir / f"{pod}-r0.ring"), 8 << 20, RingIdentity(pod=pod, node="n1"))
    return str(ring_dir), w, TrafficGen(w, **gen)


def wrong_password(cluster, tmp_path):
    """(good, bad, password file): the cluster's SASL_SSL client config (SCRAM-SHA-512, every node's
    listener), and the same whose 0600 password file holds a wrong password; writing the right
    one into that file fixes `bad` in place (a rotated Secret)."""
    password_file = tmp_path / "kafka-password"
    password_file.write_text("not-the-password\n")
    password_file.chmod(0o600)
    return cluster.client_config(), cluster.client_config(sasl_password_file=str(password_file)), password_file


def phase(gen: TrafficGen, rids: list[str], steps: int = 3) -> None:
    """Some requests run a few steps and finish (their summaries are written)."""
    for _ in range(steps):
        gen.step(rids)
    gen.finish(rids)


def drained(exp: ExporterProcess, name: str, gen: TrafficGen):
    r = exp.ring(name)
    return r if r is not None and r.frames_pending == 0 and r.frames_released == gen.frames_written else None


_CONTENTS = r"""
import json, sys, clickhouse_connect
c = clickhouse_connect.get_client(dsn="chdb://" + sys.argv[1])
db = sys.argv[2]
q = lambda s: c.query(s).result_rows
out = {
    "raw": q(f"SELECT count() FROM {db}.activations")[0][0],
    "rows": [[r[0], int(r[1]), r[2], r[3], int(r[4]), int(r[5]), str(r[6]), r[7]] for r in q(
        f"SELECT producer_pod, seq, request_id, hook, step, token_start, encoding, hex(payload) "
        f"FROM {db}.activations FINAL")],
    "summaries": [[r[0], int(r[1]), int(r[2]), bool(r[3])] for r in q(
        f"SELECT request_id, records_captured, records_dropped, complete FROM {db}.requests FINAL")],
}
c.command(f"OPTIMIZE TABLE {db}.activations FINAL")
c.command(f"OPTIMIZE TABLE {db}.requests FINAL")
out["raw_after_merge"] = q(f"SELECT count() FROM {db}.activations")[0][0]
out["summaries_after_merge"] = q(f"SELECT count() FROM {db}.requests")[0][0]
print(json.dumps(out))
"""


def assert_loaded_exactly_once_bit_exact(path, gens: dict[str, TrafficGen]) -> int:
    """ClickHouse (read by another process once the loader exited) holds every record of every
    generator once, byte for byte, and a complete summary per request."""
    r = subprocess.run([sys.executable, "-c", _CONTENTS, str(path), "tensortrace"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    want_n = sum(len(g.expected) for g in gens.values())
    rows = {(pod, seq): rest for pod, seq, *rest in got["rows"]}
    assert len(got["rows"]) == len(rows) == want_n, f"{len(got['rows'])} rows, {len(rows)} distinct, {want_n} sent"
    for pod, gen in gens.items():
        for seq, (rid, hook, step, pos, raw) in gen.expected.items():
            row = rows.get((pod, seq))
            assert row is not None, f"record {pod}/{seq} ({rid} {hook} step {step}) is not in ClickHouse"
            assert row[:4] == [rid, hook, step, pos], (pod, seq, row[:4])
            assert row[4].upper() == "RAW" and bytes.fromhex(row[5]) == raw, f"payload of {pod}/{seq} differs"
    assert got["raw_after_merge"] == want_n and got["raw"] >= want_n
    summaries = {rid: (captured, dropped, complete) for rid, captured, dropped, complete in got["summaries"]}
    want_summaries = {rid: (n, 0, True) for gen in gens.values() for rid, n in gen.captured.items()}
    assert summaries == want_summaries
    assert got["summaries_after_merge"] == len(want_summaries)
    return want_n


# -- tests -------------------------------------------------------------------------------------

def test_a_broker_sigkilled_mid_stream_and_restarted_loses_and_duplicates_nothing(kafka_cluster, tmp_path):
    cluster = kafka_cluster
    bs = cluster.bootstrap
    topic, dlq = make_topics(bs)
    ring_dir, w, gen = traffic(tmp_path, "pod-k", n_requests=32, prefix="k", row_shape=(256,))
    rids = gen.request_ids()
    exp = ExporterProcess(ring_dir, bs, topic, str(tmp_path), extra=exporter_args()).start()
    path = tmp_path / "chdb"
    loader = LoaderProcess(loader_args(topic, dlq, "pipe-kill", path, ["--kafka-bootstrap-servers", bs]))
    stream_error: list[BaseException] = []

    def stream():  # requests keep coming, two at a time, through the kill and the restart
        try:
            for i in range(2, len(rids), 2):
                for _ in range(3):
                    gen.step(rids[i:i + 2])
                    time.sleep(0.08)
                gen.finish(rids[i:i + 2])
        except BaseException as e:  # handed to the main thread
            stream_error.append(e)

    writer = threading.Thread(target=stream, name="ring-traffic")
    try:
        phase(gen, rids[0:2])
        assert wait_until(lambda: loader.stats.get("tensor_rows", 0) > 0 or loader.proc.poll() is not None, 120,
                          0.02), "the loader's first insert"
        assert loader.proc.poll() is None, "".join(loader.lines[-20:])
        victim = cluster.brokers[leader_of(bs, topic, 0) - 1]
        writer.start()
        time.sleep(0.5)
        victim.kill()                                  # mid-stream (SIGKILL), from the main thread
        time.sleep(1.5)                                # records keep coming with one broker dead ...
        victim.start()                                 # ... and while it restarts (same ports and data)
        writer.join(120)
        assert not writer.is_alive() and not stream_error, stream_error
        exp.wait_for(lambda: drained(exp, "pod-k-r0.ring", gen), 90, "everything acknowledged")
        st = exp.ring("pod-k-r0.ring")
        assert st.frames_committed == st.frames_released == gen.frames_written
        assert st.frames_dropped_by_producer == 0 and not st.frames_dropped_by_reason
        assert wait_until(lambda: lag_is_zero(bs, "pipe-kill", topic), 120, 0.2), "the loader to commit everything"
        loader.kill(signal.SIGTERM)
        assert loader.proc.returncode == 0, "".join(loader.lines[-20:])
        assert loader.final_stats.get("dlq_messages", 0) == 0, loader.final_stats
    finally:
        loader.kill(signal.SIGKILL)
        exp.stop()
        if writer.is_alive():
            writer.join(30)
        w.close()
    n = assert_loaded_exactly_once_bit_exact(path, {"pod-k": gen})
    print(f"\n{n} records of {len(rids)} requests; broker {victim.node_id} (leader of partition 0) SIGKILLed "
          f"mid-stream, restarted in {victim.last_start_s:.1f}s")


def test_b_pipeline_over_sasl_ssl_reports_a_wrong_password_and_loses_nothing_once_fixed(kafka_cluster, tmp_path):
    cluster = kafka_cluster
    good, bad, password_file = wrong_password(cluster, tmp_path)
    right = good.password()
    topic, dlq = make_topics(cluster.bootstrap)
    ring_dir, w, gen = traffic(tmp_path, "pod-s", n_requests=6, prefix="s", row_shape=(128,))
    rids = gen.request_ids()
    phase(gen, rids[0:3])                              # waiting in the ring before the exporter can publish
    exp = ExporterProcess(ring_dir, bad.bootstrap_servers, topic, str(tmp_path),
                          extra=without_bootstrap(bad.cli_args()) + exporter_args()).start()
    path = tmp_path / "chdb"
    loader = LoaderProcess(loader_args(topic, dlq, "pipe-sasl", path, good.cli_args()))
    try:
        exp.wait_for(lambda: AUTH_FAILED in exp.log(), 30, "the exporter's authentication error")
        line = next(x for x in exp.log().splitlines() if AUTH_FAILED in x)
        assert bad.describe() in line, line            # SASL_SSL listener <servers> as 'tensortrace' (SCRAM-SHA-512)
        assert "records stay in the rings" in line
        assert right not in exp.log() and "not-the-password" not in exp.log()
        time.sleep(3)                                  # a few retries: still alive, still nothing published
        assert exp.alive()
        st = exp.ring("pod-s-r0.ring")
        assert st is not None and st.records_published == 0 and st.frames_released == 0
        assert sum(AUTH_FAILED in x for x in exp.log().splitlines()) == 1   # logged once, not per retry

        password_file.write_text(right + "\n")        # the secret is fixed in place (a rotated Secret)
        phase(gen, rids[3:6])
        exp.wait_for(lambda: drained(exp, "pod-s-r0.ring", gen), 60, "everything published after the fix")
        assert "the connection works again" in exp.log()
        assert wait_until(lambda: lag_is_zero(cluster.bootstrap, "pipe-sasl", topic), 120, 0.2), \
            "the loader (over SASL_SSL) to commit everything"
        loader.kill(signal.SIGTERM)
        assert loader.proc.returncode == 0, "".join(loader.lines[-20:])
    finally:
        loader.kill(signal.SIGKILL)
        exp.stop()
        w.close()
    assert_loaded_exactly_once_bit_exact(path, {"pod-s": gen})


def test_b_loader_reports_a_wrong_password_and_loads_everything_once_fixed(kafka_cluster, tmp_path):
    """The loader's consumer core checks the connection (KafkaConfig.check_connection) before it
    creates its consumer: one clear line per attempt, it keeps retrying, reads the password file
    again, and loads everything once the file is fixed."""
    cluster = kafka_cluster
    good, bad, password_file = wrong_password(cluster, tmp_path)
    topic, dlq = make_topics(cluster.bootstrap)
    ring_dir, w, gen = traffic(tmp_path, "pod-l", n_requests=3, prefix="l", row_shape=(64,))
    phase(gen, gen.request_ids())
    exp = ExporterProcess(ring_dir, good.bootstrap_servers, topic, str(tmp_path),
                          extra=without_bootstrap(good.cli_args()) + exporter_args()).start()
    path = tmp_path / "chdb"
    loader = LoaderProcess(loader_args(topic, dlq, "pipe-sasl-loader", path, bad.cli_args()))
    try:
        exp.wait_for(lambda: drained(exp, "pod-l-r0.ring", gen), 60, "the exporter to publish")
        assert wait_until(lambda: any(AUTH_FAILED in x for x in loader.lines) or loader.proc.poll() is not None,
                          8), "the loader's authentication error"
        line = next(x for x in loader.lines if AUTH_FAILED in x)
        assert bad.describe() in line and good.password() not in "".join(loader.lines)
        assert loader.proc.poll() is None, "the loader must keep retrying, not exit"
        password_file.write_text(good.password() + "\n")
        assert wait_until(lambda: lag_is_zero(cluster.bootstrap, "pipe-sasl-loader", topic), 60, 0.2), \
            "the loader to commit everything after the fix"
        loader.kill(signal.SIGTERM)
        assert loader.proc.returncode == 0
    finally:
        loader.kill(signal.SIGKILL)
        exp.stop()
        w.close()
    assert_loaded_exactly_once_bit_exact(path, {"pod-l": gen})
