"""SGLangCapture (the per-scheduler-process runtime) driven like SGLang's hooks drive it, on the
SHAPE-ALIKE model of shape_alike.py (SGLang's module names and norm contract)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

from forward_batches import forward_batch
from shape_alike import finish, make_runner, model_forward, req
from sglang_harness import read_rings
from tensortrace.agent import forward_wrap
from tensortrace.agent.backends.sglang.config import SGLangBackendConfig
from tensortrace.agent.backends.sglang.plugin import SGLangCapture

pytestmark = pytest.mark.unit
@pytest.fixture
def runtime(tmp_path):
    runner = make_runner()
    rt = SGLangCapture(SGLangBackendConfig(ring_dir=str(tmp_path), ring_capacity=1 << 20, selection="full"))
    rt.attach(runner)
    return rt, runner, str(tmp_path)


def test_self_check_disables_a_tap_that_does_not_fire_and_reports_it(runtime):
    rt, runner, ring_dir = runtime
    a, b = req("a", 3, {"traceparent": "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"}), req("b", 2)
    fb = forward_batch("EXTEND", ["a", "b"], seq_lens=[3, 2], extend_lens=[3, 2], prefix_lens=[0, 0])
    fb.input_ids = torch.tensor([1, 2, 3, 4, 5])
    rt.observe_batch(fb, SimpleNamespace(reqs=[a, b]))
    with torch.no_grad():
        rt.forward(model_forward, runner, fb)
    stats = rt.agent.stats()
    assert ("mlp_act@1", "model.layers.1.mlp.down_proj did not fire in the first forward") in stats.unplaced_taps
    assert ("mlp_act", 1) not in rt.taps.taps and ("mlp_act", 0) in rt.taps.taps
    finish(a, 1), finish(b, 1)
    rt.finish_requests([a, b])
    rt.agent.close()
    ring = read_rings(ring_dir)
    by = ring.by_request()
    assert {(r.hook, r.layer) for r in by["a"]} >= {("resid_pre", 0), ("resid_mid", 1), ("logits", -1), ("token_ids", -1)}
    assert ring.summaries["a"].trace_id.hex() == "ab" * 16 and ring.summaries["a"].complete
    # resid_pre of layer 1 is the residual the fused add+norm produced: embeddings + attn + mlp of layer 0
    resid = {(r.request_id, r.hook, r.layer): r for r in ring.records}
    from tensortrace.wire.codec import record_to_tensor

    emb = runner.model.model.embed_tokens(torch.tensor([1, 2, 3]))
    assert torch.equal(record_to_tensor(resid[("a", "resid_pre", 0)]), emb.detach())


def test_uncaptured_forward_modes_leave_the_request_explicitly_incomplete(runtime):
    rt, runner, ring_dir = runtime
    r = req("spec", 2)
    fb = forward_batch("EXTEND", ["spec"], seq_lens=[2], extend_lens=[2], prefix_lens=[0])
    fb.input_ids = torch.tensor([1, 2])
    rt.observe_batch(fb, SimpleNamespace(reqs=[r]))
    with torch.no_grad():
        rt.forward(model_forward, runner, fb)
        verify = forward_batch("TARGET_VERIFY", ["spec"], seq_lens=[6], extend_lens=[4], prefix_lens=[2])
        rt.forward(lambda runner, fb: "verified", runner, verify)
    finish(r, 4)
    rt.finish_requests([r])
    rt.agent.close()
    s = read_rings(ring_dir).summaries["spec"]
    assert not s.complete and "TARGET_VERIFY forwards are not captured" in s.incomplete_reason
    assert rt.skipped_steps == {"TARGET_VERIFY": 1}


def test_opted_out_request_has_no_rows_and_a_sampled_false_summary(runtime):
    rt, runner, ring_dir = runtime
    r = req("out", 2, {"tensortrace": {"capture": False}})
    fb = forward_batch("EXTEND", ["out"], seq_lens=[2], extend_lens=[2], prefix_lens=[0])
    fb.input_ids = torch.tensor([1, 2])
    rt.observe_batch(fb, SimpleNamespace(reqs=[r]))
    with torch.no_grad():
        rt.forward(model_forward, runner, fb)
    finish(r, 1)
    rt.finish_requests([r])
    rt.agent.close()
    ring = read_rings(ring_dir)
    assert not ring.records and ring.summaries["out"].sampled is False


def test_a_draft_runner_is_never_attached(tmp_path):
    rt = SGLangCapture(SGLangBackendConfig(ring_dir=str(tmp_path)))
    rt.attach(SimpleNamespace(is_draft_worker=True))
    assert rt.agent is None and not rt.attached_to(SimpleNamespace())


def test_thread_time_includes_the_layout_and_request_bookkeeping_not_the_forward(runtime, monkeypatch):
    """SGLangCapture is a Backend of the engine contract: its layout (plan_step) and its request
    bookkeeping run under agent.timed(), so stats().thread_seconds includes them; SGLang's forward
    itself (here a slow ModelRunner.forward) is not the agent's time."""
    from tensortrace.agent.backends.base import Backend
    from tensortrace.agent.backends.sglang import plugin

    rt, runner, ring_dir = runtime
    assert isinstance(rt, Backend)
    calls = {"plan": 0, "options": 0}
    real_plan, real_options = plugin.plan_step, plugin.options_of

    def slow_plan(*a, **kw):
        calls["plan"] += 1
        time.sleep(0.02)
        return real_plan(*a, **kw)

    def slow_options(custom):
        calls["options"] += 1
        time.sleep(0.02)
        return real_options(custom)

    def slow_forward(runner, fb):
        time.sleep(0.2)
        return model_forward(runner, fb)
    monkeypatch.setattr(plugin, "plan_step", slow_plan)
    monkeypatch.setattr(plugin, "options_of", slow_options)
    a, b = req("a", 3), req("b", 2)
    before = rt.agent.stats().thread_seconds
    fb = forward_batch("EXTEND", ["a", "b"], seq_lens=[3, 2], extend_lens=[3, 2], prefix_lens=[0, 0])
    fb.input_ids = torch.tensor([1, 2, 3, 4, 5])
    rt.observe_batch(fb, SimpleNamespace(reqs=[a, b]))
    with torch.no_grad():
        rt.forward(slow_forward, runner, fb)
        dec = forward_batch("DECODE", ["a", "b"], seq_lens=[4, 3])
        dec.input_ids = torch.tensor([6, 7])
        rt.forward(slow_forward, runner, dec)
    finish(a, 2), finish(b, 2)
    rt.finish_requests([a, b])
    counted = rt.agent.stats().thread_seconds - before
    assert calls == {"plan": 2, "options": 2}
    # two layouts + two requests' options: 4 x 20 ms in; two forwards' 2 x 200 ms out
    assert 0.08 <= counted < 0.2
    rt.agent.close()
    assert read_rings(ring_dir).summaries["a"].records_captured > 0


def test_detach_removes_every_tap_and_later_forwards_pass_through(runtime):
    rt, runner, ring_dir = runtime
    hooks = lambda: sum(_taps_on(m) for m in runner.model.modules())  # noqa: E731
    # one module tap per tapped module (until the self-check, every placed one is registered)
    assert rt.taps.taps and hooks() == len(rt.taps.sites) < len(rt.taps.taps) and rt.attached_to(runner)
    assert rt.attach(runner) == rt.unplaced            # attaching again changes nothing
    rt.detach()
    assert hooks() == 0 and not rt.taps.taps and not rt.attached_to(runner)
    rt.agent.close()


# -- registration follows the selection (issue 14 item 2) ------------------------------------------
def _taps_on(m) -> int:
    """Taps on a module now: PyTorch hooks plus the taps its forward wrapper carries (agent/forward_wrap.py)."""
    return len(m._forward_hooks) + len(m._forward_pre_hooks) + forward_wrap.taps_on(m)


def _hooked(model) -> dict:
    """module name -> module taps registered on it now (only modules with any)."""
    return {name: _taps_on(m) for name, m in model.named_modules() if _taps_on(m)}


def _modules_of(rt, hooks, layers=None) -> set:
    """Names of the modules whose entries serve `hooks` (on `layers`, None: all)."""
    return {t.module_name for (h, L), t in rt.taps.taps.items() if h in hooks and (layers is None or L in layers)}


def _serve(rt, runner, steps):
    """Prefill of a (3 tokens) and b (2), then len(steps) decode steps; steps[k] is set before
    decode step k: a Selection (agent.set_selection), a control document (written into the ring's
    control block, as the exporter does; the agent applies it at begin_step) or None. Returns the
    model's hook counts seen after each forward."""
    from tensortrace.ring.format import RingReader

    control = RingReader.open(rt.agent.ring_path)
    a, b = req("a", 3), req("b", 2)
    fb = forward_batch("EXTEND", ["a", "b"], seq_lens=[3, 2], extend_lens=[3, 2], prefix_lens=[0, 0])
    fb.input_ids = torch.tensor([1, 2, 3, 4, 5])
    rt.observe_batch(fb, SimpleNamespace(reqs=[a, b]))
    seen = []
    with torch.no_grad():
        rt.forward(model_forward, runner, fb)
        seen.append(_hooked(runner.model))
        for k, sel in enumerate(steps):
            if isinstance(sel, dict):
                control.write_control(sel)
            elif sel is not None:
                rt.agent.set_selection(sel)
            dec = forward_batch("DECODE", ["a", "b"], seq_lens=[4 + k, 3 + k])
            dec.input_ids = torch.tensor([6 + k, 7 + k])
            rt.forward(model_forward, runner, dec)
            seen.append(_hooked(runner.model))
    finish(a, len(steps) + 1), finish(b, len(steps) + 1)
    rt.finish_requests([a, b])
    control.close()
    rt.agent.close()
    return seen


def _records(ring_dir) -> dict:
    return {(r.request_id, r.hook, r.layer, r.token_start, r.token_end): (r.dtype, tuple(r.shape), r.payload)
            for r in read_rings(ring_dir).records}


def test_one_torch_hook_per_module_carrying_all_its_entries(runtime):
    rt, runner, ring_dir = runtime
    hooked = _hooked(runner.model)
    assert set(hooked) == {t.module_name for t in rt.taps.taps.values()}
    assert all(n == 1 for n in hooked.values()), hooked
    sites = {s.module_name: sorted(t.hook for t in s.entries) for s in rt.taps.sites.values()}
    assert sites["model.layers.0.post_attention_layernorm"] == ["mlp_in", "resid_mid"]
    assert sites["model.layers.0.self_attn.qkv_proj"] == ["attn_k", "attn_q", "attn_v"]
    rt.agent.close()


def test_registered_hooks_follow_the_selection_at_step_boundaries(tmp_path):
    """After the self-check only modules with a selected entry keep a hook; a selection change
    adds / removes hooks before the next forward; a step capturing nothing has none."""
    from tensortrace.agent.selection import Selection

    runner = make_runner()
    rt = SGLangCapture(SGLangBackendConfig(ring_dir=str(tmp_path), ring_capacity=1 << 20,
                                           selection="hidden-states"))
    rt.attach(runner)
    everything = len(rt.taps.sites)
    hidden = _modules_of(rt, ("resid_pre", "resid_final"))
    attention1 = _modules_of(rt, ("attn_q", "attn_k", "attn_v", "attn_out"), layers={1})
    seen = _serve(rt, runner, [None, {"version": 1, "selection": {"preset": "attention", "layers": "1"}}, None,
                               Selection(enabled=False), Selection.preset("hidden-states")])
    assert set(seen[0]) == hidden and everything > len(hidden)        # prefill: self-check, then hidden-states only
    assert set(seen[1]) == hidden                                     # decode, same selection
    assert set(seen[2]) == attention1 == {"model.layers.1.self_attn.qkv_proj", "model.layers.1.self_attn"}
    assert set(seen[3]) == attention1
    assert seen[4] == {}                                              # capture off: no hook at all
    assert set(seen[5]) == hidden
    assert all(n == 1 for step in seen for n in step.values()) and rt.taps.registered_hooks == len(seen[5])
    assert rt.agent.stats().control_docs_applied == 1
    ring = read_rings(str(tmp_path))
    got = {(r.hook, r.layer, r.step) for r in ring.records if r.request_id == "a"}
    steps = sorted({s for _, _, s in got})
    assert {(h, L) for h, L, s in got if s == steps[2]} == {("attn_q", 1), ("attn_k", 1), ("attn_v", 1),
                                                            ("attn_out", 1)}
    assert {(h, L) for h, L, s in got if s == steps[-1]} == {("resid_pre", 0), ("resid_pre", 1), ("resid_final", -1),
                                                             ("logits", -1)}


def test_selective_registration_captures_the_same_bytes_as_every_hook_registered(tmp_path, monkeypatch):
    """The same forwards and selection changes, once with registration following the selection
    and once with every placed hook registered and asked (the previous behaviour): every record
    is bit-identical."""
    from tensortrace.agent.backends.sglang import taps as taps_mod
    from tensortrace.agent.selection import Selection

    steps = [None, Selection.preset("full", layers=frozenset({0})), Selection.preset("mlp"), None]
    results = []
    for follow in (True, False):
        ring_dir = tmp_path / ("follow" if follow else "all")
        if not follow:   # the previous behaviour: nothing is ever unregistered, every entry asks the agent
            monkeypatch.setattr(taps_mod.SGLangTaps, "_apply", lambda self, wanted: None)
        runner = make_runner()
        rt = SGLangCapture(SGLangBackendConfig(ring_dir=str(ring_dir), ring_capacity=1 << 22,
                                               selection="hidden-states"))
        rt.attach(runner)
        seen = _serve(rt, runner, steps)
        assert (len(seen[-1]) < len(rt.taps.sites)) if follow else (len(seen[-1]) == len(rt.taps.sites))
        results.append(_records(str(ring_dir)))
    follow, every = results
    assert follow and follow.keys() == every.keys()
    assert {k[1] for k in follow} >= {"resid_pre", "attn_q", "mlp_act", "mlp_in", "resid_final", "logits"}
    for key in follow:
        assert follow[key] == every[key], key


def test_native_site_taps_write_what_the_python_hooks_write(tmp_path, monkeypatch):
    """After the self-check a CPU model's modules call the agent's native tap directly (no Python
    hook frame per module): the same forwards and selection changes through the Python hooks
    (`fire`) write bit-identical records, and firings are still counted (the graph-replay check)."""
    from tensortrace.agent.backends.sglang import taps as taps_mod
    from tensortrace.agent.selection import Selection

    steps = [None, Selection.preset("full"), Selection.preset("attention", layers=frozenset({1})), None]
    results = []
    for native in (True, False):
        ring_dir = tmp_path / ("native" if native else "python")
        if not native:
            monkeypatch.setattr(taps_mod.SGLangTaps, "_native_site_taps", lambda self: False)
        runner = make_runner()
        rt = SGLangCapture(SGLangBackendConfig(ring_dir=str(ring_dir), ring_capacity=1 << 22,
                                               selection="hidden-states"))
        rt.attach(runner)
        if native and rt.agent.capture_path != "native":
            pytest.skip("the native capture path is not built here")
        fired = []
        original = rt.taps.sync

        def sync(original=original, rt=rt, fired=fired):
            fired.append(rt.taps.fired)
            return original()
        monkeypatch.setattr(rt.taps, "sync", sync)
        _serve(rt, runner, steps)
        registered = [s for s in rt.taps.sites.values() if s.handle is not None]
        assert registered
        assert all((s.registered is s.fast) == native for s in registered)
        assert all(b > a for a, b in zip(fired, fired[1:])), fired   # every forward's taps counted
        results.append(_records(str(ring_dir)))
    nat, py = results
    assert nat and nat.keys() == py.keys()
    assert {k[1] for k in nat} >= {"resid_pre", "attn_q", "attn_v", "mlp_act", "mlp_in", "resid_mid", "logits"}
    for key in nat:
        assert nat[key] == py[key], key


def test_an_entry_removed_by_the_self_check_leaves_its_modules_other_entries_working(tmp_path):
    """Layer 1's qkv_proj is too narrow for attn_v (the self-check removes attn_v@1 only); attn_q@1
    and attn_k@1, read by the same torch hook, are still captured, bit-exact. down_proj@1 never
    runs: its only entry goes, and its hook with it."""
    runner = make_runner()
    attn1 = runner.model.model.layers[1].self_attn
    attn1.qkv_proj = torch.nn.Linear(8, 8 + 4)   # q 8 + k 4, no room for v
    outs = []
    attn1.qkv_proj.register_forward_hook(lambda m, a, out: outs.append(out.detach().clone()))
    rt = SGLangCapture(SGLangBackendConfig(ring_dir=str(tmp_path), ring_capacity=1 << 20, selection="full"))
    rt.attach(runner)
    _serve(rt, runner, [None])
    stats = rt.agent.stats()
    reasons = dict(stats.unplaced_taps)
    assert "expected width 4" in reasons["attn_v@1"] and "did not fire" in reasons["mlp_act@1"]
    # its zero-width rows of the check step are not written (no reader accepts them): dropped, counted
    v = stats.by_hook["attn_v"]
    assert stats.tap_errors == 1 and v.dropped_by_reason == {"tap_error": 2} and v.produced == v.written + v.dropped
    assert stats.produced == stats.written + stats.dropped
    assert ("attn_q", 1) in rt.taps.taps and ("attn_k", 1) in rt.taps.taps and ("attn_v", 1) not in rt.taps.taps
    assert ("attn_v", 0) in rt.taps.taps
    qkv_site = rt.taps.sites[("model.layers.1.self_attn.qkv_proj", False)]
    assert sorted(t.hook for t in qkv_site.entries) == ["attn_k", "attn_q"] and qkv_site.handle is not None
    assert ("model.layers.1.mlp.down_proj", True) not in rt.taps.sites
    assert not _taps_on(runner.model.model.layers[1].mlp.down_proj)
    ring = read_rings(str(tmp_path))
    from tensortrace.wire.codec import record_to_tensor

    dec = {(r.hook, r.request_id): record_to_tensor(r) for r in ring.records if r.layer == 1 and r.phase == 2}
    assert ("attn_v", "a") not in dec
    # outs[0]: the prefill (a: rows 0-2, b: 3-4); outs[1]: the decode step (a: row 0, b: row 1)
    assert torch.equal(dec[("attn_q", "a")], outs[1][0:1, 0:8])
    assert torch.equal(dec[("attn_k", "b")], outs[1][1:2, 8:12])


def test_hooks_of_the_cuda_graph_static_set_stay_registered_whatever_the_step_selects(tmp_path):
    """A graph SGLang captures again must still record the static set, so its modules keep their
    hooks; on eager steps those hooks hand the agent only what the step selects. (CPU: the frozen
    static set is set directly, as _record_static leaves it after SGLang's first capture; the
    capture itself is covered on a GPU by test_sglang_cuda_graph_harness.py.)"""
    from tensortrace.agent.selection import Selection

    runner = make_runner()
    rt = SGLangCapture(SGLangBackendConfig(ring_dir=str(tmp_path), ring_capacity=1 << 20,
                                           selection="hidden-states"))
    rt.attach(runner)
    rt.taps.static_keys = {("resid_pre", 0), ("resid_final", -1)}
    static = {"model.layers.0.input_layernorm", "model.norm"}
    seen = _serve(rt, runner, [Selection.preset("mlp", layers=frozenset({1})), Selection(enabled=False)])
    mlp1 = _modules_of(rt, ("mlp_in", "mlp_act", "mlp_out"), layers={1})
    assert mlp1 == {"model.layers.1.post_attention_layernorm", "model.layers.1.mlp"}   # mlp_act@1 failed the check
    assert set(seen[0]) == _modules_of(rt, ("resid_pre", "resid_final")) > static
    assert set(seen[1]) == static | mlp1
    assert set(seen[2]) == static
    ring = read_rings(str(tmp_path))
    last = max(r.step for r in ring.records)
    assert {(r.hook, r.layer) for r in ring.records if r.step == last} == {("mlp_in", 1), ("mlp_out", 1)}


def test_repeat_steps_keep_the_previous_steps_taps_without_syncing_and_write_the_same_records(tmp_path, monkeypatch):
    """A decode step the agent answers as a repeat (begin_step -> True: the previous step's plan
    and selection answers) keeps the plugin's decisions of the previous step: SGLangTaps.sync and
    the agent's selection are not asked. The same forwards, selection changes and control
    documents, with every step synced (begin_step's answer ignored), write the same records."""
    from tensortrace.agent.backends.sglang import taps as taps_mod
    from tensortrace.agent.selection import Selection

    steps = [None, None, None, Selection.preset("full", layers=frozenset({0})), None, None,
             {"version": 1, "selection": {"preset": "hidden-states", "layers": "1"}}, None, None]
    results = []
    for honoured in (True, False):
        ring_dir = tmp_path / ("repeat" if honoured else "synced")
        runner = make_runner()
        rt = SGLangCapture(SGLangBackendConfig(ring_dir=str(ring_dir), ring_capacity=1 << 22,
                                               selection="hidden-states"))
        rt.attach(runner)
        if rt.agent.capture_path != "native":
            pytest.skip("repeat steps are the native path's (the Python path plans every step afresh)")
        if not honoured:   # (the agent's begin_step: the Core's C method, bound on the instance)
            real_begin = rt.agent.begin_step
            rt.agent.begin_step = lambda layout: real_begin(layout) and False
        synced = []
        real_sync = taps_mod.SGLangTaps.sync
        monkeypatch.setattr(taps_mod.SGLangTaps, "sync", lambda self: (synced.append(1), real_sync(self))[1])
        agent = rt.agent
        seen = _serve(rt, runner, steps)
        repeats = agent.stats().repeat_steps
        results.append((_records(str(ring_dir)), seen, len(synced), repeats))
        monkeypatch.undo()
    (rec, seen, synced, repeats), (rec_all, seen_all, synced_all, repeats_all) = results
    # prefill + 9 decode steps; decode steps 0 (a new plan after the prefill), 3 and 6 (new
    # selections) plan afresh, the other six repeat: the plugin syncs on the four fresh plans only
    assert (repeats, repeats_all) == (6, 6)
    assert (synced, synced_all) == (4, 10)
    assert seen == seen_all and rec and rec.keys() == rec_all.keys()
    for key in rec:
        assert rec[key] == rec_all[key], key
    assert {k[1] for k in rec} >= {"resid_pre", "attn_q", "mlp_act", "resid_final", "logits"}


def test_a_fresh_plan_of_the_same_selection_does_not_pass_over_the_modules_again(tmp_path, monkeypatch):
    """Every request arrival or departure makes a fresh plan and a new step_hooks() object; when
    the taps it selects are those already registered, SGLangTaps.sync touches no module (no
    register / unregister call). A selection change still re-registers, and the records are
    those of the model."""
    from tensortrace.agent.backends.sglang import taps as taps_mod
    from tensortrace.agent.selection import Selection

    runner = make_runner()
    rt = SGLangCapture(SGLangBackendConfig(ring_dir=str(tmp_path), ring_capacity=1 << 22, selection="hidden-states"))
    rt.attach(runner)
    calls = []   # (step, register | unregister) after the prefill's self-check
    for name in ("register", "unregister"):
        real = getattr(taps_mod._Site, name)
        monkeypatch.setattr(taps_mod._Site, name, lambda self, *a, _real=real, _name=name:
                            (calls.append((rt.agent.stats().steps, _name)) if rt.taps.selective else None,
                             _real(self, *a))[1])
    a, b = req("a", 3), req("b", 2)
    fb = forward_batch("EXTEND", ["a"], seq_lens=[3], extend_lens=[3], prefix_lens=[0])
    fb.input_ids = torch.tensor([1, 2, 3])
    with torch.no_grad():
        rt.observe_batch(fb, SimpleNamespace(reqs=[a]))
        rt.forward(model_forward, runner, fb)                      # step 1: the self-check, then hidden-states
        after_check = len(calls)
        rt.forward(model_forward, runner, _decode(["a"], [4], [6]))   # 2: a fresh plan (decode after prefill)
        fb = forward_batch("EXTEND", ["b"], seq_lens=[2], extend_lens=[2], prefix_lens=[0])
        fb.input_ids = torch.tensor([4, 5])
        rt.observe_batch(fb, SimpleNamespace(reqs=[b]))
        rt.forward(model_forward, runner, fb)                      # 3: b arrives: a fresh plan
        rt.forward(model_forward, runner, _decode(["a", "b"], [5, 3], [7, 8]))   # 4: the batch grew: fresh
        assert calls[after_check:] == []                           # same selection: no module touched
        rt.agent.set_selection(Selection.preset("attention", layers=frozenset({1})))
        rt.forward(model_forward, runner, _decode(["a", "b"], [6, 4], [9, 10]))  # 5: a new selection
    assert {n for step, n in calls[after_check:]} == {"register", "unregister"}
    assert {step for step, n in calls[after_check:]} == {5}
    assert rt.agent.stats().repeat_steps == 0   # every step here planned afresh
    finish(a, 4), finish(b, 3)
    rt.finish_requests([a, b])
    rt.agent.close()
    ring = read_rings(str(tmp_path))
    got = {(r.request_id, r.hook, r.layer) for r in ring.records}
    assert ("b", "resid_pre", 0) in got and ("a", "attn_q", 1) in got and ("b", "attn_out", 1) in got
    assert ring.summaries["a"].complete and ring.summaries["b"].complete


def _decode(rids, seq_lens, ids):
    dec = forward_batch("DECODE", rids, seq_lens=seq_lens)
    dec.input_ids = torch.tensor(ids)
    return dec


def test_a_batch_of_the_requests_last_observed_is_answered_without_reading_its_requests(runtime, monkeypatch):
    """observe_batch runs before every forward: when the ForwardBatch's request ids are those of the
    last batch it observed, whose requests were all begun, it reads no request; a batch with a new
    request begins it; a batch whose begin failed is read again."""
    rt, runner, ring_dir = runtime
    begun = []
    real_begin = rt.agent.begin_request
    monkeypatch.setattr(rt.agent, "begin_request", lambda rid, **kw: (begun.append(rid), real_begin(rid, **kw))[1])

    class Reqs:   # a ScheduleBatch whose requests are counted when read
        def __init__(self, *reqs):
            self.reads, self._reqs = 0, list(reqs)

        @property
        def reqs(self):
            self.reads += 1
            return self._reqs

    a, b = req("a", 3), req("b", 2)
    one, two = Reqs(a), Reqs(a, b)
    rt.observe_batch(forward_batch("EXTEND", ["a"], seq_lens=[3], extend_lens=[3], prefix_lens=[0]), one)
    for k in range(3):   # decode steps of the same batch
        rt.observe_batch(forward_batch("DECODE", ["a"], seq_lens=[4 + k]), one)
    assert begun == ["a"] and one.reads == 1
    rt.observe_batch(forward_batch("DECODE", ["a", "b"], seq_lens=[7, 3]), two)   # b joins
    rt.observe_batch(forward_batch("DECODE", ["a", "b"], seq_lens=[8, 4]), two)
    assert begun == ["a", "b"] and two.reads == 1
    c = req("c", 2)
    c.origin_input_ids = None   # its begin fails (len(None)): logged, and the batch is read again next time
    three = Reqs(a, b, c)
    for k in range(2):
        rt.observe_batch(forward_batch("DECODE", ["a", "b", "c"], seq_lens=[9 + k, 5 + k, 3 + k]), three)
    assert three.reads == 2 and "c" not in rt._requests


def test_steps_capturing_nothing_in_a_row_do_not_touch_the_registration(tmp_path, monkeypatch):
    """A steady state costs one identity check per step, also when steps capture nothing (every
    empty step_hooks() answer is a new frozenset)."""
    from tensortrace.agent.backends.sglang import taps as taps_mod
    from tensortrace.agent.selection import Selection

    runner = make_runner()
    rt = SGLangCapture(SGLangBackendConfig(ring_dir=str(tmp_path), ring_capacity=1 << 20, selection="hidden-states"))
    rt.attach(runner)
    applied = []
    real_apply = taps_mod.SGLangTaps._apply
    monkeypatch.setattr(taps_mod.SGLangTaps, "_apply", lambda self, wanted: (applied.append(wanted),
                                                                              real_apply(self, wanted)))
    off = Selection(enabled=False)
    seen = _serve(rt, runner, [None, None, off, None, None, Selection.preset("hidden-states"), None])
    assert seen[3] == seen[4] == seen[5] == {} and seen[6] == seen[7] == seen[0] != {}
    # the self-check's, capture switched off, switched on again: three registrations in 8 steps
    hidden = {("resid_pre", 0), ("resid_pre", 1), ("resid_final", -1)}
    assert applied == [hidden, frozenset(), hidden]


def test_forwards_with_no_sampled_request_skip_the_layout_and_leave_no_tap_registered(tmp_path, monkeypatch):
    """Once the last sampled request has ended, forwards of opted-out requests are answered by
    agent.idle_step(): no plan_step, no module tap registered or firing, steps still counted and
    control documents still applied; the next sampled request is captured as before."""
    from tensortrace.agent.backends.sglang import batch_layout, plugin
    from tensortrace.ring.format import RingReader
    from tensortrace.wire.codec import record_to_tensor

    runner = make_runner()
    rt = SGLangCapture(SGLangBackendConfig(ring_dir=str(tmp_path), ring_capacity=1 << 20, selection="hidden-states"))
    rt.attach(runner)
    planned = []   # layouts read: plan_step's, and the steady steps batch_layout.advance_decode answered
    real_plan = plugin.plan_step
    monkeypatch.setattr(plugin, "plan_step", lambda *a, **kw: (planned.append(1), real_plan(*a, **kw))[1])
    real_advance = batch_layout.advance_decode
    if real_advance is not None:
        monkeypatch.setattr(batch_layout, "advance_decode",
                            lambda *a: (lambda got: (got is not None and planned.append(1), got)[1])(real_advance(*a)))
    control = RingReader.open(rt.agent.ring_path)

    def serve(rid, options, decodes, prompt=(1, 2, 3)):
        r = req(rid, len(prompt), options)
        fb = forward_batch("EXTEND", [rid], seq_lens=[len(prompt)], extend_lens=[len(prompt)], prefix_lens=[0])
        fb.input_ids = torch.tensor(prompt)
        rt.observe_batch(fb, SimpleNamespace(reqs=[r]))
        seen = []
        with torch.no_grad():
            rt.forward(model_forward, runner, fb)
            seen.append(_hooked(runner.model))
            for k in range(decodes):
                dec = forward_batch("DECODE", [rid], seq_lens=[len(prompt) + 1 + k])
                dec.input_ids = torch.tensor([5 + k])
                rt.forward(model_forward, runner, dec)
                seen.append(_hooked(runner.model))
        finish(r, decodes + 1)
        rt.finish_requests([r])
        return seen

    seen = serve("a", None, 2)
    assert all(seen) and len(planned) == 3
    steps0, fired0 = rt.agent.stats().steps, rt.taps.fired
    control.write_control({"version": 1, "selection": {"preset": "hidden-states", "layers": "1"}})
    seen = serve("out", {"tensortrace": {"capture": False}}, 3)
    st = rt.agent.stats()
    assert seen == [{}] * 4 and len(planned) == 3 and rt.taps.fired == fired0   # no layout, no tap fired
    assert st.steps == steps0 + 4 and st.idle_steps == 4 and st.control_docs_applied == 1
    seen = serve("b", None, 1, prompt=(1, 2, 3))
    assert all(seen) and len(planned) == 5
    control.close()
    rt.agent.close()
    ring = read_rings(str(tmp_path))
    got = {(r.request_id, r.hook, r.layer) for r in ring.records}
    assert {k for k in got if k[0] == "b"} == {("b", "resid_pre", 1), ("b", "resid_final", -1), ("b", "logits", -1)}
    assert not {k for k in got if k[0] == "out"} and not ring.summaries["out"].sampled
    assert ring.summaries["a"].complete and ring.summaries["b"].complete
    # b's rows are the model's own: the same prompt as a's, so the same final residual
    fin = {r.request_id: record_to_tensor(r) for r in ring.records if r.hook == "resid_final" and r.step in
           {min(x.step for x in ring.records if x.request_id == rid) for rid in ("a", "b")}}
    assert torch.equal(fin["a"], fin["b"])
