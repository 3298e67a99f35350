"""Fuzzing the slab splitter (ring/slabs.py) with hostile STEP/SLAB/SUMMARY metas (issue 15, item 4).

Property: for any step, slab, payload and frame sequence a producer can write, `slab_part_metas`
either raises SlabError (a message naming the slab and the mismatch) or returns records that
(a) tile the payload — every payload byte in exactly one record, bit-exact, (b) are what every
consumer accepts (`codec.decode_envelope` of an envelope holding them), (c) fit the documented
bounds (record metadata, Kafka key, uint32 token range, uint64 seq). Never another exception.

Budget: `fuzz_settings` (derandomized, no database); TENSORTRACE_FUZZ_EXAMPLES=20000 for the long run.
"""

from __future__ import annotations

import pytest
from google.protobuf.message import DecodeError
from hypothesis import event, example, given
from hypothesis import strategies as st

from tensortrace.exporter.envelopes import EnvelopeBatcher, summary_entry, tensor_entry_bytes
from tensortrace.ring.slabs import (MAX_RECORD_META_BYTES, MAX_REQUEST_ID_BYTES, SEQ_PARTS_PER_FRAME, SlabError,
                                    StepRequests, parse_slab, parse_step, parse_summary, request_metas,
                                    slab_part_metas, summary_record)
from tensortrace.testing.hostile import U32, U64, fuzz_settings, slab_frames, step_frames, summary_frames
from tensortrace.v1 import records_pb2 as pb
from tensortrace.wire import codec

pytestmark = pytest.mark.unit

PRODUCER = pb.Producer(node="n1", pod="hostile", pid=7, tp_rank=0, generation=1)
frame_seqs = st.one_of(st.integers(0, 1000), st.integers(0, 1000), st.integers(0, 1000), st.sampled_from([(1 << 48) - 1, 1 << 48, U64]))


def _check_envelope(entries):
    b = EnvelopeBatcher(1 << 30)
    for key, entry in entries:
        b.add(key, entry)
    out = []
    for key, value, n in b.messages():
        recs = codec.decode_envelope(value)      # what every consumer runs: must not raise
        assert len(recs) == n
        out += [(key, r) for r in recs]
    return out


@fuzz_settings(ci_examples=400)
@given(data=st.data(), frame_seq=frame_seqs)
@example(data=None, frame_seq=1 << 60)
def test_split_is_exact_or_a_named_slab_error(data, frame_seq):
    if data is None:   # the @example: a plain valid slab with an overflowing frame sequence
        from tensortrace.v1 import ring_pb2
        step = ring_pb2.RingStep(step=1, requests=[ring_pb2.RequestRows(request_id="a")])
        slab = ring_pb2.RingSlab(step=1, hook="h", dtype=pb.UINT8, row_shape=[2],
                                 parts=[ring_pb2.SlabPart(request_index=0, row_count=1)])
        with pytest.raises(SlabError, match="frame sequence"):
            slab_part_metas(step, slab, b"ab", frame_seq, PRODUCER)
        return
    step_f = data.draw(step_frames(st.just(3), clean=data.draw(st.booleans())))
    try:
        step = parse_step(step_f.meta)
    except (SlabError, DecodeError):
        return
    slab_f = data.draw(slab_frames(st.just(3), len(step.requests), clean=data.draw(st.booleans())))
    try:
        slab = parse_slab(slab_f.meta)
    except (SlabError, DecodeError):
        return
    payload = memoryview(slab_f.payload)
    try:
        parts = slab_part_metas(step, slab, payload, frame_seq, PRODUCER, 0, pb.RAW, StepRequests(step))
    except SlabError as e:
        assert "slab" in str(e) or "step" in str(e) or "frame sequence" in str(e), str(e)
        event("SlabError: " + " ".join(w for w in str(e).split() if w.isalpha())[:40])
        return
    event(f"split into {min(len(parts), 3)}{'+' if len(parts) >= 3 else ''} records")
    covered = bytearray(len(payload))
    entries = []
    for i, (meta, ri, rows) in enumerate(parts):
        assert len(meta) <= MAX_RECORD_META_BYTES
        rec = pb.TensorRecord.FromString(meta)
        assert rec.seq == frame_seq * SEQ_PARTS_PER_FRAME + i <= U64
        assert rec.token_start <= rec.token_end <= U32 and rec.token_end - rec.token_start == slab.parts[i].row_count
        rb = rec.raw_size // max(1, rec.shape[0])
        r0 = slab.parts[i].slab_row_start
        assert rows.tobytes() == bytes(payload[r0 * rb:(r0 + rec.shape[0]) * rb]) and len(rows) == rec.raw_size
        for b in range(r0 * rb, r0 * rb + len(rows)):
            assert not covered[b]
            covered[b] = 1
        key = step.requests[ri].request_id.encode()
        assert len(key) <= MAX_REQUEST_ID_BYTES
        entries.append((key, tensor_entry_bytes(meta, rows)))
    assert all(covered), "payload bytes in no record"
    assert meta_equal_eager(step, slab, payload, frame_seq, parts)
    for key, r in _check_envelope(entries):
        assert r.tensor.request_id.encode() == key


def meta_equal_eager(step, slab, payload, frame_seq, parts) -> bool:
    """The lazy StepRequests gives the same bytes as the eager request_metas."""
    eager = slab_part_metas(step, slab, payload, frame_seq, PRODUCER, 0, pb.RAW, request_metas(step))
    return [m for m, _, _ in eager] == [m for m, _, _ in parts]


@fuzz_settings(ci_examples=200)
@given(summary=summary_frames(), frame_seq=frame_seqs)
def test_summary_is_published_as_consumers_accept_it_or_a_named_error(summary, frame_seq):
    try:
        s = summary_record(parse_summary(summary.meta), frame_seq, PRODUCER)
    except DecodeError:
        return
    except SlabError as e:
        assert "summary" in str(e) or "frame sequence" in str(e), str(e)
        return
    assert s.seq == frame_seq * SEQ_PARTS_PER_FRAME and s.producer == PRODUCER
    [(key, r)] = _check_envelope([(s.request_id.encode(), summary_entry(s))])
    assert r.summary == s
