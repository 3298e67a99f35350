"""The `--forward-hooks` fallback, for SGLang versions without plugins (<= 0.5.9) or where plugins
are disabled. SGLang's own flag registers a torch forward hook, built by our factory, on every
module whose name matches the patterns (fnmatch) — here the decoder layers:

    python -m sglang.launch_server ... --forward-hooks '[{"name": "tensortrace",
        "target_modules": ["model.layers.*"],
        "hook_factory": "tensortrace.agent.backends.sglang.forward_hooks:decoder_layer_hook",
        "config": {"ring_dir": "/run/tensortrace", "selection": "residual"}}]'

What it can and cannot do (docs/sglang.md): only post-forward hooks on modules exist there, no
request lifecycle and no HTTP hook. So it captures one thing — the residual stream between
decoder layers, `resid_pre` of layers 1..N-1, computed as `hidden + residual` from layer L's
output pair (the add SGLang's next fused add+RMSNorm performs; same rounding) — with the batch
layout from the ForwardBatch each decoder layer receives as its third positional argument.
Requests are begun when first seen (no traceparent: a fresh trace id each; no per-request
options) and ended when they leave the decode batch (finish_reason "unknown"). The layer
output must be the (hidden_states, residual) pair of SGLang <= 0.5.9; from 0.5.23 a layer may
return an unreduced handle, and the tap disables itself with that reason — use the plugin there.

SGLang's hook manager places this hook, so it is not a `Backend` (it cannot attach or detach
itself), but it makes the same AgentPort calls and keeps the same timing rule: its layout and
request bookkeeping, and the residual sum it captures, run under `agent.timed()`.

    hook = decoder_layer_hook({"ring_dir": "/tmp/tt"})   # what SGLang's hook manager calls
"""

from __future__ import annotations

import atexit
import logging

from tensortrace.agent.backends.sglang.batch_layout import plan_step
from tensortrace.agent.backends.sglang.config import SGLangBackendConfig, parse_size

log = logging.getLogger("tensortrace.sglang")


def _layer_index(module) -> int | None:
    for obj in (module, getattr(module, "self_attn", None), getattr(getattr(module, "self_attn", None), "attn", None)):
        v = getattr(obj, "layer_id", None)
        if isinstance(v, int):
            return v
    return None


class DecoderLayerTap:
    """State shared by the hook on every decoder layer of one model (one per factory call)."""

    def __init__(self, config: SGLangBackendConfig, agent=None):
        self.config = config
        self.agent = agent
        self._fb = None
        self._open = False
        self._stash = None
        self._seen: set[str] = set()
        self._decoding: set[str] = set()
        self.disabled_reason = ""

    def _ensure_agent(self):
        if self.agent is None:
            from tensortrace.agent.config import AgentConfig
            from tensortrace.agent.core import CaptureAgent
            from tensortrace.agent.selection import Selection

            self.agent = CaptureAgent(
                AgentConfig(ring_dir=self.config.ring_dir, ring_capacity=self.config.ring_capacity,
                            model_id=self.config.model_id, overflow_policy=self.config.overflow_policy),
                Selection.from_doc(self.config.selection_doc()))
            self.agent.report_placement([(h, "the --forward-hooks fallback captures resid_pre of layers >= 1 only; "
                                              "use the SGLang plugin for the rest") for h in
                                         ("embeddings", "resid_mid", "attn_out", "mlp_out", "resid_final", "logits")])
            atexit.register(self.close)
        return self.agent

    def __call__(self, module, args, output):
        if self.disabled_reason or not type(module).__name__.endswith("DecoderLayer"):
            return None  # fnmatch "model.layers.*" also matches the layers' submodules
        try:
            self._on_layer(module, args, output)
        except Exception as e:  # noqa: BLE001 - never break the forward
            self.disabled_reason = f"{type(e).__name__}: {e}"
            log.error("tensortrace: --forward-hooks tap disabled: %s", self.disabled_reason)
        return None

    def _on_layer(self, module, args, output):
        agent = self._ensure_agent()
        if len(args) < 3:
            raise TypeError(f"{type(module).__name__} got {len(args)} positional args; expected "
                            "(positions, hidden_states, forward_batch, ...)")
        fb = args[2]
        if fb is not self._fb:
            self._new_step(agent, fb)
        L = _layer_index(module)
        if L is None:
            raise TypeError(f"cannot tell the layer index of {type(module).__name__} (no layer_id)")
        if not self._open:
            return
        # The stream leaving layer L is resid_pre of layer L + 1 — if that layer exists: captured
        # when layer L + 1 fires in the same forward (the last layer's stash is dropped).
        stashed, self._stash = self._stash, None
        if stashed is not None and stashed[0] == L:
            agent.capture("resid_pre", L, stashed[1])
        if not agent.wants("resid_pre", L + 1):
            return
        if not (isinstance(output, tuple) and len(output) == 2 and all(hasattr(t, "shape") for t in output)):
            raise TypeError(f"{type(module).__name__} returned {type(output).__name__}, not the "
                            "(hidden_states, residual) pair of SGLang <= 0.5.9")
        hidden, residual = output
        with agent.timed():   # capture's own work on the inference thread: the agent counts it
            self._stash = (L + 1, hidden + residual)  # a new tensor: later in-place kernels cannot touch it

    def _new_step(self, agent, fb):
        if self._open:
            agent.end_step()
            self._open = False
        self._fb = fb
        self._stash = None
        with agent.timed():
            plan = plan_step(fb)
            if plan.layout is None:
                return
            rids = [rr.request_id for rr in plan.layout.requests]
            for rid in rids:
                if rid not in self._seen:
                    agent.begin_request(rid)
                    self._seen.add(rid)
            if plan.mode == "DECODE":
                now = set(rids)
                for rid in sorted(self._decoding - now):  # left the running batch: finished
                    agent.end_request(rid, finish_reason="unknown")
                    self._seen.discard(rid)
                self._decoding = now
            agent.begin_step(plan.layout)
            self._open = True

    def close(self):
        if self.agent is None:
            return
        if self._open:
            self.agent.end_step()
            self._open = False
        for rid in sorted(self._seen):
            self.agent.end_request(rid, finish_reason="unknown", incomplete_reason="server stopped")
        self._seen.clear()
        self.agent.close()


def decoder_layer_hook(config: dict | None = None):
    """Factory for SGLang's `--forward-hooks` (hook_factory): returns the forward hook.

    `config` keys override the TENSORTRACE_* environment: ring_dir, ring_capacity, selection,
    model_id, overflow_policy."""
    cfg = SGLangBackendConfig.from_env()
    for key, value in (config or {}).items():
        if key == "ring_capacity" and isinstance(value, str):
            value = parse_size(value)
        if not hasattr(cfg, key):
            raise ValueError(f"--forward-hooks config: unknown key {key!r}")
        setattr(cfg, key, value)
    cfg.validate()
    return DecoderLayerTap(cfg)
