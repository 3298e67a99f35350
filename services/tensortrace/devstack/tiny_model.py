"""Tiny randomly initialised Llama / Qwen3 checkpoints for running a real SGLang server on CPU.

Nothing is downloaded: the config, the random weights (fixed seed) and a small word-level
tokenizer (built with the `tokenizers` library, wrapped as PreTrainedTokenizerFast) are written
to a directory SGLang's `--model-path` accepts.

    python scripts/sglang/tiny_model.py /tmp/tiny-llama --arch llama

    from tensortrace.devstack.tiny_model import make_tiny_model
    make_tiny_model("/tmp/tiny-qwen3", arch="qwen3")
"""

from __future__ import annotations

import argparse
import json
import os

VOCAB_WORDS = 250  # w0 .. w249, plus the special tokens below
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for i in range(VOCAB_WORDS):
        vocab[f"w{i}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")


def make_tiny_model(path: str, arch: str = "llama", seed: int = 0, layers: int = 2, hidden: int = 64,
                    dtype: str = "float32") -> str:
    """Write a tiny random `arch` model + tokenizer to `path`; returns path. Idempotent per args."""
    import torch
    import transformers

    stamp = os.path.join(path, ".tiny-model.json")
    want = {"arch": arch, "seed": seed, "layers": layers, "hidden": hidden, "dtype": dtype,
            "transformers": transformers.__version__}
    if os.path.exists(stamp):
        with open(stamp) as f:
            if json.load(f) == want:
                return path
    tokenizer = build_tokenizer()
    common = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, torch_dtype=dtype)
    if arch == "llama":
        config = transformers.LlamaConfig(**common)
        cls = transformers.LlamaForCausalLM
    elif arch == "qwen3":
        config = transformers.Qwen3Config(head_dim=hidden // 4, **common)
        cls = transformers.Qwen3ForCausalLM
    elif arch == "qwen2":
        config = transformers.Qwen2Config(**common)
        cls = transformers.Qwen2ForCausalLM
    elif arch == "qwen2_moe":
        config = transformers.Qwen2MoeConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=hidden,
                                             shared_expert_intermediate_size=hidden, decoder_sparse_step=1,
                                             **common)
        cls = transformers.Qwen2MoeForCausalLM
    else:
        raise ValueError(f"unknown arch {arch!r}: llama, qwen2, qwen3 or qwen2_moe")
    torch.manual_seed(seed)
    model = cls(config).to(getattr(torch, dtype)).eval()
    # Random-init norms are all ones; perturb them so a norm tap cannot pass by accident.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    with open(stamp, "w") as f:
        json.dump(want, f)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path")
    ap.add_argument("--arch", default="llama", choices=("llama", "qwen2", "qwen3", "qwen2_moe"))
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    print(make_tiny_model(a.path, a.arch, a.seed, a.layers, a.hidden))


if __name__ == "__main__":
    main()
