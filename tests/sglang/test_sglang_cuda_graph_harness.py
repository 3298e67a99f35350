"""The plugin's CUDA-graph modes on an SGLang-SHAPED harness (GPU only). Real SGLang cannot be
installed on the GPU machine (no network), so this reproduces what SGLang does around the plugin:
taps placed after load_model, THEN decode graphs captured for several batch sizes (largest first,
shared pool, capture_error_mode="thread_local" as SGLang's runner does), replayed with the batch
padded to the next captured size, and ModelRunner.forward choosing replay when
decode_cuda_graph_runner.can_run_graph(forward_batch) says so.

static: selected taps record into static buffers inside the graph; replayed steps are captured.
eager:  captured steps do not replay.   skip: they replay and the requests say they are incomplete.
"""

from __future__ import annotations

import shutil
import tempfile
from types import SimpleNamespace

import pytest
import torch

from forward_batches import forward_batch
from sglang_harness import read_rings
from shape_alike import finish, make_runner, model_forward, req
from tensortrace.agent.backends.sglang.config import SGLangBackendConfig
from tensortrace.agent.backends.sglang.plugin import SGLangCapture
from tensortrace.wire.codec import record_to_tensor

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)


def decode_logits(model, ids):
    h, residual = model.model.embed_tokens(ids), None
    for layer in model.model.layers:
        h, residual = layer(h, residual)
    normed, _ = model.model.norm(h, residual)
    return model.lm_head(normed)


class ShapeAlikeDecodeGraphRunner:
    """SHAPE-ALIKE of sglang DecodeCudaGraphRunner: static inputs, one graph per captured batch size."""

    def __init__(self, model, capture_bs=(1, 2, 4)):
        self.model, self.capture_bs = model, sorted(capture_bs)
        self.max_bs = max(self.capture_bs)
        self.static_ids = torch.zeros(self.max_bs, dtype=torch.int64, device="cuda")
        self.graphs, self.outputs, self.replays = {}, {}, 0
        pool = None
        with torch.no_grad():
            for bs in reversed(self.capture_bs):
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    for _ in range(2):
                        decode_logits(model, self.static_ids[:bs])
                torch.cuda.current_stream().wait_stream(s)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool, capture_error_mode="thread_local"):
                    self.outputs[bs] = decode_logits(model, self.static_ids[:bs])
                pool = g.pool()
                self.graphs[bs] = g

    def can_run_graph(self, fb):
        return fb.batch_size <= self.max_bs

    def execute(self, fb):
        raw = fb.batch_size
        bs = min(b for b in self.capture_bs if b >= raw)
        self.static_ids[:raw].copy_(fb.input_ids[:raw])
        self.static_ids[raw:bs].fill_(0)   # padding rows: junk the plugin must never export
        self.graphs[bs].replay()
        self.replays += 1
        return self.outputs[bs][:raw]


def model_runner_forward(runner, fb):  # SHAPE-ALIKE of ModelRunner._forward_raw's graph choice
    gr = runner.decode_cuda_graph_runner
    if fb.forward_mode.name == "DECODE" and gr is not None and gr.can_run_graph(fb):
        return SimpleNamespace(logits_output=SimpleNamespace(next_token_logits=gr.execute(fb)), can_run_graph=True)
    return model_forward(runner, fb)


def serve(mode, selection="hidden-states", options=None, decode_steps=3):
    ring_dir = tempfile.mkdtemp(dir="/dev/shm")
    try:
        runner = make_runner("cuda")
        rt = SGLangCapture(SGLangBackendConfig(ring_dir=ring_dir, ring_capacity=1 << 22, selection=selection,
                                               cuda_graph=mode))
        rt.attach(runner)                                   # after load_model: taps placed
        runner.decode_cuda_graph_runner = ShapeAlikeDecodeGraphRunner(runner.model)  # then graphs captured
        prompts = {"a": 3, "b": 2, "c": 4}
        reqs = [req(r, n, {"tensortrace": options} if options else None) for r, n in prompts.items()]
        g = torch.Generator().manual_seed(1)
        pre = forward_batch("EXTEND", list(prompts), seq_lens=list(prompts.values()),
                            extend_lens=list(prompts.values()), prefix_lens=[0, 0, 0])
        pre.input_ids = torch.randint(1, 16, (9,), generator=g).cuda()
        rt.observe_batch(pre, SimpleNamespace(reqs=reqs))
        ref = {}
        with torch.no_grad():
            rt.forward(model_runner_forward, runner, pre)
            for step in range(decode_steps):
                seq = [n + step + 1 for n in prompts.values()]
                fb = forward_batch("DECODE", list(prompts), seq_lens=seq)
                fb.input_ids = torch.randint(1, 16, (3,), generator=g).cuda()
                out = rt.forward(model_runner_forward, runner, fb)
                emb = runner.model.model.embed_tokens(fb.input_ids)
                for i, rid in enumerate(prompts):
                    ref[(rid, seq[i] - 1)] = (emb[i].cpu(), out.logits_output.next_token_logits[i].cpu(),
                                              decode_logits(runner.model, fb.input_ids)[i].cpu())
        for r in reqs:
            finish(r, decode_steps + 1)
        rt.finish_requests(reqs)
        rt.agent.close()
        torch.cuda.synchronize()
        return rt, runner.decode_cuda_graph_runner.replays, read_rings(ring_dir), ref
    finally:
        shutil.rmtree(ring_dir, ignore_errors=True)


def decode_records(ring, hook, layer=-1):
    return {(r.request_id, r.token_start): record_to_tensor(r) for r in ring.records
            if r.hook == hook and r.layer == layer and r.phase == 2}


def test_static_mode_captures_replayed_decode_steps_from_static_buffers():
    rt, replays, ring, ref = serve("static")
    assert replays == 3, "decode steps should have replayed the graph"
    assert rt.taps.static_keys == {k for k in rt.taps.taps if k[0] in ("resid_pre", "resid_final")}
    resid0 = decode_records(ring, "resid_pre", 0)
    logits = decode_records(ring, "logits")
    assert set(resid0) == set(ref) == set(logits)   # every request, every decode position, no padding row
    for key, (emb, graph_logits, _) in ref.items():
        assert torch.equal(resid0[key][0], emb), key          # bit-exact: the embeddings of that row
        assert torch.equal(logits[key][0], graph_logits), key
    assert all(s.complete for s in ring.summaries.values())


def test_static_mode_runs_a_step_eagerly_when_a_request_wants_a_tap_outside_the_graph():
    rt, replays, ring, ref = serve("static", options={"hooks": ["mlp_out"], "layers": "0"})
    assert replays == 0
    # registered: the module of the selected tap, and those of the graphs' static set (kept for a recapture)
    registered = {site.module_name for site in rt.taps.sites.values() if site.handle is not None}
    static = {rt.taps.taps[k].module_name for k in rt.taps.static_keys}
    assert static and registered == static | {"model.layers.0.mlp"}
    assert set(decode_records(ring, "mlp_out", 0)) == set(ref)
    assert all(s.complete for s in ring.summaries.values())


def test_eager_mode_never_replays_a_captured_step():
    rt, replays, ring, ref = serve("eager")
    assert replays == 0
    assert set(decode_records(ring, "resid_pre", 1)) == set(ref)


def test_skip_mode_replays_and_reports_the_requests_incomplete():
    rt, replays, ring, ref = serve("skip")
    assert replays == 3
    assert not decode_records(ring, "resid_pre", 0) and decode_records(ring, "logits")
    assert all(not s.complete and "replayed under a CUDA graph" in s.incomplete_reason
               for s in ring.summaries.values())
