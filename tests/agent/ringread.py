"""Read back what an agent wrote: STEP/SLAB/SUMMARY frames -> per-request tensors, via the
production split rule (tensortrace.ring.slabs), the way the exporter does."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch

from tensortrace.ring.format import RingReader
from tensortrace.ring.slabs import decode_frame, ring_producer
from tensortrace.v1 import records_pb2 as pb
from tensortrace.wire.codec import record_to_tensor


@dataclass
class ReadBack:
    records: list = field(default_factory=list)        # TensorRecords
    summaries: dict = field(default_factory=dict)      # request_id -> RequestSummary
    steps: list = field(default_factory=list)          # RingStep

    def by_request(self):
        out = defaultdict(list)
        for r in self.records:
            out[r.request_id].append(r)
        return out

    def tensor(self, request_id: str, hook: str, layer: int = -1) -> tuple[torch.Tensor, list[int]]:
        """All rows of (request, hook, layer) in position order, with their positions."""
        recs = sorted((r for r in self.records if r.request_id == request_id and r.hook == hook and r.layer == layer),
                      key=lambda r: r.token_start)
        if not recs:
            raise KeyError((request_id, hook, layer))
        positions = [p for r in recs for p in range(r.token_start, r.token_end)]
        return torch.cat([record_to_tensor(r) for r in recs]), positions


def drain(reader: RingReader, into: ReadBack | None = None, release: bool = True) -> ReadBack:
    out = into or ReadBack()
    producer = ring_producer(reader.header)
    steps = getattr(reader, "_tt_steps", {})
    last_end = None
    for frame in reader.frames():
        step, records = decode_frame(frame, steps, producer)
        if step is not None:
            out.steps.append(step)
        for r in records:
            if isinstance(r, pb.RequestSummary):
                assert r.request_id not in out.summaries, f"two summaries for {r.request_id}"
                out.summaries[r.request_id] = r
            else:
                out.records.append(r)
        last_end = frame.end
    reader._tt_steps = steps
    if release and last_end is not None:
        reader.release(last_end)
    return out
