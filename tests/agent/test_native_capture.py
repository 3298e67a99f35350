"""The native fast path (agent/_capture.c) against the Python path, its oracle: the same run captured
both ways writes the same ring bytes, counts the same drops, and the Python path is used (and says
so) where the native one is switched off or not built."""

from __future__ import annotations

import logging
import sys

import pytest
import torch

from tensortrace.agent import AgentConfig, CaptureAgent, Phase, RequestRows, Selection, StepLayout, core, native
from tensortrace.agent import geometry as tensor_geometry
from tensortrace.agent.backends.hf import HFBackend
from tensortrace.devstack.ringread import drain
from tensortrace.ring.format import HEADER_SIZE, OFF_PRODUCER_STATS, RingReader
from tensortrace.testing.tiny_models import left_padded, make

pytestmark = pytest.mark.unit

NATIVE, WHY_NOT = native.load(required=True)
needs_native = pytest.mark.skipif(NATIVE is None, reason=f"native path not built: {WHY_NOT}")

PROMPTS = [[5, 6, 7], [11, 12, 13, 14, 15, 16], [21], [31, 32, 33, 34]]
TRACE = "00-4bf92f3577b34da6a3ce929d0e0e47{:02x}-00f067aa0ba902b7-01"
GEN = dict(do_sample=False, pad_token_id=0, eos_token_id=None, return_dict_in_generate=True)


@pytest.fixture
def fixed_clock(monkeypatch):
    """Capture times pinned (both paths read core._time_ns; the native Core gets it at start-up)."""
    monkeypatch.setattr(core, "_time_ns", lambda: 1_700_000_000_123_456_789)


def ring_image(agent: CaptureAgent) -> tuple[bytes, bytes]:
    """(the data area, the producer counters) — everything but the per-incarnation header fields."""
    mm = agent.writer._m.mm
    counters = bytes(mm[OFF_PRODUCER_STATS + 8: OFF_PRODUCER_STATS + 40])   # frames/bytes committed, dropped
    return bytes(mm[HEADER_SIZE:]), counters


def stats_of(agent: CaptureAgent) -> dict:
    s = agent.stats()
    return {"produced": s.produced, "written": s.written, "dropped": s.dropped, "bytes": s.bytes_written,
            "by_reason": s.dropped_by_reason,
            "by_hook": {h: (v.produced, v.written, v.dropped, v.dropped_by_reason, v.bytes_written)
                        for h, v in s.by_hook.items()}}


def hf_run(path, ring_dir, family, batch, preset, capacity, policy="drop_newest", new_tokens=4, eos=None):
    model = make(family)
    agent = CaptureAgent(AgentConfig(ring_dir=str(ring_dir), model_id="m", pod=f"p-{path}", ring_capacity=capacity,
                                     overflow_policy=policy, capture_path=path), Selection.preset(preset))
    assert agent.capture_path == path
    backend = HFBackend(model, agent)
    ids, mask = left_padded(PROMPTS[:batch])
    out, _ = backend.generate(ids, attention_mask=mask, request_ids=[f"r{b}" for b in range(batch)],
                              traceparents=[TRACE.format(b) for b in range(batch)], max_new_tokens=new_tokens,
                              **dict(GEN, eos_token_id=eos))
    backend.detach()
    image, st = ring_image(agent), stats_of(agent)
    return agent, image, st, out.sequences


@needs_native
@pytest.mark.parametrize("family,batch,preset", [("llama", 1, "full"), ("llama", 3, "full"),
                                                  ("llama", 4, "hidden-states"), ("gpt2", 2, "full"),
                                                  ("qwen2_moe", 3, "full")])
def test_native_and_python_paths_write_identical_ring_bytes(tmp_path, fixed_clock, family, batch, preset):
    """GPT-2's q/k/v are strided views of the fused c_attn output (copied row by row); the MoE
    router's tensors are extracted by Python callables; the rest are read by the C taps."""
    runs = {p: hf_run(p, tmp_path / p, family, batch, preset, 16 << 20) for p in ("python", "native")}
    (a_py, img_py, st_py, seq_py), (a_nat, img_nat, st_nat, seq_nat) = runs["python"], runs["native"]
    assert torch.equal(seq_py, seq_nat)
    assert st_nat == st_py and st_py["dropped"] == 0 and st_py["written"] > 0
    assert img_nat == img_py
    # every record went through the native taps (none handed to the Python path)
    assert sum(p.counts()[1] for p in a_nat._native_plans) == st_nat["written"]
    got = drain(RingReader.open(a_nat.ring_path))
    assert len(got.records) == st_py["written"]
    for a in (a_py, a_nat):
        a.close()


@needs_native
@pytest.mark.parametrize("policy", ["drop_newest", "drop_request"])
def test_drops_on_a_full_ring_are_counted_identically(tmp_path, fixed_clock, policy):
    """A ring too small for the run (nothing drains it): the native path hands every slab that
    does not fit to the Python path's overflow policy, so drops and bytes match exactly."""
    runs = {p: hf_run(p, tmp_path / p, "llama", 3, "full", 64 << 10, policy=policy, new_tokens=6)
            for p in ("python", "native")}
    (a_py, img_py, st_py, _), (a_nat, img_nat, st_nat, _) = runs["python"], runs["native"]
    assert st_py["dropped"] > 0 and st_py["written"] > 0
    assert st_py["produced"] == st_py["written"] + st_py["dropped"]
    assert st_nat == st_py
    assert img_nat == img_py
    for a in (a_py, a_nat):
        a.close()


def _synthetic(path, ring_dir):
    agent = CaptureAgent(AgentConfig(ring_dir=str(ring_dir), model_id="s", pod=f"s-{path}", ring_capacity=1 << 20,
                                     capture_path=path), Selection(hooks=frozenset({"resid_pre", "mlp_act"})))
    for rid in ("a", "b"):
        agent.begin_request(rid, traceparent=TRACE.format(ord(rid)))
    layout = StepLayout((RequestRows("a", 0, 3, 0, Phase.PREFILL, 0), RequestRows("b", 4, 2, 0, Phase.PREFILL, 1)),
                        total_rows=7, num_sequences=2)
    return agent, layout


@pytest.fixture(params=["tensorimpl", "dlpack", "accessors"])
def geometry(request, monkeypatch):
    """How the native taps read a tensor's pointer, shape and strides: from its TensorImpl (the
    agent/_tensorgeom module built for this torch, the default where built), one DLPack export
    (where it is not) or the tensor's accessors (torch without _to_dlpack)."""
    if NATIVE is None:
        pytest.skip(f"native path not built: {WHY_NOT}")
    if request.param == "tensorimpl":
        cap, why = tensor_geometry.load()
        if cap is None:
            pytest.skip(f"tensor-geometry module not usable: {why}")
        yield request.param
        return
    monkeypatch.setenv(tensor_geometry.ENV, "0")   # every agent start-up then hands use_geometry(None)
    NATIVE.use_geometry(None)
    if request.param == "accessors":
        # every agent hands the native module torch._C._to_dlpack at start-up: hide it from them
        saved = torch._C._to_dlpack
        del torch._C._to_dlpack
        NATIVE.use_dlpack(None)
        try:
            yield request.param
        finally:
            torch._C._to_dlpack = saved
            NATIVE.use_dlpack(saved)
        return
    yield request.param


@needs_native
@pytest.mark.skipif(tensor_geometry.load()[0] is None, reason="tensor-geometry module not built")
def test_a_native_tap_reads_through_the_geometry_module_and_writes_what_dlpack_writes(tmp_path, fixed_clock,
                                                                                      monkeypatch):
    """The same tensors captured with the module and with it switched off write the same ring
    bytes (the ring-byte oracles here that take the `geometry` fixture run every source too)."""
    base = torch.randn(9, 6)
    images = {}
    for mode in ("tensorimpl", "dlpack"):
        if mode == "dlpack":
            monkeypatch.setenv(tensor_geometry.ENV, "0")
        agent, layout = _synthetic("native", tmp_path / mode)
        assert agent.geometry_reason == ("" if mode == "tensorimpl" else f"disabled by {tensor_geometry.ENV}=0")
        exports = []   # the DLPack route, counted: the TensorImpl route must not take it
        NATIVE.use_dlpack(lambda t: (exports.append(1), torch._C._to_dlpack(t))[1])
        try:
            # contiguous; rows strided apart (a column slice); a transposed-back view
            for t in (base[:7], base[1:8, :4], base.t()[:, :7].t()):
                assert sys.modules[tensor_geometry.MODULE].describe(t) is not None   # the module reads it
                agent.begin_step(layout)
                agent.capture("resid_pre", 0, t)
                agent.end_step()
        finally:
            NATIVE.use_dlpack(torch._C._to_dlpack)
        assert len(exports) == (0 if mode == "tensorimpl" else 3)
        images[mode] = (ring_image(agent), stats_of(agent))
        agent.close()
    assert images["tensorimpl"] == images["dlpack"]
    assert images["tensorimpl"][1]["written"] == 2 * 3   # a slab per request per step, all native


@needs_native
def test_strided_rows_and_static_buffers_match_the_python_path(tmp_path, fixed_clock, geometry):
    """capture() of a strided tensor (a column slice, a transposed one) and capture_static() of
    oversized static buffers (post CUDA-graph replay: only the step's rows) write what Python writes,
    with either source of the tensor's geometry."""
    torch.manual_seed(0)
    base = torch.randn(7, 24)
    fused = torch.randn(16, 3 * 8)                     # a static buffer bigger than the step
    images = {}
    for path in ("python", "native"):
        agent, layout = _synthetic(path, tmp_path / path)
        agent.begin_step(layout)
        agent.capture("resid_pre", 0, base[:, 8:16])              # rows strided by 24 elements
        agent.capture("resid_pre", 1, base.t().contiguous().t())  # column-major rows
        agent.capture("resid_pre", 2, base[:, :4].reshape(7, 2, 2))
        agent.capture("mlp_act", 0, torch.arange(7, dtype=torch.int64))   # 1-D: rows of one element
        agent.capture_static([("resid_pre", 3, fused), ("mlp_act", 1, fused[:, 8:16])], 7)
        agent.end_step()
        for rid in ("a", "b"):
            agent.end_request(rid)
        images[path] = (ring_image(agent), stats_of(agent))
        got = drain(RingReader.open(agent.ring_path))
        t, _ = got.tensor("a", "resid_pre", 0)
        assert torch.equal(t, base[0:3, 8:16])
        t, _ = got.tensor("b", "resid_pre", 3)
        assert torch.equal(t, fused[4:6])
        agent.close()
    assert images["native"] == images["python"]
    assert images["native"][1]["written"] == 2 * 6
    # natively: all but the column-major tensor's two (its rows are not contiguous: the Python path)
    assert sum(p.counts()[1] for p in agent._native_plans) == 2 * 6 - 2


def test_the_environment_switch_selects_the_python_path_and_says_so(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(native.ENV, "0")
    monkeypatch.setattr(native, "_logged", set())
    caplog.set_level(logging.WARNING, logger="tensortrace.agent")
    agent = CaptureAgent(AgentConfig(ring_dir=str(tmp_path), model_id="m"))
    assert agent.capture_path == "python" and agent._native is None
    assert f"disabled by {native.ENV}=0" in agent.native_reason
    assert "native capture path not used (disabled by TENSORTRACE_NATIVE=0); capturing with the Python path" in caplog.text
    assert agent.tap.__func__ is CaptureAgent.tap   # the Python tap serves the generic calls
    agent.close()


def test_an_unbuilt_extension_falls_back_with_one_line_naming_the_fix(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv(native.ENV, raising=False)
    monkeypatch.setitem(sys.modules, "tensortrace.agent._capture", None)   # as if no compiler had built it
    monkeypatch.setattr(native, "_logged", set())
    caplog.set_level(logging.WARNING, logger="tensortrace.agent")
    agent = CaptureAgent(AgentConfig(ring_dir=str(tmp_path), model_id="m"))
    assert agent.capture_path == "python"
    assert "not built" in agent.native_reason and "make setup" in agent.native_reason
    lines = [r.getMessage() for r in caplog.records if "native capture path" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0]
    agent.close()
    with pytest.raises(RuntimeError, match="capture_path='native' but .*not built"):
        CaptureAgent(AgentConfig(ring_dir=str(tmp_path / "n"), model_id="m", capture_path="native"))


def test_capture_path_is_validated():
    with pytest.raises(ValueError, match="capture_path 'fast' must be 'auto', 'native' or 'python'"):
        AgentConfig(capture_path="fast").validate()


@needs_native
def test_the_native_path_is_the_default_where_it_is_built(tmp_path, monkeypatch):
    monkeypatch.delenv(native.ENV, raising=False)
    agent = CaptureAgent(AgentConfig(ring_dir=str(tmp_path), model_id="m"))
    assert agent.capture_path == "native" and agent.native_reason == ""
    agent.close()


@needs_native
def test_native_thread_time_is_counted(tmp_path):
    agent, layout = _synthetic("native", tmp_path)
    before = agent.thread_ns
    agent.begin_step(layout)
    agent.capture("resid_pre", 0, torch.randn(7, 16))
    agent.end_step()
    assert agent.thread_ns > before
    assert agent.stats().written == 2
    agent.close()


@pytest.mark.gpu
def test_cuda_tensors_take_the_python_staging_path(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the native path hands CUDA tensors to the Python staging path")
    agent = CaptureAgent(AgentConfig(ring_dir=str(tmp_path), model_id="m", device="cuda"),
                         Selection(hooks=frozenset({"resid_pre"})))
    agent.begin_request("a")
    agent.begin_step(StepLayout((RequestRows("a", 0, 2, 0, Phase.PREFILL, 0),), total_rows=2))
    x = torch.randn(2, 8, device="cuda")
    agent.capture("resid_pre", 0, x)
    agent.end_step()
    agent.end_request("a")
    assert agent.flush(10)
    got = drain(RingReader.open(agent.ring_path))
    assert torch.equal(got.tensor("a", "resid_pre", 0)[0], x.cpu())
    agent.close()


@needs_native
def test_the_native_encoders_write_what_protobuf_writes():
    """The per-step messages the native path encodes in C: byte-identical to SerializeToString,
    zero fields (omitted) and multi-byte varints included."""
    from tensortrace.v1 import ring_pb2

    parts = [(0, 0, 1, 0), (1, 1, 3, 127), (2, 4, 128, 300), (70000, 2**20, 1, 2**32 - 1)]
    msg = ring_pb2.RingSlab()
    for idx, d, count, pos in parts:
        msg.parts.add(request_index=idx, slab_row_start=d, row_count=count, position_start=pos)
    assert NATIVE.encode_parts(parts) == msg.SerializeToString()
    reqs = [("a", b"\x01" * 16, b"\x02" * 8, 0, 1, 0, 1), ("b" * 200, b"", b"", 5, 300, 128, 2)]
    msg = ring_pb2.RingStep()
    items = []
    for rid, tid, sid, start, count, pos, phase in reqs:
        msg.requests.add(request_id=rid, trace_id=tid, span_id=sid, row_start=start, row_count=count,
                         position_start=pos, phase=phase)
        prefix = ring_pb2.RequestRows(request_id=rid, trace_id=tid, span_id=sid).SerializeToString()
        items.append((prefix, start, count, pos, phase))
    assert NATIVE.encode_requests(items) == msg.SerializeToString()
    for step in (1, 127, 128, 2**40):
        assert core._step_field(step) == ring_pb2.RingSlab(step=step).SerializeToString()
    with pytest.raises(TypeError, match="prefix bytes"):
        NATIVE.encode_requests([("not bytes", 0, 1, 0, 1)])


@needs_native
def test_tap_and_capture_of_one_hook_in_one_step(tmp_path, fixed_clock):
    """SGLang's start-up self-check captures a module tap's rows with capture(); the same
    (hook, layer) later fires through tap(): two native taps, both written (a regression: one
    shared entry crashed the scheduler)."""
    images = {}
    x = torch.randn(7, 4)
    for path in ("python", "native"):
        agent, layout = _synthetic(path, tmp_path / path)
        for _ in range(2):
            agent.begin_step(layout)
            agent.capture("resid_pre", 0, x)
            agent.tap("resid_pre", 0, lambda t: t, x + 1)
            agent.end_step()
        images[path] = (ring_image(agent), stats_of(agent))
        assert images[path][1]["written"] == 2 * 2 * 2
        agent.close()
    assert images["native"] == images["python"]


def _python_begin_step(monkeypatch):
    """Native agents made from now on keep CaptureAgent's begin_step, idle_step, end_step and capture
    (Python) instead of the Core's C methods (bind()): the C steady step's oracle on the native path."""
    real = CaptureAgent._setup_native

    def setup(self):
        real(self)
        if self._native is not None:
            for name in ("begin_step", "idle_step", "end_step", "capture"):
                assert self.__dict__.pop(name).__self__ is self._native   # bound to the Core
    monkeypatch.setattr(CaptureAgent, "_setup_native", setup)


def _repeat_run(path, ring_dir):
    """A step sequence with repeat steps (StepLayout.advanced) between every kind of change: the
    batch grows, a request finishes (the layout shrinks), a request ends while the next (advanced)
    layout still names it, the selection changes. Returns the ring image, stats and the records."""
    agent = CaptureAgent(AgentConfig(ring_dir=str(ring_dir), model_id="s", pod=f"r-{path}", ring_capacity=1 << 20,
                                     capture_path=path),
                         Selection(hooks=frozenset({"resid_pre", "logits"}), positions="all"))
    torch.manual_seed(1)
    x = {n: torch.randn(n, 8) for n in (1, 2, 3, 7)}

    def step(layout, logits_rows=None):
        before = agent._counters.scalars["repeat_steps"]
        repeats = agent.begin_step(layout)
        assert repeats == (agent._counters.scalars["repeat_steps"] > before)   # begin_step's answer
        agent.capture("resid_pre", 0, x[layout.total_rows])
        agent.capture("resid_pre", 1, x[layout.total_rows] + 1)
        agent.capture("logits", -1, x[logits_rows or layout.num_sequences] * 2)
        agent.end_step()

    for rid in ("a", "b"):
        agent.begin_request(rid, traceparent=TRACE.format(ord(rid)))
    prefill = StepLayout((RequestRows("a", 0, 3, 0, Phase.PREFILL, 0), RequestRows("b", 4, 3, 0, Phase.PREFILL, 1)),
                         total_rows=7, num_sequences=2)
    step(prefill)
    d = StepLayout((RequestRows("a", 0, 1, 3, Phase.DECODE, 0), RequestRows("b", 1, 1, 3, Phase.DECODE, 1)),
                   total_rows=2, num_sequences=2)
    step(d)
    for _ in range(3):                       # repeat steps: positions 4, 5, 6
        d = d.advanced()
        step(d)
    agent.begin_request("c", traceparent=TRACE.format(ord("c")))   # the batch grows
    d = StepLayout(d.advanced().requests + (RequestRows("c", 2, 1, 0, Phase.DECODE, 2),), total_rows=3,
                   num_sequences=3)
    step(d)
    d = d.advanced()
    step(d)
    agent.end_request("b", generated_tokens=6)   # b finishes; the next layout has no rows of it
    d = StepLayout((RequestRows("a", 0, 1, d.requests[0].position_start + 1, Phase.DECODE, 0),
                    RequestRows("c", 2, 1, d.requests[2].position_start + 1, Phase.DECODE, 2)),
                   total_rows=3, num_sequences=3)
    step(d)
    d = d.advanced(2)                        # a repeat step two positions on
    step(d)
    agent.end_request("c", generated_tokens=3)   # c ends, yet the next (advanced) layout names it
    d = d.advanced()
    step(d)                                  # -> c's rows: unknown_request_rows, not a repeat
    agent.set_selection(Selection(hooks=frozenset({"resid_pre"})))
    d = d.advanced()
    step(d)                                  # a new selection: not a repeat either
    d = d.advanced()
    step(d)
    agent.end_request("a", generated_tokens=12)
    image, st = ring_image(agent), stats_of(agent)
    st["steps"], st["repeat_steps"] = agent.stats().steps, agent.stats().repeat_steps
    got = drain(RingReader.open(agent.ring_path))
    agent.close()
    return image, st, got


@needs_native
@pytest.mark.parametrize("step", ["c", "python"])
def test_repeat_steps_write_what_the_python_path_writes(tmp_path, fixed_clock, monkeypatch, step):
    """The native path reuses a step's plan (selection answers, part groups, the STEP frame's
    requests) for a layout advanced from it, shifting positions in C and deferring the per-request
    accounting; the Python path plans every step afresh. Ring bytes, stats and summaries agree
    through every change that must end a plan, with begin_step's repeat case in C (`step="c"`,
    the Core's begin_step) or in CaptureAgent.begin_step's Python."""
    if step == "python":
        _python_begin_step(monkeypatch)
    asked = []   # steps whose STEP frame the native path asked the agent for
    real_frame = CaptureAgent._native_step_frame

    def frame_spy(self):
        asked.append(self._step)
        return real_frame(self)
    monkeypatch.setattr(CaptureAgent, "_native_step_frame", frame_spy)
    runs = {p: _repeat_run(p, tmp_path / p) for p in ("python", "native")}
    (img_py, st_py, got_py), (img_nat, st_nat, got_nat) = runs["python"], runs["native"]
    # the oracle never repeats; the native path repeats exactly the steps after which nothing
    # changed (3, 4, 5, 7, 9 and 12 of the 12), and writes a repeat step's STEP frame in C (its
    # requests are the plan's, shifted): the agent is asked for it only on the steps that planned afresh
    assert (st_py["repeat_steps"], st_nat["repeat_steps"], st_nat["steps"]) == (0, 6, 12)
    assert asked == [1, 2, 6, 8, 10, 11]
    del st_py["repeat_steps"], st_nat["repeat_steps"]
    assert st_nat == st_py and st_py["dropped"] == 0 and st_py["written"] == 34 + 21 + 12
    assert img_nat == img_py
    s = got_nat.summaries
    assert set(s) == {"a", "b", "c"}
    assert [s[r].records_captured for r in "abc"] == [34, 21, 12]   # deferred accounting, folded
    assert all(s[r].complete for r in "abc")
    def totals(got):
        return {r: (v.records_captured, v.bytes_captured, list(v.hooks)) for r, v in got.summaries.items()}
    assert totals(got_py) == totals(got_nat)
    # b: prefill 3 + 3 token rows and 1 logits row, then 6 decode steps of 3 rows; 8 float32 each
    assert totals(got_nat)["b"] == (21, (3 + 3 + 1 + 6 * 3) * 8 * 4, ["logits", "resid_pre"])
    assert got_nat.tensor("a", "resid_pre", 1)[1] == list(range(10)) + [11, 12, 13, 14]
    assert got_nat.tensor("c", "logits")[1] == [0, 1, 2, 4]
    assert got_nat.tensor("b", "resid_pre", 0)[1] == list(range(3 + 6))


def _one_request_agent(ring_dir, cls=CaptureAgent):
    agent = cls(AgentConfig(ring_dir=str(ring_dir), model_id="s", pod="one", ring_capacity=1 << 20,
                            capture_path="native"), Selection(hooks=frozenset({"resid_pre"}), positions="all"))
    agent.begin_request("a", traceparent=TRACE.format(1))
    x = torch.randn(1, 8)

    def step(layout):
        repeats = agent.begin_step(layout)
        agent.capture("resid_pre", 0, x)
        agent.end_step()
        return repeats
    return agent, step


def _idle_run(ring_dir):
    """Forwards with and without a sampled request live, a control document arriving while idle, a
    summary and a plan's counters to fold at the first idle step: what idle_step answers and counts."""
    agent, step = _one_request_agent(ring_dir)
    reader = RingReader.open(agent.ring_path)
    answers = [agent.idle_step()]                    # "a" is live and sampled: False
    d = StepLayout((RequestRows("a", 0, 1, 3, Phase.DECODE, 0),), total_rows=1, num_sequences=1)
    step(d)
    step(d.advanced())                               # a plan that may repeat: its counters deferred
    agent.end_request("a", generated_tokens=2)
    answers += [agent.idle_step() for _ in range(3)]  # nothing live: the first folds the plan
    reader.write_control({"version": 1, "selection": {"preset": "hidden-states"}})
    answers += [agent.idle_step() for _ in range(2)]  # the control block moved: applied at the first
    agent.begin_request("b", traceparent=TRACE.format(2), options={"capture": False})
    answers.append(agent.idle_step())               # b is not sampled: still idle
    st = agent.stats()
    out = (answers, st.steps, st.idle_steps, st.repeat_steps, st.control_docs_applied, st.written,
           agent.selection.hooks)
    reader.close()
    agent.close()
    return out


@needs_native
@pytest.mark.parametrize("step", ["c", "python"])
def test_idle_steps_answer_and_count_as_the_python_method_does(tmp_path, monkeypatch, step):
    """idle_step's two common cases run in the Core (False while a sampled request is live; True,
    counted, for a forward with none); a pending control document or a plan to fold goes the Python
    method. Both ways answer and count the same."""
    if step == "python":
        _python_begin_step(monkeypatch)
    python_calls = []
    real = CaptureAgent.idle_step
    monkeypatch.setattr(CaptureAgent, "idle_step", lambda self: (python_calls.append(1), real(self))[1])
    answers, steps, idle, repeats, applied, written, hooks = _idle_run(tmp_path)
    assert answers == [False, True, True, True, True, True, True]
    assert (steps, idle, repeats, applied, written) == (8, 6, 1, 1, 2)
    # the Core hands back the idle step that folds the plan and the one that reads the control block
    assert len(python_calls) == (2 if step == "c" else 7)
    assert hooks == frozenset({"resid_pre", "resid_final", "logits"})


@needs_native
def test_a_c_repeat_step_that_fails_inside_disables_the_agent_and_the_model_runs_on(tmp_path, caplog):
    """An internal error in the Core's begin_step, after it began changing the agent's state (here:
    a plan's group whose native half is not a _capture.Group), is what an exception in
    _begin_step is: the agent is disabled with the reason, begin_step answers False and nothing
    raises into the model; later steps capture nothing."""
    agent, step = _one_request_agent(tmp_path)
    assert agent.begin_step.__self__ is agent._native   # the C begin_step is in use
    d = StepLayout((RequestRows("a", 0, 1, 3, Phase.DECODE, 0),), total_rows=1, num_sequences=1)
    assert step(d) is False                  # a new plan
    d = d.advanced()
    assert step(d) is True                   # repeated in C
    frames = agent.writer._seq   # frames published in the ring
    d = StepLayout(tuple(d.advanced().requests), total_rows=1, num_sequences=1)
    assert step(d) is False                  # not an advanced layout: the Python method plans it
    assert agent.writer._seq == frames + 2   # its STEP frame and slab
    d = d.advanced()
    assert step(d) is True
    group = next(iter(agent._native_groups.values()))
    group.native = object()                  # an internal inconsistency the C repeat case meets mid-way
    with caplog.at_level(logging.ERROR, logger="tensortrace.agent"):
        assert step(d.advanced()) is False
    assert agent.disabled_reason.startswith("TypeError: begin_step: a native group without its _capture.Group")
    assert "capture agent disabled" in caplog.text
    frames = agent.writer._seq
    assert step(d.advanced(2)) is False and agent.writer._seq == frames and agent.stats().agent_disabled
    agent.close()


@needs_native
def test_an_agent_class_that_defines_a_step_attribute_keeps_the_python_begin_step(tmp_path):
    """The Core reads and sets the agent's attributes in its instance dict; a subclass that makes one
    of them a class attribute (a property, a default) is not bound: begin_step stays the class's
    Python method, and repeat steps still happen there."""
    class Odd(CaptureAgent):
        _plan_unknown = 0   # a class default shadows nothing, but the Core would not see it the same way

    agent, step = _one_request_agent(tmp_path, Odd)
    assert agent.capture_path == "native" and "begin_step" not in agent.__dict__
    assert agent.begin_step.__func__ is CaptureAgent.begin_step
    d = StepLayout((RequestRows("a", 0, 1, 3, Phase.DECODE, 0),), total_rows=1, num_sequences=1)
    assert [step(d), step(d.advanced()), step(d.advanced(2))] == [False, True, True]
    assert agent.stats().repeat_steps == 2 and agent.writer._seq == 6   # a STEP frame and a slab a step
    agent.close()


@needs_native
@pytest.mark.parametrize("step", ["c", "python"])
def test_hf_decode_with_a_finishing_request_writes_what_the_python_path_writes(tmp_path, fixed_clock, monkeypatch,
                                                                                step):
    """HF decode steps after a decode step with the same requests are advanced layouts (repeat
    steps on the native path: begin_step's repeat case in C, `step="c"`, or the Python method); a
    request that feeds its EOS leaves the batch (a new plan), then the others repeat again. Ring
    bytes and summaries as on the Python path."""
    if step == "python":
        _python_begin_step(monkeypatch)
    model = make("llama")
    ids, mask = left_padded(PROMPTS[:3])
    plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=7, **GEN).sequences
    eos = int(plain[1, ids.shape[1] + 2])   # request 1 feeds its EOS at the 3rd decode forward
    assert eos not in plain[0, ids.shape[1]:].tolist() + plain[2, ids.shape[1]:].tolist()
    repeated = []   # (path, step, requests) of every repeat step
    real_setup = CaptureAgent._setup_native

    def setup(self):   # every agent's begin_step (the Core's or the class's) answers through a spy
        real_setup(self)
        inner = self.begin_step

        def begin_step(layout):
            before = self._counters.scalars["repeat_steps"]
            repeats = inner(layout)
            assert repeats == (self._counters.scalars["repeat_steps"] > before)   # begin_step's answer
            if repeats:
                repeated.append((self.capture_path, self._step, len(layout.requests)))
            return repeats
        self.begin_step = begin_step
    monkeypatch.setattr(CaptureAgent, "_setup_native", setup)
    runs = {p: hf_run(p, tmp_path / p, "llama", 3, "full", 16 << 20, new_tokens=7, eos=eos)
            for p in ("python", "native")}
    (a_py, img_py, st_py, seq_py), (a_nat, img_nat, st_nat, seq_nat) = runs["python"], runs["native"]
    assert torch.equal(seq_py, seq_nat)
    # forwards: 1 prefill, 2 the first decode (a new plan), 3 repeat, 4 request 1 ended (new plan), 5-7 repeat
    assert repeated == [("native", 3, 3), ("native", 5, 2), ("native", 6, 2), ("native", 7, 2)]
    assert st_nat == st_py and st_py["dropped"] == 0
    assert img_nat == img_py
    got = drain(RingReader.open(a_nat.ring_path))
    assert got.tensor("r1", "resid_pre", 0)[1] == list(range(len(PROMPTS[1]) + 2))
    assert got.tensor("r0", "resid_pre", 0)[1] == list(range(len(PROMPTS[0]) + 6))
    # every forward captures the same hooks: r1 took part in 3 forwards, r0 in 7 (accounting deferred and folded)
    assert got.summaries["r1"].records_captured * 7 == got.summaries["r0"].records_captured * 3 > 0
    for a in (a_py, a_nat):
        a.close()


@needs_native
def test_the_token_row_kinds_read_what_their_python_extractors_read(tmp_path, fixed_clock, geometry):
    """SGLang's kinds (tensors already [tokens, ...], hook arguments without kwargs): output or its
    element 0, output[1] else args[0], output[1], args[0], and a column range of the output. Each
    writes what its Python extractor writes; what a kind cannot read (a 1-D value, no tuple, a
    column range past the width, a non-tensor) goes to the Python path, which decides."""
    from tensortrace.agent.core import (TAP_ROWS_IN0, TAP_ROWS_OUT0, TAP_ROWS_OUT0_COLS, TAP_ROWS_OUT1,
                                        TAP_ROWS_OUT1_OR_IN0)

    def rows(v):
        return None if v is None or not hasattr(v, "shape") or v.dim() < 1 else (v if v.dim() >= 2 else v.unsqueeze(-1))

    def first(x):
        return x[0] if isinstance(x, (tuple, list)) else x

    torch.manual_seed(0)
    x, res, qkv = torch.randn(7, 8), torch.randn(7, 8), torch.randn(7, 20)
    ids = torch.arange(7)
    entries = [("resid_pre", 0, TAP_ROWS_OUT1_OR_IN0, lambda m, a, o: rows(o[1] if isinstance(o, tuple) else a[0])),
               ("resid_pre", 1, TAP_ROWS_OUT1, lambda m, a, o: rows(o[1]) if isinstance(o, tuple) else None),
               ("resid_pre", 2, TAP_ROWS_OUT0, lambda m, a, o: rows(first(o))),
               ("resid_pre", 3, TAP_ROWS_OUT0_COLS, lambda m, a, o: rows(first(o)[:, 12:16]), 12, 4)]
    too_wide = [("resid_pre", 4, TAP_ROWS_OUT0_COLS, lambda m, a, o: rows(first(o)[:, 16:24]), 16, 8)]
    images, natively = {}, {}
    for path in ("python", "native"):
        agent, layout = _synthetic(path, tmp_path / path)
        post = agent.make_tap(entries)
        wide = agent.make_tap(too_wide)
        pre = agent.make_tap([("mlp_act", 0, TAP_ROWS_IN0, lambda m, a: rows(a[0]))])
        agent.begin_step(layout)
        post(None, (x,), (qkv, res))          # fused norm: (normed, residual); qkv read as the output
        post(None, (x,), qkv)                 # no tuple: args[0] / the Python path (None) / the output
        post(None, (x,), (ids,))              # a 1-D element 0: the Python path makes it a column
        wide(None, (x,), qkv)                 # columns 16..24 of 20: the Python path (which reads 4 wide)
        pre(None, (x,))
        pre(None, ("not a tensor",))          # the Python path: its extractor fails, tap_error
        agent.end_step()
        for rid in ("a", "b"):
            agent.end_request(rid)
        images[path] = (ring_image(agent), stats_of(agent))
        if path == "native":
            natively = sum(p.counts()[1] for p in agent._native_plans)
        got = drain(RingReader.open(agent.ring_path))
        t, _ = got.tensor("a", "resid_pre", 3)
        assert torch.equal(t, torch.cat([qkv[0:3, 12:16]] * 2))   # two firings of step 1
        agent.close()
    assert images["native"] == images["python"]
    # natively: out1-or-in0 x2, out1 x1, out0 x2, cols x2, in0 x1 = 8 tap firings x 2 requests
    assert natively == 2 * 8 and images["native"][1]["written"] > natively


@needs_native
def test_the_native_block_timer_is_one_object_that_nests_and_survives_an_exception(tmp_path):
    """agent.timed() on the native path: one reusable C object (no allocation, no Python frame per
    block). A block that raises still counts its time and closes; blocks nested deeper than its
    stack (16) are covered by the enclosing one, counted once."""
    import time

    agent = CaptureAgent(AgentConfig(ring_dir=str(tmp_path), model_id="t", capture_path="native"))
    timer = agent.timed()
    assert timer is agent.timed() and type(timer).__name__ == "Timer"
    before = agent.thread_ns
    with pytest.raises(ZeroDivisionError):
        with agent.timed():
            time.sleep(0.01)
            1 / 0
    assert timer.depth == 0
    raised = agent.thread_ns - before
    assert 10_000_000 <= raised < 1_000_000_000

    def nest(k):
        if k == 0:
            time.sleep(0.01)
            return
        with agent.timed():
            nest(k - 1)
    before = agent.thread_ns
    t0 = time.perf_counter_ns()
    nest(20)
    wall = time.perf_counter_ns() - t0
    assert timer.depth == 0
    assert 10_000_000 <= agent.thread_ns - before <= wall
    time.sleep(0.005)   # outside any block: not the agent's
    assert agent.thread_ns - before <= wall
    agent.close()


@needs_native
def test_one_tap_fed_every_dtype_in_turn_writes_what_the_python_path_writes(tmp_path, fixed_clock, geometry,
                                                                           monkeypatch):
    """The native taps read a tensor's dtype from its DLPack export (torch.dtype objects learnt per
    DLPack type; types DLPack does not name unambiguously ask the tensor). One tap fed tensors of
    every dtype in turn — float16 and bfloat16 share a width, bool and uint8 may share a DLPack
    type on some torch versions — writes slab for slab what the Python path writes."""
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32,
              torch.int16, torch.int8, torch.uint8, torch.bool, torch.bfloat16, torch.float16, torch.float32]
    torch.manual_seed(3)
    base = torch.randn(7, 4) * 50
    images = {}
    slow = []   # calls the native path handed to the Python path
    real = CaptureAgent._tap_body
    monkeypatch.setattr(CaptureAgent, "_tap_body", lambda self, *a: (slow.append(self.capture_path), real(self, *a))[1])
    for path in ("python", "native"):
        agent, layout = _synthetic(path, tmp_path / path)
        for dt in dtypes:
            agent.begin_step(layout)
            agent.capture("resid_pre", 0, base.to(dt))
            agent.end_step()
        images[path] = (ring_image(agent), stats_of(agent))
        agent.close()
    assert images["native"] == images["python"]
    assert images["native"][1]["written"] == 2 * len(dtypes)
    assert "native" not in slow   # every slab was written by the native path
