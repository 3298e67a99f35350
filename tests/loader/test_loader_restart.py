"""A loader process killed with SIGKILL mid-stream and restarted leaves each record in ClickHouse once.

The loaders run as real subprocesses (`tensortrace loader`) on their own chDB path; this test reads
through the restarted loader's query service (the only way to reach an engine another process owns)
and, after it exits, counts rows with a separate process on the same path."""

import signal
import threading
import time

import pytest
import torch

from tensortrace.devstack.processes import LoaderProcess
from tensortrace.query import TensorTraceClient
from tensortrace.testing.clickhouse import count_rows
from tensortrace.testing.kafka import committed, create_topics, end_offsets
from tensortrace.testing.synthetic import SyntheticRequest, produce
from tensortrace.testing.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def loader_procs():
    procs = []

    def start(args):
        p = LoaderProcess(args)
        procs.append(p)
        return p
    yield start
    for p in procs:
        p.kill()


def test_loader_killed_mid_stream_and_restarted_leaves_each_record_once(kafka_broker, tmp_path, loader_procs):
    bs = kafka_broker.bootstrap
    topic = create_topics(bs, 2, prefix="tt-loader", dlq=True)
    reqs = [SyntheticRequest.make(f"kill-{i}", layers=4, hidden=256, prompt=32, generated=24, seed=i)
            for i in range(24)]
    n = sum(len(r.records) for r in reqs)
    path = tmp_path / "chdb"
    args = ["--bootstrap", bs, "--topic", topic, "--dlq-topic", topic + ".dlq", "--group", "kill-test",
            "--clickhouse", f"chdb://{path}", "--batch-max-rows", "100", "--batch-max-delay", "0.05",
            "--stats-interval", "0.02", "--session-timeout-ms", "6000"]

    def produce_slowly(part):
        for r in part:
            produce(bs, topic, r.messages(max_payload=4096))   # prefill records (16 KiB) are chunked
            time.sleep(0.05)

    # Two loaders are SIGKILLed while records stream in (each after it has inserted something);
    # a third one finishes the stream.
    for part in (reqs[0:8], reqs[8:16]):
        p = loader_procs(args)
        producer = threading.Thread(target=produce_slowly, args=(part,))
        producer.start()
        assert wait_until(lambda: p.stats.get("tensor_rows", 0) > 0 or p.proc.poll() is not None,
                          timeout_s=120, interval=0.005), "".join(p.lines[-20:])
        p.kill(signal.SIGKILL)
        producer.join()
        assert p.proc.returncode == -signal.SIGKILL
    produce_slowly(reqs[16:])
    final = loader_procs(args + ["--query-port", "0"])
    ends = end_offsets(bs, topic, 2)
    assert wait_until(lambda: committed(bs, "kill-test", topic, 2) == ends, timeout_s=120), "".join(final.lines[-20:])
    assert wait_until(lambda: final.query_address is not None)
    with TensorTraceClient(f"grpc://{final.query_address}") as tt:
        for req in reqs:
            got = tt.tensors(request_id=req.request_id)
            assert got.completeness.state == "complete", got.completeness
            for key, want in req.truth.items():
                assert torch.equal(got[key].tensor, want), (req.request_id, key)
    final.kill(signal.SIGTERM)
    assert final.proc.returncode == 0, "".join(final.lines[-20:])
    counts = count_rows(path, "tensortrace")
    print(f"records {n}; rows before merge {counts['raw']} (re-read duplicates: {counts['raw'] - n})")
    assert counts["distinct"] == n and counts["final"] == n and counts["raw_after_merge"] == n
    assert counts["summaries_final"] == len(reqs) and counts["summaries_after_merge"] == len(reqs)
    assert counts["raw"] >= n  # duplicates from the re-reads may exist until merged; never fewer


def test_loader_started_while_a_clickhouse_server_is_unreachable_waits_and_stops_cleanly(kafka_broker):
    """A server DSN on a closed port: the loader reports it and keeps retrying (no crash loop)."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens here now
    p = LoaderProcess(["--bootstrap", kafka_broker.bootstrap, "--clickhouse", f"http://user:pw@127.0.0.1:{port}"])
    try:
        assert wait_until(lambda: sum("clickhouse_unavailable" in line for line in p.lines) >= 2 or p.proc.poll() is not None,
                          timeout_s=60), "".join(p.lines[-20:])
        assert p.proc.poll() is None, "".join(p.lines[-20:])
    finally:
        p.kill(signal.SIGTERM)
    assert p.proc.returncode == 0
