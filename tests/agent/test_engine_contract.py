"""The engine contract (agent/backends/base.py): the backends implement `Backend`, the agent
implements `AgentPort`, and the agent accounts its inference-thread time itself — the backends'
layout and bookkeeping included, the model's own forward excluded."""

from __future__ import annotations

import inspect
import json
import pathlib
import re
import time

import pytest
import torch

from tensortrace.agent import (DROP_REASONS, AgentConfig, CaptureAgent, Phase, RequestRows, Selection,
                               StepLayout)
from tensortrace.agent.backends.base import AgentPort, Backend
from tensortrace.agent.backends.hf import HFBackend
from tensortrace.agent.backends.hf import backend as hf_backend
from tensortrace.agent.backends.sglang.plugin import SGLangCapture
from tensortrace.agent.stats import DropReason
from tensortrace.devstack.ringread import drain
from tensortrace.ring.format import RingReader
from tensortrace.testing.tiny_models import left_padded, make

pytestmark = pytest.mark.unit

BACKENDS_DIR = pathlib.Path(hf_backend.__file__).resolve().parents[1]


def make_agent(ring_dir, selection=None, **cfg):
    cfg.setdefault("ring_capacity", 1 << 20)
    return CaptureAgent(AgentConfig(ring_dir=ring_dir, model_id="m", pod="pod-c", **cfg),
                        selection or Selection(hooks=frozenset({"resid_pre"})))


def test_the_capture_agent_implements_every_agent_port_call(ring_dir):
    agent = make_agent(ring_dir)
    assert isinstance(agent, AgentPort)
    calls = [n for n, v in vars(AgentPort).items() if callable(v) and not n.startswith("_")]
    assert set(calls) >= {"report_placement", "begin_request", "end_request", "begin_step", "step_hooks",
                          "wants", "tap", "capture", "tap_failed", "end_step", "timed", "disable"}
    for name in calls:
        port = inspect.signature(getattr(AgentPort, name))
        impl = inspect.signature(getattr(CaptureAgent, name))
        assert list(port.parameters) == list(impl.parameters), name   # same names, same order
        for p in port.parameters.values():
            assert p.default == impl.parameters[p.name].default, (name, p.name)
        assert getattr(AgentPort, name).__doc__, f"AgentPort.{name} says who calls it, when, where"
    agent.close()


@pytest.mark.parametrize("cls", [HFBackend, SGLangCapture])
def test_both_engine_adapters_implement_the_backend_abc(cls):
    assert issubclass(cls, Backend) and not cls.__abstractmethods__
    for name in ("attach", "detach"):
        assert getattr(Backend, name).__doc__


def test_no_backend_writes_the_agents_thread_time():
    """The agent times its own callbacks: backends use agent.tap / agent.timed(), never thread_ns."""
    offenders = []
    for path in sorted(BACKENDS_DIR.rglob("*.py")):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"thread_ns\s*(\+|-)?=", line):
                offenders.append(f"{path.name}:{i}: {line.strip()}")
    assert not offenders


def test_timed_blocks_count_once_with_the_entry_points_inside_them(ring_dir):
    agent = make_agent(ring_dir)
    agent.begin_request("a")
    layout = StepLayout((RequestRows("a", 0, 3, 0, Phase.PREFILL),), total_rows=3)
    before = agent.thread_ns
    t0 = time.perf_counter_ns()
    with agent.timed():
        time.sleep(0.02)                                   # the backend's own work
        agent.begin_step(layout)                           # times itself, inside the block
        with agent.timed():                                # nested: still once
            agent.capture("resid_pre", 0, torch.ones(3, 4))
        agent.tap("resid_pre", 1, lambda: torch.ones(3, 4))
        agent.end_step()
    wall = time.perf_counter_ns() - t0
    counted = agent.thread_ns - before
    assert 20_000_000 <= counted <= wall
    time.sleep(0.01)                                       # outside any block: not the agent's
    assert agent.thread_ns - before == counted
    agent.end_request("a")
    got = drain(RingReader.open(agent.ring_path))
    assert got.summaries["a"].records_captured == 2
    agent.close()


def test_a_tap_that_raises_disables_only_itself_and_is_counted(ring_dir):
    agent = make_agent(ring_dir)
    agent.begin_request("a")
    layout = StepLayout((RequestRows("a", 0, 2, 0, Phase.PREFILL),), total_rows=2)
    for _ in range(2):
        agent.begin_step(layout)
        agent.tap("resid_pre", 0, lambda: 1 / 0)
        agent.tap("resid_pre", 1, lambda t: t, torch.zeros(2, 4))
        agent.tap("resid_pre", 2, lambda: None)            # nothing this time: neither written nor dropped
        agent.end_step()
    s = agent.end_request("a")
    assert dict(s.dropped_by_reason) == {"tap_error": 1, "tap_disabled": 1} and s.records_captured == 2
    assert "resid_pre@0" in agent.stats().disabled_taps
    agent.close()


def test_drop_reasons_are_str_enums_that_read_as_their_strings(ring_dir):
    assert DROP_REASONS == tuple(r.value for r in DropReason)
    r = DropReason.RING_FULL
    assert r == "ring_full" and f"{r}" == str(r) == "ring_full" and json.dumps({r: r}) == '{"ring_full": "ring_full"}'
    agent = make_agent(ring_dir, ring_capacity=64 << 10)
    agent.begin_request("a")
    layout = StepLayout((RequestRows("a", 0, 64, 0, Phase.PREFILL),), total_rows=64)
    for _ in range(8):                                     # 8 x 16 KiB into a 64 KiB ring: some do not fit
        agent.begin_step(layout)
        agent.capture("resid_pre", 0, torch.ones(64, 64))
        agent.end_step()
    s = agent.end_request("a")
    assert s.records_dropped > 0 and list(s.dropped_by_reason) == ["ring_full"]
    assert type(next(iter(s.dropped_by_reason))) is str   # the summary carries the plain string
    assert s.incomplete_reason == f"records dropped: ring_full={s.records_dropped}"
    agent.close()


def test_hf_thread_time_includes_the_layout_and_excludes_the_model(ring_dir, monkeypatch):
    """HF: the per-forward layout runs under agent.timed(); a slow module of the model does not
    count as the agent's time."""
    model = make("llama")
    agent = make_agent(ring_dir, Selection.preset("hidden-states"), ring_capacity=8 << 20)
    backend = HFBackend(model, agent)
    real_layout = HFBackend._layout
    layouts = []

    def slow_layout(self, batch, args, kwargs):
        layouts.append(1)
        time.sleep(0.01)
        return real_layout(self, batch, args, kwargs)
    monkeypatch.setattr(HFBackend, "_layout", slow_layout)
    slow_model = model.model.layers[1].register_forward_pre_hook(lambda mod, args: time.sleep(0.1))
    ids, mask = left_padded([[5, 6, 7], [8, 9]])
    before = agent.stats().thread_seconds
    backend.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None)
    counted = agent.stats().thread_seconds - before
    slow_model.remove()
    backend.detach()
    forwards = len(layouts)
    assert forwards == 3
    assert forwards * 0.01 <= counted < forwards * 0.1      # layouts in, the model's 0.1 s per forward out
    assert agent.stats().written > 0
    agent.close()
