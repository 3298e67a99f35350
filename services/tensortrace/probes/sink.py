"""The probe service's sink: released requests -> scores -> the scores topic, durable before the
activation offsets behind them are committed.

    sink = ScoresSink(probes, publisher, timeout_s=30.0)           # a tensortrace.consume.Sink
    core = ConsumerCore(cfg, sink, name="probes")

    Kafka ──> ConsumerCore ──> ScoresSink ──(RequestView: group by request, de-duplicate, release
                                   │          COMPLETE / TIMEOUT / EVICTED with the shared completeness rule;
                                   │          keep(): only the payloads some probe needs are held)
                                   └─ flush: each released request x each probe that fits its model
                                             -> ProbeScore -> scores topic (+ escalation topic), acks=all
                                             -> only then the core commits the offsets read before them

Reading only what the probes need. The view calls `keep(record)` once per distinct record of an
open request; it answers from the current probe snapshot with two dict lookups (model, hook) ->
layer -> phases. A record no probe needs is counted for completeness and its payload is never
decompressed or converted (`records_skipped`, `bytes_skipped`); the consume core has parsed its
envelope, nothing more. The first record of a new (model, hook) triggers the probes' stream check
(service_probeset.ProbeDirectory.observe) before the answer.

Completeness. A score is `complete` only when the view released the request COMPLETE with nothing
dropped, the probe was loaded before the request's first record arrived, and records of the
probe's hook and layers arrived. Otherwise the score is over what arrived, `complete=false`, with
the reason (the request's own reason, "timeout"/"evicted", "probe loaded while the request was in
flight", "no records of ...").

Throughput (docs/BENCHMARKS.md, "Probe service"). Envelopes come natively scanned (add_scan ->
the view's per-run bookkeeping; `_keep_scan` answers keep() for a run with one mask), so a record no
probe needs costs no Python object. At flush, the last-token rows of every single-layer
"last"-pooling probe are found for all released requests, widened to float32 together and scored by
one `token_logits` call per probe (`_batch_last`); the probe reduces each row on its own, so each
score is bit-identical to scoring the request alone (tests/probes/test_service_native.py).

Isolation. A probe that raises (in new_state, update or finalize) is counted
(`errors[(probe, stage)]`), logged once per probe and stage, and gives no score for that request;
the other probes of the request, and the other requests, are scored as usual. Publishing is
retried with backoff until Kafka acknowledges every score (flush returns False only when stopping);
a re-delivery after a crash re-publishes scores with the same identity (trace id, request id, probe,
probe hash), which the loader's table collapses.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from tensortrace.consume import CapturedRequest, Release, RequestView
from tensortrace.consume.sink import SealedBatch, Source
from tensortrace.probes.service_probeset import ActiveProbe, ProbeDirectory
from tensortrace.v1 import records_pb2 as pb
from tensortrace.wire import codec, native

log = logging.getLogger("tensortrace.probes")

_PHASE_NAME = {pb.PREFILL: "prefill", pb.DECODE: "decode"}


@dataclass
class ScoresStats:
    requests: dict[str, int] = field(default_factory=dict)       # release (complete/timeout/evicted) -> requests scored
    not_sampled: int = 0                                        # released requests without tensors (sampled=false)
    no_probe: int = 0                                           # released requests of a model no probe fits
    scores: int = 0                                             # scores published (acknowledged)
    incomplete_scores: int = 0
    flagged: int = 0                                            # non-shadow scores >= threshold
    shadow_flagged: int = 0                                     # shadow scores >= threshold (never alerted)
    escalations: int = 0                                        # messages acknowledged on the escalation topic
    errors: dict[tuple[str, str], int] = field(default_factory=dict)   # (probe, stage) -> times it raised
    records_kept: int = 0                                       # records whose payload a probe needed
    records_skipped: int = 0                                    # records counted for completeness only
    bytes_kept: int = 0                                         # their payload bytes, raw size (decoded when scored)
    bytes_skipped: int = 0                                      # payload bytes (raw size) never decoded
    # needed records not held: in a natively scanned run, a last-token-only layer's record that ends
    # before another of the same layer and phase (its rows are never the scored token; never parsed)
    records_superseded: int = 0
    publish_failures: int = 0                                   # publish attempts that failed (retried)
    score_seconds: float = 0.0                                  # flush thread: decoding kept payloads + probes
    publish_seconds: float = 0.0                                # flush thread: waiting for Kafka's acks


@dataclass
class Scored:
    """A sealed batch: the requests the view released, each with the reload generation its first record saw."""
    requests: list[tuple[CapturedRequest, int]]


def rows_float32(rec: pb.TensorRecord, row: int | None = None) -> np.ndarray:
    """The record's rows as float32 [positions, width] (bit-exact widening of fp16/bf16); with `row`,
    only that row ([1, width]; a RAW payload is sliced, not decoded whole)."""
    n = (rec.token_end - rec.token_start if rec.positions_kind == pb.TOKEN_RANGE else positions_of(rec).size)
    elem = codec.element_size(rec.dtype)
    payload = rec.payload     # one copy out of the message
    if rec.encoding == pb.RAW and rec.raw_size == len(payload):
        raw = memoryview(payload)
    else:
        raw = memoryview(codec.decode_payload(payload, rec.encoding, rec.raw_size, elem))
    if row is not None and n:
        per_row = len(raw) // n
        raw, n = raw[row * per_row:(row + 1) * per_row], 1
    if rec.dtype == pb.FLOAT32:
        a = np.frombuffer(raw, dtype=np.float32)
    elif rec.dtype == pb.BFLOAT16:
        a = (np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
    elif rec.dtype == pb.FLOAT16:
        a = np.frombuffer(raw, dtype=np.float16).astype(np.float32)
    elif rec.dtype == pb.FLOAT64:
        a = np.frombuffer(raw, dtype=np.float64).astype(np.float32)
    else:
        raise ValueError(f"dtype {codec.dtype_name(rec.dtype)} of {rec.hook}[{rec.layer}] is not a float type a probe reads")
    return a.reshape(n, -1) if n else a.reshape(0, max(1, int(rec.shape[-1]) if rec.shape else 1))


def positions_of(rec: pb.TensorRecord) -> np.ndarray:
    if rec.positions_kind == pb.TOKEN_LIST:
        return np.asarray(rec.positions, dtype=np.int64)
    if rec.positions_kind == pb.TOKEN_RANGE:
        return np.arange(rec.token_start, rec.token_end, dtype=np.int64)
    raise ValueError(f"{rec.hook}[{rec.layer}] has no token axis ({pb.PositionsKind.Name(rec.positions_kind)})")


def _sort_key(rec: pb.TensorRecord) -> tuple:
    return (rec.token_start if rec.positions_kind == pb.TOKEN_RANGE else (rec.positions[0] if rec.positions else 0),
            rec.step, rec.seq)


class ScoresSink:
    """A `tensortrace.consume.Sink` (module docstring)."""

    def __init__(self, probes: ProbeDirectory, publish: Callable[[list[tuple[str, bytes, bytes]], threading.Event], bool],
                 *, scores_topic: str, escalation_topic: str = "", timeout_s: float = 30.0, max_requests: int = 10_000,
                 max_bytes: int = 512 << 20, retry_initial_s: float = 0.2, retry_max_s: float = 10.0,
                 token_scores: bool = True, max_token_scores: int = 4096, stats: ScoresStats | None = None,
                 on_durable: Callable[[list[pb.ProbeScore]], None] | None = None):
        self.probes = probes
        self.publish = publish
        self.scores_topic = scores_topic
        self.escalation_topic = escalation_topic
        self.token_scores = token_scores
        self.max_token_scores = max_token_scores
        self.batch_scoring = True     # _batch_last; False: every request on its own (tests compare the two)
        self.stats = stats if stats is not None else ScoresStats()
        self.on_durable = on_durable
        self.view = RequestView(self, timeout_s=timeout_s, keep=self._keep, keep_scan=self._keep_scan, max_requests=max_requests,
                                max_bytes=max_bytes, retry_initial_s=retry_initial_s, retry_max_s=retry_max_s)
        self._first_gen: dict[tuple[bytes, str], int] = {}
        self._logged_errors: set[tuple[str, str]] = set()

    # -- Sink: consume thread -------------------------------------------------------------------

    def _keep(self, rec: pb.TensorRecord) -> bool:
        s = self.probes.current
        key = (rec.trace_id, rec.request_id)
        if key not in self._first_gen:
            self._first_gen[key] = s.reload_generation
        if (rec.model_id, rec.hook) not in s.checked:
            width = int(rec.shape[-1]) if rec.shape else 0
            s = self.probes.observe(rec.model_id, rec.hook, width)
        n = rec.raw_size     # (reading rec.payload would copy it: upb hands out a new bytes object)
        if s.keep(rec.model_id, rec.hook, rec.layer, rec.phase):
            self.stats.records_kept += 1
            self.stats.bytes_kept += n
            return True
        self.stats.records_skipped += 1
        self.stats.bytes_skipped += n
        return False

    def _keep_scan(self, sc: native.Scan, run: tuple, key: tuple):
        """keep() for a run of records of one request in a natively scanned envelope (the view's
        add_scan): the same answers and counts, as a bool mask (or True / False for the whole run);
        the stream check on a new (model, hook) uses the first record of it, as keep() does."""
        lo, hi, raw_bytes, one_mh = run[0], run[1], run[9], run[10]
        s = self.probes.current
        if key not in self._first_gen:
            self._first_gen[key] = s.reload_generation
        c = sc.cols[lo:hi]
        heads = [lo] if one_mh else np.unique(c[:, native.C_MH]).tolist()
        mask = None
        only: dict[int, frozenset] = {}    # head -> its layers read by one-layer last-token probes alone
        for h in heads:
            model, hook = sc.text(h, native.C_MODEL_OFF), sc.text(h, native.C_HOOK_OFF)
            if (model, hook) not in s.checked:
                s = self.probes.observe(model, hook, sc.cols.item(h, native.C_LASTDIM))
            lo_layers = s.last_only(model, hook)
            if lo_layers:
                only[h] = lo_layers
            m = s.keep_mask(model, hook, c[:, native.C_LAYER], c[:, native.C_PHASE])
            if m is not None:
                if not one_mh:
                    m &= c[:, native.C_MH] == h
                mask = m if mask is None else (mask | m)
        kept = 0 if mask is None else int(np.count_nonzero(mask))
        kept_bytes = int(np.add.reduce(c[:, native.C_RAW_SIZE][mask])) if kept else 0   # (the ufunc: .sum() costs ~2 µs more)
        st = self.stats
        st.records_kept += kept
        st.bytes_kept += kept_bytes
        st.records_skipped += hi - lo - kept
        st.bytes_skipped += raw_bytes - kept_bytes
        if kept > 1 and only:
            mask = self._latest_only(c, mask, only, lo if one_mh else None)
            st.records_superseded += kept - int(np.count_nonzero(mask))
        return mask if kept else False

    @staticmethod
    def _latest_only(c: np.ndarray, mask: np.ndarray, only: dict, head: int | None) -> np.ndarray:
        """`mask` less the records of layers read by one-layer last-token probes alone (`only`: head
        -> layers; `head`: the run's one head, or None to read each record's) that end before another
        kept record of the same head, layer and phase in this run: such a probe scores the highest
        position it reads, so only the latest record of each phase can hold it (per phase: a
        prompt-only and a generated-only probe on one layer each keep theirs). Token-range records
        only; records with position lists are all kept, and so are ties."""
        item = c.item
        best: dict[tuple[int, int, int], int] = {}
        cand = []
        for i in np.flatnonzero(mask).tolist():
            h = head if head is not None else item(i, native.C_MH)
            layers = only.get(h)
            if not layers or item(i, native.C_POS_KIND) != pb.TOKEN_RANGE or item(i, native.C_LAYER) not in layers:
                continue
            k = (h, item(i, native.C_LAYER), item(i, native.C_PHASE))
            end = item(i, native.C_TOKEN_END)
            cand.append((i, k, end))
            if end > best.get(k, -1):
                best[k] = end
        if len(cand) == len(best):
            return mask
        out = mask.copy()
        for i, k, end in cand:
            if end < best[k]:
                out[i] = False
        return out

    def add_tensor(self, rec: pb.TensorRecord, source: Source) -> None:
        self.view.add_tensor(rec, source)

    def add_scan(self, sc: native.Scan, source: Source) -> list:
        return self.view.add_scan(sc, source)

    def add_summary(self, s: pb.RequestSummary, source: Source) -> None:
        self.view.add_summary(s, source)

    def due(self) -> bool:
        return self.view.due()

    def seal(self) -> Scored | None:
        released = self.view.seal()
        if not released:
            return None
        # a request none of whose records came through keep() (no tensors) missed nothing of any probe
        now = self.probes.current.reload_generation
        return Scored([(req, self._first_gen.pop(req.key, now)) for req in released])

    def commit_offset(self, partition: int, candidate: int) -> int:
        return self.view.commit_offset(partition, candidate)

    def revoked(self, partitions: set[int]) -> None:
        for key in self.view.revoked(partitions):
            self._first_gen.pop(key, None)

    def on_request(self, request: CapturedRequest) -> None:
        raise RuntimeError("ScoresSink.flush scores released requests; RequestView.flush must not be used")

    # -- Sink: flush thread ---------------------------------------------------------------------

    def flush(self, batch: SealedBatch, stopping: threading.Event) -> bool:
        t0 = time.perf_counter()
        s = self.probes.current
        scores: list[pb.ProbeScore] = []
        releases: dict[str, int] = {}
        by_model: dict[str, list[ActiveProbe]] = {}
        todo = []
        for req, first_gen in batch.data.requests:
            if req.completeness is not None and not req.completeness.sampled and not req.records_seen:
                self.stats.not_sampled += 1
                continue
            probes = by_model.get(req.model)
            if probes is None:
                probes = by_model[req.model] = s.for_model(req.model)
            if not probes:
                self.stats.no_probe += 1
                continue
            todo.append((req, probes, first_gen))
            releases[req.release.value] = releases.get(req.release.value, 0) + 1
        scores.extend(self.score_requests(todo))
        t1 = time.perf_counter()
        self.stats.score_seconds += t1 - t0
        messages = []
        for sc in scores:
            key, value = sc.request_id.encode(), sc.SerializeToString()
            messages.append((self.scores_topic, key, value))
            if sc.flagged and self.escalation_topic:
                messages.append((self.escalation_topic, key, value))
        if messages and not self.publish(messages, stopping):
            return False     # stopping: nothing from here on is committed; the next owner re-scores
        self.stats.publish_seconds += time.perf_counter() - t1
        for k, n in releases.items():
            self.stats.requests[k] = self.stats.requests.get(k, 0) + n
        for sc in scores:
            self.stats.scores += 1
            self.stats.incomplete_scores += not sc.complete
            self.stats.flagged += sc.flagged
            self.stats.shadow_flagged += sc.shadow and sc.score >= sc.threshold
            self.stats.escalations += bool(sc.flagged and self.escalation_topic)
        if self.on_durable is not None and scores:
            self.on_durable(scores)
        return True

    def score_requests(self, todo: list[tuple[CapturedRequest, list[ActiveProbe], int]]) -> list[pb.ProbeScore]:
        """score_request for every (request, probes, first_gen) of a flush, with the last-token rows of
        every single-layer last-pooling probe scored in one pass per probe (`_batch_last`)."""
        slots = [_by_slot(req) for req, _, _ in todo]
        try:
            pre = self._batch_last(todo, slots) if self.batch_scoring and len(todo) > 1 else {}
        except Exception:   # the batch pass is an optimisation: every request is then scored on its own
            log.exception("batched last-token scoring failed; scoring request by request")
            pre = {}
        out = []
        for i, (req, probes, first_gen) in enumerate(todo):
            out.extend(self.score_request(req, probes, first_gen, by_slot=slots[i], pre=pre, index=i))
        return out

    def _batch_last(self, todo: list, slots: list) -> dict:
        """{(request index, probe name): (position, logit, attention logit, phase)} for every request
        and probe that scores one token of one layer ("last" pooling, one layer, float RAW rows of the
        probe's width): each row found as _last_rows finds it, the rows of one probe and dtype stacked
        and widened to float32 at once, and their logits computed by one `token_logits` call. The
        probe reduces each row on its own (Probe.token_logits), so a row's logit is the one the
        request-by-request path computes, bit for bit (tests/probes/test_service_units.py)."""
        groups: dict[tuple, list] = {}
        for i, (req, probes, _) in enumerate(todo):
            for p in probes:
                pr = p.probe
                if pr.meta.pooling != "last" or len(p.layers) != 1 or not hasattr(pr, "fold_token_logits"):
                    continue
                refs = self._last_refs(p, slots[i])
                if refs is None:
                    continue
                _, rec, row, top = refs[0]
                n = (rec.token_end - rec.token_start if rec.positions_kind == pb.TOKEN_RANGE else len(rec.positions))
                if rec.encoding != pb.RAW or rec.dtype not in _WIDEN or not n or rec.raw_size % n:
                    continue
                per_row = rec.raw_size // n
                if per_row != pr.meta.width * codec.element_size(rec.dtype):
                    continue     # a width the probe refuses: the request's own path reports it
                payload = rec.payload
                if len(payload) != rec.raw_size:
                    continue
                groups.setdefault((id(pr), rec.dtype), []).append(
                    (i, p, top, payload[row * per_row:(row + 1) * per_row], _PHASE_NAME.get(rec.phase, "prefill")))
        pre = {}
        for (_, dtype), rows in groups.items():
            pr = rows[0][1].probe
            x = _WIDEN[dtype](b"".join(r[3] for r in rows)).reshape(len(rows), pr.meta.width)
            s, a = pr.token_logits(0, x)
            for k, (i, p, top, _, phase) in enumerate(rows):
                pre[(i, p.name)] = (top, float(s[k]), float(a[k]) if a is not None else 0.0, phase)
        return pre

    def score_request(self, req: CapturedRequest, probes: list[ActiveProbe], first_gen: int, *, by_slot=None,
                      pre: dict | None = None, index: int = -1) -> list[pb.ProbeScore]:
        """One ProbeScore per probe that fits the request's model and did not raise. `pre`: logits of
        last-token rows computed for many requests at once (_batch_last), for request `index`."""
        c = req.completeness
        base_reason = ""
        if c is None or not c.complete:
            if c is not None and c.state == "no_summary":
                base_reason = f"no summary arrived ({c.records_loaded} records did; the producer may have died)"
            else:
                base_reason = (c.incomplete_reason or c.state) if c is not None else "no completeness"
        if req.release is not Release.COMPLETE:
            base_reason = f"{req.release.value}: {base_reason}" if base_reason else req.release.value
        end_ns = max((sm.end_time_unix_nano for sm in req.summaries), default=0)
        prompt_tokens = c.prompt_tokens if c is not None and c.summaries else None
        rows_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        if by_slot is None:
            by_slot = _by_slot(req)
        ordered: set = set()      # slots sorted by position (only those fed record by record)
        out = []
        for p in probes:
            reasons = [base_reason] if base_reason else []
            if p.since > first_gen:
                reasons.append(f"probe {p.name} was loaded while the request was in flight (its earlier records "
                               "were not kept)")
            sc = pb.ProbeScore(model_id=req.model, request_id=req.request_id, trace_id=req.trace_id,
                               span_id=_span_id(req), probe=p.name, probe_hash=p.hash, threshold=p.threshold,
                               shadow=p.shadow, hook=p.hook, layers=list(p.layers), pooling=p.probe.meta.pooling,
                               request_end_time_unix_nano=end_ns, release=req.release.value)
            stage = "new_state"
            try:
                state = p.probe.new_state(prompt_tokens=prompt_tokens)
                fed = 0
                got = pre.get((index, p.name)) if pre else None
                last = None if got is not None else (self._last_rows(p, by_slot) if p.probe.meta.pooling == "last" else None)
                if got is not None:
                    # its row's logit came from the batch pass: fold it as update() would one row
                    stage = "update"
                    top, logit, attn, phase = got
                    p.probe.fold_token_logits(state, [top], [logit], [attn], phase)
                    fed = 1
                elif last is not None:
                    # last-token pooling scores one token: only its rows are decoded and fed (the
                    # score is the one all rows would give; token_scores holds that token alone)
                    stage = "update"
                    for layer, positions, rows, phase in last:
                        p.probe.update(state, layer, positions, rows, phase)
                        fed += 1
                else:
                    covered = []   # prompt positions fed (the probe's first layer): coverage below
                    for layer in p.layers:
                        if (p.hook, layer) not in ordered and (p.hook, layer) in by_slot:
                            by_slot[p.hook, layer].sort(key=_sort_key)
                            ordered.add((p.hook, layer))
                        for rec in by_slot.get((p.hook, layer), ()):
                            if rec.phase not in p.phases:
                                continue
                            got = rows_cache.get(id(rec))
                            if got is None:
                                stage = "decode"
                                got = rows_cache[id(rec)] = (positions_of(rec), rows_float32(rec))
                            stage = "update"
                            p.probe.update(state, layer, got[0], got[1], _PHASE_NAME.get(rec.phase, "prefill"))
                            fed += 1
                            if layer == p.layers[0] and rec.phase == pb.PREFILL:
                                covered.append(got[0])
                    gap = _prompt_gap(p.probe.meta.positions, prompt_tokens, covered)
                    if fed and gap:
                        reasons.append(gap)
                if not fed:
                    reasons.append(f"no records of {p.hook} layer(s) {list(p.layers)} ({p.probe.meta.positions} "
                                   "positions) arrived for this request")
                    sc.score = math.nan
                else:
                    stage = "finalize"
                    result = p.probe.finalize(state)
                    if getattr(result, "tokens_missing_layers", 0):
                        reasons.append(f"{result.tokens_missing_layers} token(s) lacked some of layers {list(p.layers)}")
                    sc.score = float(result.score)
                    sc.tokens_scored = int(result.tokens_scored)
                    if self.token_scores and self.max_token_scores:
                        pos = np.asarray(result.token_positions).reshape(-1)[-self.max_token_scores:]
                        ts = np.asarray(result.token_scores, dtype=np.float32).reshape(-1)[-self.max_token_scores:]
                        sc.token_positions.extend(pos.tolist())
                        sc.token_scores.extend(ts.tolist())
            except Exception as e:  # one probe's failure is its own: counted, logged, no score
                k = (p.name, stage)
                self.stats.errors[k] = self.stats.errors.get(k, 0) + 1
                if k not in self._logged_errors:
                    self._logged_errors.add(k)
                    log.exception("probe %s raised in %s on request %s (logged once per probe and stage; counted "
                                  "in tensortrace_probes_errors_total): %s", p.name, stage, req.request_id, e)
                continue
            sc.complete = not reasons
            sc.incomplete_reason = "; ".join(reasons)
            sc.flagged = (not p.shadow) and sc.score >= p.threshold   # NaN compares False
            sc.scored_time_unix_nano = time.time_ns()
            out.append(sc)
        return out


    @classmethod
    def _last_rows(cls, p: ActiveProbe, by_slot: dict) -> list | None:
        """For last-token pooling: per layer, the row of the highest position the probe reads, as
        (layer, positions, rows, phase). None when a layer lacks it (then every row is fed, and the
        score says which tokens lacked layers)."""
        refs = cls._last_refs(p, by_slot)
        if refs is None:
            return None
        return [(layer, np.array([top], dtype=np.int64), rows_float32(rec, i), _PHASE_NAME.get(rec.phase, "prefill"))
                for layer, rec, i, top in refs]

    @staticmethod
    def _last_refs(p: ActiveProbe, by_slot: dict) -> list | None:
        """_last_rows without decoding: per layer (layer, record, row index, position)."""
        top, where, cands = -1, {}, []
        for layer in p.layers:
            for rec in by_slot.get((p.hook, layer), ()):
                if rec.phase not in p.phases:
                    continue
                if rec.positions_kind == pb.TOKEN_RANGE:
                    hi = rec.token_end - 1
                elif rec.positions_kind == pb.TOKEN_LIST and rec.positions:
                    hi = max(rec.positions)
                else:
                    continue
                cands.append((layer, rec, hi))
                top = max(top, hi)
        if top < 0:
            return None
        for layer, rec, hi in cands:
            if hi < top:
                continue
            if rec.positions_kind == pb.TOKEN_RANGE:
                where[layer] = (rec, top - rec.token_start)
            else:
                where[layer] = (rec, len(rec.positions) - 1 - list(rec.positions)[::-1].index(top))
        if len(where) != len(p.layers):
            return None
        return [(layer, rec, i, top) for layer, (rec, i) in where.items()]


def _by_slot(req: CapturedRequest) -> dict[tuple[str, int], list[pb.TensorRecord]]:
    by_slot: dict[tuple[str, int], list[pb.TensorRecord]] = {}
    for rec in req.records:
        by_slot.setdefault((rec.hook, rec.layer), []).append(rec)
    return by_slot


# RAW row bytes of a float dtype -> float32 values, widened exactly as rows_float32 does
_WIDEN = {
    pb.FLOAT32: lambda b: np.frombuffer(b, dtype=np.float32),
    pb.BFLOAT16: lambda b: (np.frombuffer(b, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32),
    pb.FLOAT16: lambda b: np.frombuffer(b, dtype=np.float16).astype(np.float32),
    pb.FLOAT64: lambda b: np.frombuffer(b, dtype=np.float64).astype(np.float32),
}


def _span_id(req: CapturedRequest) -> bytes:
    for sm in req.summaries:
        if sm.span_id:
            return sm.span_id
    for rec in req.records:
        if rec.span_id:
            return rec.span_id
    return b""


def _prompt_gap(positions: str, prompt_tokens: int | None, covered: list) -> str:
    """Why a probe pooling over prompt positions did not see all of them, or "". Every record can
    arrive and the request still lack prompt positions: an engine's prefix cache (SGLang's radix
    cache) computes no forward for a cached prefix, so no tap sees those tokens; a selection that
    samples positions captures some only. A score over part of the tokens it pools is not complete."""
    if positions not in ("prompt", "all") or not prompt_tokens:
        return ""
    have = np.unique(np.concatenate([np.asarray(c, dtype=np.int64).reshape(-1) for c in covered])) if covered else \
        np.zeros(0, dtype=np.int64)
    have = have[(have >= 0) & (have < prompt_tokens)]
    if len(have) == prompt_tokens:
        return ""
    missing = np.setdiff1d(np.arange(prompt_tokens), have)
    first, n = int(missing[0]), len(missing)
    return (f"{n} of {prompt_tokens} prompt positions were not captured (from position {first}; an engine's prefix "
            "cache computes no forward for a cached prefix: SGLang --disable-radix-cache, or a selection that "
            "samples positions)")
