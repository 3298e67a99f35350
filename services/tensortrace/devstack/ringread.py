"""Read back what an agent wrote, the way the exporter does (the split rule in tensortrace.ring.slabs),
without Kafka: for tests, the demo's checks and benchmarks.

    got = read_rings("/run/tensortrace")            # every ring in a directory (and its pod dirs), nothing released
    got.tensor("req-1", "resid_pre", 0)             # (rows in position order, their positions)
    got = drain(RingReader.open(path))              # one ring, releasing what was read
"""

from __future__ import annotations

import glob
import os
from collections import defaultdict
from dataclasses import dataclass, field

from tensortrace.ring.format import RingReader
from tensortrace.ring.slabs import decode_frame, ring_producer
from tensortrace.v1 import records_pb2 as pb


@dataclass
class RingContents:
    records: list = field(default_factory=list)    # TensorRecords (RAW payloads)
    summaries: dict = field(default_factory=dict)  # request_id -> RequestSummary
    steps: list = field(default_factory=list)      # RingStep

    def by_request(self) -> dict:
        out = defaultdict(list)
        for r in self.records:
            out[r.request_id].append(r)
        return out

    def tensor(self, request_id: str, hook: str, layer: int = -1):
        """All rows of (request, hook, layer) in position order (a torch tensor), with their positions."""
        import torch

        from tensortrace.wire.codec import record_to_tensor

        recs = sorted((r for r in self.records if r.request_id == request_id and r.hook == hook and r.layer == layer),
                      key=lambda r: r.token_start)
        if not recs:
            raise KeyError((request_id, hook, layer))
        positions = [p for r in recs for p in range(r.token_start, r.token_end)]
        return torch.cat([record_to_tensor(r) for r in recs]), positions

    def add(self, step, records) -> None:
        if step is not None:
            self.steps.append(step)
        for r in records:
            if isinstance(r, pb.RequestSummary):
                if r.request_id in self.summaries:
                    raise AssertionError(f"two summaries for {r.request_id}")
                self.summaries[r.request_id] = r
            else:
                self.records.append(r)


def drain(reader: RingReader, into: RingContents | None = None, release: bool = True) -> RingContents:
    """Every frame of `reader` not read yet; STEP frames are remembered on the reader for later calls."""
    out = into or RingContents()
    producer = ring_producer(reader.header)
    steps = getattr(reader, "_tt_steps", {})
    last_end = None
    for frame in reader.frames():
        out.add(*decode_frame(frame, steps, producer))
        last_end = frame.end
    reader._tt_steps = steps
    if release and last_end is not None:
        reader.release(last_end)
    return out


def read_rings(ring_dir: str) -> RingContents:
    """Every frame of every ring in `ring_dir` — flat (`<dir>/*.ring`) and in pod directories
    (`<dir>/<pod dir>/*.ring`, one level deep, as the exporter scans) — without releasing (the
    producers keep running). A development reader: identities are the rings' headers."""
    out = RingContents()
    paths = glob.glob(os.path.join(ring_dir, "*.ring")) + glob.glob(os.path.join(ring_dir, "*", "*.ring"))
    for path in sorted(paths):
        reader = RingReader.open(path)
        try:
            drain(reader, out, release=False)
        finally:
            reader.close()
    return out
