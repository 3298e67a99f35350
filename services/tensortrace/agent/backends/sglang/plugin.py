"""The SGLang plugin: installs the TensorTrace capture agent inside every SGLang scheduler process.

Enabled by installing `tensortrace[sglang]` next to SGLang (>= 0.5.10): SGLang loads the entry point
`tensortrace = tensortrace.agent.backends.sglang.plugin:install` (group `sglang.srt.plugins`) in
each of its processes before anything is built; `SGLANG_PLUGINS=tensortrace` restricts loading to
it. What `install()` registers with SGLang's HookRegistry (targets: v0_5.HOOK_TARGETS):

main process (TokenizerManager)
    generate_request BEFORE: validate custom_params["tensortrace"] (HTTP 400 on bad options) and
    copy the `traceparent` header into custom_params["traceparent"].
scheduler process (one per TP rank)
    ModelRunner.load_model AFTER: create the agent (ring file per process), place the taps on the
                              model's modules — before any CUDA graph is captured.
    ForwardBatch.init_new AFTER: begin every request of the batch not seen yet (trace context,
                              options, prompt length) — from the ScheduleBatch's `reqs`. The trace
                              context: the caller's traceparent; without one, SGLang's own root
                              request span when it traces (--enable-trace; v0_5.engine_root_span).
    ModelRunner.forward AROUND: StepLayout from the ForwardBatch (batch_layout.plan_step), token ids
                              before, logits after, the module taps in between (only the modules
                              the step selects keep a torch hook: SGLangTaps.sync); see SGLangCapture.
    SchedulerOutputStreamer.stream_output AFTER: end every finished request (its summary).

SGLangCapture is the SGLang backend of the engine contract (backends/base.py): it implements
`Backend` (attach after load_model, detach) and makes the AgentPort calls from these hooks. Its
own work on the scheduler thread — the layout, the request bookkeeping, the graph-mode decisions —
runs under `agent.timed()`, so `agent.stats().thread_seconds` includes it.

Configuration: environment variables (config.py). Without plugins (SGLang <= 0.5.9) use the
`--forward-hooks` fallback in forward_hooks.py.

    install()   # what SGLang calls; a no-op outside SGLang processes it recognises
"""

from __future__ import annotations

import logging
import os
import sys

from tensortrace.agent.backends.base import Backend
from tensortrace.agent.backends.sglang import v0_5
from tensortrace.agent.backends.sglang import batch_layout
from tensortrace.agent.backends.sglang.batch_layout import StepPlan, plan_step
from tensortrace.agent.backends.sglang.config import SGLangBackendConfig
from tensortrace.agent.backends.sglang.request_options import options_of, stamp_request
from tensortrace.agent.backends.sglang.taps import REPLICATED_HOOKS, SGLangTaps

_STEADY = StepPlan(("DECODE", None, ""))   # the plan of a step batch_layout.advance_decode answered (its mode)

log = logging.getLogger("tensortrace.sglang")

_RUNTIME: "SGLangCapture | None" = None
_INSTALLED: set[str] = set()


def _resolve(dotted: str):
    import pkgutil

    return pkgutil.resolve_name(dotted)


def process_role() -> str:
    """'scheduler' / 'detokenizer' / 'dp_controller' when called under that SGLang process entry
    function (load_plugins() runs first thing there), else 'main'. TENSORTRACE_SGLANG_ROLE overrides."""
    forced = os.environ.get("TENSORTRACE_SGLANG_ROLE")
    if forced:
        return forced
    f = sys._getframe(1)
    while f is not None:
        role = v0_5.PROCESS_ENTRY_FUNCTIONS.get(f.f_code.co_name)
        if role:
            return role
        f = f.f_back
    return "main"


def install() -> None:
    """Entry point (group sglang.srt.plugins). Never raises: a broken plugin must not stop serving."""
    try:
        _install(process_role())
    except Exception:  # noqa: BLE001
        log.exception("tensortrace: SGLang plugin failed to install; serving continues without capture")


def _install(role: str) -> None:
    config = SGLangBackendConfig.from_env()
    if config.disabled or role in _INSTALLED:
        return
    config.validate()
    HookRegistry = _resolve(v0_5.HOOK_REGISTRY)
    HookType = _resolve(v0_5.HOOK_TYPE)
    T = v0_5.HOOK_TARGETS
    if role == "main":
        HookRegistry.register(T["tokenizer_generate_request"], _before_generate_request, HookType.BEFORE)
    elif role == "scheduler":
        global _RUNTIME
        _RUNTIME = SGLangCapture(config)
        HookRegistry.register(T["model_runner_load_model"], _after_load_model, HookType.AFTER)
        HookRegistry.register(T["forward_batch_init_new"], _after_init_new, HookType.AFTER)
        HookRegistry.register(T["model_runner_forward"], _around_forward, HookType.AROUND)
        HookRegistry.register(T["stream_output"], _after_stream_output, HookType.AFTER)
    _INSTALLED.add(role)
    log.info("tensortrace: SGLang plugin installed in the %s process (pid %d)", role, os.getpid())


# -- hook functions (thin: all logic lives in SGLangCapture / request_options) ----------------
def _before_generate_request(self, obj, request=None, *args, **kwargs):
    if type(obj).__name__ != v0_5.GENERATE_REQ_INPUT:
        return None  # embeddings / rewards: no generation, nothing to capture per token
    headers = getattr(request, "headers", None)
    traceparent = headers.get("traceparent") if headers is not None else None
    stamp_request(obj, traceparent)  # ValueError -> SGLang answers 400
    return None


def _after_load_model(result, runner, *args, **kwargs):
    if _RUNTIME is not None:
        _RUNTIME.attach(runner)
    return None


def _after_init_new(result, cls, batch=None, *args, **kwargs):
    if _RUNTIME is not None and batch is not None:
        _RUNTIME.observe_batch(result, batch)
    return None


def _around_forward(original, runner, forward_batch, *args, **kwargs):
    rt = _RUNTIME
    if rt is None or not rt.attached_to(runner):
        return original(runner, forward_batch, *args, **kwargs)
    return rt.forward(original, runner, forward_batch, *args, **kwargs)


def _after_stream_output(result, streamer, reqs, *args, **kwargs):
    if _RUNTIME is not None:
        _RUNTIME.finish_requests(reqs)
    return None


class SGLangCapture(Backend):
    """The agent inside one SGLang scheduler process, bound to its (target) ModelRunner: the SGLang
    backend of the engine contract. All its methods run on the scheduler thread that runs the model.

        rt = SGLangCapture(SGLangBackendConfig.from_env())
        rt.attach(model_runner)                  # after load_model: creates the agent, places taps
        rt.observe_batch(forward_batch, batch)   # after ForwardBatch.init_new: begin_request
        out = rt.forward(ModelRunner.forward, model_runner, forward_batch)   # begin_step .. end_step
        rt.finish_requests(reqs)                 # after stream_output: end_request
        rt.detach()                              # taps removed (the agent stays open)
    """

    name = "sglang"

    def __init__(self, config: SGLangBackendConfig, agent=None):
        super().__init__(agent)   # agent None: created at attach, when the TP rank and model are known
        self.config = config
        self.taps: SGLangTaps | None = None
        self._runner = None
        self._runner_id: int | None = None
        self._requests: dict[str, dict] = {}   # rid -> {"prompt": n, "sampled": bool, "missed": str}
        self._batch_rids: dict[int, list[str]] = {}  # id(ForwardBatch) -> rids (SGLang < 0.5.15)
        self._observed: list | None = None   # ForwardBatch.rids of the last batch whose requests were all begun
        self._last_layout = None   # the previous captured forward's layout (plan_step's `previous`)
        self._idle = False         # the previous forward was answered by agent.idle_step()
        self._checked = False
        self._force_eager = False
        self._eager_for = (None, None, False)    # static mode: (wanted, static set, a tap not in the graph)
        self._own_wants = (None, False, False)   # (step_hooks object, token_ids wanted, logits wanted)
        self._kept = (None, (), None)   # (taps, wanted, own wants) of the last step that synced the taps
        self._wrapped_graph_runner: int | None = None
        self._timer = None   # agent.timed(), kept (_block_timer): one object for the plugin's blocks, which never nest
        self._graph_runner_unwrap = None
        self.skipped_steps: dict[str, int] = {}
        self.layout_errors = 0
        self.tp_rank, self.tp_size = 0, 1
        # post-replay capture lists, per set of wanted taps: [(hook, layer, static buffer)] (a
        # buffer is created once, while graphs are captured, and never replaced)
        self._static_items: dict = {}

    # -- attach ----------------------------------------------------------------------------
    def attached_to(self, runner) -> bool:
        return self._runner_id is not None and id(runner) == self._runner_id and self.agent is not None

    def attach(self, runner=None) -> list[tuple[str, str]]:
        """Backend.attach: called by the ModelRunner.load_model AFTER hook with the runner whose model
        was just loaded, on the scheduler thread, before SGLang captures its CUDA graphs. Creates
        the agent (unless one was given), places the taps, reports the unplaced hooks and returns
        them. A draft (speculative) runner, a second runner, or a failure leaves capture off and
        serving on."""
        runner = runner if runner is not None else self._runner
        if runner is None:
            raise TypeError("SGLangCapture.attach needs the ModelRunner (SGLang's load_model hook passes it)")
        if getattr(runner, "is_draft_worker", False) or self._runner_id is not None:
            return list(self.unplaced)  # speculative draft models are not captured; one target runner per process
        try:
            self._attach(runner)
        except Exception:  # noqa: BLE001
            log.exception("tensortrace: could not attach to the SGLang model; serving continues without capture")
            self.agent = None
            self._runner_id = None
            self._runner = None
        return list(self.unplaced)

    def detach(self) -> None:
        """Backend.detach: remove the taps and the graph-runner wrapper; later forwards pass straight
        through. Called between forwards on the scheduler thread; the agent stays open."""
        if self.taps is not None:
            self.taps.remove()
        if self._graph_runner_unwrap is not None:
            self._graph_runner_unwrap()
            self._graph_runner_unwrap = None
        self._wrapped_graph_runner = None
        self._kept = (None, (), None)
        self._checked = False   # taps placed by a later attach get their own self-check
        self._runner_id = None
        self._runner = None

    def _attach(self, runner) -> None:
        from tensortrace.agent.config import AgentConfig
        from tensortrace.agent.core import CaptureAgent
        from tensortrace.agent.selection import Selection

        try:
            p = _resolve(v0_5.PARALLEL_STATE)()
            self.tp_rank, self.tp_size = int(p.tp_rank), int(p.tp_size)
        except Exception:  # noqa: BLE001
            self.tp_rank, self.tp_size = int(getattr(runner, "tp_rank", 0)), int(getattr(runner, "tp_size", 1))
        mc = runner.model_config
        model_id = self.config.model_id or os.path.basename(str(getattr(mc, "model_path", "")).rstrip("/"))
        if self.agent is None:
            self.agent = CaptureAgent(
                AgentConfig(ring_dir=self.config.ring_dir, ring_capacity=self.config.ring_capacity,
                            model_id=model_id, tp_rank=self.tp_rank, tp_size=self.tp_size,
                            overflow_policy=self.config.overflow_policy),
                Selection.from_doc(self.config.selection_doc()))
        hidden = int(getattr(mc, "hidden_size", 0) or mc.hf_config.hidden_size)
        self.taps = SGLangTaps(runner.model, self.agent, hidden_size=hidden, tp_rank=self.tp_rank,
                               tp_size=self.tp_size)
        unplaced = self.taps.place()
        archs = getattr(mc.hf_config, "architectures", None) or ["?"]
        if archs[0] not in v0_5.ARCHITECTURES:
            unplaced.append(("*", f"architecture {archs[0]} is not in the tested list; taps placed by name"))
        self.unplaced = unplaced
        self.agent.report_placement(self.unplaced)
        self._runner_id = id(runner)
        self._runner = runner
        agent = self.agent
        log.info("tensortrace: capturing %s (TP %d/%d) into %s; %d taps placed on %d module hooks, %d unplaced; "
                 "%s tap path, tensor geometry %s",
                 model_id, self.tp_rank, self.tp_size, agent.ring_path, len(self.taps.taps),
                 len(self.taps.sites), len(self.unplaced), getattr(agent, "capture_path", "?"),
                 "from the TensorImpl" if getattr(agent, "geometry_reason", "?") == ""
                 else f"through torch ({getattr(agent, 'geometry_reason', '?')})")

    def _wrap_graph_runner(self, graph_runner) -> None:
        """Make the decode graph runner's can_run_graph answer False while _force_eager is set: that
        step runs eagerly and every tap fires. The runner is built after load_model (graph capture),
        so forward() calls this on the first forward that sees it (and again if SGLang rebuilds it)."""
        can_run = graph_runner.can_run_graph
        own = "can_run_graph" in vars(graph_runner)   # an instance attribute already (not the class's method)
        rt = self

        def can_run_graph(forward_batch, *a, **kw):
            return False if rt._force_eager else can_run(forward_batch, *a, **kw)

        graph_runner.can_run_graph = can_run_graph
        self._wrapped_graph_runner = id(graph_runner)

        def unwrap():
            if vars(graph_runner).get("can_run_graph") is not can_run_graph:
                return   # replaced by someone else since: leave it
            if own:
                graph_runner.can_run_graph = can_run
            else:
                del graph_runner.can_run_graph   # the class's method again
        self._graph_runner_unwrap = unwrap

    # -- requests --------------------------------------------------------------------------
    def observe_batch(self, forward_batch, batch) -> None:
        """Begin every request of a ScheduleBatch the agent has not seen yet (ForwardBatch.init_new
        AFTER hook, before that batch's forward). A batch with the request ids of the last one
        observed (every request begun) is answered by one list comparison. Timed by the agent.
        (One frame: called for every forward, it calls no helper of its own.)"""
        if self.agent is None:
            return
        with self._timer or self._block_timer():
            try:
                rids = getattr(forward_batch, "rids", None)
                if rids is not None and rids == self._observed:
                    return   # the last batch's requests, every one begun (a decode step of the same batch)
                self._observed = None
                reqs = list(getattr(batch, "reqs", None) or ())
                if rids is None:
                    if len(self._batch_rids) >= 64:  # batches built but never forwarded: bounded
                        self._batch_rids.clear()
                    self._batch_rids[id(forward_batch)] = [r.rid for r in reqs]
                for req in reqs:
                    if req.rid in self._requests:
                        continue
                    custom = getattr(getattr(req, "sampling_params", None), v0_5.SAMPLING_PARAMS_CUSTOM, None)
                    options, traceparent = options_of(custom)
                    if not traceparent:
                        # No traceparent from the caller: when SGLang traces the request itself, join its
                        # trace, under its root request span (a caller's traceparent, when present, wins).
                        root = v0_5.engine_root_span(req)
                        if root is not None:
                            traceparent = f"00-{root[0]:032x}-{root[1]:016x}-01"
                    prompt = len(req.origin_input_ids)
                    try:
                        ctx = self.agent.begin_request(req.rid, traceparent=traceparent, options=options,
                                                       prompt_tokens=prompt)
                    except ValueError as e:  # options rejected (normally caught at the HTTP layer)
                        log.warning("tensortrace: request %s: %s; captured with the global selection", req.rid, e)
                        ctx = self.agent.begin_request(req.rid, traceparent=traceparent, prompt_tokens=prompt)
                    self._requests[req.rid] = {"prompt": prompt, "sampled": ctx.sampled, "missed": ""}
                if rids is not None:
                    self._observed = list(rids)   # (a copy: SGLang may reuse its list)
            except Exception:  # noqa: BLE001
                log.exception("tensortrace: observing a batch failed (capture of its requests may be incomplete)")

    def finish_requests(self, reqs) -> None:
        """End every finished request of `reqs` (stream_output AFTER hook, after the forward that
        finished it): its summary. Timed by the agent. (One frame, as observe_batch.)"""
        if self.agent is None:
            return
        with self._timer or self._block_timer():
            for req in reqs or ():
                try:
                    # Req.finished() is `finished_reason is not None` (v0_5.REQ_FINISHED): the field is
                    # read, not the method called (SGLang hands over every request of the batch after
                    # each forward)
                    if req.finished_reason is None or req.rid not in self._requests:
                        continue
                    info = self._requests.pop(req.rid)
                    reason = req.finished_reason.to_json().get("type", "stop") if req.finished_reason else "stop"
                    self.agent.end_request(req.rid, finish_reason=str(reason), generated_tokens=len(req.output_ids),
                                           prompt_tokens=info["prompt"], incomplete_reason=info["missed"])
                except Exception:  # noqa: BLE001
                    log.exception("tensortrace: ending request %s failed", getattr(req, "rid", "?"))

    def _block_timer(self):
        """agent.timed(), kept for the plugin's blocks (observe_batch, forward, finish_requests), which
        never nest: the native path's is one reusable C object, the Python path's one _Timed."""
        timer = self._timer = self.agent.timed()
        return timer

    def _prompt_len(self, rid: str):
        info = self._requests.get(rid)
        return info["prompt"] if info else None

    # -- forward ---------------------------------------------------------------------------
    def forward(self, original, runner, fb, *args, **kwargs):
        """ModelRunner.forward AROUND hook, on the scheduler thread: begin_step(layout) before the
        forward (token ids captured), the module taps during it, logits and end_step after. The
        plugin's own work before and after the forward runs under agent.timed(); the forward never.
        While no live request is sampled, agent.idle_step() answers for the forward and nothing
        else runs (no layout, no taps: none is registered)."""
        agent = self.agent
        if agent.idle_step():
            # No live request is sampled (capture off, or none sampled in flight): this forward
            # captures nothing whatever its layout, which is not read. A few µs instead of a plan.
            if not self._idle:   # the first idle forward: the taps of the last captured step go
                with self._timer or self._block_timer():
                    self._idle = True
                    self._last_layout = None
                    if self.taps is not None:
                        self.taps.sync()   # outside a step: no tap is wanted
            if self._batch_rids:
                self._batch_rids.pop(id(fb), None)
            return original(runner, fb, *args, **kwargs)
        self._idle = False
        timer = self._timer or self._block_timer()   # (native: a C object; entering it runs no Python)
        with timer:
            try:
                rids = self._batch_rids.pop(id(fb), None) if self._batch_rids else None   # (SGLang < 0.5.15)
                prev = self._last_layout
                layout = None
                if prev is not None and rids is None:
                    # the steady decode step (the same batch, one token further): plan_step's answer
                    # in one C call (batch_layout.advance_decode), no Python frame
                    advance = batch_layout.advance_decode
                    if advance is not None:
                        layout = advance(fb, prev)
                if layout is not None:
                    plan = _STEADY
                else:
                    plan = plan_step(fb, self._prompt_len, rids=rids, previous=prev)
                    layout = plan.layout   # (None for a forward that is not captured)
            except Exception as e:  # noqa: BLE001 - a layout we cannot read is not captured, never fatal
                layout = self._unreadable(fb, e)
            else:
                self._last_layout = layout
                if layout is None:
                    self._skipped(fb, plan)
                else:
                    repeated = agent.begin_step(layout)
        if layout is None:
            return original(runner, fb, *args, **kwargs)
        taps = self.taps
        checking = False
        try:
            with timer:
                checking = not self._checked and layout.total_rows > 0
                kept = self._kept
                if repeated and kept[0] is taps and not checking:
                    # A repeat step (begin_step's word): the previous step's selection answers, so
                    # its taps, registrations and own captures. Nothing to sync or ask.
                    wanted, own = kept[1], kept[2]
                else:
                    if checking:
                        taps.begin_check(layout.total_rows)
                    # the taps this step selects (graph-mode decisions; none when it captures nothing),
                    # and only their modules' torch hooks registered (SGLangTaps.sync; after the self-check)
                    wanted = taps.sync()
                    # The plugin's own captures (token ids, logits): asked of the agent only when its
                    # selection answers were reset (a new step_hooks() object, which sync() just read)
                    own = self._own_wants
                    if own[0] is not taps.synced_for:
                        own = self._own_wants = (taps.synced_for,
                                                 agent.wants("token_ids") and self._exports("token_ids"),
                                                 agent.wants("logits") and self._exports("logits"))
                    self._kept = (taps, wanted, own)
                if own[1]:
                    agent.capture("token_ids", -1, fb.input_ids.view(-1, 1))
                mode = self.config.cuda_graph
                if mode == "eager":
                    self._force_eager = bool(wanted)
                elif mode == "static":  # eager only when a wanted tap is not recorded inside the graph
                    eager = self._eager_for   # (the answer of the last `wanted` and static set)
                    if eager[0] is not wanted or eager[1] is not taps.static_keys:
                        eager = self._eager_for = (wanted, taps.static_keys,
                                                   any(not taps.static_ready(k) for k in wanted))
                    self._force_eager = eager[2]
                graph_runner = getattr(runner, "decode_cuda_graph_runner", None)
                if graph_runner is not None and id(graph_runner) != self._wrapped_graph_runner:
                    self._wrap_graph_runner(graph_runner)
                # with no graph runner (the CPU engine) no forward replays a graph: nothing to count
                fired_before = taps.fired if self._wrapped_graph_runner is not None else None
            try:
                out = original(runner, fb, *args, **kwargs)
            finally:
                self._force_eager = False
            with timer:
                if (wanted and fired_before is not None and getattr(out, "can_run_graph", False)
                        and taps.fired == fired_before):
                    self._after_graph_replay(plan.mode, layout, wanted)
                if own[2]:
                    logits = getattr(getattr(out, "logits_output", None), "next_token_logits", None)
                    if logits is not None:
                        agent.capture("logits", -1, logits)
                if checking:
                    self._checked = True
                    failed = taps.end_check(layout.total_rows)
                    if failed:
                        agent.report_placement(self.unplaced + failed)
            return out
        finally:
            if checking and taps.checking:  # the forward raised during the check
                taps.checking = False
            agent.end_step()   # times itself

    def _unreadable(self, fb, e: Exception) -> None:
        """plan_step raised: this forward's layout cannot be read, so it is not captured and its
        requests are marked incomplete. Returns None (no layout)."""
        self._last_layout = None
        self.layout_errors += 1
        if self.layout_errors == 1:
            log.error("tensortrace: cannot read the batch layout (%s); such steps are not captured", e)
        self._mark_missed(getattr(fb, "rids", None), f"a forward's batch layout could not be read: {e}")

    def _skipped(self, fb, plan) -> None:
        """A forward mode that is not captured: counted, its requests marked incomplete (their rows
        were computed but are not captured: their summaries say so)."""
        self.skipped_steps[plan.mode] = self.skipped_steps.get(plan.mode, 0) + 1
        self._mark_missed(getattr(fb, "rids", None), f"{plan.mode} forwards are not captured ({plan.skip_reason})")

    def _mark_missed(self, rids, reason: str) -> None:
        for rid in rids or ():
            info = self._requests.get(rid)
            if info and info["sampled"] and not info["missed"]:
                info["missed"] = reason

    def _exports(self, hook: str) -> bool:
        return self.tp_size == 1 or self.tp_rank == 0 or hook not in REPLICATED_HOOKS

    def _after_graph_replay(self, mode: str, layout, wanted) -> None:
        """The forward replayed a CUDA graph, so no module tap fired. `static`: hand the agent the
        real rows of the buffers the graph wrote; otherwise the rows are not captured and the
        requests say so in their summaries."""
        rids = [rr.request_id for rr in layout.requests]
        if mode == "DECODE" and self.config.cuda_graph == "static" and \
                all(self.taps.static_ready(k) for k in wanted):
            # one agent call for every buffer (native: no Python per buffer; agent.capture_static)
            key = tuple(wanted)
            items = self._static_items.get(key)
            if items is None:
                bufs = self.taps.static_bufs
                items = self._static_items[key] = [(hook, L, bufs[(hook, L)]) for hook, L in wanted]
            self.agent.capture_static(items, layout.total_rows)
            return
        why = ("decode steps replayed under a CUDA graph were not captured (TENSORTRACE_CUDA_GRAPH=skip)"
               if mode == "DECODE" else
               f"{mode} forwards ran under a CUDA graph (piecewise prefill graphs) and were not captured")
        self._mark_missed(rids, why)
