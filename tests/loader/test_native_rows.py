"""The loader's column batch from natively scanned envelopes (ColumnBatch.add_scan) against the same
batch built record by record from the Python decoder: the same Arrow tables (every column, every
type; the native rows come in the activations table's ORDER BY), the same refused records with the
same reasons."""

from __future__ import annotations

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tensortrace.consume import InvalidRecord
from tensortrace.loader.rows import ColumnBatch
from tensortrace.storage.client import plain_binary
from tensortrace.storage.schema import ACTIVATION_SORT_KEY
from tensortrace.v1 import records_pb2 as pb
from tensortrace.wire import codec, native

pytestmark = [pytest.mark.unit,
              pytest.mark.skipif(not native.AVAILABLE, reason="native decoder not built (no compiler)")]

LOAD_NS = 1_700_000_000_000_000_000


def python_batch(messages):
    b, failed = ColumnBatch(), []
    for off, data in enumerate(messages):
        for i, r in enumerate(codec.decode_envelope(data)):
            try:
                if r.WhichOneof("kind") == "summary":
                    b.add_summary(r.summary, 0, off)
                else:
                    b.add_tensor(r.tensor, 0, off)
            except InvalidRecord as e:
                failed.append((off, i, e.reason.value, str(e)))
    return b, failed


def native_batch(messages):
    b, failed = ColumnBatch(), []
    for off, data in enumerate(messages):
        sc = native.scan(data)
        assert sc is not None
        failed.extend((off, i, e.reason.value, str(e)) for i, e in b.add_scan(sc, 0, off))
    return b, failed


def same_tables(messages):
    a, fa = python_batch(messages)
    b, fb = native_batch(messages)
    assert fb == fa
    assert (b.rows, b.tensor_rows, b.summary_rows, b.payload_bytes) == (a.rows, a.tensor_rows, a.summary_rows, a.payload_bytes)
    if a.tensor_rows:
        ta, tb = a.activations_table(LOAD_NS), b.activations_table(LOAD_NS)
        if not b.act["seq"]:      # scanned rows only: payloads are views into the messages, no copy
            assert tb.schema.field("payload").type == pa.binary_view()
            tb.column("payload").chunk(0).validate(full=True)
        tb = plain_binary(tb)
        assert tb.schema == ta.schema
        key = [("kafka_offset", "ascending"), ("seq", "ascending")]
        assert tb.sort_by(key).to_pylist() == ta.sort_by(key).to_pylist()
        if not b.act["seq"]:      # scanned rows only: already in the table's ORDER BY (the engine skips its sort)
            assert tb.equals(tb.sort_by([(k, "ascending") for k in ACTIVATION_SORT_KEY]))
        assert sorted(b.capture_times().tolist()) == sorted(ta.column("capture_time").cast("int64").to_pylist())
    if a.summary_rows:
        assert b.requests_table(LOAD_NS).equals(a.requests_table(LOAD_NS))


def tensor(seq: int, **kw) -> pb.TensorRecord:
    fields = dict(model_id="m", request_id=f"r{seq % 3}", trace_id=bytes([seq % 7]) * 16, span_id=b"\x02" * 8,
                  hook="resid_pre", layer=seq % 4 - 1, tp_rank=seq % 2, tp_size=seq % 3,
                  positions_kind=pb.TOKEN_RANGE, token_start=seq, token_end=seq + 2, phase=pb.DECODE, step=seq,
                  dtype=pb.BFLOAT16, shape=[2, 3], encoding=pb.RAW, raw_size=12, payload=bytes([seq % 256]) * 12,
                  capture_time_unix_nano=LOAD_NS + seq, export_time_unix_nano=LOAD_NS + 2 * seq,
                  producer=pb.Producer(node="node", pod=f"pod-{seq % 2}", pid=seq, tp_rank=seq % 2, generation=1 << 63),
                  seq=(1 << 64) - 1 - seq)
    fields.update(kw)
    return pb.TensorRecord(**fields)


def test_mixed_envelopes_give_the_same_tables():
    summary = pb.RequestSummary(model_id="m", request_id="r0", trace_id=b"\x01" * 16, records_captured=3, seq=5,
                                dropped_by_reason={"ring_full": 2}, hooks=["resid_pre"], complete=False, producers=2,
                                producer=pb.Producer(pod="p", pid=3), end_time_unix_nano=LOAD_NS)
    messages = [
        codec.encode_envelope([tensor(i) for i in range(8)]),
        codec.encode_envelope([tensor(10, trace_id=b"", span_id=b"", tp_size=0),
                               tensor(11, positions_kind=pb.TOKEN_LIST, positions=[3, 9], token_start=0, token_end=0),
                               tensor(12, raw_size=5), tensor(13, capture_time_unix_nano=0),
                               tensor(14, shape=[], raw_size=2, payload=b"ab", positions_kind=pb.NO_TOKEN_AXIS),
                               tensor(15, encoding=pb.ZSTD, payload=codec.encode_payload(bytes(12), pb.ZSTD, 2)),
                               summary, tensor(16, hook="")]),
        codec.encode_envelope([summary]),
    ]
    same_tables(messages)
    b, failed = native_batch(messages)
    assert [f[2] for f in failed] == ["raw_size", "missing_field"]
    assert b.scan_rows == 13 and not b.act["seq"]


def test_scanned_rows_come_in_the_tables_order_by_whatever_order_they_arrived_in():
    sizes = (0, 2, 12, 14, 4096, 100)     # payloads inline in their view (<= 12 bytes) and pointed at (> 12)
    recs = [tensor(i, trace_id=bytes([9 - i % 3]) * 16, layer=5 - i % 4, token_start=40 - i, token_end=41 - i,
                   hook=("resid_pre", "attn_out")[i % 2], shape=[1, sizes[i % 6] // 2], raw_size=sizes[i % 6],
                   payload=bytes((i * 7 + k) % 256 for k in range(sizes[i % 6]))) for i in range(12)]
    b = native_batch([codec.encode_envelope(recs[:7]), codec.encode_envelope(recs[7:])])[0]
    t = b.activations_table(LOAD_NS)
    got = list(zip(*(t.column(k).to_pylist() for k in ACTIVATION_SORT_KEY)))
    assert got == sorted(got) and len(got) == 12
    by_seq = {r.seq: r for r in recs}
    for seq, payload, offset in zip(t.column("seq").to_pylist(), t.column("payload").to_pylist(),
                                    t.column("kafka_offset").to_pylist()):
        assert payload == by_seq[seq].payload and offset == (0 if recs.index(by_seq[seq]) < 7 else 1)


def test_a_batch_of_both_kinds_of_rows_concatenates():
    b = ColumnBatch()
    b.add_tensor(tensor(1), 0, 0)
    b.add_scan(native.scan(codec.encode_envelope([tensor(2), tensor(3)])), 0, 1)
    t = b.activations_table(LOAD_NS)
    assert t.num_rows == 3 and sorted(t.column("kafka_offset").to_pylist()) == [0, 1, 1]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(st.tuples(st.integers(0, 50), st.sampled_from([{}, {}, {}, dict(raw_size=1), dict(request_id=""),
                                                                          dict(capture_time_unix_nano=0),
                                                                          dict(shape=[2, 0, 5], raw_size=0, payload=b"")])),
                                   min_size=1, max_size=6), min_size=1, max_size=4))
def test_property_same_tables(spec):
    same_tables([codec.encode_envelope([tensor(i, **kw) for i, kw in m]) for m in spec])
