"""Where each catalog hook lives in unmodified transformers model classes (transformers 5.x).

One ArchMap per family; paths are attribute paths from the *ForCausalLM model (global) or from a
decoder layer (per layer). The tap kinds say how the tensor is read:
    input   forward pre-hook, first positional arg (or `hidden_states` kwarg)
    output  forward hook, the output (first element when it is a tuple)
    qkv     GPT-2's fused c_attn output, split into q, k, v exactly as GPT2Attention splits it
    router  MoE router output (router_logits, routing weights, expert ids)

    arch_for(model)   # ArchMap for model.config.model_type
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ArchMap:
    family: str
    layers: str                  # the decoder layer ModuleList
    embed: str                   # token embedding (token_ids = its input, embeddings = its output)
    final_norm: str
    lm_head: str
    attn: str                    # per layer: attention block (attn_out = its output[0])
    q_proj: str | None           # per layer
    k_proj: str | None
    v_proj: str | None
    qkv_fused: str | None        # per layer, GPT-2 style fused projection
    post_attn_norm: str          # per layer: resid_mid = its input
    mlp: str                     # per layer: mlp_in = input, mlp_out = output
    down_proj: str | None        # per layer: mlp_act = its input (dense MLP layers)
    router: str | None           # per layer: MoE router (MoE layers only)
    router_tuple: tuple[int, int, int] = (0, 1, 2)  # positions of (logits, weights, ids) in its output


_LLAMA_LIKE = dict(layers="model.layers", embed="model.embed_tokens", final_norm="model.norm",
                   lm_head="lm_head", attn="self_attn", q_proj="self_attn.q_proj",
                   k_proj="self_attn.k_proj", v_proj="self_attn.v_proj", qkv_fused=None,
                   post_attn_norm="post_attention_layernorm", mlp="mlp", down_proj="mlp.down_proj",
                   router="mlp.gate")

ARCHS: dict[str, ArchMap] = {
    "llama": ArchMap("llama", **_LLAMA_LIKE),
    "mistral": ArchMap("mistral", **_LLAMA_LIKE),
    "qwen2": ArchMap("qwen2", **_LLAMA_LIKE),
    "qwen3": ArchMap("qwen3", **_LLAMA_LIKE),
    # MoE: transformers 5.x fuses the experts into 3-D parameters (no module carries the expert
    # hidden activation); the router module `mlp.gate` returns (logits, weights, ids).
    "qwen2_moe": ArchMap("qwen2_moe", **_LLAMA_LIKE),
    "qwen3_moe": ArchMap("qwen3_moe", **_LLAMA_LIKE),
    "mixtral": ArchMap("mixtral", **_LLAMA_LIKE),
    "gpt2": ArchMap("gpt2", layers="transformer.h", embed="transformer.wte", final_norm="transformer.ln_f",
                    lm_head="lm_head", attn="attn", q_proj=None, k_proj=None, v_proj=None,
                    qkv_fused="attn.c_attn", post_attn_norm="ln_2", mlp="mlp", down_proj="mlp.c_proj",
                    router=None),
}


def arch_for(model) -> ArchMap:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    try:
        return ARCHS[model_type]
    except KeyError:
        raise ValueError(f"no tap map for model_type {model_type!r}; known: {', '.join(ARCHS)}") from None


def find_module(root, path: str | None):
    """The submodule at a dotted path, or None."""
    if not path:
        return None
    m = root
    for part in path.split("."):
        m = getattr(m, part, None)
        if m is None:
            return None
    return m
