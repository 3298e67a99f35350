"""RequestView fed whole natively scanned envelopes (add_scan) against the same view fed record by
record from the Python decoder (add_tensor / add_summary): the same requests released, with the same
records, completeness, offsets and counters, and the same records refused with the same reasons —
on streams with interleaved requests, TP ranks, re-deliveries, late records, invalid records,
summaries before their records, and the memory bounds."""

from __future__ import annotations

import dataclasses
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tensortrace.consume import InvalidRecord, RequestView, SealedBatch, Source
from tensortrace.v1 import records_pb2 as pb
from tensortrace.wire import codec, native

pytestmark = [pytest.mark.unit,
              pytest.mark.skipif(not native.AVAILABLE, reason="native decoder not built (no compiler)")]

PRODUCERS = [pb.Producer(node="n", pod="pod-0", pid=1, generation=1, tp_rank=0),
             pb.Producer(node="n", pod="pod-1", pid=2, generation=1, tp_rank=1)]


class Collect:
    def __init__(self):
        self.requests = []

    def on_request(self, req):
        self.requests.append(req)


class Clock:
    def __init__(self):
        self.ns = 0

    def __call__(self):
        return self.ns


def keep_layer_even(rec) -> bool:
    return rec.layer % 2 == 0 and rec.phase != pb.PREFILL


def keep_scan_layer_even(sc, run, key):
    c = sc.cols[run[0]:run[1]]
    return (c[:, native.C_LAYER] % 2 == 0) & (c[:, native.C_PHASE] != pb.PREFILL)


def make_view(kind: str, **kw):
    h = Collect()
    if kind == "keep":
        v = RequestView(h, keep=keep_layer_even, keep_scan=keep_scan_layer_even, clock=Clock(), **kw)
    else:
        v = RequestView(h, clock=Clock(), **kw)
    return v, h


def feed_python(v, messages):
    failed = []
    for off, data in enumerate(messages):
        src = Source("t", 0, off)
        for i, r in enumerate(codec.decode_envelope(data)):
            try:
                if r.WhichOneof("kind") == "summary":
                    v.add_summary(r.summary, src)
                else:
                    v.add_tensor(r.tensor, src)
            except InvalidRecord as e:
                failed.append((off, i, e.reason.value, str(e)))
    return failed


def feed_native(v, messages):
    failed = []
    for off, data in enumerate(messages):
        sc = native.scan(data)
        assert sc is not None, "a canonical envelope must scan natively"
        for i, e in v.add_scan(sc, Source("t", 0, off)):
            failed.append((off, i, e.reason.value, str(e)))
    return failed


def released(v, h):
    data = v.seal()
    if data:
        assert v.flush(SealedBatch(data=data), threading.Event())
    out = []
    for r in h.requests:
        out.append((r.key, r.release, dataclasses.asdict(r.completeness), [x.SerializeToString() for x in r.records],
                    [x.SerializeToString() for x in r.summaries], r.model, r.records_seen, dict(r.sources)))
    h.requests.clear()
    return out


def both_ways(messages, kind="all", **kw):
    a, ha = make_view(kind, **kw)
    b, hb = make_view(kind, **kw)
    fa = feed_python(a, messages)
    fb = feed_native(b, messages)
    assert fb == fa
    assert released(b, hb) == released(a, ha)
    assert dataclasses.asdict(b.stats) == dataclasses.asdict(a.stats)
    assert list(b._open) == list(a._open)
    for part in (0, 1):
        assert b.commit_offset(part, 10_000) == a.commit_offset(part, 10_000)
    return a


# -- a stream generator: requests of a few records each, cut into envelopes, with disorder ---------------

def tensor(rid: str, seq: int, layer: int, step: int, producer: pb.Producer, **kw) -> pb.TensorRecord:
    fields = dict(model_id="m", request_id=rid, trace_id=bytes(16) if rid != "r-untraced" else b"", hook="resid_pre",
                  layer=layer, positions_kind=pb.TOKEN_RANGE, token_start=step, token_end=step + 1,
                  phase=pb.PREFILL if step == 0 else pb.DECODE, step=step, dtype=pb.FLOAT32, shape=[1, 2],
                  encoding=pb.RAW, raw_size=8, payload=bytes([seq % 256]) * 8, producer=producer, seq=seq)
    fields.update(kw)
    return pb.TensorRecord(**fields)


@st.composite
def streams(draw):
    items = []   # (request id, record) in production order
    seq = 0
    for r in range(draw(st.integers(1, 4))):
        rid = ["r0", "r1", "r-untraced", "r3"][r]
        ranks = draw(st.integers(1, 2))
        for rank in range(ranks):
            prod = PRODUCERS[rank]
            recs = []
            for step in range(draw(st.integers(1, 3))):
                for layer in range(draw(st.integers(1, 3))):
                    bad = draw(st.sampled_from([{}] * 12 + [dict(raw_size=3), dict(hook=""), dict(shape=[-1, 2])]))
                    recs.append(tensor(rid, seq, layer, step, prod, **bad))
                    seq += 1
            summ = pb.RequestSummary(model_id="m", request_id=rid, trace_id=recs[0].trace_id, producer=prod, seq=seq,
                                     records_captured=len(recs) - draw(st.integers(0, 1)), complete=True,
                                     producers=ranks)
            seq += 1
            items.extend((rid, x) for x in recs)
            items.append((rid, summ))
    # disorder: re-deliver some records, move some summaries earlier, interleave requests
    for _ in range(draw(st.integers(0, 4))):
        items.insert(draw(st.integers(0, len(items))), items[draw(st.integers(0, len(items) - 1))])
    for _ in range(draw(st.integers(0, 3))):
        i, j = draw(st.integers(0, len(items) - 1)), draw(st.integers(0, len(items) - 1))
        items[i], items[j] = items[j], items[i]
    messages, i = [], 0
    while i < len(items):
        n = draw(st.integers(1, 6))
        messages.append(codec.encode_envelope([x for _, x in items[i:i + n]]))
        i += n
    return messages


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams(), st.sampled_from(["all", "keep"]))
def test_property_native_view_equals_python_view(messages, kind):
    both_ways(messages, kind)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams(), st.integers(1, 3), st.integers(8, 64))
def test_property_bounds_evict_the_same(messages, max_requests, max_bytes):
    both_ways(messages, "all", max_requests=max_requests, max_bytes=max_bytes)


def test_plain_stream_takes_the_run_path_and_releases_complete():
    recs = [tensor("r0", i, i % 2, i // 2, PRODUCERS[0]) for i in range(6)]
    summ = pb.RequestSummary(model_id="m", request_id="r0", trace_id=bytes(16), producer=PRODUCERS[0], seq=6,
                             records_captured=6, complete=True, producers=1)
    messages = [codec.encode_envelope(recs[:4]), codec.encode_envelope(recs[4:] + [summ])]
    sc = native.scan(messages[0])
    assert len(sc.runs) == 1 and sc.runs[0][:2] == (0, 4)
    v = both_ways(messages, "keep")
    assert v.stats.released["complete"] == 1


def test_scan_ready_only_with_a_columnar_keep():
    assert RequestView(Collect()).scan_ready
    assert not RequestView(Collect(), keep=keep_layer_even).scan_ready
    assert RequestView(Collect(), keep=keep_layer_even, keep_scan=keep_scan_layer_even).scan_ready
