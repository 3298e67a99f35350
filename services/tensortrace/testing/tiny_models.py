"""Tiny randomly initialised models of each supported family (built from configs; nothing is downloaded)."""

from __future__ import annotations

import torch

VOCAB = 96


def make(family: str, seed: int = 0):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=64, attn_implementation="eager")
    llama_like = dict(common, intermediate_size=48, num_key_value_heads=2)
    if family == "llama":
        cfg, cls = tf.LlamaConfig(**llama_like), tf.LlamaForCausalLM
    elif family == "qwen2":
        cfg, cls = tf.Qwen2Config(**llama_like), tf.Qwen2ForCausalLM
    elif family == "qwen3":
        cfg, cls = tf.Qwen3Config(head_dim=8, **llama_like), tf.Qwen3ForCausalLM
    elif family == "mistral":
        cfg, cls = tf.MistralConfig(**llama_like), tf.MistralForCausalLM
    elif family == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=4,
                                num_experts_per_tok=2, decoder_sparse_step=2, **llama_like)
        cls = tf.Qwen2MoeForCausalLM
    elif family == "mixtral":
        cfg = tf.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **llama_like)
        cls = tf.MixtralForCausalLM
    elif family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2,
                            attn_implementation="eager")
        cls = tf.GPT2LMHeadModel
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    model.generation_config.pad_token_id = 0
    return model


FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "qwen2_moe", "mixtral", "gpt2")


def left_padded(prompts: list[list[int]]):
    """(input_ids, attention_mask) for prompts of different lengths, left padded with 0."""
    P = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), P, dtype=torch.long)
    mask = torch.zeros(len(prompts), P, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, P - len(p):] = torch.tensor(p)
        mask[b, P - len(p):] = 1
    return ids, mask
