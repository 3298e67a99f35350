"""One request's story as a timeline: pure functions from what was read (spans, summary and record
times, per-(hook, layer) stats) to stages, "where the time went", and what was captured; plus its
terminal and JSON forms. No I/O here (tracedata.py reads; picture.py draws; trace.py is the CLI).

    story = build_story(TraceInputs(trace_id=..., spans=spans, timing=timing, ...))
    print(render_text(story)); json.dumps(story_dict(story))

Stages, in order, each with its start and end in wall-clock ns and where it came from:

  request   the serving engine's request span(s) (SGLang `Req <rid>`, one per process), else the
            span the bridge's capture span hangs under (the request's traceparent), if stored
  tokenize  SGLang `tokenize`
  queue     SGLang `prefill_waiting`
  prefill   SGLang `prefill_forward` (or `chunked_prefill`); else from capture times (tap to tap)
  decode    SGLang `decode_loop` (one span per decode step: count, p50, max); else from the capture
            times of the decode steps' records (tap to tap)
  capture   the bridge's `tensortrace.capture` span; else the summary's start..end; else the first..
            last record capture time
  export    `tensortrace.export`; else first capture .. last export time of the records/summary
  kafka     `tensortrace.kafka` (last export .. the bridge received the request's last message)
  load      last export .. the last `load_time` the loader stamped on the request's rows
  probe     the bridge's `tensortrace.probe` spans (request end .. the probe service's verdict), else
            the `probe_scores` rows (request_end_time .. scored_time); one line per probe verdict

"Where the time went" splits [first event, last event] into exclusive time: each instant goes to
the most specific stage running then (tokenize, queue, prefill, decode before the enclosing
request; capture; export; load; kafka), instants no stage covers are "untraced", so the shares sum
to 100%. Every time is wall-clock ns from the host that produced it (engine host, agent/exporter
node, bridge, loader): clock skew between hosts shifts their stages against each other.

>>> fmt_ms(1_234_567)
'1.2 ms'
>>> fmt_ms(12_345_678_901)
'12,345.7 ms'
"""

from __future__ import annotations

import datetime
import json
import re
from dataclasses import dataclass, field

from tensortrace.query.text import byte_size, int_ranges

# Span names: SGLang's request stages (sglang/srt/observability/req_time_stats.py, RequestStage) and
# the bridge's (docs/bridge.md). Strings, not imports: query does not import the bridge service.
SGLANG_STAGE = {"tokenize": "tokenize", "prefill_waiting": "queue", "prefill_forward": "prefill",
                "chunked_prefill": "prefill", "decode_loop": "decode", "decode_forward": "decode"}
CAPTURE, EXPORT, KAFKA, PROBE = "tensortrace.capture", "tensortrace.export", "tensortrace.kafka", "tensortrace.probe"
BRIDGE_SPANS = (CAPTURE, EXPORT, KAFKA, PROBE, "tensortrace.step", "tensortrace.step.links")
_REQ_SPAN = re.compile(r"^\s*[\w-]*\s*Req \S+$")   # SGLang: f"{role} Req {rid[:8]}"

STAGE_ORDER = ("request", "tokenize", "queue", "prefill", "decode", "capture", "export", "kafka", "load", "probe")
# Exclusive-time priority: the most specific stage first; `request` catches the rest of the engine.
_EXCLUSIVE = ("tokenize", "queue", "prefill", "decode", "request", "capture", "export", "load", "kafka", "probe")
_EXCLUSIVE_LABEL = {"request": "engine, other"}


@dataclass
class Span:
    """One otel_traces row (collapsed by SpanId)."""
    span_id: str
    parent_span_id: str
    name: str
    kind: str
    service: str
    start_ns: int
    duration_ns: int
    status: str = "Unset"
    status_message: str = ""
    attributes: dict = field(default_factory=dict)

    @property
    def end_ns(self) -> int:
        return self.start_ns + self.duration_ns


@dataclass
class StepTimes:
    """Capture/export/load bounds of one forward step's records of the request."""
    step: int
    phase: str                 # prefill | decode | unspecified
    first_capture_ns: int
    last_capture_ns: int
    last_export_ns: int = 0
    last_load_ns: int = 0


@dataclass
class Timing:
    """What the request's rows say about time (activations and requests tables)."""
    steps: list[StepTimes] = field(default_factory=list)
    summary_start_ns: int = 0
    summary_end_ns: int = 0
    summary_export_ns: int = 0
    summary_load_ns: int = 0
    producer_node: str = ""
    producer_pod: str = ""


@dataclass
class TraceInputs:
    trace_id: str                                   # 32 hex
    request_id: str = ""
    model: str = ""
    request_ids: list[str] = field(default_factory=list)
    spans: list[Span] = field(default_factory=list)
    timing: Timing | None = None
    completeness: object | None = None              # wire.completeness.Completeness
    stats: list = field(default_factory=list)       # backend.HookLayerStats
    probes: dict | None = None                      # probe -> (positions, scores)
    probe_verdicts: list[dict] = field(default_factory=list)   # probe_scores rows (tracedata.probe_scores)
    where: str = ""                                 # the tables read, for the clocks / notes
    notes: list[str] = field(default_factory=list)


@dataclass
class Stage:
    name: str
    start_ns: int
    end_ns: int
    source: str
    detail: str = ""
    steps_ns: list[tuple[int, int]] | None = None    # decode: each step's (start, end)

    @property
    def duration_ns(self) -> int:
        return max(0, self.end_ns - self.start_ns)


@dataclass
class TraceStory:
    trace_id: str
    request_id: str
    model: str
    request_ids: list[str]
    t0_ns: int
    end_ns: int
    stages: list[Stage]
    decode: dict | None
    where: list[tuple[str, int]]                    # (stage, exclusive ns), largest first
    captured: dict | None
    completeness: dict | None
    clocks: list[str]
    spans: list[Span]
    probes: dict | None
    notes: list[str]
    probe_verdicts: list[dict] = field(default_factory=list)   # per probe: score, threshold, label, ...

    @property
    def total_ns(self) -> int:
        return max(0, self.end_ns - self.t0_ns)

    def stage(self, name: str) -> Stage | None:
        return next((s for s in self.stages if s.name == name), None)


def fmt_ms(ns: float) -> str:
    return f"{ns / 1e6:,.1f} ms"


def _pct(values: list[float], q: float) -> float:
    v = sorted(values)
    if not v:
        return 0.0
    k = (len(v) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def _n(x) -> str:
    return f"{x:,}" if isinstance(x, int) else "?"


def _list(value: str) -> str:
    """An array attribute as otel_traces stores it (JSON) -> 'a, b'."""
    try:
        v = json.loads(value)
    except (TypeError, ValueError):
        return str(value)
    return ", ".join(map(str, v)) if isinstance(v, list) else str(v)


def is_request_span(s: Span) -> bool:
    return s.name not in BRIDGE_SPANS and ("rid" in s.attributes or bool(_REQ_SPAN.match(s.name)))


def _bounds(spans: list[Span]) -> tuple[int, int]:
    return min(s.start_ns for s in spans), max(s.end_ns for s in spans)


def _own_bridge_spans(spans: list[Span], request_id: str) -> dict[str, Span]:
    """The bridge's spans of this request (a trace may hold several requests' spans)."""
    out: dict[str, Span] = {}
    for s in spans:
        if s.name in (CAPTURE, EXPORT, KAFKA):
            rid = s.attributes.get("tensortrace.request_id", "")
            if request_id and rid and rid != request_id:
                continue
            out.setdefault(s.name, s)
    return out


def _engine_stages(spans: list[Span], timing: Timing | None) -> tuple[list[Stage], dict | None]:
    stages: list[Stage] = []
    decode_info = None
    reqs = [s for s in spans if is_request_span(s)]
    if not reqs:   # no SGLang request span: the span the request's traceparent named (an HTTP server span, ...)
        parents = {s.parent_span_id for s in spans if s.name == CAPTURE and s.parent_span_id}
        reqs = [s for s in spans if s.span_id in parents and s.name not in BRIDGE_SPANS]
    if reqs:
        a, b = _bounds(reqs)
        names = sorted({s.name.strip() for s in reqs})
        stages.append(Stage("request", a, b, f"{reqs[0].service or 'engine'} span",
                            f"{', '.join(repr(n) for n in names[:3])}" + (f" ({len(reqs)} spans)" if len(reqs) > 1 else "")))
    by_stage: dict[str, list[Span]] = {}
    for s in spans:
        st = SGLANG_STAGE.get(s.name)
        if st:
            by_stage.setdefault(st, []).append(s)
    for name, span_name in (("tokenize", "tokenize"), ("queue", "prefill_waiting")):
        got = by_stage.get(name)
        if got:
            a, b = _bounds(got)
            stages.append(Stage(name, a, b, f"{got[0].service or 'engine'} {span_name}",
                                f"{len(got)} spans" if len(got) > 1 else ""))
    steps = timing.steps if timing else []
    prefill_steps = [st for st in steps if st.phase == "prefill"]
    decode_steps = [st for st in steps if st.phase == "decode"]
    got = by_stage.get("prefill")
    if got:
        fwd = [s for s in got if s.name == "prefill_forward"] or got
        a, b = _bounds(fwd)
        chunks = [s for s in got if s.name == "chunked_prefill"]
        stages.append(Stage("prefill", a, b, f"{fwd[0].service or 'engine'} {fwd[0].name}",
                            f"{len(chunks)} chunks" if chunks else ""))
    elif prefill_steps:
        a = min(st.first_capture_ns for st in prefill_steps)
        nxt = [st.first_capture_ns for st in decode_steps if st.first_capture_ns >= a]
        b = min(nxt) if nxt else max(st.last_capture_ns for st in prefill_steps)
        stages.append(Stage("prefill", a, b, "capture times (tap to tap)",
                            f"{len(prefill_steps)} forward step(s); approximate: no engine spans"))
    loops = sorted((s for s in by_stage.get("decode", []) if s.name == "decode_loop"), key=lambda s: s.start_ns)
    if loops:
        durs = [s.duration_ns for s in loops]
        a, b = _bounds(loops)
        decode_info = {"steps": len(loops), "p50_ms": _pct(durs, 0.5) / 1e6, "max_ms": max(durs) / 1e6,
                       "mean_ms": sum(durs) / len(durs) / 1e6, "source": "decode_loop spans"}
        stages.append(Stage("decode", a, b, f"{loops[0].service or 'engine'} decode_loop",
                            f"{len(loops)} steps, p50 {_pct(durs, 0.5) / 1e6:.1f} ms, max {max(durs) / 1e6:.1f} ms",
                            [(s.start_ns, s.end_ns) for s in loops]))
    elif by_stage.get("decode"):
        fwd = by_stage["decode"]
        a, b = _bounds(fwd)
        stages.append(Stage("decode", a, b, f"{fwd[0].service or 'engine'} {fwd[0].name}", ""))
    elif decode_steps:
        ds = sorted(decode_steps, key=lambda st: st.first_capture_ns)
        pairs = []
        for i, st in enumerate(ds):
            end = ds[i + 1].first_capture_ns if i + 1 < len(ds) else max(st.last_capture_ns, st.first_capture_ns)
            pairs.append((st.first_capture_ns, max(end, st.first_capture_ns)))
        durs = [b - a for a, b in pairs]
        stats = durs[:-1] or durs    # the last step has no next tap: its tap-to-tap time is unknown
        decode_info = {"steps": len(ds), "p50_ms": _pct(stats, 0.5) / 1e6, "max_ms": max(stats) / 1e6,
                       "mean_ms": sum(stats) / len(stats) / 1e6, "source": "capture times (tap to tap)"}
        stages.append(Stage("decode", pairs[0][0], pairs[-1][1], "capture times (tap to tap)",
                            f"{len(ds)} steps, p50 {decode_info['p50_ms']:.1f} ms, max {decode_info['max_ms']:.1f} ms;"
                            " approximate: no engine spans", pairs))
    return stages, decode_info


def _pipeline_stages(inp: TraceInputs) -> list[Stage]:
    stages: list[Stage] = []
    own = _own_bridge_spans(inp.spans, inp.request_id)
    t = inp.timing
    steps = t.steps if t else []
    first_capture = min((st.first_capture_ns for st in steps if st.first_capture_ns), default=0)
    last_capture = max((st.last_capture_ns for st in steps), default=0)
    last_export = max([st.last_export_ns for st in steps] + [t.summary_export_ns if t else 0], default=0)
    last_load = max([st.last_load_ns for st in steps] + [t.summary_load_ns if t else 0], default=0)
    cap = own.get(CAPTURE)
    if cap:
        a = cap.attributes
        n = a.get("tensortrace.records.captured", "?")
        detail = (f"{_n(int(n)) if str(n).isdigit() else n} records, hooks {_list(a.get('tensortrace.hooks', '?'))}, "
                  f"{a.get('tensortrace.completeness', '?')}")
        if cap.status == "Error":
            detail += f" (ERROR: {cap.status_message})"
        stages.append(Stage("capture", cap.start_ns, cap.end_ns, "tensortrace.capture span", detail))
    elif t and t.summary_start_ns:
        stages.append(Stage("capture", t.summary_start_ns, max(t.summary_end_ns, t.summary_start_ns),
                            "request summary (start..end)", "the agent's lifetime of the request"))
    elif first_capture:
        stages.append(Stage("capture", first_capture, last_capture, "record capture times", "first..last tap"))
    c2e = max((s.capture_to_export_ms_p50 for s in inp.stats), default=None)
    e2l = max((s.export_to_load_ms_p50 for s in inp.stats), default=None)
    c2l = max((s.capture_to_load_ms_max for s in inp.stats), default=None)
    exp = own.get(EXPORT)
    if exp:
        stages.append(Stage("export", exp.start_ns, exp.end_ns, "tensortrace.export span",
                            "ring + exporter -> Kafka" + (f"; capture->export p50 {c2e:.1f} ms per record" if c2e is not None else "")))
    elif first_capture and last_export:
        stages.append(Stage("export", first_capture, max(last_export, first_capture), "record capture/export times",
                            "first capture .. last export" + (f"; capture->export p50 {c2e:.1f} ms per record" if c2e is not None else "")))
    kaf = own.get(KAFKA)
    if kaf:
        a = kaf.attributes
        where = ""
        if "messaging.destination.partition.id" in a:
            where = (f"partition {a['messaging.destination.partition.id']}, offsets "
                     f"{a.get('tensortrace.kafka.offset.first', '?')}-{a.get('tensortrace.kafka.offset.last', '?')}, ")
        stages.append(Stage("kafka", kaf.start_ns, kaf.end_ns, "tensortrace.kafka span",
                            f"{where}last export -> the bridge ({a.get('messaging.consumer.group.name', '?')}) received it"))
    stages += _probe_stage(inp)
    if last_load and last_export:
        detail = "last export -> the loader's last insert of the request"
        if e2l is not None:
            detail += f"; export->load p50 {e2l:.1f} ms, capture->load max {c2l:.1f} ms per record"
        if last_load < last_export:
            detail += " (load before export: clock skew between hosts)"
        stages.append(Stage("load", last_export, max(last_load, last_export), "load_time (activations, requests)", detail))
    return stages


def _probe_spans(spans: list[Span], request_id: str) -> list[Span]:
    return [s for s in spans if s.name == PROBE
            and (not request_id or s.attributes.get("tensortrace.request_id", request_id) == request_id)]


def _probe_verdicts(inp: TraceInputs) -> list[dict]:
    """One verdict per probe version: the probe_scores rows, else what the probe spans say."""
    if inp.probe_verdicts:
        return inp.probe_verdicts
    out = []
    for s in _probe_spans(inp.spans, inp.request_id):
        a = s.attributes
        try:
            score, threshold = float(a.get("gen_ai.evaluation.score.value", "nan")), float(
                a.get("tensortrace.probe.threshold", "nan"))
        except ValueError:
            score = threshold = float("nan")
        out.append({"probe": a.get("gen_ai.evaluation.name", "?"), "name": a.get("gen_ai.evaluation.name", "?"),
                     "probe_hash": a.get("tensortrace.probe.hash", ""), "score": score, "threshold": threshold,
                     "label": a.get("gen_ai.evaluation.score.label", "?"),
                     "complete": a.get("tensortrace.probe.complete") == "true",
                     "incomplete_reason": a.get("tensortrace.probe.incomplete_reason", ""),
                     "request_end_unix_nano": s.start_ns, "scored_unix_nano": s.end_ns})
    return out


def _probe_stage(inp: TraceInputs) -> list[Stage]:
    spans = _probe_spans(inp.spans, inp.request_id)
    if spans:
        a, b = _bounds(spans)
        return [Stage("probe", a, b, "tensortrace.probe span" + ("s" if len(spans) > 1 else ""),
                      f"{len(spans)} verdict(s): request end -> the probe service scored it")]
    timed = [v for v in inp.probe_verdicts if v["scored_unix_nano"]]
    if timed:
        a = min(v["request_end_unix_nano"] or v["scored_unix_nano"] for v in timed)
        b = max(v["scored_unix_nano"] for v in timed)
        return [Stage("probe", a, max(a, b), "probe_scores (request_end_time..scored_time)",
                      f"{len(timed)} verdict(s)")]
    return []


def _exclusive(stages: list[Stage], t0: int, t1: int) -> list[tuple[str, int]]:
    iv = [(s.name, s.start_ns, s.end_ns) for s in stages if s.end_ns > s.start_ns]
    cuts = sorted({t0, t1, *(a for _, a, _ in iv), *(b for _, _, b in iv)})
    rank = {n: i for i, n in enumerate(_EXCLUSIVE)}
    out: dict[str, int] = {}
    for a, b in zip(cuts, cuts[1:]):
        if b <= t0 or a >= t1:
            continue
        active = [n for n, s, e in iv if s <= a and e >= b]
        name = min(active, key=lambda n: rank.get(n, 99)) if active else "untraced"
        out[name] = out.get(name, 0) + (b - a)
    return sorted(((_EXCLUSIVE_LABEL.get(n, n), v) for n, v in out.items() if v > 0), key=lambda kv: -kv[1])


def _captured(inp: TraceInputs) -> dict | None:
    if not inp.stats and inp.completeness is None:
        return None
    by_hook: dict[str, list] = {}
    for s in inp.stats:
        by_hook.setdefault(s.hook, []).append(s)
    hooks = {h: {"layers": int_ranges([r.layer for r in rows if r.layer >= 0]) or "-",
                 "n_layers": len({r.layer for r in rows}),
                 "positions": [min(r.token_start for r in rows), max(r.token_end for r in rows)],
                 "records": sum(r.records for r in rows), "raw_bytes": sum(r.raw_bytes for r in rows),
                 "stored_bytes": sum(r.stored_bytes for r in rows)} for h, rows in by_hook.items()}
    c = inp.completeness
    out = {"hooks": hooks, "slots": sum(v["n_layers"] for v in hooks.values()),
           "records_loaded": sum(v["records"] for v in hooks.values()),
           "raw_bytes": sum(v["raw_bytes"] for v in hooks.values()),
           "stored_bytes": sum(v["stored_bytes"] for v in hooks.values()),
           "positions": ([min(v["positions"][0] for v in hooks.values()), max(v["positions"][1] for v in hooks.values())]
                         if hooks else None)}
    if c is not None:
        out.update(records_captured=c.records_captured, records_dropped=c.records_dropped,
                   records_loaded=c.records_loaded, prompt_tokens=c.prompt_tokens,
                   generated_tokens=c.generated_tokens, finish_reason=c.finish_reason, summaries=c.summaries)
    return out


def _clocks(inp: TraceInputs, stages: list[Stage]) -> list[str]:
    services = sorted({s.service for s in inp.spans if s.name not in BRIDGE_SPANS and s.service})
    bridge = sorted({s.service for s in inp.spans if s.name in BRIDGE_SPANS and s.service})
    t = inp.timing
    node = (t.producer_node or t.producer_pod) if t else ""
    lines = ["all times: wall-clock ns (Unix epoch) stamped by the host that produced them; offsets are from the first event"]
    if services:
        lines.append(f"engine spans ({', '.join(services)}): the serving engine's host clock")
    lines.append(f"capture / export: the agent and exporter on {node or 'the inference node'} (capture_time, export_time)")
    if bridge:
        lines.append(f"kafka end: the bridge's ({', '.join(bridge)}) receive time")
    if any(s.name == "load" for s in stages):
        lines.append("load: the loader's insert time (load_time)")
    if any(s.name == "probe" for s in stages):
        lines.append("probe: from the request's end (its summary, the agent's clock) to the probe service's "
                     "verdict (scored_time, its host's clock)")
    lines.append("skew between these hosts shifts their stages against each other (a negative gap is clamped to 0)")
    return lines


def build_story(inp: TraceInputs) -> TraceStory:
    """Stages in order, exclusive time per stage, what was captured, the clocks used."""
    engine, decode = _engine_stages(inp.spans, inp.timing)
    stages = engine + _pipeline_stages(inp)
    stages.sort(key=lambda s: STAGE_ORDER.index(s.name))
    events = [s.start_ns for s in stages if s.start_ns] + [s.start_ns for s in inp.spans if s.start_ns]
    ends = [s.end_ns for s in stages] + [s.end_ns for s in inp.spans if s.name != "tensortrace.step"]
    t0 = min(events) if events else 0
    t1 = max(ends) if ends else t0
    c = inp.completeness
    comp = None
    if c is not None:
        comp = {"state": c.state, "complete": c.complete, "records_captured": c.records_captured,
                "records_loaded": c.records_loaded, "records_dropped": c.records_dropped,
                "dropped_by_reason": dict(c.dropped_by_reason), "incomplete_reason": c.incomplete_reason,
                "summaries": c.summaries}
    return TraceStory(inp.trace_id, inp.request_id, inp.model, list(inp.request_ids), t0, t1, stages, decode,
                      _exclusive(stages, t0, t1), _captured(inp), comp, _clocks(inp, stages),
                      sorted(inp.spans, key=lambda s: (s.start_ns, s.name)), inp.probes, list(inp.notes),
                      _probe_verdicts(inp))


# -- terminal and JSON -----------------------------------------------------------------------------

def _utc(ns: int) -> str:
    if not ns:
        return "?"
    return datetime.datetime.fromtimestamp(ns / 1e9, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _bar(start: int, end: int, t0: int, total: int, width: int) -> str:
    if total <= 0:
        return " " * width
    a = int((start - t0) / total * width)
    b = int(round((end - t0) / total * width))
    a = min(max(a, 0), width - 1)
    b = min(max(b, a + 1), width)
    return " " * a + "#" * (b - a) + " " * (width - b)


def render_text(story: TraceStory, link: str = "", width: int = 32) -> str:
    out = [f"trace {story.trace_id}  request {story.request_id or '-'}  model {story.model or '?'}"]
    if len(story.request_ids) > 1:
        out.append(f"  (this trace holds {len(story.request_ids)} requests: {', '.join(story.request_ids[:8])}; "
                   f"showing {story.request_id}; --request-id picks another)")
    out.append(f"time 0 = {_utc(story.t0_ns)} (the first event); end to end {fmt_ms(story.total_ns)}")
    out.append("")
    out.append(f"{'stage':<10}{'start':>13}{'duration':>14}  {'|' + ' ' * width + '|'}  source; detail")
    for s in story.stages:
        out.append(f"{s.name:<10}{'+' + fmt_ms(s.start_ns - story.t0_ns):>13}{fmt_ms(s.duration_ns):>14}  "
                   f"|{_bar(s.start_ns, s.end_ns, story.t0_ns, story.total_ns, width)}|  "
                   f"{s.source}{'; ' + s.detail if s.detail else ''}")
    if not story.stages:
        out.append("  (no stages: nothing timed for this trace)")
    if story.where:
        out.append("")
        out.append(f"where the time went (exclusive time; end to end {fmt_ms(story.total_ns)}):")
        for name, ns in story.where[:6]:
            share = ns / story.total_ns if story.total_ns else 0
            pct = f"{share * 100:5.1f}%" if share >= 0.0005 else " <0.1%"
            out.append(f"  {name:<14}{fmt_ms(ns):>14}  {pct}  {'#' * max(1, round(share * 30))}")
        rest = story.where[6:]
        if rest:
            out.append(f"  {'(rest)':<14}{fmt_ms(sum(v for _, v in rest)):>14}  {', '.join(n for n, _ in rest)}")
    out.append("")
    cap = story.captured
    if cap and cap["hooks"]:
        hooks = ", ".join(f"{h} [{v['layers']}]" for h, v in sorted(cap["hooks"].items()))
        pos = cap["positions"]
        tok = ""
        if "prompt_tokens" in cap and cap.get("summaries"):
            tok = f" ({cap['prompt_tokens']} prompt + {cap['generated_tokens']} generated tokens, finish {cap['finish_reason'] or '?'})"
        out.append(f"captured: {len(cap['hooks'])} hooks x {cap['slots']} (hook, layer) slots: {hooks}")
        out.append(f"          positions {pos[0]}-{pos[1] - 1}{tok}")
        out.append(f"          records {_n(cap.get('records_captured'))} captured, {_n(cap['records_loaded'])} loaded, "
                   f"{_n(cap.get('records_dropped'))} dropped; {byte_size(cap['raw_bytes'])} raw, "
                   f"{byte_size(cap['stored_bytes'])} stored")
    elif cap:
        out.append("captured: no tensors stored for this request (summary only)")
    else:
        out.append("captured: nothing stored in the activations/requests tables for this trace")
    c = story.completeness
    if c:
        line = f"complete: {'yes' if c['complete'] else 'NO'} ({c['state']})"
        if c["dropped_by_reason"]:
            line += " dropped " + ", ".join(f"{k}: {v}" for k, v in sorted(c["dropped_by_reason"].items()))
        if c["incomplete_reason"]:
            line += f"; {c['incomplete_reason']}"
        out.append(line)
    for v in story.probe_verdicts:
        line = (f"probe {v['name']}: {v['score']:.3f} (threshold {v['threshold']:.3f}) {v['label'].upper()}"
                + ("" if v["complete"] else f"; over an incomplete request: {v['incomplete_reason'] or '?'}"))
        curve = (story.probes or {}).get(v["name"])
        if curve is not None and len(curve[1]):
            line += f"; {len(curve[0])} token scores, max {float(max(curve[1])):.3f}"
        out.append(line)
    services: dict[str, int] = {}
    for s in story.spans:
        services[s.service or "?"] = services.get(s.service or "?", 0) + 1
    out.append("spans: " + (", ".join(f"{k} {v}" for k, v in sorted(services.items())) if services else "none"))
    out.append("clocks: " + story.clocks[0])
    out.extend("        " + line for line in story.clocks[1:])
    for n in story.notes:
        out.append(f"note: {n}")
    if link:
        out.append(f"link: {link}")
    return "\n".join(out)


def story_dict(story: TraceStory, link: str = "") -> dict:
    t0 = story.t0_ns
    stages = []
    for s in story.stages:
        d = {"name": s.name, "start_ms": (s.start_ns - t0) / 1e6, "duration_ms": s.duration_ns / 1e6,
             "start_unix_nano": s.start_ns, "end_unix_nano": s.end_ns, "source": s.source, "detail": s.detail}
        if s.name == "decode" and story.decode:
            d.update({k: v for k, v in story.decode.items() if k != "source"})
        stages.append(d)
    return {
        "trace_id": story.trace_id, "request_id": story.request_id, "model": story.model,
        "request_ids": story.request_ids, "t0_unix_nano": t0, "t0_utc": _utc(t0), "end_unix_nano": story.end_ns,
        "total_ms": story.total_ns / 1e6, "stages": stages,
        "where": [{"stage": n, "ms": v / 1e6, "share": (v / story.total_ns if story.total_ns else 0.0)}
                  for n, v in story.where],
        "captured": story.captured, "completeness": story.completeness, "clocks": story.clocks,
        "probes": ({k: {"positions": list(map(int, p)), "scores": [float(x) for x in sc]}
                    for k, (p, sc) in story.probes.items()} if story.probes else None),
        "probe_verdicts": story.probe_verdicts,
        "spans": [{"span_id": s.span_id, "parent_span_id": s.parent_span_id, "name": s.name, "service": s.service,
                   "kind": s.kind, "start_ms": (s.start_ns - t0) / 1e6, "duration_ms": s.duration_ns / 1e6,
                   "status": s.status} for s in story.spans],
        "notes": story.notes, "link": link or None,
    }
