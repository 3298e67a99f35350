"""ForwardBatch objects for the layout tests.

Under the SGLang venv: SGLang's own `ForwardBatch` dataclass and `ForwardMode` enum (they import
and instantiate without a GPU). Under the project venv, where SGLang is absent: a SHAPE-ALIKE —
a stand-in with only the documented fields the adapter reads (v0_5.FORWARD_BATCH_FIELDS) and the
same mode names. Tests print which one they used (`KIND`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from sglang_harness import HAS_SGLANG

if HAS_SGLANG:
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch as _FB
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    KIND = "sglang.srt.model_executor.forward_batch_info.ForwardBatch (real)"
else:
    ForwardMode = enum.Enum("ForwardMode", "EXTEND DECODE MIXED IDLE TARGET_VERIFY DRAFT_EXTEND_V2 PREBUILT "
                                           "SPLIT_PREFILL DLLM_EXTEND")
    KIND = "shape-alike ForwardBatch (SGLang not installed in this interpreter)"

    @dataclass
    class _FB:  # SHAPE-ALIKE of sglang ForwardBatch: the fields the layout adapter reads
        forward_mode: object
        batch_size: int
        input_ids: torch.Tensor
        req_pool_indices: torch.Tensor
        seq_lens: torch.Tensor
        out_cache_loc: torch.Tensor
        seq_lens_sum: int
        seq_lens_cpu: torch.Tensor | None = None
        extend_seq_lens_cpu: list | None = None
        extend_prefix_lens_cpu: list | None = None
        rids: list | None = None


def forward_batch(mode: str, rids, seq_lens, extend_lens=None, prefix_lens=None, padded_to: int | None = None,
                  set_rids: bool = True):
    """A ForwardBatch as SGLang builds it for `mode` (host-side fields filled like init_new does)."""
    bs = len(rids)
    seq_lens = list(seq_lens)
    if extend_lens is not None:
        rows = sum(extend_lens)
    else:
        rows = bs
    if padded_to is not None:  # CUDA-graph padding: static buffers of the captured batch size
        rows = padded_to
        seq_lens = seq_lens + [1] * (padded_to - bs)
    fb = _FB(forward_mode=getattr(ForwardMode, mode), batch_size=bs,
             input_ids=torch.arange(rows, dtype=torch.int64) + 100,
             req_pool_indices=torch.arange(bs), seq_lens=torch.tensor(seq_lens),
             out_cache_loc=torch.arange(rows), seq_lens_sum=sum(seq_lens))
    fb.seq_lens_cpu = torch.tensor(seq_lens)
    if extend_lens is not None:
        fb.extend_seq_lens_cpu = list(extend_lens)
        fb.extend_prefix_lens_cpu = list(prefix_lens)
    if set_rids:
        fb.rids = list(rids)
    return fb
