"""SGLangCapture (the per-scheduler-process runtime) driven like SGLang's hooks drive it, on the
SHAPE-ALIKE model of shape_alike.py (SGLang's module names and norm contract)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

from forward_batches import forward_batch
from shape_alike import finish, make_runner, model_forward, req
from sglang_harness import read_rings
from tensortrace.agent.backends.sglang.config import SGLangBackendConfig
from tensortrace.agent.backends.sglang.plugin import SGLangCapture

pytestmark = pytest.mark.unit
@pytest.fixture
def runtime(tmp_path):
    runner = make_runner()
    rt = SGLangCapture(SGLangBackendConfig(ring_dir=str(tmp_path), ring_capacity=1 << 20, selection="full"))
    rt.attach(runner)
    return rt, runner, str(tmp_path)


def test_self_check_disables_a_tap_that_does_not_fire_and_reports_it(runtime):
    rt, runner, ring_dir = runtime
    a, b = req("a", 3, {"traceparent": "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"}), req("b", 2)
    fb = forward_batch("EXTEND", ["a", "b"], seq_lens=[3, 2], extend_lens=[3, 2], prefix_lens=[0, 0])
    fb.input_ids = torch.tensor([1, 2, 3, 4, 5])
    rt.observe_batch(fb, SimpleNamespace(reqs=[a, b]))
    with torch.no_grad():
        rt.forward(model_forward, runner, fb)
    stats = rt.agent.stats()
    assert ("mlp_act@1", "model.layers.1.mlp.down_proj did not fire in the first forward") in stats.unplaced_taps
    assert ("mlp_act", 1) not in rt.taps.taps and ("mlp_act", 0) in rt.taps.taps
    finish(a, 1), finish(b, 1)
    rt.finish_requests([a, b])
    rt.agent.close()
    ring = read_rings(ring_dir)
    by = ring.by_request()
    assert {(r.hook, r.layer) for r in by["a"]} >= {("resid_pre", 0), ("resid_mid", 1), ("logits", -1), ("token_ids", -1)}
    assert ring.summaries["a"].trace_id.hex() == "ab" * 16 and ring.summaries["a"].complete
    # resid_pre of layer 1 is the residual the fused add+norm produced: embeddings + attn + mlp of layer 0
    resid = {(r.request_id, r.hook, r.layer): r for r in ring.records}
    from tensortrace.wire.codec import record_to_tensor

    emb = runner.model.model.embed_tokens(torch.tensor([1, 2, 3]))
    assert torch.equal(record_to_tensor(resid[("a", "resid_pre", 0)]), emb.detach())


def test_uncaptured_forward_modes_leave_the_request_explicitly_incomplete(runtime):
    rt, runner, ring_dir = runtime
    r = req("spec", 2)
    fb = forward_batch("EXTEND", ["spec"], seq_lens=[2], extend_lens=[2], prefix_lens=[0])
    fb.input_ids = torch.tensor([1, 2])
    rt.observe_batch(fb, SimpleNamespace(reqs=[r]))
    with torch.no_grad():
        rt.forward(model_forward, runner, fb)
        verify = forward_batch("TARGET_VERIFY", ["spec"], seq_lens=[6], extend_lens=[4], prefix_lens=[2])
        rt.forward(lambda runner, fb: "verified", runner, verify)
    finish(r, 4)
    rt.finish_requests([r])
    rt.agent.close()
    s = read_rings(ring_dir).summaries["spec"]
    assert not s.complete and "TARGET_VERIFY forwards are not captured" in s.incomplete_reason
    assert rt.skipped_steps == {"TARGET_VERIFY": 1}


def test_opted_out_request_has_no_rows_and_a_sampled_false_summary(runtime):
    rt, runner, ring_dir = runtime
    r = req("out", 2, {"tensortrace": {"capture": False}})
    fb = forward_batch("EXTEND", ["out"], seq_lens=[2], extend_lens=[2], prefix_lens=[0])
    fb.input_ids = torch.tensor([1, 2])
    rt.observe_batch(fb, SimpleNamespace(reqs=[r]))
    with torch.no_grad():
        rt.forward(model_forward, runner, fb)
    finish(r, 1)
    rt.finish_requests([r])
    rt.agent.close()
    ring = read_rings(ring_dir)
    assert not ring.records and ring.summaries["out"].sampled is False


def test_a_draft_runner_is_never_attached(tmp_path):
    rt = SGLangCapture(SGLangBackendConfig(ring_dir=str(tmp_path)))
    rt.attach(SimpleNamespace(is_draft_worker=True))
    assert rt.agent is None and not rt.attached_to(SimpleNamespace())


def test_thread_time_includes_the_layout_and_request_bookkeeping_not_the_forward(runtime, monkeypatch):
    """SGLangCapture is a Backend of the engine contract: its layout (plan_step) and its request
    bookkeeping run under agent.timed(), so stats().thread_seconds includes them; SGLang's forward
    itself (here a slow ModelRunner.forward) is not the agent's time."""
    from tensortrace.agent.backends.base import Backend
    from tensortrace.agent.backends.sglang import plugin

    rt, runner, ring_dir = runtime
    assert isinstance(rt, Backend)
    calls = {"plan": 0, "options": 0}
    real_plan, real_options = plugin.plan_step, plugin.options_of

    def slow_plan(*a, **kw):
        calls["plan"] += 1
        time.sleep(0.02)
        return real_plan(*a, **kw)

    def slow_options(custom):
        calls["options"] += 1
        time.sleep(0.02)
        return real_options(custom)

    def slow_forward(runner, fb):
        time.sleep(0.2)
        return model_forward(runner, fb)
    monkeypatch.setattr(plugin, "plan_step", slow_plan)
    monkeypatch.setattr(plugin, "options_of", slow_options)
    a, b = req("a", 3), req("b", 2)
    before = rt.agent.stats().thread_seconds
    fb = forward_batch("EXTEND", ["a", "b"], seq_lens=[3, 2], extend_lens=[3, 2], prefix_lens=[0, 0])
    fb.input_ids = torch.tensor([1, 2, 3, 4, 5])
    rt.observe_batch(fb, SimpleNamespace(reqs=[a, b]))
    with torch.no_grad():
        rt.forward(slow_forward, runner, fb)
        dec = forward_batch("DECODE", ["a", "b"], seq_lens=[4, 3])
        dec.input_ids = torch.tensor([6, 7])
        rt.forward(slow_forward, runner, dec)
    finish(a, 2), finish(b, 2)
    rt.finish_requests([a, b])
    counted = rt.agent.stats().thread_seconds - before
    assert calls == {"plan": 2, "options": 2}
    # two layouts + two requests' options: 4 x 20 ms in; two forwards' 2 x 200 ms out
    assert 0.08 <= counted < 0.2
    rt.agent.close()
    assert read_rings(ring_dir).summaries["a"].records_captured > 0


def test_detach_removes_every_tap_and_later_forwards_pass_through(runtime):
    rt, runner, ring_dir = runtime
    hooks = lambda: sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in runner.model.modules())  # noqa: E731
    assert rt.taps.taps and hooks() == len(rt.taps.taps) and rt.attached_to(runner)
    assert rt.attach(runner) == rt.unplaced            # attaching again changes nothing
    rt.detach()
    assert hooks() == 0 and not rt.taps.taps and not rt.attached_to(runner)
    rt.agent.close()
