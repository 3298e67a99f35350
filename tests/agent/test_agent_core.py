"""Agent core without a model: accounting, overflow policies, pending summaries, control block,
sampling and per-request options, positions, layout validation."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from tensortrace.agent import (AgentConfig, CaptureAgent, Phase, RequestRows, Selection, SelectionError,
                               StepLayout, parse_layers)
from tensortrace.devstack.ringread import RingContents, drain
from tensortrace.ring.format import RingReader

pytestmark = pytest.mark.unit

H = 64  # row width (float32): 256 bytes per row


def make_agent(ring_dir, selection=None, **cfg):
    cfg.setdefault("ring_capacity", 1 << 20)
    return CaptureAgent(AgentConfig(ring_dir=ring_dir, model_id="synthetic", pod="pod-a", **cfg),
                        selection or Selection(hooks=frozenset({"resid_pre", "logits"})))


def layout_for(rids, lengths, positions, phase=Phase.PREFILL):
    """Requests packed back to back (SGLang style), one padding row at the end."""
    requests, row = [], 0
    for rid, n, p in zip(rids, lengths, positions):
        requests.append(RequestRows(rid, row, n, p, phase))
        row += n
    return StepLayout(tuple(requests), total_rows=row + 1)


def run_steps(agent, rids, steps, layers=2, prompt=3):
    """Prefill + decode steps; every row's value encodes (request index, position, layer)."""
    for k in range(steps):
        lengths = [prompt] * len(rids) if k == 0 else [1] * len(rids)
        positions = [0] * len(rids) if k == 0 else [prompt + k - 1] * len(rids)
        layout = layout_for(rids, lengths, positions, Phase.PREFILL if k == 0 else Phase.DECODE)
        agent.begin_step(layout)
        for L in range(layers):
            agent.capture("resid_pre", L, rows_tensor(layout, L))
        agent.capture("logits", -1, rows_tensor(layout, 99))
        agent.end_step()


def rows_tensor(layout, layer):
    t = torch.full((layout.total_rows, H), -1.0)
    for i, s in enumerate(layout.requests):
        for r in range(s.row_count):
            t[s.row_start + r] = i * 10000 + (s.position_start + r) * 100 + layer
    return t


def check_accounting(agent, got: RingContents, rids):
    st = agent.stats()
    assert st.produced == st.written + st.dropped
    for name, h in st.by_hook.items():
        assert h.produced == h.written + h.dropped == h.written + sum(h.dropped_by_reason.values()), name
    assert st.written == len(got.records)
    for rid in rids:
        s = got.summaries[rid]
        n = sum(1 for r in got.records if r.request_id == rid)
        assert s.records_captured == n
        assert s.records_dropped == sum(s.dropped_by_reason.values())
        assert s.complete == (s.records_dropped == 0)
    assert sum(s.records_captured + s.records_dropped for s in got.summaries.values()) == st.produced


def test_rows_land_on_their_request_and_positions(ring_dir):
    agent = make_agent(ring_dir)
    rids = ["a", "b", "c"]
    for r in rids:
        agent.begin_request(r)
    before = agent.stats().thread_seconds
    t0 = time.perf_counter()
    run_steps(agent, rids, steps=3)
    for r in rids:
        agent.end_request(r, generated_tokens=3)
    wall = time.perf_counter() - t0
    # its own inference-thread time is accounted, and is part of (not more than) the wall time;
    # the ring header carries it for the exporter's metrics (as of the last end_step)
    assert 0 < agent.stats().thread_seconds - before <= wall
    header = RingReader.open(agent.ring_path)
    assert 0 < header.producer_stats()["thread_ns"] <= agent.thread_ns
    header.close()
    got = drain(RingReader.open(agent.ring_path))
    for i, rid in enumerate(rids):
        for L in (0, 1):
            t, pos = got.tensor(rid, "resid_pre", L)
            assert pos == [0, 1, 2, 3, 4]
            assert t[:, 0].tolist() == [i * 10000 + p * 100 + L for p in pos]
    check_accounting(agent, got, rids)
    assert all(s.complete for s in got.summaries.values())


def test_drop_newest_counts_every_dropped_record_exactly(ring_dir):
    agent = make_agent(ring_dir, ring_capacity=16 << 10, overflow_policy="drop_newest")
    rids = [f"r{i}" for i in range(4)]
    for r in rids:
        agent.begin_request(r)
    run_steps(agent, rids, steps=6)
    for r in rids:
        agent.end_request(r)
    reader = RingReader.open(agent.ring_path)
    got = drain(reader)            # frees the ring ...
    assert agent.flush(timeout_s=0)  # ... so the pending summaries can be written now
    drain(reader, into=got)
    st = agent.stats()
    assert st.dropped > 0 and st.dropped_by_reason.get("ring_full", 0) > 0
    assert st.summaries_pending == 0 and st.summaries_dropped == 0
    check_accounting(agent, got, rids)
    assert not all(s.complete for s in got.summaries.values())


def test_drop_request_stops_capture_for_the_rest_of_the_request(ring_dir):
    agent = make_agent(ring_dir, ring_capacity=8 << 10, overflow_policy="drop_request")
    rids = [f"r{i}" for i in range(4)]
    for r in rids:
        agent.begin_request(r)
    reader = RingReader.open(agent.ring_path)
    got = RingContents()
    run_steps_one(agent, rids, 0)          # prefill of 4 requests overflows the 8 KiB ring
    drain(reader, into=got)                 # a consumer drains between steps: room comes back
    agent.begin_request("late")
    for k in range(1, 5):
        run_steps_one(agent, rids + ["late"], k)
        drain(reader, into=got)
    for r in rids + ["late"]:
        agent.end_request(r)
    agent.flush(timeout_s=0)
    drain(reader, into=got)
    for rid in rids:
        s = got.summaries[rid]
        assert not s.complete and "drop_request" in s.incomplete_reason
        assert s.dropped_by_reason["ring_full"] >= 1 and s.dropped_by_reason["request_dropped"] == 4 * 3
        assert {r.step for r in got.records if r.request_id == rid} <= {1}   # nothing after the overflow
    assert got.summaries["late"].complete and got.summaries["late"].records_captured == 4 * 3
    check_accounting(agent, got, rids + ["late"])


def run_steps_one(agent, rids, k, prompt=3):
    lengths = [prompt] * len(rids) if k == 0 else [1] * len(rids)
    positions = [0] * len(rids) if k == 0 else [prompt + k - 1] * len(rids)
    layout = layout_for(rids, lengths, positions, Phase.PREFILL if k == 0 else Phase.DECODE)
    agent.begin_step(layout)
    for L in range(2):
        agent.capture("resid_pre", L, rows_tensor(layout, L))
    agent.capture("logits", -1, rows_tensor(layout, 99))
    agent.end_step()


def test_block_policy_loses_nothing_while_a_consumer_drains(ring_dir):
    agent = make_agent(ring_dir, ring_capacity=16 << 10, overflow_policy="block", block_timeout_s=30)
    rids = [f"r{i}" for i in range(4)]
    reader = RingReader.open(agent.ring_path)
    got = RingContents()
    stop = threading.Event()

    def consume():
        while not stop.is_set():
            drain(reader, into=got)
        drain(reader, into=got)

    t = threading.Thread(target=consume)
    t.start()
    try:
        for r in rids:
            agent.begin_request(r)
        run_steps(agent, rids, steps=6)
        for r in rids:
            agent.end_request(r)
        assert agent.flush(timeout_s=30)
    finally:
        stop.set()
        t.join()
    st = agent.stats()
    assert st.dropped == 0 and st.written == len(got.records) > 0
    check_accounting(agent, got, rids)
    assert all(s.complete for s in got.summaries.values())


def test_block_policy_times_out_drops_and_counts(ring_dir):
    agent = make_agent(ring_dir, ring_capacity=16 << 10, overflow_policy="block", block_timeout_s=0.01)
    rids = ["r0", "r1"]
    for r in rids:
        agent.begin_request(r)
    run_steps(agent, rids, steps=8)
    for r in rids:
        agent.end_request(r)
    reader = RingReader.open(agent.ring_path)
    got = drain(reader)
    agent.flush(timeout_s=0)
    drain(reader, into=got)
    assert agent.stats().dropped_by_reason.get("block_timeout", 0) > 0
    check_accounting(agent, got, rids)


def test_summaries_wait_in_a_bounded_queue_and_overflow_is_counted(ring_dir):
    agent = make_agent(ring_dir, ring_capacity=8 << 10, pending_summaries_max=1)
    rids = ["r0", "r1", "r2"]
    for r in rids:
        agent.begin_request(r)
    run_steps(agent, rids, steps=4)   # fills the ring
    for r in rids:
        agent.end_request(r)
    st = agent.stats()
    assert st.summaries_pending == 1 and st.summaries_dropped == 2
    reader = RingReader.open(agent.ring_path)
    got = drain(reader)
    assert agent.flush(timeout_s=0)
    drain(reader, into=got)
    assert len(got.summaries) == 1 and agent.stats().summaries_written == 1
    assert reader.producer_stats()["frames_dropped"] >= 2


def test_slab_larger_than_half_the_ring_is_dropped_as_too_large(ring_dir):
    agent = make_agent(ring_dir, ring_capacity=8 << 10)
    agent.begin_request("r0")
    layout = layout_for(["r0"], [40], [0])
    agent.begin_step(layout)
    agent.capture("resid_pre", 0, torch.zeros(layout.total_rows, H))
    agent.end_step()
    s = agent.end_request("r0")
    assert s.dropped_by_reason["too_large"] == 1 and not s.complete
    assert agent.stats().by_hook["resid_pre"].dropped_by_reason == {"too_large": 1}


def test_control_block_changes_selection_between_steps(ring_dir):
    agent = make_agent(ring_dir)
    reader = RingReader.open(agent.ring_path)
    agent.begin_request("r0")
    run_steps_one(agent, ["r0"], 0)
    reader.write_control({"version": 1, "enabled": True, "selection": {"hooks": ["logits"]}})
    run_steps_one(agent, ["r0"], 1)
    reader.write_control({"version": 1, "selection": {"preset": "nope"}})   # rejected, counted
    run_steps_one(agent, ["r0"], 2)
    reader.write_control({"version": 1, "enabled": False})
    run_steps_one(agent, ["r0"], 3)
    assert not agent.begin_request("while-off").sampled      # not tracked: no summary
    reader.write_control({"version": 1, "selection": {"hooks": ["resid_pre"], "layers": "1"}})
    run_steps_one(agent, ["r0"], 4)
    agent.end_request("r0")
    got = drain(reader)
    by_step = {}
    for r in got.records:
        by_step.setdefault(r.step, set()).add((r.hook, r.layer))
    assert by_step[1] == {("resid_pre", 0), ("resid_pre", 1), ("logits", -1)}
    assert by_step[2] == {("logits", -1)}
    assert by_step[3] == {("logits", -1)}          # the invalid document changed nothing
    assert 4 not in by_step                          # disabled
    assert by_step[5] == {("resid_pre", 1)}
    st = agent.stats()
    assert st.control_docs_applied == 3 and st.control_docs_rejected == 1
    assert set(got.summaries) == {"r0"} and st.requests_untracked == 1


def test_sampling_and_per_request_options(ring_dir):
    agent = make_agent(ring_dir, Selection(hooks=frozenset({"logits"}), sample_every=2))
    ctx = [agent.begin_request(f"r{i}") for i in range(4)]
    assert [c.sampled for c in ctx] == [True, False, True, False]
    forced_in = agent.begin_request("in", options={"capture": True})
    forced_out = agent.begin_request("out", options={"capture": False})
    own = agent.begin_request("own", options={"hooks": ["resid_pre"], "layers": [0], "capture": True})
    assert forced_in.sampled and not forced_out.sampled and own.sampled
    with pytest.raises(SelectionError):
        agent.begin_request("bad", options={"hooks": ["no_such_hook"]})
    rids = ["r0", "r1", "r2", "r3", "in", "out", "own"]
    run_steps(agent, rids, steps=2)
    for r in rids:
        agent.end_request(r)
    got = drain(RingReader.open(agent.ring_path))
    captured = {(r.request_id, r.hook, r.layer) for r in got.records}
    assert {rid for rid, _, _ in captured} == {"r0", "r2", "in", "own"}
    assert {(h, L) for rid, h, L in captured if rid == "own"} == {("resid_pre", 0)}
    assert got.summaries["r1"].sampled is False and got.summaries["r1"].records_captured == 0
    assert got.summaries["own"].hooks == ["resid_pre"]


def test_require_opt_in_and_rate_sampling_is_a_pure_function_of_the_request_id(ring_dir):
    sel = Selection(sample_rate=0.5)
    decisions = [sel.samples(f"req-{i}", i) for i in range(200)]
    assert decisions == [Selection(sample_rate=0.5).samples(f"req-{i}", 0) for i in range(200)]
    assert 50 < sum(decisions) < 150
    agent = make_agent(ring_dir, Selection(require_opt_in=True))
    assert not agent.begin_request("a").sampled
    assert agent.begin_request("b", options={"capture": True}).sampled


@pytest.mark.parametrize("positions,expect", [
    ("last", {("p", 1): [2], ("d", 2): [3], ("d", 3): [4]}),
    ("prefill", {("p", 1): [0, 1, 2]}),
    ("decode", {("d", 2): [3], ("d", 3): [4]}),
])
def test_position_filters(ring_dir, positions, expect):
    agent = make_agent(ring_dir, Selection(hooks=frozenset({"resid_pre"}), layers=frozenset({0}),
                                           positions=positions))
    agent.begin_request("r0")
    run_steps(agent, ["r0"], steps=3)
    agent.end_request("r0")
    got = drain(RingReader.open(agent.ring_path))
    seen = {("p" if r.phase == 1 else "d", r.step): list(range(r.token_start, r.token_end)) for r in got.records}
    assert seen == expect


def test_sequence_slot_tensors_give_each_request_its_last_token(ring_dir):
    agent = make_agent(ring_dir, Selection(hooks=frozenset({"logits"})))
    for r in ("a", "b"):
        agent.begin_request(r)
    layout = StepLayout((RequestRows("a", 0, 3, 0, Phase.PREFILL, seq_index=1),
                         RequestRows("b", 3, 2, 5, Phase.PREFILL, seq_index=0)), total_rows=6, num_sequences=3)
    agent.begin_step(layout)
    agent.capture("logits", -1, torch.tensor([[0.5], [1.5], [2.5]]))   # one row per sequence slot
    agent.end_step()
    got = drain(RingReader.open(agent.ring_path))
    ta, pa = got.tensor("a", "logits")
    tb, pb_ = got.tensor("b", "logits")
    assert (ta.tolist(), pa) == ([[1.5]], [2]) and (tb.tolist(), pb_) == ([[0.5]], [6])


def test_a_tensor_matching_no_row_domain_disables_only_that_tap(ring_dir):
    agent = make_agent(ring_dir)
    agent.begin_request("r0")
    layout = layout_for(["r0"], [3], [0])
    agent.begin_step(layout)
    agent.capture("resid_pre", 0, torch.zeros(7, H))      # 7 rows: neither 4 tokens nor 1 sequence
    agent.capture("resid_pre", 1, rows_tensor(layout, 1))
    agent.end_step()
    s = agent.end_request("r0")
    assert s.dropped_by_reason == {"tap_error": 1} and s.records_captured == 1
    assert "resid_pre@0" in agent.stats().disabled_taps


def test_layout_rejects_overlapping_or_out_of_range_request_rows():
    with pytest.raises(ValueError, match="overlap"):
        StepLayout((RequestRows("a", 0, 3, 0, Phase.PREFILL), RequestRows("b", 2, 2, 0, Phase.PREFILL)), total_rows=5)
    with pytest.raises(ValueError, match="outside"):
        StepLayout((RequestRows("a", 3, 3, 0, Phase.PREFILL),), total_rows=5)
    with pytest.raises(ValueError, match="twice"):
        StepLayout((RequestRows("a", 0, 1, 0, Phase.PREFILL), RequestRows("a", 1, 1, 0, Phase.PREFILL)), total_rows=5)


def test_selection_documents_round_trip_and_errors_say_what_is_wrong():
    sel = Selection.preset("full", layers=parse_layers("0-2,5"), positions="last", sample_every=3)
    assert Selection.from_doc(sel.to_doc()) == sel
    assert parse_layers("0-2,5") == frozenset({0, 1, 2, 5})
    with pytest.raises(SelectionError, match="positions"):
        Selection.from_doc({"selection": {"positions": "middle"}})
    with pytest.raises(SelectionError, match="unknown hook"):
        Selection.from_doc({"selection": {"hooks": ["resid_pree"]}})
    with pytest.raises(SelectionError, match="layers"):
        Selection.from_doc({"selection": {"layers": "a-b"}})
    with pytest.raises(SelectionError, match="version"):
        Selection.from_doc({"version": 2})


def test_ring_file_is_named_after_pod_pid_and_rank_with_mode_0600(ring_dir):
    import os
    agent = make_agent(ring_dir, tp_rank=0)
    assert os.path.basename(agent.ring_path) == f"pod-a-{os.getpid()}-r0.ring"
    assert os.stat(agent.ring_path).st_mode & 0o777 == 0o600
    with pytest.raises(ValueError, match="overflow_policy"):
        AgentConfig(ring_dir=ring_dir, overflow_policy="drop_oldest").validate()


def test_rows_of_requests_never_begun_are_counted_not_captured(ring_dir):
    agent = make_agent(ring_dir)
    agent.begin_request("known")
    layout = layout_for(["known", "stranger"], [2, 2], [0, 0])
    agent.begin_step(layout)
    agent.capture("resid_pre", 0, rows_tensor(layout, 0))
    agent.end_step()
    agent.end_request("known")
    got = drain(RingReader.open(agent.ring_path))
    assert {r.request_id for r in got.records} == {"known"}
    assert agent.stats().unknown_request_rows == 1


@pytest.mark.parametrize("path", ["memmove", "numpy"])
def test_a_copy_failing_after_reservation_leaves_no_frame_behind(ring_dir, monkeypatch, path):
    """Both CPU copy paths of the Python path: memmove for contiguous rows, numpy for strided ones
    (the native path's copy is a memcpy into the reserved frame, which cannot fail)."""
    import numpy as np
    from tensortrace.agent import core

    agent = make_agent(ring_dir, capture_path="python")
    agent.begin_request("r0")
    layout = layout_for(["r0"], [3], [0])
    calls = {"n": 0}

    def failing(real):
        def f(*a, **kw):
            calls["n"] += 1
            if calls["n"] == 1:
                raise OSError("injected: copy into the ring failed")
            return real(*a, **kw)
        return f
    if path == "memmove":
        monkeypatch.setattr(core, "_memmove", failing(core._memmove))
        shape = lambda t: t   # noqa: E731
    else:
        monkeypatch.setattr(core.np, "copyto", failing(np.copyto))
        shape = lambda t: t.t().contiguous().t()   # noqa: E731 - same values, not contiguous
    agent.begin_step(layout)
    agent.capture("resid_pre", 0, shape(rows_tensor(layout, 0)))   # reserved, then failed: rolled back
    agent.capture("resid_pre", 1, shape(rows_tensor(layout, 1)))
    agent.end_step()
    s = agent.end_request("r0")
    assert calls["n"] == 2
    reader = RingReader.open(agent.ring_path)
    got = drain(reader)          # frame sequence has no gap and no half-written frame
    assert [(r.hook, r.layer) for r in got.records] == [("resid_pre", 1)]
    t, _ = got.tensor("r0", "resid_pre", 1)
    assert torch.equal(t, rows_tensor(layout, 1)[:3])   # the second copy went through that path intact
    assert s.dropped_by_reason == {"tap_error": 1} and s.records_captured == 1


@pytest.mark.parametrize("path", ["native", "python"])
def test_idle_step_answers_only_while_no_live_request_is_sampled(ring_dir, path):
    """idle_step() is True exactly while no begun, unended request is sampled; it still does every
    step's housekeeping (heartbeat, control document, steps counted, thread time stored), and a
    captured plan that ends in idle steps keeps its accounting exact."""
    from tensortrace.agent import native

    if path == "native" and native.load()[0] is None:
        pytest.skip("native path not built")
    agent = make_agent(ring_dir, capture_path=path)
    reader = RingReader.open(agent.ring_path)
    assert agent.idle_step()                                   # nothing begun
    agent.begin_request("out", options={"capture": False})
    assert agent.idle_step()                                   # begun, not sampled
    agent.begin_request("a")
    assert not agent.idle_step()
    run_steps(agent, ["a"], steps=4)                           # prefill + 3 decode steps (a repeat plan)
    assert not agent.idle_step()
    agent.end_request("a", generated_tokens=3)
    st0 = agent.stats()
    hb0 = reader.producer_stats()["heartbeat_unix_nano"]
    ns0 = reader.producer_stats()["thread_ns"]
    # a control document written while idle is applied at the next idle step
    reader.write_control({"version": 1, "selection": {"hooks": ["logits"]}})
    time.sleep(0.001)
    for _ in range(3):
        assert agent.idle_step()
    st = agent.stats()
    assert st.steps == st0.steps + 3 and st.idle_steps == st0.idle_steps + 3
    assert st.control_docs_applied == 1 and agent.selection.hooks == frozenset({"logits"})
    assert reader.producer_stats()["thread_ns"] > ns0 and agent.thread_ns >= reader.producer_stats()["thread_ns"]
    assert reader.producer_stats()["heartbeat_unix_nano"] > hb0
    agent.begin_request("b")                                   # sampled again: steps capture
    assert not agent.idle_step()
    run_steps(agent, ["b"], steps=2)
    agent.end_request("b")
    agent.end_request("out")
    got = drain(reader)
    check_accounting(agent, got, ["a", "b"])
    assert {(r.request_id, r.hook) for r in got.records} == {("a", "resid_pre"), ("a", "logits"), ("b", "logits")}
    assert got.summaries["a"].complete and got.summaries["b"].complete and not got.summaries["out"].sampled
    agent.begin_request("c")
    assert not agent.idle_step()
    reader.close()
    agent.close()
    assert agent.idle_step()                                   # a closed agent captures nothing


def test_an_advanced_layout_is_the_built_layout_at_later_positions():
    """StepLayout.advanced: the rows of the built layout, positions `delta` further on, read on
    demand (ShiftedRows) and equal, as a whole and row by row, to the layout built afresh."""
    from tensortrace.agent.layout import ShiftedRows

    built = layout_for(["a", "b", "c"], [1, 1, 1], [5, 9, 2], Phase.DECODE)
    two = built.advanced().advanced()
    fresh = layout_for(["a", "b", "c"], [1, 1, 1], [7, 11, 4], Phase.DECODE)
    assert isinstance(two.requests, ShiftedRows) and two.requests.base is built.requests   # no chain of views
    assert two == fresh and fresh == two and two.requests == fresh.requests and fresh.requests == two.requests
    assert hash(two.requests) == hash(fresh.requests)
    assert len(two.requests) == 3 and two.requests[-1] == fresh.requests[2] and two.requests[1:] == fresh.requests[1:]
    assert [r.position_start for r in two.requests] == [7, 11, 4] and two.requests[0] is two.requests[0]
    assert built.requests[0].position_start == 5                          # the built layout is untouched
    assert two.shape is built.shape is not None and built.advanced(0) == built
    assert two.requests + (RequestRows("d", 4, 1, 0, Phase.DECODE),) == fresh.requests + (
        RequestRows("d", 4, 1, 0, Phase.DECODE),)
    with pytest.raises(IndexError):
        two.requests[3]
    with pytest.raises(ValueError):
        built.advanced(-1)
