"""The layout adapter (ForwardBatch -> StepLayout) for every SGLang forward mode, on batch objects
built like SGLang builds them (SGLang's own classes under the SGLang venv; see forward_batches.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from forward_batches import KIND, ForwardMode, forward_batch
from tensortrace.agent.backends.sglang import batch_layout, v0_5
from tensortrace.agent.backends.sglang.batch_layout import LayoutError, plan_step
from tensortrace.agent import native
from tensortrace.agent.layout import Phase, ShiftedRows, StepLayout

pytestmark = pytest.mark.unit


@pytest.fixture(params=["native", "python"], autouse=True)
def repeat_check(request, monkeypatch):
    """Every test runs twice: with the steady decode step read and advanced by agent/_capture.c's
    advance_decode, and with plan_step's Python alone (the oracle); both must give the same plans."""
    if request.param == "python":
        monkeypatch.setattr(batch_layout, "advance_decode", None)
    elif batch_layout.advance_decode is None:
        pytest.skip("the native extension (agent/_capture.c) is not built")
    return request.param


def _native():
    mod, why = native.load()
    if mod is None:
        pytest.skip(why)
    return mod


def request_rows(plan):
    return [(s.request_id, s.row_start, s.row_count, s.position_start, s.phase.name) for s in plan.layout.requests]


def test_batch_kind_is_reported():
    print("ForwardBatch used:", KIND)


def test_extend_rows_are_new_tokens_in_batch_order():
    fb = forward_batch("EXTEND", ["a", "b", "c"], seq_lens=[5, 3, 4], extend_lens=[5, 3, 4], prefix_lens=[0, 0, 0])
    plan = plan_step(fb, {"a": 5, "b": 3, "c": 4}.get)
    assert request_rows(plan) == [("a", 0, 5, 0, "PREFILL"), ("b", 5, 3, 0, "PREFILL"), ("c", 8, 4, 0, "PREFILL")]
    assert plan.layout.total_rows == 12 and plan.layout.num_sequences == 3


def test_radix_cache_prefix_hit_starts_past_the_cached_tokens():
    # "a" had 6 of its 9 prompt tokens in the radix cache: only 3 rows, from position 6
    fb = forward_batch("EXTEND", ["a", "b"], seq_lens=[9, 2], extend_lens=[3, 2], prefix_lens=[6, 0])
    plan = plan_step(fb, {"a": 9, "b": 2}.get)
    assert request_rows(plan) == [("a", 0, 3, 6, "PREFILL"), ("b", 3, 2, 0, "PREFILL")]


def test_chunked_prefill_chunks_continue_positions_and_stay_prefill():
    prompt = {"long": 10}
    chunk1 = plan_step(forward_batch("EXTEND", ["long"], [4], [4], [0]), prompt.get)
    chunk2 = plan_step(forward_batch("EXTEND", ["long"], [8], [4], [4]), prompt.get)
    last = plan_step(forward_batch("EXTEND", ["long"], [10], [2], [8]), prompt.get)
    assert [request_rows(p)[0] for p in (chunk1, chunk2, last)] == [
        ("long", 0, 4, 0, "PREFILL"), ("long", 0, 4, 4, "PREFILL"), ("long", 0, 2, 8, "PREFILL")]


def test_mixed_batch_marks_running_requests_as_decode():
    # a new 4-token prompt + two running requests (mix_with_running: one token each, prefix seq_len-1)
    fb = forward_batch("MIXED", ["new", "r1", "r2"], seq_lens=[4, 6, 7], extend_lens=[4, 1, 1], prefix_lens=[0, 5, 6])
    plan = plan_step(fb, {"new": 4, "r1": 3, "r2": 5}.get)
    assert request_rows(plan) == [("new", 0, 4, 0, "PREFILL"), ("r1", 4, 1, 5, "DECODE"), ("r2", 5, 1, 6, "DECODE")]


def test_decode_one_row_per_request_at_seq_len_minus_one():
    fb = forward_batch("DECODE", ["a", "b", "c"], seq_lens=[6, 9, 4])
    plan = plan_step(fb, {"a": 5, "b": 3, "c": 3}.get)
    assert request_rows(plan) == [("a", 0, 1, 5, "DECODE"), ("b", 1, 1, 8, "DECODE"), ("c", 2, 1, 3, "DECODE")]


def test_padded_cuda_graph_decode_rows_belong_to_no_request():
    fb = forward_batch("DECODE", ["a", "b", "c"], seq_lens=[6, 9, 4], padded_to=8)
    plan = plan_step(fb, {"a": 5, "b": 3, "c": 3}.get)
    assert plan.layout.total_rows == 8
    covered = {r for s in plan.layout.requests for r in range(s.row_start, s.row_start + s.row_count)}
    assert covered == {0, 1, 2}


@pytest.mark.parametrize("mode", sorted(v0_5.MODES_SKIPPED))
def test_uncaptured_modes_are_skipped_with_a_reason(mode):
    if not hasattr(ForwardMode, mode):
        pytest.skip(f"ForwardMode.{mode} does not exist in this SGLang")
    fb = forward_batch(mode, ["a"], seq_lens=[3], extend_lens=[3], prefix_lens=[0])
    plan = plan_step(fb)
    assert plan.layout is None and plan.mode == mode and plan.skip_reason == v0_5.MODES_SKIPPED[mode]


def test_every_forward_mode_of_this_sglang_is_either_captured_or_skipped():
    names = {m.name for m in ForwardMode}
    unknown = names - set(v0_5.MODES_CAPTURED) - set(v0_5.MODES_SKIPPED)
    assert not unknown, f"ForwardMode members the adapter does not know: {sorted(unknown)} — update v0_5.py"


def test_rids_from_the_schedule_batch_when_forward_batch_has_none():
    fb = forward_batch("DECODE", ["x", "y"], seq_lens=[4, 5], set_rids=False)
    with pytest.raises(LayoutError, match="0 request ids for batch_size 2"):
        plan_step(fb)
    assert [s.request_id for s in plan_step(fb, rids=["x", "y"]).layout.requests] == ["x", "y"]


def test_unknown_prompt_length_falls_back_to_the_mode_phase():
    ext = plan_step(forward_batch("EXTEND", ["a"], [3], [3], [0]))
    dec = plan_step(forward_batch("DECODE", ["a"], [4]))
    assert ext.layout.requests[0].phase is Phase.PREFILL and dec.layout.requests[0].phase is Phase.DECODE


def test_inconsistent_batches_raise_naming_the_field():
    fb = forward_batch("EXTEND", ["a", "b"], seq_lens=[3, 3], extend_lens=[3, 3], prefix_lens=[0, 0])
    fb.extend_seq_lens_cpu = [3, 30]
    with pytest.raises(LayoutError, match="extend_seq_lens_cpu sums to 33 rows, input_ids has 6"):
        plan_step(fb)
    fb = forward_batch("EXTEND", ["a", "b"], seq_lens=[3, 3], extend_lens=[3, 3], prefix_lens=[0, 0])
    fb.extend_prefix_lens_cpu = [0]
    with pytest.raises(LayoutError, match="extend_prefix_lens_cpu"):
        plan_step(fb)
    fb = forward_batch("DECODE", ["a", "a"], seq_lens=[3, 4])
    with pytest.raises(LayoutError, match="appears twice"):
        plan_step(fb)


def test_padding_rows_never_reach_the_ring(tmp_path):
    """Layout + the real agent: a padded decode batch whose pad rows hold poison values."""
    from sglang_harness import read_rings
    from tensortrace.agent.config import AgentConfig
    from tensortrace.agent.core import CaptureAgent
    from tensortrace.agent.selection import Selection
    from tensortrace.wire.codec import record_to_tensor

    agent = CaptureAgent(AgentConfig(ring_dir=str(tmp_path), model_id="t", ring_capacity=1 << 20),
                         Selection.preset("hidden-states") if hasattr(Selection, "preset") else None)
    for rid, n in (("a", 5), ("b", 3), ("c", 3)):
        agent.begin_request(rid, prompt_tokens=n)
    fb = forward_batch("DECODE", ["c", "a", "b"], seq_lens=[4, 6, 9], padded_to=8)
    plan = plan_step(fb, {"a": 5, "b": 3, "c": 3}.get)
    rows = torch.full((8, 4), -1.0)
    rows[:3] = torch.tensor([[3.0], [1.0], [2.0]])  # row i carries its request's tag
    agent.begin_step(plan.layout)
    agent.capture("resid_pre", 0, rows)
    agent.end_step()
    for rid in ("a", "b", "c"):
        agent.end_request(rid, generated_tokens=1)
    agent.close()
    ring = read_rings(str(tmp_path))
    got = {r.request_id: (r.token_start, record_to_tensor(r)) for r in ring.records}
    assert set(got) == {"a", "b", "c"}
    assert got["a"][0] == 5 and got["b"][0] == 8 and got["c"][0] == 3
    assert [float(got[k][1][0, 0]) for k in ("a", "b", "c")] == [1.0, 2.0, 3.0]
    assert all(float(t.min()) >= 0 for _, t in got.values()), "a padding row was exported"


def test_a_decode_forward_of_the_previous_requests_one_position_on_is_the_previous_layout_advanced():
    """plan_step(previous=...): the same requests, rows and phases, every position + 1 -> the
    previous layout advanced (one shared shape token: the agent repeats that step's plan); any
    difference -> a layout built afresh (a shape token of its own)."""
    prompt = {"a": 5, "b": 3, "c": 3}.get
    first = plan_step(forward_batch("DECODE", ["a", "b"], seq_lens=[6, 9]), prompt).layout
    nxt = plan_step(forward_batch("DECODE", ["a", "b"], seq_lens=[7, 10]), prompt, previous=first)
    assert nxt.layout.shape is not None and nxt.layout.shape is first.shape
    assert request_rows(nxt) == [("a", 0, 1, 6, "DECODE"), ("b", 1, 1, 9, "DECODE")]
    assert nxt.layout == plan_step(forward_batch("DECODE", ["a", "b"], seq_lens=[7, 10]), prompt).layout
    for rids, seq_lens, why in ((["a", "b"], [8, 10], "a position jumped"),
                                (["b", "a"], [10, 7], "another order"),
                                (["a"], [7], "b finished"),
                                (["a", "b", "c"], [7, 10, 4], "c joined")):
        fresh = plan_step(forward_batch("DECODE", rids, seq_lens=seq_lens), prompt, previous=first).layout
        assert fresh.shape is not first.shape, why
    # a phase change (a prompt length unknown when `first` was built, reported now) is not a repeat either
    unknown = plan_step(forward_batch("DECODE", ["a", "b"], seq_lens=[6, 9]), {"b": 3}.get).layout
    other = plan_step(forward_batch("DECODE", ["a", "b"], seq_lens=[7, 10]), {"a": 9, "b": 3}.get, previous=unknown)
    assert other.layout.shape is not unknown.shape and request_rows(other)[0] == ("a", 0, 1, 6, "PREFILL")
    # ... while with the length still unknown the same step repeats (by the per-request check)
    same = plan_step(forward_batch("DECODE", ["a", "b"], seq_lens=[7, 10]), {"b": 3}.get, previous=unknown)
    assert same.layout.shape is unknown.shape and request_rows(same)[0] == ("a", 0, 1, 6, "DECODE")
    # a chain of repeats, and a repeat asked of an older layout than the newest: built afresh, right
    chain = [first]
    for k in range(3):
        chain.append(plan_step(forward_batch("DECODE", ["a", "b"], seq_lens=[7 + k, 10 + k]), prompt,
                               previous=chain[-1]).layout)
    assert all(x.shape is first.shape for x in chain)
    assert request_rows(SimpleNamespace(layout=chain[-1])) == [("a", 0, 1, 8, "DECODE"), ("b", 1, 1, 11, "DECODE")]
    stale = plan_step(forward_batch("DECODE", ["a", "b"], seq_lens=[8, 11]), prompt, previous=chain[1])
    assert request_rows(stale) == [("a", 0, 1, 7, "DECODE"), ("b", 1, 1, 10, "DECODE")]
    newest_next = plan_step(forward_batch("DECODE", ["a", "b"], seq_lens=[10, 13]), prompt, previous=chain[1])
    assert newest_next.layout.shape is not first.shape   # one on from the newest, not from chain[1]
    assert request_rows(newest_next) == [("a", 0, 1, 9, "DECODE"), ("b", 1, 1, 12, "DECODE")]


def test_a_decode_row_still_inside_its_prompt_repeats_until_its_phase_flips():
    """A DECODE forward whose row is still a prompt position (phase PREFILL) repeats the previous
    layout while the phase holds, and is built afresh at the first generated position."""
    prompt = {"a": 7}.get
    f1 = plan_step(forward_batch("DECODE", ["a"], seq_lens=[6]), prompt).layout          # position 5
    f2 = plan_step(forward_batch("DECODE", ["a"], seq_lens=[7]), prompt, previous=f1)    # position 6
    assert f2.layout.shape is f1.shape and request_rows(f2) == [("a", 0, 1, 6, "PREFILL")]
    f3 = plan_step(forward_batch("DECODE", ["a"], seq_lens=[8]), prompt, previous=f2.layout)   # position 7
    assert f3.layout.shape is not f1.shape and request_rows(f3) == [("a", 0, 1, 7, "DECODE")]
    f4 = plan_step(forward_batch("DECODE", ["a"], seq_lens=[9]), prompt, previous=f3.layout)
    assert f4.layout.shape is f3.layout.shape and request_rows(f4) == [("a", 0, 1, 8, "DECODE")]


@pytest.fixture(params=["tensorimpl", "torch"])
def seq_lens_read(request):
    """How next_decode reads input_ids' rows and seq_lens_cpu: in place from the TensorImpl (the
    agent/_tensorgeom module built for this torch, as every agent start-up hands it over), or through
    torch (`.shape`, `.tolist()`); the module's state is put back as an agent would leave it."""
    from tensortrace.agent import geometry

    mod = _native()
    cap, why = geometry.load()
    if request.param == "tensorimpl" and cap is None:
        pytest.skip(f"tensor-geometry module not usable: {why}")
    mod.use_geometry(cap if request.param == "tensorimpl" else None)
    try:
        yield request.param
    finally:
        mod.use_geometry(cap)


def test_next_decode_reads_the_steady_decode_step_in_c_and_leaves_every_other_case_to_python(seq_lens_read):
    """agent/_capture.c's next_decode: the new seq_lens when the forward is the shape's next decode
    step (the same ForwardMode object, batch size, request ids and rows, every seq_len + 1), None
    for anything else, including fields of unexpected types, which it never raises on."""
    next_decode = _native().next_decode
    prompt = {"a": 5, "b": 3}.get
    first = plan_step(forward_batch("DECODE", ["a", "b"], seq_lens=[6, 9]), prompt).layout
    shape = first.shape
    assert shape.mode is ForwardMode.DECODE and shape.last is first
    assert next_decode(forward_batch("DECODE", ["a", "b"], seq_lens=[7, 10]), shape, first.total_rows) == [7, 10]

    def fb(**change):
        out = forward_batch("DECODE", ["a", "b"], seq_lens=[7, 10])
        for k, v in change.items():
            setattr(out, k, v)
        return out
    misses = {
        "a position jumped": fb(seq_lens_cpu=torch.tensor([8, 10])),
        "a position repeated": fb(seq_lens_cpu=torch.tensor([6, 10])),
        "another order": fb(rids=["b", "a"]),
        "another request": fb(rids=["a", "c"]),
        "another mode": fb(forward_mode=ForwardMode.EXTEND),
        "batch size": fb(batch_size=3),
        "a batch size of another type": fb(batch_size="2"),
        "rids a tuple (plan_step's Python decides)": fb(rids=("a", "b")),
        "no rids": fb(rids=None),
        "seq_lens a list (no tolist)": fb(seq_lens_cpu=[7, 10]),
        "too few seq_lens": fb(seq_lens_cpu=torch.tensor([7])),
        "a seq_len past int64": fb(seq_lens_cpu=[2 ** 70, 10]),
        "a jump in a strided seq_lens": fb(seq_lens_cpu=torch.tensor([7, 0, 11, 0])[::2]),
        "a jump in int32 seq_lens (tolist)": fb(seq_lens_cpu=torch.tensor([7, 11], dtype=torch.int32)),
        "input rows": fb(input_ids=torch.arange(3)),
        "input rows of a 2-D input": fb(input_ids=torch.zeros(3, 2)),
    }
    for why, batch in misses.items():
        assert next_decode(batch, shape, first.total_rows) is None, why
    del_rids = forward_batch("DECODE", ["a", "b"], seq_lens=[7, 10], set_rids=False)
    assert next_decode(del_rids, shape, first.total_rows) is None
    assert next_decode(fb(), shape, first.total_rows + 1) is None   # the previous layout's rows differ
    assert next_decode(fb(), object(), 2) is None                   # not a shape
    with pytest.raises(TypeError):
        next_decode(fb(), shape)
    # seq_lens as other views and dtypes: the same answer, in place or through tolist()
    for view in (torch.tensor([7, 0, 10, 0])[::2], torch.tensor([7, 10], dtype=torch.int32),
                 torch.tensor([[7, 10]])[0], torch.tensor([7, 10, 12])):
        assert next_decode(fb(seq_lens_cpu=view), shape, first.total_rows) == [7, 10], view
    assert next_decode(fb(input_ids=torch.zeros(2, 3)), shape, first.total_rows) == [7, 10]   # rows: dim 0
    # CUDA-graph padding: rows and seq_lens past the batch size are read as plan_step reads them
    padded = plan_step(forward_batch("DECODE", ["a", "b"], seq_lens=[6, 9], padded_to=4), prompt).layout
    got = next_decode(forward_batch("DECODE", ["a", "b"], seq_lens=[7, 10], padded_to=4), padded.shape, 4)
    assert got == [7, 10]
    # and plan_step takes the C answer: an advanced layout of the same shape
    nxt = plan_step(fb(), prompt, previous=first)
    assert nxt.mode == "DECODE" and nxt.layout.shape is shape and shape.last is nxt.layout
    assert request_rows(nxt) == [("a", 0, 1, 6, "DECODE"), ("b", 1, 1, 9, "DECODE")]


def test_next_decode_reads_int64_seq_lens_in_place_with_the_geometry_module(seq_lens_read, monkeypatch):
    """With the TensorImpl reader, a steady step's int64 seq_lens_cpu is read in place: no tolist()
    call, no torch.Size; through torch, one tolist() a step. The answers are the same."""
    next_decode = _native().next_decode
    first = plan_step(forward_batch("DECODE", ["a", "b"], seq_lens=[6, 9]), {"a": 5, "b": 3}.get).layout
    calls = []
    real = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: calls.append(1) or real(self))
    assert next_decode(forward_batch("DECODE", ["a", "b"], seq_lens=[7, 10]), first.shape, first.total_rows) == [7, 10]
    assert len(calls) == (0 if seq_lens_read == "tensorimpl" else 1)


def test_advance_decode_is_plan_steps_steady_case_whole():
    """agent/_capture.c's advance_decode(fb, previous): previous.advanced(1), recorded as its shape's
    newest layout with the new seq_lens, when `fb` is the steady decode step after `previous`;
    None (nothing recorded) for every other case, which plan_step's Python then decides."""
    advance = _native().advance_decode   # (the fixture's "python" case leaves plan_step's use of it out)
    prompt = {"a": 5, "b": 3}.get
    first = plan_step(forward_batch("DECODE", ["a", "b"], seq_lens=[6, 9]), prompt).layout
    shape = first.shape
    nxt = advance(forward_batch("DECODE", ["a", "b"], seq_lens=[7, 10]), first)
    # what StepLayout.advanced(1) makes: the same rows one position on, a ShiftedRows of the built rows
    assert type(nxt) is StepLayout and nxt == first.advanced(1) and nxt.shape is shape
    assert type(nxt.requests) is ShiftedRows and nxt.requests.base is first.requests and nxt.requests.delta == 1
    assert (nxt.total_rows, nxt.num_sequences) == (first.total_rows, first.num_sequences)
    assert shape.last is nxt and shape.last_seq_lens == [7, 10]
    assert [r.position_start for r in nxt.requests] == [6, 9]
    # advanced from an advanced layout: the built rows, two positions on
    third = advance(forward_batch("DECODE", ["a", "b"], seq_lens=[8, 11]), nxt)
    assert third.requests.base is first.requests and third.requests.delta == 2 and shape.last is third
    assert [r.position_start for r in third.requests] == [7, 10]
    # misses: nothing recorded, None
    assert advance(forward_batch("DECODE", ["a", "b"], seq_lens=[8, 11]), nxt) is None   # not the newest layout
    assert advance(forward_batch("DECODE", ["a", "b"], seq_lens=[10, 12]), third) is None   # a position jumped
    assert advance(forward_batch("DECODE", ["a", "b"], seq_lens=[9, 12]), object()) is None
    assert shape.last is third and shape.last_seq_lens == [8, 11]
    prefill_rows = plan_step(forward_batch("DECODE", ["a", "b"], seq_lens=[2, 9]), prompt).layout   # a inside its prompt
    assert not prefill_rows.shape.all_decode
    assert advance(forward_batch("DECODE", ["a", "b"], seq_lens=[3, 10]), prefill_rows) is None
    extend = plan_step(forward_batch("EXTEND", ["a"], seq_lens=[5], extend_lens=[5], prefix_lens=[0]), prompt).layout
    assert extend.shape is None and advance(forward_batch("DECODE", ["a"], seq_lens=[6]), extend) is None
    with pytest.raises(TypeError):
        advance(forward_batch("DECODE", ["a", "b"], seq_lens=[9, 12]))
