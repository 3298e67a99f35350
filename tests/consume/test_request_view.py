"""The per-request view (tensortrace.consume.RequestView) without a broker: what is released, when,
and with which completeness."""

import threading

import pytest

from tensortrace.consume import InvalidRecord, DeadLetterReason, Release, RequestView, SealedBatch, Source
from tensortrace.testing.synthetic import SyntheticRequest
from tensortrace.v1 import records_pb2 as pb
from tensortrace.wire.completeness import completeness

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self):
        self.ns = 0

    def __call__(self):
        return self.ns

    def advance(self, s):
        self.ns += int(s * 1e9)


class Collect:
    def __init__(self):
        self.requests = []

    def on_request(self, req):
        self.requests.append(req)


def view(**kw):
    clock = Clock()
    handler = Collect()
    v = RequestView(handler, clock=clock, **kw)
    return v, handler, clock


def feed(v, req, offset=0, partition=0, summary=True, records=None):
    for i, rec in enumerate(req.records if records is None else records):
        v.add_tensor(rec, Source("t", partition, offset + i))
    if summary:
        v.add_summary(req.summary, Source("t", partition, offset + len(req.records)))


def flush(v):
    data = v.seal()
    if data is not None:
        assert v.flush(SealedBatch(data=data), threading.Event())
    return data or []


def test_request_is_released_once_when_its_summary_and_every_announced_record_arrived():
    v, h, _ = view()
    req = SyntheticRequest.make("r1", layers=2, hidden=8, prompt=4, generated=3)
    feed(v, req, summary=False)
    assert flush(v) == [] and v.stats.requests_open == 1
    v.add_summary(req.summary, Source("t", 0, 99))
    [got] = flush(v)
    assert got.release is Release.COMPLETE and got.completeness.complete
    assert got.completeness.records_loaded == len(req.records) == got.records_seen
    assert [r.seq for r in got.records] == [r.seq for r in req.records]
    assert got.model == "synthetic/tiny" and got.request_id == "r1" and got.trace_id == req.trace_id
    assert h.requests == [got] and v.stats.requests_open == 0


def test_summary_first_then_records_also_releases():
    v, h, _ = view()
    req = SyntheticRequest.make("r2", layers=1, hidden=8)
    v.add_summary(req.summary, Source("t", 0, 0))
    for i, rec in enumerate(req.records[:-1]):
        v.add_tensor(rec, Source("t", 0, i + 1))
    assert flush(v) == []
    v.add_tensor(req.records[-1], Source("t", 0, 50))
    [got] = flush(v)
    assert got.completeness.state == "complete"


def test_redelivered_records_are_collapsed_and_late_ones_never_release_a_second_copy():
    v, h, _ = view()
    req = SyntheticRequest.make("r3", layers=2, hidden=8)
    feed(v, req, records=req.records[:3], summary=False)
    feed(v, req, records=req.records[:3], summary=False)   # at-least-once re-delivery
    feed(v, req, records=req.records[3:])
    [got] = flush(v)
    assert got.completeness.complete and len(got.records) == len(req.records)
    assert v.stats.duplicate_records == 3
    feed(v, req)                                          # the whole request again, after release
    assert flush(v) == [] and v.stats.late_records == len(req.records) + 1 and v.stats.requests_open == 0


def test_missing_records_release_as_incomplete_after_the_timeout_never_as_complete():
    v, h, clock = view(timeout_s=5)
    req = SyntheticRequest.make("r4", layers=2, hidden=8)
    feed(v, req, records=req.records[:-2])
    clock.advance(4.9)
    assert flush(v) == []
    clock.advance(0.2)
    [got] = flush(v)
    c = got.completeness
    assert got.release is Release.TIMEOUT and c.state == "incomplete" and not c.complete
    assert f"{len(req.records) - 2} of {len(req.records)} captured records arrived" in c.incomplete_reason
    # the same rule the query SDK applies, made final
    assert completeness([req.summary], len(req.records) - 2).state == "loading"


def test_records_without_a_summary_release_as_no_summary_after_the_timeout():
    v, h, clock = view(timeout_s=1)
    req = SyntheticRequest.make("r5", layers=1, hidden=8)
    feed(v, req, summary=False)
    clock.advance(1.5)
    [got] = flush(v)
    assert got.completeness.state == "no_summary" and "no summary" in got.completeness.incomplete_reason


def test_summary_that_reports_drops_releases_incomplete_with_its_reasons():
    v, h, _ = view()
    req = SyntheticRequest.make("r6", layers=1, hidden=8)
    req.summary.records_dropped = 2
    req.summary.dropped_by_reason["ring_full"] = 2
    req.summary.complete = False
    req.summary.incomplete_reason = "2 records dropped (ring_full)"
    feed(v, req)
    [got] = flush(v)
    assert got.release is Release.COMPLETE       # everything announced arrived ...
    assert got.completeness.state == "incomplete" and got.completeness.dropped_by_reason == {"ring_full": 2}


def test_two_tensor_parallel_ranks_wait_for_both_summaries():
    v, h, _ = view()
    r0 = SyntheticRequest.make("tp", layers=1, hidden=8, producer=pb.Producer(pod="p", pid=1, tp_rank=0, generation=1))
    r1 = SyntheticRequest.make("tp", layers=1, hidden=8, producer=pb.Producer(pod="p", pid=2, tp_rank=1, generation=1))
    for rec in r1.records + [r1.summary]:
        rec.trace_id = r0.trace_id
    r0.summary.producers = r1.summary.producers = 2
    feed(v, r0)
    assert flush(v) == []                      # rank 0 is done; its summary says 2 ranks write one
    feed(v, r1, summary=False, offset=100)
    assert flush(v) == []                      # rank 1 sent records but no summary yet
    v.add_summary(r1.summary, Source("t", 0, 200))
    [got] = flush(v)
    assert got.completeness.complete and got.completeness.summaries == 2
    assert got.records_seen == len(r0.records) + len(r1.records)


def test_unsampled_summary_releases_at_once_with_no_tensors():
    v, h, _ = view()
    s = pb.RequestSummary(request_id="skip", trace_id=b"\1" * 16, sampled=False, complete=True,
                          producer=pb.Producer(pod="p", pid=1, generation=1), seq=7)
    v.add_summary(s, Source("t", 0, 3))
    [got] = flush(v)
    assert got.records == [] and got.completeness.state == "complete" and not got.completeness.sampled


def test_commits_stay_behind_every_unreleased_request():
    v, h, _ = view()
    a = SyntheticRequest.make("a", layers=1, hidden=8)
    b = SyntheticRequest.make("b", layers=1, hidden=8)
    feed(v, a, offset=10, summary=False)
    feed(v, b, offset=20, partition=1, summary=False)
    assert (v.commit_offset(0, 100), v.commit_offset(1, 100), v.commit_offset(2, 100)) == (10, 20, 100)
    v.add_summary(a.summary, Source("t", 0, 40))
    flush(v)
    assert (v.commit_offset(0, 100), v.commit_offset(1, 100)) == (100, 20)
    v.revoked({1})                              # partition moved: its new owner re-reads b whole
    assert v.commit_offset(1, 100) == 100 and v.stats.requests_open == 0


def test_a_commit_never_falls_inside_a_released_request():
    # r1 at offsets 0..9, r2 interleaved from 5 on; r1 is released while r2 is open. A commit at
    # r2's first offset (5) would make a restart re-read r1's tail alone and release it again, partial.
    v, h, _ = view()
    r1 = SyntheticRequest.make("r1", layers=2, hidden=8, prompt=4, generated=3)
    r2 = SyntheticRequest.make("r2", layers=2, hidden=8, prompt=4, generated=3)
    feed(v, r1, records=r1.records[:5], summary=False, offset=0)
    feed(v, r2, records=r2.records[:2], summary=False, offset=5)
    feed(v, r1, records=r1.records[5:], summary=False, offset=7)
    v.add_summary(r1.summary, Source("t", 0, 7 + len(r1.records) - 5))
    [got] = flush(v)
    assert got.request_id == "r1" and got.completeness.complete
    assert v.commit_offset(0, 50) == 0            # not 5: r1 spans 0..12 and would be cut
    feed(v, r2, records=r2.records[2:], offset=30)
    v.add_summary(r2.summary, Source("t", 0, 45))
    flush(v)
    assert v.commit_offset(0, 50) == 50           # nothing held: both ranges are behind the commit
    assert v._released_ranges == {0: []}


def test_keep_filter_counts_every_record_but_keeps_only_the_wanted_payloads():
    v, h, _ = view(keep=lambda r: r.hook == "resid_pre" and r.layer == 1)
    req = SyntheticRequest.make("k", layers=3, hidden=8)
    feed(v, req)
    [got] = flush(v)
    assert got.completeness.complete and got.records_seen == len(req.records)
    assert {(r.hook, r.layer) for r in got.records} == {("resid_pre", 1)}


def test_memory_bound_evicts_the_oldest_request_as_incomplete():
    v, h, _ = view(max_requests=2)
    reqs = [SyntheticRequest.make(f"m{i}", layers=1, hidden=8) for i in range(3)]
    for i, r in enumerate(reqs):
        feed(v, r, records=r.records[:1], summary=False, offset=i * 10)
    [got] = flush(v)
    assert got.request_id == "m0" and got.release is Release.EVICTED and not got.completeness.complete
    assert "evicted" in got.completeness.incomplete_reason and v.stats.requests_open == 2


def test_invalid_records_are_refused_with_a_typed_reason():
    v, h, _ = view()
    req = SyntheticRequest.make("bad", layers=1, hidden=8)
    rec = req.records[0]
    rec.raw_size += 1
    with pytest.raises(InvalidRecord) as e:
        v.add_tensor(rec, Source("t", 0, 0))
    assert e.value.reason is DeadLetterReason.RAW_SIZE
    rec.raw_size -= 1
    rec.trace_id = b"short"
    with pytest.raises(InvalidRecord) as e:
        v.add_tensor(rec, Source("t", 0, 0))
    assert e.value.reason is DeadLetterReason.TRACE_ID
    assert v.stats.requests_open == 0


def test_a_failing_handler_is_retried_until_it_succeeds_and_gives_up_only_when_stopping():
    calls = []

    class Flaky:
        def on_request(self, req):
            calls.append(req.request_id)
            if len(calls) < 3:
                raise ConnectionError("scores topic down")

    v = RequestView(Flaky(), retry_initial_s=0.001, retry_max_s=0.002)
    req = SyntheticRequest.make("f", layers=1, hidden=8)
    feed(v, req)
    assert v.flush(SealedBatch(data=v.seal()), threading.Event())
    assert calls == ["f"] * 3 and v.stats.handler_failures == 2

    class Down:
        def on_request(self, req):
            raise ConnectionError("down")

    v = RequestView(Down(), retry_initial_s=0.001, retry_max_s=0.002)
    feed(v, SyntheticRequest.make("g", layers=1, hidden=8))
    stopping = threading.Event()
    stopping.set()
    assert v.flush(SealedBatch(data=v.seal()), stopping) is False


def test_a_missing_rank_makes_the_request_incomplete_at_the_timeout_with_the_reason():
    v, h, clock = view(timeout_s=2)
    req = SyntheticRequest.make("tp2", layers=1, hidden=8)
    req.summary.producers = 2
    feed(v, req)
    clock.advance(3)
    [got] = flush(v)
    assert got.completeness.state == "incomplete"
    assert "summaries of 1 of 2 producers" in got.completeness.incomplete_reason
