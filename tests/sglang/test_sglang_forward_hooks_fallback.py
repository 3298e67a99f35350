"""The `--forward-hooks` fallback factory, driven the way SGLang's hook manager drives it
(register_forward_hook on every module matching "model.layers.*"), on a SHAPE-ALIKE of an
SGLang <= 0.5.9 decoder layer: forward(positions, hidden_states, forward_batch, residual) ->
(hidden_states, residual). Those SGLang versions are not installed here."""

from __future__ import annotations

import fnmatch

import pytest
import torch

from forward_batches import forward_batch
from sglang_harness import read_rings
from tensortrace.agent.backends.sglang.forward_hooks import decoder_layer_hook
from tensortrace.wire.codec import record_to_tensor

pytestmark = pytest.mark.unit
H = 8


class ShapeAlikeAttention(torch.nn.Module):
    def __init__(self, layer_id):
        super().__init__()
        self.layer_id = layer_id
        self.proj = torch.nn.Linear(H, H)

    def forward(self, x):
        return self.proj(x)


class ShapeAlikeDecoderLayer(torch.nn.Module):  # SHAPE-ALIKE of sglang<=0.5.9 LlamaDecoderLayer
    def __init__(self, layer_id):
        super().__init__()
        self.self_attn = ShapeAlikeAttention(layer_id)
        self.mlp = torch.nn.Linear(H, H)

    def forward(self, positions, hidden_states, forward_batch, residual):
        if residual is None:
            residual = hidden_states
        else:
            residual = hidden_states + residual
        h = self.self_attn(residual)
        residual = h + residual
        return self.mlp(residual), residual


class ShapeAlikeModel(torch.nn.Module):
    def __init__(self, n=3):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList(ShapeAlikeDecoderLayer(i) for i in range(n))

    def forward(self, x, fb):
        hidden, residual, seen = x, None, []
        for layer in self.model.layers:
            hidden, residual = layer(None, hidden, fb, residual)
            seen.append(hidden + residual)  # resid_pre of the next layer
        return seen


def test_fallback_captures_resid_pre_between_layers_attributed_by_forward_batch(tmp_path):
    torch.manual_seed(0)
    model = ShapeAlikeModel()
    hook = decoder_layer_hook({"ring_dir": str(tmp_path), "ring_capacity": "1M", "selection": "residual",
                               "model_id": "shape-alike"})
    for name, module in model.named_modules():  # what sglang's register_forward_hooks does
        if fnmatch.fnmatch(name, "model.layers.*"):
            module.register_forward_hook(hook)
    prefill = forward_batch("EXTEND", ["a", "b"], seq_lens=[3, 2], extend_lens=[3, 2], prefix_lens=[0, 0])
    x1 = torch.randn(5, H)
    ref1 = model(x1, prefill)
    decode = forward_batch("DECODE", ["a", "b"], seq_lens=[4, 3])
    ref2 = model(torch.randn(2, H), decode)
    decode2 = forward_batch("DECODE", ["b"], seq_lens=[4])  # "a" finished
    model(torch.randn(1, H), decode2)
    hook.close()
    ring = read_rings(str(tmp_path))
    got = {(r.request_id, r.layer, r.token_start): record_to_tensor(r) for r in ring.records}
    assert {k[1] for k in got} == {1, 2}  # resid_pre of layers 1..N-1 only
    assert torch.equal(got[("a", 1, 0)], ref1[0][0:3]) and torch.equal(got[("b", 2, 0)], ref1[1][3:5])
    assert torch.equal(got[("a", 1, 3)], ref2[0][0:1]) and torch.equal(got[("b", 1, 2)], ref2[0][1:2])
    assert ring.summaries["a"].finish_reason == "unknown" and ring.summaries["a"].complete
    assert not ring.summaries["b"].complete and ring.summaries["b"].incomplete_reason == "server stopped"


def test_a_layer_returning_something_else_disables_the_fallback_with_the_reason(tmp_path):
    class HandleDecoderLayer(ShapeAlikeDecoderLayer):  # like 0.5.23's layer-boundary handle
        def forward(self, positions, hidden_states, forward_batch, residual):
            return object()

    layer = HandleDecoderLayer(0)
    hook = decoder_layer_hook({"ring_dir": str(tmp_path), "ring_capacity": "1M"})
    layer.register_forward_hook(hook)
    layer(None, torch.randn(2, H), forward_batch("EXTEND", ["a"], [2], [2], [0]), None)  # never raises
    assert "not the (hidden_states, residual) pair" in hook.disabled_reason
    hook.close()


def test_unknown_config_key_is_rejected():
    with pytest.raises(ValueError, match="unknown key 'colour'"):
        decoder_layer_hook({"colour": "red"})
