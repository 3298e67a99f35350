"""Every captured tensor, read back from the ring, is bit-identical to the model's own tensor, for
each request of a left-padded batch, across prefill and decode, and generation is unchanged."""

from __future__ import annotations

import pytest
import torch

from tensortrace.agent import HOOKS, AgentConfig, CaptureAgent, Selection
from tensortrace.agent.backends.hf import HFBackend, arch_for
from tensortrace.agent.backends.hf.archs import find_module
from tensortrace.devstack.ringread import drain
from tensortrace.ring.format import RingReader
from tensortrace.testing.tiny_models import FAMILIES, left_padded, make

pytestmark = pytest.mark.unit

PROMPTS = [[5, 6, 7], [11, 12, 13, 14, 15, 16], [21], [31, 32, 33, 34]]
NEW_TOKENS = 4


class Reference:
    """Independent oracle: plain forward hooks that clone every catalog tensor per forward, in the
    model's own [B, S, ...] (or router [B*S, ...]) shape."""

    def __init__(self, model):
        self.steps: list[dict] = []
        a = arch_for(model)
        self.handles = []
        top = model

        def post(mod, fn):
            self.handles.append(mod.register_forward_hook(fn, with_kwargs=True))

        def pre(mod, fn):
            self.handles.append(mod.register_forward_pre_hook(fn, with_kwargs=True))

        def put(key, t):
            self.steps[-1][key] = t.detach().clone()

        def inp(args, kw):
            return args[0] if args else next(iter(kw.values()))

        self.handles.append(top.register_forward_pre_hook(lambda m, a_: self.steps.append({})))
        embed = find_module(model, a.embed)
        pre(embed, lambda m, args, kw: put(("token_ids", -1), inp(args, kw)))
        post(embed, lambda m, args, kw, o: put(("embeddings", -1), o))
        post(find_module(model, a.final_norm), lambda m, args, kw, o: put(("resid_final", -1), o))
        post(find_module(model, a.lm_head), lambda m, args, kw, o: put(("logits", -1), o))
        for L, layer in enumerate(find_module(model, a.layers)):
            pre(layer, lambda m, args, kw, L=L: put(("resid_pre", L), inp(args, kw)))
            pre(find_module(layer, a.post_attn_norm), lambda m, args, kw, L=L: put(("resid_mid", L), inp(args, kw)))
            post(find_module(layer, a.attn), lambda m, args, kw, o, L=L: put(("attn_out", L), o[0]))
            if a.qkv_fused:
                def qkv(m, args, kw, o, L=L, split=find_module(layer, a.attn).split_size):
                    q, k, v = o.split(split, dim=2)
                    put(("attn_q", L), q), put(("attn_k", L), k), put(("attn_v", L), v)
                post(find_module(layer, a.qkv_fused), qkv)
            else:
                for h, p in (("attn_q", a.q_proj), ("attn_k", a.k_proj), ("attn_v", a.v_proj)):
                    post(find_module(layer, p), lambda m, args, kw, o, L=L, h=h: put((h, L), o))
            mlp = find_module(layer, a.mlp)
            pre(mlp, lambda m, args, kw, L=L: put(("mlp_in", L), inp(args, kw)))
            post(mlp, lambda m, args, kw, o, L=L: put(("mlp_out", L), o))
            down = find_module(layer, a.down_proj)
            if down is not None:
                pre(down, lambda m, args, kw, L=L: put(("mlp_act", L), inp(args, kw)))
            router = find_module(layer, a.router)
            if router is not None:
                def rt(m, args, kw, o, L=L):
                    put(("moe_router_logits", L), o[0]), put(("moe_topk_weights", L), o[1]), put(("moe_topk_ids", L), o[2])
                post(router, rt)

    def remove(self):
        for h in self.handles:
            h.remove()


def expected_rows(ref_step: dict, key, b: int, B: int, S: int, rows_of_b: slice):
    """Request b's rows of one reference tensor in one forward."""
    t = ref_step[key]
    if key[0].startswith("moe_"):
        t = t.reshape(B, S, *t.shape[1:])
    if t.shape[1] != S:  # logits computed for the last token only
        return t[b, -1:]
    return t[b, rows_of_b]


def run_reference(model, ids, mask, eos):
    ref = Reference(model)
    try:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                             eos_token_id=eos, pad_token_id=0, return_dict_in_generate=True,
                             output_hidden_states=True, output_logits=True)
    finally:
        ref.remove()
    return out, ref.steps


def choose_eos(model, ids, mask):
    """A token that request 0 generates at its 2nd decode step, so it finishes early."""
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return int(out[0, ids.shape[1] + 1])


@pytest.mark.parametrize("family", FAMILIES)
def test_full_capture_is_bit_identical_per_request(family, ring_dir):
    model = make(family)
    ids, mask = left_padded(PROMPTS)
    B, P = ids.shape
    eos = choose_eos(model, ids, mask)
    ref_out, ref_steps = run_reference(model, ids, mask, eos)

    agent = CaptureAgent(AgentConfig(ring_dir=ring_dir, model_id=family, ring_capacity=16 << 20),
                         Selection.preset("full"))
    backend = HFBackend(model, agent)
    rids = [f"req-{b}" for b in range(B)]
    out, ctxs = backend.generate(ids, attention_mask=mask, request_ids=rids, max_new_tokens=NEW_TOKENS,
                                 do_sample=False, eos_token_id=eos, pad_token_id=0, return_dict_in_generate=True)
    backend.detach()
    assert torch.equal(out.sequences, ref_out.sequences), "capture changed the generated tokens"
    reader = RingReader.open(agent.ring_path)
    got = drain(reader)

    unplaced = {h for h, _ in agent.unplaced}
    n_layers = model.config.num_hidden_layers
    keys = [(h, L) for h, spec in HOOKS.items() for L in (range(n_layers) if spec.per_layer else [-1])
            if (h, L) in ref_steps[0]]
    assert keys, "nothing to compare"
    for h in HOOKS:  # every hook is either compared or reported as unplaced, never silently absent
        assert any(k[0] == h for k in keys) or h in unplaced, h
    gen = ref_out.sequences[:, P:]
    for b, rid in enumerate(rids):
        n_prompt = len(PROMPTS[b])
        stop = next((j for j, t in enumerate(gen[b].tolist()) if t == eos), None)
        # forwards in which request b has rows: prefill + decode steps whose input is not past its EOS
        active_decodes = (NEW_TOKENS - 1) if stop is None else min(stop, NEW_TOKENS - 1)
        for key in keys:
            expect, positions = [], []
            for k in range(1 + active_decodes):
                S = ref_steps[k][("token_ids", -1)].shape[1]
                rows = slice(S - n_prompt, S) if k == 0 else slice(0, 1)
                e = expected_rows(ref_steps[k], key, b, B, S, rows)
                expect.append(e)
                first = 0 if k == 0 else n_prompt + k - 1
                if e.shape[0] != (rows.stop - rows.start):   # last-token-only tensor
                    first = (n_prompt - 1) if k == 0 else first
                positions += list(range(first, first + e.shape[0]))
            t, pos = got.tensor(rid, *key)
            want = torch.cat(expect)
            assert pos == positions, (rid, key)
            assert t.dtype == want.dtype and t.shape == want.shape, (rid, key, t.shape, want.shape)
            assert torch.equal(t, want), f"{family} {rid} {key}: captured rows differ from the model's"
        # the model's own output_hidden_states / output_logits agree too
        hs_rows = [ref_out.hidden_states[0][L][b, P - n_prompt:] for L in range(n_layers + 1)]
        for L in range(n_layers):
            t, _ = got.tensor(rid, "resid_pre", L)
            assert torch.equal(t[:n_prompt], hs_rows[L])
        t, _ = got.tensor(rid, "resid_final")
        assert torch.equal(t[:n_prompt], hs_rows[n_layers])
        t, _ = got.tensor(rid, "logits")
        assert torch.equal(t, torch.stack([ref_out.logits[k][b] for k in range(1 + active_decodes)]))

        s = got.summaries[rid]
        n_records = sum(1 for r in got.records if r.request_id == rid)
        assert s.records_captured == n_records and s.records_dropped == 0 and s.complete
        assert s.prompt_tokens == n_prompt
        assert s.trace_id == ctxs[b].trace_id and len(s.trace_id) == 16
        assert s.finish_reason == ("length" if stop is None else "stop")
        assert s.generated_tokens == (NEW_TOKENS if stop is None else stop + 1)
    assert got.summaries["req-0"].finish_reason == "stop"   # request 0 ended early at EOS
    st = agent.stats()
    assert st.produced == st.written == len(got.records) and st.dropped == 0
    agent.close()
    reader.close()
