"""What to capture: hooks, layers, token positions, request sampling, and the control document.

A `Selection` is immutable; the agent swaps the whole object when a new one arrives (from code,
or from the exporter through the ring's control block), so a forward step always sees one
consistent selection. A request may carry its own options (opt-in / opt-out, its own hooks).

Control document (JSON, written by the exporter into the ring's control block; CONTROL_DOC_VERSION):

    {"version": 1,
     "enabled": true,                       # false: capture nothing (summaries neither)
     "selection": {
        "preset": "hidden-states",          # and/or
        "hooks": ["attn_out", "logits"],    # explicit hook names (union with the preset)
        "layers": "0-3,7",                  # or [0, 1, 2], or "all" / null
        "positions": "all",                 # all | last | prefill | decode
        "sample": {"every": 1},             # 1-in-N requests, or {"rate": 0.1} (fraction)
        "require_opt_in": false             # true: only requests whose options say capture=true
     }}

Per-request options (the `options` dict of begin_request, e.g. from an HTTP header or SGLang's
custom params): {"capture": true|false, "preset": ..., "hooks": [...], "layers": ..., "positions": ...};
"capture" forces the request in or out regardless of sampling; the other keys replace the
corresponding part of the global selection for that request.

>>> sel = Selection.from_doc({"selection": {"preset": "hidden-states", "layers": "0-1"}})
>>> sel.wants("resid_pre", 1), sel.wants("resid_pre", 2)
(True, False)
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field, replace

from tensortrace.agent.catalog import HOOKS, PRESETS, check_hook, expand_preset

CONTROL_DOC_VERSION = 1
POSITIONS = ("all", "last", "prefill", "decode")


class SelectionError(ValueError):
    """A selection, control document or request option that cannot be applied; says what is wrong."""


def parse_layers(spec) -> frozenset[int] | None:
    """"0-3,7" / [0, 1] / "all" / None -> a set of layer indices (None = every layer)."""
    if spec is None or spec == "all" or spec == "":
        return None
    if isinstance(spec, int) and not isinstance(spec, bool):
        spec = [spec]
    out: set[int] = set()
    if isinstance(spec, str):
        for part in spec.split(","):
            part = part.strip()
            try:
                if "-" in part:
                    a, b = part.split("-", 1)
                    lo, hi = int(a), int(b)
                    if hi < lo or lo < 0:
                        raise ValueError
                    out.update(range(lo, hi + 1))
                else:
                    v = int(part)
                    if v < 0:
                        raise ValueError
                    out.add(v)
            except ValueError:
                raise SelectionError(f"layers {spec!r}: {part!r} is not a layer index or a range a-b") from None
        return frozenset(out)
    if isinstance(spec, (list, tuple, set, frozenset)):
        for v in spec:
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise SelectionError(f"layers {spec!r}: {v!r} is not a non-negative integer")
            out.add(v)
        return frozenset(out)
    raise SelectionError(f"layers must be a string like '0-3,7', a list of integers or 'all', got {spec!r}")


def _hooks_from(preset, hooks) -> frozenset[str]:
    names: list[str] = []
    if preset:
        try:
            names += expand_preset(preset)
        except ValueError as e:
            raise SelectionError(str(e)) from None
    if hooks:
        if isinstance(hooks, str):
            hooks = [h.strip() for h in hooks.split(",") if h.strip()]
        for h in hooks:
            if h in PRESETS:
                names += PRESETS[h]
                continue
            try:
                check_hook(h)
            except ValueError as e:
                raise SelectionError(str(e)) from None
            names.append(h)
    return frozenset(names)


@dataclass(frozen=True)
class Selection:
    enabled: bool = True
    hooks: frozenset[str] = field(default_factory=lambda: frozenset(PRESETS["hidden-states"]))
    layers: frozenset[int] | None = None   # None: every layer
    positions: str = "all"
    sample_every: int = 1                  # capture 1 request in N (by arrival order)
    sample_rate: float = 1.0               # capture this fraction (by a hash of the request id)
    require_opt_in: bool = False

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        unknown = sorted(set(self.hooks) - set(HOOKS))
        if unknown:
            raise SelectionError(f"unknown hooks {unknown}; hooks: {', '.join(HOOKS)}")
        if self.positions not in POSITIONS:
            raise SelectionError(f"positions {self.positions!r} must be one of {', '.join(POSITIONS)}")
        if not isinstance(self.sample_every, int) or self.sample_every < 1:
            raise SelectionError(f"sample every must be an integer >= 1, got {self.sample_every!r}")
        if not 0.0 <= float(self.sample_rate) <= 1.0:
            raise SelectionError(f"sample rate must be within [0, 1], got {self.sample_rate!r}")

    @classmethod
    def preset(cls, name: str, **kw) -> "Selection":
        """A selection of a preset's hooks (catalog.PRESETS); other fields as keywords.

        >>> sel = Selection.preset("full", layers=parse_layers("0-3"), positions="last")
        >>> sel.wants("mlp_out", 3), sel.wants("mlp_out", 4), sel.positions
        (True, False, 'last')
        """
        return cls(hooks=_hooks_from(name, None), **kw)

    # -- queries on the hot path -----------------------------------------------------------
    def wants(self, hook: str, layer: int) -> bool:
        if hook not in self.hooks:
            return False
        return layer < 0 or self.layers is None or layer in self.layers

    def wants_phase(self, phase: int) -> bool:
        if self.positions == "prefill":
            return phase == 1
        if self.positions == "decode":
            return phase == 2
        return True

    def samples(self, request_id: str, arrival_index: int) -> bool:
        if self.require_opt_in or not self.enabled:
            return False
        if arrival_index % self.sample_every:
            return False
        if self.sample_rate >= 1.0:
            return True
        # A hash, not a random draw: every TP rank decides the same for the same request.
        return zlib.crc32(request_id.encode()) / 2**32 < self.sample_rate

    # -- documents --------------------------------------------------------------------------
    @classmethod
    def from_doc(cls, doc: dict) -> "Selection":
        """A Selection from a control document (see the module docstring). Raises SelectionError."""
        if not isinstance(doc, dict):
            raise SelectionError(f"control document must be a JSON object, got {type(doc).__name__}")
        version = doc.get("version", CONTROL_DOC_VERSION)
        if version != CONTROL_DOC_VERSION:
            raise SelectionError(f"control document version {version!r} is not {CONTROL_DOC_VERSION}")
        unknown = set(doc) - {"version", "enabled", "selection"}
        if unknown:
            raise SelectionError(f"control document has unknown keys {sorted(unknown)}")
        enabled = doc.get("enabled", True)
        if not isinstance(enabled, bool):
            raise SelectionError(f"enabled must be true or false, got {enabled!r}")
        sel = doc.get("selection") or {}
        if not isinstance(sel, dict):
            raise SelectionError("selection must be an object")
        return cls._from_selection_obj(sel, enabled=enabled)

    @classmethod
    def _from_selection_obj(cls, sel: dict, enabled: bool = True, base: "Selection | None" = None) -> "Selection":
        known = {"preset", "hooks", "layers", "positions", "sample", "require_opt_in"}
        unknown = set(sel) - known
        if unknown:
            raise SelectionError(f"selection has unknown keys {sorted(unknown)}; known: {sorted(known)}")
        kw: dict = {"enabled": enabled}
        if "preset" in sel or "hooks" in sel:
            kw["hooks"] = _hooks_from(sel.get("preset"), sel.get("hooks"))
        elif base is None:
            kw["hooks"] = frozenset(PRESETS["hidden-states"])
        if "layers" in sel:
            kw["layers"] = parse_layers(sel["layers"])
        if "positions" in sel:
            kw["positions"] = sel["positions"]
        sample = sel.get("sample")
        if sample is not None:
            if not isinstance(sample, dict) or not set(sample) <= {"every", "rate"}:
                raise SelectionError(f"sample must be {{'every': N}} or {{'rate': fraction}}, got {sample!r}")
            if "every" in sample:
                kw["sample_every"] = sample["every"]
            if "rate" in sample:
                kw["sample_rate"] = sample["rate"]
        if "require_opt_in" in sel:
            kw["require_opt_in"] = bool(sel["require_opt_in"])
        return replace(base, **kw) if base is not None else cls(**kw)

    def to_doc(self) -> dict:
        """The control document that selects exactly this (Selection.from_doc(s.to_doc()) == s)."""
        return {
            "version": CONTROL_DOC_VERSION,
            "enabled": self.enabled,
            "selection": {
                "hooks": sorted(self.hooks),
                "layers": None if self.layers is None else sorted(self.layers),
                "positions": self.positions,
                "sample": {"every": self.sample_every, "rate": self.sample_rate},
                "require_opt_in": self.require_opt_in,
            },
        }

    def for_request(self, options: dict | None) -> tuple["Selection", bool | None]:
        """(the selection for one request, its forced capture decision or None) from its options."""
        if not options:
            return self, None
        if not isinstance(options, dict):
            raise SelectionError(f"request options must be a dict, got {type(options).__name__}")
        unknown = set(options) - {"capture", "preset", "hooks", "layers", "positions"}
        if unknown:
            raise SelectionError(f"request options have unknown keys {sorted(unknown)}")
        forced = options.get("capture")
        if forced is not None and not isinstance(forced, bool):
            raise SelectionError(f"request option capture must be true or false, got {forced!r}")
        rest = {k: v for k, v in options.items() if k != "capture"}
        sel = self._from_selection_obj(rest, enabled=self.enabled, base=self) if rest else self
        return sel, forced
