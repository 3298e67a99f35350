"""The hook catalog: every tensor the agent can capture, in one table.

Everything else derives from HOOKS: preset expansion, selection validation, the per-architecture
tap placement of each backend (backends name the module that carries each hook), docs/agent.md.
A hook is either per layer (`layer` = decoder layer index) or global (`layer` = -1).

>>> HOOKS["resid_pre"].per_layer
True
>>> expand_preset("hidden-states")
('resid_pre', 'resid_final', 'logits')
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HookSpec:
    name: str
    per_layer: bool
    description: str


def _h(name, per_layer, description):
    return HookSpec(name, per_layer, description)


HOOKS: dict[str, HookSpec] = {h.name: h for h in (
    _h("token_ids", False, "input token id of each row (int64, row shape [])"),
    _h("embeddings", False, "token embedding output (before position embeddings / layer 0)"),
    _h("resid_pre", True, "residual stream entering decoder layer L (= HF hidden_states[L])"),
    _h("resid_mid", True, "residual stream after attention of layer L (input of the post-attention norm)"),
    _h("attn_q", True, "attention query projection output of layer L, before RoPE ([heads*head_dim])"),
    _h("attn_k", True, "attention key projection output of layer L, before RoPE ([kv_heads*head_dim])"),
    _h("attn_v", True, "attention value projection output of layer L ([kv_heads*head_dim])"),
    _h("attn_out", True, "attention block output of layer L (after o_proj), before the residual add"),
    _h("mlp_in", True, "MLP block input of layer L (post-attention norm output)"),
    _h("mlp_act", True, "MLP hidden activation of layer L (input of down_proj)"),
    _h("mlp_out", True, "MLP / MoE block output of layer L, before the residual add"),
    _h("moe_router_logits", True, "MoE router logits of layer L ([num_experts])"),
    _h("moe_topk_ids", True, "MoE selected expert ids of layer L ([top_k], int64)"),
    _h("moe_topk_weights", True, "MoE routing weights of the selected experts of layer L ([top_k])"),
    _h("resid_final", False, "final norm output (= HF hidden_states[-1])"),
    _h("logits", False, "LM head output, for the rows the model computes (HF generate prefill and SGLang: "
                        "the last token of each request only)"),
)}

# Presets: names users type. `full` is every hook.
PRESETS: dict[str, tuple[str, ...]] = {
    "hidden-states": ("resid_pre", "resid_final", "logits"),
    "residual": ("resid_pre", "resid_mid", "resid_final"),
    "logits": ("logits",),
    "attention": ("attn_q", "attn_k", "attn_v", "attn_out"),
    "mlp": ("mlp_in", "mlp_act", "mlp_out"),
    "moe": ("moe_router_logits", "moe_topk_ids", "moe_topk_weights"),
    "inputs": ("token_ids", "embeddings"),
    "full": tuple(HOOKS),
}


def expand_preset(name: str) -> tuple[str, ...]:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}") from None


def check_hook(name: str) -> HookSpec:
    try:
        return HOOKS[name]
    except KeyError:
        raise ValueError(f"unknown hook {name!r}; hooks: {', '.join(HOOKS)}") from None
