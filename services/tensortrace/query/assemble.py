"""Records of one request -> whole-sequence tensors per (hook, layer), and the request's completeness.

>>> captured = assemble(records)                # {(hook, layer): CapturedTensor}
>>> captured["resid_pre", 3].tensor.shape       # [positions, *row_shape], prefill and decode joined
>>> captured["resid_pre", 3].gaps               # [(start, end), ...] positions missing inside the range

Rules (docs/storage.md, "Read-back"):
  * TOKEN_RANGE records are placed at rows token_start - start of the covered range
    [min token_start, max token_end); rows no record covers stay zero and are listed in `gaps`.
  * TOKEN_LIST records: rows are ordered by position; `positions` lists them.
  * NO_TOKEN_AXIS records are stacked in step order on a new first axis.
  * Sharded hooks (tp_size > 1): each shard is assembled alone, then shards are concatenated on
    the last axis in tp_rank order. A replicated hook captured by several TP ranks keeps the
    lowest producer rank's copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tensortrace.v1 import records_pb2 as pb
from tensortrace.wire import codec


@dataclass
class CapturedTensor:
    hook: str
    layer: int
    tensor: object                       # torch.Tensor
    start: int = 0                       # first position covered (TOKEN_RANGE / TOKEN_LIST)
    end: int = 0                         # one past the last position covered
    gaps: list[tuple[int, int]] = field(default_factory=list)
    positions: list[int] | None = None   # TOKEN_LIST only
    records: int = 0
    prefill_rows: int = 0
    decode_rows: int = 0

    @property
    def complete_range(self) -> bool:
        return not self.gaps


@dataclass
class Completeness:
    """What the requests table says, checked against what is loaded.

    state: "complete"   summary says complete and every captured record is loaded
           "incomplete" summary says records were dropped or the request was cut short
           "loading"    summary present, fewer records loaded than captured (yet)
           "no_summary" tensors found but no summary (still in flight, or the producer died)
    """
    state: str
    records_captured: int = 0
    records_dropped: int = 0
    records_loaded: int = 0
    dropped_by_reason: dict[str, int] = field(default_factory=dict)
    incomplete_reason: str = ""
    prompt_tokens: int = 0
    generated_tokens: int = 0
    finish_reason: str = ""
    sampled: bool = True
    summaries: int = 0

    @property
    def complete(self) -> bool:
        return self.state == "complete"


def completeness(summaries: list[pb.RequestSummary], records_loaded: int) -> Completeness:
    if not summaries:
        return Completeness("no_summary", records_loaded=records_loaded)
    captured = sum(s.records_captured for s in summaries)
    dropped = sum(s.records_dropped for s in summaries)
    by_reason: dict[str, int] = {}
    for s in summaries:
        for k, v in s.dropped_by_reason.items():
            by_reason[k] = by_reason.get(k, 0) + v
    reasons = sorted({s.incomplete_reason for s in summaries if s.incomplete_reason})
    head = summaries[0]
    if not all(s.complete for s in summaries) or dropped:
        state = "incomplete"
    elif records_loaded < captured:
        state = "loading"
    else:
        state = "complete"
    return Completeness(state, captured, dropped, records_loaded, by_reason, "; ".join(reasons),
                        head.prompt_tokens, head.generated_tokens, head.finish_reason,
                        all(s.sampled for s in summaries), len(summaries))


def _merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _assemble_shard(hook: str, layer: int, recs: list[pb.TensorRecord]) -> CapturedTensor:
    import torch

    kinds = {r.positions_kind for r in recs}
    if len(kinds) > 1:
        raise codec.WireError(f"{hook}[{layer}]: records mix positions kinds {sorted(kinds)}")
    kind = kinds.pop()
    prefill = sum(r.shape[0] if r.shape else 1 for r in recs if r.phase == pb.PREFILL)
    decode = sum(r.shape[0] if r.shape else 1 for r in recs if r.phase == pb.DECODE)
    if kind == pb.NO_TOKEN_AXIS:
        recs = sorted(recs, key=lambda r: (r.step, r.seq))
        t = torch.stack([codec.record_to_tensor(r) for r in recs])
        return CapturedTensor(hook, layer, t, records=len(recs), prefill_rows=prefill, decode_rows=decode)
    if kind == pb.TOKEN_LIST:
        rows, pos = [], []
        for r in recs:
            t = codec.record_to_tensor(r)
            rows.extend(t.unbind(0))
            pos.extend(r.positions)
        order = sorted(range(len(pos)), key=pos.__getitem__)
        t = torch.stack([rows[i] for i in order]) if rows else torch.empty(0)
        ps = [pos[i] for i in order]
        return CapturedTensor(hook, layer, t, ps[0] if ps else 0, ps[-1] + 1 if ps else 0, [], ps,
                              len(recs), prefill, decode)
    # TOKEN_RANGE: one preallocated tensor, each record copied into its rows.
    start = min(r.token_start for r in recs)
    end = max(r.token_end for r in recs)
    first = codec.record_to_tensor(recs[0])
    out = torch.zeros((end - start, *first.shape[1:]), dtype=first.dtype)
    for i, r in enumerate(recs):
        t = first if i == 0 else codec.record_to_tensor(r)
        if tuple(t.shape[1:]) != tuple(out.shape[1:]):
            raise codec.WireError(f"{hook}[{layer}]: row shape {list(t.shape[1:])} at token {r.token_start} "
                                  f"differs from {list(out.shape[1:])}")
        out[r.token_start - start:r.token_end - start] = t
    covered = _merge_ranges([(r.token_start, r.token_end) for r in recs])
    gaps = [(a[1], b[0]) for a, b in zip(covered, covered[1:])]
    return CapturedTensor(hook, layer, out, start, end, gaps, None, len(recs), prefill, decode)


def assemble(records: list[pb.TensorRecord]) -> dict[tuple[str, int], CapturedTensor]:
    import torch

    groups: dict[tuple[str, int], list[pb.TensorRecord]] = {}
    for r in records:
        groups.setdefault((r.hook, r.layer), []).append(r)
    out: dict[tuple[str, int], CapturedTensor] = {}
    for (hook, layer), recs in sorted(groups.items()):
        sharded = max(r.tp_size for r in recs) > 1
        if not sharded:
            # Replicated hook captured by several ranks: keep the lowest producer rank's copy.
            lowest = min(r.producer.tp_rank for r in recs)
            out[hook, layer] = _assemble_shard(hook, layer, [r for r in recs if r.producer.tp_rank == lowest])
            continue
        shards = {}
        for r in recs:
            shards.setdefault(r.tp_rank, []).append(r)
        parts = [_assemble_shard(hook, layer, shards[k]) for k in sorted(shards)]
        merged = parts[0]
        merged.tensor = torch.cat([p.tensor for p in parts], dim=-1)
        merged.records = sum(p.records for p in parts)
        merged.gaps = _merge_ranges([g for p in parts for g in p.gaps])
        out[hook, layer] = merged
    return out
