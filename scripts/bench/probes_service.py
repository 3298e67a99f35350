"""Probe service benchmark: scoring throughput, activations read, and freshness (end of request ->
score acknowledged on the scores topic), with the loader's end of request -> queryable on the same
stream as the baseline.

    .venv/bin/python scripts/bench/probes_service.py [--json .cache/bench/probes_service.json] [--requests 5000] [--decoder native,python]

Requests are synthetic, shaped like SmolLM2-135M's stream: hidden 576, bf16, RAW payloads, one
record per (layer, step) as the exporter splits them, packed into envelopes of <= 16 records, keyed
by request id, then the RequestSummary. The probe is the SDK's linear probe with last-token pooling
on resid_pre layer 10 (`tensortrace.probes.Probe`, saved to and loaded from a file).

Phases (targets from issue 12):
  1. in process, no Kafka: records -> ScoresSink (RequestView + keep + the probe + ProbeScore
     serialisation; publishing stubbed) -> requests/s. (a) a 1-layer stream (what the probe needs);
     (b) a 30-layer stream, envelopes decoded too -> MB/s of activations and how many payload bytes
     were never decoded; (c) the same stream with a probe that needs all 30 layers (mean over
     layers and tokens): every payload decoded, for comparison.
  2. end to end through a local Kafka broker: N requests pre-produced to a 4-partition topic; the
     probe service (in this process) reads from offset 0 and publishes every score with acks=all;
     time from its first message to the last score acknowledged. (a) 1-layer stream: requests/s
     (target >= 5,000); (b) 30-layer stream, probe needs one layer: MB/s of activations read
     (target >= 500 MB/s).
  3. freshness at --rate-mbps (20 MB/s) of a 30-layer stream for --seconds: a producer process paces
     whole requests (prompt 32, 16 generated tokens); the summary's end time is stamped as it is sent.
     (a) the probe service: end of request -> its score acknowledged by Kafka (the sink's on_durable
     hook), p50/p99 (target p99 <= 250 ms); (b) baseline, same producer settings, run after it:
     the loader, end of request -> its summary row accepted by ClickHouse (queryable).
`--decoder native,python`: phases 1 and 2 run once per decoder, side by side (alternating):
"native" is the consumer core's native envelope scanner into ScoresSink.add_scan
(tensortrace.wire.native; the default where it is built), "python" the same service with it off
(what TENSORTRACE_NATIVE=0 does). Phase 3 uses the first decoder listed. Every phase records the
load average at its start and end (the machine is shared); phase 2 also the CPU seconds of this
process (all its threads) per request.
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

import numpy as np

from tensortrace.v1 import records_pb2 as pb
from tensortrace.wire import codec

HIDDEN = 576
MODEL = "bench/smollm2-shaped"
PROBE_LAYER = 10
PRODUCER = pb.Producer(node="bench-node", pod="bench-pod", pid=1, tp_rank=0, generation=1)
ROWS = np.random.default_rng(7).integers(0, 1 << 16, size=(4096, HIDDEN), dtype=np.uint16)
# keep bf16 values finite and moderate: clear the top exponent bits
ROWS = (ROWS & 0x3FFF) | 0x3000


def request_parts(rid: str, layers: list[int], prompt: int, generated: int, seq0: int,
                  end_ns: int | None = None) -> tuple[list, pb.RequestSummary, int]:
    """(records in step order, summary, payload bytes) of one request."""
    trace, span = uuid.uuid4().bytes, os.urandom(8)
    now = time.time_ns()
    recs, seq, nbytes = [], seq0, 0
    steps = [(0, prompt, pb.PREFILL, 0)] + [(t, t + 1, pb.DECODE, 1 + t - prompt) for t in range(prompt, prompt + generated - 1)]
    for start, end, phase, step in steps:
        for layer in layers:
            rows = ROWS[(seq * 7) % (4096 - prompt): (seq * 7) % (4096 - prompt) + end - start]
            payload = rows.tobytes()
            nbytes += len(payload)
            recs.append(pb.TensorRecord(model_id=MODEL, request_id=rid, trace_id=trace, span_id=span, hook="resid_pre",
                                        layer=layer, positions_kind=pb.TOKEN_RANGE, token_start=start, token_end=end,
                                        phase=phase, step=step, dtype=pb.BFLOAT16, shape=[end - start, HIDDEN],
                                        encoding=pb.RAW, raw_size=len(payload), payload=payload,
                                        capture_time_unix_nano=now, export_time_unix_nano=now, producer=PRODUCER, seq=seq))
            seq += 1
    summary = pb.RequestSummary(model_id=MODEL, request_id=rid, trace_id=trace, span_id=span, producer=PRODUCER, seq=seq,
                                records_captured=len(recs), bytes_captured=nbytes, complete=True, prompt_tokens=prompt,
                                generated_tokens=generated, finish_reason="length", hooks=["resid_pre"],
                                start_time_unix_nano=now, end_time_unix_nano=end_ns or time.time_ns(),
                                export_time_unix_nano=time.time_ns(), sampled=True, producers=1)
    return recs, summary, nbytes


def envelopes(rid: str, recs: list, summary: pb.RequestSummary | None, per_message: int = 16) -> list[tuple[bytes, bytes]]:
    parts = list(recs) + ([summary] if summary is not None else [])
    return [(rid.encode(), codec.encode_envelope(parts[i:i + per_message])) for i in range(0, len(parts), per_message)]


def build(n: int, layers: list[int], prompt: int, generated: int, prefix: str):
    msgs, nbytes, seq = [], 0, 0
    for i in range(n):
        recs, summ, b = request_parts(f"{prefix}-{i}", layers, prompt, generated, seq)
        seq += len(recs) + 1
        nbytes += b
        msgs.extend(envelopes(f"{prefix}-{i}", recs, summ))
    return msgs, nbytes


def make_probe_dir(all_layers: bool = False) -> str:
    """A directory with the benchmark's probe: last-token pooling on layer 10; or (all_layers) a
    mean-pooled probe over all 30 layers (layer_combine mean): every payload must be decoded."""
    from tensortrace.probes import Probe, ProbeMeta, save_probe

    rng = np.random.default_rng(0)
    if all_layers:
        meta = ProbeMeta(model_id=MODEL, hook="resid_pre", layers=list(range(30)), width=HIDDEN, pooling="mean",
                         layer_combine="mean", threshold=0.5)
        name = "mean_all_layers"
    else:
        meta = ProbeMeta(model_id=MODEL, hook="resid_pre", layers=[PROBE_LAYER], width=HIDDEN, pooling="last",
                         threshold=0.5)
        name = "last_token_l10"
    probe = Probe(meta, {"weight": (rng.normal(size=HIDDEN) / 24).astype(np.float32), "bias": np.zeros(1, np.float32)},
                  name=name)
    d = tempfile.mkdtemp(prefix="tt-probes-bench-")
    save_probe(probe, d)
    return d


# -- phase 1: in process ------------------------------------------------------------------------------

POLL_MESSAGES = 64   # messages per simulated poll in phase 1 (the core seals once per poll, not per message)


def phase_inprocess(probe_dir: str, n: int, layers: list[int], prompt: int, generated: int, repeat: int,
                    decoder: str = "python") -> dict:
    """`decoder`: "python" (codec.decode_envelope + add_tensor/add_summary per record) or "native"
    (the scanner + add_scan, what ConsumerCore does when the extension is built)."""
    from tensortrace.consume import SealedBatch, Source
    from tensortrace.wire import native
    from tensortrace.probes.service_probeset import ProbeDirectory
    from tensortrace.probes.sink import ScoresSink

    msgs, nbytes = build(n, layers, prompt, generated, f"ip{len(layers)}")
    times, cpu = [], []
    for _ in range(repeat):
        probes = ProbeDirectory(probe_dir)
        probes.reload(force=True)
        published = []
        sink = ScoresSink(probes, lambda m, stopping: published.extend(m) or True, scores_topic="scores",
                          max_requests=100_000, max_bytes=8 << 30)
        stop = threading.Event()
        c0 = time.process_time()
        t0 = time.perf_counter()
        for off, (_, value) in enumerate(msgs):
            src = Source("t", 0, off)
            sc = native.scan(value) if decoder == "native" else None
            if sc is not None:
                assert not sink.add_scan(sc, src)
            else:
                for rec in codec.decode_envelope(value):
                    if rec.WhichOneof("kind") == "summary":
                        sink.add_summary(rec.summary, src)
                    else:
                        sink.add_tensor(rec.tensor, src)
            # as the consumer core: the sink is asked once per poll (here: per POLL_MESSAGES messages)
            if off % POLL_MESSAGES == POLL_MESSAGES - 1 and sink.due():
                sink.flush(SealedBatch(data=sink.seal()), stop)
        data = sink.seal()
        if data is not None:
            sink.flush(SealedBatch(data=data), stop)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        assert sink.stats.scores == n, (sink.stats.scores, n)
    best = min(times)
    st = sink.stats
    return {"decoder": decoder, "requests": n, "layers_in_stream": len(layers), "payload_MB": nbytes / 1e6, "seconds_best": best,
            "seconds_all": times, "requests_per_s": n / best, "MB_per_s": nbytes / best / 1e6,
            # CPU time of this process: on a shared machine the steadier measure of the code's own cost
            "cpu_seconds_all": cpu, "requests_per_cpu_s": n / min(cpu), "MB_per_cpu_s": nbytes / min(cpu) / 1e6,
            "records_kept": st.records_kept, "records_skipped": st.records_skipped,
            "payload_bytes_decoded": st.bytes_kept, "payload_bytes_never_decoded": st.bytes_skipped,
            "score_seconds": st.score_seconds}


# -- phase 2: end to end through Kafka -----------------------------------------------------------------

def create_topic(bootstrap: str, partitions: int) -> str:
    from tensortrace.testing.kafka import create_topics

    return create_topics(bootstrap, partitions, prefix="bench-probes", dlq=True)


def produce_all(bootstrap: str, topic: str, msgs) -> None:
    from kafka import KafkaProducer

    p = KafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=5, batch_size=1 << 20, max_request_size=1 << 20)
    futures = [p.send(topic, key=k, value=v) for k, v in msgs]
    for f in futures:
        f.get(timeout=300)
    p.close()


def probes_service(bootstrap, topic, probe_dir, decoder="native", **kw):
    from tensortrace.probes.config import ProbesConfig
    from tensortrace.probes.service import ProbesService
    from tensortrace.service import KafkaConfig

    scores = create_topic(bootstrap, 1)
    cfg = ProbesConfig(kafka=KafkaConfig(bootstrap_servers=bootstrap), topic=topic, dlq_topic=topic + ".dlq",
                       group_id=f"g-{topic}", probe_dir=probe_dir, scores_topic=scores, escalation_topic="", **kw)
    svc = ProbesService(cfg)
    if decoder == "python":
        svc.core.disable_native()      # what TENSORTRACE_NATIVE=0 does
    t = threading.Thread(target=svc.run, daemon=True)
    t.start()
    return svc, t


def fetch_only(bootstrap, topic, n_messages: int, payload_bytes: int) -> dict:
    """kafka-python alone, with the consumer core's fetch settings: every message of the topic polled
    and dropped, nothing decoded. What the client's fetch caps the service at."""
    from kafka import KafkaConsumer, TopicPartition

    from tensortrace.consume import ConsumerConfig

    cfg = ConsumerConfig()
    c = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, max_poll_records=cfg.max_poll_records,
                      fetch_max_bytes=cfg.fetch_max_bytes, max_partition_fetch_bytes=cfg.max_partition_fetch_bytes)
    parts = [TopicPartition(topic, p) for p in c.partitions_for_topic(topic)]
    c.assign(parts)
    c.seek_to_beginning(*parts)
    got, nbytes = 0, 0
    t0, c0 = time.perf_counter(), time.process_time()
    deadline = time.monotonic() + 300
    while got < n_messages and time.monotonic() < deadline:
        for msgs in c.poll(timeout_ms=200).values():
            got += len(msgs)
            nbytes += sum(len(m.value) for m in msgs)
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    c.close()
    return {"messages": got, "wire_MB": nbytes / 1e6, "seconds": secs, "messages_per_s": got / secs,
            "MB_per_s_activations": payload_bytes / secs / 1e6, "cpu_us_per_message": cpu / max(1, got) * 1e6}


def fetch_only_confluent(bootstrap, topic, n_messages: int, payload_bytes: int) -> dict:
    """The same fetch with confluent-kafka (librdkafka), the consumer core's client since session 6,
    polled the way the core polls (whatever is queued, up to max_poll_records), nothing decoded."""
    from confluent_kafka import Consumer, TopicPartition

    from tensortrace.consume import ConsumerConfig

    cfg = ConsumerConfig()
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "fetch-only-" + topic, "enable.auto.commit": False,
                  "auto.offset.reset": "earliest", "fetch.max.bytes": cfg.fetch_max_bytes,
                  "max.partition.fetch.bytes": cfg.max_partition_fetch_bytes})
    md = c.list_topics(topic, timeout=30)
    c.assign([TopicPartition(topic, p, 0) for p in md.topics[topic].partitions])
    got, nbytes = 0, 0
    t0, c0 = time.perf_counter(), time.process_time()
    deadline = time.monotonic() + 300
    while got < n_messages and time.monotonic() < deadline:
        for m in c.consume(cfg.max_poll_records, 0.2):
            if m.error() is None:
                got += 1
                nbytes += len(m.value())
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    c.close()
    return {"messages": got, "wire_MB": nbytes / 1e6, "seconds": secs, "messages_per_s": got / secs,
            "MB_per_s_activations": payload_bytes / secs / 1e6, "cpu_us_per_message": cpu / max(1, got) * 1e6}


def phase_kafka(bootstrap, probe_dir, n, layers, prompt, generated, decoder="native", fetch=False) -> dict:
    topic = create_topic(bootstrap, 4)
    msgs, nbytes = build(n, layers, prompt, generated, f"k{len(layers)}-{uuid.uuid4().hex[:6]}")
    t0 = time.perf_counter()
    produce_all(bootstrap, topic, msgs)
    produce_s = time.perf_counter() - t0
    wire_bytes = sum(len(v) for _, v in msgs)
    n_messages = len(msgs)
    del msgs
    fetched = fetch_only(bootstrap, topic, n_messages, nbytes) if fetch else None
    if fetch:
        fetched["confluent_kafka"] = fetch_only_confluent(bootstrap, topic, n_messages, nbytes)
    load0 = os.getloadavg()
    svc, thread = probes_service(bootstrap, topic, probe_dir, decoder=decoder, max_open_requests=100_000,
                                 max_open_bytes=4 << 30)
    native_on = svc.core.native
    first = None
    cpu0 = 0.0
    deadline = time.monotonic() + 900
    while svc.stats.scores < n and time.monotonic() < deadline:
        if first is None and svc.core.stats.messages:
            first, cpu0 = time.perf_counter(), time.process_time()
        time.sleep(0.002)
    done, cpu = time.perf_counter(), time.process_time() - cpu0
    svc.stop()
    thread.join(timeout=60)
    secs = done - (first or done)
    st, cs = svc.stats, svc.core.stats
    return {"decoder": decoder, "native_in_use": native_on, "load_avg_start": load0, "load_avg_end": os.getloadavg(),
            "cpu_s": cpu, "cpu_us_per_request": cpu / max(1, st.scores) * 1e6,
            "requests": n, "layers_in_stream": len(layers), "payload_MB": nbytes / 1e6, "wire_MB": wire_bytes / 1e6,
            "scores": st.scores, "seconds": secs, "requests_per_s": st.scores / secs if secs else 0.0,
            "MB_per_s": nbytes / secs / 1e6 if secs else 0.0, "produce_s": produce_s,
            "consume_thread_s": cs.decode_seconds, "paused": cs.paused, "commits": cs.commits, "score_s": st.score_seconds, "publish_s": st.publish_seconds,
            "payload_bytes_decoded": st.bytes_kept, "payload_bytes_never_decoded": st.bytes_skipped,
            "complete_scores": st.scores - st.incomplete_scores, "messages": n_messages,
            **({"fetch_only": fetched} if fetched else {})}


# -- phase 2c: one consumer group of several service processes ---------------------------------------

def _member(bootstrap, topic, probe_dir, group, scores_topic, total, stop, out) -> None:
    """One probe service process of the group: scores until `stop`, then reports its timeline."""
    import logging
    import resource

    logging.basicConfig(level=logging.ERROR)
    from tensortrace.probes.config import ProbesConfig
    from tensortrace.probes.service import ProbesService
    from tensortrace.service import KafkaConfig

    cfg = ProbesConfig(kafka=KafkaConfig(bootstrap_servers=bootstrap), topic=topic, dlq_topic=topic + ".dlq",
                       group_id=group, probe_dir=probe_dir, scores_topic=scores_topic, escalation_topic="",
                       max_open_requests=100_000, max_open_bytes=4 << 30)
    svc = ProbesService(cfg)
    scored: list[tuple[float, int]] = []      # (time, scores acknowledged in that flush)

    def on_durable(scores):
        scored.append((time.time(), len(scores)))
        with total.get_lock():
            total.value += len(scores)
    svc.sink.on_durable = on_durable
    assigned: list[tuple[float, list]] = []   # (time, partitions) at every change of the assignment
    t = threading.Thread(target=svc.run, daemon=True)
    t.start()
    last = None
    while not stop.is_set():
        now = sorted(tp.partition for tp in svc.core.assigned)
        if now != last:
            assigned.append((time.time(), now))
            last = now
        time.sleep(0.01)
    svc.stop()
    t.join(timeout=60)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    out.put({"scored": scored, "assigned": assigned, "cpu_s": ru.ru_utime + ru.ru_stime,
             "messages": svc.core.stats.messages, "partitions_lost": svc.core.stats.partitions_lost})


def phase_group(bootstrap, probe_dir, n, layers, prompt, generated, members: int) -> dict:
    """N requests pre-produced to a 4-partition topic, read by `members` probe service processes in
    one consumer group (how the service scales: the chart's replicas). The rate is taken over the
    steady window, from the moment the last member got its partitions (no rebalance after it) to the
    last score acknowledged: scores acknowledged in that window / its length. Also the whole span
    (first score to last), which includes the joins."""
    ctx = multiprocessing.get_context("spawn")
    topic = create_topic(bootstrap, 4)
    scores_topic = create_topic(bootstrap, 1)
    msgs, nbytes = build(n, layers, prompt, generated, f"g{members}-{len(layers)}-{uuid.uuid4().hex[:6]}")
    produce_all(bootstrap, topic, msgs)
    n_messages = len(msgs)
    del msgs
    total, stop, out = ctx.Value("l", 0), ctx.Event(), ctx.Queue()
    load0 = os.getloadavg()
    procs = [ctx.Process(target=_member, args=(bootstrap, topic, probe_dir, f"g-{topic}", scores_topic, total, stop, out))
             for _ in range(members)]
    for pr in procs:
        pr.start()
    deadline = time.monotonic() + 900
    while total.value < n and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    reports = [out.get(timeout=120) for _ in procs]
    for pr in procs:
        pr.join(timeout=60)
    events = sorted(e for r in reports for e in r["scored"])
    settled = max(r["assigned"][-1][0] for r in reports if r["assigned"])
    end = events[-1][0] if events else settled
    in_window = sum(k for t_, k in events if t_ > settled)
    window = end - settled
    per_member_parts = [r["assigned"][-1][1] if r["assigned"] else [] for r in reports]
    scores = sum(k for _, k in events)
    return {"members": members, "requests": n, "layers_in_stream": len(layers), "payload_MB": nbytes / 1e6,
            "messages": n_messages, "scores": scores, "load_avg_start": load0, "load_avg_end": os.getloadavg(),
            "partitions_per_member": per_member_parts,
            "steady_window_s": window, "steady_scores": in_window,
            "requests_per_s": in_window / window if window > 0 else 0.0,
            "MB_per_s": in_window / window * nbytes / n / 1e6 if window > 0 else 0.0,
            "whole_span_s": end - events[0][0] if events else 0.0,
            "cpu_s_members": [r["cpu_s"] for r in reports],
            "cpu_us_per_request": sum(r["cpu_s"] for r in reports) / max(1, scores) * 1e6,
            "partitions_lost": sum(r["partitions_lost"] for r in reports)}


# -- phase 3: freshness ---------------------------------------------------------------------------------

def paced_producer(bootstrap, topic, rate_mbps, seconds, layers, prompt, generated, concurrent, done_requests=None):
    """Its own process: `concurrent` requests in flight, their steps interleaved; bytes paced to
    rate_mbps; each summary stamped with end time = when it is sent."""
    from kafka import KafkaProducer

    p = KafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=1, batch_size=1 << 20, max_request_size=1 << 20)
    start = time.perf_counter()
    sent_bytes, k, seq = 0, 0, 0
    open_reqs: list = []
    while time.perf_counter() - start < seconds or open_reqs:
        while len(open_reqs) < concurrent and time.perf_counter() - start < seconds:
            rid = f"fresh-{k}"
            k += 1
            recs, _, _ = request_parts(rid, layers, prompt, generated, seq)
            seq += len(recs) + 1
            steps: dict[int, list] = {}
            for r in recs:
                steps.setdefault(r.step, []).append(r)
            open_reqs.append([rid, recs, list(steps.values()), seq - 1])
        if not open_reqs:
            break
        req = open_reqs.pop(0)
        rid, recs, steps, sseq = req
        batch = steps.pop(0)
        for key, value in envelopes(rid, batch, None):
            p.send(topic, key=key, value=value)
        sent_bytes += sum(len(r.payload) for r in batch)
        if steps:
            open_reqs.append(req)
        else:
            now = time.time_ns()
            first = recs[0]
            summ = pb.RequestSummary(model_id=MODEL, request_id=rid, trace_id=first.trace_id, span_id=first.span_id,
                                     producer=PRODUCER, seq=sseq, records_captured=len(recs),
                                     bytes_captured=sum(r.raw_size for r in recs), complete=True, prompt_tokens=prompt,
                                     generated_tokens=generated, finish_reason="length", hooks=["resid_pre"],
                                     start_time_unix_nano=now, end_time_unix_nano=now, export_time_unix_nano=now,
                                     sampled=True, producers=1)
            p.send(topic, key=rid.encode(), value=codec.encode_envelope([summ]))
            if done_requests is not None:
                done_requests.value += 1
        due = start + sent_bytes / (rate_mbps * 1e6)
        lag = due - time.perf_counter()
        if lag > 0:
            time.sleep(lag)
    p.flush()
    p.close()


def _quantiles(lat: list[float]) -> dict:
    lat = sorted(lat)
    if not lat:
        return {"n": 0}
    q = lambda f: lat[min(len(lat) - 1, int(f * len(lat)))]   # noqa: E731
    return {"n": len(lat), "p50_ms": q(0.5), "p90_ms": q(0.9), "p99_ms": q(0.99), "max_ms": lat[-1]}


def run_producer(bootstrap, topic, a, layers) -> tuple[float, int]:
    """(seconds the producer ran, requests it sent)."""
    ctx = multiprocessing.get_context("spawn")
    sent = ctx.Value("i", 0)
    proc = ctx.Process(target=paced_producer, args=(bootstrap, topic, a.rate_mbps, a.seconds, layers, 32, 16,
                                                    a.concurrent, sent))
    t0 = time.perf_counter()
    proc.start()
    proc.join()
    return time.perf_counter() - t0, sent.value


def phase_freshness_probes(bootstrap, probe_dir, a, layers, decoder="native") -> dict:
    topic = create_topic(bootstrap, 4)
    lat: list[float] = []
    svc, thread = probes_service(bootstrap, topic, probe_dir, decoder=decoder, batch_max_delay_s=0.05)
    observe = svc.sink.on_durable

    def on_durable(scores):
        now = time.time_ns()
        lat.extend((now - s.request_end_time_unix_nano) / 1e6 for s in scores)
        observe(scores)
    svc.sink.on_durable = on_durable
    while not svc.ready():
        time.sleep(0.05)
    wall, sent = run_producer(bootstrap, topic, a, layers)
    deadline = time.monotonic() + 180
    while svc.stats.scores < sent and time.monotonic() < deadline:
        time.sleep(0.2)
    svc.stop()
    thread.join(timeout=60)
    out = _quantiles(lat)
    out.update(rate_MBps=a.rate_mbps, producer_seconds=wall, requests_sent=sent, scores=svc.stats.scores,
               complete=svc.stats.scores - svc.stats.incomplete_scores,
               achieved_MBps=(svc.stats.bytes_kept + svc.stats.bytes_skipped) / a.seconds / 1e6)
    return out


def phase_freshness_loader(bootstrap, a, layers) -> dict:
    import clickhouse_connect

    from tensortrace.loader.config import LoaderConfig
    from tensortrace.loader.service import Loader
    from tensortrace.service import KafkaConfig
    from tensortrace.storage import ThreadSafeClient

    topic = create_topic(bootstrap, 4)
    chdb_dir = tempfile.mkdtemp(prefix="tt-probes-bench-chdb-")
    client = ThreadSafeClient(clickhouse_connect.get_client(dsn=f"chdb://{chdb_dir}"))
    lat: list[float] = []
    try:
        cfg = LoaderConfig(kafka=KafkaConfig(bootstrap_servers=bootstrap), topic=topic, dlq_topic=topic + ".dlq",
                           group_id=f"g-{topic}", clickhouse_dsn="chdb://memory", database="bench_fresh")
        loader = Loader(cfg, client=client)

        def on_inserted(batch, done_ns):
            lat.extend((done_ns - t) / 1e6 for t in batch.req["end_time"])
        loader.on_inserted = on_inserted
        thread = threading.Thread(target=loader.run, daemon=True)
        thread.start()
        while not loader.ready.is_set():
            time.sleep(0.05)
        wall, sent = run_producer(bootstrap, topic, a, layers)
        deadline = time.monotonic() + 180
        while len(lat) < sent and time.monotonic() < deadline:
            time.sleep(0.2)
        loader.stop()
        thread.join(timeout=60)
    finally:
        shutil.rmtree(chdb_dir, ignore_errors=True)
    out = _quantiles(lat)
    out.update(rate_MBps=a.rate_mbps, producer_seconds=wall, requests_sent=sent, summaries=len(lat))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bootstrap", help="existing Kafka broker; default: start a local one")
    p.add_argument("--json", default=".cache/bench/probes_service.json")
    p.add_argument("--requests", type=int, default=5000, help="requests in phases 1a and 2a (1-layer stream)")
    p.add_argument("--wide-requests", type=int, default=200, help="requests in phases 1b and 2b (30-layer stream)")
    p.add_argument("--repeat", type=int, default=3, help="in-process runs (best is reported)")
    p.add_argument("--rate-mbps", type=float, default=20.0)
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--concurrent", type=int, default=8, help="requests in flight in the freshness producer")
    p.add_argument("--skip", default="", help="comma-separated phases to skip: inprocess,kafka,freshness,baseline")
    p.add_argument("--decoder", default="native,python", help="phases 1 and 2 per decoder, side by side: native, python")
    p.add_argument("--members", default="1,2", help="phase 2c: probe service processes in one consumer group, "
                                                    "one run per count (native decoder); '' skips it")
    p.add_argument("--group-requests", type=int, default=30000, help="phase 2c: requests of the 1-layer stream")
    p.add_argument("--group-wide-requests", type=int, default=600, help="phase 2c: requests of the 30-layer stream")
    a = p.parse_args(argv)
    skip = set(filter(None, a.skip.split(",")))
    decoders = [d for d in a.decoder.split(",") if d]
    import logging
    logging.basicConfig(level=logging.WARNING)
    probe_dir = make_probe_dir()
    one, thirty = [PROBE_LAYER], list(range(30))
    results: dict = {"benchmark": "probes_service", "machine": f"{os.cpu_count()} cores, shared",
                     "load_avg_start": os.getloadavg(), "argv": sys.argv[1:],
                     "probe": "linear, last-token pooling, resid_pre layer 10, hidden 576",
                     "request": "bf16 RAW, hidden 576; phases 1a/2a: prompt 16 + 8 generated, 1 layer; "
                                "1b/2b and 3: prompt 32 + 16 generated, 30 layers"}
    broker = None
    bootstrap = a.bootstrap
    try:
        if "inprocess" not in skip:
            all_dir = make_probe_dir(all_layers=True)
            try:
                for name, pdir, n, layers, prompt, gen in (
                        ("inprocess_1layer", probe_dir, a.requests, one, 16, 8),
                        ("inprocess_30layer", probe_dir, a.wide_requests, thirty, 32, 16),
                        # the same stream with a probe that needs every layer: what keep() saves
                        ("inprocess_30layer_all_needed", all_dir, a.wide_requests, thirty, 32, 16)):
                    for dec in decoders:
                        load0 = os.getloadavg()
                        r = phase_inprocess(pdir, n, layers, prompt, gen, a.repeat, decoder=dec)
                        r.update(load_avg_start=load0, load_avg_end=os.getloadavg())
                        results[f"{name}_{dec}"] = r
                        print(f"{name} ({dec}):", json.dumps(r), flush=True)
                    results[name] = results[f"{name}_{decoders[0]}"]
            finally:
                shutil.rmtree(all_dir, ignore_errors=True)
        if skip >= {"kafka", "freshness", "baseline"}:
            pass
        elif not bootstrap:
            from tensortrace.devkafka import LocalKafka

            # Kafka's own default (the test broker sets 0): members of a group started together
            # join one balanced assignment instead of the first taking every partition (phase 2c)
            broker = LocalKafka(extra_properties={"group.initial.rebalance.delay.ms": "3000"})
            broker.start()
            bootstrap = broker.bootstrap
        if "kafka" not in skip:
            for name, n, layers, prompt, gen in (("kafka_1layer", a.requests, one, 16, 8),
                                                 ("kafka_30layer", a.wide_requests, thirty, 32, 16)):
                for i, dec in enumerate(decoders):
                    results[f"{name}_{dec}"] = phase_kafka(bootstrap, probe_dir, n, layers, prompt, gen, decoder=dec,
                                                           fetch=i == 0)
                    print(f"{name} ({dec}):", json.dumps(results[f"{name}_{dec}"]), flush=True)
                results[name] = results[f"{name}_{decoders[0]}"]
        if "kafka" not in skip:
            for m in [int(x) for x in a.members.split(",") if x]:
                for name, n, layers, prompt, gen in (("group_1layer", a.group_requests, one, 16, 8),
                                                     ("group_30layer", a.group_wide_requests, thirty, 32, 16)):
                    results[f"{name}_{m}"] = phase_group(bootstrap, probe_dir, n, layers, prompt, gen, m)
                    print(f"{name} ({m} members):", json.dumps(results[f"{name}_{m}"]), flush=True)
        if "freshness" not in skip:
            results["freshness_probes"] = phase_freshness_probes(bootstrap, probe_dir, a, thirty, decoders[0])
            print("freshness, probes:", json.dumps(results["freshness_probes"]), flush=True)
        if "baseline" not in skip:
            results["freshness_loader_baseline"] = phase_freshness_loader(bootstrap, a, thirty)
            print("freshness, loader baseline:", json.dumps(results["freshness_loader_baseline"]), flush=True)
    finally:
        if broker is not None:
            broker.close()
        shutil.rmtree(probe_dir, ignore_errors=True)
    results["load_avg_end"] = os.getloadavg()
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(results, f, indent=2)

    print()
    print(f"{'measure':<58}{'value':>14}{'target':>14}")
    row = lambda name, v, target="": print(f"{name:<58}{v:>14}{target:>14}")   # noqa: E731
    for key, label in (("inprocess_1layer", "in process, 1-layer"), ("inprocess_30layer", "in process, 30-layer"),
                       ("inprocess_30layer_all_needed", "in process, 30-layer, probe on all 30")):
        for dec in decoders:
            r = results.get(f"{key}_{dec}")
            if r:
                row(f"{label} ({dec}): requests/s", f"{r['requests_per_s']:,.0f}")
                row(f"{label} ({dec}): activations MB/s", f"{r['MB_per_s']:,.0f}")
                row(f"{label} ({dec}): per CPU-second: requests / MB", f"{r['requests_per_cpu_s']:,.0f} / {r['MB_per_cpu_s']:,.0f}")
    if "inprocess_30layer" in results:
        r = results["inprocess_30layer"]
        row("in process, 30-layer: payload bytes never decoded", f"{r['payload_bytes_never_decoded'] / max(1, r['payload_bytes_never_decoded'] + r['payload_bytes_decoded']):.1%}")
    for dec in decoders:
        r = results.get(f"kafka_1layer_{dec}")
        if r:
            row(f"Kafka e2e, 1-layer ({dec}): requests/s", f"{r['requests_per_s']:,.0f}", ">= 5,000")
            row(f"Kafka e2e, 1-layer ({dec}): CPU us/request", f"{r['cpu_us_per_request']:,.0f}")
        r = results.get(f"kafka_30layer_{dec}")
        if r:
            row(f"Kafka e2e, 30-layer, 1 needed ({dec}): MB/s", f"{r['MB_per_s']:,.0f}", ">= 500")
    for m in [int(x) for x in a.members.split(",") if x]:
        r = results.get(f"group_1layer_{m}")
        if r:
            row(f"group of {m}, 1-layer, steady: requests/s", f"{r['requests_per_s']:,.0f}", ">= 5,000")
            row(f"group of {m}, 1-layer: CPU us/request (all members)", f"{r['cpu_us_per_request']:,.0f}")
        r = results.get(f"group_30layer_{m}")
        if r:
            row(f"group of {m}, 30-layer, 1 needed, steady: MB/s", f"{r['MB_per_s']:,.0f}", ">= 500")
    for key, label in (("kafka_1layer", "1-layer"), ("kafka_30layer", "30-layer")):
        f = results.get(key, {}).get("fetch_only")
        if f:
            row(f"kafka-python fetch only, {label}: messages/s", f"{f['messages_per_s']:,.0f}")
            row(f"kafka-python fetch only, {label}: activations MB/s", f"{f['MB_per_s_activations']:,.0f}")
            row(f"kafka-python fetch only, {label}: CPU us/message", f"{f['cpu_us_per_message']:,.0f}")
            ck = f.get("confluent_kafka")
            if ck and "error" not in ck:
                row(f"confluent-kafka fetch only, {label}: activations MB/s", f"{ck['MB_per_s_activations']:,.0f}")
                row(f"confluent-kafka fetch only, {label}: CPU us/message", f"{ck['cpu_us_per_message']:,.0f}")
    row("load average at start / end", f"{results['load_avg_start'][0]:.2f} / {os.getloadavg()[0]:.2f}")
    if "freshness_probes" in results and results["freshness_probes"].get("n"):
        r = results["freshness_probes"]
        row(f"freshness @ {a.rate_mbps:.0f} MB/s, end -> score acked: p50 ms", f"{r['p50_ms']:,.0f}")
        row(f"freshness @ {a.rate_mbps:.0f} MB/s, end -> score acked: p99 ms", f"{r['p99_ms']:,.0f}", "<= 250")
    if "freshness_loader_baseline" in results and results["freshness_loader_baseline"].get("n"):
        r = results["freshness_loader_baseline"]
        row("baseline, loader end -> summary queryable: p50 ms", f"{r['p50_ms']:,.0f}")
        row("baseline, loader end -> summary queryable: p99 ms", f"{r['p99_ms']:,.0f}")
    print(f"\nJSON: {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
