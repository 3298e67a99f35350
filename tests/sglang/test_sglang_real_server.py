"""A real SGLang server with the TensorTrace plugin, on tiny random Llama and Qwen3 models (CPU).

Concurrent requests of different lengths, each with its own W3C `traceparent` header, plus a
radix-cache prefix hit, an opted-out request and a per-request preset through the OpenAI API
(`custom_params`, which the openai client sends via extra_body). Every captured row is read back
from the ring through the exporter's split rule and compared with an eager Hugging Face forward of
the same token sequence.

Tolerance, and why not bit-exact: SGLang computes the same function with different kernels —
one fused QKV GEMM and one fused gate/up GEMM instead of separate projections, attention by
torch SDPA per request over its paged KV cache, and its own RMSNorm/RoPE code — so float32
sums are accumulated in a different order. Measured differences are ~1e-6 relative; we allow
atol = rtol = 1e-4 (float32). Token ids (an integer tap) must be exactly equal, and each
generated token must be the argmax of the captured logits row of the step that produced it.
Bit-exactness of the capture itself (ring bytes == the tensor the module produced) is proven by
the agent's own tests; here we prove attribution and that the taps read the right tensors.
"""

from __future__ import annotations

import threading

import pytest

from sglang_harness import SGLangServer, read_rings, require_sglang

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ATOL = RTOL = 1e-4
PROMPT_LENGTHS = (3, 9, 17, 30)
MAX_NEW = (4, 6, 3, 5)


def _traceparent(i: int) -> tuple[str, str]:
    trace_id = f"{i + 1:02x}" * 16
    return f"00-{trace_id}-{'ab' * 7}{i + 1:02x}-01", trace_id


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def served(request, tmp_path_factory):
    require_sglang()
    from tensortrace.devstack.tiny_model import make_tiny_model

    arch = request.param
    base = tmp_path_factory.mktemp(f"sglang-{arch}")
    model_path = make_tiny_model(str(base / "model"), arch=arch, layers=2, hidden=64)
    server = SGLangServer(model_path, ring_dir=str(base / "rings"), log_path=str(base / "server.log"),
                          env_extra={"TENSORTRACE_SELECTION": "full"})
    request.addfinalizer(server.stop)
    server.start()
    print(f"\nSGLang ({arch}) healthy after {server.startup_s:.1f}s")
    return arch, model_path, server


def _hf_reference(model_path: str, token_ids: list[int]) -> dict:
    """Eager HF forward over `token_ids`: every catalog tensor, per position, keyed (hook, layer)."""
    import torch

    model = _hf_model(model_path)
    got: dict = {}
    handles = []

    def put(key, t):
        got[key] = t.detach()[0].clone()

    for L, layer in enumerate(model.model.layers):
        a = layer.self_attn
        handles += [
            layer.input_layernorm.register_forward_pre_hook(lambda m, args, L=L: put(("resid_pre", L), args[0])),
            layer.post_attention_layernorm.register_forward_pre_hook(
                lambda m, args, L=L: put(("resid_mid", L), args[0])),
            layer.post_attention_layernorm.register_forward_hook(lambda m, args, o, L=L: put(("mlp_in", L), o)),
            a.q_proj.register_forward_hook(lambda m, args, o, L=L: put(("attn_q", L), o)),
            a.k_proj.register_forward_hook(lambda m, args, o, L=L: put(("attn_k", L), o)),
            a.v_proj.register_forward_hook(lambda m, args, o, L=L: put(("attn_v", L), o)),
            a.register_forward_hook(lambda m, args, o, L=L: put(("attn_out", L), o[0])),
            layer.mlp.down_proj.register_forward_pre_hook(lambda m, args, L=L: put(("mlp_act", L), args[0])),
            layer.mlp.register_forward_hook(lambda m, args, o, L=L: put(("mlp_out", L), o)),
        ]
    handles.append(model.model.embed_tokens.register_forward_hook(lambda m, a, o: put(("embeddings", -1), o)))
    handles.append(model.model.norm.register_forward_hook(lambda m, a, o: put(("resid_final", -1), o)))
    try:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([token_ids]))
    finally:
        for h in handles:
            h.remove()
    got[("logits", -1)] = out.logits[0]
    got[("token_ids", -1)] = torch.tensor(token_ids).view(-1, 1)
    return got


_MODELS: dict = {}


def _hf_model(path):
    import transformers

    if path not in _MODELS:
        _MODELS[path] = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype="float32", attn_implementation="eager").eval()
    return _MODELS[path]


def _generate(server, ids, max_new, headers, custom=None):
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": max_new, "temperature": 0,
                                                   "ignore_eos": True}}
    if custom is not None:
        body["sampling_params"]["custom_params"] = custom
    status, out = server.post("/generate", body, headers=headers)
    assert status == 200, out
    return out


def _wait_for_summaries(ring_dir, rids, timeout_s=60.0):
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        got = read_rings(ring_dir)
        if set(rids) <= set(got.summaries) or time.monotonic() > deadline:
            return got
        time.sleep(0.5)


def test_every_captured_row_matches_hf_and_its_request(served):
    import torch

    arch, model_path, server = served
    vocab_lo, vocab_hi = 4, 250
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(vocab_lo, vocab_hi, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]

    # 1. concurrent requests of different lengths, each with its own traceparent
    results: dict[int, dict] = {}
    errors = []

    def send(i):
        try:
            tp, _ = _traceparent(i)
            results[i] = _generate(server, prompts[i], MAX_NEW[i], {"traceparent": tp})
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    # 2. a radix-cache prefix hit: the longest prompt again plus 5 new tokens (its prefix is cached)
    hit_prompt = prompts[3] + torch.randint(vocab_lo, vocab_hi, (5,), generator=g).tolist()
    tp_hit, trace_hit = _traceparent(10)
    hit = _generate(server, hit_prompt, 3, {"traceparent": tp_hit})
    assert hit["meta_info"]["cached_tokens"] > 0, "expected a radix-cache prefix hit"
    # 3. OpenAI API: an opted-out request, and one asking for logits only
    st, off = server.post("/v1/completions", {"model": "m", "prompt": prompts[1], "max_tokens": 2,
                                              "temperature": 0,
                                              "custom_params": {"tensortrace": {"capture": False}}})
    assert st == 200, off
    st, lg = server.post("/v1/completions", {"model": "m", "prompt": prompts[2], "max_tokens": 2,
                                             "temperature": 0,
                                             "custom_params": {"tensortrace": {"preset": "logits"}}},
                         headers={"traceparent": _traceparent(11)[0]})
    assert st == 200, lg

    rid_of = {i: results[i]["meta_info"]["id"] for i in results}
    rids = list(rid_of.values()) + [hit["meta_info"]["id"], off["id"], lg["id"]]
    ring = _wait_for_summaries(server.ring_dir, rids)
    by_req = ring.by_request()

    # requests with their full token sequences: prompt + generated
    cases = [(rid_of[i], prompts[i], results[i]["output_ids"], _traceparent(i)[1]) for i in results]
    cases.append((hit["meta_info"]["id"], hit_prompt, hit["output_ids"], trace_hit))
    cached = {rid_of[i]: results[i]["meta_info"]["cached_tokens"] for i in results}
    cached[hit["meta_info"]["id"]] = hit["meta_info"]["cached_tokens"]
    checked_rows = max_abs = exact = 0
    for rid, prompt, output, trace_hex in cases:
        summary = ring.summaries[rid]
        recs = by_req[rid]
        assert summary.complete and summary.records_dropped == 0, summary
        assert summary.records_captured == len(recs), (rid, summary.records_captured, len(recs))
        assert summary.prompt_tokens == len(prompt) and summary.generated_tokens == len(output)
        assert summary.trace_id.hex() == trace_hex
        assert all(r.trace_id.hex() == trace_hex for r in recs)
        seq = prompt + output
        ref = _hf_reference(model_path, seq[:-1])  # the last generated token is never fed back
        covered: dict = {}
        for r in recs:
            from tensortrace.wire.codec import record_to_tensor

            got = record_to_tensor(r)
            positions = list(range(r.token_start, r.token_end))
            assert r.phase == (1 if r.token_start < len(prompt) else 2), (r.hook, r.token_start, r.phase)
            want = ref[(r.hook, r.layer)][positions].reshape(got.shape)
            if r.hook == "token_ids":
                assert torch.equal(got.to(torch.int64), want.to(torch.int64)), (rid, positions)
            else:
                torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL,
                                           msg=lambda m: f"{arch} {rid} {r.hook}@{r.layer} {positions}: {m}")
                max_abs = max(max_abs, float((got - want).abs().max()))
                exact += int(torch.equal(got, want))
            if r.hook == "logits":
                # the token sampled after position p is argmax of p's logits (greedy)
                p = positions[-1]
                if p + 1 < len(seq) and p + 1 >= len(prompt):
                    assert int(got[-1].argmax()) == seq[p + 1]
            for p in positions:
                covered.setdefault((r.hook, r.layer), set()).add(p)
            checked_rows += got.shape[0]
        # every position SGLang computed (past the radix-cache prefix) is captured, per token hook
        first_computed = cached[rid]
        expect_positions = set(range(first_computed, len(seq) - 1))
        for key, pos in covered.items():
            if key[0] != "logits":
                assert pos == expect_positions, (rid, key, sorted(expect_positions - pos))
        n_token_hooks = len([k for k in covered if k[0] != "logits"])
        assert n_token_hooks == 2 * 9 + 3, sorted(covered)  # 9 per-layer hooks x 2 layers + 3 global

    # the prefix hit's first step starts past the cached prefix
    hit_steps = [rr for st in ring.steps for rr in st.requests if rr.request_id == hit["meta_info"]["id"]]
    assert hit_steps[0].position_start == hit["meta_info"]["cached_tokens"] > 0
    # opted out: a summary saying not sampled, and no tensors
    assert off["id"] in ring.summaries and not ring.summaries[off["id"]].sampled
    assert off["id"] not in by_req
    # per-request preset via the OpenAI API: logits only
    assert {r.hook for r in by_req[lg["id"]]} == {"logits"}
    assert ring.summaries[lg["id"]].trace_id.hex() == _traceparent(11)[1]
    assert checked_rows > 0
    print(f"{arch}: checked {checked_rows} captured rows in {sum(len(by_req[c[0]]) for c in cases)} records "
          f"across {len(cases)} requests; {exact} float records bit-identical to HF; max |diff| {max_abs:.2e}")


def test_the_scheduler_names_its_tap_path_and_where_its_taps_read_tensors(served):
    """The plugin's start-up line says how the agent captures. With this venv's tensor-geometry
    reader built (make sglang-env), the rows the test above checks bit-exact against HF were read
    from the TensorImpl by native taps."""
    from tensortrace.agent import geometry

    _, _, server = served
    with open(server.log_path) as f:
        lines = [ln for ln in f if "tensortrace: capturing" in ln]
    assert lines, f"no start-up line of the plugin in {server.log_path}"
    assert "native tap path" in lines[0], lines[0]
    if geometry.load()[0] is not None:
        assert "tensor geometry from the TensorImpl" in lines[0], lines[0]


def test_bad_capture_options_are_rejected_with_400_and_the_server_keeps_serving(served):
    _, _, server = served
    st, out = server.post("/generate", {"input_ids": [5, 6, 7], "sampling_params": {
        "max_new_tokens": 1, "custom_params": {"tensortrace": {"preset": "no-such-preset"}}}})
    assert st == 400, out
    assert "no-such-preset" in str(out)
    st, out = server.post("/generate", {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 1}})
    assert st == 200, out
