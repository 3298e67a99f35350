"""CUDA path: device staging ring + async D2H into the pinned ring file, without a single
synchronising call on the inference thread (torch.cuda.set_sync_debug_mode("error"))."""

from __future__ import annotations

import os

import pytest
import torch

from tensortrace.agent import AgentConfig, CaptureAgent, Phase, RequestRows, Selection, StepLayout
from tensortrace.agent.backends.hf import HFBackend
from tensortrace.devstack.ringread import drain
from tensortrace.ring.format import RingReader
from tensortrace.testing.tiny_models import left_padded, make

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(params=["tmpfs", "disk"])
def any_ring_dir(request, ring_dir):
    """A ring directory on tmpfs (the ring file is pinned in place: zero-copy D2H) and one on a disk
    filesystem (cudaHostRegister refuses it: copies go through the pinned bounce buffer)."""
    if request.param == "disk":
        yield ring_dir, False
        return
    import shutil
    import tempfile

    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm on this machine")
    d = tempfile.mkdtemp(prefix="tt-rings-", dir="/dev/shm")
    yield d, True
    shutil.rmtree(d, ignore_errors=True)


def test_capture_path_makes_no_synchronising_call_and_lands_bit_exact(any_ring_dir):
    ring_dir, zero_copy = any_ring_dir
    agent = CaptureAgent(AgentConfig(ring_dir=ring_dir, model_id="gpu", ring_capacity=64 << 20,
                                     device_staging_bytes=8 << 20),
                         Selection(hooks=frozenset({"resid_pre", "logits"})))
    for r in ("a", "b", "c"):
        agent.begin_request(r)
    layout = StepLayout((RequestRows("a", 1, 5, 0, Phase.PREFILL), RequestRows("b", 6, 3, 0, Phase.PREFILL),
                         RequestRows("c", 10, 2, 4, Phase.PREFILL)), total_rows=12)
    x = torch.randn(12, 256, device="cuda", dtype=torch.bfloat16)
    logits = torch.randn(12, 1000, device="cuda")
    expect = [(x.clone(), logits.clone())]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(20):
            agent.begin_step(layout)
            for L in range(4):
                agent.capture("resid_pre", L, x)
            agent.capture("logits", -1, logits)
            agent.end_step()
            # the model overwrites its activations right after the tap: the capture must not see it
            x.add_(1)
            logits.mul_(2)
            expect.append((x.clone(), logits.clone()))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert agent._staging.zero_copy is zero_copy
    for r in ("a", "b", "c"):
        agent.end_request(r)
    assert agent.flush(timeout_s=30)
    assert not agent.stats().disabled_taps and not agent.stats().agent_disabled
    got = drain(RingReader.open(agent.ring_path))
    for rr in layout.requests:
        rows = slice(rr.row_start, rr.row_start + rr.row_count)
        recs = sorted((r for r in got.records if r.request_id == rr.request_id and r.hook == "resid_pre"
                       and r.layer == 2), key=lambda r: r.step)
        assert len(recs) == 20
        for k, rec in enumerate(recs):
            t = torch.frombuffer(bytearray(rec.payload), dtype=torch.bfloat16).view(rr.row_count, 256)
            assert torch.equal(t, expect[k][0][rows].cpu())
    s = got.summaries["a"]
    assert s.complete and s.records_captured == 20 * 5
    assert agent.stats().written == agent.stats().produced == 3 * 20 * 5
    agent.close()


def test_hf_generate_on_cuda_matches_the_uninstrumented_model(ring_dir):
    model = make("llama").to("cuda")
    ids, mask = left_padded([[5, 6, 7], [11, 12, 13, 14, 15]])
    ids, mask = ids.cuda(), mask.cuda()
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None,
               return_dict_in_generate=True, output_hidden_states=True)
    ref = model.generate(input_ids=ids, attention_mask=mask, **gen)
    agent = CaptureAgent(AgentConfig(ring_dir=ring_dir, model_id="gpu", ring_capacity=16 << 20,
                                     device_staging_bytes=4 << 20), Selection.preset("hidden-states"))
    backend = HFBackend(model, agent)
    out, _ = backend.generate(ids, attention_mask=mask, request_ids=["a", "b"], **gen)
    assert torch.equal(out.sequences, ref.sequences)
    agent.flush(timeout_s=30)
    got = drain(RingReader.open(agent.ring_path))
    t, pos = got.tensor("b", "resid_pre", 1)
    want = torch.cat([ref.hidden_states[0][1][1, :]] + [ref.hidden_states[k][1][1] for k in range(1, 4)]).cpu()
    assert pos == list(range(8)) and torch.equal(t, want)
    t, _ = got.tensor("a", "resid_pre", 0)
    want = torch.cat([ref.hidden_states[0][0][0, 2:]] + [ref.hidden_states[k][0][0] for k in range(1, 4)]).cpu()
    assert torch.equal(t, want)
    assert agent.stats().dropped == 0
    agent.close()


def test_full_device_staging_drops_and_counts_instead_of_waiting(ring_dir):
    agent = CaptureAgent(AgentConfig(ring_dir=ring_dir, model_id="gpu", ring_capacity=64 << 20,
                                     device_staging_bytes=64 << 10), Selection(hooks=frozenset({"resid_pre"})))
    agent.begin_request("a")
    layout = StepLayout((RequestRows("a", 0, 64, 0, Phase.PREFILL),), total_rows=64)
    x = torch.randn(64, 512, device="cuda")   # 128 KiB per slab > 64 KiB of staging
    torch.cuda.set_sync_debug_mode("error")
    try:
        agent.begin_step(layout)
        agent.capture("resid_pre", 0, x)
        agent.end_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    s = agent.end_request("a")
    assert s.dropped_by_reason == {"staging_full": 1}
    agent.close()


def test_hf_decode_with_an_early_eos_makes_no_synchronising_call_of_its_own(ring_dir):
    """generate itself syncs every step (its stop check reads a device flag); the backend must add
    none: every sync warning raised while generating comes from transformers or torch, not from
    tensortrace. An early EOS exercises the decode layout's finished-sequence path."""
    import warnings

    model = make("llama").to("cuda")
    ids, mask = left_padded([[5, 6, 7], [11, 12, 13, 14, 15]])
    ids, mask = ids.cuda(), mask.cuda()
    plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                           pad_token_id=0, eos_token_id=None)
    eos = int(plain[0, ids.shape[1] + 1])   # row 0 stops at its 2nd generated token
    agent = CaptureAgent(AgentConfig(ring_dir=ring_dir, model_id="gpu", ring_capacity=16 << 20,
                                     device_staging_bytes=4 << 20), Selection.preset("hidden-states"))
    backend = HFBackend(model, agent)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out, _ = backend.generate(ids, attention_mask=mask, request_ids=["a", "b"], max_new_tokens=6,
                                      do_sample=False, pad_token_id=0, eos_token_id=eos)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ours = [w for w in caught if "synchroniz" in str(w.message) and "tensortrace" in (w.filename or "")]
    assert not ours, [(w.filename, w.lineno) for w in ours]
    agent.flush(timeout_s=30)
    got = drain(RingReader.open(agent.ring_path))
    _, pos = got.tensor("a", "resid_pre", 0)
    # prompt rows 0-2, then the decode forward that fed its first generated token (position 3);
    # the forward that would feed its EOS (position 4) exports nothing
    assert pos == list(range(4))
    agent.close()
