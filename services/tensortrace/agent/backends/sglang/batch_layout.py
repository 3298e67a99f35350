"""SGLang ForwardBatch -> StepLayout: which token rows of a forward belong to which request.

Reads only host-side fields of the ForwardBatch (no device sync): `forward_mode`, `batch_size`,
`input_ids.shape[0]`, `seq_lens_cpu`, `extend_seq_lens_cpu`, `extend_prefix_lens_cpu`, `rids`.

Per forward mode (v0_5.MODES_CAPTURED / MODES_SKIPPED; docs/sglang.md):
- EXTEND: rows are the *new* tokens of each request, concatenated in batch order. Tokens served
  from the radix cache (prefix hits) and earlier chunks of a chunked prefill are not recomputed,
  so they have no rows: a request's rows start at position `extend_prefix_lens_cpu[i]`.
- MIXED (chunked prefill mixed with running decodes): laid out like EXTEND; the running decode
  requests are appended with one new token each.
- DECODE: one row per request, at position `seq_lens_cpu[i] - 1`. Rows past `batch_size` (CUDA
  graph padding to the captured batch size) belong to no request and are never exported.
- IDLE, TARGET_VERIFY, DRAFT_EXTEND_V2, PREBUILT, SPLIT_PREFILL, DLLM_EXTEND: not captured (the
  reason is returned and counted).

Phase: a request's rows are DECODE when their first position is at or past the request's prompt
length (a generated token), else PREFILL. The prompt length comes from the request registry; when
it is unknown, EXTEND rows are PREFILL and DECODE rows DECODE.

    plan = plan_step(forward_batch, prompt_len={"a": 5, "b": 3}.get)
    plan.layout.requests[0]   # RequestRows('a', row_start=0, row_count=5, position_start=0, PREFILL)
"""

from __future__ import annotations

from operator import itemgetter
from typing import Callable, Sequence

from torch import Tensor as _Tensor

from tensortrace.agent.backends.sglang import v0_5
from tensortrace.agent.layout import Phase, RequestRows, ShiftedRows, StepLayout


class StepPlan(tuple):
    """(mode, layout, skip_reason): the ForwardMode name, the StepLayout (None: this forward is not
    captured) and why not. A tuple made by one C call, `StepPlan((mode, layout, reason))`, and read
    through C properties: plan_step runs every forward, and a dataclass's __init__ would be one more
    Python frame on the scheduler thread."""

    __slots__ = ()
    mode = property(itemgetter(0))
    layout = property(itemgetter(1))
    skip_reason = property(itemgetter(2))

    def __repr__(self) -> str:
        return f"StepPlan(mode={self[0]!r}, layout={self[1]!r}, skip_reason={self[2]!r})"


class LayoutError(ValueError):
    """The ForwardBatch's fields contradict each other (names the field)."""


def _mode_name(mode) -> str:
    return getattr(mode, "name", None) or str(mode)


def _as_list(v) -> list[int]:
    if v is None:
        return []
    out = v.tolist() if hasattr(v, "tolist") else list(v)
    if out and type(out[0]) is not int:   # (an integer tensor's tolist() is ints already)
        out = [int(x) for x in out]
    return out


class _DecodeShape:
    """The StepLayout.shape token of a DECODE layout built here, shared by the layouts advanced
    from it: the ForwardMode object it was built for, its request ids, whether every row is past a
    known prompt length (phase DECODE: it stays so, as positions only grow and a live request's
    prompt length is fixed), and the seq_lens of the newest layout of the shape (`last`).
    plan_step recognises the next decode step of the same batch with two list comparisons,
    reading no RequestRows (in one C call, `advance_decode`, where the native extension is built)."""

    __slots__ = ("mode", "rids", "all_decode", "last", "last_seq_lens")

    def __init__(self, rids: list, all_decode: bool, seq_lens: list, mode=None):
        self.mode, self.rids, self.all_decode, self.last, self.last_seq_lens = mode, rids, all_decode, None, seq_lens


def _load_advance_decode():
    """agent/_capture.c's advance_decode (told this module's layout classes), or None (not built,
    or TENSORTRACE_NATIVE=0): plan_step's Python then reads the fields itself (the same answers;
    tests/sglang/test_sglang_batch_layout.py checks both)."""
    from tensortrace.agent import native

    mod, _ = native.load()
    if mod is None:
        return None
    mod.layout_types(StepLayout, ShiftedRows, _DecodeShape)
    return mod.advance_decode


# advance_decode(fb, previous) -> previous.advanced(1) (recorded in its shape) when `fb` is the steady
# decode step after `previous`, else None: plan_step's steady case in one C call. The SGLang plugin
# calls it itself before plan_step, so such a step runs no Python frame of this module.
advance_decode = _load_advance_decode()


_PLUS_ONE = (1).__add__
_last_mode = [object(), ""]   # (the last ForwardMode object plan_step saw, its name)


def plan_step(fb, prompt_len: Callable[[str], int | None] = lambda rid: None,
              rids: Sequence[str] | None = None, previous: StepLayout | None = None) -> StepPlan:
    """Build the StepLayout of one SGLang forward. `rids` overrides `fb.rids` (SGLang < 0.5.15
    has no ForwardBatch.rids: the plugin passes the ScheduleBatch's request ids).

    `previous`: the layout of the previous captured forward. A DECODE forward of exactly its
    requests, rows, slots and phases, each one position further on, is returned as
    `previous.advanced(1)` (the agent then repeats the previous step's plan; docs/agent.md).
    `prompt_len`'s answer for a live request must not change once known (a request's prompt
    length is fixed; an unknown one, None, may become known)."""
    if previous is not None and rids is None:
        shape = previous.shape
        if shape.__class__ is _DecodeShape and shape.last is previous and shape.all_decode and advance_decode:
            # The steady decode step (the same batch, one token further), read and advanced in one
            # C call; any other answer (None) goes the Python way below, which decides every case.
            layout = advance_decode(fb, previous)
            if layout is not None:
                return StepPlan(("DECODE", layout, ""))
    fm = fb.forward_mode
    if fm is _last_mode[0]:
        mode = _last_mode[1]
    else:   # (an enum's name is a Python property: asked once per mode object, not every forward)
        mode = _mode_name(fm)
        _last_mode[:] = (fm, mode)
    if mode not in v0_5.MODES_CAPTURED:
        return StepPlan((mode, None, v0_5.MODES_SKIPPED.get(mode, f"forward mode {mode} is not captured")))
    bs = int(fb.batch_size)
    rids = list(rids if rids is not None else (getattr(fb, "rids", None) or ()))
    if bs == 0:
        return StepPlan((mode, None, "empty batch"))
    if len(rids) != bs:
        raise LayoutError(f"{mode}: {len(rids)} request ids for batch_size {bs} (ForwardBatch.rids)")
    total_rows = int(fb.input_ids.shape[0])
    requests: list[RequestRows] = []
    shape = None   # DECODE: the layout's _DecodeShape
    if mode == "DECODE":
        # padded graph batches carry extra entries (a CPU int tensor's tolist() is ints: no helper's frame)
        seq_lens = fb.seq_lens_cpu
        seq_lens = (seq_lens.tolist() if seq_lens.__class__ is _Tensor else _as_list(seq_lens))[:bs]
        if len(seq_lens) != bs:
            raise LayoutError(f"DECODE: seq_lens_cpu has {len(seq_lens)} entries for batch_size {bs}")
        if total_rows < bs:
            raise LayoutError(f"DECODE: {total_rows} input rows for batch_size {bs}")
        if previous is not None and previous.total_rows == total_rows:
            shape = previous.shape
            if (shape.__class__ is _DecodeShape and shape.all_decode and shape.last is previous
                    and shape.rids == rids and seq_lens == list(map(_PLUS_ONE, shape.last_seq_lens))):
                layout = shape.last = previous.advanced(1)   # the same batch, one token further
                shape.last_seq_lens = seq_lens
                return StepPlan((mode, layout, ""))
            if previous.num_sequences == bs and len(previous.requests) == bs:
                # (a row inside its prompt, or an unknown prompt length: phases checked one by one)
                same = True
                for i, (r, rid, n) in enumerate(zip(previous.requests, rids, seq_lens)):
                    if (r.request_id != rid or r.position_start != n - 2 or r.row_start != i or r.row_count != 1
                            or r.seq_index != i or r.phase != _phase(n - 1, prompt_len(rid), Phase.DECODE)):
                        same = False
                        break
                if same:
                    layout = previous.advanced(1)
                    if shape.__class__ is _DecodeShape:
                        shape.last, shape.last_seq_lens = layout, seq_lens
                    return StepPlan((mode, layout, ""))
        all_decode = True   # every row past a known prompt length
        for i, (rid, n) in enumerate(zip(rids, seq_lens)):
            pos, prompt = n - 1, prompt_len(rid)
            phase = _phase(pos, prompt, Phase.DECODE)
            all_decode = all_decode and prompt is not None and phase is Phase.DECODE
            requests.append(RequestRows(rid, row_start=i, row_count=1, position_start=pos, phase=phase, seq_index=i))
        shape = _DecodeShape(rids, all_decode, seq_lens, fm)
    else:  # EXTEND, MIXED
        ext = _as_list(fb.extend_seq_lens_cpu)
        pre = _as_list(fb.extend_prefix_lens_cpu)
        if len(ext) != bs or len(pre) != bs:
            raise LayoutError(f"{mode}: extend_seq_lens_cpu ({len(ext)}) / extend_prefix_lens_cpu ({len(pre)}) "
                              f"do not have batch_size {bs} entries")
        row = 0
        for i, (rid, n, p) in enumerate(zip(rids, ext, pre)):
            if n > 0:
                requests.append(RequestRows(rid, row_start=row, row_count=n, position_start=p,
                                            phase=_phase(p, prompt_len(rid), Phase.PREFILL), seq_index=i))
            row += n
        if row > total_rows:
            raise LayoutError(f"{mode}: extend_seq_lens_cpu sums to {row} rows, input_ids has {total_rows}")
    try:
        layout = StepLayout(requests=tuple(requests), total_rows=total_rows, num_sequences=bs, shape=shape)
    except ValueError as e:
        raise LayoutError(f"{mode}: {e}") from None
    if shape is not None:
        shape.last = layout
    return StepPlan((mode, layout, ""))


def _phase(position_start: int, prompt_tokens: int | None, default: Phase) -> Phase:
    if prompt_tokens is None:
        return default
    return Phase.DECODE if position_start >= prompt_tokens else Phase.PREFILL
