"""The fast read path: ClickHouse Native output read without a copy (query/native.py), column
pages (backend.RecordPage) and their vectorised assembly (assemble.assemble_pages), checked
against the record-by-record path on every record shape the store can hold, on real chDB."""

import gc
import os

import pytest
import torch

from tensortrace.query.assemble import assemble, assemble_pages
from tensortrace.query.backend import ClickHouseBackend
from tensortrace.query.native import NativeFormatError, StringColumn, read_native
from tensortrace.testing.clickhouse import insert_rows
from tensortrace.testing.synthetic import SyntheticRequest
from tensortrace.v1 import records_pb2 as pb
from tensortrace.wire import codec
from tensortrace.wire.codec import WireError

pytestmark = pytest.mark.integration


# -- Native reader -----------------------------------------------------------------------------

def native(backend, sql):
    return backend._query_native(sql, {})


def test_native_reader_concatenates_blocks_and_reads_strings_as_views(tt_db):
    client, db = tt_db
    be = ClickHouseBackend(client, db)
    sql = ("SELECT toInt32(number) - 5 AS a, toUInt64(number * 3) AS b, toInt8(number % 3) AS c, "
           "repeat('x', number % 300) AS s FROM numbers(2500) SETTINGS max_block_size = 700")
    cols = read_native(native(be, sql))
    assert list(cols) == ["a", "b", "c", "s"]
    assert cols["a"].tolist() == [i - 5 for i in range(2500)]
    assert cols["b"].tolist() == [i * 3 for i in range(2500)]
    assert cols["c"].tolist() == [i % 3 for i in range(2500)]
    s = cols["s"]
    assert isinstance(s, StringColumn) and len(s) == 2500
    assert s.as_str() == ["x" * (i % 300) for i in range(2500)]   # 300 > 127: two-byte lengths too
    assert bytes(s[299]) == b"x" * 299


def test_native_reader_empty_result_is_empty(tt_db):
    client, db = tt_db
    cols = read_native(native(ClickHouseBackend(client, db), "SELECT toUInt8(1) AS a FROM numbers(0)"))
    assert all(len(c) == 0 for c in cols.values())


def test_native_reader_rejects_truncated_streams_and_unknown_types(tt_db):
    client, db = tt_db
    be = ClickHouseBackend(client, db)
    buf = bytes(native(be, "SELECT toUInt64(number) AS n, toString(number) AS s FROM numbers(100)"))
    for cut in (1, 5, len(buf) // 2, len(buf) - 1):
        with pytest.raises(NativeFormatError, match="truncated"):
            read_native(buf[:cut])
    with pytest.raises(NativeFormatError, match="column 'f' has type Float64"):
        read_native(native(be, "SELECT toFloat64(1) AS f"))
    with pytest.raises(NativeFormatError, match="LowCardinality"):
        read_native(native(be, "SELECT toLowCardinality('a') AS lc"))


def test_a_payload_view_outlives_the_query_result(tt_db):
    """chDB's own view does not keep its result alive; ours must (a freed buffer would be read)."""
    client, db = tt_db
    be = ClickHouseBackend(client, db)
    if be._chdb_handle() is None:
        pytest.skip("server backend: raw_query returns bytes that own themselves")
    cols = read_native(native(be, "SELECT repeat('ab', 500000) AS s"))
    view = cols["s"][0]
    del cols
    gc.collect()
    churn = [os.urandom(1 << 20) for _ in range(64)]   # reuse freed memory, if any was freed
    assert bytes(view) == b"ab" * 500000
    del churn


# -- column pages vs records -------------------------------------------------------------------

def mixed_request():
    """Every record shape one request can hold: RAW and compressed token ranges, a gap, duplicates,
    a TP-sharded hook, a replicated hook from two ranks, token lists, and no-token-axis tensors."""
    req = SyntheticRequest.make("req-mixed", layers=3, hidden=8, prompt=5, generated=4)
    recs = list(req.records)
    lost = [r for r in recs if r.layer == 1 and r.token_start == 6]
    recs = [r for r in recs if r not in lost]
    base = dict(request_id=req.request_id, trace_id=req.trace_id, span_id=req.records[0].span_id,
                model_id="synthetic/tiny")
    seq = max(r.seq for r in recs) + 1
    g = torch.Generator().manual_seed(3)

    def rec(t, producer_rank=0, **kw):
        nonlocal seq
        r = codec.tensor_to_record(t, seq=seq, producer=pb.Producer(node="n", pod="pod-a", pid=1, tp_rank=producer_rank,
                                                                     generation=1), **base, **kw)
        seq += 1
        return r

    for step, (a, b) in enumerate([(0, 5), (5, 6), (6, 7)]):
        phase = pb.PREFILL if step == 0 else pb.DECODE
        for rank in (0, 1):   # sharded: each rank holds half the columns
            recs.append(rec(torch.randn(b - a, 4, generator=g).to(torch.bfloat16), producer_rank=rank, hook="attn_q",
                            layer=0, tp_rank=rank, tp_size=2, token_start=a, token_end=b, phase=phase, step=step))
        t = torch.randn(b - a, 6, generator=g)
        for rank in (0, 1):   # replicated: both ranks captured the same tensor
            recs.append(rec(t, producer_rank=rank, hook="mlp_out", layer=2, token_start=a, token_end=b,
                            phase=phase, step=step))
        recs.append(rec(torch.randn(b - a, 8, generator=g).to(torch.float16), hook="resid_post", layer=0,
                        encoding=pb.SHUFFLE_ZSTD, token_start=a, token_end=b, phase=phase, step=step))
        recs.append(rec(torch.randn(2, 3, generator=g), hook="router_logits", layer=1, positions_kind=pb.TOKEN_LIST,
                        positions=[b + 10, a + 20], phase=phase, step=step))
        recs.append(rec(torch.tensor(float(step)), hook="loss", layer=-1, phase=phase, step=step))
    return req, recs


def same(a, b):
    assert set(a) == set(b)
    for k in a:
        x, y = a[k], b[k]
        assert torch.equal(x.tensor, y.tensor) and x.tensor.dtype == y.tensor.dtype, k
        assert (x.start, x.end, x.gaps, x.positions, x.records, x.prefill_rows, x.decode_rows) == \
               (y.start, y.end, y.gaps, y.positions, y.records, y.prefill_rows, y.decode_rows), k


@pytest.mark.parametrize("page_records, via", [(16384, "chdb buffer"), (7, "chdb buffer"), (7, "raw_query")])
def test_column_pages_assemble_exactly_like_records(tt_db, page_records, via):
    """via raw_query: the path a ClickHouse server read takes (clickhouse-connect's raw_query,
    Native bytes), here answered by the embedded engine since no server runs on this machine."""
    client, db = tt_db
    req, recs = mixed_request()
    insert_rows(client, db, recs)
    insert_rows(client, db, recs[:9])   # at-least-once delivery: duplicates in the table
    be = ClickHouseBackend(client, db)
    if via == "raw_query":
        be._handle_cache = None   # as for an http(s):// client
    [ref] = be.lookup(request_id=req.request_id)
    by_records = assemble(list(be.fetch(ref, page_records=page_records)))
    pages = list(be.fetch_pages(ref, page_records=page_records))
    assert sum(len(p) for p in pages) == len(recs)   # duplicates dropped
    by_pages = assemble_pages(pages)
    same(by_pages, by_records)
    # and against the truth: the gap, the RAW layers, the shards joined on the last axis
    assert by_pages["resid_pre", 1].gaps == [(6, 7)]
    assert torch.equal(by_pages["resid_pre", 0].tensor, req.truth["resid_pre", 0])
    assert by_pages["attn_q", 0].tensor.shape == (7, 8)
    assert by_pages["mlp_out", 2].records == 3   # the lowest producer rank's copy
    assert by_pages["router_logits", 1].positions == sorted(by_pages["router_logits", 1].positions)
    assert by_pages["loss", -1].tensor.tolist() == [0.0, 1.0, 2.0]


def test_a_stored_row_whose_payload_disagrees_with_its_shape_is_a_clear_error(tt_db):
    client, db = tt_db
    req = SyntheticRequest.make("req-bad-row", layers=1, hidden=8, prompt=3, generated=2)
    insert_rows(client, db, req.records)
    # a row altered in storage (the loader refuses such records, so only tampering makes one)
    client.command(f"INSERT INTO {db}.activations SELECT * REPLACE (raw_size + 2 AS raw_size, seq + 1000 AS seq, "
                   f"token_start + 50 AS token_start, token_end + 50 AS token_end) FROM (SELECT * FROM {db}.activations "
                   f"WHERE request_id = 'req-bad-row' AND token_start = 3)")
    be = ClickHouseBackend(client, db)
    [ref] = be.lookup(request_id="req-bad-row")
    with pytest.raises(WireError, match="do not agree"):
        assemble_pages(be.fetch_pages(ref))
    with pytest.raises(WireError, match="raw_size"):
        assemble(list(be.fetch(ref)))


def test_uint64_sequence_numbers_read_back_unchanged(tt_db):
    """seq is UInt64 end to end: a value above 2**63 must not wrap on the way through numpy."""
    client, db = tt_db
    req = SyntheticRequest.make("req-big-seq", layers=1, hidden=8, prompt=2, generated=2, seq_start=2**63 + 7)
    insert_rows(client, db, req.records)
    be = ClickHouseBackend(client, db)
    [ref] = be.lookup(request_id="req-big-seq")
    assert sorted(r.seq for r in be.fetch(ref)) == sorted(r.seq for r in req.records)
    assert assemble_pages(be.fetch_pages(ref))["resid_pre", 0].records == 2
