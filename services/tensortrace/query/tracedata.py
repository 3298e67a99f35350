"""What `tensortrace trace` reads from ClickHouse: one trace's spans (`otel_traces`, collapsed by
SpanId), the request's summary and record times (`requests`, `activations`: capture, export and
load times per forward step), its per-(hook, layer) stats and completeness (the SDK backend),
per-layer residual norms over positions, probe scores, and the slowest recent requests.

    src = TraceSource(client, database="tensortrace", otel_database="otel")
    read = src.read("4bf92f3577b34da6a3ce929d0e0e4736", norms=True)  # TraceRead: inputs, ref, norms
    story = timeline.build_story(read.inputs)

`read()` is the one code path of `tensortrace trace`: the CLI calls it with --clickhouse, and the
query service's Trace RPC calls it against its own client (`--server`; query/tracewire.py carries
the result), so both tell the same story.

Every value is a bound parameter; database and table names are checked identifiers. Tables that do
not exist (no bridge writing `otel_traces`, no `probe_scores`) are skipped, and the story says so.
Bounded: at most MAX_SPANS spans (the first by start time; the story notes the truncation), 10,000
probe score rows, MAX_SLOWEST rows of `slowest()`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from tensortrace.query.backend import ClickHouseBackend, RequestRef, _query_error
from tensortrace.query.errors import InvalidQuery, NotFound
from tensortrace.storage.otel import DEFAULT_OTEL_DATABASE, DEFAULT_TRACES_TABLE
from tensortrace.storage.schema import DEFAULT_DATABASE, check_identifier
from tensortrace.query.timeline import BRIDGE_SPANS, Span, StepTimes, Timing, TraceInputs
from tensortrace.v1 import records_pb2 as pb
from tensortrace.wire import codec
from tensortrace.wire.completeness import completeness

RESIDUAL_HOOK = "resid_pre"
MAX_SPANS = 200_000     # spans of one trace read (the first by start time); more: truncated, and noted
MAX_SLOWEST = 1000      # rows of `slowest()`
_PHASE = {1: "prefill", 2: "decode"}
# probe_scores (storage migration 3, written by the loader from the probe service's scores topic):
# the columns read here
PROBE_COLUMNS = ("trace_id", "request_id", "probe", "probe_hash", "score", "threshold", "flagged", "shadow",
                 "complete", "incomplete_reason", "hook", "layers", "pooling", "tokens_scored", "token_scores",
                 "token_positions", "request_end_time", "scored_time")


@dataclass
class ResidualNorms:
    """L2 norm of each `resid_pre` row, per layer: norms[i, j] is layer layers[i] at position start + j
    (NaN where no row was captured)."""
    layers: list[int]
    start: int
    norms: np.ndarray                  # [len(layers), positions] float32
    hook: str = RESIDUAL_HOOK
    truncated_from: int = 0            # > positions: only the first positions came (the query service's bound)

    @property
    def end(self) -> int:
        return self.start + self.norms.shape[1]


@dataclass
class TraceRead:
    """What `tensortrace trace` reads for one trace: the timeline's inputs, the stored request shown
    (None when only spans or probe scores know the trace), and, when asked for, the heatmap's norms
    (None when no `resid_pre` rows are stored)."""
    inputs: TraceInputs
    ref: RequestRef | None
    norms: ResidualNorms | None = None
    summaries: list = field(default_factory=list)   # with ref: what inputs.completeness was computed from ...
    records_loaded: int = 0                         # ... (the Trace RPC sends these; the client recomputes it)
    spans_truncated: bool = False                   # more than MAX_SPANS spans (inputs.notes says so too)


def verdict_dict(probe: str, name: str, probe_hash: str, score: float, threshold: float, label: str, complete: bool,
                 incomplete_reason: str, hook: str, layers: list[int], pooling: str, tokens_scored: int,
                 request_end_unix_nano: int, scored_unix_nano: int, request_id: str) -> dict:
    """One probe verdict as the story holds it (the same keys, in the same order, from ClickHouse
    rows and from a TraceResponse: the JSON is the same either way)."""
    return {"probe": probe, "name": name, "probe_hash": probe_hash, "score": float(score),
            "threshold": float(threshold), "label": label, "complete": bool(complete),
            "incomplete_reason": incomplete_reason, "hook": hook, "layers": [int(x) for x in layers],
            "pooling": pooling, "tokens_scored": int(tokens_scored), "request_end_unix_nano": int(request_end_unix_nano),
            "scored_unix_nano": int(scored_unix_nano), "request_id": request_id}


def slow_row(trace_id: str, request_id: str, start_unix_nano: int, duration_ms: float, prompt_tokens: int | None,
             generated_tokens: int | None, complete: bool | None, model: str, found_in: list[str]) -> dict:
    """One row of `slowest()` (the same keys and order from ClickHouse rows and from the RPC)."""
    return {"trace_id": trace_id, "request_id": request_id, "start_unix_nano": int(start_unix_nano),
            "duration_ms": float(duration_ms), "prompt_tokens": prompt_tokens, "generated_tokens": generated_tokens,
            "complete": complete, "model": model, "from": list(found_in)}


class TraceSource:
    def __init__(self, client, database: str = DEFAULT_DATABASE, otel_database: str = DEFAULT_OTEL_DATABASE,
                 traces_table: str = DEFAULT_TRACES_TABLE, probe_table: str = "probe_scores", where: str = ""):
        self.client = client
        self.db = check_identifier(database)
        self.odb = check_identifier(otel_database)
        self.traces = check_identifier(traces_table, "table")
        pdb, _, ptable = probe_table.rpartition(".")
        self.probe_db = check_identifier(pdb or database)
        self.probe_table = check_identifier(ptable, "table")
        self.backend = ClickHouseBackend(client, database)
        self.where_label = where
        self.spans_truncated = False
        self._status = None
        self._tables: set[tuple[str, str]] | None = None

    # -- plumbing ----------------------------------------------------------------------------

    def _rows(self, sql: str, params: dict | None = None) -> list:
        try:
            return self.client.query(sql, parameters=params or {}).result_rows
        except Exception as e:
            raise _query_error(e) from e

    def tables(self) -> set[tuple[str, str]]:
        if self._tables is None:
            rows = self._rows("SELECT database, name FROM system.tables WHERE database IN {dbs:Array(String)}",
                              {"dbs": sorted({self.db, self.odb, self.probe_db})})
            self._tables = {(d, n) for d, n in rows}
        return self._tables

    @property
    def has_tensortrace(self) -> bool:
        t = self.tables()
        return (self.db, "requests") in t and (self.db, "activations") in t and (self.db, "activation_traces") in t

    @property
    def has_spans(self) -> bool:
        return (self.odb, self.traces) in self.tables()

    def where(self) -> str:
        parts = [f"{self.db}.requests/activations" + ("" if self.has_tensortrace else " (absent)"),
                 f"{self.odb}.{self.traces}" + ("" if self.has_spans else " (absent)")]
        return " and ".join(parts) + (f" at {self.where_label}" if self.where_label else "")

    # -- spans -------------------------------------------------------------------------------

    def spans(self, trace_id: str) -> list[Span]:
        """The trace's spans, each SpanId once (docs/bridge.md: duplicates are collapsed at read time)."""
        if not self.has_spans:
            return []
        t = f"{self.odb}.{self.traces}"
        bounded = (self.odb, f"{self.traces}_trace_id_ts") in self.tables()
        sql = (f"WITH (SELECT (min(Start), max(End)) FROM {t}_trace_id_ts WHERE TraceId = {{t:String}}) AS b "
               if bounded else "")
        sql += (f"SELECT SpanId, ParentSpanId, SpanName, SpanKind, ServiceName, toUnixTimestamp64Nano(Timestamp), "
                f"Duration, StatusCode, StatusMessage, SpanAttributes FROM {t} WHERE TraceId = {{t:String}}"
                + (" AND Timestamp BETWEEN b.1 AND b.2 + 1" if bounded else "")
                + f" ORDER BY Timestamp LIMIT 1 BY SpanId LIMIT {MAX_SPANS + 1}")
        rows = self._rows(sql, {"t": trace_id})
        self.spans_truncated = len(rows) > MAX_SPANS
        return [Span(r[0], r[1], r[2], r[3], r[4], int(r[5]), int(r[6]), r[7], r[8], dict(r[9]))
                for r in rows[:MAX_SPANS]]

    def traces_of_request(self, request_id: str) -> list[str]:
        """Trace ids under which a request id is known: stored requests first, then spans (SGLang's
        `rid` attribute, the bridge's `tensortrace.request_id`, on its probe spans too), then probe
        scores."""
        found: list[str] = []
        if self.has_tensortrace:
            refs = sorted(self.backend.lookup(None, request_id), key=lambda r: -r.last_capture_ns)
            found += [r.trace_id.hex() for r in refs]
        if not found and self.has_spans:
            rows = self._rows(
                f"SELECT TraceId, max(Timestamp) AS t FROM {self.odb}.{self.traces} "
                "WHERE SpanAttributes['rid'] = {r:String} OR SpanAttributes['tensortrace.request_id'] = {r:String} "
                "GROUP BY TraceId ORDER BY t DESC LIMIT 10", {"r": request_id})
            found += [r[0] for r in rows]
        if not found:
            found += self.requests_of_probe_scores(request_id)
        return list(dict.fromkeys(found))

    # -- request rows --------------------------------------------------------------------------

    def requests(self, trace_id: str) -> list[RequestRef]:
        if not self.has_tensortrace:
            return []
        return self.backend.lookup(bytes.fromhex(trace_id), None)

    def timing(self, ref: RequestRef) -> Timing:
        where, params = self.backend._scope(ref)
        steps = [StepTimes(int(r[0]), _PHASE.get(int(r[1]), "unspecified"), int(r[2]), int(r[3]), int(r[4]), int(r[5]))
                 for r in self._rows(
                     f"SELECT step, CAST(phase, 'Int8'), toUnixTimestamp64Nano(min(capture_time)), "
                     f"toUnixTimestamp64Nano(max(capture_time)), toUnixTimestamp64Nano(max(export_time)), "
                     f"toUnixTimestamp64Nano(max(load_time)) FROM {self.db}.activations WHERE {where} "
                     f"GROUP BY step, phase ORDER BY step", params)]
        rows = self._rows(
            f"SELECT toUnixTimestamp64Nano(minIf(start_time, toUnixTimestamp64Nano(start_time) > 0)), "
            f"toUnixTimestamp64Nano(max(end_time)), toUnixTimestamp64Nano(max(export_time)), "
            f"toUnixTimestamp64Nano(max(load_time)), any(producer_node), any(producer_pod), count() "
            f"FROM {self.db}.requests WHERE trace_id = unhex({{tid:String}}) AND request_id = {{rid:String}}",
            {"tid": ref.trace_id.hex(), "rid": ref.request_id})
        t = Timing(steps)
        if rows and rows[0][6]:
            r = rows[0]
            t.summary_start_ns, t.summary_end_ns, t.summary_export_ns, t.summary_load_ns = (int(x) for x in r[:4])
            t.producer_node, t.producer_pod = r[4], r[5]
        return t

    def probe_scores(self, ref: RequestRef | None, trace_id: str,
                     request_id: str | None = None) -> tuple[dict | None, list[dict], str]:
        """The request's probe verdicts from the `probe_scores` table (storage migration 3: one row per
        (trace, request, probe, probe_hash), re-reads collapsed to the latest scored_time), if it
        exists: (probe -> (token positions, token scores) for the picture, the verdicts, why not)."""
        if (self.probe_db, self.probe_table) not in self.tables():
            return None, [], ""
        table = f"{self.probe_db}.{self.probe_table}"
        cols = {r[0] for r in self._rows("SELECT name FROM system.columns WHERE database = {d:String} AND "
                                         "table = {t:String}", {"d": self.probe_db, "t": self.probe_table})}
        missing = sorted(set(PROBE_COLUMNS) - cols)
        if missing:
            return None, [], f"{table} lacks the columns {', '.join(missing)} (storage migration 3): probe scores skipped"
        where, params = "trace_id = unhex({tid:String})", {"tid": trace_id}
        rid = ref.request_id if ref is not None else request_id
        if rid:
            where += " AND request_id = {rid:String}"
            params["rid"] = rid
        rows = self._rows(
            f"SELECT probe, probe_hash, score, threshold, flagged, shadow, complete, incomplete_reason, hook, layers, "
            f"pooling, tokens_scored, token_positions, token_scores, toUnixTimestamp64Nano(request_end_time), "
            f"toUnixTimestamp64Nano(scored_time), request_id FROM {table} WHERE {where} "
            f"ORDER BY probe, probe_hash, scored_time DESC LIMIT 1 BY probe, probe_hash LIMIT 10000", params)
        if not rows:
            return None, [], ""
        versions: dict[str, int] = {}
        for r in rows:
            versions[r[0]] = versions.get(r[0], 0) + 1
        curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        verdicts = []
        for (probe, phash, score, threshold, flagged, shadow, complete, why, hook, layers, pooling, tokens, positions,
             token_scores, end_ns, scored_ns, rid_) in rows:
            name = probe if versions[probe] == 1 else f"{probe}@{phash[:8]}"
            label = "shadow" if shadow else ("flagged" if flagged else "pass")
            verdicts.append(verdict_dict(probe, name, phash, score, threshold, label, complete, why, hook, layers,
                                         pooling, tokens, end_ns, scored_ns, rid_))
            if len(token_scores):
                curves[name] = (np.asarray(positions, dtype=np.int64), np.asarray(token_scores, dtype=np.float32))
        return (curves or None), verdicts, ""

    def requests_of_probe_scores(self, request_id: str) -> list[str]:
        """Trace ids of a request known from the probe_scores table (newest first)."""
        if (self.probe_db, self.probe_table) not in self.tables():
            return []
        rows = self._rows(f"SELECT lower(hex(trace_id)), max(scored_time) AS t FROM {self.probe_db}.{self.probe_table} "
                          "WHERE request_id = {r:String} AND trace_id != unhex(repeat('00', 16)) "
                          "GROUP BY trace_id ORDER BY t DESC LIMIT 10", {"r": request_id})
        return [r[0] for r in rows]

    # -- the whole story's inputs ----------------------------------------------------------------

    def read(self, trace_id: str | None, request_id: str | None = None, norms: bool = False) -> TraceRead:
        """One trace's story inputs, by trace id (32 lowercase hex) and/or request id: the request id
        finds its trace (the latest, when several), and a 32-hex request id given as the trace id is
        tried as a request id when no trace has it. Raises NotFound when nothing knows the id."""
        notes: list[str] = []
        if trace_id is None:
            found = self.traces_of_request(request_id)
            if not found:
                raise NotFound(f"no request or span with request id {request_id!r} in {self.where()}")
            trace_id = found[0]
            if len(found) > 1:
                notes.append(f"request id {request_id!r} appears under {len(found)} traces ({', '.join(found[:5])}); "
                             "showing the latest")
            inp, ref = self.inputs(trace_id, request_id)
        else:
            try:
                inp, ref = self.inputs(trace_id, request_id)
            except NotFound:
                # SGLang's request ids are 32 hex characters too: try the argument as a request id
                found = self.traces_of_request(trace_id) if not request_id else []
                if not found:
                    raise
                notes.append(f"{trace_id} is a request id, not a trace id; its trace is {found[0]}")
                inp, ref = self.inputs(found[0], trace_id)
        inp.notes[:0] = notes
        st = self._status if ref is not None else None
        return TraceRead(inp, ref, self.residual_norms(ref) if norms else None,
                         list(st.summaries) if st else [], st.records_loaded if st else 0, self.spans_truncated)

    def inputs(self, trace_id: str, request_id: str | None = None) -> tuple[TraceInputs, RequestRef | None]:
        """Everything the timeline needs for one trace (and one of its requests). Raises NotFound
        when neither a stored request nor a span has this trace id."""
        refs = self.requests(trace_id)
        spans = self.spans(trace_id)
        notes: list[str] = []
        if request_id is not None:
            chosen = [r for r in refs if r.request_id == request_id]
            if refs and not chosen:
                raise NotFound(f"trace id {trace_id} holds requests {[r.request_id for r in refs][:10]}, "
                               f"not {request_id!r} ({self.where()})")
            refs_pick = chosen[0] if chosen else None
        else:
            refs_pick = refs[0] if refs else None
        if not refs and not spans and not self.probe_scores(None, trace_id, request_id)[1]:
            raise NotFound(f"no request or span with trace id {trace_id} in {self.where()}")
        if self.spans_truncated:
            notes.append(f"more than {MAX_SPANS:,} spans in this trace: the first {MAX_SPANS:,} by start time are "
                         "shown (the read bound)")
        if not self.has_spans:
            notes.append(f"no {self.odb}.{self.traces} table: no spans (run `tensortrace bridge --clickhouse-dsn` "
                         "and SGLang with --enable-trace to an OTLP Collector writing there)")
        elif not spans:
            notes.append(f"no spans with this trace id in {self.odb}.{self.traces}")
        elif not any(s.name not in BRIDGE_SPANS for s in spans):
            notes.append("no serving-engine spans in this trace (SGLang --enable-trace): prefill and decode are "
                         "estimated from the records' capture times")
        inp = TraceInputs(trace_id=trace_id, spans=spans, notes=notes, where=self.where(),
                          request_ids=[r.request_id for r in refs])
        if refs_pick is None:
            if spans:
                rid = next((s.attributes.get("tensortrace.request_id") or s.attributes.get("rid") for s in spans
                            if s.attributes.get("tensortrace.request_id") or s.attributes.get("rid")), "")
                inp.request_id = request_id or rid or ""
            if self.has_tensortrace:
                notes.append(f"nothing stored for this trace in {self.db}.requests/activations")
            self._add_probes(inp, None, trace_id, request_id or inp.request_id)
            if not inp.request_id and inp.probe_verdicts:
                inp.request_id = request_id or inp.probe_verdicts[0]["request_id"]
            return inp, None
        ref = refs_pick
        st = self._status = self.backend.status(ref)
        inp.request_id, inp.model = ref.request_id, ref.model
        inp.completeness = completeness(st.summaries, st.records_loaded)
        inp.stats = self.backend.describe(ref) if ref.first_capture_ns else []
        inp.timing = self.timing(ref)
        if not inp.model:
            inp.model = next((s.model_id for s in st.summaries if s.model_id), "")
        self._add_probes(inp, ref, trace_id, ref.request_id)
        return inp, ref

    def _add_probes(self, inp: TraceInputs, ref: RequestRef | None, trace_id: str, request_id: str | None) -> None:
        inp.probes, inp.probe_verdicts, why = self.probe_scores(ref, trace_id, request_id)
        if why:
            inp.notes.append(why)

    # -- residual norms (the heatmap) ---------------------------------------------------------------

    def residual_norms(self, ref: RequestRef, hook: str = RESIDUAL_HOOK) -> ResidualNorms | None:
        """Per layer, the L2 norm of every captured `hook` row, read with the SDK backend's column
        pages. The common layout (TOKEN_RANGE rows, one producer, unsharded, float dtypes; any
        payload encoding) is computed in numpy, so drawing the picture does not import torch (about
        2 s); anything else is assembled by the SDK (torch) and reduced the same way."""
        if ref is None or not ref.first_capture_ns:
            return None
        per_layer: dict[int, tuple[int, np.ndarray]] = {}
        for page in self.backend.fetch_pages(ref, [hook], None):
            recs = None
            for layer in np.unique(page.layer).tolist():
                idx = np.nonzero(page.layer == layer)[0]
                got = _norms_token_range(page, idx)
                if got is None:
                    from tensortrace.query.assemble import assemble

                    recs = recs if recs is not None else list(page.records())
                    got = _norms_of(assemble([recs[i] for i in idx.tolist()])[page.hook, layer])
                if got is not None:
                    per_layer[int(layer)] = got
        if not per_layer:
            return None
        layers = sorted(per_layer)
        start = min(s for s, _ in per_layer.values())
        end = max(s + len(v) for s, v in per_layer.values())
        out = np.full((len(layers), end - start), np.nan, dtype=np.float32)
        for i, layer in enumerate(layers):
            s, v = per_layer[layer]
            out[i, s - start:s - start + len(v)] = v
        return ResidualNorms(layers, start, out, hook)

    # -- slowest ------------------------------------------------------------------------------------

    def slowest(self, n: int, since_ns: int) -> list[dict]:
        """The n longest requests that ended since `since_ns`: from the requests table (first start
        .. last end of the summaries) and from otel_traces (first span start .. last span end, the
        bridge's export/kafka/step spans left out), merged by trace id, longest first."""
        if not 1 <= n <= MAX_SLOWEST:
            raise InvalidQuery(f"--slowest {n}: expected 1 to {MAX_SLOWEST}")
        found: dict[str, dict] = {}
        if self.has_tensortrace:
            for tid, rid, start, end, pt, gt, complete, dropped, model in self._rows(
                    f"SELECT lower(hex(trace_id)), request_id, toUnixTimestamp64Nano(min(start_time)), "
                    f"toUnixTimestamp64Nano(max(end_time)), max(prompt_tokens), max(generated_tokens), min(complete), "
                    f"sum(records_dropped), any(model) FROM {self.db}.requests FINAL "
                    f"WHERE end_time >= fromUnixTimestamp64Nano({{since:Int64}}, 'UTC') "
                    f"AND toUnixTimestamp64Nano(start_time) > 0 GROUP BY trace_id, request_id "
                    f"ORDER BY max(end_time) - min(start_time) DESC LIMIT {{n:UInt32}}", {"since": since_ns, "n": n}):
                found[tid] = slow_row(tid, rid, start, (int(end) - int(start)) / 1e6, int(pt), int(gt),
                                      bool(complete) and not dropped, model, ["requests"])
        if self.has_spans:
            for tid, start, end, rid, svc in self._rows(
                    f"SELECT TraceId, min(toUnixTimestamp64Nano(Timestamp)) AS s, "
                    f"max(toUnixTimestamp64Nano(Timestamp) + Duration) AS e, "
                    f"anyIf(SpanAttributes['rid'], SpanAttributes['rid'] != ''), anyIf(ServiceName, SpanName NOT LIKE 'tensortrace.%') "
                    f"FROM {self.odb}.{self.traces} WHERE Timestamp >= fromUnixTimestamp64Nano({{since:Int64}}) "
                    f"AND TraceId != '' AND SpanName NOT IN ('tensortrace.export', 'tensortrace.kafka', 'tensortrace.step') "
                    f"GROUP BY TraceId ORDER BY e - s DESC LIMIT {{n:UInt32}}", {"since": since_ns, "n": n}):
                dur = (int(end) - int(start)) / 1e6
                got = found.get(tid)
                if got is None:
                    found[tid] = slow_row(tid, rid, start, dur, None, None, None, "", ["otel_traces"])
                else:
                    got["from"].append("otel_traces")
                    if dur > got["duration_ms"]:
                        got["duration_ms"], got["start_unix_nano"] = dur, int(start)
        return sorted(found.values(), key=lambda r: -r["duration_ms"])[:n]


def _as_float32(buf: np.ndarray, dtype: int) -> np.ndarray | None:
    if dtype == pb.BFLOAT16:
        return (buf.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if dtype == pb.FLOAT16:
        return buf.view(np.float16).astype(np.float32)
    if dtype == pb.FLOAT32:
        return buf.view(np.float32)
    if dtype == pb.FLOAT64:
        return buf.view(np.float64).astype(np.float32)
    return None


def _norms_token_range(page, idx: np.ndarray) -> tuple[int, np.ndarray] | None:
    """(first position, row norms with NaN in gaps) of one (hook, layer) group of a RecordPage, in
    numpy; None when the group is not TOKEN_RANGE, one producer rank, unsharded, one float dtype."""
    if ((page.positions_kind[idx] != pb.TOKEN_RANGE).any() or (page.tp_size[idx] > 1).any()
            or (page.producer_rank[idx] != page.producer_rank[idx[0]]).any()):
        return None
    il = idx.tolist()
    dtypes = {page.dtype[i] for i in il}
    row_shapes = {tuple(page.shape[i][1:]) for i in il}
    if len(dtypes) != 1 or len(row_shapes) != 1 or any(not page.shape[i] for i in il):
        return None
    dtype, row_shape = dtypes.pop(), row_shapes.pop()
    if dtype not in (pb.BFLOAT16, pb.FLOAT16, pb.FLOAT32, pb.FLOAT64):
        return None
    elem = codec.element_size(dtype)
    width = math.prod(row_shape)
    row_bytes = width * elem
    t0, t1 = page.token_start[idx], page.token_end[idx]
    start, end = int(t0.min()), int(t1.max())
    buf = np.zeros((end - start) * row_bytes, dtype=np.uint8)
    covered = np.zeros(end - start, dtype=bool)
    out, data = memoryview(buf), page.data
    for i, a, b, s, e, enc, raw in zip(il, t0.tolist(), t1.tolist(), page.starts[idx].tolist(), page.ends[idx].tolist(),
                                       page.encoding[idx].tolist(), page.raw_size[idx].tolist()):
        if raw != (b - a) * row_bytes:
            return None
        payload = data[s:e]
        if enc != pb.RAW:
            payload = codec.decode_payload(payload, enc, raw, elem)
        elif len(payload) != raw:
            return None
        off = (a - start) * row_bytes
        out[off:off + raw] = payload
        covered[a - start:b - start] = True
    x = _as_float32(buf, dtype).reshape(end - start, width)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float32)).astype(np.float32)
    norms[~covered] = np.nan
    return start, norms


def _norms_of(c) -> tuple[int, np.ndarray] | None:
    """Row norms of an SDK CapturedTensor (the torch path)."""
    t = c.tensor
    if t.ndim < 2 or not t.is_floating_point():
        return None
    norms = t.float().reshape(t.shape[0], -1).norm(dim=1).numpy().astype(np.float32)
    if c.positions is not None:   # TOKEN_LIST: rows at their positions
        start = min(c.positions) if c.positions else 0
        out = np.full((max(c.positions) + 1 - start) if c.positions else 0, np.nan, dtype=np.float32)
        out[np.asarray(c.positions) - start] = norms
        return start, out
    for a, b in c.gaps:
        norms[a - c.start:b - c.start] = np.nan
    return c.start, norms
