"""A SHAPE-ALIKE of an SGLang model and ModelRunner for the plugin-runtime tests (CPU and the GPU
CUDA-graph harness): module names and call contracts are SGLang's (model.layers.N.input_layernorm
returning (normed, residual), self_attn.qkv_proj with q_size/kv_size, mlp.down_proj, model.norm;
`model_forward` returns a ModelRunnerOutput-like object). The real SGLang model classes are exercised
by test_sglang_real_server.py."""

from __future__ import annotations

from types import SimpleNamespace

import torch

H, V = 8, 16


class Norm(torch.nn.Module):  # SHAPE-ALIKE of SGLang's RMSNorm call contract
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.rand(H) + 0.5)

    def forward(self, x, residual=None):
        if residual is None:
            return x * self.w
        r = x + residual
        return r * self.w, r


class Attn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q_size, self.kv_size = H, H // 2
        self.qkv_proj = torch.nn.Linear(H, H * 2)
        self.o = torch.nn.Linear(H, H)

    def forward(self, x):
        return self.o(self.qkv_proj(x)[:, :H])


class MLP(torch.nn.Module):
    def __init__(self, broken=False):
        super().__init__()
        self.up, self.down_proj, self.broken = torch.nn.Linear(H, 2 * H), torch.nn.Linear(2 * H, H), broken

    def forward(self, x):
        a = torch.relu(self.up(x))
        return a[:, :H] if self.broken else self.down_proj(a)  # broken: down_proj never runs


class Layer(torch.nn.Module):
    def __init__(self, broken=False):
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = Norm(), Norm()
        self.self_attn, self.mlp = Attn(), MLP(broken)

    def forward(self, h, residual):
        x, residual = (self.input_layernorm(h), h) if residual is None else self.input_layernorm(h, residual)
        h = self.self_attn(x)
        x, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(x), residual


class ShapeAlikeModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.embed_tokens = torch.nn.Embedding(V, H)
        self.model.layers = torch.nn.ModuleList([Layer(), Layer(broken=True)])
        self.model.norm = Norm()
        self.lm_head = torch.nn.Linear(H, V)


def model_forward(runner, fb):  # stands in for ModelRunner.forward
    m = runner.model
    h, residual = m.model.embed_tokens(fb.input_ids), None
    for layer in m.model.layers:
        h, residual = layer(h, residual)
    normed, _ = m.model.norm(h, residual)
    ends = torch.tensor(fb.extend_seq_lens_cpu).cumsum(0) - 1 if fb.extend_seq_lens_cpu else torch.arange(fb.batch_size)
    return SimpleNamespace(logits_output=SimpleNamespace(next_token_logits=m.lm_head(normed[ends])), can_run_graph=False)




def req(rid, prompt, custom=None):
    """A SHAPE-ALIKE of sglang's schedule_batch.Req (the fields the plugin reads)."""
    r = SimpleNamespace(rid=rid, origin_input_ids=list(range(prompt)), output_ids=[], finished_reason=None,
                        sampling_params=SimpleNamespace(custom_params=custom))
    r.finished = lambda: r.finished_reason is not None
    return r


def finish(r, n):
    r.output_ids = list(range(n))
    r.finished_reason = SimpleNamespace(to_json=lambda: {"type": "length"})


def make_runner(device="cpu", graph_runner=None):
    torch.manual_seed(0)
    return SimpleNamespace(model=ShapeAlikeModel().to(device).eval(), is_draft_worker=False,
                           decode_cuda_graph_runner=graph_runner,
                           model_config=SimpleNamespace(model_path="/m/shape-alike", hidden_size=H,
                                                        hf_config=SimpleNamespace(architectures=["LlamaForCausalLM"])))
