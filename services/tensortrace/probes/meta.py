"""A probe's metadata (the JSON half of a probe file) and the names it may use.

The JSON is data, never code: every field is checked against the lists below, a field this SDK
does not know is refused (so a file that asks for a class, module or code path fails loudly), and
the probe's class is looked up by `kind` among the built-in kinds and the installed entry points
of group `tensortrace.probes` only.

    meta = ProbeMeta(model_id="smollm2-135m-instruct", hook="resid_pre", layers=[10], width=576,
                     pooling="mean")
    meta.in_dim          # 576 (concat of several layers: width * len(layers))
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

FORMAT = "tensortrace.probe"
FORMAT_VERSION = 1

# pooling -> its parameters and their defaults (a parameter not listed is refused)
POOLINGS: dict[str, dict[str, Any]] = {
    "last": {},                      # the score of the last masked token (highest position)
    "mean": {},                      # mean of per-token logits (= linear probe on mean-pooled rows)
    "max": {},                       # max of per-token logits
    "ema": {"alpha": 0.5},           # max over tokens of the exponential moving average of logits
    "rolling_max": {"window": 8},    # max over tokens of the mean of the last `window` logits
    "attention": {},                 # softmax(q . x_t)-weighted mean of logits; q is a learned vector
}
POSITIONS = ("prompt", "generated", "all")
LAYER_COMBINE = ("concat", "mean")
# How `layers` are numbered: the hook catalog's decoder-layer index, 0-based; for resid_pre,
# layer L is the input of decoder layer L = Hugging Face `output_hidden_states[L]`.
LAYER_NUMBERING = ("decoder_index",)
BUILTIN_KINDS = ("linear",)

# keys that would make the file name something to import or run: refused with their own message
CODE_KEYS = ("class", "module", "code", "callable", "import", "entry_point", "factory", "source", "pickle",
             "path", "script", "function")


@dataclass
class ProbeMeta:
    model_id: str
    hook: str
    layers: list[int]
    width: int
    pooling: str = "mean"
    pooling_params: dict[str, Any] = field(default_factory=dict)
    positions: str = "all"
    layer_combine: str = "concat"
    layer_numbering: str = "decoder_index"
    model_config_hash: str = ""
    model_label: str = ""
    threshold: float = 0.5
    calibration: dict[str, Any] = field(default_factory=dict)
    train_data_hash: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    kind: str = "linear"
    name: str = ""
    description: str = ""
    created_unix: float = 0.0

    @property
    def in_dim(self) -> int:
        """Length of the vector one token gives the per-token transform."""
        return self.width * len(self.layers) if self.layer_combine == "concat" else self.width

    def params(self) -> dict[str, Any]:
        """Pooling parameters with defaults filled in."""
        return {**POOLINGS[self.pooling], **self.pooling_params}

    def problems(self) -> list[str]:
        out = []
        if not isinstance(self.model_id, str) or not self.model_id:
            out.append("model_id: must be a non-empty string")
        if not isinstance(self.hook, str) or not self.hook:
            out.append("hook: must be a non-empty string")
        if (not isinstance(self.layers, list) or not self.layers
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in self.layers)):
            out.append(f"layers: {self.layers!r} must be a non-empty list of integers (use [-1] for a global hook)")
        elif len(set(self.layers)) != len(self.layers):
            out.append(f"layers: {self.layers!r} has duplicates")
        if not isinstance(self.width, int) or isinstance(self.width, bool) or self.width <= 0:
            out.append(f"width: {self.width!r} must be a positive integer (the hook's hidden size)")
        if self.pooling not in POOLINGS:
            out.append(f"pooling: unknown pooling {self.pooling!r}; poolings: {', '.join(POOLINGS)}")
        elif not isinstance(self.pooling_params, dict):
            out.append("pooling_params: must be an object")
        else:
            extra = set(self.pooling_params) - set(POOLINGS[self.pooling])
            if extra:
                out.append(f"pooling_params: {sorted(extra)} not parameters of pooling {self.pooling!r} "
                           f"(it takes {sorted(POOLINGS[self.pooling]) or 'none'})")
            p = self.params()
            if "alpha" in p and not (isinstance(p["alpha"], (int, float)) and 0 < p["alpha"] <= 1):
                out.append(f"pooling_params.alpha: {p['alpha']!r} must be in (0, 1]")
            if "window" in p and not (isinstance(p["window"], int) and p["window"] >= 1):
                out.append(f"pooling_params.window: {p['window']!r} must be an integer >= 1")
        if self.positions not in POSITIONS:
            out.append(f"positions: {self.positions!r} must be one of {', '.join(POSITIONS)}")
        if self.layer_combine not in LAYER_COMBINE:
            out.append(f"layer_combine: {self.layer_combine!r} must be one of {', '.join(LAYER_COMBINE)}")
        if self.layer_numbering not in LAYER_NUMBERING:
            out.append(f"layer_numbering: {self.layer_numbering!r} is not a convention this SDK knows "
                       f"({', '.join(LAYER_NUMBERING)})")
        if not isinstance(self.threshold, (int, float)) or isinstance(self.threshold, bool):
            out.append(f"threshold: {self.threshold!r} must be a number")
        for name in ("calibration", "metrics"):
            if not isinstance(getattr(self, name), dict):
                out.append(f"{name}: must be an object")
        return out

    def to_json_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_json_dict(cls, d: Any) -> "ProbeMeta":
        """Raises ValueError with every problem named."""
        if not isinstance(d, dict):
            raise ValueError(f"the metadata must be a JSON object, not {type(d).__name__}")
        code = [k for k in d if k.lower() in CODE_KEYS]
        if code:
            raise ValueError(f"field(s) {code} ask for code to be loaded; probe files carry data only — "
                             f"probe classes come from the installed package or the 'tensortrace.probes' "
                             f"entry points, chosen by 'kind'")
        if d.get("format") != FORMAT:
            raise ValueError(f"format is {d.get('format')!r}, not {FORMAT!r}")
        if d.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format_version {d.get('format_version')!r} is not {FORMAT_VERSION}")
        known = set(cls.__dataclass_fields__)
        body = {k: v for k, v in d.items() if k not in ("format", "format_version")}
        unknown = sorted(set(body) - known)
        if unknown:
            raise ValueError(f"unknown field(s) {unknown}")
        missing = [k for k in ("model_id", "hook", "layers", "width") if k not in body]
        if missing:
            raise ValueError(f"missing field(s) {missing}")
        meta = cls(**body)
        problems = meta.problems()
        if problems:
            raise ValueError("; ".join(problems))
        return meta
