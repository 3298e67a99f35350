"""The capture agent core: engine-agnostic selection, attribution, staging, accounting.

A backend (HF, SGLang) places taps on the engine's modules and, around every forward, tells the
agent which rows belong to which request (a StepLayout). The agent decides what is captured,
copies it into the Ring² file (CPU: one copy; CUDA: device staging + async D2H, see staging.py),
counts every drop and writes one summary per request.

CaptureAgent is the agent side of the engine contract (backends/base.py: `AgentPort` lists the
calls a backend may make, who makes them, when and on which thread; docs/agent.md "Engine
contract"):

    agent = CaptureAgent(AgentConfig(ring_dir="/tmp/tt", model_id="tiny"))
    ctx = agent.begin_request("r1", traceparent=None, prompt_tokens=5)
    agent.begin_step(layout)                               # per forward, from the backend
    agent.tap("resid_pre", 0, extract, module, args)       # in a tap: extract(module, args) -> rows
    agent.capture("logits", -1, rows)                      # rows the backend already holds
    agent.end_step()
    agent.end_request("r1", finish_reason="stop", generated_tokens=3)
    agent.close()

Threading: one inference thread calls everything here. The CUDA path adds one background commit
thread that only publishes frames whose copies have completed.

Time: the agent measures what it costs the inference thread (`thread_ns`, `stats().thread_seconds`,
the ring header's producer thread ns) itself. Its entry points time themselves, `tap()` times the
tap's extraction together with the copy, and backend code that runs on the inference thread for
capture's sake (building a StepLayout, request bookkeeping) runs under `with agent.timed():`.
Backends never write `thread_ns`.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import os
import struct
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from tensortrace.agent.config import AgentConfig, OverflowPolicy
from tensortrace.agent.layout import RequestRows, RowDomain, ShiftedRows, StepLayout
from tensortrace.agent.selection import Selection, SelectionError
from tensortrace.agent.stats import LIFE_ENDING_DROPS, TAP_DROPS, AgentStats, Counters, DropReason, HookStats
from tensortrace.ring.format import HEADER_SIZE, FrameKind, RingIdentity, RingWriter, frame_size
from tensortrace.ring.permissions import ensure_agent_ring_dir
from tensortrace.v1 import records_pb2, ring_pb2
from tensortrace.wire import codec

log = logging.getLogger("tensortrace.agent")

_BITS_DTYPE: dict = {}  # element size -> integer torch dtype of that size (filled on first use)
_NP_BITS = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}
_CAPTURE_TIME_TAG = bytes([(9 << 3) | 1])  # RingSlab.capture_time_unix_nano: field 9, fixed64
_STEP_TIME_TAG = bytes([(4 << 3) | 1])     # RingStep.capture_time_unix_nano: field 4, fixed64
_U64 = struct.Struct("<Q")
_memmove = ctypes.memmove
_perf_ns = time.perf_counter_ns
_time_ns = time.time_ns   # capture times; tests pin it (with the native clock) to compare ring bytes
# Tap kinds of CaptureAgent.make_tap (the same numbers as agent/_capture.c's K_*).
TAP_INPUT, TAP_PLAIN_INPUT, TAP_OUTPUT, TAP_FIRST_OUTPUT, TAP_CALL = 0, 1, 2, 3, 4
# hook arguments without kwargs, tensors already [tokens, ...] (SGLang's taps; agent/_capture.c):
# output (element 0 of a tuple/list), output[1] of a tuple else args[0], output[1] of a tuple, args[0]
TAP_ROWS_OUT0, TAP_ROWS_OUT1_OR_IN0, TAP_ROWS_OUT1, TAP_ROWS_IN0 = 6, 7, 8, 9
TAP_ROWS_OUT0_COLS = 10   # TAP_ROWS_OUT0's columns [lo, lo + n): entry (hook, layer, kind, extract, lo, n)
_STEP_FRAME_OK = "ok"   # _step_frame_state once the step's STEP frame is in the ring


@dataclass(frozen=True)
class RequestContext:
    """What begin_request reports back: the trace context the request's records carry."""

    request_id: str
    trace_id: bytes
    span_id: bytes
    sampled: bool

    @property
    def traceparent(self) -> str:
        return codec.format_traceparent(self.trace_id, self.span_id)


@dataclass
class _Request:
    ctx: RequestContext
    options_selection: dict | None
    forced: bool | None
    prompt_tokens: int
    start_ns: int
    captured: int = 0
    dropped: int = 0
    dropped_by_reason: dict[DropReason, int] = field(default_factory=dict)
    bytes_captured: int = 0
    hooks: set = field(default_factory=set)
    dropped_for_life: bool = False
    derived: tuple | None = None  # (global selection, this request's selection)
    prefix: bytes | None = None   # native path: RequestRows fields 1-3 (id, trace, span), serialized once
    prefix_id: str = ""

    def drop(self, reason: DropReason, n: int = 1) -> None:
        self.dropped += n
        self.dropped_by_reason[reason] = self.dropped_by_reason.get(reason, 0) + n


class _PartGroup:
    """The parts one tap produces in one step, shared by every tap with the same selection answer.

    Accounting of written records is deferred to end_step: written_slabs slabs of these parts
    were written, with written_row_bytes bytes per row in total (summed over those slabs).
    """

    __slots__ = ("parts", "requests", "parts_bytes", "src_runs", "nrows", "written_slabs",
                 "written_row_bytes", "hooks", "native", "key", "fields")

    def __init__(self, parts, requests, parts_bytes, src_runs, nrows, fields=None):
        # parts and fields carry the positions of the step that built the group; a repeat step
        # (begin_step) shifts only the native Group's copy and parts_bytes, which both paths write.
        self.parts = parts              # [(index in layout.requests, src_row, count, position)]
        self.requests = requests        # [_Request] aligned with parts
        self.parts_bytes = parts_bytes  # serialized `repeated SlabPart parts = 8`
        self.fields = fields            # [(STEP frame request index, slab row, count, position)]
        self.src_runs = src_runs        # [(src_row, dst_row, count)] merged contiguous copies
        self.nrows = nrows
        self.written_slabs = 0
        self.written_row_bytes = 0
        self.hooks: set = set()
        self.native = None              # its _capture.Group once a native tap writes it

    def account(self) -> None:
        """Fold the records both paths wrote this step into the requests' totals; zero the
        counters (a repeat step reuses the group)."""
        slabs, row_bytes, hooks = self.written_slabs, self.written_row_bytes, self.hooks
        ng = self.native
        if ng is not None and ng.written_slabs:
            slabs += ng.written_slabs
            row_bytes += ng.written_row_bytes
            hooks = hooks | ng.hooks
            ng.clear()
        if not slabs:
            return
        if self.written_slabs:
            self.written_slabs = self.written_row_bytes = 0
            self.hooks = set()
        for (_, _, count, _), req in zip(self.parts, self.requests):
            req.captured += slabs
            req.bytes_captured += row_bytes * count
            req.hooks.update(hooks)


class _ThreadNs:
    """thread_ns of the Python path (the native path keeps it in its Core)."""

    __slots__ = ("thread_ns",)

    def __init__(self):
        self.thread_ns = 0


class _Timed:
    """`with agent.timed():` — the block's wall time on this thread is the agent's (see CaptureAgent.timed).

    On exit `thread_ns` becomes its value at entry plus the block's duration, so entry points and
    taps that time themselves inside the block (begin_step, tap, ...) are counted once, not twice.
    """

    __slots__ = ("_agent", "_t0", "_ns0")

    def __init__(self, agent: "CaptureAgent"):
        self._agent = agent

    def __enter__(self) -> "_Timed":
        self._ns0 = self._agent.thread_ns
        self._t0 = _perf_ns()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._agent.thread_ns = self._ns0 + (_perf_ns() - self._t0)
        return False


class CaptureAgent:
    """The agent side of the engine contract (`backends.base.AgentPort`); docs/agent.md."""

    def __init__(self, config: AgentConfig, selection: Selection | None = None):
        config.validate()
        import torch  # the agent lives in an inference process: torch is there

        self._torch = torch
        _BITS_DTYPE.update({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64})
        self.config = config
        self.selection = selection or Selection()
        # Permissions (docs/operations.md "Ring permissions"): a missing directory is created 2770
        # in the ring group (0700 without one); one this process cannot write is an error that
        # says what it saw and what to set. All of this happens here, once, never on the hot path.
        ensure_agent_ring_dir(config.ring_dir, config.ring_gid)
        # prefault: the ring's memory is allocated and mapped now (a ring that does not fit fails
        # here, not with a SIGBUS mid-step), so the hot path takes no page faults.
        self.writer = RingWriter.create(
            config.ring_path(), config.ring_capacity,
            RingIdentity(model_id=config.model_id, pod=config.pod, node=config.node, pid=os.getpid(),
                         tp_rank=config.tp_rank), prefault=config.prefault_ring,
            mode=config.ring_file_mode, gid=config.ring_gid)
        self.ring_path = self.writer.path
        self._ring_u8 = torch.frombuffer(self.writer.data, dtype=torch.uint8)
        self._ring_np = np.frombuffer(self.writer.data, dtype=np.uint8)
        self._ring_addr = self._ring_np.ctypes.data   # the ring's data area, for memmove
        self._slab_static: dict = {}
        self._step_field = b""
        self._counters = Counters()
        # Time the agent's calls took on the inference thread (ns): what capture costs the model
        # directly, measurable far below the run-to-run noise of throughput (stats.thread_seconds).
        # Written only by the agent (its entry points, tap(), timed()); backends read it at most.
        # Kept by the native Core when the native path is on (its taps add to it without Python).
        self._tns = _ThreadNs()
        self._requests: dict[str, _Request] = {}
        self._sampled_live = 0   # requests begun, sampled and not yet ended (0: no forward captures anything)
        self._arrivals = 0
        self._step = 0
        self._layout: StepLayout | None = None
        # (index in layout.requests, its RequestRows when the plan was made, request, selection);
        # a repeat step keeps its plan's entries: the step's own rows are layout.requests[index]
        self._entries: list[tuple[int, RequestRows, _Request, Selection]] = []
        self._step_open = False
        self._step_frame_state: str | None = None  # None: not yet written; _STEP_FRAME_OK; or a DropReason
        self._frame_request_index: dict[int, int] = {}
        self._groups: dict = {}
        self._wants_cache: dict = {}
        self._wanting: dict = {}
        self._step_hook_names = None
        self._any_dropped_for_life = False
        self._pending_summaries: deque = deque()
        self._disabled_taps: dict[tuple[str, int], str] = {}
        self._logged: set = set()
        self.disabled_reason = ""
        self.unplaced: list[tuple[str, str]] = []
        self._staging = None  # CudaStaging, created on the first CUDA tensor
        self._closed = False
        self._native = None          # _capture.Core: the native fast path (agent/native.py)
        self._native_groups: dict = {}   # group key -> the _PartGroup whose _capture.Group native taps hold
        # Repeat steps (begin_step): a layout advanced from the previous one (StepLayout.advanced)
        # reuses that step's plan when nothing it depends on changed since: _epoch counts those
        # changes (requests begun or ended, selection, disabled taps, requests dropped for life).
        self._epoch = 0
        self._repeat = None          # (epoch, selection) the current plan was made under; None: none
        self._plan_entries: list = []
        self._plan_unknown = 0       # rows of requests never begun in the planned layout (counted per step)
        self._step_items = None      # native STEP frame: the plan's requests, positions of its first step
        self._step_delta = 0         # positions of this step - those of _step_items
        self._add_ns = self._add_ns_py
        self._timer = None   # native: _capture.Timer (timed())
        self._sel_sig = None
        self._native_plans: list = []
        self.capture_path = "python"
        self.native_reason = ""
        self.geometry_reason = "the Python path reads tensors through torch"   # "" once _tensorgeom is used
        self._setup_native()
        if config.device.startswith("cuda"):
            self._staging_for(torch.device(config.device))

    def _setup_native(self) -> None:
        from tensortrace.agent import geometry, native

        mode = self.config.capture_path
        if mode == "python":
            self.native_reason = "AgentConfig.capture_path='python'"
            return
        mod, reason = native.load(required=mode == "native")
        if mod is None:
            if mode == "native":
                raise RuntimeError(f"AgentConfig.capture_path='native' but {reason}")
            self.native_reason = reason
            native.log_fallback(reason)
            return
        core = mod.Core(self._ring_addr - HEADER_SIZE, self.writer.capacity, self.writer, self)
        self._step_model_field = ring_pb2.RingStep(model_id=self.config.model_id).SerializeToString()
        self._step_tp_field = ring_pb2.RingStep(tp_size=self.config.tp_size).SerializeToString()
        core.step_fields(self._step_model_field, self._step_tp_field)
        core.thread_ns = self._tns.thread_ns
        core.clock = None if _time_ns is time.time_ns else _time_ns
        try:   # dynamo's eval-frame callback (None in eager): native taps step aside while it is set
            from torch._C._dynamo.eval_frame import get_eval_frame_callback
        except ImportError:
            get_eval_frame_callback = None
        core.is_compiling = get_eval_frame_callback
        # Taps read a tensor's data pointer, device, shape and strides from one DLPack export
        # (agent/_capture.c rows_view) when torch has it, else from four accessor calls.
        mod.use_dlpack(getattr(self._torch._C, "_to_dlpack", None))
        # A plain dense CPU tensor's geometry is read from its TensorImpl where the module built
        # for this torch is present (agent/geometry.py; docs/agent.md "Tensor geometry without a
        # torch call"); it declines every other tensor, which then takes the DLPack route above.
        cap, self.geometry_reason = geometry.load()
        try:
            mod.use_geometry(cap)
        except (TypeError, ValueError) as e:   # not this interface's capsule: DLPack, and say why
            mod.use_geometry(None)
            cap, self.geometry_reason = None, f"the geometry capsule is not this interface's ({e})"
        if cap is None:
            geometry.log_unused(self.geometry_reason)
        self._native_mod = mod
        self._native = self._tns = core
        self._add_ns = core.add_ns
        self._timer = mod.Timer(core)   # timed(): one reusable block timer, entered and left in C
        core.control_seen = self.writer._last_control_seq
        self.capture_path = "native"
        # The generic taps (SGLang's, and any backend's agent.tap) run natively too.
        self.tap = core.tap
        cls = type(self)
        if core.bind(ShiftedRows, RowDomain.SEQUENCES, cls.begin_step, _identity, cls.idle_step, cls.end_step):
            # A steady step's agent calls are C calls, no Python frame (docs/agent.md, "A steady
            # step's agent calls are C calls"): the Core reads and sets this agent's attributes (its
            # instance dict) as the Python methods do for begin_step's repeat case, idle_step's two
            # common answers and end_step's step of a plan that may repeat, and calls the class's
            # method for every other case. capture(): the Core's step is open exactly while
            # _step_open is True.
            self.begin_step = core.begin_step
            self.idle_step = core.idle_step
            self.end_step = core.end_step
            self.capture = core.capture

    def _add_ns_py(self, t0: int) -> None:
        self._tns.thread_ns += _perf_ns() - t0

    @property
    def native_tap_calls(self) -> int:
        """Calls of this agent's native taps (make_tap) so far; 0 on the Python path. A backend whose
        module calls them directly counts its modules' firings with it."""
        return self._native.tap_calls if self._native is not None else 0

    @property
    def thread_ns(self) -> int:
        """The agent's inference-thread time so far (ns). Backends read it; only the agent writes."""
        return self._tns.thread_ns

    @thread_ns.setter
    def thread_ns(self, value: int) -> None:
        self._tns.thread_ns = value

    def make_tap(self, entries, fallback=None):
        """A torch hook capturing one or more catalog tensors in one call (backends' taps).

        entries: [(hook, layer, kind, extract)], kind one of TAP_INPUT (the module's input
        `hidden_states`), TAP_PLAIN_INPUT (`input`), TAP_OUTPUT, TAP_FIRST_OUTPUT (element 0 of a
        tuple output), each flattened [B, S, ...] -> [B*S, ...], or TAP_CALL (extract(*hook_args)
        returns the rows). `extract(*hook_args)` must return what the kind reads: it is the
        Python path's extractor, and the native path's whenever it hands a tap to the Python path.
        fallback: the hook to run while torch.compile traces (native taps only).
        Returns a native `_capture.Tap` with the native path on, else a Python function."""
        entries = [(h, int(L), int(k), ex, *(int(c) for c in cols)) for h, L, k, ex, *cols in entries]
        if self._native is not None:
            t = self._native_mod.Tap(self._native, entries)
            t.fallback = fallback
            return t
        tap = self.tap
        if len(entries) == 1:
            h, L, _, ex = entries[0][:4]
            return functools.partial(tap, h, L, ex)

        def multi_tap(*args):
            for h, L, _, ex, *_cols in entries:
                tap(h, L, ex, *args)
        return multi_tap

    # -- backend-facing API (the AgentPort of backends/base.py: who calls what, when, where) ---
    def report_placement(self, unplaced: list[tuple[str, str]]) -> None:
        """Called by the backend at attach (again if a start-up self-check removes taps), on the
        thread attaching it: (hook, reason) for every catalog hook it could not place on this model.
        Replaces the previous report. Logged as one warning line, kept in `unplaced` and stats()."""
        self.unplaced = list(unplaced)
        if unplaced:
            log.warning("tensortrace: %d hook(s) cannot be placed on %s: %s", len(unplaced),
                        self.config.model_id or "this model",
                        "; ".join(f"{h}: {r}" for h, r in unplaced))

    @property
    def enabled(self) -> bool:
        return not self.disabled_reason and self.selection.enabled

    def begin_request(self, request_id: str, traceparent: str | None = None, options: dict | None = None,
                      prompt_tokens: int = 0) -> RequestContext:
        """Called by the backend on the inference thread when a request arrives, before the first
        step whose layout names it. Registers the request; returns its trace context (a fresh
        trace id when no traceparent). Times itself.

        `options`: per-request opt-in/out and selection (selection.py). Invalid options raise
        SelectionError (a ValueError) before anything is registered.
        """
        t0 = _perf_ns()
        try:
            return self._begin_request(request_id, traceparent, options, prompt_tokens)
        finally:
            self.thread_ns += _perf_ns() - t0

    def _begin_request(self, request_id, traceparent, options, prompt_tokens) -> RequestContext:
        parsed = codec.parse_traceparent(traceparent)
        if parsed:
            trace_id, span_id = parsed
        else:
            trace_id, span_id = codec.new_trace_id(), _new_span_id()
        if self.disabled_reason:
            return RequestContext(request_id, trace_id, span_id, False)
        if request_id in self._requests:
            raise ValueError(f"request {request_id!r} is already registered")
        sel_options, forced = None, None
        if options:
            self.selection.for_request(options)  # validates; raises SelectionError
            forced = options.get("capture")
            sel_options = {k: v for k, v in options.items() if k != "capture"} or None
        if not self.selection.enabled:
            # Capture is switched off (control document): the request is not tracked at all, so
            # it gets no summary either.
            self._counters.scalars["requests_untracked"] += 1
            return RequestContext(request_id, trace_id, span_id, False)
        arrival = self._arrivals
        self._arrivals += 1
        if forced is not None:
            sampled = forced
        else:
            sampled = self.selection.samples(request_id, arrival)
        ctx = RequestContext(request_id, trace_id, span_id, sampled)
        self._requests[request_id] = _Request(ctx, sel_options, forced, prompt_tokens, _time_ns())
        self._epoch += 1
        self._counters.scalars["requests_begun"] += 1
        self._counters.scalars["requests_sampled"] += int(sampled)
        self._sampled_live += int(sampled)
        return ctx

    def begin_step(self, layout: StepLayout) -> bool:
        """Called by the backend on the inference thread before every forward pass, with the
        step's StepLayout; the forward's taps and the matching end_step() follow. Polls the control
        block (never blocks), retries pending summaries and decides what this step captures.
        True: a repeat step (the previous step's plan and selection answers, step_hooks() the same
        object; see "Repeat steps" in docs/agent.md). Times itself; never raises (an internal
        error disables the agent, not the model)."""
        if self.disabled_reason:
            return False
        t0 = _perf_ns()
        try:
            repeated = self._begin_step(layout)
        except Exception as e:  # noqa: BLE001 - failure isolation: the model must run on
            self._disable_agent(e)
            repeated = False
        self._add_ns(t0)
        return repeated

    def idle_step(self) -> bool:
        """Called by a backend on the inference thread before a forward, ahead of building its
        StepLayout: True when no live request is sampled, so the forward can capture nothing
        whatever its layout. The agent then did what every step must (heartbeat, control poll,
        pending summaries, the step counted, its thread time stored) and the backend runs the
        forward with no begin_step / end_step. False: call begin_step(layout) as usual.

        This makes serving with capture off (or with no sampled request in flight) cost a few µs
        a forward instead of a layout and a plan. Rows of requests never begun are counted in
        unknown_request_rows only on steps that read a layout. Times itself; never raises."""
        if self.disabled_reason or self._closed:
            return True
        if self._sampled_live > 0:
            return False
        t0 = _perf_ns()
        try:
            self._housekeeping()
            if self._repeat is not None:   # the plan ends: its deferred counters are folded
                self._repeat = None
                self._fold_native()
            self._layout = None
            self._counters.scalars["idle_steps"] += 1
        except Exception as e:  # noqa: BLE001
            self._disable_agent(e)
            return True
        self._close_step_time(t0)
        return True

    def _close_step_time(self, t0: int) -> None:
        """The end of a step (end_step, idle_step): thread_ns += now - t0, stored in the ring header
        (the exporter's metric); the native Core's step is closed."""
        if self._native is not None:
            self._native.finish(t0)
        else:
            self.thread_ns += _perf_ns() - t0
            try:
                self.writer.report_thread_ns(self.thread_ns)   # one store: the exporter's metric
            except Exception:  # noqa: BLE001 - a closed ring: nothing to report to
                pass

    def _housekeeping(self) -> None:
        """The part of every step that does not depend on its layout: the heartbeat, the control
        poll, pending summaries, the step number."""
        native = self._native
        if native is None:
            self.writer.heartbeat()
            doc = self.writer.poll_control()
        elif native.heartbeat():   # the heartbeat store and the control block's seq, in C
            doc = self.writer.poll_control()
            native.control_seen = self.writer._last_control_seq
        else:
            doc = None
        if doc is not None:
            self.apply_control(doc)
        if self._pending_summaries:
            self._drain_pending()
        self._step += 1
        self._counters.scalars["steps"] += 1

    def _begin_step(self, layout: StepLayout) -> bool:
        native = self._native
        if native is not None and not self._pending_summaries and not native.heartbeat():
            # _housekeeping's every-step case, inline (no frame for it): heartbeat stored in C, the
            # control block unchanged, no summary pending
            self._step += 1
            self._counters.scalars["steps"] += 1
        else:
            self._housekeeping()   # (a second heartbeat store after the one above: harmless)
        if native is None:
            self._step_field = _step_field(self._step)   # (native: begin() returns it, encoded in C)
        prev = self._layout
        self._layout = layout
        self._step_frame_state = None
        repeat = self._repeat
        if (repeat is not None and layout.shape is not None and prev is not None and layout.shape is prev.shape
                and repeat[0] == self._epoch and repeat[1] is self.selection):
            rows, prev_rows = layout.requests, prev.requests
            if rows.__class__ is ShiftedRows and prev_rows.__class__ is ShiftedRows and rows.base is prev_rows.base:
                delta = rows.delta - prev_rows.delta   # (both views of one built layout: no RequestRows made)
            else:
                delta = rows[0].position_start - prev_rows[0].position_start
            if delta >= 0:
                # A repeat step: the layout was advanced from the previous step's
                # (StepLayout.advanced) while nothing the plan depends on changed (_epoch, the
                # selection): the same entries, selection answers, STEP frame request indices and
                # part groups, every position `delta` further on. The native groups re-encode
                # their parts in C; nothing is rebuilt or read per request or per tap, so a repeat
                # step costs the same at any batch size. (Inline: no frame of its own, every step.)
                scalars = self._counters.scalars
                scalars["repeat_steps"] += 1
                if self._plan_unknown:
                    scalars["unknown_request_rows"] += self._plan_unknown
                # The entries stay the plan's (their RequestRows are its first step's: whoever needs
                # this step's rows reads layout.requests[i], which an advanced layout makes when read).
                entries = self._entries = self._plan_entries
                groups = {}
                one_row_each = layout.total_rows == layout.num_sequences
                for key, group in self._native_groups.items():
                    if one_row_each and key[0] is RowDomain.SEQUENCES:
                        continue   # as in the full path: not reachable by the native taps this step
                    group.parts_bytes = group.native.shift(delta)
                    groups[key] = group
                self._groups = groups
                self._step_open = bool(entries)
                self._step_delta += delta
                # the plan's STEP frame requests, when known: the first native slab writes the frame in C
                self._step_field = native.begin(self._step, layout.total_rows, layout.num_sequences, True,
                                                self._step_items, self._step_delta)
                return True
        self._repeat = None
        self._fold_native()
        self._groups = {}
        entries = []
        unknown = 0
        if self.selection.enabled:
            for i, rows in enumerate(layout.requests):
                req = self._requests.get(rows.request_id)
                if req is None:
                    unknown += 1
                    self._counters.scalars["unknown_request_rows"] += 1
                    self._log_once("unknown_request",
                                   "tensortrace: step %d names request %r that was never begun; rows of "
                                   "requests never begun are not captured (counted in unknown_request_rows)",
                                   self._step, rows.request_id)
                    continue
                if not req.ctx.sampled:
                    continue
                sel = self._selection_of(req)
                if sel.wants_phase(int(rows.phase)):
                    entries.append((i, rows, req, sel))
        self._entries = entries
        self._any_dropped_for_life = any(e[2].dropped_for_life for e in entries)
        # The step's selection answers (which entries want which tap) depend only on the entries'
        # selections: when they are those of the previous step (decode after decode, same batch),
        # the per-tap answers are kept, and the native taps keep theirs too (no Python per tap).
        sel_sig = tuple(e[3] for e in entries)
        same = bool(entries) and not self._any_dropped_for_life and sel_sig == self._sel_sig
        self._sel_sig = sel_sig if not self._any_dropped_for_life else None
        if not same:
            self._wants_cache = {}
            self._step_hook_names = None
            self._wanting = {}
        # The STEP frame lists only the captured requests: requests[k] of the frame = entries[k].
        self._frame_request_index = {i: k for k, (i, _, _, _) in enumerate(entries)}
        self._step_open = bool(entries)
        if self._native is not None:
            if not entries:
                self._step_field = _step_field(self._step)
                self._native.end()
            elif same:
                # the groups the native taps hold, rebuilt in place for this step's rows
                one_row_each = layout.total_rows == layout.num_sequences
                for key, old in self._native_groups.items():
                    if one_row_each and key[0] is RowDomain.SEQUENCES:
                        continue   # unreachable this step: the native taps read such tensors as tokens
                    group = self._groups[key] = self._build_group(*key)
                    ng = old.native
                    ng.reset(group.parts_bytes, group.src_runs, group.nrows, len(group.parts), group.fields)
                    group.native = ng
                    self._native_groups[key] = group
                self._step_field = self._native.begin(self._step, layout.total_rows, layout.num_sequences, True)
            else:
                self._native_groups = {}
                self._step_field = self._native.begin(self._step, layout.total_rows, layout.num_sequences, False)
            self._step_items = None   # the STEP frame's requests, built at its first write
            if entries and not self._any_dropped_for_life and self._staging is None:
                # the next step may repeat this plan (a layout advanced from this one)
                self._repeat = (self._epoch, self.selection)
                self._plan_entries = entries
                self._plan_unknown = unknown
        return False

    def _fold_native(self) -> None:
        """Account what the native groups wrote since their counters were last folded (end_step
        folds them at once unless the step's plan may repeat)."""
        for group in self._native_groups.values():
            group.account()

    @property
    def step_open(self) -> bool:
        """True between begin_step and end_step of a step that captures something."""
        return self._step_open

    def wants(self, hook: str, layer: int = -1) -> bool:
        """Called by backends on the inference thread, between begin_step and end_step (outside a
        step it answers False): True when this step selects (hook, layer) for some request. Cheap
        (cached per step); `tap()` asks it itself."""
        if not self._step_open:
            return False
        key = (hook, layer)
        w = self._wants_cache.get(key)
        if w is None:
            w = self._wants_cache[key] = any(sel.wants(hook, layer) for _, _, _, sel in self._entries)
        return w

    def step_hooks(self) -> frozenset:
        """Called by backends on the inference thread right after begin_step: hook names some
        request of this step selects (empty when the step captures nothing). A backend may keep
        only the taps serving these registered on the model."""
        if not self._step_open:
            return frozenset()
        hooks = self._step_hook_names
        if hooks is None:
            hooks = self._step_hook_names = frozenset().union(*(sel.hooks for _, _, _, sel in self._entries))
        return hooks

    def tap(self, hook: str, layer: int, extract, *args) -> None:
        """The body of every tap. Called by the backend's tap on the inference thread when the
        tapped module fires during the forward pass (between begin_step and end_step). When this
        step selects (hook, layer), runs `extract(*args)` -> the tensor viewed as [rows, *row_shape]
        (None: nothing this time) and captures it. Times extraction and copy; never raises: an
        exception in `extract` or the copy disables only this tap (tap_failed); a disabled tap's
        records are counted tap_disabled without calling `extract` again.

        The hot path: one agent call per tap with `wants` inlined. Backends pass the module hook's
        own arguments through `args` (e.g. `functools.partial(agent.tap, hook, L, extract)` as the
        torch hook), so no closure is built per call.
        """
        if not self._step_open:
            return
        w = self._wants_cache.get((hook, layer))
        if w is None:
            w = self.wants(hook, layer)
        if not w:
            return
        t0 = _perf_ns()
        self._tap_body(hook, layer, extract, args)
        self.thread_ns += _perf_ns() - t0

    def _tap_body(self, hook: str, layer: int, extract, args) -> None:
        """tap() without the wants check and the timer: the Python path, which the native path
        also hands every case it does not take itself (a full ring, a CUDA tensor, an error...)."""
        try:
            if self._disabled_taps and (hook, layer) in self._disabled_taps:
                self._capture(hook, layer, None)   # counted tap_disabled; nothing is extracted
            else:
                rows = extract(*args)
                if rows is not None:
                    self._capture(hook, layer, rows)
        except Exception as e:  # noqa: BLE001 - failure isolation: only this tap is disabled
            self.tap_failed(hook, layer, e)

    def capture(self, hook: str, layer: int, rows) -> None:
        """Called by the backend on the inference thread between begin_step and end_step, for a
        tensor it already holds (SGLang: token ids, logits, CUDA-graph static buffers): capture
        `rows` (a tensor viewed as [rows, *row_shape]; rows = the step's token rows or its sequence
        slots) for every request that selects (hook, layer). Times itself; never raises."""
        if not self._step_open:
            return
        if self._native is not None:
            self._native.capture(hook, layer, rows, _identity)   # times itself
            return
        t0 = _perf_ns()
        try:
            self._capture(hook, layer, rows)
        except Exception as e:  # noqa: BLE001
            self.tap_failed(hook, layer, e)
        self.thread_ns += _perf_ns() - t0

    def capture_static(self, items, rows: int) -> None:
        """Called by the backend on the inference thread after a CUDA-graph replay: the first
        `rows` rows of each static buffer in `items` [(hook, layer, buffer)], as capture() of each,
        in one call (the native path does the per-buffer work without Python). Times itself."""
        if not self._step_open:
            return
        if self._native is not None:
            self._native.capture_static(items, rows, _identity)
            return
        for hook, layer, buf in items:
            self.capture(hook, layer, buf[:rows])

    # -- the native path's questions (agent/_capture.c asks them once per tap per step) -------
    def _native_wants(self, hook: str, layer: int) -> int:
        """W_NO: not selected; W_NATIVE: the native path may write it; W_SLOW: the Python path
        must take every call this step (a disabled tap, or requests dropped for life)."""
        mod = self._native_mod
        if not self.wants(hook, layer):
            return mod.W_NO
        if (self._disabled_taps and (hook, layer) in self._disabled_taps) or self._any_dropped_for_life:
            return mod.W_SLOW
        if self._staging is not None:
            # CUDA staging publishes frames from its commit thread, in order: a frame the native
            # path published directly could overtake them. Every tap takes the Python path.
            return mod.W_SLOW
        return mod.W_NATIVE

    def _native_group(self, hook: str, layer: int, nrows: int):
        """The _capture.Group (hook, layer) writes for a tensor of `nrows` rows this step; None:
        nothing to write; False: the Python path must take this call (no STEP frame yet)."""
        if self._any_dropped_for_life or (self._disabled_taps and (hook, layer) in self._disabled_taps):
            return False
        group = self._group(hook, layer, nrows)
        if group is None:
            return None
        if group.native is None:
            group.native = self._native_mod.Group(group.parts_bytes, group.src_runs, group.nrows, len(group.parts),
                                                  group.fields)
            self._native_groups[group.key] = group
        return group.native

    def _native_step_frame(self) -> bool:
        """Asked by the native path before its first slab of a step: the STEP frame is in the ring
        (written now if need be). False: the Python path takes the slab (counted step_dropped)."""
        if self._step_frame_state is None:
            self._step_frame_state = self._write_step_frame()
        return self._step_frame_state is _STEP_FRAME_OK

    def _native_plan(self, hook: str, layer: int, dtype, row_shape: tuple):
        """The _capture.Plan of (hook, layer, dtype, row shape): the slab's static meta."""
        key = (hook, layer, dtype, row_shape, "native")
        plan = self._slab_static.get(key)
        if plan is None:
            elem = dtype.itemsize
            static = ring_pb2.RingSlab(hook=hook, layer=layer, tp_rank=self.config.tp_rank,
                                       tp_size=self.config.tp_size, dtype=codec.dtype_code(dtype),
                                       row_shape=row_shape).SerializeToString()
            plan = self._slab_static[key] = self._native_mod.Plan(static, hook, math.prod(row_shape) * elem, elem)
            self._native_plans.append(plan)
        return plan

    def timed(self) -> _Timed:
        """`with agent.timed(): ...` — called by backends on the inference thread around their own
        work done there for capture's sake (building the StepLayout, per-request bookkeeping,
        extraction outside `tap()`): its time is added to `thread_ns` / `stats().thread_seconds`.
        Agent calls inside the block are counted once. Never run the model inside it. Blocks nest.
        On the native path it is one reusable object whose __enter__/__exit__ are C (no Python
        frame, no allocation); a backend may keep it and enter it again."""
        timer = self._timer
        return timer if timer is not None else _Timed(self)

    def tap_failed(self, hook: str, layer: int, error: BaseException) -> None:
        """Called by a backend (or by tap()/capture()) on the inference thread when extracting a
        tap's tensor raised: disables that tap, counts its records of this step as dropped
        (tap_error; later steps: tap_disabled), logs once. Never raises."""
        try:
            key = (hook, layer)
            first = key not in self._disabled_taps
            self._disabled_taps[key] = f"{type(error).__name__}: {error}"
            self._counters.scalars["tap_errors"] += 1
            self._epoch += 1
            if self._native is not None:
                self._native.invalidate()
            if first:
                log.error("tensortrace: tap %s@%d failed and is disabled: %r", hook, layer, error)
            if self._step_open:
                group = self._group(hook, layer, None)
                if group is not None:
                    self._drop_group(hook, group, DropReason.TAP_ERROR)
        except Exception as e:  # noqa: BLE001
            self._disable_agent(e)

    def end_step(self) -> None:
        """Called by the backend on the inference thread after every forward pass that had a
        begin_step (also when the forward raised). Accounts the step's records, hands CUDA copies
        to the commit thread, stores thread_ns in the ring header. Times itself; never raises."""
        if self.disabled_reason:
            return
        t0 = _perf_ns()
        try:
            if self._repeat is None:
                for group in self._groups.values():
                    group.account()
            else:
                # A plan the next step may repeat: the native groups' counters keep adding up until
                # the plan ends or a request ends (_fold_native); Python-written slabs are folded now.
                for group in self._groups.values():
                    if group.written_slabs:
                        group.account()
            if self._staging is not None:
                self._staging.end_step()
        except Exception as e:  # noqa: BLE001
            self._disable_agent(e)
        finally:
            self._step_open = False
            self._groups = {}
            self._entries = []
            if self._native is not None:
                self._native.finish(t0)   # (_close_step_time's native case, inline: every step)
            else:
                self._close_step_time(t0)

    def end_request(self, request_id: str, finish_reason: str = "stop", generated_tokens: int = 0,
                    prompt_tokens: int | None = None, incomplete_reason: str = "") -> records_pb2.RequestSummary | None:
        """Called by the backend on the inference thread when a request has ended (finished,
        aborted), after its last step's end_step. Writes its RequestSummary (kept in a bounded
        pending queue when the ring is full, retried every step; counted if even that overflows).
        Returns the summary (None for a request never begun). Times itself; never raises."""
        if self.disabled_reason:
            return None
        t0 = _perf_ns()
        try:
            return self._end_request(request_id, finish_reason, generated_tokens, prompt_tokens, incomplete_reason)
        finally:
            self.thread_ns += _perf_ns() - t0

    def _end_request(self, request_id, finish_reason, generated_tokens, prompt_tokens, incomplete_reason):
        try:
            req = self._requests.pop(request_id, None)
            if req is None:
                return None
            self._sampled_live -= int(req.ctx.sampled)
            self._epoch += 1
            self._fold_native()   # its records of the steps whose accounting was deferred
            self._counters.scalars["requests_ended"] += 1
            if req.dropped_for_life and not incomplete_reason:
                incomplete_reason = "dropped by the drop_request overflow policy"
            elif req.dropped and not incomplete_reason:
                incomplete_reason = "records dropped: " + ", ".join(
                    f"{k}={v}" for k, v in sorted(req.dropped_by_reason.items()))
            if finish_reason == "abort" and not incomplete_reason:
                incomplete_reason = "request aborted"
            s = records_pb2.RequestSummary(
                model_id=self.config.model_id, request_id=request_id, trace_id=req.ctx.trace_id,
                span_id=req.ctx.span_id, records_captured=req.captured, records_dropped=req.dropped,
                bytes_captured=req.bytes_captured, complete=not incomplete_reason,
                incomplete_reason=incomplete_reason,
                prompt_tokens=req.prompt_tokens if prompt_tokens is None else prompt_tokens,
                generated_tokens=generated_tokens, finish_reason=finish_reason,
                hooks=sorted(req.hooks), start_time_unix_nano=req.start_ns,
                end_time_unix_nano=_time_ns(), sampled=req.ctx.sampled,
                producers=self.config.tp_size)
            for k, v in req.dropped_by_reason.items():
                s.dropped_by_reason[k] = v
            meta = s.SerializeToString()
            if self._pending_summaries:
                self._drain_pending()
            if self._pending_summaries or not self._write_summary(meta):
                if len(self._pending_summaries) < self.config.pending_summaries_max:
                    self._pending_summaries.append(meta)
                else:
                    self._counters.scalars["summaries_dropped"] += 1
                    self.writer.count_drop(0)
                    self._log_once("summary_overflow",
                                   "tensortrace: ring full and %d summaries pending; dropping summaries (counted)",
                                   len(self._pending_summaries))
            return s
        except Exception as e:  # noqa: BLE001
            self._disable_agent(e)
            return None

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Write pending summaries and (CUDA) wait for in-flight copies. Blocks up to timeout_s:
        call at shutdown or between batches, not inside a step. True when nothing is left."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self._pending_summaries and not self.disabled_reason:
                self._drain_pending()
            busy = self._staging is not None and not self._staging.idle()
            if not self._pending_summaries and not busy:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.001)

    def close(self, timeout_s: float = 5.0) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.flush(timeout_s)
        finally:
            if self._staging is not None:
                self._staging.close()
                self._staging = None
            self._step_open = False   # no capture after this: the ring is about to be unmapped
            if self._native is not None:
                self._native.close()
            self._ring_addr = 0
            self._ring_u8 = None
            self._ring_np = None
            self.writer.close()

    # -- selection / control -----------------------------------------------------------------
    def set_selection(self, selection: Selection) -> None:
        """Swap the selection; applies from the next step (a step never sees two selections)."""
        selection.validate()
        self.selection = selection
        self._epoch += 1

    def apply_control(self, doc: dict) -> bool:
        """Apply a control document (selection.py documents it). An invalid one is rejected,
        counted and logged; the current selection stays."""
        try:
            sel = Selection.from_doc(doc)
        except SelectionError as e:
            self._counters.scalars["control_docs_rejected"] += 1
            log.warning("tensortrace: control document rejected: %s", e)
            return False
        self.set_selection(sel)
        self._counters.scalars["control_docs_applied"] += 1
        log.info("tensortrace: selection changed by control document: %s", sel.to_doc())
        return True

    def _selection_of(self, req: _Request) -> Selection:
        if req.options_selection is None:
            return self.selection
        if req.derived is None or req.derived[0] is not self.selection:
            sel, _ = self.selection.for_request(req.options_selection)
            req.derived = (self.selection, sel)
        return req.derived[1]

    # -- stats -------------------------------------------------------------------------------
    def stats(self) -> AgentStats:
        s = self._counters.snapshot()
        s.summaries_pending = len(self._pending_summaries)
        s.disabled_taps = {f"{h}@{l}": r for (h, l), r in self._disabled_taps.items()}
        s.agent_disabled = self.disabled_reason
        s.unplaced_taps = list(self.unplaced)
        s.thread_seconds = self.thread_ns / 1e9
        for plan in self._native_plans:   # records the native path wrote (it counts per plan)
            produced, written, nbytes = plan.counts()
            if not produced:
                continue
            h = s.by_hook.get(plan.hook)
            if h is None:
                h = s.by_hook[plan.hook] = HookStats()
            h.produced += produced
            h.written += written
            h.bytes_written += nbytes
            s.produced += produced
            s.written += written
            s.bytes_written += nbytes
        return s

    def request_ids(self) -> list[str]:
        return list(self._requests)

    # -- internals ---------------------------------------------------------------------------
    def _group(self, hook: str, layer: int, nrows: int | None) -> _PartGroup | None:
        """The parts (hook, layer) produces this step for a tensor of `nrows` rows (None: the
        tensor is unknown, as for a failed tap; the part count is the same in either domain).

        Taps whose selection answer is the same (the same requests, the same row domain) share
        one group, so the per-request accounting runs once per group at end_step, not per slab.
        """
        layout = self._layout
        domain = RowDomain.TOKENS if nrows is None else layout.domain_of(nrows)
        if domain is None:
            raise ValueError(f"{hook}@{layer}: tensor has {nrows} rows; step has {layout.total_rows} token "
                             f"rows and {layout.num_sequences} sequences")
        sig = self._wanting.get((hook, layer))
        if sig is None:
            sig = tuple(k for k, e in enumerate(self._entries) if e[3].wants(hook, layer))
            self._wanting[(hook, layer)] = sig
        if self._any_dropped_for_life:
            live = []
            for k in sig:
                req = self._entries[k][2]
                if req.dropped_for_life:
                    # drop_request policy: an earlier overflow stopped this request; count, do not capture.
                    req.drop(DropReason.REQUEST_DROPPED)
                    self._counters.dropped(hook, 1, DropReason.REQUEST_DROPPED)
                else:
                    live.append(k)
            live = tuple(live)
        else:
            live = sig
        if not live:
            return None
        key = (domain, live)
        group = self._groups.get(key)
        if group is not None:
            return group
        group = self._groups[key] = self._build_group(domain, live)
        return group

    def _build_group(self, domain: RowDomain, live: tuple) -> _PartGroup:
        """The parts of the entries `live` (indices into this step's entries) in `domain`."""
        layout = self._layout
        key = (domain, live)
        live = [self._entries[k] for k in live]
        parts, reqs = [], []
        step_rows = layout.requests   # (entries hold the plan's first step's rows)
        for i, _, req, sel in live:
            rows = step_rows[i]
            if domain is RowDomain.SEQUENCES:
                parts.append((i, layout.slot(i), 1, rows.last_position))
            elif sel.positions == "last":
                parts.append((i, rows.row_start + rows.row_count - 1, 1, rows.last_position))
            else:
                parts.append((i, rows.row_start, rows.row_count, rows.position_start))
            reqs.append(req)
        fields = []
        runs: list[list[int]] = []
        dst = 0
        fidx = self._frame_request_index
        for layout_i, src, count, pos in parts:
            idx = fidx.get(layout_i)
            if idx is None:
                self._frame_index(layout_i)   # raises: planned before the STEP frame
            fields.append((idx, dst, count, pos))
            if runs and runs[-1][0] + runs[-1][2] == src:
                runs[-1][2] += count
            else:
                runs.append([src, dst, count])
            dst += count
        if self._native is not None:   # the same bytes, encoded in C (tests compare with protobuf's)
            parts_bytes = self._native_mod.encode_parts(fields)
        else:
            parts_msg = ring_pb2.RingSlab()
            for idx, d, count, pos in fields:
                parts_msg.parts.add(request_index=idx, slab_row_start=d, row_count=count, position_start=pos)
            parts_bytes = parts_msg.SerializeToString()
        group = _PartGroup(parts, reqs, parts_bytes, [tuple(r) for r in runs], dst, fields)
        group.key = key
        return group

    def _frame_index(self, layout_index: int) -> int:
        """Index of layout.requests[layout_index] inside the STEP frame's `requests` (which lists
        only the captured requests)."""
        idx = self._frame_request_index.get(layout_index)
        if idx is None:
            raise RuntimeError("internal: request index requested before the STEP frame was planned")
        return idx

    def _capture(self, hook: str, layer: int, rows) -> None:
        # The hot path: runs once per tap per step between the model's kernels, where every Python
        # line is cache-cold (several times slower than in a loop), so it does as little as it can.
        if self._disabled_taps and (hook, layer) in self._disabled_taps:
            group = self._group(hook, layer, None)
            if group is not None:
                self._drop_group(hook, group, DropReason.TAP_DISABLED)
            return
        group = self._group(hook, layer, rows.shape[0])   # None: no request selects it
        if group is None:
            return
        if self._step_frame_state is not _STEP_FRAME_OK:
            if self._step_frame_state is None:
                self._step_frame_state = self._write_step_frame()
            if self._step_frame_state is not _STEP_FRAME_OK:
                self._drop_group(hook, group, DropReason.STEP_DROPPED)
                self._step_frame_state = None  # try again at the next slab
                return
        dtype = rows.dtype
        shape = rows.shape
        key = (hook, layer, dtype, shape[1:])
        plan = self._slab_static.get(key)
        if plan is None:
            # Fields 2-7 of RingSlab never change for a tap: serialize them once. A protobuf
            # message may list its fields in any order, so the meta is concatenated pieces.
            row_shape = tuple(shape[1:])
            elem = rows.element_size()
            static = ring_pb2.RingSlab(hook=hook, layer=layer, tp_rank=self.config.tp_rank,
                                       tp_size=self.config.tp_size, dtype=codec.dtype_code(dtype),
                                       row_shape=row_shape).SerializeToString()
            plan = self._slab_static[key] = (static, math.prod(row_shape) * elem, row_shape, _NP_BITS[elem],
                                             _BITS_DTYPE[elem], self._counters.by_hook[hook])
        static, row_bytes, row_shape, np_bits, torch_bits, hook_stats = plan
        nbytes = group.nrows * row_bytes
        meta = b"".join((self._step_field, static, _CAPTURE_TIME_TAG, _U64.pack(_time_ns()),
                         group.parts_bytes))
        on_cuda = rows.is_cuda
        if on_cuda:
            staging = self._staging_for(rows.device)
            if not staging.has_room(nbytes):
                self._drop_group(hook, group, DropReason.STAGING_FULL, nbytes)
                return
        writer = self.writer
        mark = writer.mark()
        r = writer.reserve(FrameKind.SLAB, meta, nbytes)
        if r is None:
            r = self._reserve(FrameKind.SLAB, meta, nbytes)   # full: the overflow policy decides
            if r.__class__ is DropReason:
                self._drop_group(hook, group, r, nbytes)
                return
        end, off = r
        try:
            if on_cuda:
                self._staging.stage(rows, group.src_runs, group.nrows, row_shape, off, nbytes, end)
            elif rows.is_cpu and rows.is_contiguous():
                # Raw bytes, memmove from the tensor's memory into the reserved frame: one C call
                # per run instead of building numpy views (a cache-cold torch/numpy call between
                # kernels costs 10+ us). The runs lie inside the tensor: _group checked its rows.
                src_addr = rows.data_ptr()
                dst_addr = self._ring_addr + off
                for src, d, count in group.src_runs:
                    _memmove(dst_addr + d * row_bytes, src_addr + src * row_bytes, count * row_bytes)
                writer.commit(end, nbytes)
            else:
                dst = self._ring_np[off: off + nbytes].view(np_bits).reshape(group.nrows, *row_shape)
                src_bits = rows.detach().view(torch_bits).numpy()
                for src, d, count in group.src_runs:
                    # A raw, single-threaded copy of the bits (numpy, not torch's copy_: torch's
                    # intra-op thread pool stalls for milliseconds on a busy machine).
                    np.copyto(dst[d: d + count], src_bits[src: src + count], casting="no")
                writer.commit(end, nbytes)
        except BaseException:
            writer.rollback(mark)
            raise
        group.written_slabs += 1
        group.written_row_bytes += row_bytes
        group.hooks.add(hook)
        n = len(group.parts)   # produced = written + dropped, per hook (Counters.dropped for the rest)
        hook_stats.produced += n
        hook_stats.written += n
        hook_stats.bytes_written += nbytes

    def _write_step_frame(self) -> str:
        """_STEP_FRAME_OK, or the DropReason the STEP frame could not be written for."""
        if self._native is not None:
            if self._native.step_frame_ok:
                return _STEP_FRAME_OK   # written by the native path this step (a repeat step's first slab)
            # RingStep fields in number order: step, model_id | requests (C) | capture time, tp_size
            items = self._step_items
            if items is None:   # once per plan; its repeat steps shift the positions (_step_delta)
                items = []
                step_rows = self._layout.requests   # (entries hold the plan's first step's rows)
                for i, _, req, _ in self._entries:
                    rows = step_rows[i]
                    prefix = req.prefix
                    if prefix is None or req.prefix_id != rows.request_id:
                        prefix = req.prefix = ring_pb2.RequestRows(
                            request_id=rows.request_id, trace_id=req.ctx.trace_id,
                            span_id=req.ctx.span_id).SerializeToString()
                        req.prefix_id = rows.request_id
                    items.append((prefix, rows.row_start, rows.row_count, rows.position_start, int(rows.phase)))
                self._step_items, self._step_delta = items, 0
            if self._staging is None and self._native.write_step(items, self._step_delta):
                return _STEP_FRAME_OK   # encoded, written and committed in C (no room: the policy below)
            # RingStep.step (field 1) has RingSlab.step's bytes; model_id and tp_size never change
            t = _time_ns()
            meta = b"".join((self._step_field, self._step_model_field,
                             self._native_mod.encode_requests(items, self._step_delta),
                             _STEP_TIME_TAG + _U64.pack(t) if t else b"", self._step_tp_field))
        else:
            msg = ring_pb2.RingStep(step=self._step, model_id=self.config.model_id,
                                    capture_time_unix_nano=_time_ns(), tp_size=self.config.tp_size)
            step_rows = self._layout.requests
            for i, _, req, _ in self._entries:
                rows = step_rows[i]
                msg.requests.add(request_id=rows.request_id, trace_id=req.ctx.trace_id, span_id=req.ctx.span_id,
                                 row_start=rows.row_start, row_count=rows.row_count,
                                 position_start=rows.position_start, phase=int(rows.phase))
            meta = msg.SerializeToString()
        r = self._reserve(FrameKind.STEP, meta, 0)
        if r.__class__ is DropReason:
            return r
        self._publish(r[0], 0)
        return _STEP_FRAME_OK

    def _publish(self, end: int, nbytes: int) -> None:
        if self._staging is not None:
            self._staging.commit_after_copies(end, nbytes)
        else:
            self.writer.commit(end, nbytes)

    def _reserve(self, kind: int, meta: bytes, nbytes: int):
        """(end, payload offset), or the DropReason. Applies the overflow policy."""
        w = self.writer
        r = w.reserve(kind, meta, nbytes)
        if r is not None:
            return r
        if frame_size(len(meta), nbytes) > w.capacity // 2:
            return DropReason.TOO_LARGE
        if self.config.overflow_policy == OverflowPolicy.BLOCK:
            deadline = time.monotonic() + self.config.block_timeout_s
            pause = 0.0001
            while time.monotonic() < deadline:
                time.sleep(pause)
                pause = min(pause * 2, 0.005)
                r = w.reserve(kind, meta, nbytes)
                if r is not None:
                    return r
            return DropReason.BLOCK_TIMEOUT
        return DropReason.RING_FULL

    def _drop_group(self, hook: str, group: _PartGroup, reason: DropReason, nbytes: int = 0) -> None:
        for_life = self.config.overflow_policy == OverflowPolicy.DROP_REQUEST and reason in LIFE_ENDING_DROPS
        for req in group.requests:
            req.drop(reason)
            if for_life:
                req.dropped_for_life = True
                self._any_dropped_for_life = True
        if for_life:
            self._epoch += 1
        if for_life and self._native is not None:
            self._native.invalidate()   # the native taps ask again: the Python path takes them now
        self._counters.dropped(hook, len(group.parts), reason)
        if reason not in TAP_DROPS:
            self.writer.count_drop(nbytes)

    def _write_summary(self, meta: bytes) -> bool:
        r = self.writer.reserve(FrameKind.SUMMARY, meta, 0)
        if r is None:
            return False
        self._publish(r[0], 0)
        self._counters.scalars["summaries_written"] += 1
        return True

    def _drain_pending(self) -> None:
        while self._pending_summaries:
            if not self._write_summary(self._pending_summaries[0]):
                return
            self._pending_summaries.popleft()

    def _staging_for(self, device):
        if self._staging is None:
            from tensortrace.agent.staging import CudaStaging

            self._staging = CudaStaging(self.writer, self._ring_u8, device, self.config)
        return self._staging

    def disable(self, error: BaseException) -> None:
        """Called by a backend, on any thread, when it hit an error it cannot attribute to one tap
        (e.g. a layout it cannot build): stop capturing for good; logged once. The model runs on."""
        self._disable_agent(error)

    def _disable_agent(self, error: BaseException) -> None:
        if not self.disabled_reason:
            self.disabled_reason = f"{type(error).__name__}: {error}"
            log.error("tensortrace: capture agent disabled after an internal error: %r "
                      "(the model keeps running; nothing more is captured)", error, exc_info=error)
        self._step_open = False
        self._epoch += 1
        self._repeat = None
        if self._native is not None:
            self._native.end()

    def _log_once(self, key, msg, *args) -> None:
        if key in self._logged:
            return
        self._logged.add(key)
        log.warning(msg, *args)


def _step_field(step: int) -> bytes:
    """RingSlab.step (field 1, varint) serialized, as protobuf does (tests compare)."""
    out = bytearray(b"\x08")
    while step >= 0x80:
        out.append((step & 0x7F) | 0x80)
        step >>= 7
    out.append(step)
    return bytes(out)


def _identity(rows):
    return rows


def _new_span_id() -> bytes:
    while True:
        b = os.urandom(8)
        if any(b):
            return b
