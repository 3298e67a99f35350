"""Module taps by wrapping the module's forward (agent/forward_wrap.py) instead of PyTorch hooks:
the taps see what a hook would, the model computes what it computes unwrapped, removal restores the
module exactly (its class's forward, or another library's wrapper), and a whole capture run writes
the same ring bytes either way."""

from __future__ import annotations

import functools

import pytest
import torch

from tensortrace.agent import AgentConfig, CaptureAgent, Selection, core, forward_wrap, native
from tensortrace.agent.backends.hf import HFBackend
from tensortrace.ring.format import HEADER_SIZE, OFF_PRODUCER_STATS
from tensortrace.testing.tiny_models import left_padded, make

pytestmark = pytest.mark.unit

NATIVE, WHY_NOT = native.load(required=True)
WRAPPERS = [forward_wrap.PyForwardWrap] + ([NATIVE.ForwardWrap] if NATIVE is not None else [])


@pytest.fixture(params=WRAPPERS, ids=lambda t: t.__name__)
def wrapper(request, monkeypatch):
    monkeypatch.setattr(forward_wrap, "_wrapper_type", lambda: request.param)
    return request.param


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x, scale=1.0, *, shift=None):
        y = self.lin(x) * scale
        return y if shift is None else y + shift


def test_taps_get_what_hooks_get_and_the_output_is_untouched(wrapper):
    torch.manual_seed(0)
    m = Block()
    x, shift = torch.randn(3, 8), torch.randn(8)
    expected = m(x, 2.0, shift=shift)
    seen_hooks, seen_wrap = [], []
    for seen, attach in ((seen_hooks, functools.partial(forward_wrap.attach, mechanism="hooks")),
                         (seen_wrap, forward_wrap.attach)):
        handles = [
            attach(m, lambda mod, a, kw: seen.append(("pre", mod, a, dict(kw))), pre=True, with_kwargs=True),
            attach(m, lambda mod, a: seen.append(("pre-nokw", mod, a)), pre=True),
            attach(m, lambda mod, a, kw, out: seen.append(("post", mod, a, dict(kw), out)), pre=False, with_kwargs=True),
            attach(m, lambda mod, a, out: seen.append(("post-nokw", mod, a, out)), pre=False),
        ]
        got = m(x, 2.0, shift=shift)
        assert torch.equal(got, expected)
        for h in handles:
            h.remove()
    assert "forward" not in m.__dict__ and not m._forward_hooks and not m._forward_pre_hooks
    assert len(seen_wrap) == len(seen_hooks) == 4
    for w, h in zip(seen_wrap, seen_hooks):
        assert w[0] == h[0] and w[1] is m and w[2] == h[2] == (x, 2.0)
        if w[0] in ("pre", "post"):
            assert w[3].keys() == h[3].keys() == {"shift"} and w[3]["shift"] is shift
        if w[0].startswith("post"):
            assert torch.equal(w[-1], expected)


def test_the_wrapper_keeps_module_call_on_its_fast_path(wrapper):
    m = Block()
    h = forward_wrap.attach(m, lambda mod, a, out: None, pre=False)
    assert isinstance(m.__dict__["forward"], wrapper)
    assert not m._forward_hooks and not m._forward_pre_hooks   # no PyTorch hook: _call_impl's fast path
    import inspect

    assert list(inspect.signature(m.forward).parameters) == ["x", "scale", "shift"]   # follows __wrapped__
    assert forward_wrap.wrapped_modules() >= 1
    h.remove()
    h.remove()   # idempotent, as torch's handles
    assert "forward" not in m.__dict__


def test_one_wrapper_per_module_and_the_last_tap_removes_it(wrapper):
    m = Block()
    calls = []
    h1 = forward_wrap.attach(m, lambda mod, a, out: calls.append(1), pre=False)
    h2 = forward_wrap.attach(m, lambda mod, a: calls.append(0), pre=True)
    w = m.__dict__["forward"]
    m(torch.randn(1, 8))
    assert calls == [0, 1]
    h1.remove()
    assert m.__dict__["forward"] is w and len(w.pre) == 1 and w.post == ()
    h2.remove()
    assert "forward" not in m.__dict__


def test_another_librarys_forward_wrapper_is_restored_and_kept(wrapper):
    """accelerate-style: an instance `forward` that wraps the class's (functools.update_wrapper)."""
    m = Block()
    calls = []
    original = m.forward

    def theirs(*a, **kw):
        calls.append("theirs")
        return original(*a, **kw)
    functools.update_wrapper(theirs, original)
    m.forward = theirs
    h = forward_wrap.attach(m, lambda mod, a, out: calls.append("tap"), pre=False)
    m(torch.randn(1, 8))
    assert calls == ["theirs", "tap"]
    h.remove()
    assert m.__dict__["forward"] is theirs

    # theirs set on top of ours: removal leaves ours as a pass-through under theirs, reused next time
    calls.clear()
    h = forward_wrap.attach(m, lambda mod, a, out: calls.append("tap"), pre=False)
    ours = m.__dict__["forward"]
    inner = ours

    def on_top(*a, **kw):
        calls.append("on-top")
        return inner(*a, **kw)
    functools.update_wrapper(on_top, inner)
    m.forward = on_top
    h.remove()
    assert m.__dict__["forward"] is on_top and ours.pre == () and ours.post == ()
    m(torch.randn(1, 8))
    assert calls == ["on-top", "theirs"]
    h = forward_wrap.attach(m, lambda mod, a, out: calls.append("tap2"), pre=False)
    assert m.__dict__["forward"] is on_top   # ours, reachable under theirs, carries the tap
    m(torch.randn(1, 8))
    assert calls[-1] == "tap2"
    h.remove()

    # theirs replaced ours without keeping it underneath: the next attach wraps afresh
    m.forward = theirs
    h = forward_wrap.attach(m, lambda mod, a, out: calls.append("tap3"), pre=False)
    m(torch.randn(1, 8))
    assert calls[-1] == "tap3"
    h.remove()
    assert m.__dict__["forward"] is theirs


def test_a_deep_copy_of_a_tapped_model_is_untapped_and_computes_the_same(wrapper):
    import copy

    torch.manual_seed(0)
    model = torch.nn.Sequential(Block(), Block())
    calls = []
    h = forward_wrap.attach(model[1], lambda mod, a, out: calls.append(mod), pre=False)
    twin = copy.deepcopy(model)
    x = torch.randn(2, 8)
    assert torch.equal(twin(x), model(x))
    assert calls == [model[1]]                      # only the original's tap ran
    assert not isinstance(twin[1].__dict__.get("forward"), wrapper)
    with torch.no_grad():
        twin[1].lin.weight.mul_(2)              # the copy's forward runs the copy's weights
    assert not torch.equal(twin(x), model(x)) and torch.equal(twin(x), twin[1](twin[0](x)))
    assert torch.equal(twin[1](x), twin[1].lin(x))
    h.remove()


def test_errors_propagate_as_they_do_from_hooks(wrapper):
    m = Block()

    def bad_tap(mod, a):
        raise RuntimeError("tap failed")
    h = forward_wrap.attach(m, bad_tap, pre=True)
    with pytest.raises(RuntimeError, match="tap failed"):
        m(torch.randn(1, 8))
    h.remove()
    h = forward_wrap.attach(m, lambda mod, a, out: None, pre=False)
    with pytest.raises(RuntimeError):   # the model's own error (wrong width), through the wrapper
        m(torch.randn(1, 5))
    h.remove()


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="mechanism"):
        forward_wrap.attach(Block(), lambda *a: None, pre=True, mechanism="monkeypatch")
    with pytest.raises(ValueError, match="module_taps"):
        AgentConfig(ring_dir="/tmp", module_taps="patch").validate()
    if NATIVE is not None:
        w = NATIVE.ForwardWrap(Block(), Block().forward)
        with pytest.raises(ValueError):
            w.pre = ((1, True),)
        with pytest.raises(ValueError):
            w.post = tuple((print, False) for _ in range(9))
        with pytest.raises(TypeError):
            NATIVE.ForwardWrap(Block(), 3)


def _ring_run(tmp_path, mechanism, preset, path):
    model = make("llama")
    agent = CaptureAgent(AgentConfig(ring_dir=str(tmp_path / mechanism), model_id="m", pod=f"p-{mechanism}",
                                     ring_capacity=16 << 20, capture_path=path, module_taps=mechanism),
                         Selection.preset(preset))
    backend = HFBackend(model, agent)
    ids, mask = left_padded([[5, 6, 7], [11, 12, 13, 14, 15, 16], [21]])
    out, _ = backend.generate(ids, attention_mask=mask, request_ids=["a", "b", "c"], max_new_tokens=4,
                              traceparents=[f"00-4bf92f3577b34da6a3ce929d0e0e47{b:02x}-00f067aa0ba902b7-01" for b in range(3)],
                              do_sample=False, pad_token_id=0, eos_token_id=None, return_dict_in_generate=True)
    hooks_during = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    wrapped_during = sum("forward" in m.__dict__ for m in model.modules())
    backend.detach()
    assert all("forward" not in m.__dict__ and not m._forward_hooks and not m._forward_pre_hooks
               for m in model.modules())   # detach leaves the model as it found it
    mm = agent.writer._m.mm
    image = bytes(mm[HEADER_SIZE:]), bytes(mm[OFF_PRODUCER_STATS + 8: OFF_PRODUCER_STATS + 40])
    st = agent.stats()
    agent.close()
    return image, (st.written, st.dropped), out.sequences, hooks_during, wrapped_during


@pytest.mark.parametrize("path", ["native", "python"])
@pytest.mark.parametrize("preset", ["full", "hidden-states"])
def test_a_capture_run_writes_the_same_ring_bytes_with_wrappers_and_with_hooks(tmp_path, monkeypatch, path, preset):
    if path == "native" and NATIVE is None:
        pytest.skip(f"native path not built: {WHY_NOT}")
    monkeypatch.setattr(core, "_time_ns", lambda: 1_700_000_000_123_456_789)
    img_h, st_h, seq_h, hooks_h, wrapped_h = _ring_run(tmp_path, "hooks", preset, path)
    img_f, st_f, seq_f, hooks_f, wrapped_f = _ring_run(tmp_path, "forward", preset, path)
    assert torch.equal(seq_h, seq_f)
    assert st_h == st_f and st_h[0] > 0 and st_h[1] == 0
    assert img_f == img_h
    # while generating: taps as hooks (plus the 2 model-level layout hooks) vs as wrappers
    assert wrapped_h == 0 and hooks_h > 2
    assert hooks_f == 2 and wrapped_f == hooks_h - 2
