"""Bridge freshness: capture -> span queryable in `otel_traces`, at 20 MB/s of activations, with the
loader's capture -> row queryable measured side by side on the same stream in the same run.

    .venv/bin/python scripts/bench/bridge_freshness.py [--bootstrap HOST:PORT] [--rate-mbps 20] [--seconds 20]
                                                       [--json bridge_freshness.json]

Without --bootstrap it starts a local Apache Kafka broker (tensortrace.devkafka). The loader (the
real Loader, its production defaults) and the bridge (the real BridgeService, its defaults,
ClickHouse destination, no OTLP) read the same activation topic (4 partitions), each in its own
consumer group. `--layout separate` (default): the bridge runs in a process of its own with its own
chDB path, as two services do (an embedded chDB engine has one owner process); `--layout composed`:
both in one process writing through one client to one chDB engine, what `tensortrace loader
--bridge` runs (compose.py). A producer process (spawned) paces complete requests at
--rate-mbps: per request one Kafka message of --records-per-request 4 KiB residual rows (bf16,
hidden 2048) and its RequestSummary, every record's capture_time and the summary's end time stamped
when the message is built, as the exporter publishes a finished request.

Measured, per item, on the wall clock of this one host (no skew):
  bridge  per request: (moment ClickHouse accepted the insert of its tensortrace.capture span)
          - (the request's end, the last capture time; the span's end);
  loader  per record:  (moment ClickHouse accepted the insert of its activations row) - capture_time
          (what scripts/bench/loader_throughput.py calls freshness).
Then both are checked: every produced request has exactly one capture span, every record one row.
Everything it creates (the broker's data directory, the chDB paths under one temp dir) is removed at
the end; it writes nothing to /dev/shm (pipes between its processes, no multiprocessing Queue).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

from tensortrace.v1 import records_pb2 as pb  # noqa: E402
from tensortrace.wire import codec  # noqa: E402

PRODUCER = pb.Producer(node="bench-node", pod="bench-pod", pid=1, tp_rank=0, generation=1)
HIDDEN = 2048
ROW_BYTES = HIDDEN * 2


def paced_requests(bootstrap: str, topic: str, rate_mbps: float, seconds: float, per_request: int, out) -> None:
    """Runs in its own process: complete requests (per_request 4 KiB records + summary, one message
    each) paced to rate_mbps of payload. Sends (requests, records) on the pipe `out` at the end."""
    from kafka import KafkaProducer

    p = KafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=5, batch_size=1 << 20,
                      max_request_size=8 << 20)
    rng = np.random.default_rng(1)
    rows = (rng.standard_normal((256, HIDDEN), dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
    interval = per_request * ROW_BYTES / (rate_mbps * 1e6)
    start = time.perf_counter()
    k = seq = 0
    while time.perf_counter() - start < seconds:
        due = start + k * interval
        now = time.perf_counter()
        if due > now:
            time.sleep(due - now)
        ts = time.time_ns()
        rid = f"fresh-{k}"
        trace, span = os.urandom(16), os.urandom(8)
        recs: list = []
        for i in range(per_request):
            recs.append(pb.TensorRecord(
                model_id="bench/model", request_id=rid, trace_id=trace, span_id=span, hook="resid_pre", layer=i,
                positions_kind=pb.TOKEN_RANGE, token_start=0, token_end=1, phase=pb.PREFILL, step=0,
                dtype=pb.BFLOAT16, shape=[1, HIDDEN], encoding=pb.RAW, raw_size=ROW_BYTES,
                payload=rows[(seq + i) % 256].tobytes(), capture_time_unix_nano=ts, export_time_unix_nano=ts,
                producer=PRODUCER, seq=seq + i))
        seq += per_request
        recs.append(pb.RequestSummary(
            model_id="bench/model", request_id=rid, trace_id=trace, span_id=span, producer=PRODUCER, seq=seq,
            records_captured=per_request, bytes_captured=per_request * ROW_BYTES, complete=True, prompt_tokens=1,
            generated_tokens=1, finish_reason="length", hooks=["resid_pre"], start_time_unix_nano=ts,
            end_time_unix_nano=ts, export_time_unix_nano=ts, sampled=True))
        seq += 1
        p.send(topic, key=rid.encode(), value=codec.encode_envelope(recs))
        k += 1
    p.flush()
    p.close()
    out.send((k, k * per_request))
    out.close()


def quantiles(values: list[float]) -> dict:
    v = sorted(values)
    if not v:
        return {"n": 0}
    q = lambda f: v[min(len(v) - 1, int(f * len(v)))]   # noqa: E731
    return {"n": len(v), "p50_ms": q(0.5), "p90_ms": q(0.9), "p99_ms": q(0.99), "max_ms": v[-1]}


def bridge_config(bootstrap: str, topic: str, chdb_dir: str, session_timeout_ms: int):
    from tensortrace.bridge.config import BridgeConfig
    from tensortrace.service.kafka import KafkaConfig

    return BridgeConfig(kafka=KafkaConfig(bootstrap_servers=bootstrap), topic=topic, dlq_topic=topic + ".dlq",
                        group_id=f"bridge-{topic}", clickhouse_dsn=f"chdb://{chdb_dir}", traces_database="bench_otel",
                        otlp_receiver_port=-1, spans_consumer=False, probe_scores_consumer=False,
                        session_timeout_ms=session_timeout_ms)


def timed_bridge(cfg, client=None):
    """A BridgeService whose capture spans' latencies (insert accepted - span end, ms) are recorded;
    with `client`, writing through that client (the loader's: one chDB engine per process)."""
    from tensortrace.bridge.service import BridgeService
    from tensortrace.bridge.spans import CAPTURE
    from tensortrace.storage.otel import apply_otel_schema

    class Bridge(BridgeService):
        def _open_clickhouse(self):
            if client is None:
                return super()._open_clickhouse()
            apply_otel_schema(client, self.cfg.traces_database, self.cfg.traces_ttl_days, self.cfg.traces_table)
            self._client = client
            return client

    bridge = Bridge(cfg)
    latencies: list[float] = []
    write = bridge.sink.write

    def timed_write(spans, stopping):
        ok = write(spans, stopping)
        if ok:
            done = time.time_ns()
            latencies.extend((done - s.end_ns) / 1e6 for s in spans if s.name == CAPTURE)
        return ok
    bridge.sink.write = timed_write
    return bridge, latencies


def count_capture_spans(client) -> tuple[int, int]:
    from tensortrace.bridge.spans import CAPTURE

    return tuple(client.query(f"SELECT count(), uniqExact(SpanId) FROM bench_otel.otel_traces "
                              f"WHERE SpanName = '{CAPTURE}'").result_rows[0])


def bridge_process(bootstrap: str, topic: str, chdb_dir: str, session_timeout_ms: int, conn) -> None:
    """The bridge as its own process with its own chDB path (how a separate `tensortrace bridge` runs
    with chDB): 'ready' once it holds partitions; on ('stop', requests) it waits for them, stops
    and sends its latencies and counts."""
    bridge, latencies = timed_bridge(bridge_config(bootstrap, topic, chdb_dir, session_timeout_ms))
    t = threading.Thread(target=bridge.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 120
    while not bridge.ready() and time.monotonic() < deadline:
        time.sleep(0.05)
    conn.send("ready" if bridge.ready() else f"not ready: {bridge.not_ready_reason()}")
    _, requests = conn.recv()
    deadline = time.monotonic() + 120
    while sum(bridge.stats.requests.values()) < requests and time.monotonic() < deadline and t.is_alive():
        time.sleep(0.2)
    cpu = os.times()
    bridge.stop()
    t.join(timeout=60)
    spans, distinct = count_capture_spans(bridge._client) if bridge._client is not None else (0, 0)
    conn.send({"latencies": latencies, "capture_spans": spans, "distinct_capture_spans": distinct,
               "requests_released": dict(bridge.stats.requests), "process_cpu_s": cpu.user + cpu.system})
    conn.close()


def run(bootstrap: str, tmp: str, rate_mbps: float, seconds: float, per_request: int, session_timeout_ms: int,
        layout: str) -> dict:
    import clickhouse_connect
    from kafka.admin import KafkaAdminClient, NewTopic

    from tensortrace.loader.config import KafkaConfig, LoaderConfig
    from tensortrace.loader.service import Loader
    from tensortrace.storage import ThreadSafeClient

    topic = f"bench-fresh-{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic(topic, 4, 1), NewTopic(topic + ".dlq", 1, 1)])
    admin.close()
    loader_dir, bridge_dir = os.path.join(tmp, "loader-chdb"), os.path.join(tmp, "bridge-chdb")
    client = ThreadSafeClient(clickhouse_connect.get_client(dsn=f"chdb://{loader_dir}"))
    loader = Loader(LoaderConfig(kafka=KafkaConfig(bootstrap_servers=bootstrap), topic=topic, dlq_topic=topic + ".dlq",
                                 group_id=f"loader-{topic}", clickhouse_dsn="chdb://memory", database="bench_fresh",
                                 session_timeout_ms=session_timeout_ms), client=client)
    loader_ms: list[float] = []
    loader.on_inserted = lambda batch, done_ns: loader_ms.extend((done_ns - t) / 1e6 for t in batch.act["capture_time"])
    ctx = multiprocessing.get_context("spawn")
    threads = [threading.Thread(target=loader.run, daemon=True)]
    bridge = child = conn = None
    if layout == "composed":
        bridge, bridge_ms = timed_bridge(bridge_config(bootstrap, topic, loader_dir, session_timeout_ms), client)
        threads.append(threading.Thread(target=bridge.run, daemon=True))
    else:
        # pipes, not Queues: a Queue's semaphores live in /dev/shm (sem.mp-*)
        conn, child_conn = ctx.Pipe()
        child = ctx.Process(target=bridge_process, args=(bootstrap, topic, bridge_dir, session_timeout_ms, child_conn))
        child.start()
        child_conn.close()
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while not (loader.ready.is_set() and (bridge is None or bridge.ready())) and time.monotonic() < deadline:
        time.sleep(0.05)
    if conn is not None:
        said = conn.recv() if conn.poll(120) else "no answer within 120 s"
        if said != "ready":
            raise RuntimeError(f"bridge process: {said}")
    if not loader.ready.is_set() or (bridge is not None and not bridge.ready()):
        raise RuntimeError(f"not ready: loader {loader.ready.is_set()}, bridge {bridge and bridge.not_ready_reason()}")
    cpu0 = os.times()
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=paced_requests, args=(bootstrap, topic, rate_mbps, seconds, per_request, send))
    t0 = time.monotonic()
    proc.start()
    send.close()
    if not recv.poll(seconds + 120):
        proc.kill()
        raise RuntimeError("the producer process sent no count")
    requests, records = recv.recv()
    recv.close()
    proc.join()
    if conn is not None:
        conn.send(("stop", requests))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if loader.stats.tensor_rows >= records and (bridge is None or sum(bridge.stats.requests.values()) >= requests):
            break
        if not all(t.is_alive() for t in threads):
            break   # a consumer died (its traceback is above): the counts below say what is missing
        time.sleep(0.2)
    if conn is not None:
        got = conn.recv() if conn.poll(180) else {"latencies": [], "capture_spans": 0, "distinct_capture_spans": 0,
                                                   "requests_released": {}, "process_cpu_s": 0.0}
        conn.close()
        child.join(timeout=60)
        bridge_ms, spans, distinct = got["latencies"], got["capture_spans"], got["distinct_capture_spans"]
        released, bridge_cpu = got["requests_released"], got["process_cpu_s"]
    wall = time.monotonic() - t0
    cpu1 = os.times()
    loader.stop()
    if bridge is not None:
        bridge.stop()
    for t in threads:
        t.join(timeout=60)
    if bridge is not None:
        spans, distinct = count_capture_spans(client)
        released, bridge_cpu = dict(bridge.stats.requests), None
    rows = client.query("SELECT count() FROM bench_fresh.activations").result_rows[0][0]
    client.close()
    return {"layout": layout, "rate_MBps": rate_mbps, "seconds": seconds, "records_per_request": per_request,
            "requests": requests, "records": records, "achieved_MBps": records * ROW_BYTES / seconds / 1e6,
            "bridge": {**quantiles(bridge_ms), "capture_spans": spans, "distinct_capture_spans": distinct,
                       "requests_released": released, "bridge_process_cpu_s": bridge_cpu},
            "loader": {**quantiles(loader_ms), "activation_rows": rows},
            "process_cpu_s": (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system), "wall_s": wall}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bootstrap", help="existing Kafka broker; default: start a local one")
    p.add_argument("--rate-mbps", type=float, default=20.0)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--records-per-request", type=int, default=16, help="4 KiB rows per request (one message)")
    p.add_argument("--session-timeout-ms", type=int, default=30_000,
                   help="both consumers' group session timeout (the services' default is 10 s; on a shared, "
                        "overloaded 2-core machine heartbeats can miss that and the group rebalances)")
    p.add_argument("--layout", choices=("separate", "composed"), default="separate",
                   help="separate: the bridge in its own process with its own chDB path (two services); composed: "
                        "loader and bridge in one process on one chDB engine (tensortrace loader --bridge)")
    p.add_argument("--json", default=".cache/bench/bridge_freshness.json")
    a = p.parse_args(argv)
    broker = None
    bootstrap = a.bootstrap
    if not bootstrap:
        from tensortrace.devkafka import LocalKafka

        broker = LocalKafka()
        broker.start()
        bootstrap = broker.bootstrap
    tmp = tempfile.mkdtemp(prefix="tt-bridge-fresh-")   # both chDB paths; removed at the end
    try:
        r = run(bootstrap, tmp, a.rate_mbps, a.seconds, a.records_per_request, a.session_timeout_ms, a.layout)
    finally:
        if broker is not None:
            broker.close()
        shutil.rmtree(tmp, ignore_errors=True)
    results = {"benchmark": "bridge_freshness", "machine": f"{os.cpu_count()} cores, shared", "argv": sys.argv[1:],
               "load_average_at_end": os.getloadavg(), "session_timeout_ms": a.session_timeout_ms, **r}
    b, lo = r["bridge"], r["loader"]
    print()
    print(f"{r['requests']:,} requests x {r['records_per_request']} rows of 4 KiB at {r['achieved_MBps']:.1f} MB/s "
          f"for {r['seconds']:.0f} s; " + ("loader and bridge in separate processes, a chDB engine each; "
                                            if r["layout"] == "separate" else
                                            "one process: loader + bridge on one chDB engine; ") +
          f"CPU {r['process_cpu_s']:.1f} s in {r['wall_s']:.1f} s; load average {os.getloadavg()[0]:.1f}")
    print(f"{'capture -> queryable (ms)':<40}{'n':>9}{'p50':>9}{'p90':>9}{'p99':>9}{'max':>9}{'target p99':>12}")
    for label, x, target in (("bridge: capture span in otel_traces", b, "<= 1,000"),
                             ("loader: row in activations (baseline)", lo, "")):
        print(f"{label:<40}{x['n']:>9,}{x['p50_ms']:>9,.0f}{x['p90_ms']:>9,.0f}{x['p99_ms']:>9,.0f}"
              f"{x['max_ms']:>9,.0f}{target:>12}")
    ok = (b["capture_spans"] == b["distinct_capture_spans"] == r["requests"] and lo["activation_rows"] == r["records"])
    print(f"accounted: {b['capture_spans']:,} capture spans for {r['requests']:,} requests, "
          f"{lo['activation_rows']:,} rows for {r['records']:,} records: {'ok' if ok else 'MISMATCH'}")
    results["accounted"] = ok
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {a.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
