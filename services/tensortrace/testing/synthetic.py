"""Synthetic requests as the exporter would publish them, for the tests of every consumer (loader,
read-back, consumer core) and the loader benchmark.

>>> req = SyntheticRequest.make("r1", layers=2, hidden=8, prompt=3, generated=2)
>>> req.truth["resid_pre", 1].shape          # the full [positions, hidden] tensor expected back
torch.Size([4, 8])
>>> len(req.records)                         # (prefill + 1 decode step) x (2 layers + resid_final)
6
>>> msgs = req.messages(max_payload=4096)    # [(key, value)] Kafka messages, chunked if needed
>>> {key for key, _ in msgs}
{b'r1'}

Exporter split rule (docs/ARCHITECTURE.md): one record per prefill (all prompt rows) and one per
decode step (one row), per hook and layer; then the RequestSummary on the same key.
"""

from __future__ import annotations

import os
import zlib
import time
from dataclasses import dataclass, field

from tensortrace.v1 import records_pb2 as pb
from tensortrace.wire import codec


@dataclass
class SyntheticRequest:
    request_id: str
    trace_id: bytes
    records: list[pb.TensorRecord]
    summary: pb.RequestSummary
    truth: dict = field(default_factory=dict)   # (hook, layer) -> torch tensor [positions, hidden]

    @classmethod
    def make(cls, request_id: str, layers: int = 4, hidden: int = 64, prompt: int = 8, generated: int = 4,
             hooks: tuple[str, ...] = ("resid_pre",), final_hook: str | None = "resid_final",
             encoding: int = pb.RAW, producer: pb.Producer | None = None, seq_start: int | None = None,
             dtype=None, seed: int | None = None, model_id: str = "synthetic/tiny") -> "SyntheticRequest":
        import torch

        dtype = dtype or torch.bfloat16
        gen = torch.Generator().manual_seed(seed if seed is not None else hash(request_id) & 0xFFFFFFFF)
        producer = producer or pb.Producer(node="node-a", pod="pod-a", pid=4242, tp_rank=0, generation=1)
        trace_id = os.urandom(16)
        span_id = os.urandom(8)
        positions = prompt + generated - 1   # the last generated token is never fed back in
        slots = [(h, layer) for h in hooks for layer in range(layers)]
        if final_hook:
            slots.append((final_hook, -1))
        truth = {s: torch.randn(positions, hidden, generator=gen).to(dtype) for s in slots}
        if seq_start is None:
            # One default producer for every synthetic request, so seqs must not collide across
            # requests: start each request's seqs in its own block.
            seq_start = zlib.crc32(request_id.encode()) * 1_000_000
        records, seq = [], seq_start
        now = time.time_ns()
        common = dict(model_id=model_id, request_id=request_id, trace_id=trace_id, span_id=span_id,
                      producer=producer, encoding=encoding)
        # Step order, as the ring delivers them: prefill for every slot, then each decode step.
        steps = [(0, prompt, pb.PREFILL, 0)] + [(t, t + 1, pb.DECODE, 1 + t - prompt) for t in range(prompt, positions)]
        for start, end, phase, step in steps:
            for hook, layer in slots:
                rec = codec.tensor_to_record(truth[hook, layer][start:end], hook=hook, layer=layer, token_start=start,
                                             token_end=end, phase=phase, step=step, seq=seq,
                                             capture_time_unix_nano=now, export_time_unix_nano=now, **common)
                records.append(rec)
                seq += 1
        summary = pb.RequestSummary(model_id=model_id, request_id=request_id, trace_id=trace_id, span_id=span_id,
                                    producer=producer, seq=seq, records_captured=len(records), records_dropped=0,
                                    bytes_captured=sum(r.raw_size for r in records), complete=True,
                                    prompt_tokens=prompt, generated_tokens=generated, finish_reason="length",
                                    hooks=list(hooks) + ([final_hook] if final_hook else []),
                                    start_time_unix_nano=now, end_time_unix_nano=time.time_ns(),
                                    export_time_unix_nano=time.time_ns(), sampled=True)
        return cls(request_id, trace_id, records, summary, truth)

    def messages(self, max_payload: int = codec.DEFAULT_CHUNK_PAYLOAD_BYTES, per_message: int = 8,
                 with_summary: bool = True,
                 max_message_bytes: int = codec.DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[bytes, bytes]]:
        """Kafka (key, value) pairs: records chunked above max_payload, at most per_message records
        and about max_message_bytes per envelope (as the exporter packs them)."""
        parts: list = []
        for r in self.records:
            parts.extend(codec.chunk_record(r, max_payload))
        if with_summary:
            parts.append(self.summary)
        key = self.request_id.encode()
        out, group, size = [], [], 0
        for part in parts:
            n = part.ByteSize() + 8
            if group and (len(group) >= per_message or size + n > max_message_bytes):
                out.append((key, codec.encode_envelope(group)))
                group, size = [], 0
            group.append(part)
            size += n
        if group:
            out.append((key, codec.encode_envelope(group)))
        return out


def produce(bootstrap: str, topic: str, messages: list[tuple[bytes, bytes]], partition: int | None = None) -> None:
    """Send messages and wait for every ack."""
    from kafka import KafkaProducer

    p = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_request_size=4 << 20,
                      batch_size=1 << 20)
    try:
        futures = [p.send(topic, key=k, value=v, partition=partition) for k, v in messages]
        for f in futures:
            f.get(timeout=60)
    finally:
        p.close(timeout=10)


def assert_read_back_bit_exact(client, database: str, requests) -> None:
    """Every request reads back from ClickHouse complete, with exactly its tensors, each equal to
    its truth bit for bit (the loader's and the insert path's tests)."""
    import torch

    from tensortrace.query import TensorTraceClient

    tt = TensorTraceClient(client, database=database)
    for req in requests:
        got = tt.tensors(request_id=req.request_id)
        assert got.completeness.state == "complete", (req.request_id, got.completeness)
        assert set(got.tensors) == set(req.truth)
        for key, want in req.truth.items():
            assert torch.equal(got[key].tensor, want), (req.request_id, key)
