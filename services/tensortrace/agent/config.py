"""Agent configuration: one dataclass, defaults in one place, validate() says what is wrong.

>>> cfg = AgentConfig(ring_dir="/tmp/tt", model_id="llama-tiny", pod="pod-a", ring_capacity=8 << 20)
>>> cfg.validate()
>>> cfg.ring_path(pid=4242)           # default: this process's pid
'/tmp/tt/pod-a-4242-r0.ring'
>>> AgentConfig(ring_capacity=1000, tp_rank=2).validate()
Traceback (most recent call last):
ValueError: invalid AgentConfig: ring_capacity 1000 must be a positive multiple of 64; tp_rank 2 must be within [0, tp_size=1)
"""

from __future__ import annotations

import enum
import os
import socket
from dataclasses import dataclass, field

from tensortrace.agent.forward_wrap import MECHANISMS
from tensortrace.ring.format import ALIGN
from tensortrace.ring.permissions import parse_id, parse_mode, ring_file_mode, ring_mode_problem


class OverflowPolicy(str, enum.Enum):
    """What the agent does with a slab that does not fit in the ring (docs/agent.md). A str enum:
    `AgentConfig(overflow_policy="block")` and `OverflowPolicy.BLOCK` are the same setting."""

    __str__ = str.__str__
    __format__ = str.__format__

    DROP_NEWEST = "drop_newest"
    DROP_REQUEST = "drop_request"
    BLOCK = "block"


OVERFLOW_POLICIES = tuple(p.value for p in OverflowPolicy)


def _default_pod() -> str:
    return os.environ.get("POD_NAME") or socket.gethostname()


def _default_node() -> str:
    return os.environ.get("NODE_NAME") or socket.gethostname()


def _env(name: str):
    """An optional setting from the environment, kept as text: validate() parses it and says what
    is wrong. The SGLang plugin and the HF backend both build AgentConfig, so both honour it."""
    return os.environ.get(name) or None


@dataclass
class AgentConfig:
    ring_dir: str = "/run/tensortrace"
    ring_capacity: int = 256 << 20        # bytes of the ring's data area
    model_id: str = ""
    pod: str = field(default_factory=_default_pod)
    node: str = field(default_factory=_default_node)
    tp_rank: int = 0
    tp_size: int = 1
    overflow_policy: str = OverflowPolicy.DROP_NEWEST  # drop_newest | drop_request | block
    block_timeout_s: float = 5.0          # only for overflow_policy="block"
    pending_summaries_max: int = 4096     # summaries kept while the ring is full, retried each step
    device: str = "cpu"                   # "cuda[:n]": set up the CUDA staging path at start-up
    prefault_ring: bool = True            # touch every ring page at start-up, not on the hot path
    device_staging_bytes: int = 256 << 20  # CUDA path: device-side staging ring
    commit_queue_max: int = 65536         # CUDA path: copies in flight awaiting their event
    # The tap path (agent/native.py): "auto" = the native fast path when it is built and
    # TENSORTRACE_NATIVE is not 0, else the Python path; "native" = required (an error without it);
    # "python" = the pure-Python path (the oracle the native path is tested against).
    capture_path: str = "auto"
    # How a tap reaches its module (agent/forward_wrap.py): "forward" = the module's forward wrapped
    # (PyTorch's module call stays on its fast path), "hooks" = PyTorch forward (pre-)hooks.
    module_taps: str = field(default_factory=lambda: _env("TENSORTRACE_MODULE_TAPS") or "forward")
    # Ring permissions (docs/operations.md "Ring permissions"): with a ring gid the ring is created
    # 0660 in that group (and a missing ring directory 2770 setgid), so the exporter reads it as a
    # member of the group; without one, 0600 (the exporter must then run as this uid).
    ring_gid: int | str | None = field(default_factory=lambda: _env("TENSORTRACE_RING_GID"))
    ring_mode: int | str | None = field(default_factory=lambda: _env("TENSORTRACE_RING_MODE"))  # octal; None: 0660 / 0600

    def validate(self) -> None:
        problems = []
        if not self.ring_dir:
            problems.append("ring_dir is empty")
        if self.ring_capacity <= 0 or self.ring_capacity % ALIGN:
            problems.append(f"ring_capacity {self.ring_capacity} must be a positive multiple of {ALIGN}")
        if self.overflow_policy in OVERFLOW_POLICIES:
            self.overflow_policy = OverflowPolicy(self.overflow_policy)
        else:
            problems.append(f"overflow_policy {self.overflow_policy!r} must be one of {', '.join(OVERFLOW_POLICIES)}")
        if self.block_timeout_s < 0:
            problems.append(f"block_timeout_s {self.block_timeout_s} must be >= 0")
        if self.tp_size < 1 or not 0 <= self.tp_rank < self.tp_size:
            problems.append(f"tp_rank {self.tp_rank} must be within [0, tp_size={self.tp_size})")
        if self.pending_summaries_max < 0:
            problems.append("pending_summaries_max must be >= 0")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            problems.append(f"device {self.device!r} must be 'cpu' or 'cuda[:n]'")
        if self.device_staging_bytes <= 0:
            problems.append("device_staging_bytes must be positive")
        if self.commit_queue_max < 1:
            problems.append("commit_queue_max must be >= 1")
        if self.capture_path not in ("auto", "native", "python"):
            problems.append(f"capture_path {self.capture_path!r} must be 'auto', 'native' or 'python'")
        if self.module_taps not in MECHANISMS:
            problems.append(f"module_taps (TENSORTRACE_MODULE_TAPS) {self.module_taps!r} must be one of "
                            f"{', '.join(MECHANISMS)}")
        if self.ring_gid is not None:
            try:
                self.ring_gid = parse_id(self.ring_gid, "TENSORTRACE_RING_GID (ring_gid)")
            except ValueError as e:
                problems.append(str(e))
        if self.ring_mode is not None:
            try:
                self.ring_mode = parse_mode(self.ring_mode)
            except ValueError as e:
                problems.append(f"TENSORTRACE_RING_MODE (ring_mode): {e}")
        if isinstance(self.ring_mode, int) and (self.ring_gid is None or isinstance(self.ring_gid, int)):
            why = ring_mode_problem(self.ring_mode, self.ring_gid)
            if why:
                problems.append(f"TENSORTRACE_RING_MODE (ring_mode): {why}")
        for name in ("pod", "model_id", "node"):
            if "/" in getattr(self, name) and name == "pod":
                problems.append(f"pod {self.pod!r} must not contain '/' (it names the ring file)")
        if problems:
            raise ValueError("invalid AgentConfig: " + "; ".join(problems))

    @property
    def ring_file_mode(self) -> int:
        """The ring file's mode: ring_mode if set, else 0660 with a ring gid, else 0600 (after validate())."""
        return ring_file_mode(self.ring_gid, self.ring_mode)

    def ring_path(self, pid: int | None = None) -> str:
        pid = os.getpid() if pid is None else pid
        return os.path.join(self.ring_dir, f"{self.pod}-{pid}-r{self.tp_rank}.ring")
