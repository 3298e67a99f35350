"""SGLangCapture (the per-scheduler-process runtime) driven like SGLang's hooks drive it, on the
SHAPE-ALIKE model of shape_alike.py (SGLang's module names and norm contract)."""

from __future__ import annotations

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
