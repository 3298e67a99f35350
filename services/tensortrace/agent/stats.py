"""Drop accounting: every record the agent selects is either written to the ring or dropped, by reason.

A *record* is one slab part: one request x one tap (hook, layer) x one step — exactly one
TensorRecord the exporter will emit. produced = written + dropped, per hook and per reason.

Drop reasons (DROP_REASONS):
    ring_full       the ring had no room (drop_newest / drop_request policies)
    too_large       one slab would take more than half the ring; it can never be written
    block_timeout   overflow_policy=block waited block_timeout_s and the ring stayed full
    request_dropped drop_request policy: an earlier overflow stopped capture for this request
    staging_full    CUDA path: the device staging ring had no room
    tap_error       the tap raised while capturing (the tap is then disabled)
    tap_disabled    the tap was disabled by an earlier error
    step_dropped    the step's STEP frame could not be written, so its slabs cannot be attributed
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

DROP_REASONS = ("ring_full", "too_large", "block_timeout", "request_dropped", "staging_full",
                "tap_error", "tap_disabled", "step_dropped")


@dataclass
class HookStats:
    produced: int = 0
    written: int = 0
    dropped: int = 0
    dropped_by_reason: dict[str, int] = field(default_factory=dict)
    bytes_written: int = 0


@dataclass
class AgentStats:
    """A snapshot (agent.stats()). Invariant: produced == written + dropped, also per hook."""

    produced: int = 0
    written: int = 0
    dropped: int = 0
    dropped_by_reason: dict[str, int] = field(default_factory=dict)
    by_hook: dict[str, HookStats] = field(default_factory=dict)
    bytes_written: int = 0
    steps: int = 0
    requests_begun: int = 0
    requests_sampled: int = 0
    requests_untracked: int = 0   # begun while capture was switched off: no summary
    unknown_request_spans: int = 0  # layout spans naming a request never begun (not captured)
    requests_ended: int = 0
    summaries_written: int = 0
    summaries_pending: int = 0
    summaries_dropped: int = 0
    tap_errors: int = 0
    disabled_taps: dict[str, str] = field(default_factory=dict)   # "hook@layer" -> error
    agent_disabled: str = ""                                      # the error that disabled the agent
    control_docs_applied: int = 0
    control_docs_rejected: int = 0
    unplaced_taps: list[tuple[str, str]] = field(default_factory=list)
    # inference-thread time spent in the agent and its taps (begin/end step and request, every
    # tap's extract + copy, the backend's per-forward layout): the agent's direct cost to the model
    thread_seconds: float = 0.0


class Counters:
    """The live counters behind AgentStats; only the inference thread (and, on CUDA, nothing else)
    updates them. Written records are counted by the agent's tap path straight into by_hook (it
    caches each hook's HookStats); drops go through dropped()."""

    def __init__(self):
        self.by_hook: dict[str, HookStats] = defaultdict(HookStats)
        self.scalars: dict[str, int] = defaultdict(int)

    def dropped(self, hook: str, records: int, reason: str) -> None:
        if records <= 0:
            return
        h = self.by_hook[hook]
        h.produced += records
        h.dropped += records
        h.dropped_by_reason[reason] = h.dropped_by_reason.get(reason, 0) + records

    def snapshot(self) -> AgentStats:
        s = AgentStats()
        reasons: dict[str, int] = defaultdict(int)
        for name, h in self.by_hook.items():
            s.by_hook[name] = HookStats(h.produced, h.written, h.dropped, dict(h.dropped_by_reason), h.bytes_written)
            s.produced += h.produced
            s.written += h.written
            s.dropped += h.dropped
            s.bytes_written += h.bytes_written
            for r, n in h.dropped_by_reason.items():
                reasons[r] += n
        s.dropped_by_reason = dict(reasons)
        for k, v in self.scalars.items():
            setattr(s, k, v)
        return s
