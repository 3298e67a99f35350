"""The backend interface: what an engine adapter gives the agent core, and nothing more.

A backend
  1. places taps on the engine's modules; each tap, when it fires, asks `agent.wants(hook, layer)`
     and if so calls `agent.capture(hook, layer, rows)` with the tensor viewed as
     [rows, *row_shape] (token rows of the step, or one row per sequence slot); an exception while
     extracting the tensor goes to `agent.tap_failed(hook, layer, error)`, never to the model;
  2. reports at attach every catalog hook it cannot place: `agent.report_placement([(hook, reason)])`;
  3. around every forward calls `agent.begin_step(StepLayout)` / `agent.end_step()`;
  4. calls `agent.begin_request(request_id, traceparent, options, prompt_tokens)` when a request
     arrives and `agent.end_request(request_id, finish_reason, generated_tokens)` when it ends.

>>> class MyEngineBackend(Backend):
...     def attach(self): ...; self.agent.report_placement(unplaced)
...     def detach(self): ...
"""

from __future__ import annotations

import abc
import time


class Backend(abc.ABC):
    name: str = "backend"

    def __init__(self, agent):
        self.agent = agent

    @abc.abstractmethod
    def attach(self) -> list[tuple[str, str]]:
        """Place the taps; return (and report to the agent) the hooks that could not be placed."""

    @abc.abstractmethod
    def detach(self) -> None:
        """Remove every tap; the model is exactly as before attach."""


def guarded_tap(agent, hook: str, layer: int, extract):
    """Run `extract()` -> rows tensor and capture it; any error disables only this tap.

    The common body of every tap: cheap when (hook, layer) is not selected this step.
    """
    if not agent.wants(hook, layer):
        return
    t0 = time.perf_counter_ns()
    try:
        rows = extract()
    except Exception as e:  # noqa: BLE001 - failure isolation
        agent.tap_failed(hook, layer, e)
        return
    finally:
        agent.thread_ns += time.perf_counter_ns() - t0
    agent.capture(hook, layer, rows)
