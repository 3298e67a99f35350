"""TensorTrace capture agent: taps inside the inference process -> Ring² shared-memory ring.

    from tensortrace.agent import AgentConfig, CaptureAgent, Selection
    from tensortrace.agent.backends.hf import HFBackend
    agent = CaptureAgent(AgentConfig(ring_dir="/run/tensortrace", model_id="llama"), Selection.preset("hidden-states"))
    backend = HFBackend(model, agent)
    out, contexts = backend.generate(input_ids, attention_mask=mask, max_new_tokens=8)

docs/agent.md documents the catalog, selection, control document, overflow policies, accounting
and the engine contract between backends and the agent (backends/base.py: Backend, AgentPort).
"""

from tensortrace.agent.catalog import HOOKS, PRESETS, HookSpec
from tensortrace.agent.config import AgentConfig, OverflowPolicy
from tensortrace.agent.core import CaptureAgent, RequestContext
from tensortrace.agent.layout import Phase, RequestRows, RowDomain, StepLayout
from tensortrace.agent.selection import CONTROL_DOC_VERSION, Selection, SelectionError, parse_layers
from tensortrace.agent.stats import DROP_REASONS, AgentStats, DropReason, HookStats

__all__ = ["HOOKS", "PRESETS", "HookSpec", "AgentConfig", "OverflowPolicy", "CaptureAgent", "RequestContext",
           "Phase", "RequestRows", "RowDomain", "StepLayout", "CONTROL_DOC_VERSION", "Selection", "SelectionError",
           "parse_layers", "DROP_REASONS", "DropReason", "AgentStats", "HookStats"]
