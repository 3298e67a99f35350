"""Read each demo request back through the query service and check it.

Per request: the summary says complete, nothing dropped, every captured record loaded; the trace
id is the one in the traceparent header sent; prompt/generated token counts match what was served;
the hidden states read back equal the reference:

- HF backend: bit-exact (torch.equal) against the uninstrumented model's own `output_hidden_states`
  of the same batch — the capture path must not change a bit.
- SGLang backend: token ids exactly; hidden states within SGLANG_ATOL/RTOL of an eager Hugging Face
  forward of the same token sequence, for the reason in TOLERANCE_REASON.
"""

from __future__ import annotations

from dataclasses import dataclass, field

HIDDEN_HOOKS = ["resid_pre", "resid_final"]
SGLANG_ATOL = SGLANG_RTOL = 1e-4
TOLERANCE_REASON = (
    "SGLang computes the same function with other kernels (one fused QKV and one fused gate/up GEMM, "
    "torch SDPA over its paged KV cache, its own RMSNorm/RoPE), so float32 sums are accumulated in "
    "another order; tests/sglang/test_sglang_real_server.py states atol = rtol = 1e-4 (measured ~1e-6)")


@dataclass
class RequestCheck:
    name: str
    api: str
    trace_id: str
    request_id: str = ""
    prompt_tokens: int = 0
    generated_tokens: int = 0
    records_captured: int = 0
    records_dropped: int = 0
    records_loaded: int = 0
    state: str = "?"
    raw_bytes: int = 0
    stored_bytes: int = 0
    capture_to_load_ms: float = 0.0
    positions: str = ""
    bit_exact: bool = False
    max_abs_diff: float | None = None
    token_ids_exact: bool | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def reference_hidden_states(model, token_ids: list[int]) -> tuple:
    """Eager HF forward over `token_ids`: hidden_states as (layer 0 input, ..., final norm output),
    each [tokens, hidden]."""
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor([token_ids]), output_hidden_states=True)
    return tuple(h[0] for h in out.hidden_states)


def check_request(tt, r, backend: str, model=None, wait_s: float = 60.0, atol: float = SGLANG_ATOL,
                  rtol: float = SGLANG_RTOL) -> RequestCheck:
    """`tt`: a TensorTraceClient on grpc://; `r`: a served DemoRequest; `model`: the HF reference model
    (SGLang backend, compared within atol/rtol)."""
    import torch

    from tensortrace.query.errors import QueryError

    c = RequestCheck(r.name, r.api, r.trace_id)
    hooks = HIDDEN_HOOKS + (["token_ids"] if backend == "sglang" else [])
    try:
        got = tt.tensors(trace_id=r.trace_id, hooks=hooks, wait_s=wait_s)
        _, _, stats = tt.describe(trace_id=r.trace_id)
    except QueryError as e:
        c.problems.append(f"read-back failed: {e}")
        return c
    comp = got.completeness
    c.request_id, c.state = got.request_id, comp.state
    c.prompt_tokens, c.generated_tokens = comp.prompt_tokens, comp.generated_tokens
    c.records_captured, c.records_dropped, c.records_loaded = comp.records_captured, comp.records_dropped, comp.records_loaded
    c.raw_bytes = sum(s.raw_bytes for s in stats)
    c.stored_bytes = sum(s.stored_bytes for s in stats)
    c.capture_to_load_ms = max((s.capture_to_load_ms_max for s in stats), default=0.0)
    if got.trace_id != r.trace_id:
        c.problems.append(f"trace id {got.trace_id} != {r.trace_id} from the traceparent header")
    if got.request_id != r.request_id:
        c.problems.append(f"request id {got.request_id!r} != {r.request_id!r} the server reported")
    if comp.state != "complete" or comp.records_dropped or comp.records_loaded != comp.records_captured:
        c.problems.append(f"not complete: {comp.state}, captured {comp.records_captured}, loaded "
                          f"{comp.records_loaded}, dropped {comp.records_dropped} {comp.dropped_by_reason}")
    if (comp.prompt_tokens, comp.generated_tokens) != (len(r.prompt), len(r.output)):
        c.problems.append(f"summary tokens {comp.prompt_tokens}+{comp.generated_tokens} != served "
                          f"{len(r.prompt)}+{len(r.output)}")
    seq = r.sequence[:-1]  # every position the model computed: the last generated token is never fed back
    try:
        hidden = got.hidden_states()
    except QueryError as e:
        c.problems.append(f"hidden states: {e}")
        return c
    first = got["resid_pre", 0]
    c.positions = f"{first.start}-{first.end - 1}"
    if (first.start, first.end) != (r.cached_tokens, len(seq)):
        c.problems.append(f"positions {first.start}..{first.end} != {r.cached_tokens}..{len(seq)}")
        return c
    if backend == "sglang":
        want = reference_hidden_states(model, seq)
        ids = got["token_ids", -1].tensor.reshape(-1).to(torch.int64)
        c.token_ids_exact = torch.equal(ids, torch.tensor(seq[r.cached_tokens:]))
        if not c.token_ids_exact:
            c.problems.append("token ids read back differ from prompt + generated")
    else:
        want = r.reference
    if len(hidden) != len(want):
        c.problems.append(f"{len(hidden)} hidden states read back, the model has {len(want)}")
        return c
    exact, diff = True, 0.0
    for i, (g, w) in enumerate(zip(hidden, want)):
        g, w = g[0], w[r.cached_tokens:]
        if g.dtype != w.dtype or g.shape != w.shape:
            c.problems.append(f"hidden state {i}: {g.dtype} {tuple(g.shape)} != reference {w.dtype} {tuple(w.shape)}")
            return c
        exact = exact and torch.equal(g, w)
        diff = max(diff, float((g - w).abs().max()) if g.numel() else 0.0)
        if backend == "sglang" and not torch.allclose(g, w, atol=atol, rtol=rtol):
            c.problems.append(f"hidden state {i}: max |diff| {diff:.2e} over atol={atol:g}, rtol={rtol:g}")
    c.bit_exact, c.max_abs_diff = exact, diff
    if backend == "hf" and not exact:
        c.problems.append(f"hidden states not bit-identical to the model's own (max |diff| {diff:.2e})")
    return c
