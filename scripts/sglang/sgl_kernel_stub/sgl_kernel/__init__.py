"""CPU STAND-IN for `sgl_kernel` — a fake, NOT the real package.

SGLang's CPU engine (SGLANG_USE_CPU_ENGINE=1) does `from sgl_kernel import ...`. The real CPU build
of sgl_kernel is not published on PyPI, and the published `sglang-kernel` wheel carries only
sm90/sm100 CUDA code (its import fails without libcuda.so.1). So on CPU-only test machines we put
this directory on PYTHONPATH (it is inherited by SGLang's spawned scheduler processes):

    PYTHONPATH=scripts/sglang/sgl_kernel_stub SGLANG_USE_CPU_ENGINE=1 python -m sglang.launch_server ...

Plain generation with `--attention-backend torch_native` calls exactly one op of it,
`assign_req_to_token_pool_cpu`, implemented below in pure torch with the semantics of the real
kernel. Every other attribute exists (so imports succeed) but raises NotImplementedError when
called, naming itself — a code path that needs a real kernel fails loudly instead of computing
something wrong. `convert_weight_packed` is deliberately left undefined: SGLang probes for it to
decide whether to take its AMX weight-packing path, which we must not take.

Never install this on a machine with the real sgl_kernel.
"""

from __future__ import annotations

import torch

IS_TENSORTRACE_CPU_STANDIN = True
__version__ = "0.0.0+tensortrace-cpu-standin"

# Attributes SGLang must see as absent (hasattr -> False), not as a stub.
_ABSENT = frozenset({"convert_weight_packed"})


def assign_req_to_token_pool_cpu(req_pool_indices: torch.Tensor, req_to_token: torch.Tensor,
                                 start_offset: torch.Tensor, end_offset: torch.Tensor,
                                 out_cache_loc: torch.Tensor, pool_len: int) -> None:
    """For each request i, write the next end_offset[i]-start_offset[i] entries of out_cache_loc
    into req_to_token[req_pool_indices[i], start_offset[i]:end_offset[i]] (in place).

        assign_req_to_token_pool_cpu(idx, req_to_token, starts, ends, out_cache_loc, req_to_token.shape[1])
    """
    starts = start_offset.tolist()
    ends = end_offset.tolist()
    rows = req_pool_indices.tolist()
    cursor = 0
    for row, s, e in zip(rows, starts, ends):
        n = e - s
        if n <= 0:
            continue
        if e > pool_len:
            raise ValueError(f"assign_req_to_token_pool_cpu: end offset {e} > pool_len {pool_len}")
        req_to_token[row, s:e] = out_cache_loc[cursor:cursor + n].to(req_to_token.dtype)
        cursor += n


class _NotInStandIn:
    """A kernel this stand-in does not implement: importable, raises when called."""

    def __init__(self, name: str):
        self.__name__ = self._name = name

    def __call__(self, *args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{self._name} is not implemented by the TensorTrace CPU stand-in for sgl_kernel "
            f"(scripts/sglang/sgl_kernel_stub); only assign_req_to_token_pool_cpu is")

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _NotInStandIn(f"{self._name}.{attr}")

    def __repr__(self) -> str:
        return f"<sgl_kernel CPU stand-in: {self._name} (not implemented)>"


def __getattr__(name: str):
    if name in _ABSENT or name.startswith("__"):
        raise AttributeError(f"module 'sgl_kernel' (TensorTrace CPU stand-in) has no attribute {name!r}")
    return _NotInStandIn(name)
