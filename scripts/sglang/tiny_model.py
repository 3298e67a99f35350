"""CLI for the tiny random SGLang test models; the code lives in tensortrace.devstack.tiny_model.

    python scripts/sglang/tiny_model.py /tmp/tiny-llama --arch llama
"""

from tensortrace.devstack.tiny_model import VOCAB_WORDS, build_tokenizer, main, make_tiny_model  # noqa: F401

if __name__ == "__main__":
    main()
