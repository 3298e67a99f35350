"""Loader benchmark: Kafka -> ClickHouse (embedded chDB) throughput, freshness, and read-back time.

    .venv/bin/python scripts/bench/loader_throughput.py [--bootstrap HOST:PORT] [--decoder native,python] [--json .cache/bench/loader_throughput.json]

Without --bootstrap it starts a local Apache Kafka broker (tensortrace.devkafka). Phases:
  1. throughput: N records pre-produced to a fresh topic (4 KiB residual rows, 32 per envelope,
     about what the exporter packs per request and drain pass, see its section of
     docs/BENCHMARKS.md; then 256 KiB prefill rows, 3 per envelope); a loader
     (the real Loader class, in this process, on its own chDB path) loads them from the earliest
     offset. Rows/s and MB/s from its first message to its last accepted insert.
  2. freshness: a producer process paces 4 KiB records at --rate-mbps (default 20 MB/s) for
     --seconds; per row, (moment ClickHouse accepted the insert) - (capture_time stamped when the
     record was produced): p50 / p99 / max.
  3. read-back: one request of 512 positions (a 257-token prefill + 255 decode steps) x 32 layers of resid_pre,
     hidden 2048 bf16 (8192 records, 64 MiB), loaded through Kafka; time of
     TensorTraceClient.tensors() in-process (direct) and through the gRPC query service.
Payloads are bf16 Gaussian values (RAW encoding, the loader does not touch them).
`--decoder native,python`: phase 1 runs once per decoder, alternating, on fresh topics: "native" is
the consumer core's native envelope scanner into ClickHouseSink.add_scan (tensortrace.wire.native,
the default where it is built), "python" the same loader with it off (what TENSORTRACE_NATIVE=0
does). Load averages are recorded with every phase (the machine is shared). Phase 1 starts with an
untimed warm-up load (`--warmup`, 4,000 records): before it, the first side in the process was
measured 20-50% slower than later runs of the same side.
`--insert loader,insert_arrow`: phase 1 also per insert path, alternating: "loader" is the loader's
own (on chDB the engine reads the batch's Arrow table in place, storage/client.py), "insert_arrow"
the same loader with its client wrapped so that it takes clickhouse-connect's insert_arrow (Arrow
IPC through a temporary file), the path it used before session 6. Each phase records which path ran;
freshness and read-back run once, with the first path named.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid

import numpy as np
from _stats import cpu_s

from tensortrace.v1 import records_pb2 as pb
from tensortrace.wire import codec

PRODUCER = pb.Producer(node="bench-node", pod="bench-pod", pid=1, tp_rank=0, generation=1)


def bf16_rows(n_rows: int, hidden: int, rng) -> np.ndarray:
    """n_rows x hidden bf16 values (as uint16) from Gaussian floats: the top half of each float32."""
    f = rng.standard_normal((n_rows, hidden), dtype=np.float32)
    return (f.view(np.uint32) >> 16).astype(np.uint16)


def build_messages(n_records: int, rows_per_record: int, hidden: int, per_message: int, seq0: int = 0,
                   request_prefix: str = "bench", seed: int = 0) -> list[tuple[bytes, bytes]]:
    rng = np.random.default_rng(seed)
    data = bf16_rows(n_records * rows_per_record, hidden, rng)
    msgs, now = [], time.time_ns()
    trace = os.urandom(16)
    for m0 in range(0, n_records, per_message):
        recs = []
        rid = f"{request_prefix}-{m0 // (per_message * 4)}"
        for i in range(m0, min(n_records, m0 + per_message)):
            payload = data[i * rows_per_record:(i + 1) * rows_per_record].tobytes()
            recs.append(pb.TensorRecord(
                model_id="bench/model", request_id=rid, trace_id=trace, span_id=b"\x01" * 8, hook="resid_pre",
                layer=i % 32, positions_kind=pb.TOKEN_RANGE, token_start=i // 32, token_end=i // 32 + rows_per_record,
                phase=pb.DECODE if rows_per_record == 1 else pb.PREFILL, step=i // 32, dtype=pb.BFLOAT16,
                shape=[rows_per_record, hidden], encoding=pb.RAW, raw_size=len(payload), payload=payload,
                capture_time_unix_nano=now, export_time_unix_nano=now, producer=PRODUCER, seq=seq0 + i))
        msgs.append((rid.encode(), codec.encode_envelope(recs)))
    return msgs


def produce_all(bootstrap: str, topic: str, msgs) -> None:
    from kafka import KafkaProducer

    # One ~1 MB envelope per producer batch: the broker's default limit is 1 MiB per batch.
    p = KafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=5, batch_size=1 << 20,
                      max_request_size=1 << 20)
    futures = [p.send(topic, key=k, value=v) for k, v in msgs]
    for f in futures:
        f.get(timeout=120)
    p.close()


def create_topic(bootstrap: str, partitions: int = 4) -> str:
    from kafka.admin import KafkaAdminClient, NewTopic

    name = f"bench-{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic(name, partitions, 1), NewTopic(name + ".dlq", 1, 1)])
    admin.close()
    return name


class _NotChdb:
    """Forwards every call to the chDB client; not a clickhouse-connect chDB client itself, so the
    loader inserts through insert_arrow (`--insert insert_arrow`)."""

    def __init__(self, client):
        self.client = client

    def __getattr__(self, name):
        return getattr(self.client, name)


def start_loader(bootstrap, topic, client, db, decoder: str = "native", insert: str = "loader", **overrides):
    from tensortrace.loader.config import KafkaConfig, LoaderConfig
    from tensortrace.loader.service import Loader
    from tensortrace.storage import ThreadSafeClient

    if insert == "insert_arrow":
        client = ThreadSafeClient(_NotChdb(client.client if isinstance(client, ThreadSafeClient) else client))

    cfg = LoaderConfig(kafka=KafkaConfig(bootstrap_servers=bootstrap), topic=topic, dlq_topic=topic + ".dlq", group_id=f"g-{topic}",
                       clickhouse_dsn="chdb://memory", database=db, **overrides)
    loader = Loader(cfg, client=client)
    if decoder == "python":
        loader.core.disable_native()     # what TENSORTRACE_NATIVE=0 does
    t = threading.Thread(target=loader.run, daemon=True)
    t.start()
    return loader, t


BROKER_PID = None   # the local broker's pid, when this script started it (for its CPU time)


def phase_throughput(bootstrap, client, label, n_records, rows_per_record, hidden, per_message, decoder="native",
                     insert="loader", **loader_kw) -> dict:
    topic = create_topic(bootstrap)
    msgs = build_messages(n_records, rows_per_record, hidden, per_message, request_prefix=label)
    payload_bytes = n_records * rows_per_record * hidden * 2
    t0 = time.perf_counter()
    produce_all(bootstrap, topic, msgs)
    produce_s = time.perf_counter() - t0
    del msgs
    db = f"bench_{label}_{uuid.uuid4().hex[:6]}"
    cpu0, broker0 = cpu_s(), (cpu_s(BROKER_PID) if BROKER_PID else 0.0)
    load0 = os.getloadavg()
    loader, thread = start_loader(bootstrap, topic, client, db, decoder=decoder, insert=insert, **loader_kw)
    native_on = loader.core.native
    n_messages = -(-n_records // per_message)
    inserts = []       # (seconds since the phase's start, rows) per accepted insert
    loader.on_inserted = lambda batch, _ns: inserts.append((time.perf_counter(), batch.tensor_rows))
    first = consumed = None
    while loader.stats.tensor_rows < n_records:
        if first is None and loader.stats.messages:
            first = time.perf_counter()
        if consumed is None and loader.stats.messages >= n_messages:
            consumed = time.perf_counter()
        time.sleep(0.002)
    done = time.perf_counter()
    cpu, broker_cpu = cpu_s() - cpu0, (cpu_s(BROKER_PID) - broker0 if BROKER_PID else None)
    loader.stop()
    thread.join()
    secs = done - first
    return {"decoder": decoder, "native_in_use": native_on, "insert": insert, "insert_path": loader.stats.insert_path,
            "load_avg_start": load0, "load_avg_end": os.getloadavg(),
            "records": n_records, "row_bytes": rows_per_record * hidden * 2, "payload_MB": payload_bytes / 1e6,
            "seconds": secs, "rows_per_s": n_records / secs, "MB_per_s": payload_bytes / secs / 1e6,
            "produce_s": produce_s, "batches": loader.stats.batches,
            # when the consume thread had read every message, and when each insert was accepted (s after the
            # first message): the tail after the last message is the last batch's wait (batch_max_delay_s) + flush
            "all_consumed_s": (consumed or done) - first, "inserts_s_rows": [(t - first, n) for t, n in inserts],
            "consume_thread_decode_s": loader.stats.decode_seconds, "insert_thread_arrow_s": loader.stats.arrow_seconds,
            "insert_thread_insert_s": loader.stats.insert_seconds,
            # where the 2 cores went: the loader process (all its threads, chDB's included) and the broker
            "loader_process_cpu_s": cpu, "broker_cpu_s": broker_cpu}


def paced_producer(bootstrap, topic, rate_mbps, seconds, hidden, per_message):
    """Runs in its own process: per_message 4 KiB records per envelope, paced to rate_mbps."""
    from kafka import KafkaProducer

    p = KafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=5, batch_size=1 << 20,
                      max_request_size=8 << 20)
    rng = np.random.default_rng(1)
    rows = bf16_rows(4096, hidden, rng)
    row_bytes = hidden * 2
    msg_bytes = row_bytes * per_message
    interval = msg_bytes / (rate_mbps * 1e6)
    start = time.perf_counter()
    seq, k = 0, 0
    trace = os.urandom(16)
    while time.perf_counter() - start < seconds:
        due = start + k * interval
        now = time.perf_counter()
        if due > now:
            time.sleep(due - now)
        ts = time.time_ns()
        recs = []
        for _ in range(per_message):
            payload = rows[seq % 4096].tobytes()
            recs.append(pb.TensorRecord(
                model_id="bench/model", request_id=f"fresh-{k % 64}", trace_id=trace, hook="resid_pre",
                layer=seq % 32, positions_kind=pb.TOKEN_RANGE, token_start=seq // 32, token_end=seq // 32 + 1,
                phase=pb.DECODE, dtype=pb.BFLOAT16, shape=[1, hidden], encoding=pb.RAW, raw_size=row_bytes,
                payload=payload, capture_time_unix_nano=ts, export_time_unix_nano=ts, producer=PRODUCER, seq=seq))
            seq += 1
        p.send(topic, key=f"fresh-{k % 64}".encode(), value=codec.encode_envelope(recs))
        k += 1
    p.flush()
    p.close()


def phase_freshness(bootstrap, client, rate_mbps, seconds, hidden=2048, per_message=16, insert="loader") -> dict:
    topic = create_topic(bootstrap)
    lat_ms: list[float] = []
    loader, thread = start_loader(bootstrap, topic, client, "bench_fresh", insert=insert)

    def on_inserted(batch, done_ns):
        lat_ms.extend(((done_ns - batch.capture_times()) / 1e6).tolist())
    loader.on_inserted = on_inserted
    while not loader.ready.is_set():
        time.sleep(0.05)
    proc = multiprocessing.get_context("spawn").Process(
        target=paced_producer, args=(bootstrap, topic, rate_mbps, seconds, hidden, per_message))
    proc.start()
    proc.join()
    expected = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        n = loader.stats.tensor_rows
        if n == expected:
            break
        expected = n
        time.sleep(1.0)
    loader.stop()
    thread.join()
    lat = sorted(lat_ms)
    q = lambda f: lat[min(len(lat) - 1, int(f * len(lat)))]
    return {"rate_MBps": rate_mbps, "seconds": seconds, "rows": len(lat), "insert_path": loader.stats.insert_path, "p50_ms": q(0.5), "p99_ms": q(0.99),
            "max_ms": lat[-1], "achieved_MBps": len(lat) * hidden * 2 / seconds / 1e6}


def phase_readback(bootstrap, client, repeats=5, insert="loader") -> dict:
    import torch

    from tensortrace.testing.synthetic import SyntheticRequest
    from tensortrace.query import TensorTraceClient
    from tensortrace.query.server import serve

    topic = create_topic(bootstrap, partitions=1)
    req = SyntheticRequest.make("readback-512x32", layers=32, hidden=2048, prompt=257, generated=256,
                                final_hook=None, seed=7)
    produce_all(bootstrap, topic, req.messages(per_message=230))
    loader, thread = start_loader(bootstrap, topic, client, "bench_read", insert=insert)
    while loader.stats.summary_rows < 1:
        time.sleep(0.05)
    loader.stop()
    thread.join()
    direct = TensorTraceClient(client, database="bench_read")
    got = direct.tensors(request_id=req.request_id)
    assert got.completeness.state == "complete", got.completeness
    assert all(torch.equal(got[k].tensor, v) for k, v in req.truth.items()), "read-back is not bit-exact"
    shape = list(got["resid_pre", 0].tensor.shape)
    times = {}
    from tensortrace.service.security import EndpointSecurity

    server, port = serve(client, database="bench_read", port=0, security=EndpointSecurity.loopback_plaintext())
    remote = TensorTraceClient(f"grpc://127.0.0.1:{port}")
    for name, tt in (("direct", direct), ("grpc", remote)):
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            tt.tensors(request_id=req.request_id)
            ts.append((time.perf_counter() - t0) * 1000)
        times[name] = {"median_ms": statistics.median(ts), "min_ms": min(ts), "runs_ms": ts}
    remote.close()
    server.stop(grace=0)
    return {"records": len(req.records), "positions_x_layers": f"{shape[0]}x32", "hidden": 2048,
            "payload_MB": sum(r.raw_size for r in req.records) / 1e6, **times}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bootstrap", help="existing Kafka broker; default: start a local one")
    p.add_argument("--json", default=".cache/bench/loader_throughput.json")
    p.add_argument("--small-records", type=int, default=40_000, help="4 KiB records in phase 1 (0: skip them)")
    p.add_argument("--large-records", type=int, default=600, help="256 KiB records in phase 1 (0: skip them)")
    p.add_argument("--rate-mbps", type=float, default=20.0)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--payload-codec", default=None, help="ClickHouse codec of the payload column (default: the loader's)")
    p.add_argument("--skip", default="", help="comma-separated phases to skip: throughput,freshness,readback")
    p.add_argument("--decoder", default="native,python", help="phase 1 per decoder, side by side: native, python")
    p.add_argument("--repeats", type=int, default=1, help="phase 1 runs per decoder (alternating); the median is reported")
    p.add_argument("--insert", default="loader", help="phase 1 per insert path, side by side: loader, insert_arrow")
    p.add_argument("--warmup", type=int, default=4000,
                   help="4 KiB records loaded once, untimed, before phase 1 (0: none): the first load in a process "
                        "paid for the broker's JIT and the engine's first use, whichever side ran first")
    a = p.parse_args(argv)
    skip = set(filter(None, a.skip.split(",")))
    import clickhouse_connect

    from tensortrace.storage import ThreadSafeClient

    broker = None
    bootstrap = a.bootstrap
    if not bootstrap:
        from tensortrace.devkafka import LocalKafka

        broker = LocalKafka()
        broker.start()
        bootstrap = broker.bootstrap
        global BROKER_PID
        BROKER_PID = broker.pid
    chdb_dir = tempfile.mkdtemp(prefix="tt-loader-bench-")   # removed at the end (GBs of parts)
    client = ThreadSafeClient(clickhouse_connect.get_client(dsn=f"chdb://{chdb_dir}"))
    results: dict = {"benchmark": "loader_throughput", "machine": f"{os.cpu_count()} cores, shared", "argv": sys.argv[1:],
                     "load_avg_start": os.getloadavg()}
    inserts = [i for i in a.insert.split(",") if i]
    for i in inserts:
        if i not in ("loader", "insert_arrow"):
            raise SystemExit(f"--insert {i!r}: expected loader or insert_arrow")
    # one side per (decoder, insert path); named by the decoder alone when only the loader's path runs
    sides = [(d, i, d if inserts == ["loader"] else f"{d}/{i}") for i in inserts for d in a.decoder.split(",") if d]
    decoders = [name for _, _, name in sides]
    try:
        if "throughput" not in skip:
            kw = {"payload_codec": a.payload_codec} if a.payload_codec else {}
            results["payload_codec"] = a.payload_codec or "loader default"
            if a.warmup:
                results["warmup"] = phase_throughput(bootstrap, client, "warmup", a.warmup, 1, 2048, 32,
                                                     decoder=sides[0][0], insert=sides[0][1], **kw)
                print("warm-up (not counted):", json.dumps(results["warmup"]), flush=True)
            for key, label, n, rows, per in (("throughput_4KiB", "small", a.small_records, 1, 32),
                                             ("throughput_256KiB", "large", a.large_records, 64, 3)):
                if not n:
                    continue
                runs = {dec: [] for dec in decoders}
                for _ in range(a.repeats):          # alternating, so every side sees the same load
                    for dec, ins, name in sides:
                        r = phase_throughput(bootstrap, client, label, n, rows, 2048, per, decoder=dec, insert=ins, **kw)
                        runs[name].append(r)
                        print(f"{key} ({name}):", json.dumps(r), flush=True)
                for dec in decoders:   # the median run by MB/s, with every run's MB/s beside it
                    ordered = sorted(runs[dec], key=lambda r: r["MB_per_s"])
                    results[f"{key}_{dec}"] = dict(ordered[len(ordered) // 2],
                                                   runs_MB_per_s=[r["MB_per_s"] for r in runs[dec]],
                                                   runs_load_avg=[r["load_avg_start"][0] for r in runs[dec]])
                results[key] = results[f"{key}_{decoders[0]}"]
        if "freshness" not in skip:
            results["freshness"] = phase_freshness(bootstrap, client, a.rate_mbps, a.seconds, insert=inserts[0])
            print("freshness:", json.dumps(results["freshness"]), flush=True)
        if "readback" not in skip:
            results["readback"] = phase_readback(bootstrap, client, insert=inserts[0])
            print("read-back:", json.dumps({k: v for k, v in results["readback"].items()}), flush=True)
    finally:
        if broker is not None:
            broker.close()
        try:
            client.close()
        finally:
            shutil.rmtree(chdb_dir, ignore_errors=True)
    print()
    print(f"{'measure':<38}{'value':>14}{'target':>14}")
    if "throughput_4KiB" in results or "throughput_256KiB" in results:
        for key, label in (("throughput_4KiB", "4 KiB rows"), ("throughput_256KiB", "256 KiB rows")):
            if key not in results:
                continue
            for dec in decoders:
                r = results[f"{key}_{dec}"]
                tag = f"{label} ({dec})"
                print(f"{tag + ' rows/s':<38}{r['rows_per_s']:>14,.0f}{'>= 20,000' if key.endswith('4KiB') else '':>14}")
                target = (">= 200" if dec.startswith("native") else ">= 100") if key.endswith("4KiB") else ">= 100"
                print(f"{tag + ' MB/s':<38}{r['MB_per_s']:>14,.1f}{target:>14}")
                if len(r.get("runs_MB_per_s", [])) > 1:
                    print(f"{tag + ' runs MB/s':<38}{', '.join(f'{x:.1f}' for x in r['runs_MB_per_s']):>28}")
                print(f"{tag + ' load avg':<38}{r['load_avg_start'][0]:>14.2f}")
    if "freshness" in results:
        r = results["freshness"]
        print(f"{'freshness p50 @ %.0f MB/s (ms)' % r['rate_MBps']:<38}{r['p50_ms']:>14,.0f}{'':>14}")
        print(f"{'freshness p99 @ %.0f MB/s (ms)' % r['rate_MBps']:<38}{r['p99_ms']:>14,.0f}{'< 2,000':>14}")
    if "readback" in results:
        r = results["readback"]
        print(f"{'read-back 512x32, direct (ms, median)':<38}{r['direct']['median_ms']:>14,.0f}{'< 200':>14}")
        print(f"{'read-back 512x32, gRPC (ms, median)':<38}{r['grpc']['median_ms']:>14,.0f}{'< 200':>14}")
    results["load_avg_end"] = os.getloadavg()
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
