"""Release rule of one ring, driven without Kafka: a recording publisher stands in for the
KafkaPublisher (a test double of the send/ack interface, named as such); acks are given by hand."""

import collections
import os

import pytest

from tensortrace.exporter.config import ExporterConfig
from tensortrace.exporter.drain import RingDrain
from tensortrace.exporter.metrics import ExporterMetrics
from tensortrace.ring.format import RingReader, RingWriter, RingIdentity
from tensortrace.wire import codec

from tensortrace.testing.ringgen import TrafficGen

pytestmark = pytest.mark.unit


class RecordingPublisher:
    """Test double: records sends; the test decides when (and whether) each is acknowledged."""

    def __init__(self):
        self.sent = collections.deque()   # not yet acknowledged
        self.log = []                      # everything ever sent

    def send(self, key, value, token):
        self.sent.append((key, value, token))
        self.log.append((key, value, token))

    def ack_all(self, exc=None):
        while self.sent:
            _k, _v, unit = self.sent.popleft()
            unit.ring.on_complete(unit, exc)


def _open(tmp_path, capacity=1 << 20):
    path = str(tmp_path / "pod-a-r0.ring")
    w = RingWriter.create(path, capacity, RingIdentity(pod="pod-a", node="n1"))
    r = RingReader.open(path)
    st = os.stat(path)
    cfg = ExporterConfig(ring_dir=str(tmp_path), max_pass_frames=5)
    return w, r, RingDrain(r, cfg, ExporterMetrics(), (st.st_dev, st.st_ino))


def _decode(sent):
    out = []
    for key, value, _ in sent:
        out += [(key, r) for r in codec.decode_envelope(value)]
    return out


def test_nothing_is_released_before_kafka_acknowledges(tmp_path):
    w, r, d = _open(tmp_path)
    gen = TrafficGen(w, n_requests=2)
    gen.run(steps=2)
    pub = RecordingPublisher()
    while d.drain_pass(pub):
        pass
    assert d.read_pos == r.head and r.tail == 0  # read everything, released nothing
    d.release_acked()
    assert r.tail == 0
    sent = list(pub.sent)
    pub.ack_all()
    d.release_acked(force_all=True)
    assert r.tail == r.head
    assert r._m.frames_consumed.get() == w._m.frames_committed.get() == gen.frames_written
    recs = _decode(sent)
    seqs = sorted(rec.tensor.seq for _, rec in recs if rec.HasField("tensor"))
    assert seqs == sorted(gen.expected)
    for key, rec in recs:
        if rec.HasField("tensor"):
            rid, hook, step, pos, raw = gen.expected[rec.tensor.seq]
            assert (key, rec.tensor.request_id, rec.tensor.hook, rec.tensor.step, rec.tensor.token_start) == (rid.encode(), rid, hook, step, pos)
            assert codec.record_raw_bytes(rec.tensor) == raw
    summaries = [rec.summary for _, rec in recs if rec.HasField("summary")]
    assert {s.request_id: s.records_captured for s in summaries} == gen.captured


def test_newest_step_frame_is_kept_until_the_next_step(tmp_path):
    w, r, d = _open(tmp_path)
    gen = TrafficGen(w, n_requests=1, hooks=("a",))
    gen.step()                                   # STEP 0, SLAB 0
    pub = RecordingPublisher()
    d.drain_pass(pub)
    pub.ack_all()
    d.release_acked()
    assert r.tail == 0                           # STEP 0 may still be named by later slabs
    gen.step()                                   # STEP 1, SLAB 1
    d.drain_pass(pub)
    pub.ack_all()
    d.release_acked()
    step1_pos = d.latest_step[0]
    assert 0 < r.tail == step1_pos                # released up to (not past) STEP 1
    # a restarted exporter re-reads from the tail and can still resolve step 1's slab
    d.close()
    r2 = RingReader.open(r.path)
    st = os.stat(r.path)
    d2 = RingDrain(r2, d.cfg, ExporterMetrics(), (st.st_dev, st.st_ino))
    pub2 = RecordingPublisher()
    d2.drain_pass(pub2)
    assert not d2.dropped
    [(_, rec)] = _decode(pub2.sent)
    assert rec.tensor.step == 1


def test_failed_delivery_rereads_the_ring_from_its_tail(tmp_path):
    w, r, d = _open(tmp_path)
    gen = TrafficGen(w, n_requests=2, hooks=("a",))
    gen.run(steps=3)
    pub = RecordingPublisher()
    d.drain_pass(pub)                            # first 5 frames
    first = list(pub.sent)
    pub.ack_all(exc=TimeoutError("delivery timeout"))
    d.release_acked()
    assert r.tail == 0 and d.read_pos == 0        # rewound: the failed frames will be read again
    while d.drain_pass(pub):
        pass
    pub.ack_all()
    d.release_acked(force_all=True)
    assert r.tail == r.head and r._m.frames_consumed.get() == gen.frames_written
    seqs = [rec.tensor.seq for _, rec in _decode(pub.log) if rec.HasField("tensor")]
    assert set(seqs) == set(gen.expected)
    first_seqs = {rec.tensor.seq for _, rec in _decode(first) if rec.HasField("tensor")}
    assert collections.Counter(seqs) == collections.Counter({s: 2 if s in first_seqs else 1 for s in gen.expected})


def test_slab_of_an_unknown_step_is_dropped_and_counted(tmp_path):
    from tensortrace.ring.format import FrameKind
    from tensortrace.v1 import records_pb2 as pb, ring_pb2
    w, r, d = _open(tmp_path)
    slab = ring_pb2.RingSlab(step=99, hook="a", dtype=pb.UINT8, row_shape=[4],
                             parts=[ring_pb2.SlabPart(request_index=0, row_count=1)])
    w.write(FrameKind.SLAB, slab.SerializeToString(), b"abcd")
    w.write(FrameKind.SLAB, b"\xff\xff not protobuf", b"")
    pub = RecordingPublisher()
    d.drain_pass(pub)
    assert not pub.sent and d.dropped == {"step_unknown": 1, "bad_meta": 1}
    d.release_acked(force_all=True)
    assert r._m.frames_consumed.get() == 2        # dropped frames are released (and counted as dropped)


def test_large_parts_are_chunked_exactly_like_the_codec_rule(tmp_path):
    from tensortrace.ring.format import FrameKind
    from tensortrace.ring.slabs import split_slab
    from tensortrace.v1 import records_pb2 as pb, ring_pb2
    w, r, d = _open(tmp_path, capacity=8 << 20)
    step = ring_pb2.RingStep(step=1, requests=[ring_pb2.RequestRows(request_id="big", row_count=2)])
    slab = ring_pb2.RingSlab(step=1, hook="logits", dtype=pb.UINT8, row_shape=[1_100_000],
                             parts=[ring_pb2.SlabPart(request_index=0, slab_row_start=0, row_count=2)])
    payload = os.urandom(2_200_000)
    w.write(FrameKind.STEP, step.SerializeToString())
    w.write(FrameKind.SLAB, slab.SerializeToString(), payload)
    pub = RecordingPublisher()
    d.drain_pass(pub)
    got = [rec.tensor for _, rec in _decode(pub.sent)]
    assert all(len(v) <= d.cfg.max_message_bytes for _, v, _ in pub.sent)
    [whole] = split_slab(step, slab, payload, frame_seq=1, producer=d.producer)
    want = codec.chunk_record(whole, d.cfg.chunk_payload_bytes)
    assert len(got) == len(want) == 3
    for g, c in zip(got, want):
        c.export_time_unix_nano = g.export_time_unix_nano
        assert g == c


def test_ring_states_and_drop_reasons_are_enums_that_read_as_their_strings(tmp_path):
    import json

    from tensortrace.exporter.drain import FrameDropReason, RingState
    from tensortrace.v1 import control_pb2

    w, r, d = _open(tmp_path)
    assert d.state is RingState.ATTACHED and d.state == "attached" and d.active and d.readable
    d.state = "draining"                 # a plain string (the service's own lifecycle code) is coerced
    assert d.state is RingState.DRAINING and d.active
    with pytest.raises(ValueError):
        d.state = "gone"
    d.quarantine("corrupt_frame", "test")
    assert d.state is RingState.QUARANTINED and not d.active and not d.readable
    d.dropped[FrameDropReason.BAD_META] += 1
    assert d.dropped == {"bad_meta": 1}
    status = control_pb2.RingStatus(state=d.state, frames_dropped_by_reason=dict(d.dropped))
    assert status.state == "quarantined" and dict(status.frames_dropped_by_reason) == {"bad_meta": 1}
    assert f"{RingState.DETACHED}" == str(RingState.DETACHED) == "detached"
    assert json.dumps({FrameDropReason.RING_CORRUPT: RingState.DRAINING}) == '{"ring_corrupt": "draining"}'
