"""A stand-in inference process for crash tests: writes capture frames into its ring in a loop
(never waiting: a full ring drops and counts, like the agent), then writes summaries, dumps what it
wrote as JSON and closes the ring. `--die-mid-frame` reserves a frame, fills half of its payload
and kills itself with SIGKILL (no commit, no close).

    python -m tensortrace.testing.producer_proc RING_PATH OUT_JSON --steps 200 --interval 0.005
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time

from tensortrace.ring.format import FrameKind, RingIdentity, RingWriter
from tensortrace.testing.ringgen import TrafficGen
from tensortrace.v1 import records_pb2 as pb, ring_pb2


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("ring")
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--interval", type=float, default=0.005)
    p.add_argument("--capacity", type=int, default=1 << 20)
    p.add_argument("--requests", type=int, default=3)
    p.add_argument("--row", type=int, default=256)
    p.add_argument("--pod", default="pod-p", help="the pod written into the ring header (a hostile pod may claim another's)")
    p.add_argument("--node", default="n1", help="the node written into the ring header")
    p.add_argument("--prefix", default=None, help="request id prefix (default: the pod)")
    p.add_argument("--die-mid-frame", action="store_true")
    a = p.parse_args()
    w = RingWriter.create(a.ring, a.capacity, RingIdentity(pod=a.pod, node=a.node))
    gen = TrafficGen(w, n_requests=a.requests, prefix=a.prefix or a.pod, row_shape=(a.row,))
    started = time.monotonic()
    for _ in range(a.steps):
        gen.step()
        time.sleep(a.interval)
    write_seconds = time.monotonic() - started
    if not a.die_mid_frame:
        gen.finish()
    dump = {"expected": {str(s): [v[0], v[1], v[2], v[3]] for s, v in gen.expected.items()},
            "summaries": {str(s): rid for s, rid in gen.summaries.items()},
            "captured": gen.captured, "dropped_records": gen.dropped_records,
            "frames_written": gen.frames_written, "frames_dropped": gen.frames_dropped,
            "row_bytes": gen.row_bytes, "write_seconds": write_seconds, "pid": os.getpid(),
            "generation": w.header.generation}
    if a.die_mid_frame:
        slab = ring_pb2.RingSlab(step=0, hook="resid_pre", layer=0, dtype=pb.FLOAT32, row_shape=[a.row],
                                 parts=[ring_pb2.SlabPart(request_index=0, slab_row_start=0, row_count=4)])
        payload_len = 4 * gen.row_bytes
        end, off = w.reserve(FrameKind.SLAB, slab.SerializeToString(), payload_len)
        dump["half_frame_seq"] = w._seq - 1
        w.data[off: off + payload_len // 2] = b"\xab" * (payload_len // 2)
    tmp = a.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(dump, f)
    os.rename(tmp, a.out)
    if a.die_mid_frame:
        os.kill(os.getpid(), signal.SIGKILL)
    w.close()


if __name__ == "__main__":
    main()
