"""Records of one request -> whole-sequence tensors per (hook, layer), and the request's completeness.

    captured = assemble(records)                # {(hook, layer): CapturedTensor}
    captured["resid_pre", 3].tensor.shape       # [positions, *row_shape], prefill and decode joined
    captured["resid_pre", 3].gaps               # [(start, end), ...] positions missing inside the range

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

import math
from dataclasses import dataclass, field

import numpy as np

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


def _merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _raw(r) -> bytes | memoryview:
    """RAW bytes of a stored record, validated against its shape and dtype."""
    elem = codec.element_size(r.dtype)
    if r.raw_size != math.prod(r.shape) * elem:
        raise codec.WireError(f"{r.hook}[{r.layer}] seq {r.seq}: raw_size {r.raw_size} does not match shape {list(r.shape)}")
    if r.encoding == pb.RAW:
        if len(r.payload) != r.raw_size:
            raise codec.WireError(f"{r.hook}[{r.layer}] seq {r.seq}: RAW payload of {len(r.payload)} bytes, raw_size {r.raw_size}")
        return r.payload
    return codec.decode_payload(r.payload, r.encoding, r.raw_size, elem)


def _tensor_from(buf: np.ndarray, dtype_code: int, shape: tuple):
    import torch

    t = torch.from_numpy(buf)
    if buf.size == 0:
        return torch.empty(shape, dtype=codec.torch_dtype(dtype_code))
    return t.view(codec.torch_dtype(dtype_code)).reshape(shape)


def _assemble_shard(hook: str, layer: int, recs: list) -> CapturedTensor:
    kinds = {r.positions_kind for r in recs}
    if len(kinds) > 1:
        raise codec.WireError(f"{hook}[{layer}]: records mix positions kinds {sorted(kinds)}")
    kind = kinds.pop()
    dtypes = {r.dtype for r in recs}
    row_shapes = {tuple(r.shape[1:]) for r in recs} if kind != pb.NO_TOKEN_AXIS else {tuple(r.shape) for r in recs}
    if len(dtypes) > 1 or len(row_shapes) > 1:
        raise codec.WireError(f"{hook}[{layer}]: records disagree on dtype {sorted(dtypes)} or row shape {sorted(row_shapes)}")
    dtype, row_shape = dtypes.pop(), row_shapes.pop()
    prefill = sum(r.shape[0] if r.shape else 1 for r in recs if r.phase == pb.PREFILL)
    decode = sum(r.shape[0] if r.shape else 1 for r in recs if r.phase == pb.DECODE)
    row_bytes = math.prod(row_shape) * codec.element_size(dtype)
    if kind == pb.NO_TOKEN_AXIS:
        recs = sorted(recs, key=lambda r: (r.step, r.seq))
        buf = np.empty(len(recs) * row_bytes, dtype=np.uint8)
        for i, r in enumerate(recs):
            buf[i * row_bytes:(i + 1) * row_bytes] = np.frombuffer(_raw(r), dtype=np.uint8)
        return CapturedTensor(hook, layer, _tensor_from(buf, dtype, (len(recs), *row_shape)), records=len(recs),
                              prefill_rows=prefill, decode_rows=decode)
    if kind == pb.TOKEN_LIST:
        rows: list[tuple[int, memoryview]] = []
        for r in recs:
            raw = memoryview(_raw(r))
            for j, pos in enumerate(r.positions):
                rows.append((pos, raw[j * row_bytes:(j + 1) * row_bytes]))
        rows.sort(key=lambda x: x[0])
        buf = np.empty(len(rows) * row_bytes, dtype=np.uint8)
        for i, (_, raw) in enumerate(rows):
            buf[i * row_bytes:(i + 1) * row_bytes] = np.frombuffer(raw, dtype=np.uint8)
        ps = [p for p, _ in rows]
        return CapturedTensor(hook, layer, _tensor_from(buf, dtype, (len(rows), *row_shape)),
                              ps[0] if ps else 0, ps[-1] + 1 if ps else 0, [], ps, len(recs), prefill, decode)
    # TOKEN_RANGE: one buffer for the whole range; each record's bytes copied once into its rows.
    start = min(r.token_start for r in recs)
    end = max(r.token_end for r in recs)
    buf = np.zeros((end - start) * row_bytes, dtype=np.uint8)
    out = memoryview(buf)  # slice assignment of a memoryview: the cheapest per-record copy
    for r in recs:
        a = (r.token_start - start) * row_bytes
        out[a:a + r.raw_size] = _raw(r)
    covered = _merge_ranges([(r.token_start, r.token_end) for r in recs])
    gaps = [(x[1], y[0]) for x, y in zip(covered, covered[1:])]
    return CapturedTensor(hook, layer, _tensor_from(buf, dtype, (end - start, *row_shape)), start, end, gaps, None,
                          len(recs), prefill, decode)


def assemble(records: list) -> dict[tuple[str, int], CapturedTensor]:
    """records: StoredTensor (backend.py) objects, or TensorRecords (converted)."""
    from tensortrace.query.backend import StoredTensor

    records = [StoredTensor.from_record(r) if isinstance(r, pb.TensorRecord) else r for r in records]
    import torch

    groups: dict[tuple[str, int], list[pb.TensorRecord]] = {}
    for r in records:
        groups.setdefault((r.hook, r.layer), []).append(r)
    out: dict[tuple[str, int], CapturedTensor] = {}
    for (hook, layer), recs in sorted(groups.items()):
        sharded = max(r.tp_size for r in recs) > 1
        if not sharded:
            # Replicated hook captured by several ranks: keep the lowest producer rank's copy.
            lowest = min(r.producer_rank for r in recs)
            out[hook, layer] = _assemble_shard(hook, layer, [r for r in recs if r.producer_rank == lowest])
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


def _fast_token_range(page, idx: np.ndarray) -> CapturedTensor | None:
    """One (hook, layer) group of a RecordPage assembled from its columns, for the common case:
    TOKEN_RANGE rows, RAW payloads, one dtype and row shape, unsharded, one producer rank. None
    when the group is anything else (the record-by-record path handles it)."""
    kind = page.positions_kind[idx]
    if (kind != pb.TOKEN_RANGE).any() or (page.encoding[idx] != pb.RAW).any() or (page.tp_size[idx] > 1).any():
        return None
    if (page.producer_rank[idx] != page.producer_rank[idx[0]]).any():
        return None
    il = idx.tolist()
    dtypes = {page.dtype[i] for i in il}
    shapes = {id(page.shape[i]): page.shape[i] for i in il}   # shape lists are shared per distinct value
    row_shapes = {tuple(sh[1:]) for sh in shapes.values()}
    if len(dtypes) != 1 or len(row_shapes) != 1 or any(not sh for sh in shapes.values()):
        return None
    dtype, row_shape = dtypes.pop(), row_shapes.pop()
    elem = codec.element_size(dtype)
    row_bytes = math.prod(row_shape) * elem
    hook, layer = page.hook, int(page.layer[il[0]])
    t0, t1, raw = page.token_start[idx], page.token_end[idx], page.raw_size[idx]
    nrows = np.array([page.shape[i][0] for i in il], dtype=np.int64)
    lens = page.ends[idx] - page.starts[idx]
    bad = (raw != nrows * row_bytes) | (lens != raw) | (t1 - t0 != nrows)
    if bad.any():
        j = il[int(np.argmax(bad))]
        raise codec.WireError(f"{hook}[{layer}] seq {int(page.seq[j])}: payload of {int(page.ends[j] - page.starts[j])} "
                              f"bytes, raw_size {int(page.raw_size[j])}, shape {list(page.shape[j])}, "
                              f"tokens [{int(page.token_start[j])}, {int(page.token_end[j])}) do not agree")
    start, end = int(t0.min()), int(t1.max())
    buf = np.zeros((end - start) * row_bytes, dtype=np.uint8)
    out, data = memoryview(buf), page.data
    for a, s, e in zip(((t0 - start) * row_bytes).tolist(), page.starts[idx].tolist(), page.ends[idx].tolist()):
        out[a:a + (e - s)] = data[s:e]
    order = np.argsort(t0, kind="stable")
    s_sorted, e_sorted = t0[order], t1[order]
    reach = np.maximum.accumulate(e_sorted)
    holes = np.nonzero(s_sorted[1:] > reach[:-1])[0]
    gaps = [(int(reach[k]), int(s_sorted[k + 1])) for k in holes]
    phase = page.phase[idx]
    prefill, decode = int(nrows[phase == pb.PREFILL].sum()), int(nrows[phase == pb.DECODE].sum())
    tensor = _tensor_from(buf, dtype, (end - start, *row_shape))
    return CapturedTensor(hook, layer, tensor, start, end, gaps, None, len(il), prefill, decode)


def iter_assembled(pages):
    """((hook, layer), CapturedTensor) for each group of backend.RecordPage column pages (each
    holds whole (hook, layer) groups of one hook), as soon as each is assembled: the common group
    shape from the columns, anything else record by record."""
    for page in pages:
        if not len(page):
            continue
        recs = None
        for layer in np.unique(page.layer).tolist():
            idx = np.nonzero(page.layer == layer)[0]
            got = _fast_token_range(page, idx)
            if got is None:
                recs = recs if recs is not None else list(page.records())
                got = assemble([recs[i] for i in idx.tolist()])[page.hook, layer]
            yield (page.hook, layer), got


def assemble_pages(pages) -> dict[tuple[str, int], CapturedTensor]:
    """Like assemble(), from backend.RecordPage column pages; sorted by (hook, layer)."""
    return dict(sorted(iter_assembled(pages)))
