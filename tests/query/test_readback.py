"""Read-back SDK against the real chDB engine: rows are inserted the way the loader inserts them
(tensortrace.testing.clickhouse.insert_rows: ColumnBatch -> insert_arrow), then read back through
TensorTraceClient."""

import time

import pytest
import torch

from tensortrace.query import (AmbiguousRequest, IncompleteData, InvalidQuery, NotFound, QueryTimeout,
                               TensorTraceClient)
from tensortrace.testing.clickhouse import insert_rows
from tensortrace.testing.synthetic import SyntheticRequest
from tensortrace.v1 import records_pb2 as pb

pytestmark = pytest.mark.integration


def test_tensors_reassemble_prefill_and_decode_bit_exact(tt_db):
    client, db = tt_db
    req = SyntheticRequest.make("req-1", layers=3, hidden=16, prompt=6, generated=5, encoding=pb.SHUFFLE_ZSTD)
    insert_rows(client, db, req.records, [req.summary])
    got = TensorTraceClient(client, database=db).tensors(trace_id=req.trace_id.hex())
    assert got.request_id == "req-1" and got.completeness.state == "complete"
    assert set(got.tensors) == set(req.truth)
    for key, want in req.truth.items():
        c = got[key]
        assert c.tensor.dtype == torch.bfloat16
        assert torch.equal(c.tensor, want), key
        assert (c.start, c.end, c.gaps) == (0, 10, [])
        assert (c.prefill_rows, c.decode_rows) == (6, 4)


def test_request_id_lookup_and_hook_layer_filter(tt_db):
    client, db = tt_db
    req = SyntheticRequest.make("req-filter", layers=4, hidden=8)
    insert_rows(client, db, req.records, [req.summary])
    got = TensorTraceClient(client, database=db).tensors(request_id="req-filter", hooks=["resid_pre"], layers=[1, 3])
    assert sorted(got.tensors) == [("resid_pre", 1), ("resid_pre", 3)]
    assert torch.equal(got["resid_pre", 3].tensor, req.truth["resid_pre", 3])


def test_duplicate_rows_are_read_once(tt_db):
    client, db = tt_db
    req = SyntheticRequest.make("req-dup", layers=2, hidden=8)
    insert_rows(client, db, req.records, [req.summary])
    insert_rows(client, db, req.records[:7], [req.summary])  # a re-read after a crash inserts these again
    tt = TensorTraceClient(client, database=db)
    got = tt.tensors(request_id="req-dup")
    assert got.completeness.records_loaded == len(req.records)
    assert got.completeness.summaries == 1
    for key, want in req.truth.items():
        assert torch.equal(got[key].tensor, want)


def test_hidden_states_view_is_like_output_hidden_states(tt_db):
    client, db = tt_db
    req = SyntheticRequest.make("req-hs", layers=3, hidden=8, prompt=4, generated=3)
    insert_rows(client, db, req.records, [req.summary])
    hs = TensorTraceClient(client, database=db).tensors(request_id="req-hs").hidden_states()
    assert len(hs) == 4  # embeddings/resid_pre[0], resid_pre[1], resid_pre[2], final norm output
    assert all(h.shape == (1, 6, 8) for h in hs)
    assert torch.equal(hs[1][0], req.truth["resid_pre", 1])
    assert torch.equal(hs[-1][0], req.truth["resid_final", -1])


def test_missing_positions_are_reported_as_gaps(tt_db):
    client, db = tt_db
    req = SyntheticRequest.make("req-gap", layers=1, hidden=8, prompt=4, generated=5)
    lost = [r for r in req.records if r.token_start in (5, 6)]
    insert_rows(client, db, [r for r in req.records if r not in lost], [req.summary])
    got = TensorTraceClient(client, database=db).tensors(request_id="req-gap")
    c = got["resid_pre", 0]
    assert c.gaps == [(5, 7)]
    assert torch.equal(c.tensor[:5], req.truth["resid_pre", 0][:5])
    assert got.completeness.state == "loading"  # the summary counts records that are not stored
    assert got.completeness.records_loaded == len(req.records) - len(lost)
    with pytest.raises(IncompleteData, match="positions missing"):
        got.hidden_states()


def test_completeness_reports_drops_by_reason(tt_db):
    client, db = tt_db
    req = SyntheticRequest.make("req-drop", layers=1, hidden=8)
    s = req.summary
    s.complete = False
    s.records_dropped = 3
    s.dropped_by_reason["ring_full"] = 3
    s.incomplete_reason = "ring full"
    insert_rows(client, db, req.records, [s])
    comp = TensorTraceClient(client, database=db).status(request_id="req-drop")
    assert comp.state == "incomplete" and not comp.complete
    assert comp.dropped_by_reason == {"ring_full": 3} and comp.incomplete_reason == "ring full"


def test_tensors_without_summary_are_marked_no_summary(tt_db):
    client, db = tt_db
    req = SyntheticRequest.make("req-nosum", layers=1, hidden=8)
    insert_rows(client, db, req.records)
    assert TensorTraceClient(client, database=db).tensors(request_id="req-nosum").completeness.state == "no_summary"


def test_unknown_request_is_not_found_and_wait_times_out(tt_db):
    client, db = tt_db
    tt = TensorTraceClient(client, database=db, poll_interval_s=0.05)
    with pytest.raises(NotFound):
        tt.tensors(trace_id="0af7651916cd43dd8448eb211c80319c")
    with pytest.raises(QueryTimeout):
        tt.tensors(request_id="never", wait_s=0.2)


def test_wait_returns_once_the_request_finishes_loading(tt_db):
    import threading

    client, db = tt_db
    req = SyntheticRequest.make("req-late", layers=2, hidden=8)
    half = len(req.records) // 2
    insert_rows(client, db, req.records[:half])
    timer = threading.Timer(0.3, lambda: insert_rows(client, db, req.records[half:], [req.summary]))
    timer.start()
    try:
        got = TensorTraceClient(client, database=db, poll_interval_s=0.05).tensors(request_id="req-late", wait_s=30)
    finally:
        timer.join()
    assert got.completeness.state == "complete"
    assert all(torch.equal(got[k].tensor, v) for k, v in req.truth.items())


def test_wait_sees_records_captured_after_the_first_lookup(tt_db):
    """The lookup's capture-time bounds prune the reads; records captured later and loaded while the
    client waits must widen them (a stale bound left a request 'loading' forever)."""
    import threading

    client, db = tt_db
    req = SyntheticRequest.make("req-later", layers=2, hidden=8)
    half = len(req.records) // 2
    for r in req.records[half:]:
        r.capture_time_unix_nano += 2 * 10**9  # the decode steps ran 2 s after the prefill
    insert_rows(client, db, req.records[:half])
    timer = threading.Timer(0.3, lambda: insert_rows(client, db, req.records[half:], [req.summary]))
    timer.start()
    try:
        got = TensorTraceClient(client, database=db, poll_interval_s=0.05).tensors(request_id="req-later", wait_s=30)
    finally:
        timer.join()
    assert got.completeness.state == "complete", got.completeness
    assert got.completeness.records_loaded == len(req.records)
    assert all(torch.equal(got[k].tensor, v) for k, v in req.truth.items())


def test_trace_with_two_requests_needs_request_id(tt_db):
    client, db = tt_db
    a = SyntheticRequest.make("req-a", layers=1, hidden=8)
    b = SyntheticRequest.make("req-b", layers=1, hidden=8)
    for r in b.records:
        r.trace_id = a.trace_id
    b.summary.trace_id = a.trace_id
    insert_rows(client, db, a.records + b.records, [a.summary, b.summary])
    tt = TensorTraceClient(client, database=db)
    with pytest.raises(AmbiguousRequest) as e:
        tt.tensors(trace_id=a.trace_id.hex())
    assert sorted(e.value.request_ids) == ["req-a", "req-b"]
    got = tt.tensors(trace_id=a.trace_id.hex(), request_id="req-b")
    assert torch.equal(got["resid_pre", 0].tensor, b.truth["resid_pre", 0])


INJECTIONS = [
    "' OR 1=1 --",
    "x'); DROP TABLE activations; --",
    "resid_pre' OR '1'='1",
    "0af7651916cd43dd8448eb211c80319c' OR 1=1",
    "\\' UNION SELECT * FROM system.users --",
    "{tid:String}",
]


@pytest.mark.parametrize("bad", INJECTIONS)
def test_injection_strings_are_rejected_with_a_clear_error(tt_db, bad):
    client, db = tt_db
    tt = TensorTraceClient(client, database=db)
    with pytest.raises(InvalidQuery, match="trace id"):
        tt.tensors(trace_id=bad)
    with pytest.raises(InvalidQuery, match="hook name"):
        tt.tensors(request_id="r", hooks=[bad])
    with pytest.raises(InvalidQuery, match="layer"):
        tt.tensors(request_id="r", layers=[bad])


@pytest.mark.parametrize("bad", INJECTIONS)
def test_injection_in_request_id_is_only_ever_a_value(tt_db, bad):
    """Request ids are free text, so they are not rejected: they must reach SQL only as a bound value."""
    client, db = tt_db
    req = SyntheticRequest.make("req-safe", layers=1, hidden=8)
    insert_rows(client, db, req.records, [req.summary])
    tt = TensorTraceClient(client, database=db)
    with pytest.raises(NotFound):
        tt.tensors(request_id=bad)
    assert tt.requests(request_id=bad) == []
    # a request whose id *is* the injection string round-trips like any other
    evil = SyntheticRequest.make(bad, layers=1, hidden=8)
    insert_rows(client, db, evil.records, [evil.summary])
    got = tt.tensors(request_id=bad)
    assert got.request_id == bad and torch.equal(got["resid_pre", 0].tensor, evil.truth["resid_pre", 0])
    assert client.query(f"SELECT count() FROM {db}.activations").result_rows[0][0] == len(req.records) + len(evil.records)


def test_invalid_database_name_is_refused():
    from tensortrace.query.backend import ClickHouseBackend

    with pytest.raises(ValueError, match="not a plain identifier"):
        ClickHouseBackend(client=None, database="tensortrace; DROP TABLE x")


def test_one_hook_layer_across_requests_for_probe_training(tt_db):
    client, db = tt_db
    reqs = [SyntheticRequest.make(f"probe-{i}", layers=3, hidden=8) for i in range(4)]
    insert_rows(client, db, [r for q in reqs for r in q.records], [q.summary for q in reqs])
    tt = TensorTraceClient(client, database=db)
    got = tt.across_requests("resid_pre", 2, since_s=time.time() - 600, model="synthetic/tiny")
    assert sorted(got) == [q.request_id for q in reqs]
    for q in reqs:
        assert torch.equal(got[q.request_id].tensor, q.truth["resid_pre", 2])
    assert tt.across_requests("resid_pre", 2, since_s=time.time() - 600, model="other") == {}
    with pytest.raises(InvalidQuery):
        tt.across_requests("resid_pre' OR 1=1", 2, since_s=0)
