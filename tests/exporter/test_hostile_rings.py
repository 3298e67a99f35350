"""Two rings on one node, one honest, one hostile, through the real exporter (`tensortrace exporter`
process) and a real Kafka broker (issue 15, item 4).

The hostile producer writes well-formed, checksummed frames whose content is adversarial (every
class the fuzzing found: tests/exporter/test_hostile_drain.py, tests/ring/test_fuzz_*.py), scribbles
the consumer's tail, and finally breaks its framing. Throughout, the honest ring's records all arrive
bit-exact; the hostile ring's bad frames are dropped and counted by reason (every frame accounted:
committed = released, released = published + dropped), its valid records still arrive, the
exporter never stops; after the framing break the hostile ring is quarantined and its remaining
frames counted as `ring_corrupt`, while the honest ring keeps flowing.
"""

from __future__ import annotations

import os

import pytest

from tensortrace.ring.format import FrameKind, RingIdentity, RingWriter
from tensortrace.testing.hostile import HostileFrame, HostileWriter
from tensortrace.testing.ringgen import Arrivals, TrafficGen, consume_all
from tensortrace.v1 import records_pb2 as pb
from tensortrace.v1 import ring_pb2
from tensortrace.wire import codec

pytestmark = pytest.mark.integration


def _step(number, *rids, trace=b"t" * 16):
    return HostileFrame(FrameKind.STEP, ring_pb2.RingStep(step=number, model_id="m", requests=[
        ring_pb2.RequestRows(request_id=r, trace_id=trace, row_count=1) for r in rids]).SerializeToString())


def _slab(number, parts, payload=b"abcd", row_shape=(4,), hook="h"):
    return HostileFrame(FrameKind.SLAB, ring_pb2.RingSlab(step=number, hook=hook, dtype=pb.UINT8, row_shape=list(row_shape),
                                                          parts=parts).SerializeToString(), payload)


def _part(i=0, row=0, n=1, pos=0):
    return ring_pb2.SlabPart(request_index=i, slab_row_start=row, row_count=n, position_start=pos)


# (frame, the exporter's verdict): every class of hostile content, each a well-formed frame
HOSTILE = [
    (HostileFrame(FrameKind.STEP, b"\x08\x05" + b"\x1a\x00" * 1_000_000), "bad_meta"),     # a million requests
    (_step(1, "a", "b\u00e9-\U0001f600"), None),                                            # accepted
    (_slab(1, [_part(pos=(1 << 32) - 1)]), "bad_slab"),                                   # token range > uint32
    (_slab(1, [_part(0), _part(1)], b"abcdefgh"), "bad_slab"),                            # overlapping parts
    (_slab(1, [_part(1, 1), _part(0, 0)], b"abcdefgh"), None),                            # out of order, tiled: published
    (_slab(1, [_part()], hook="h" * 200_000), "bad_slab"),                                # huge hook
    (_slab(1, [_part(n=3)], b"abc", row_shape=[1] * 100_000), "bad_slab"),                # 100000 dimensions
    (_slab(1, [_part()], row_shape=(1 << 62, 1 << 62)), "bad_slab"),                      # shape x dtype != bytes
    (_slab(77, [_part()]), "step_unknown"),                                               # a step never written
    (_step(2, "c", trace=b"short"), None),                                                # accepted (ids checked per slab)
    (_slab(2, [_part()]), "bad_slab"),                                                    # a 5-byte trace id
    (HostileFrame(FrameKind.SUMMARY, pb.RequestSummary(request_id="s" * 300_000).SerializeToString()), "bad_meta"),
    (HostileFrame(FrameKind.SUMMARY, pb.RequestSummary(request_id="s", hooks=["x" * 1000] * 1200).SerializeToString()),
     "bad_meta"),                                                                         # larger than a message
    (HostileFrame(FrameKind.SLAB, b"\xff\xfe not protobuf", b"zz"), "bad_meta"),
]


def test_a_hostile_ring_cannot_stop_or_corrupt_an_honest_ring(kafka_broker, fresh_topic, ring_dir, exporter_factory):
    topic = fresh_topic(partitions=1)
    honest_w = RingWriter.create(os.path.join(ring_dir, "honest.ring"), 1 << 20, RingIdentity(pod="honest", model_id="m"))
    hostile_w = RingWriter.create(os.path.join(ring_dir, "hostile.ring"), 8 << 20, RingIdentity(pod="hostile", model_id="m"))
    honest = TrafficGen(honest_w, n_requests=3, prefix="h", hooks=("a", "b"))
    honest.run(steps=3)
    hw = HostileWriter(hostile_w)
    for frame, _ in HOSTILE:
        assert hw.write(frame) is not None
    valid = TrafficGen(hostile_w, n_requests=2, prefix="x", hooks=("a",))   # valid records of the hostile pod
    valid._step = 100
    valid.run(steps=2)

    exp = exporter_factory(ring_dir, kafka_broker.bootstrap, topic)
    more = TrafficGen(honest_w, n_requests=2, prefix="h2", hooks=("a",))   # honest traffic while it drains
    more._step = 1000
    more.run(steps=3)

    want_drops = {}
    for _, verdict in HOSTILE:
        if verdict:
            want_drops[verdict] = want_drops.get(verdict, 0) + 1

    def released(n):
        return exp.wait_for(lambda: (r := exp.ring("hostile.ring")) and r.frames_released == n and r,
                            what=f"hostile ring released up to {n} frames")

    st = released(len(hw.written) + valid.frames_written)
    assert st.state == "attached" and dict(st.frames_dropped_by_reason) == want_drops
    # the producer stores a tail past everything (the exporter used to crash on its next release)
    hostile_w._m.tail.set(hostile_w._m.head.get() + 4096)
    valid2 = TrafficGen(hostile_w, n_requests=1, prefix="y", hooks=("a",))
    valid2._step = 200
    valid2.run(steps=2)
    committed = len(hw.written) + valid.frames_written + valid2.frames_written
    st = released(committed)
    assert st.state == "attached" and st.frames_pending == 0 and st.frames_committed == committed
    assert dict(st.frames_dropped_by_reason) == want_drops and exp.alive()

    want = {("honest", s): v for s, v in {**honest.expected, **more.expected}.items()}
    want.update({("hostile", s): v for s, v in {**valid.expected, **valid2.expected}.items()})
    arrivals = Arrivals()
    for key, r in consume_all(kafka_broker.bootstrap, topic, lambda rs: sum(1 for _, x in rs if x.HasField("tensor")) >= len(want) + 2):
        arrivals.add(key, r)
    assert arrivals.key_mismatch == 0
    got = {k: v[0] for k, v in arrivals.tensors.items()}
    for k, (rid, hook, step, pos, raw) in want.items():
        t = got.pop(k)
        assert (t.request_id, t.hook, t.step, t.token_start) == (rid, hook, step, pos)
        assert codec.record_raw_bytes(t) == raw, "bit-exact"
    # what is left: the out-of-order (tiled) hostile slab, published by the rule, and nothing else
    assert sorted((t.producer.pod, t.request_id, codec.record_raw_bytes(t)) for t in got.values()) == \
           [("hostile", "a", b"abcd"), ("hostile", "b\u00e9-\U0001f600", b"efgh")]
    assert exp.alive()

    # the hostile producer breaks its framing: quarantined, its remaining frames counted; honest flows on
    hostile_w._seq += 5
    for i in range(3):
        assert hostile_w.write(FrameKind.SUMMARY, pb.RequestSummary(request_id=f"gap-{i}").SerializeToString())
    st = exp.wait_for(lambda: (r := exp.ring("hostile.ring")) and r.frames_dropped_by_reason.get("ring_corrupt") and r,
                      what="hostile ring quarantined and accounted")
    assert st.state == "quarantined" and "frame sequence" in st.reason
    assert st.frames_dropped_by_reason["ring_corrupt"] == 3
    last = TrafficGen(honest_w, n_requests=1, prefix="h3", hooks=("a",))
    last._step = 2000
    last.run(steps=2)
    seqs = set(last.expected)
    arrived = consume_all(kafka_broker.bootstrap, topic,
                          lambda rs: seqs <= {x.tensor.seq for _, x in rs if x.tensor.producer.pod == "honest"})
    assert seqs <= {x.tensor.seq for _, x in arrived if x.tensor.producer.pod == "honest"}
    assert exp.alive()
    log = exp.log()
    assert sum(1 for line in log.splitlines() if "ring quarantined" in line and "hostile.ring" in line) == 1
    assert "dropped (bad_slab): slab 'h' part 0: token range" in log
    for w in (honest_w, hostile_w):
        w.close()
