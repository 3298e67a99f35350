"""SGLang backend configuration from environment variables (SGLang's processes are spawned with
the server's environment, so env vars reach every scheduler process; CLI flags would not).

    TENSORTRACE_RING_DIR=/run/tensortrace          where ring files go (one per scheduler process)
    TENSORTRACE_RING_CAPACITY=256M                 ring data area (bytes; K/M/G suffixes)
    TENSORTRACE_SELECTION=hidden-states            a preset name, or a JSON selection object
                                                   ({"preset": ..., "hooks": [...], "layers": "0-3",
                                                     "positions": "all", "sample": {"every": 1}})
    TENSORTRACE_MODEL_ID=llama-8b                  default: the model path's last component
    TENSORTRACE_OVERFLOW=drop_newest               drop_newest | drop_request | block
    TENSORTRACE_CUDA_GRAPH=static                  static: taps selected at graph capture copy into
                                                   static buffers inside the graph (a step wanting
                                                   another tap runs eagerly); eager: every decode step
                                                   that captures runs eagerly; skip: graph-replayed
                                                   decode steps are not captured (request incomplete)
    TENSORTRACE_DISABLE=1                          load the plugin but install nothing

>>> cfg = SGLangBackendConfig.from_env({"TENSORTRACE_RING_DIR": "/tmp/tt", "TENSORTRACE_SELECTION": "logits"})
>>> cfg.validate(); cfg.selection_doc()
{'selection': {'preset': 'logits'}}
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from tensortrace.agent.config import OVERFLOW_POLICIES

CUDA_GRAPH_MODES = ("static", "eager", "skip")
ENV_PREFIX = "TENSORTRACE_"


def parse_size(text: str) -> int:
    """'256M' -> 268435456; plain integers are bytes."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    num = t[:-1] if mult > 1 else t
    try:
        return int(float(num) * mult)
    except ValueError:
        raise ValueError(f"{text!r} is not a size (bytes, or a number with K/M/G)") from None


@dataclass
class SGLangBackendConfig:
    ring_dir: str = "/run/tensortrace"
    ring_capacity: int = 256 << 20
    selection: str = "hidden-states"
    model_id: str = ""
    overflow_policy: str = "drop_newest"
    cuda_graph: str = "static"
    disabled: bool = False

    @classmethod
    def from_env(cls, env: dict | None = None) -> "SGLangBackendConfig":
        env = os.environ if env is None else env
        cfg = cls()
        get = lambda k: env.get(ENV_PREFIX + k)  # noqa: E731
        if get("RING_DIR"):
            cfg.ring_dir = get("RING_DIR")
        if get("RING_CAPACITY"):
            cfg.ring_capacity = parse_size(get("RING_CAPACITY"))
        if get("SELECTION"):
            cfg.selection = get("SELECTION")
        if get("MODEL_ID"):
            cfg.model_id = get("MODEL_ID")
        if get("OVERFLOW"):
            cfg.overflow_policy = get("OVERFLOW")
        if get("CUDA_GRAPH"):
            cfg.cuda_graph = get("CUDA_GRAPH")
        cfg.disabled = (get("DISABLE") or "").lower() in ("1", "true", "yes")
        return cfg

    def selection_doc(self) -> dict:
        """The selection as a control document ({"selection": {...}}) for Selection.from_doc."""
        text = self.selection.strip()
        if text.startswith("{"):
            sel = json.loads(text)
            if not isinstance(sel, dict):
                raise ValueError("TENSORTRACE_SELECTION JSON must be an object")
            return {"selection": sel}
        return {"selection": {"preset": text}}

    def validate(self) -> None:
        problems = []
        if not self.ring_dir:
            problems.append("TENSORTRACE_RING_DIR is empty")
        if self.ring_capacity <= 0:
            problems.append(f"TENSORTRACE_RING_CAPACITY {self.ring_capacity} must be positive")
        if self.overflow_policy not in OVERFLOW_POLICIES:
            problems.append(f"TENSORTRACE_OVERFLOW {self.overflow_policy!r} must be one of {', '.join(OVERFLOW_POLICIES)}")
        if self.cuda_graph not in CUDA_GRAPH_MODES:
            problems.append(f"TENSORTRACE_CUDA_GRAPH {self.cuda_graph!r} must be one of {', '.join(CUDA_GRAPH_MODES)}")
        try:
            from tensortrace.agent.selection import Selection

            Selection.from_doc(self.selection_doc())
        except (ValueError, TypeError) as e:
            problems.append(f"TENSORTRACE_SELECTION {self.selection!r}: {e}")
        if problems:
            raise ValueError("invalid TensorTrace SGLang configuration: " + "; ".join(problems))
