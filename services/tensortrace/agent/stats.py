"""Drop accounting: every record the agent selects is either written to the ring or dropped, by reason.

A *record* is one slab part: one request x one tap (hook, layer) x one step — exactly one
TensorRecord the exporter will emit. produced = written + dropped, per hook and per reason.

Drop reasons (`DropReason`, a str enum: its members compare equal to, hash like, print and
serialize as their string values, so summaries, JSON and metric labels carry the same strings):
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

import enum
from collections import defaultdict
from dataclasses import dataclass, field


class DropReason(str, enum.Enum):
    """Why a selected record was not written (the keys of every `dropped_by_reason`)."""

    __str__ = str.__str__        # "ring_full", not "DropReason.RING_FULL" (f-strings, metric labels)
    __format__ = str.__format__

    RING_FULL = "ring_full"
    TOO_LARGE = "too_large"
    BLOCK_TIMEOUT = "block_timeout"
    REQUEST_DROPPED = "request_dropped"
    STAGING_FULL = "staging_full"
    TAP_ERROR = "tap_error"
    TAP_DISABLED = "tap_disabled"
    STEP_DROPPED = "step_dropped"


DROP_REASONS = tuple(r.value for r in DropReason)

# Reasons that stop a request for the rest of its life under overflow_policy=drop_request (the ring
# or staging had no room for it), and reasons that are failures of a tap, not of the ring.
LIFE_ENDING_DROPS = frozenset({DropReason.RING_FULL, DropReason.TOO_LARGE, DropReason.STAGING_FULL,
                               DropReason.STEP_DROPPED})
TAP_DROPS = frozenset({DropReason.TAP_ERROR, DropReason.TAP_DISABLED})


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
    idle_steps: int = 0   # of those, forwards with no live sampled request (idle_step: no layout read)
    repeat_steps: int = 0   # of those, steps that reused the previous step's plan (native path; docs/agent.md)
    requests_begun: int = 0
    requests_sampled: int = 0
    requests_untracked: int = 0   # begun while capture was switched off: no summary
    unknown_request_rows: int = 0   # layout RequestRows naming a request never begun (not captured)
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
    # tap's extract + copy) and in the backend's own per-step work run under agent.timed() (the
    # HF and SGLang layouts, the SGLang request bookkeeping): the agent's direct cost to the model
    thread_seconds: float = 0.0


class Counters:
    """The live counters behind AgentStats; only the inference thread (and, on CUDA, nothing else)
    updates them. Written records are counted by the agent's tap path straight into by_hook (it
    caches each hook's HookStats); drops go through dropped()."""

    def __init__(self):
        self.by_hook: dict[str, HookStats] = defaultdict(HookStats)
        self.scalars: dict[str, int] = defaultdict(int)

    def dropped(self, hook: str, records: int, reason: DropReason) -> None:
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
