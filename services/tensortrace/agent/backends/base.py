"""The engine contract: what an engine adapter (a *backend*) implements, and what the capture agent
offers it. Written in the style of vLLM's KVConnectorBase_V1: every call says who makes it, when,
and on which thread. docs/agent.md ("Engine contract") has the same table.

Two sides:

- `Backend` (an ABC): the engine adapter. It places taps on the engine's real modules, tells the
  agent which rows of each forward belong to which request (a StepLayout) and when requests
  begin and end. It holds no capture logic: selection, attribution, staging, accounting and
  summaries live in the agent and are tested once for every backend. Implemented by
  `backends.hf.HFBackend` (Transformers `generate`) and `backends.sglang.plugin.SGLangCapture`
  (one per SGLang scheduler process).
- `AgentPort` (a Protocol): the calls a backend may make on the agent —
  `tensortrace.agent.CaptureAgent` implements it. Nothing else of the agent is for backends.

Threads. The *inference thread* is the thread that runs the model's forward passes (HF: the
thread calling `generate`; SGLang: the scheduler process's thread running `ModelRunner.forward`).
Every AgentPort call except `disable` is made on it; the agent does no locking. The agent's own
CUDA commit thread (staging.py) never calls back into a backend.

Order per process:

    attach()                                   report_placement(unplaced)
    per request:   begin_request(...)  ...   end_request(...)        (after its last end_step)
    per forward:   begin_step(layout) -> [step_hooks()] -> taps: tap(...) / capture(...) -> end_step()
    detach()

Time. The agent accounts for its cost on the inference thread itself (`stats().thread_seconds`,
also published in the ring header): its entry points time themselves, `tap()` times the tap's
extraction together with the copy, and a backend runs its own per-step work for capture
(building the StepLayout, request bookkeeping, extraction outside `tap()`) inside
`with agent.timed():`. A backend never writes `agent.thread_ns`.

>>> class MyEngineBackend(Backend):
...     name = "my-engine"
...     def attach(self):
...         for hook, layer, module in self.modules():      # place taps: one agent call each
...             module.register_forward_hook(functools.partial(self.agent.tap, hook, layer, output_rows))
...         self.agent.report_placement(self.unplaced)
...         return self.unplaced
...     def detach(self): ...
...     def on_forward(self, batch):                        # the engine's forward, wrapped
...         with self.agent.timed():
...             layout = self.layout_of(batch)
...         self.agent.begin_step(layout)
...         try:
...             return self.engine_forward(batch)           # taps fire in here
...         finally:
...             self.agent.end_step()
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Protocol, runtime_checkable

if TYPE_CHECKING:
    from tensortrace.agent.core import RequestContext
    from tensortrace.agent.layout import StepLayout
    from tensortrace.agent.selection import Selection


@runtime_checkable
class AgentPort(Protocol):
    """What the agent offers a backend (implemented by CaptureAgent). Thread: the inference
    thread unless a method says otherwise. None of these raise into the model except where noted."""

    selection: "Selection"      # the global selection in force (read-only for backends; SGLang
    #                             reads it when CUDA graphs are captured, to pick the static taps)
    thread_ns: int              # the agent's inference-thread time so far (read-only for backends)

    # -- attach ------------------------------------------------------------------------------
    def report_placement(self, unplaced: list[tuple[str, str]]) -> None:
        """Called by the backend in `attach()` (and again when a start-up self-check removes taps,
        with the complete list), on the thread attaching it: every catalog hook it cannot place,
        with the reason. Replaces the previous report; logged once; `stats().unplaced_taps`."""

    # -- requests ----------------------------------------------------------------------------
    def begin_request(self, request_id: str, traceparent: str | None = None, options: dict | None = None,
                      prompt_tokens: int = 0) -> "RequestContext":
        """Called by the backend when a request arrives, before the first begin_step whose layout
        names it. Returns the request's trace context (a fresh trace id without a traceparent) and
        whether it is sampled. Raises SelectionError (a ValueError) for invalid `options`, before
        registering anything: the backend may retry without them."""

    def end_request(self, request_id: str, finish_reason: str = "stop", generated_tokens: int = 0,
                    prompt_tokens: int | None = None, incomplete_reason: str = "") -> Any:
        """Called by the backend when a request has ended (finished or aborted), after the
        end_step of its last forward. Writes its RequestSummary; `incomplete_reason` marks rows the
        backend knows were computed but not captured. Returns the summary (None if never begun)."""

    # -- steps -------------------------------------------------------------------------------
    def begin_step(self, layout: "StepLayout") -> bool:
        """Called by the backend before every forward pass it wants captured, with that forward's
        StepLayout (rows -> requests). Polls the exporter's control block; decides what the step
        captures. Must be followed by end_step() after the forward, also when it raised. Returns
        True when the step repeats the previous step's plan (a layout advanced from it, nothing
        changed since): every selection answer — step_hooks() (the same object), wants() — is the
        previous step's, so a backend may keep the decisions it derived from them."""

    def step_hooks(self) -> frozenset:
        """Called by the backend right after begin_step: the hook names some request of this step
        selects (empty: nothing). A backend may keep only the taps serving these registered."""

    def wants(self, hook: str, layer: int = -1) -> bool:
        """Called by the backend during a step: does this step select (hook, layer)? Cheap
        (cached per step). `tap()` asks it itself; a backend asks only to skip its own work."""

    def tap(self, hook: str, layer: int, extract: Callable[..., Any], *args: Any) -> None:
        """Called by the backend's tap when the tapped module fires, during the forward pass
        between begin_step and end_step. If the step selects (hook, layer): rows = extract(*args)
        — the tensor viewed as [rows, *row_shape], rows = the step's token rows (layout.total_rows)
        or its sequence slots (layout.num_sequences); None = nothing this time — and captures it.
        Times extraction and copy; never raises (a failure disables only this tap). The agent
        copies before returning, so in-place kernels after the tap cannot change the capture."""

    def capture(self, hook: str, layer: int, rows: Any) -> None:
        """Called by the backend during a step for a tensor it already holds (not through a module
        tap: SGLang's token ids and logits). Same contract as tap()."""

    def capture_static(self, items: list, rows: int) -> None:
        """Called by the backend after a CUDA-graph replay, during the step: for each
        (hook, layer, static buffer) in `items`, capture(hook, layer, buffer[:rows]) — in one call
        (the native path: no Python per buffer). A static buffer's storage, shape and dtype must not
        change after its first use (the graph that writes it fixes them)."""

    def make_tap(self, entries: list, fallback: Callable[..., Any] | None = None) -> Callable[..., Any]:
        """Called by the backend at attach: the torch hook of a module hook that yields one or more
        catalog tensors, each `(hook, layer, kind, extract)` (kinds: core.TAP_*; `extract(*hook_args)`
        returns the rows, as for tap()). One call per firing for all of them; the native path
        (docs/agent.md "Native fast path") returns a C callable. `fallback`: the hook to run while
        torch.compile traces (a native tap steps aside for it)."""

    def tap_failed(self, hook: str, layer: int, error: BaseException) -> None:
        """Called by the backend when extracting a tap's tensor raised outside tap(): disables that
        tap; its records of this step count as dropped (tap_error, then tap_disabled)."""

    def end_step(self) -> None:
        """Called by the backend after every forward pass that had a begin_step (also when the
        forward raised). Accounts the step, hands CUDA copies to the commit thread."""

    # -- the backend's own time, and failures --------------------------------------------------
    def timed(self) -> ContextManager:
        """`with agent.timed():` around the backend's own per-step / per-request work on the
        inference thread (StepLayout, request bookkeeping): added to thread_seconds. Agent calls
        inside are counted once. Never run the model inside it."""

    def disable(self, error: BaseException) -> None:
        """Called by the backend, on any thread, after an error it cannot attribute to one tap (a
        layout it cannot build): capture stops for good, the model runs on. Logged once."""


class Backend(abc.ABC):
    """The engine adapter's side of the contract (see the module docstring for the call order).

    A backend is built with the agent it reports to (it may also create one lazily, e.g. when the
    model's TP rank is only known at attach: then `agent` is None until `attach`). Taps it places
    call `agent.tap(hook, layer, extract, *hook_args)` — one call per tap, no capture logic of
    their own; an exception from the engine module is never caught, one from `extract` never
    reaches the model.
    """

    name: str = "backend"

    def __init__(self, agent: AgentPort | None):
        self.agent = agent
        self.unplaced: list[tuple[str, str]] = []

    @abc.abstractmethod
    def attach(self) -> list[tuple[str, str]]:
        """Place the taps; report (agent.report_placement) and return the hooks that could not be
        placed, as (hook, reason).

        Called once by whoever builds the backend — user code (HFBackend's constructor calls it),
        the SGLang plugin right after ModelRunner.load_model — on the thread that owns the model,
        before the first forward to capture and before any CUDA graph is captured (taps placed later
        never fire inside graph replays). Calling it again on an attached backend does nothing.
        """

    @abc.abstractmethod
    def detach(self) -> None:
        """Remove every tap and layout hook: the model is exactly as before attach.

        Called by user code / the engine's shutdown, on the thread that owns the model, between
        forwards (never inside a step). The agent itself stays open: close it separately.
        """
