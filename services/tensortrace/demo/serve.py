"""The demo's requests, served two ways, each with its own W3C traceparent:

- SGLang (the main job): concurrent HTTP requests to a real SGLang server with the TensorTrace
  plugin, three on SGLang's native `/generate`, one on the OpenAI-compatible `/v1/completions`;
- Hugging Face (the fallback): one batched `generate` (left padded) in this process with the
  capture agent (HFBackend), after an uninstrumented `generate` of the same batch whose hidden
  states are the bit-exact reference.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

# Prompt lengths and new tokens per request: different lengths, so the batch has ragged rows.
PROMPT_LENGTHS = (5, 11, 19, 32)
MAX_NEW_TOKENS = (6, 4, 8, 5)
HF_MAX_NEW_TOKENS = 6  # one generate call: the same for every row
FIRST_WORD_TOKEN, LAST_WORD_TOKEN = 4, 253  # the tiny tokenizer's words w0..w249 (ids 0-3 are special)


@dataclass
class DemoRequest:
    name: str
    api: str                      # how it was served
    traceparent: str              # the header sent
    trace_id: str                 # its trace id (32 hex)
    prompt: list[int]
    max_new_tokens: int
    output: list[int] = field(default_factory=list)  # generated token ids
    request_id: str = ""          # as the server (or backend) named it
    cached_tokens: int = 0        # radix-cache prefix hit (SGLang), 0 here by construction
    reference: tuple | None = None  # HF backend: the model's own hidden states, one [tokens, hidden] per layer + final

    @property
    def sequence(self) -> list[int]:
        return self.prompt + self.output


def new_traceparent() -> tuple[str, str]:
    trace_id, span_id = os.urandom(16).hex(), os.urandom(8).hex()
    return f"00-{trace_id}-{span_id}-01", trace_id


def make_requests(apis: list[str], max_new: list[int], seed: int = 7) -> list[DemoRequest]:
    """Random word-token prompts of PROMPT_LENGTHS. Each starts with a different token, so no prompt
    is a prefix of another and SGLang's radix cache has nothing to reuse: every position is computed."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for i, (n, api, new) in enumerate(zip(PROMPT_LENGTHS, apis, max_new)):
        prompt = torch.randint(FIRST_WORD_TOKEN, LAST_WORD_TOKEN + 1, (n,), generator=g).tolist()
        prompt[0] = FIRST_WORD_TOKEN + i
        tp, tid = new_traceparent()
        out.append(DemoRequest(f"req-{i + 1}", api, tp, tid, prompt, new))
    return out


# -- SGLang ------------------------------------------------------------------------------------

def serve_sglang(server) -> list[DemoRequest]:
    """Four concurrent requests to a running SGLangServer; returns them with outputs and ids."""
    reqs = make_requests(["/generate", "/generate", "/v1/completions", "/generate"], list(MAX_NEW_TOKENS))
    errors: list[str] = []

    def send(r: DemoRequest) -> None:
        try:
            headers = {"traceparent": r.traceparent}
            if r.api == "/generate":
                status, body = server.post("/generate", {
                    "input_ids": r.prompt,
                    "sampling_params": {"max_new_tokens": r.max_new_tokens, "temperature": 0, "ignore_eos": True}},
                    headers=headers)
                if status != 200:
                    raise RuntimeError(f"HTTP {status}: {body}")
                r.output, r.request_id = list(body["output_ids"]), body["meta_info"]["id"]
                r.cached_tokens = int(body["meta_info"].get("cached_tokens", 0))
            else:  # OpenAI-compatible: token ids back through return_token_ids
                status, body = server.post("/v1/completions", {
                    "model": "tiny-llama", "prompt": r.prompt, "max_tokens": r.max_new_tokens, "temperature": 0,
                    "ignore_eos": True, "return_token_ids": True}, headers=headers)
                if status != 200:
                    raise RuntimeError(f"HTTP {status}: {body}")
                r.output, r.request_id = list(body["choices"][0]["token_ids"]), body["id"]
        except Exception as e:  # noqa: BLE001 - reported per request
            errors.append(f"{r.name} {r.api}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=send, args=(r,), daemon=True) for r in reqs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    if errors:
        raise RuntimeError("; ".join(errors))
    return reqs


# -- Hugging Face ------------------------------------------------------------------------------

def left_padded(prompts: list[list[int]], pad: int):
    import torch

    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), P, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, P - len(p):] = torch.tensor(p)
        mask[b, P - len(p):] = 1
    return ids, mask


def load_hf_model(model_path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_path, dtype="float32", attn_implementation="eager").eval()


def serve_hf(model_path: str, ring_dir: str) -> tuple[list[DemoRequest], object]:
    """One batched generate with the capture agent; returns the requests (with the reference hidden
    states of an uninstrumented generate of the same batch) and the agent's final stats."""
    import torch

    from tensortrace.agent import AgentConfig, CaptureAgent, Selection
    from tensortrace.agent.backends.hf import HFBackend

    reqs = make_requests(["HFBackend.generate"] * len(PROMPT_LENGTHS), [HF_MAX_NEW_TOKENS] * len(PROMPT_LENGTHS))
    model = load_hf_model(model_path)
    pad = model.config.pad_token_id or 0
    ids, mask = left_padded([r.prompt for r in reqs], pad)
    B, P = ids.shape
    kw = dict(max_new_tokens=HF_MAX_NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=pad,
              return_dict_in_generate=True)
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=mask, output_hidden_states=True, **kw)
    agent = CaptureAgent(AgentConfig(ring_dir=ring_dir, model_id="tiny-llama", pod="demo-hf", ring_capacity=16 << 20),
                         Selection.preset("hidden-states"))
    try:
        backend = HFBackend(model, agent)
        try:
            out, contexts = backend.generate(ids, attention_mask=mask, request_ids=[r.name for r in reqs],
                                             traceparents=[r.traceparent for r in reqs], **kw)
        finally:
            backend.detach()
        stats = agent.stats()
    finally:
        agent.close()
    if not torch.equal(out.sequences, ref.sequences):
        raise RuntimeError("generate with capture produced other tokens than without")
    layers = model.config.num_hidden_layers
    for b, (r, ctx) in enumerate(zip(reqs, contexts)):
        n = len(r.prompt)
        r.request_id = ctx.request_id
        r.output = out.sequences[b, P:].tolist()
        if ctx.trace_id.hex() != r.trace_id:
            raise RuntimeError(f"{r.name}: the agent took trace id {ctx.trace_id.hex()} from {r.traceparent}")
        # prompt rows of the prefill step, then one row per decode step (the last token is never fed back)
        r.reference = tuple(torch.cat([ref.hidden_states[0][L][b, P - n:]]
                                      + [ref.hidden_states[k][L][b, :1] for k in range(1, HF_MAX_NEW_TOKENS)])
                            for L in range(layers + 1))
    return reqs, stats
