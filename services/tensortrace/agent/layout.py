"""StepLayout: which rows of one forward step's tapped tensors belong to which request.

The backend adapter (HF, SGLang) builds one per forward; the agent core uses it to attribute
rows, and writes it into the ring as the step's STEP frame. Rows are the *flattened token rows*
of a tapped tensor: a [batch, seq, ...] tensor is seen as [batch * seq, ...]; a [tokens, ...]
tensor (SGLang, MoE routers) as is. Each request of the step owns one contiguous range of rows
(its `RequestRows`); rows of no request are padding (HF left padding, rows of finished requests,
CUDA-graph padding) and are never exported.

Some tensors have one row per *sequence slot* instead of one per token (the logits of the last
token only, as HF `generate` computes them in prefill and SGLang's LogitsProcessor always does).
Each RequestRows names its sequence slot (`seq_index`); a tensor with `num_sequences` rows is read
in that domain, and each request contributes the row of its slot, at the position of its last token.

(These were called "spans" before; "span" is kept for the W3C/OpenTelemetry span of a request.)

>>> layout = StepLayout(requests=(RequestRows("r1", row_start=2, row_count=3, position_start=0,
...                                           phase=Phase.PREFILL, seq_index=0),),
...                     total_rows=5, num_sequences=1)
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field


class Phase(enum.IntEnum):
    """Values equal tensortrace.v1.Phase (records.proto)."""

    PREFILL = 1
    DECODE = 2


class RowDomain(enum.Enum):
    TOKENS = "tokens"        # one row per token row of the step
    SEQUENCES = "sequences"  # one row per sequence slot (last token of each)

    # Members are singletons: hashed by identity (in C), not by Enum.__hash__ (a Python call per
    # hash, paid by every repeat step for each of its part groups' keys).
    __hash__ = object.__hash__


@dataclass(frozen=True)
class RequestRows:
    """One request's rows in one step: rows [row_start, row_start + row_count) are token positions
    [position_start, position_start + row_count) of that request."""

    request_id: str
    row_start: int
    row_count: int
    position_start: int
    phase: Phase
    seq_index: int = -1  # the request's slot in a per-sequence tensor; -1 = its index in layout.requests

    @property
    def last_position(self) -> int:
        return self.position_start + self.row_count - 1


class ShiftedRows(Sequence):
    """The `requests` of an advanced StepLayout: the RequestRows of `base` (a built layout's), each
    position `delta` further on, made (and kept) when read — a repeat step reads few or none of
    them, so advancing a batch of any size costs the same. Compares equal to the tuple it stands for."""

    __slots__ = ("base", "delta", "_made")

    def __init__(self, base: tuple, delta: int):
        self.base, self.delta, self._made = base, delta, {}

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return tuple(self)[i]
        b = self.base[i]   # (IndexError as a tuple's)
        if self.delta == 0:
            return b
        if i < 0:
            i += len(self.base)
        r = self._made.get(i)
        if r is None:
            r = object.__new__(RequestRows)   # a frozen dataclass: its fields, without __init__'s setattr
            d = r.__dict__
            d.update(b.__dict__)
            d["position_start"] = b.position_start + self.delta
            self._made[i] = r
        return r

    def __iter__(self):
        for i in range(len(self.base)):
            yield self[i]

    def __eq__(self, other):
        if isinstance(other, (tuple, ShiftedRows)):
            return tuple(self) == tuple(other)
        return NotImplemented

    def __hash__(self):
        return hash(tuple(self))

    def __add__(self, other):
        return tuple(self) + tuple(other)

    def __radd__(self, other):
        return tuple(other) + tuple(self)

    def __repr__(self) -> str:
        return repr(tuple(self))


@dataclass(frozen=True)
class StepLayout:
    requests: tuple[RequestRows, ...]  # one per request with rows in this step (advanced(): a ShiftedRows)
    total_rows: int               # token rows of the step's tensors, padding included
    num_sequences: int = -1       # sequence slots (rows of per-sequence tensors); -1 = len(requests)
    # Set by advanced(): a token shared by every layout advanced from one built layout (the same
    # requests, rows, phases and slots; only positions differ). The agent reuses the previous
    # step's plan for such a layout (CaptureAgent.begin_step, "repeat steps").
    shape: object = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.num_sequences < 0:
            object.__setattr__(self, "num_sequences", len(self.requests))
        self.validate()

    def advanced(self, delta: int = 1) -> "StepLayout":
        """This layout one step on: the same request rows, each position `delta` further (a decode
        step after a decode step with the same requests). Not validated again: the rows are those
        of this (validated) layout, and positions only grow. O(1): the new layout's `requests` is a
        ShiftedRows view of the built layout's, whose RequestRows are made when read."""
        if delta < 0:
            raise ValueError(f"StepLayout.advanced: delta {delta} must not be negative")
        shape = self.shape
        if shape is None:
            shape = object()
            object.__setattr__(self, "shape", shape)
        rows = self.requests
        view = object.__new__(ShiftedRows)   # (ShiftedRows(...) without its __init__'s frame: every decode step)
        if rows.__class__ is ShiftedRows:
            view.base, view.delta = rows.base, rows.delta + delta
        else:
            view.base, view.delta = rows, delta
        view._made = {}
        out = object.__new__(StepLayout)
        out.__dict__.update(requests=view, total_rows=self.total_rows, num_sequences=self.num_sequences, shape=shape)
        return out

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistency (overlapping or out-of-range rows)."""
        seen_ids: set[str] = set()
        taken: list[tuple[int, int]] = []
        slots: set[int] = set()
        for i, s in enumerate(self.requests):
            if s.request_id in seen_ids:
                raise ValueError(f"request rows {i}: request {s.request_id!r} appears twice in one step")
            seen_ids.add(s.request_id)
            if s.row_count <= 0:
                raise ValueError(f"request rows {i} ({s.request_id}): row_count {s.row_count} must be positive")
            if s.row_start < 0 or s.row_start + s.row_count > self.total_rows:
                raise ValueError(f"request rows {i} ({s.request_id}): rows [{s.row_start}, {s.row_start + s.row_count}) "
                                 f"outside the step's {self.total_rows} rows")
            if s.position_start < 0:
                raise ValueError(f"request rows {i} ({s.request_id}): negative position_start")
            slot = self.slot(i)
            if not 0 <= slot < self.num_sequences or slot in slots:
                raise ValueError(f"request rows {i} ({s.request_id}): sequence slot {slot} invalid or reused "
                                 f"(num_sequences {self.num_sequences})")
            slots.add(slot)
            taken.append((s.row_start, s.row_start + s.row_count))
        taken.sort()
        for (a0, a1), (b0, b1) in zip(taken, taken[1:]):
            if b0 < a1:
                raise ValueError(f"request rows overlap: rows [{a0}, {a1}) and [{b0}, {b1})")

    def slot(self, request_index: int) -> int:
        """The sequence slot of `requests[request_index]`."""
        s = self.requests[request_index]
        return s.seq_index if s.seq_index >= 0 else request_index

    def domain_of(self, rows: int) -> RowDomain | None:
        """How to read a tensor with `rows` leading rows in this step (None: it matches neither)."""
        if rows == self.total_rows:
            return RowDomain.TOKENS
        if rows == self.num_sequences:
            return RowDomain.SEQUENCES
        return None
