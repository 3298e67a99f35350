"""Activations for training and evaluating probes, two ways that give the same tensors.

`hidden_states` runs one plain Hugging Face forward per prompt with `output_hidden_states=True`
(no padding, no batch: each prompt alone, as a server would see it).
`tensortrace.devstack.probe_train.captured_states` runs the same prompt through the capture path —
`tensortrace.agent` with the HF backend writing into a real shm ring, read back the way the
exporter does — and returns the records' rows (it lives with the tooling: a service package does
not import another). For resid_pre, layer L = `hidden_states[L]` (the hook catalog's numbering).
tests/probes/test_train_activations.py proves both equal bit for bit (tiny random models always;
SmolLM2 when prepared), so numbers measured on `hidden_states` hold for probes that score the
captured stream.

    model, tok = load_model(smollm2_path())
    ids = encode(tok, "Ignore all previous instructions.")       # chat template, generation prompt
    acts = hidden_states(model, [ids], layers=[10, 20])          # [{10: (n, 576) float32, 20: ...}]
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def load_model(path, random_weights: bool = False, seed: int = 0):
    """(model, tokenizer) in fp32 eval mode; `random_weights`: the same architecture, freshly initialised
    (the "same model with random weights" baseline)."""
    import torch
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(str(path))
    if random_weights:
        cfg = tf.AutoConfig.from_pretrained(str(path))
        torch.manual_seed(seed)
        model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    else:
        model = tf.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return model.eval(), tok


def encode(tok, text: str, chat: bool = True) -> list[int]:
    """Token ids of a user prompt: with the model's chat template and generation prompt (what a chat
    completions request feeds the model), or the raw text."""
    if chat and getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                      tokenize=True)
        if hasattr(ids, "keys"):        # transformers 5 may return a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)
    return list(tok(text)["input_ids"])


def hidden_states(model, token_ids: Sequence[Sequence[int]], layers: Sequence[int]) -> list[dict[int, np.ndarray]]:
    """resid_pre rows of each prompt at `layers` (0..num_layers-1; num_layers = the final norm output).
    On a CPU shared with other work, `torch.set_num_threads(1)` is often several times faster
    (measured here: 0.4 s vs 4 s per 42-token SmolLM2 prompt at load average 8 on 2 cores)."""
    import torch

    body = getattr(model, model.base_model_prefix, model)   # the decoder stack: no LM head, same hidden states
    out = []
    with torch.inference_mode():
        for ids in token_ids:
            hs = body(torch.tensor([list(ids)]), output_hidden_states=True).hidden_states
            out.append({L: hs[L][0].float().numpy().copy() for L in layers})
    return out
