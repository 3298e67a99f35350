"""The exporter's hand-built envelopes decode to exactly what the codec would build, and slabs
split into per-request records by the documented rule."""

import pytest

from tensortrace.exporter.envelopes import EnvelopeBatcher, summary_entry, tensor_entry
from tensortrace.ring.slabs import SlabError, slab_parts, split_slab
from tensortrace.v1 import records_pb2 as pb
from tensortrace.v1 import ring_pb2
from tensortrace.wire import codec

pytestmark = pytest.mark.unit

PRODUCER = pb.Producer(node="n1", pod="pod-a", pid=42, tp_rank=1, generation=77)


def _step():
    return ring_pb2.RingStep(step=5, model_id="m", tp_size=2, capture_time_unix_nano=123, requests=[
        ring_pb2.RequestRows(request_id="r1", trace_id=b"t" * 16, span_id=b"s" * 8, row_start=0, row_count=3,
                             position_start=0, phase=pb.PREFILL),
        ring_pb2.RequestRows(request_id="r2", trace_id=b"u" * 16, span_id=b"v" * 8, row_start=3, row_count=1,
                             position_start=9, phase=pb.DECODE)])


def _slab(parts):
    return ring_pb2.RingSlab(step=5, hook="resid_pre", layer=3, tp_rank=1, tp_size=2, dtype=pb.FLOAT16,
                             row_shape=[2, 4], parts=parts, capture_time_unix_nano=456)


def test_split_follows_the_documented_rule():
    # payload rows: r2's row first, then r1's three rows (order in the slab is the parts' business)
    parts = [ring_pb2.SlabPart(request_index=1, slab_row_start=0, row_count=1, position_start=9),
             ring_pb2.SlabPart(request_index=0, slab_row_start=1, row_count=3, position_start=0)]
    payload = bytes(range(16)) + bytes(range(100, 148))
    recs = split_slab(_step(), _slab(parts), payload, frame_seq=7, producer=PRODUCER)
    r2, r1 = recs
    assert (r2.request_id, r2.seq, list(r2.shape), r2.token_start, r2.token_end, r2.phase) == ("r2", 7 * 65536, [1, 2, 4], 9, 10, pb.DECODE)
    assert (r1.request_id, r1.seq, list(r1.shape), r1.token_start, r1.token_end, r1.phase) == ("r1", 7 * 65536 + 1, [3, 2, 4], 0, 3, pb.PREFILL)
    assert r2.payload == bytes(range(16)) and r1.payload == bytes(range(100, 148))
    assert (r1.hook, r1.layer, r1.tp_rank, r1.tp_size, r1.dtype, r1.step) == ("resid_pre", 3, 1, 2, pb.FLOAT16, 5)
    assert r1.trace_id == b"t" * 16 and r1.span_id == b"s" * 8 and r1.model_id == "m"
    assert r1.positions_kind == pb.TOKEN_RANGE and r1.raw_size == 48 and r1.producer == PRODUCER
    assert codec.record_raw_bytes(r1) == bytes(range(100, 148))


def test_split_rejects_inconsistent_slabs():
    good = [ring_pb2.SlabPart(request_index=0, slab_row_start=0, row_count=3, position_start=0)]
    with pytest.raises(SlabError, match="payload is"):
        slab_parts(_step(), _slab(good), b"\0" * 47, 1, PRODUCER)
    with pytest.raises(SlabError, match="request index 5"):
        slab_parts(_step(), _slab([ring_pb2.SlabPart(request_index=5, row_count=3)]), b"\0" * 48, 1, PRODUCER)
    with pytest.raises(SlabError, match="names step"):
        bad = _slab(good)
        bad.step = 6
        slab_parts(_step(), bad, b"\0" * 48, 1, PRODUCER)


def test_hand_built_envelope_decodes_like_the_codec():
    parts = [ring_pb2.SlabPart(request_index=0, slab_row_start=0, row_count=3, position_start=0)]
    payload = memoryview(bytes(range(48)))
    [(rec, rows)] = slab_parts(_step(), _slab(parts), payload, 3, PRODUCER, export_time_unix_nano=99)
    rec.encoding = pb.RAW
    summary = pb.RequestSummary(request_id="r1", records_captured=1, complete=True, seq=3 * 65536, producer=PRODUCER)
    b = EnvelopeBatcher(max_message_bytes=1_000_000)
    b.add(b"r1", tensor_entry(rec, rows))
    b.add(b"r1", summary_entry(summary))
    [(key, value, n)] = list(b.messages())
    assert key == b"r1" and n == 2
    got = codec.decode_envelope(value)
    full = pb.TensorRecord()
    full.CopyFrom(rec)
    full.payload = bytes(rows)
    assert got[0].tensor == full
    assert got[1].summary == summary
    # and the bytes are the same size as the codec's own (no padding, no stray fields)
    assert len(value) == len(codec.encode_envelope([full, summary]))


def test_batcher_keeps_order_per_key_and_respects_the_size_limit():
    b = EnvelopeBatcher(max_message_bytes=2000)
    for i in range(10):
        rec = pb.TensorRecord(request_id="a" if i % 2 else "b", seq=i, dtype=pb.UINT8, shape=[500], raw_size=500, encoding=pb.RAW)
        b.add(rec.request_id.encode(), tensor_entry(rec, b"x" * 500))
    seen = {b"a": [], b"b": []}
    for key, value, n in b.messages():
        assert len(value) <= 2000
        recs = codec.decode_envelope(value)
        assert len(recs) == n
        seen[key] += [r.tensor.seq for r in recs]
    assert seen == {b"a": [1, 3, 5, 7, 9], b"b": [0, 2, 4, 6, 8]}


def _pre_rename_ring_classes():
    """The ring messages as built from ring.proto before the rename (RowSpan, RingStep.spans,
    SlabPart.span_index): today's descriptor with the old names, in a pool of its own."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    pool = descriptor_pool.DescriptorPool()
    records = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(records)
    pool.Add(records)
    old = descriptor_pb2.FileDescriptorProto()
    ring_pb2.DESCRIPTOR.CopyToProto(old)
    for msg in old.message_type:
        if msg.name == "RequestRows":
            msg.name = "RowSpan"
        for f in msg.field:
            if f.type_name == ".tensortrace.v1.RequestRows":
                f.type_name = ".tensortrace.v1.RowSpan"
            f.name = {"requests": "spans", "request_index": "span_index"}.get(f.name, f.name)
            f.ClearField("json_name")
    pool.Add(old)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"tensortrace.v1.{name}"))
            for name in ("RowSpan", "RingStep", "SlabPart", "RingSlab")}


def test_renamed_ring_fields_keep_the_binary_format_in_both_directions():
    """RowSpan -> RequestRows, spans -> requests, span_index -> request_index kept their field
    numbers: frames written by an old agent read the same with the new names, and back."""
    old = _pre_rename_ring_classes()
    new_step = _step()
    old_step = old["RingStep"].FromString(new_step.SerializeToString())
    assert [(s.request_id, s.row_start, s.row_count, s.position_start) for s in old_step.spans] == \
        [(r.request_id, r.row_start, r.row_count, r.position_start) for r in new_step.requests]
    assert old_step.SerializeToString() == new_step.SerializeToString()
    old_slab = old["RingSlab"](step=5, hook="resid_pre", dtype=pb.FLOAT16, row_shape=[2, 4],
                               parts=[old["SlabPart"](span_index=1, slab_row_start=0, row_count=1, position_start=9)])
    new_slab = ring_pb2.RingSlab.FromString(old_slab.SerializeToString())
    assert [p.request_index for p in new_slab.parts] == [1]
    [rec] = split_slab(new_step, new_slab, bytes(16), frame_seq=1, producer=PRODUCER)
    assert (rec.request_id, rec.token_start) == ("r2", 9)
