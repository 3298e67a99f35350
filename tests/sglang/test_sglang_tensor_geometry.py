"""The tensor-geometry reader in the SGLang venv (torch 2.14 there, 2.15 in the project venv): its
own build, made by `make sglang-env`, loads under this torch and reads what the accessors say; the
real-server tests (test_sglang_real_server.py) then capture through it, bit-exact."""

from __future__ import annotations

import pytest
import torch

from tensortrace.agent import geometry


def test_the_sglang_venv_has_a_reader_built_for_its_own_torch():
    if geometry.compiler()[0] is None or not geometry.has_headers():
        pytest.skip("no C++ compiler or torch headers: the taps read geometry through DLPack here")
    cap, why = geometry.load()
    assert cap is not None, why
    mod = geometry.sys.modules[geometry.MODULE]
    assert mod.TORCH_VERSION == torch.__version__
    base = torch.arange(60, dtype=torch.bfloat16).reshape(3, 4, 5)
    for t in (base, base[1:], base.transpose(0, 2), torch.zeros(0, 3), torch.tensor(1)):
        assert mod.describe(t) == (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.element_size(), t.dtype)
    assert mod.describe(torch._to_functional_tensor(base)) is None
