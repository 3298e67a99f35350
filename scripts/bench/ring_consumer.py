#!/usr/bin/env python
"""A ring consumer process for benchmarks: drains one ring the way the exporter does (parse STEP /
SLAB / SUMMARY frames, split slabs per request, copy each part's payload out of the ring, release),
minus Kafka. Imports only the ring and protobuf modules, so it starts fast and does not compete
with the measured process for CPU while importing torch.

    python scripts/bench/ring_consumer.py RING_PATH     # prints "ready", then on stdin EOF drains
                                                        # what is left and prints a JSON line
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "services"))

from tensortrace.ring.format import FrameKind, RingReader  # noqa: E402
from tensortrace.ring.slabs import slab_parts  # noqa: E402
from tensortrace.v1 import records_pb2 as pb  # noqa: E402
from tensortrace.v1 import ring_pb2  # noqa: E402


def main() -> int:
    reader = RingReader.open(sys.argv[1])
    producer = pb.Producer(pod="bench", generation=reader.header.generation)
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    print("ready", flush=True)
    steps, frames, nbytes, records = {}, 0, 0, 0
    while True:
        end = None
        for f in reader.frames(max_frames=256):
            if f.kind == FrameKind.STEP:
                st = ring_pb2.RingStep.FromString(bytes(f.meta))
                steps[st.step] = st
            elif f.kind == FrameKind.SLAB:
                slab = ring_pb2.RingSlab.FromString(bytes(f.meta))
                for rec, rows in slab_parts(steps[slab.step], slab, f.payload, f.seq, producer):
                    rec.payload = bytes(rows)   # the copy out of the ring an exporter makes
                    nbytes += len(rows)
                    records += 1
            frames += 1
            end = f.end
        if end is not None:
            reader.release(end)
            continue
        if stop.is_set() and reader.head == reader.tail:
            break
        time.sleep(0.005)   # idle: the exporter's main loop waits 5 ms the same way
    reader.close()
    print(json.dumps({"frames": frames, "records": records, "bytes": nbytes}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
