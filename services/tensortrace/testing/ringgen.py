"""Synthetic capture traffic written straight into a ring with RingWriter (what the capture agent
writes: STEP, SLAB, SUMMARY frames), and a checker for what arrives on Kafka.

Payload bytes are a pure function of (request, step, hook, row), so a consumer can verify every
byte it receives without the producer's help.

    gen = TrafficGen(writer, n_requests=3, hooks=("resid_pre",), row_shape=(16,))
    gen.run(steps=5)        # writes frames; counts what was written and dropped
    gen.expected            # {seq: (request_id, hook, step, token_start, raw bytes)}
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import numpy as np

from tensortrace.ring.format import FrameKind, RingWriter
from tensortrace.ring.slabs import record_seq
from tensortrace.v1 import records_pb2 as pb
from tensortrace.v1 import ring_pb2
from tensortrace.wire import codec


def rows_bytes(request_id: str, step: int, hook: str, position_start: int, n_rows: int, row_bytes: int) -> bytes:
    """Deterministic payload of a request's rows (verifiable by the consumer)."""
    seed = int.from_bytes(hashlib.blake2b(f"{request_id}|{step}|{hook}|{position_start}".encode(), digest_size=8).digest(), "little")
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=n_rows * row_bytes, dtype=np.uint8).tobytes()


@dataclass
class TrafficGen:
    writer: RingWriter
    n_requests: int = 3
    hooks: tuple = ("resid_pre", "attn_out")
    row_shape: tuple = (16,)
    dtype: int = pb.FLOAT32
    prompt_tokens: int = 4
    prefix: str = "req"
    frames_written: int = 0
    frames_dropped: int = 0
    expected: dict = field(default_factory=dict)      # seq -> (request_id, hook, step, token_start, bytes)
    summaries: dict = field(default_factory=dict)     # seq -> request_id
    captured: dict = field(default_factory=dict)      # request_id -> records written
    dropped_records: dict = field(default_factory=dict)
    _seq: int = 0
    _step: int = 0
    _pos: dict = field(default_factory=dict)

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.row_shape)) * codec.element_size(self.dtype)

    def _write(self, kind: int, meta: bytes, payload: bytes = b"") -> int | None:
        """Frame seq if written, None if the ring was full (dropped and counted, like the agent)."""
        ok = self.writer.write(kind, meta, payload)
        if not ok:
            self.writer.count_drop(len(payload))
            self.frames_dropped += 1
            return None
        self.frames_written += 1
        # the writer numbers frames (PAD frames too); read back the seq it used
        seq = self.writer._seq - 1
        return seq

    def request_ids(self) -> list[str]:
        return [f"{self.prefix}-{i}" for i in range(self.n_requests)]

    def step(self, request_ids: list[str] | None = None) -> None:
        """One forward step over the given requests (prefill for new ones, decode after)."""
        rids = request_ids if request_ids is not None else self.request_ids()
        step_requests, row = [], 0
        for i, rid in enumerate(rids):
            pos = self._pos.get(rid)
            n = self.prompt_tokens if pos is None else 1
            pos = 0 if pos is None else pos
            step_requests.append(ring_pb2.RequestRows(request_id=rid, trace_id=hashlib.md5(rid.encode()).digest(),
                                          span_id=hashlib.md5(rid.encode()).digest()[:8], row_start=row,
                                          row_count=n, position_start=pos,
                                          phase=pb.PREFILL if n > 1 else pb.DECODE))
            row += n
        step_no = self._step
        self._step += 1
        step = ring_pb2.RingStep(step=step_no, model_id="tiny", requests=step_requests, capture_time_unix_nano=time.time_ns(), tp_size=1)
        if self._write(FrameKind.STEP, step.SerializeToString()) is None:
            for rr in step_requests:  # the whole step is lost: each of its records is dropped
                self.dropped_records[rr.request_id] = self.dropped_records.get(rr.request_id, 0) + len(self.hooks)
            return
        for layer, hook in enumerate(self.hooks):
            parts, chunks = [], []
            slab_row = 0
            for i, rr in enumerate(step_requests):
                parts.append(ring_pb2.SlabPart(request_index=i, slab_row_start=slab_row, row_count=rr.row_count,
                                               position_start=rr.position_start))
                chunks.append(rows_bytes(rr.request_id, step_no, hook, rr.position_start, rr.row_count, self.row_bytes))
                slab_row += rr.row_count
            slab = ring_pb2.RingSlab(step=step_no, hook=hook, layer=layer, tp_rank=0, tp_size=1, dtype=self.dtype,
                                     row_shape=list(self.row_shape), parts=parts, capture_time_unix_nano=time.time_ns())
            seq = self._write(FrameKind.SLAB, slab.SerializeToString(), b"".join(chunks))
            for i, rr in enumerate(step_requests):
                if seq is None:
                    self.dropped_records[rr.request_id] = self.dropped_records.get(rr.request_id, 0) + 1
                else:
                    self.expected[record_seq(seq, i)] = (rr.request_id, hook, step_no, rr.position_start, chunks[i])
                    self.captured[rr.request_id] = self.captured.get(rr.request_id, 0) + 1
        for rr in step_requests:
            self._pos[rr.request_id] = rr.position_start + rr.row_count

    def finish(self, request_ids: list[str] | None = None) -> None:
        for rid in (request_ids if request_ids is not None else self.request_ids()):
            dropped = self.dropped_records.get(rid, 0)
            s = pb.RequestSummary(model_id="tiny", request_id=rid, records_captured=self.captured.get(rid, 0),
                                  records_dropped=dropped, complete=dropped == 0,
                                  dropped_by_reason={"ring_full": dropped} if dropped else {},
                                  generated_tokens=max(0, self._pos.get(rid, 0) - self.prompt_tokens), sampled=True)
            seq = self._write(FrameKind.SUMMARY, s.SerializeToString())
            if seq is not None:
                self.summaries[record_seq(seq)] = rid

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.step()
        self.finish()


def consume_all(bootstrap: str, topic: str, stop_when, timeout_s: float = 60.0, group: str | None = None):
    """Read every message of `topic` until stop_when(records) or timeout; returns decoded records."""
    from kafka import KafkaConsumer

    from kafka.errors import KafkaError

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                     enable_auto_commit=False, group_id=group, consumer_timeout_ms=1000,
                                     max_partition_fetch_bytes=4 << 20, fetch_max_bytes=16 << 20)
            break
        except KafkaError:  # a broker just restarted by an outage test
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    records = []
    try:
        while time.monotonic() < deadline:
            for msg in consumer:
                for r in codec.decode_envelope(msg.value):
                    records.append((msg.key, r))
                if stop_when(records):
                    return records
            if stop_when(records):
                return records
    finally:
        consumer.close()
    return records


class Arrivals:
    """Reassembles what a consumer received and checks it against a TrafficGen (by seq)."""

    def __init__(self):
        # (pod, seq) -> reassembled copies (duplicates kept); seqs are unique per producer generation
        self.tensors: dict[tuple[str, int], list[pb.TensorRecord]] = {}
        self.summaries: dict[tuple[str, int], list[pb.RequestSummary]] = {}
        self.asm = codec.ChunkAssembler()
        self.key_mismatch = 0

    def add(self, key: bytes, r: pb.Record) -> None:
        if r.HasField("summary"):
            s = r.summary
            if key != s.request_id.encode():
                self.key_mismatch += 1
            self.summaries.setdefault((s.producer.pod, s.seq), []).append(s)
            return
        t = self.asm.add(r.tensor)
        if t is None:
            return
        if key != t.request_id.encode():
            self.key_mismatch += 1
        self.tensors.setdefault((t.producer.pod, t.seq), []).append(t)
