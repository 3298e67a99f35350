"""Exporter throughput: memcpy bandwidth (the physical limit), Ring² write+read alone, and
ring -> Kafka through the real exporter on a real local broker, for 4 KiB, 64 KiB and 1 MiB records.

    .venv/bin/python scripts/bench/exporter_throughput.py [--bootstrap HOST:PORT] [--json out.json]

Without --bootstrap a local broker is started (tensortrace.devkafka.LocalKafka). Prints a table and
writes JSON (default: .cache/bench/exporter_throughput.json). Results: docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time

import numpy as np

from tensortrace.exporter.config import ExporterConfig, KafkaConfig
from tensortrace.exporter.service import Exporter
from tensortrace.ring.format import FrameKind, RingIdentity, RingReader, RingWriter
from tensortrace.v1 import records_pb2 as pb
from tensortrace.v1 import ring_pb2

SIZES = {"4KiB": 4 << 10, "64KiB": 64 << 10, "1MiB": 1 << 20}
TARGETS = {  # from issue 4
    "ring_alone": {"1MiB": ("GB/s >= 25% of memcpy", None), "4KiB": ("rec/s >= 100k", 100_000)},
    "ring_kafka": {"1MiB": ("MB/s >= 150", 150e6), "4KiB": ("rec/s >= 20k", 20_000)},
}


def memcpy_bandwidth(total_bytes: int = 2 << 30) -> float:
    src = np.random.default_rng(0).integers(0, 255, size=1 << 20, dtype=np.uint8)
    dst = np.empty_like(src)
    n = total_bytes // src.nbytes
    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(n):
            np.copyto(dst, src)
        best = max(best, n * src.nbytes / (time.perf_counter() - t))
    return best


def _slab_meta(step: int, rows: int, row_bytes: int) -> bytes:
    return ring_pb2.RingSlab(step=step, hook="resid_pre", layer=0, dtype=pb.UINT8, row_shape=[row_bytes],
                             parts=[ring_pb2.SlabPart(request_index=0, slab_row_start=0, row_count=rows, position_start=0)],
                             capture_time_unix_nano=time.time_ns()).SerializeToString()


def _shm_dir(prefix: str) -> str:
    """Rings live in shared memory (tmpfs), as /run/tensortrace does in production."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    d = tempfile.mkdtemp(prefix=prefix, dir=base)
    os.chmod(d, 0o700)
    return d


def ring_alone(record_bytes: int, seconds: float = 2.0, capacity: int = 64 << 20, copy_out: bool = False) -> dict:
    """One process writes SLAB frames (the producer's copy into the ring) and reads them back
    (frame parsing, meta checksum, payload view; with copy_out also one copy of the payload out,
    which the exporter does when it builds a message), then releases. Reads follow writes within
    ~8 MiB, as when the exporter keeps up."""
    d = _shm_dir("ttbench-")
    path = os.path.join(d, "bench.ring")
    w = RingWriter.create(path, capacity)
    r = RingReader.open(path)
    payload = np.random.default_rng(1).integers(0, 255, size=record_bytes, dtype=np.uint8).tobytes()
    meta = _slab_meta(0, 1, record_bytes)
    sink = bytearray(record_bytes)
    batch = max(1, min(4096, (8 << 20) // record_bytes))
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(batch):
            w.write(FrameKind.SLAB, meta, payload)
        end = 0
        for f in r.frames():
            if copy_out:
                sink[:] = f.payload
            end = f.end
        r.release(end)
        n += batch
    dt = time.perf_counter() - t0
    w.close()
    r.close()
    for name in os.listdir(d):
        os.unlink(os.path.join(d, name))
    os.rmdir(d)
    return {"records": n, "seconds": dt, "records_per_s": n / dt, "bytes_per_s": n * record_bytes / dt,
            "copy_out": copy_out}


def _writer_process(path: str, record_bytes: int, n_records: int, parts_per_slab: int, ready, go) -> None:
    """Benchmark producer: writes n_records payload rows as fast as the ring takes them (it waits when
    the ring is full: a benchmark load generator, not the inference-side policy)."""
    w = RingWriter.create(path, 512 << 20, RingIdentity(pod="bench", node="bench"))
    rows_per_slab = parts_per_slab
    payload = np.random.default_rng(2).integers(0, 255, size=record_bytes * rows_per_slab, dtype=np.uint8).tobytes()
    ready.set()
    go.wait()
    written, step = 0, 0
    while written < n_records:
        step_requests = [ring_pb2.RequestRows(request_id=f"req-{(step * parts_per_slab + i) % 64}", row_start=i, row_count=1,
                                  position_start=step, phase=pb.DECODE) for i in range(parts_per_slab)]
        st = ring_pb2.RingStep(step=step, model_id="bench", requests=step_requests, tp_size=1).SerializeToString()
        slab = ring_pb2.RingSlab(step=step, hook="resid_pre", layer=0, dtype=pb.UINT8, row_shape=[record_bytes],
                                 parts=[ring_pb2.SlabPart(request_index=i, slab_row_start=i, row_count=1, position_start=step)
                                        for i in range(parts_per_slab)]).SerializeToString()
        while not w.write(FrameKind.STEP, st):
            time.sleep(0.0002)
        while not w.write(FrameKind.SLAB, slab, payload):
            time.sleep(0.0002)
        written += parts_per_slab
        step += 1
    w.close()


def ring_to_kafka(record_bytes: int, n_records: int, bootstrap: str, compression: str, parts_per_slab: int) -> dict:
    d = _shm_dir("ttbench-kafka-")
    topic = f"bench.exporter.{record_bytes}.{compression}.{int(time.time() * 1000)}"
    ctx = mp.get_context("spawn")
    ready, go = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_writer_process, args=(os.path.join(d, "bench.ring"), record_bytes, n_records,
                                                      parts_per_slab, ready, go))
    proc.start()
    ready.wait(60)
    cfg = ExporterConfig(ring_dir=d, kafka=KafkaConfig(bootstrap_servers=bootstrap), topic=topic, partitions=3,
                         compression=compression, control_port=-1, scan_interval_s=0.05,
                         cleanup_grace_s=3600, allow_flat_rings=True)
    exp = Exporter(cfg).start()
    while not exp.publisher.connect(retry_interval_s=0.5):
        time.sleep(0.2)
    exp.scan()
    go.set()
    t0 = time.perf_counter()
    ring = None
    while True:
        if not exp.step():
            time.sleep(0.0005)
        if ring is None and exp.rings:
            ring = next(iter(exp.rings.values()))
        if ring is not None and ring.records_out >= n_records:
            break
        if time.perf_counter() - t0 > 300:
            break
    dt = time.perf_counter() - t0
    out = {"records": ring.records_out if ring else 0, "seconds": dt,
           "records_per_s": (ring.records_out if ring else 0) / dt,
           "bytes_per_s": (ring.bytes_out if ring else 0) / dt,
           "messages": ring.messages_out if ring else 0, "compression": compression,
           "parts_per_slab": parts_per_slab}
    proc.join(30)
    exp.stop()
    exp.shutdown(flush_timeout_s=5)
    for name in os.listdir(d):
        os.unlink(os.path.join(d, name))
    os.rmdir(d)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bootstrap", help="Kafka bootstrap servers (default: start a local broker)")
    p.add_argument("--json", default=".cache/bench/exporter_throughput.json")
    p.add_argument("--compression", default="none,lz4,zstd")
    p.add_argument("--seconds", type=float, default=2.0, help="duration of each ring-alone run")
    p.add_argument("--kafka-bytes", type=int, default=512 << 20, help="payload bytes per ring->Kafka run (>= 20k records)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    broker = None
    if not a.bootstrap:
        from tensortrace.devkafka import LocalKafka
        broker = LocalKafka().start()
        a.bootstrap = broker.bootstrap
    try:
        res = {"load_average_at_start": os.getloadavg(), "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
               "memcpy_bytes_per_s": memcpy_bandwidth(), "ring_alone": {}, "ring_kafka": {}}
        for name, size in SIZES.items():
            res["ring_alone"][name] = ring_alone(size, a.seconds)
            res.setdefault("ring_alone_copy_out", {})[name] = ring_alone(size, a.seconds, copy_out=True)
        for comp in a.compression.split(","):
            for name, size in SIZES.items():
                n = max(20_000, a.kafka_bytes // size) if size <= 4096 else max(200, a.kafka_bytes // size)
                n = min(n, 200_000)
                parts = 16 if size <= 4096 else 1
                res["ring_kafka"].setdefault(comp, {})[name] = ring_to_kafka(size, n, a.bootstrap, comp, parts)
    finally:
        if broker is not None:
            broker.close()
    res["load_average_at_end"] = os.getloadavg()
    mc = res["memcpy_bytes_per_s"]
    print(f"\nmemcpy (numpy copy of 1 MiB buffers): {mc / 1e9:.2f} GB/s   [{res['machine']['cpus']} CPUs, "
          f"load average {res['load_average_at_start'][0]:.1f} -> {res['load_average_at_end'][0]:.1f}: other work shares the machine]\n")
    print(f"{'path':<22}{'record':>8}{'records/s':>13}{'MB/s':>10}{'% memcpy':>10}   target")
    for label, key in (("ring write+read", "ring_alone"), ("ring w+r+copy out", "ring_alone_copy_out")):
        for name in SIZES:
            r = res[key][name]
            tgt = {"1MiB": ">= 25% memcpy", "4KiB": ">= 100k rec/s"}.get(name, "")
            print(f"{label:<22}{name:>8}{r['records_per_s']:>13,.0f}{r['bytes_per_s'] / 1e6:>10,.0f}"
                  f"{100 * r['bytes_per_s'] / mc:>9.1f}%   {tgt}")
    for comp, rows in res["ring_kafka"].items():
        for name in SIZES:
            r = rows[name]
            tgt = {"1MiB": ">= 150 MB/s", "4KiB": ">= 20k rec/s"}.get(name, "")
            print(f"{'ring->Kafka ' + comp:<22}{name:>8}{r['records_per_s']:>13,.0f}{r['bytes_per_s'] / 1e6:>10,.0f}"
                  f"{100 * r['bytes_per_s'] / mc:>9.1f}%   {tgt}")
    os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(res, f, indent=2)
    print(f"\nJSON: {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
