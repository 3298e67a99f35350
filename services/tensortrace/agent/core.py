"""The capture agent core: engine-agnostic selection, attribution, staging, accounting.

A backend (HF, SGLang) places taps on the engine's modules and, around every forward, tells the
agent which rows belong to which request (a StepLayout). The agent decides what is captured,
copies it into the Ring² file (CPU: one copy; CUDA: device staging + async D2H, see staging.py),
counts every drop and writes one summary per request.

>>> agent = CaptureAgent(AgentConfig(ring_dir="/tmp/tt", model_id="tiny"))
>>> ctx = agent.begin_request("r1", traceparent=None, prompt_tokens=5)
>>> agent.begin_step(layout)               # per forward, from the backend
>>> agent.capture("resid_pre", 0, rows)    # in a tap: rows = tensor viewed as [rows, *row_shape]
>>> agent.end_step()
>>> agent.end_request("r1", finish_reason="stop", generated_tokens=3)
>>> agent.close()

Threading: one inference thread calls everything here. The CUDA path adds one background commit
thread that only publishes frames whose copies have completed.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import struct
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from tensortrace.agent.config import AgentConfig
from tensortrace.agent.layout import RequestRows, RowDomain, StepLayout
from tensortrace.agent.selection import Selection, SelectionError
from tensortrace.agent.stats import AgentStats, Counters
from tensortrace.ring.format import FrameKind, RingIdentity, RingWriter, frame_size
from tensortrace.v1 import records_pb2, ring_pb2
from tensortrace.wire import codec

log = logging.getLogger("tensortrace.agent")

_BITS_DTYPE: dict = {}  # element size -> integer torch dtype of that size (filled on first use)
_NP_BITS = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}
_CAPTURE_TIME_TAG = bytes([(9 << 3) | 1])  # RingSlab.capture_time_unix_nano: field 9, fixed64
_U64 = struct.Struct("<Q")
_memmove = ctypes.memmove


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
    dropped_by_reason: dict[str, int] = field(default_factory=dict)
    bytes_captured: int = 0
    hooks: set = field(default_factory=set)
    dropped_for_life: bool = False
    derived: tuple | None = None  # (global selection, this request's selection)

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped += n
        self.dropped_by_reason[reason] = self.dropped_by_reason.get(reason, 0) + n


class _PartGroup:
    """The parts one tap produces in one step, shared by every tap with the same selection answer.

    Accounting of written records is deferred to end_step: written_slabs slabs of these parts
    were written, with written_row_bytes bytes per row in total (summed over those slabs).
    """

    __slots__ = ("parts", "requests", "parts_bytes", "src_runs", "nrows", "written_slabs",
                 "written_row_bytes", "hooks")

    def __init__(self, parts, requests, parts_bytes, src_runs, nrows):
        self.parts = parts              # [(span_index_in_step_frame, src_row, count, position)]
        self.requests = requests        # [_Request] aligned with parts
        self.parts_bytes = parts_bytes  # serialized `repeated SlabPart parts = 8`
        self.src_runs = src_runs        # [(src_row, dst_row, count)] merged contiguous copies
        self.nrows = nrows
        self.written_slabs = 0
        self.written_row_bytes = 0
        self.hooks: set = set()


class CaptureAgent:
    def __init__(self, config: AgentConfig, selection: Selection | None = None):
        config.validate()
        import torch  # the agent lives in an inference process: torch is there

        self._torch = torch
        _BITS_DTYPE.update({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64})
        self.config = config
        self.selection = selection or Selection()
        os.makedirs(config.ring_dir, mode=0o700, exist_ok=True)
        # prefault: the ring's memory is allocated and mapped now (a ring that does not fit fails
        # here, not with a SIGBUS mid-step), so the hot path takes no page faults.
        self.writer = RingWriter.create(
            config.ring_path(), config.ring_capacity,
            RingIdentity(model_id=config.model_id, pod=config.pod, node=config.node, pid=os.getpid(),
                         tp_rank=config.tp_rank), prefault=config.prefault_ring)
        self.ring_path = self.writer.path
        self._ring_u8 = torch.frombuffer(self.writer.data, dtype=torch.uint8)
        self._ring_np = np.frombuffer(self.writer.data, dtype=np.uint8)
        self._ring_addr = self._ring_np.ctypes.data   # the ring's data area, for memmove
        self._slab_static: dict = {}
        self._step_field = b""
        self._counters = Counters()
        # Time the agent's calls took on the inference thread (ns): what capture costs the model
        # directly, measurable far below the run-to-run noise of throughput (stats.thread_seconds).
        self.thread_ns = 0
        self._requests: dict[str, _Request] = {}
        self._arrivals = 0
        self._step = 0
        self._layout: StepLayout | None = None
        self._entries: list[tuple[int, RequestRows, _Request, Selection]] = []
        self._step_open = False
        self._step_frame_state: str | None = None  # None: not yet written; "ok"; or a drop reason
        self._step_span_index: dict[int, int] = {}
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
        if config.device.startswith("cuda"):
            self._staging_for(torch.device(config.device))

    # -- backend-facing API -------------------------------------------------------------------
    def report_placement(self, unplaced: list[tuple[str, str]]) -> None:
        """Backends call this once at attach: (hook, reason) for every catalog hook it could not
        place on this model. Logged as one warning line, kept in `unplaced` and stats()."""
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
        """Register a request; returns its trace context (a fresh trace id when no traceparent).

        `options`: per-request opt-in/out and selection (selection.py). Invalid options raise
        SelectionError before anything is registered.
        """
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
        self._requests[request_id] = _Request(ctx, sel_options, forced, prompt_tokens, time.time_ns())
        self._counters.scalars["requests_begun"] += 1
        self._counters.scalars["requests_sampled"] += int(sampled)
        return ctx

    def begin_step(self, layout: StepLayout) -> None:
        """Start a forward step. Polls the control block (never blocks) and retries pending summaries."""
        if self.disabled_reason:
            return
        t0 = time.perf_counter_ns()
        try:
            self._begin_step(layout)
        except Exception as e:  # noqa: BLE001 - failure isolation: the model must run on
            self._disable_agent(e)
        self.thread_ns += time.perf_counter_ns() - t0

    def _begin_step(self, layout: StepLayout) -> None:
        self.writer.heartbeat()
        doc = self.writer.poll_control()
        if doc is not None:
            self.apply_control(doc)
        if self._pending_summaries:
            self._drain_pending()
        self._step += 1
        self._step_field = ring_pb2.RingSlab(step=self._step).SerializeToString()
        self._counters.scalars["steps"] += 1
        self._layout = layout
        self._groups = {}
        self._wants_cache = {}
        self._step_frame_state = None
        entries = []
        if self.selection.enabled:
            for i, span in enumerate(layout.spans):
                req = self._requests.get(span.request_id)
                if req is None:
                    self._counters.scalars["unknown_request_spans"] += 1
                    self._log_once("unknown_request",
                                   "tensortrace: step %d names request %r that was never begun; rows of "
                                   "requests never begun are not captured (counted in unknown_request_spans)",
                                   self._step, span.request_id)
                    continue
                if not req.ctx.sampled:
                    continue
                sel = self._selection_of(req)
                if sel.wants_phase(int(span.phase)):
                    entries.append((i, span, req, sel))
        self._entries = entries
        self._any_dropped_for_life = any(e[2].dropped_for_life for e in entries)
        self._step_hook_names = None
        self._wanting = {}
        # The STEP frame lists only the captured requests: span k of the frame = entries[k].
        self._step_span_index = {i: k for k, (i, _, _, _) in enumerate(entries)}
        self._step_open = bool(entries)

    def wants(self, hook: str, layer: int = -1) -> bool:
        """True when this step selects (hook, layer) for some request: taps call it first and do
        no work otherwise."""
        if not self._step_open:
            return False
        key = (hook, layer)
        w = self._wants_cache.get(key)
        if w is None:
            w = any(sel.wants(hook, layer) for _, _, _, sel in self._entries)
            self._wants_cache[key] = w
        return w

    def step_hooks(self) -> frozenset:
        """Hook names some request of this step selects (empty when the step captures nothing):
        backends register only the taps serving these."""
        if not self._step_open:
            return frozenset()
        hooks = self._step_hook_names
        if hooks is None:
            hooks = self._step_hook_names = frozenset().union(*(sel.hooks for _, _, _, sel in self._entries))
        return hooks

    def capture(self, hook: str, layer: int, rows) -> None:
        """Capture `rows` (a tensor viewed as [rows, *row_shape]; rows = the step's token rows or
        its sequence slots) for every request that selects it. Never raises."""
        if not self._step_open:
            return
        t0 = time.perf_counter_ns()
        try:
            self._capture(hook, layer, rows)
        except Exception as e:  # noqa: BLE001
            self.tap_failed(hook, layer, e)
        self.thread_ns += time.perf_counter_ns() - t0

    def tap_failed(self, hook: str, layer: int, error: BaseException) -> None:
        """A tap raised: disable it, count its records of this step as dropped, log once."""
        try:
            key = (hook, layer)
            first = key not in self._disabled_taps
            self._disabled_taps[key] = f"{type(error).__name__}: {error}"
            self._counters.scalars["tap_errors"] += 1
            if first:
                log.error("tensortrace: tap %s@%d failed and is disabled: %r", hook, layer, error)
            if self._step_open:
                group = self._group(hook, layer, None)
                if group is not None:
                    self._drop_group(hook, group, "tap_error")
        except Exception as e:  # noqa: BLE001
            self._disable_agent(e)

    def end_step(self) -> None:
        if self.disabled_reason:
            return
        t0 = time.perf_counter_ns()
        try:
            for group in self._groups.values():
                if not group.written_slabs:
                    continue
                for (_, _, count, _), req in zip(group.parts, group.requests):
                    req.captured += group.written_slabs
                    req.bytes_captured += group.written_row_bytes * count
                    req.hooks.update(group.hooks)
            if self._staging is not None:
                self._staging.end_step()
        except Exception as e:  # noqa: BLE001
            self._disable_agent(e)
        finally:
            self._step_open = False
            self._groups = {}
            self._entries = []
            self.thread_ns += time.perf_counter_ns() - t0
            try:
                self.writer.report_thread_ns(self.thread_ns)   # one store: the exporter's metric
            except Exception:  # noqa: BLE001 - a closed ring: nothing to report to
                pass

    def end_request(self, request_id: str, finish_reason: str = "stop", generated_tokens: int = 0,
                    prompt_tokens: int | None = None, incomplete_reason: str = "") -> records_pb2.RequestSummary | None:
        """Finish a request: write its RequestSummary (kept in a bounded pending queue when the ring
        is full, retried every step; counted if even that overflows). Returns the summary."""
        if self.disabled_reason:
            return None
        t0 = time.perf_counter_ns()
        try:
            return self._end_request(request_id, finish_reason, generated_tokens, prompt_tokens, incomplete_reason)
        finally:
            self.thread_ns += time.perf_counter_ns() - t0

    def _end_request(self, request_id, finish_reason, generated_tokens, prompt_tokens, incomplete_reason):
        try:
            req = self._requests.pop(request_id, None)
            if req is None:
                return None
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
                end_time_unix_nano=time.time_ns(), sampled=req.ctx.sampled)
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
            self._ring_addr = 0
            self._ring_u8 = None
            self._ring_np = None
            self.writer.close()

    # -- selection / control -----------------------------------------------------------------
    def set_selection(self, selection: Selection) -> None:
        """Swap the selection; applies from the next step (a step never sees two selections)."""
        selection.validate()
        self.selection = selection

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
                    req.drop("request_dropped")
                    self._counters.dropped(hook, 1, "request_dropped")
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
        live = [self._entries[k] for k in live]
        parts, reqs = [], []
        for i, span, req, sel in live:
            if domain is RowDomain.SEQUENCES:
                parts.append((i, layout.slot(i), 1, span.last_position))
            elif sel.positions == "last":
                parts.append((i, span.row_start + span.row_count - 1, 1, span.last_position))
            else:
                parts.append((i, span.row_start, span.row_count, span.position_start))
            reqs.append(req)
        parts_msg = ring_pb2.RingSlab()
        runs: list[list[int]] = []
        dst = 0
        for span_i, src, count, pos in parts:
            parts_msg.parts.add(span_index=self._step_span(span_i), slab_row_start=dst, row_count=count,
                                position_start=pos)
            if runs and runs[-1][0] + runs[-1][2] == src:
                runs[-1][2] += count
            else:
                runs.append([src, dst, count])
            dst += count
        group = _PartGroup(parts, reqs, parts_msg.SerializeToString(), [tuple(r) for r in runs], dst)
        self._groups[key] = group
        return group

    def _step_span(self, layout_index: int) -> int:
        """Index of a layout span inside the STEP frame (which lists only captured requests)."""
        idx = self._step_span_index.get(layout_index)
        if idx is None:
            raise RuntimeError("internal: span index requested before the STEP frame was planned")
        return idx

    def _capture(self, hook: str, layer: int, rows) -> None:
        # The hot path: runs once per tap per step between the model's kernels, where every Python
        # line is cache-cold (several times slower than in a loop), so it does as little as it can.
        if self._disabled_taps and (hook, layer) in self._disabled_taps:
            group = self._group(hook, layer, None)
            if group is not None:
                self._drop_group(hook, group, "tap_disabled")
            return
        group = self._group(hook, layer, rows.shape[0])   # None: no request selects it
        if group is None:
            return
        if self._step_frame_state != "ok":
            if self._step_frame_state is None:
                self._step_frame_state = self._write_step_frame()
            if self._step_frame_state != "ok":
                self._drop_group(hook, group, "step_dropped")
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
        meta = b"".join((self._step_field, static, _CAPTURE_TIME_TAG, _U64.pack(time.time_ns()),
                         group.parts_bytes))
        on_cuda = rows.is_cuda
        if on_cuda:
            staging = self._staging_for(rows.device)
            if not staging.has_room(nbytes):
                self._drop_group(hook, group, "staging_full", nbytes)
                return
        writer = self.writer
        mark = writer.mark()
        r = writer.reserve(FrameKind.SLAB, meta, nbytes)
        if r is None:
            r = self._reserve(FrameKind.SLAB, meta, nbytes)   # full: the overflow policy decides
            if r.__class__ is str:
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
        msg = ring_pb2.RingStep(step=self._step, model_id=self.config.model_id,
                                capture_time_unix_nano=time.time_ns(), tp_size=self.config.tp_size)
        for _, span, req, _ in self._entries:
            msg.spans.add(request_id=span.request_id, trace_id=req.ctx.trace_id, span_id=req.ctx.span_id,
                          row_start=span.row_start, row_count=span.row_count,
                          position_start=span.position_start, phase=int(span.phase))
        r = self._reserve(FrameKind.STEP, msg.SerializeToString(), 0)
        if isinstance(r, str):
            return r
        self._publish(r[0], 0)
        return "ok"

    def _publish(self, end: int, nbytes: int) -> None:
        if self._staging is not None:
            self._staging.commit_after_copies(end, nbytes)
        else:
            self.writer.commit(end, nbytes)

    def _reserve(self, kind: int, meta: bytes, nbytes: int):
        """(end, payload offset), or the drop reason. Applies the overflow policy."""
        w = self.writer
        r = w.reserve(kind, meta, nbytes)
        if r is not None:
            return r
        if frame_size(len(meta), nbytes) > w.capacity // 2:
            return "too_large"
        if self.config.overflow_policy == "block":
            deadline = time.monotonic() + self.config.block_timeout_s
            pause = 0.0001
            while time.monotonic() < deadline:
                time.sleep(pause)
                pause = min(pause * 2, 0.005)
                r = w.reserve(kind, meta, nbytes)
                if r is not None:
                    return r
            return "block_timeout"
        return "ring_full"

    def _drop_group(self, hook: str, group: _PartGroup, reason: str, nbytes: int = 0) -> None:
        for req in group.requests:
            req.drop(reason)
            if self.config.overflow_policy == "drop_request" and reason in ("ring_full", "too_large", "staging_full",
                                                                            "step_dropped"):
                req.dropped_for_life = True
                self._any_dropped_for_life = True
        self._counters.dropped(hook, len(group.parts), reason)
        if reason not in ("tap_error", "tap_disabled"):
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
        """Stop capturing for good (a backend hit an error it cannot attribute); logged once."""
        self._disable_agent(error)

    def _disable_agent(self, error: BaseException) -> None:
        if not self.disabled_reason:
            self.disabled_reason = f"{type(error).__name__}: {error}"
            log.error("tensortrace: capture agent disabled after an internal error: %r "
                      "(the model keeps running; nothing more is captured)", error, exc_info=error)
        self._step_open = False

    def _log_once(self, key, msg, *args) -> None:
        if key in self._logged:
            return
        self._logged.add(key)
        log.warning(msg, *args)


def _new_span_id() -> bytes:
    while True:
        b = os.urandom(8)
        if any(b):
            return b
