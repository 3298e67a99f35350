"""Hugging Face Transformers backend: taps on unmodified model classes, layouts for `generate`.

Taps are forward hooks / pre-hooks on the modules named by archs.py. Around every forward of the
model a pre-hook builds the StepLayout from the batch `generate` runs:
  - prefill: input [B, S] with left padding; request b owns rows b*S + pad_b .. b*S + S - 1,
    positions 0 .. prompt_len_b - 1 (pad rows are never exported);
  - decode: input [B, 1]; request b owns row b at position prompt_len_b + k - 1 (k-th decode step),
    until it has produced EOS: the forward whose input is its EOS token, and every later one,
    carries no rows of it (as if it had been served alone).
Reading the prompt mask is a host read; on CUDA it synchronises like `generate` itself does every
step (the SGLang backend has no such read). The decode input ids are read on the host only for a
CPU model; on CUDA a stopping criterion copies them asynchronously (_NextTokens).

The engine contract (backends/base.py): every tap is `functools.partial(agent.tap, hook, layer,
extract)` registered as the torch hook, so the tap body is one agent call; the layout, the
next-token criterion and the request bookkeeping run under `agent.timed()`.

    agent = CaptureAgent(AgentConfig(ring_dir=tmp, model_id="tiny-llama"))
    backend = HFBackend(model, agent)          # agent.unplaced lists hooks it could not place
    out, ctxs = backend.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    ctxs[0].traceparent                          # the trace context of request 0
"""

from __future__ import annotations

import functools
import logging
import uuid
from dataclasses import dataclass, field

from tensortrace.agent import forward_wrap
from tensortrace.agent.backends.base import Backend
from tensortrace.agent.backends.hf.archs import ArchMap, arch_for, find_module
from tensortrace.agent.catalog import HOOKS
from tensortrace.agent.core import TAP_CALL, TAP_FIRST_OUTPUT, TAP_INPUT, TAP_OUTPUT, TAP_PLAIN_INPUT
from tensortrace.agent.layout import Phase, RequestRows, StepLayout

log = logging.getLogger("tensortrace.agent")


def _token_rows(t):
    """[B, S, ...] -> [B*S, ...] (a view for every tensor these taps see)."""
    return t.flatten(0, 1) if t.dim() >= 2 else t


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def _input_of(args, kwargs, name="hidden_states"):
    if args:
        return args[0]
    if name in kwargs:
        return kwargs[name]
    return kwargs["input"]


# Extractors: called by agent.tap with the torch hook's own arguments, only when the step selects
# the tap. Pre-hooks (with_kwargs) pass (module, args, kwargs); forward hooks add the output.
# Each has a tap kind the native path reads the same tensor by without calling it (_KIND).
def _input_rows(mod, args, kw, out=None):
    """The module's input `hidden_states` as token rows (from a pre-hook or a forward hook)."""
    return _token_rows(_input_of(args, kw))


def _plain_input_rows(mod, args, kw, out=None):
    """The input of an nn.Embedding / nn.Linear (`input`) as token rows."""
    return _token_rows(_input_of(args, kw, "input"))


def _output_rows(mod, args, kw, out):
    return _token_rows(out)


def _first_output_rows(mod, args, kw, out):
    """The first element of a tuple output (or the output) as token rows."""
    return _token_rows(_first(out))


def _split_rows(out, split, i):
    """Part i of GPT-2's fused c_attn output, split exactly as GPT2Attention splits it."""
    return _token_rows(out.split(split, dim=2)[i])


def _split_extract(mod, args, kw, out, *, split, i):
    return _split_rows(out, split, i)


def _item_extract(mod, args, kw, out, *, i):
    return out[i]


def _item(out, i):
    return out[i]


_KIND = {_input_rows: TAP_INPUT, _plain_input_rows: TAP_PLAIN_INPUT, _output_rows: TAP_OUTPUT,
         _first_output_rows: TAP_FIRST_OUTPUT}


@dataclass
class _Tap:
    hooks: tuple          # catalog hook names this module hook captures
    module: object
    pre: bool             # forward pre-hook (input) or forward hook (output)
    fn: object
    handle: object = None


def _eager(fn):
    """A hook that torch.compile must not trace: under a compiled model, dynamo breaks the graph at
    each selected tap and runs it as plain Python, instead of tracing into the agent (ring writes,
    ctypes, per-step dicts), which recompiled on every step and ran 8x slower. The capture is then
    the tensor the compiled model computed at that point.

    In eager mode `torch.compiler.disable`'s wrapper would cost every hook call its eval-frame
    bookkeeping; here eager pays one `is_compiling()` check (~0.07 us), and only a trace (where
    is_compiling() is True) reaches the disabled function."""
    import torch

    compiler = getattr(torch, "compiler", None)
    if compiler is None or not hasattr(compiler, "disable") or not hasattr(compiler, "is_compiling"):
        return fn
    disabled = compiler.disable(fn)
    is_compiling = compiler.is_compiling

    def hook(*args, **kwargs):
        if is_compiling():
            return disabled(*args, **kwargs)
        return fn(*args, **kwargs)
    return hook


class _NextTokens:
    """Each generated token, on the host, without the backend ever waiting on the device.

    The decode layout needs the token each sequence feeds in (an EOS there means the request has
    ended and its row must not be exported). Reading `input_ids[:, -1]` at the next forward would
    be a device sync on the inference thread. Instead this stopping criterion — which stops
    nothing — copies the new tokens into pinned host memory asynchronously right after generate
    appends them, and records an event. generate's own stop check (`unfinished_sequences.max() ==
    0`, a host read) then waits for the stream, and with it for this copy, before the next forward
    starts; the layout only checks the event (never blocking) and reads host memory. If a future
    generate stops syncing there, the event is not done yet: the layout then waits for it and
    counts that in `host_waits`, so the cost shows up instead of hiding.
    """

    def __init__(self):
        self.host = None       # the last tokens, on the host (a list when they were host tensors)
        self.event = None
        self.not_done = None   # the criterion's answer (all False), reused every step
        self.host_waits = 0

    def make_criterion(self, agent=None):
        import torch
        from transformers import StoppingCriteria

        tap = self

        class NextTokenTap(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                if agent is None:
                    return self._observe(input_ids)
                with agent.timed():   # capture's cost on the inference thread: the agent counts it
                    return self._observe(input_ids)

            def _observe(self, input_ids):
                last = input_ids.select(1, -1)
                if last.is_cuda:
                    if tap.host is None or tap.host.shape != last.shape or not tap.host.is_pinned():
                        tap.host = torch.empty(last.shape, dtype=last.dtype, pin_memory=True)
                    tap.host.copy_(last, non_blocking=True)
                    tap.event = torch.cuda.Event()
                    tap.event.record()
                else:   # a host tensor: read it now (one C call; no copy, no tensor to keep)
                    tap.host, tap.event = last.tolist(), None
                done = tap.not_done
                if done is None or done.shape[0] != input_ids.shape[0]:
                    # generate combines it out of place (`is_done | criterion(...)`): one tensor serves
                    # (one generate, one device: the criterion is made per generate)
                    done = tap.not_done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
                return done

        return NextTokenTap()

    def tokens(self) -> list[int] | None:
        if self.host is None:
            return None
        if isinstance(self.host, list):
            return self.host
        if self.event is not None and not self.event.query():
            self.host_waits += 1
            self.event.synchronize()
        return self.host.tolist()


@dataclass
class _Batch:
    request_ids: list[str]
    prompt_lens: list[int]
    padded_len: int
    eos: set
    forwards: int = 0
    finished: set = field(default_factory=set)
    layout: StepLayout | None = None   # the last decode layout, and the forward it was built for
    layout_at: int = -1
    next_tokens: _NextTokens = field(default_factory=_NextTokens)


class HFBackend(Backend):
    name = "hf"
    # The new-token criterion (_NextTokens): None = for device inputs only (the CPU layout reads
    # the forward's host ids); True / False = always / never.
    token_criterion: bool | None = None

    def __init__(self, model, agent, arch: ArchMap | None = None, attach: bool = True):
        super().__init__(agent)
        self.model = model
        self.arch = arch or arch_for(model)
        self._handles: list = []       # the model-level layout hooks
        self._taps: list[_Tap] = []      # every placed tap, registered only while selected
        self._registered_for: frozenset = frozenset()
        # how a tap reaches its module: its forward wrapped (default) or PyTorch hooks (forward_wrap.py)
        self._mechanism = forward_wrap.mechanism_of(agent)
        self._batch: _Batch | None = None
        self.unplaced: list[tuple[str, str]] = []
        if attach:
            self.attach()

    # -- taps ----------------------------------------------------------------------------------
    def attach(self) -> list[tuple[str, str]]:
        if self._handles:
            return self.unplaced
        self._taps = []
        self._registered_for = frozenset()
        a, m = self.arch, self.model
        unplaced: dict[str, list[str]] = {}

        def missing(hook, why):
            unplaced.setdefault(hook, []).append(why)

        embed = find_module(m, a.embed)
        if embed is None:
            missing("token_ids", f"no module {a.embed}")
            missing("embeddings", f"no module {a.embed}")
        else:
            # one forward hook for both: the embedding's input ids and its output
            self._post(embed, ("token_ids", "embeddings"),
                       self._tap_of([("token_ids", -1, _plain_input_rows), ("embeddings", -1, _output_rows)]))
        for hook, path in (("resid_final", a.final_norm), ("logits", a.lm_head)):
            mod = find_module(m, path)
            if mod is None:
                missing(hook, f"no module {path}")
            else:
                self._post(mod, (hook,), self._tap(hook, -1, _first_output_rows))

        layers = find_module(m, a.layers)
        if layers is None:
            for h, spec in HOOKS.items():
                if spec.per_layer:
                    missing(h, f"no decoder layer list {a.layers}")
            layers = []
        for L, layer in enumerate(layers):
            self._attach_layer(L, layer, missing)

        self.unplaced = [(h, "; ".join(_compress(reasons))) for h, reasons in unplaced.items()]
        # The model-level hooks that build each step's layout.
        self._handles.append(m.register_forward_pre_hook(_eager(self._on_forward_start), with_kwargs=True))
        self._handles.append(m.register_forward_hook(_eager(self._on_forward_end), always_call=True))
        self.agent.report_placement(self.unplaced)
        return self.unplaced

    def _attach_layer(self, L: int, layer, missing) -> None:
        a = self.arch
        self._pre(layer, ("resid_pre",), self._tap("resid_pre", L, _input_rows))
        norm = find_module(layer, a.post_attn_norm)
        mlp = find_module(layer, a.mlp)
        if norm is None:
            missing("resid_mid", f"layer {L}: no module {a.post_attn_norm}")
        elif mlp is not None:
            # One call for two tensors: the norm's input is resid_mid, its output the MLP's input.
            self._post(norm, ("resid_mid", "mlp_in"),
                       self._tap_of([("resid_mid", L, _input_rows), ("mlp_in", L, _first_output_rows)]))
        else:
            self._pre(norm, ("resid_mid",), self._tap("resid_mid", L, _input_rows))
        attn = find_module(layer, a.attn)
        if attn is None:
            missing("attn_out", f"layer {L}: no module {a.attn}")
        else:
            self._post(attn, ("attn_out",), self._tap("attn_out", L, _first_output_rows))
        if a.qkv_fused:
            fused = find_module(layer, a.qkv_fused)
            if fused is None:
                for h in ("attn_q", "attn_k", "attn_v"):
                    missing(h, f"layer {L}: no module {a.qkv_fused}")
            else:
                split = getattr(attn, "split_size", None)
                self._post(fused, ("attn_q", "attn_k", "attn_v"), self._tap_of(
                    [(h, L, functools.partial(_split_extract, split=split, i=i))
                     for i, h in enumerate(("attn_q", "attn_k", "attn_v"))]))
        else:
            for h, path in (("attn_q", a.q_proj), ("attn_k", a.k_proj), ("attn_v", a.v_proj)):
                proj = find_module(layer, path)
                if proj is None:
                    missing(h, f"layer {L}: no module {path}")
                else:
                    self._post(proj, (h,), self._tap(h, L, _output_rows))
        if mlp is None:
            for h in ("mlp_in", "mlp_out"):
                missing(h, f"layer {L}: no module {a.mlp}")
        else:
            if norm is None:
                self._pre(mlp, ("mlp_in",), self._tap("mlp_in", L, _input_rows))
            self._post(mlp, ("mlp_out",), self._tap("mlp_out", L, _first_output_rows))
        down = find_module(layer, a.down_proj)
        if down is None:
            missing("mlp_act", f"layer {L}: {type(mlp).__name__} has no {a.down_proj} module "
                               "(MoE experts are fused parameters; no module carries the hidden activation)")
        else:
            self._pre(down, ("mlp_act",), self._tap("mlp_act", L, _plain_input_rows))
        router = find_module(layer, a.router)
        if router is None:
            for h in ("moe_router_logits", "moe_topk_weights", "moe_topk_ids"):
                missing(h, f"layer {L}: not a MoE layer (no router module {a.router})")
        else:
            li, wi, ii = a.router_tuple
            # The router sees the tokens flattened to [B*S, hidden]: rows are token rows already.
            self._post(router, ("moe_router_logits", "moe_topk_weights", "moe_topk_ids"), self._tap_of(
                [(h, L, functools.partial(_item_extract, i=i))
                 for h, i in (("moe_router_logits", li), ("moe_topk_weights", wi), ("moe_topk_ids", ii))]))

    def _tap(self, hook: str, layer: int, extract):
        """The torch hook of a one-hook tap."""
        return self._tap_of([(hook, layer, extract)])

    def _tap_of(self, entries):
        """The torch hook of a module hook yielding one or more catalog tensors, in one call:
        `agent.make_tap` (native: a C callable that extracts, selects and copies; Python:
        agent.tap(hook, layer, extract, *hook_args) per tensor, no Python frame of its own for one)."""
        agent = self.agent
        full = [(h, L, _KIND.get(ex, TAP_CALL), ex) for h, L, ex in entries]
        if getattr(agent, "capture_path", "python") != "native":
            return _eager(agent.make_tap(full))
        # native: the C tap checks torch.compiler.is_compiling() itself and, while dynamo traces,
        # calls the Python taps wrapped in torch.compiler.disable (see _eager)
        import torch

        compiler = getattr(torch, "compiler", None)
        fallback = None
        if compiler is not None and hasattr(compiler, "disable"):
            python_tap_method = type(agent).tap   # the Python path's tap (agent.tap is the native one)

            def python_tap(*args):
                for h, L, ex in entries:
                    python_tap_method(agent, h, L, ex, *args)
            fallback = compiler.disable(python_tap)
        return agent.make_tap(full, fallback=fallback)

    def _pre(self, module, hooks: tuple, fn):
        self._taps.append(_Tap(hooks, module, True, fn))

    def _post(self, module, hooks: tuple, fn):
        self._taps.append(_Tap(hooks, module, False, fn))

    def _sync_taps(self, wanted: frozenset) -> None:
        """Register exactly the module hooks serving a wanted hook name; remove the others.

        An unused PyTorch hook still costs a Python call per module per forward (hundreds per
        step on a 36-layer model), so only the taps the current step selects are registered.
        """
        if wanted == self._registered_for:
            return
        for tap in self._taps:
            need = any(h in wanted for h in tap.hooks)
            if need and tap.handle is None:
                tap.handle = forward_wrap.attach(tap.module, tap.fn, pre=tap.pre, with_kwargs=True,
                                                 mechanism=self._mechanism)
            elif not need and tap.handle is not None:
                tap.handle.remove()
                tap.handle = None
        self._registered_for = wanted

    @property
    def registered_taps(self) -> int:
        return sum(t.handle is not None for t in self._taps)

    def detach(self) -> None:
        self._sync_taps(frozenset())
        self._taps = []
        for h in self._handles:
            h.remove()
        self._handles = []

    # -- layout --------------------------------------------------------------------------------
    def _on_forward_start(self, module, args, kwargs):
        """Model forward pre-hook, on the inference thread before every forward of our generate():
        the StepLayout, begin_step, and the taps this step needs registered. Timed by the agent."""
        batch = self._batch
        if batch is None:
            return
        agent = self.agent
        with agent.timed():
            try:
                layout = self._layout(batch, args, kwargs)
            except Exception as e:  # noqa: BLE001 - a layout we cannot build disables capture, not the model
                agent.disable(e)
                return
            agent.begin_step(layout)
            try:
                self._sync_taps(agent.step_hooks())
            except Exception as e:  # noqa: BLE001
                agent.disable(e)

    def _on_forward_end(self, module, args, output):
        """Model forward hook (always_call: also when the forward raised): end_step."""
        if self._batch is not None:
            self._batch.forwards += 1
            self.agent.end_step()   # times itself

    def _layout(self, batch: _Batch, args, kwargs) -> StepLayout:
        ids = kwargs.get("input_ids")
        if ids is None and args:
            ids = args[0]
        if ids is None:
            raise ValueError("the HF backend needs input_ids (inputs_embeds is not supported)")
        B, S = ids.shape
        if B != len(batch.request_ids):
            raise ValueError(f"forward batch {B} != {len(batch.request_ids)} requests")
        requests = []
        if batch.forwards == 0:
            if S != batch.padded_len:
                raise ValueError(f"prefill input has {S} tokens, the prompt batch {batch.padded_len}")
            for b, rid in enumerate(batch.request_ids):
                n = batch.prompt_lens[b]
                if n:
                    requests.append(RequestRows(rid, b * S + S - n, n, 0, Phase.PREFILL, b))
        else:
            if S != 1:
                raise ValueError(f"decode input has {S} tokens per sequence; the HF backend expects 1")
            finished, eos = batch.finished, batch.eos
            before = len(finished)
            if eos:   # (no EOS token: no sequence ends early, nothing to read)
                last = batch.next_tokens.tokens()
                if last is None or len(last) != B:
                    # host ids (no criterion runs on the CPU): the fed-in tokens themselves, [B, 1]
                    last = [row[0] for row in ids.tolist()]
                for b in range(B):
                    if last[b] in eos and b not in finished:   # its EOS is this step's input: the request has ended
                        finished.add(b)
            prev = batch.layout
            if prev is not None and len(finished) == before and batch.layout_at == batch.forwards - 1:
                # the same requests as the previous decode step, one position on: the agent reuses
                # that step's plan (StepLayout.advanced, CaptureAgent.begin_step)
                layout = prev.advanced(1)
            else:
                for b, rid in enumerate(batch.request_ids):
                    if b not in finished:
                        requests.append(RequestRows(rid, b, 1, batch.prompt_lens[b] + batch.forwards - 1,
                                                    Phase.DECODE, b))
                layout = StepLayout(tuple(requests), total_rows=B * S, num_sequences=B)
            batch.layout, batch.layout_at = layout, batch.forwards
            return layout
        return StepLayout(tuple(requests), total_rows=B * S, num_sequences=B)

    # -- generate --------------------------------------------------------------------------------
    def generate(self, input_ids, attention_mask=None, *, request_ids=None, traceparents=None,
                 options=None, **generate_kwargs):
        """model.generate with capture. Returns (generate's output, [RequestContext per row]).

        `attention_mask` must be left padded; `request_ids`, `traceparents`, `options` are per row.
        The request bookkeeping before and after `model.generate` runs under `agent.timed()`.
        """
        import torch

        B, P = input_ids.shape
        with self.agent.timed():
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            mask = attention_mask.detach().to("cpu")
            lens = [int(v) for v in mask.sum(1).tolist()]
            for b in range(B):
                pad = P - lens[b]
                if bool(mask[b, :pad].any()) or not bool(mask[b, pad:].all()):
                    raise ValueError(f"row {b}: attention_mask is not left padded; the HF backend needs "
                                     "padding_side='left'")
            request_ids = list(request_ids) if request_ids is not None else [uuid.uuid4().hex for _ in range(B)]
            if len(request_ids) != B or len(set(request_ids)) != B:
                raise ValueError("request_ids must be one distinct id per row")
            eos = generate_kwargs.get("eos_token_id", getattr(self.model.generation_config, "eos_token_id", None))
            eos_set = set(eos if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos]))
            contexts = []
            for b, rid in enumerate(request_ids):
                contexts.append(self.agent.begin_request(
                    rid, traceparents[b] if traceparents else None, options[b] if options else None,
                    prompt_tokens=lens[b]))
        self._batch = _Batch(request_ids, lens, P, eos_set)
        kwargs = dict(generate_kwargs)
        if self.token_criterion or (self.token_criterion is None and input_ids.is_cuda):
            # On a device, reading the decode input ids at the forward would be a sync: the
            # criterion copies each new token to the host asynchronously (_NextTokens). On the CPU
            # the layout reads the forward's input ids themselves (a host read, nothing to wait for;
            # the criterion would cost ~25 us of Python per step).
            from transformers import StoppingCriteriaList

            kwargs["stopping_criteria"] = StoppingCriteriaList(
                [self._batch.next_tokens.make_criterion(self.agent), *(kwargs.get("stopping_criteria") or [])])
        out = None
        try:
            out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            return out, contexts
        finally:
            self._batch = None
            with self.agent.timed():
                self._end_requests(request_ids, getattr(out, "sequences", out), P, eos_set)

    def _end_requests(self, request_ids, sequences, P: int, eos_set: set) -> None:
        for b, rid in enumerate(request_ids):
            if sequences is None:
                self.agent.end_request(rid, finish_reason="abort")
                continue
            gen = sequences[b, P:].tolist()
            stop = next((j for j, t in enumerate(gen) if t in eos_set), None)
            if stop is None:
                self.agent.end_request(rid, finish_reason="length", generated_tokens=len(gen))
            else:
                self.agent.end_request(rid, finish_reason="stop", generated_tokens=stop + 1)


def _compress(reasons: list[str]) -> list[str]:
    """Collapse per-layer reasons that differ only in the layer number: 'layers 0-3: ...'."""
    by_text: dict[str, list[int]] = {}
    other: list[str] = []
    for r in reasons:
        if r.startswith("layer ") and ": " in r:
            head, text = r.split(": ", 1)
            try:
                by_text.setdefault(text, []).append(int(head.split()[1]))
                continue
            except ValueError:
                pass
        other.append(r)
    out = list(other)
    for text, ls in by_text.items():
        out.append(f"layers {min(ls)}-{max(ls)}: {text}" if len(ls) > 1 else f"layer {ls[0]}: {text}")
    return out
