"""Taps on SGLang's own model modules (dense Llama / Mistral / Qwen2 / Qwen3; Qwen2-MoE, Qwen3-MoE,
Mixtral), placed with ordinary torch forward hooks on the unmodified modules.

Where each catalog hook is read (module names from v0_5.MODULES):

    embeddings   model.embed_tokens output
    resid_pre L  model.layers.L.input_layernorm: layer 0 -> its input (the embeddings, no residual
                 yet); L > 0 -> the `residual` of the fused add+RMSNorm's (normed, residual) output
    resid_mid L  model.layers.L.post_attention_layernorm -> residual of its (normed, residual)
    mlp_in L     model.layers.L.post_attention_layernorm -> normed
    attn_q/k/v L model.layers.L.self_attn.qkv_proj output split [q_size, kv_size, kv_size] (pre-RoPE;
                 Qwen3: before q_norm/k_norm) — per TP shard
    attn_out L   model.layers.L.self_attn output (TP > 1: this rank's unreduced partial sum)
    mlp_act L    input of model.layers.L.mlp.down_proj — per TP shard
    mlp_out L    model.layers.L.mlp output (TP > 1: unreduced partial sum)
    moe_router_logits / moe_topk_ids / moe_topk_weights L   mlp.gate output / mlp.topk output
    resid_final  model.norm -> normed
    token_ids, logits   not module taps: read by the plugin from the ForwardBatch / ModelRunnerOutput

Taps on whole decoder layers are avoided on purpose: from 0.5.23 a Llama layer returns an
unreduced "layer boundary" handle whose meaning differs between versions; the norms' inputs and
outputs mean the same thing across 0.5.x. SGLang's fused kernels write in place, so every tap
hands the agent the tensor at hook time and the agent copies it before returning.

One torch hook per module (a `_Site`): a module whose hook yields several catalog tensors
(post_attention_layernorm: resid_mid + mlp_in; qkv_proj: attn_q/k/v; mlp.topk: both top-k
tensors) carries all of them as entries of one hook. An entry is one agent call (the engine
contract, backends/base.py): `agent.tap(hook, layer, extract, module, args[, output])`, which times
the extraction and the copy. Only two rarer paths do more, under `agent.timed()`: the start-up
self-check, and recording into static buffers while SGLang captures a CUDA graph.

Only what the step selects is registered (`sync`, called by SGLangCapture right after
begin_step, on the inference thread): after the self-check a module keeps its torch hook only
while some entry of it is selected (or belongs to the CUDA-graph static set, below), and the hook
calls the agent only for its selected entries. The set is recomputed when the agent's step
selection changes (`agent.step_hooks()` returns a new object exactly when its per-step answers
were reset: another batch of selections, a new control document), so a steady decode pays one
identity check per step; an unused torch hook would cost a Python call per module per forward
(and torch's slow `_call_impl` path for that module).

CUDA graphs: taps fire inside SGLang's graph capture and copy into static buffers there
(`_record_static`); the set recorded is frozen at the first capture (`static_keys`, from the
global selection). Hooks of that set stay registered whatever the step selects, so a graph that
SGLang captures again records them too.

Start-up self-check: every placed hook stays registered until the first forward with rows,
which runs `check` mode: every entry records the shape it saw. An entry that did not fire, or
fired with the wrong row count or width, is removed and reported (agent.report_placement +
CaptureAgent.stats().unplaced_taps); its module's other entries stay, and the module's torch hook
goes with its last entry.

    taps = SGLangTaps(model_runner.model, agent, hidden_size=4096, tp_rank=0, tp_size=1)
    unplaced = taps.place()
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from tensortrace.agent import forward_wrap
from tensortrace.agent.backends.sglang import v0_5
from tensortrace.agent.catalog import HOOKS
from tensortrace.agent.core import (TAP_CALL, TAP_ROWS_IN0, TAP_ROWS_OUT0, TAP_ROWS_OUT0_COLS, TAP_ROWS_OUT1,
                                    TAP_ROWS_OUT1_OR_IN0)

_NATIVE_TAP_ENTRIES = 4   # agent/_capture.c MAX_ENTRIES: a site with more keeps its Python hook

log = logging.getLogger("tensortrace.sglang")

# Hooks whose value is identical on every TP rank (exported from rank 0 only); the others are
# per-rank shards (attn_out / mlp_out are unreduced partial sums when tp_size > 1).
REPLICATED_HOOKS = frozenset({"token_ids", "embeddings", "resid_pre", "resid_mid", "mlp_in", "resid_final",
                              "logits", "moe_router_logits", "moe_topk_ids", "moe_topk_weights"})
STEP_HOOKS = ("token_ids", "logits")  # read by the plugin, not by module taps
_NO_HOOKS = frozenset()


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def _rows(value):
    """A tap's value as rows [rows, *row_shape] (a 1-D tensor: one column); None when it is not a
    tensor with at least one dimension (the tap produced nothing this time)."""
    if value is None or not hasattr(value, "shape") or value.dim() < 1:
        return None
    return value if value.dim() >= 2 else value.unsqueeze(-1)


@dataclass
class _Tap:
    """One catalog tensor (hook, layer) read by one module's torch hook (its `site`)."""
    hook: str
    layer: int
    module_name: str
    expect_width: int | None          # expected last-dim size, None: not checked
    extract: object = None            # extract(*hook_args) -> rows or None
    site: "_Site | None" = None
    seen: tuple | None = None         # (rows, row_shape) seen during the self-check
    removed_reason: str = ""
    kind: int = TAP_CALL              # how the native tap reads it (core.TAP_*; extract is the Python path's)
    cols: tuple = ()                  # TAP_ROWS_OUT0_COLS: (first column, columns)


class _Site:
    """One torch hook (pre or post) on one module, carrying every entry read there. `active`: the
    (hook, layer, extract) of the entries this step selects, the only ones the hook hands the
    agent; `handle`: the torch hook while registered, else None."""

    __slots__ = ("module", "module_name", "pre", "entries", "active", "handle", "fire", "mechanism", "fast",
                 "registered")

    def __init__(self, module, module_name: str, pre: bool, mechanism: str = "forward"):
        self.module, self.module_name, self.pre = module, module_name, pre
        self.mechanism = mechanism   # forward_wrap.attach: the module's forward wrapped, or PyTorch hooks
        self.entries: list[_Tap] = []
        self.active: tuple = ()
        self.handle = None
        self.fire = None         # the Python hook: self-check, graph capture, the Python path
        self.fast = None         # the native tap of every entry (agent.make_tap), built when first used
        self.registered = None   # which of the two the handle carries

    def register(self, fn=None) -> None:
        fn = fn or self.fire
        if self.handle is not None and self.registered is not fn:
            self.unregister()
        if self.handle is None:
            self.handle = forward_wrap.attach(self.module, fn, pre=self.pre, mechanism=self.mechanism)
            self.registered = fn

    def unregister(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
            self.registered = None


class SGLangTaps:
    """The module taps of one SGLang model: placed and removed by SGLangCapture (plugin.py), the
    SGLang backend of the engine contract."""

    def __init__(self, model, agent, hidden_size: int, tp_rank: int = 0, tp_size: int = 1):
        self.agent = agent
        self.model = model
        self.hidden_size = hidden_size
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.taps: dict = {}   # (hook, layer) -> _Tap
        self.sites: dict = {}  # (module name, pre) -> _Site: one torch hook each
        self.checking = False
        self._check_rows = 0
        # Registration follows the step's selection once the self-check has run (`sync`); until
        # then every placed hook is registered (the check, and SGLang's graph capture, see them all).
        self.selective = False
        # the agent.step_hooks() object the last sync() answered for (read by the plugin): a new one
        # exactly when the agent's selection answers were reset, so answers derived from them hold while it stays
        self.synced_for = None
        self._wanted: tuple = ()  # the (hook, layer) keys that step selects, placed here
        # what the registrations were last made for by _apply: (wanted set, native site taps); None
        # after anything that changes what _apply would do with them (placement, an entry dropped,
        # the CUDA-graph static set frozen or shrunk, removal)
        self._applied = None
        self._fired = 0        # firings of the Python hooks (the native taps count theirs: agent.native_tap_calls)
        # how a tap reaches its module: its forward wrapped (default) or PyTorch hooks (forward_wrap.py)
        self._mechanism = forward_wrap.mechanism_of(agent)
        # CUDA graphs (TENSORTRACE_CUDA_GRAPH=static): taps selected when the graphs are captured copy
        # into these preallocated device buffers inside the graph; after a replay the runtime hands
        # rows [:batch] to the agent. Sized by the first (largest: SGLang captures in descending
        # batch order) capture; a tap that sees a larger one is dropped from the static set.
        self.static_keys: set | None = None
        self.static_bufs: dict = {}
        # A model on CUDA can be inside a CUDA-graph capture when a tap fires (checked per firing,
        # before any extraction); a CPU model never is.
        self._is_capturing = None

    # -- placement -------------------------------------------------------------------------
    def place(self) -> list[tuple[str, str]]:
        """Place every catalog hook this model has; returns [(hook, reason)] for those it cannot."""
        param = next(iter(self.model.parameters()), None)
        if param is not None and param.is_cuda:
            import torch

            self._is_capturing = torch.cuda.is_current_stream_capturing
        named = dict(self.model.named_modules())
        unplaced: list[tuple[str, str]] = []
        layers = named.get(v0_5.MODULES["layers"])
        n_layers = len(layers) if layers is not None else 0
        if not n_layers:
            return [(h, f"no {v0_5.MODULES['layers']} in {type(self.model).__name__}") for h in HOOKS
                    if h not in STEP_HOOKS]
        sharded = self.tp_size > 1
        for hook in HOOKS:
            if hook in STEP_HOOKS:
                continue
            if sharded and self.tp_rank != 0 and hook in REPLICATED_HOOKS:
                continue  # replicated across ranks: rank 0 exports it
            spec = HOOKS[hook]
            layer_ids = range(n_layers) if spec.per_layer else (-1,)
            missing = []
            for L in layer_ids:
                why = self._place_one(named, hook, L)
                if why:
                    missing.append((L, why))
            if missing:
                if len(missing) == len(layer_ids):
                    unplaced.append((hook, missing[0][1]))
                else:
                    unplaced.append((hook, f"layers {[L for L, _ in missing]}: {missing[0][1]}"))
        for site in self.sites.values():
            site.active = tuple((t.hook, t.layer, t.extract) for t in site.entries)
            site.register()
        self._applied = None
        return unplaced

    def _mod(self, named, key: str, L: int):
        name = v0_5.MODULES[key].format(L=L)
        return name, named.get(name)

    def _place_one(self, named, hook: str, L: int) -> str:
        H = self.hidden_size
        # Each extractor gets the torch hook's arguments ((module, args, output) after a forward,
        # (module, args) before one) and returns the rows, or None.
        if hook == "embeddings":
            name, m = self._mod(named, "embed_tokens", L)
            return self._add(hook, L, name, m, H, post=lambda mod, a, out: _rows(_first(out)), kind=TAP_ROWS_OUT0)
        if hook == "resid_pre":
            name, m = self._mod(named, "input_layernorm", L)
            # (normed, residual) when a residual was passed; layer 0 gets the stream as its input.
            return self._add(hook, L, name, m, H,
                             post=lambda mod, a, out: _rows(out[1] if isinstance(out, tuple) else a[0]),
                             kind=TAP_ROWS_OUT1_OR_IN0)
        if hook in ("resid_mid", "mlp_in"):
            name, m = self._mod(named, "post_attention_layernorm", L)
            if hook == "resid_mid":
                return self._add(hook, L, name, m, H,
                                 post=lambda mod, a, out: _rows(out[1]) if isinstance(out, tuple) else None,
                                 kind=TAP_ROWS_OUT1)
            return self._add(hook, L, name, m, H, post=lambda mod, a, out: _rows(_first(out)), kind=TAP_ROWS_OUT0)
        if hook == "resid_final":
            name, m = self._mod(named, "final_norm", L)
            return self._add(hook, L, name, m, H, post=lambda mod, a, out: _rows(_first(out)), kind=TAP_ROWS_OUT0)
        if hook == "attn_out":
            name, m = self._mod(named, "self_attn", L)
            return self._add(hook, L, name, m, H, post=lambda mod, a, out: _rows(_first(out)), kind=TAP_ROWS_OUT0)
        if hook == "mlp_out":
            name, m = self._mod(named, "mlp", L)
            return self._add(hook, L, name, m, H, post=lambda mod, a, out: _rows(_first(out)), kind=TAP_ROWS_OUT0)
        if hook == "mlp_act":
            name, m = self._mod(named, "down_proj", L)
            return self._add(hook, L, name, m, None, pre=lambda mod, a: _rows(a[0]), kind=TAP_ROWS_IN0)
        if hook in ("attn_q", "attn_k", "attn_v"):
            name, m = self._mod(named, "qkv_proj", L)
            _, attn = self._mod(named, "self_attn", L)
            q, kv = getattr(attn, "q_size", None), getattr(attn, "kv_size", None)
            if m is None or q is None or kv is None:
                return f"{name} (with self_attn.q_size / kv_size) not found"
            lo, width = {"attn_q": (0, q), "attn_k": (q, kv), "attn_v": (q + kv, kv)}[hook]
            return self._add(hook, L, name, m, width,
                             post=lambda mod, a, out, lo=lo, w=width: _rows(_first(out)[:, lo:lo + w]),
                             kind=TAP_ROWS_OUT0_COLS, cols=(lo, width))
        if hook == "moe_router_logits":
            name, m = self._mod(named, "moe_gate", L)
            return self._add(hook, L, name, m, None, post=lambda mod, a, out: _rows(_first(out)), kind=TAP_ROWS_OUT0)
        if hook in ("moe_topk_ids", "moe_topk_weights"):
            name, m = self._mod(named, "moe_topk", L)
            attr = "topk_ids" if hook == "moe_topk_ids" else "topk_weights"
            return self._add(hook, L, name, m, None,
                             post=lambda mod, a, out, attr=attr: _rows(getattr(out, attr, None)))
        return f"no SGLang module mapping for {hook}"

    def _add(self, hook, L, name, module, width, post=None, pre=None, kind=TAP_CALL, cols=()) -> str:
        """Add entry (hook, L) to the torch hook of `module` (one per module and kind, created on
        its first entry; registered at the end of place())."""
        if module is None:
            return f"module {name} not found"
        is_pre = pre is not None
        site = self.sites.get((name, is_pre))
        if site is None:
            site = self.sites[(name, is_pre)] = _Site(module, name, is_pre, self._mechanism)
            site.fire = self._hook_fn(site)
        tap = _Tap(hook, L, name, width, extract=pre if is_pre else post, site=site, kind=kind, cols=cols)
        site.entries.append(tap)
        self.taps[(hook, L)] = tap
        return ""

    def _hook_fn(self, site: _Site):
        agent_tap = self.agent.tap

        def fire(*hook_args):
            # The hot path is the loop at the end: one agent call per entry this step selects
            # (the agent's tap times extract(*hook_args) and the copy).
            self._fired += 1
            capturing = self._is_capturing
            if capturing is not None and capturing():
                for tap in site.entries:
                    self._fire_off_hot_path(tap, hook_args, in_graph_capture=True)
            elif self.checking:
                for tap in site.entries:
                    self._fire_off_hot_path(tap, hook_args, in_graph_capture=False)
            else:
                for hook, L, extract in site.active:
                    agent_tap(hook, L, extract, *hook_args)
        return fire

    def _fire_off_hot_path(self, tap: _Tap, hook_args, in_graph_capture: bool) -> None:
        """An entry's firing under the agent's timer, where an exception in extract disables only
        this entry.
        Inside a CUDA-graph capture: only a graph-safe copy into the tap's static buffer. During
        the start-up self-check: record what the tap saw, and capture as usual — unless it has the
        wrong shape (end_check removes it): then its records of this step are dropped, counted
        tap_error (agent.tap_failed), never written as rows the ring's readers reject or misattribute."""
        agent = self.agent
        with agent.timed():
            try:
                rows = tap.extract(*hook_args)
            except Exception as e:  # noqa: BLE001 - failure isolation: only this tap is disabled
                agent.tap_failed(tap.hook, tap.layer, e)
                return
            if in_graph_capture:
                if rows is not None and rows.is_cuda:
                    self._record_static((tap.hook, tap.layer), rows)
            elif rows is None:
                tap.seen = ("no tensor", ())
            else:
                tap.seen = (int(rows.shape[0]), tuple(rows.shape[1:]))
                if agent.wants(tap.hook, tap.layer):
                    why = self._misfit(tap)
                    if why:
                        agent.tap_failed(tap.hook, tap.layer, ValueError(f"self-check: {why}"))
                    else:
                        agent.capture(tap.hook, tap.layer, rows)

    # -- CUDA graphs -----------------------------------------------------------------------
    def _record_static(self, key, rows) -> None:
        if self.static_keys is None:  # first capture: freeze the graph's tap set from the selection
            sel = self.agent.selection
            self.static_keys = {k for k in self.taps if sel.enabled and sel.wants(*k)}
            self._applied = None
        if key not in self.static_keys:
            return
        import torch

        buf = self.static_bufs.get(key)
        if buf is None:
            buf = self.static_bufs[key] = torch.empty_like(rows)
        if rows.shape[0] > buf.shape[0] or rows.shape[1:] != buf.shape[1:] or rows.dtype != buf.dtype:
            self.static_keys.discard(key)
            self.static_bufs.pop(key, None)
            self._applied = None
            log.warning("tensortrace: %s@%d changed shape between CUDA-graph captures; it is captured "
                        "on eager steps only", *key)
            return
        buf[: rows.shape[0]].copy_(rows)

    def static_ready(self, key) -> bool:
        return key in self.static_bufs and self.static_keys is not None and key in self.static_keys

    # -- self-check ------------------------------------------------------------------------
    def begin_check(self, total_rows: int) -> None:
        """Called by SGLangCapture before the first forward with rows (under agent.timed()), with
        that step's row count."""
        self.checking = True
        self._check_rows = total_rows
        for t in self.taps.values():
            t.seen = None

    def _misfit(self, t: _Tap) -> str:
        """Why the shape an entry saw during the self-check is wrong ("" if it is right)."""
        if t.seen is None:
            return f"{t.module_name} did not fire in the first forward"
        if t.seen[0] == "no tensor":
            return f"{t.module_name} produced no tensor for {t.hook}"
        if t.seen[0] != self._check_rows:
            return f"{t.module_name} gave {t.seen[0]} rows, the step has {self._check_rows}"
        if t.expect_width is not None and (not t.seen[1] or t.seen[1][-1] != t.expect_width):
            return f"{t.module_name} gave row shape {list(t.seen[1])}, expected width {t.expect_width}"
        return ""

    def end_check(self, total_rows: int) -> list[tuple[str, str]]:
        """Remove every entry that did not fire with [total_rows, ..., expected width]; returns them."""
        self.checking = False
        self._check_rows = total_rows
        failed = []
        for key, t in list(self.taps.items()):
            why = self._misfit(t)
            if why:
                self._drop_entry(t)
                t.removed_reason = why
                failed.append((f"{t.hook}@{t.layer}", why))
        if failed:
            log.warning("tensortrace: self-check disabled %d tap(s): %s", len(failed),
                        "; ".join(f"{h}: {r}" for h, r in failed))
        # From now on only what the step selects is registered; this step's answers apply at once.
        self.selective = True
        self._wanted = tuple(k for k in self._wanted if k in self.taps)
        self._apply(frozenset(self._wanted))
        return failed

    @property
    def fired(self) -> int:
        """Tap firings so far (a forward's count tells whether its taps ran or a graph replayed)."""
        return self._fired + getattr(self.agent, "native_tap_calls", 0)

    def _native_site_taps(self) -> bool:
        """After the self-check, a CPU model's sites call the agent's native tap directly (one C call
        per module firing: the selection check, each selected entry's extract and copy), not the
        Python hook `fire`. A model on CUDA keeps `fire`: it checks for a graph capture per firing."""
        return (self.selective and not self.checking and self._is_capturing is None
                and getattr(self.agent, "capture_path", "python") == "native")

    def _drop_entry(self, t: _Tap) -> None:
        """Remove one entry; its module's torch hook goes with the module's last entry."""
        del self.taps[(t.hook, t.layer)]
        self._applied = None
        site = t.site
        site.fast = None   # rebuilt without it
        site.entries.remove(t)
        site.active = tuple(a for a in site.active if (a[0], a[1]) != (t.hook, t.layer))
        if not site.entries:
            site.unregister()
            del self.sites[(site.module_name, site.pre)]

    # -- registration follows the selection --------------------------------------------------
    def sync(self) -> tuple:
        """Called by SGLangCapture on the inference thread right after begin_step (under
        agent.timed()): the (hook, layer) keys placed here that this step selects, and — once the
        self-check has run — exactly the torch hooks serving them (plus the CUDA-graph static set)
        registered. Recomputed only when the agent's step selection changed (a new
        agent.step_hooks() object); otherwise one identity check."""
        agent = self.agent
        # The agent hands out a new step_hooks() object exactly where it resets its per-step
        # selection answers (CaptureAgent._begin_step: other selections than the previous step's);
        # every empty answer (a step capturing nothing) is a new frozenset() too: one stands for all.
        hooks = agent.step_hooks() or _NO_HOOKS
        if hooks is self.synced_for:
            return self._wanted
        wanted = tuple(k for k in self.taps if k[0] in hooks and agent.wants(*k)) if hooks is not _NO_HOOKS else ()
        self.synced_for, self._wanted = hooks, wanted
        if self.selective:
            self._apply(frozenset(wanted))
        return wanted

    def _apply(self, wanted: frozenset) -> None:
        native = self._native_site_taps()
        if self._applied is not None and self._applied == (wanted, native):
            # the registrations were made for exactly this (a fresh plan of the same selection:
            # every request arrival or departure makes one): no pass over the sites
            return
        static = self.static_keys or ()
        for site in self.sites.values():
            active = tuple((t.hook, t.layer, t.extract) for t in site.entries if (t.hook, t.layer) in wanted)
            site.active = active
            if active or any((t.hook, t.layer) in static for t in site.entries):
                if native and len(site.entries) <= _NATIVE_TAP_ENTRIES:
                    if site.fast is None:
                        site.fast = self.agent.make_tap([(t.hook, t.layer, t.kind, t.extract, *t.cols)
                                                         for t in site.entries])
                    site.register(site.fast)
                else:
                    site.register()
            else:
                site.unregister()
        self._applied = (wanted, native)

    @property
    def registered_hooks(self) -> int:
        """Torch hooks registered on the model now (one per module with a selected entry)."""
        return sum(site.handle is not None for site in self.sites.values())

    def remove(self) -> None:
        for site in self.sites.values():
            site.unregister()
        self.sites.clear()
        self.taps.clear()
        self.synced_for, self._wanted = None, ()
        self._applied = None
