"""The pure part of `tensortrace trace`: stages, exclusive time, clock skew, incomplete requests,
and the CLI's small parsers (no engine)."""

from __future__ import annotations

import pytest

from tensortrace.query.timeline import (Span, StepTimes, Timing, TraceInputs, build_story, is_request_span,
                                        render_text, story_dict)
from tensortrace.query.trace import make_link, parse_since, safe_dsn
from tensortrace.wire.completeness import Completeness

pytestmark = pytest.mark.unit

MS = 1_000_000
T = 1_700_000_000_000_000_000


def span(name, a_ms, b_ms, service="sglang", **attrs):
    return Span(f"{abs(hash((name, a_ms))) & 0xFFFFFFFF:016x}", "", name, "Internal", service, T + int(a_ms * MS),
                int((b_ms - a_ms) * MS), attributes={k.replace("__", "."): v for k, v in attrs.items()})


def test_exclusive_time_gives_each_instant_to_the_most_specific_stage_and_sums_to_the_total():
    spans = [span(" Req abc", 0, 100, rid="abc"), span("tokenize", 0, 5), span("prefill_waiting", 10, 30),
             span("prefill_forward", 30, 50)] + [span("decode_loop", 50 + 10 * k, 60 + 10 * k) for k in range(4)]
    timing = Timing([StepTimes(0, "prefill", T + 30 * MS, T + 31 * MS, T + 33 * MS, T + 150 * MS)],
                    summary_start_ns=T + 30 * MS, summary_end_ns=T + 90 * MS, summary_export_ns=T + 95 * MS,
                    summary_load_ns=T + 150 * MS)
    story = build_story(TraceInputs("ab" * 16, "abc", spans=spans, timing=timing))
    assert [s.name for s in story.stages] == ["request", "tokenize", "queue", "prefill", "decode", "capture", "export",
                                              "load"]
    where = dict(story.where)
    assert where == {"tokenize": 5 * MS, "engine, other": 5 * MS + 10 * MS, "queue": 20 * MS, "prefill": 20 * MS,
                     "decode": 40 * MS, "load": 50 * MS}    # 90..100 is the request's tail after decode: engine, other
    assert sum(where.values()) == story.total_ns == 150 * MS
    assert story.decode["steps"] == 4 and story.decode["p50_ms"] == 10.0


def test_clock_skew_never_makes_a_negative_stage_and_says_so():
    timing = Timing([StepTimes(0, "prefill", T + 10 * MS, T + 12 * MS, T + 20 * MS, T + 15 * MS)],
                    summary_start_ns=T + 10 * MS, summary_end_ns=T + 12 * MS)
    story = build_story(TraceInputs("ab" * 16, "r", timing=timing))
    load = story.stage("load")
    assert load.duration_ns == 0 and "clock skew" in load.detail
    assert all(s.duration_ns >= 0 for s in story.stages)


def test_an_incomplete_request_says_so_and_gaps_are_untraced():
    comp = Completeness("incomplete", records_captured=10, records_dropped=3, records_loaded=7,
                        dropped_by_reason={"ring_full": 3}, incomplete_reason="3 records dropped: ring_full",
                        summaries=1)
    spans = [span("tokenize", 0, 5), span("prefill_forward", 20, 30)]
    story = build_story(TraceInputs("ab" * 16, "r", spans=spans, completeness=comp))
    assert dict(story.where)["untraced"] == 15 * MS
    text = render_text(story, link="http://x/ab")
    assert "complete: NO (incomplete) dropped ring_full: 3; 3 records dropped: ring_full" in text
    assert text.rstrip().endswith("link: http://x/ab")
    assert story_dict(story)["completeness"]["records_dropped"] == 3


def test_request_spans_are_sglangs_req_spans_or_spans_with_a_rid():
    assert is_request_span(span(" Req 1a2b3c4d", 0, 1)) and is_request_span(span("prefill Req 1a2b3c4d", 0, 1))
    assert is_request_span(span("whatever", 0, 1, rid="x"))
    assert not is_request_span(span("decode_loop", 0, 1)) and not is_request_span(span("tensortrace.capture", 0, 1, rid="x"))


def test_since_dsn_and_link_helpers():
    assert [parse_since(x) for x in ("30s", "10m", "2h", "1d", "90", "1.5h")] == [30, 600, 7200, 86400, 90, 5400]
    for bad in ("", "ten", "-5m", "5w"):
        with pytest.raises(ValueError):
            parse_since(bad)
    assert safe_dsn("http://u:pw@h:8123/x") == "http://u:***@h:8123/x"
    assert safe_dsn("chdb:///var/lib/tt") == "chdb:///var/lib/tt" and safe_dsn("https://h") == "https://h"
    assert make_link("http://g/explore?p={\"q\":\"{trace_id}\"}&r={request_id}", "ab", "r1") == \
        "http://g/explore?p={\"q\":\"ab\"}&r=r1"
    assert make_link("", "ab") == ""


def test_without_an_engine_request_span_the_traceparents_span_is_the_request():
    http = span("POST /generate", 0, 80, service="gateway")
    cap = span("tensortrace.capture", 10, 70, service="tensortrace-bridge")
    cap.parent_span_id = http.span_id
    other = span("GET /health", 0, 200, service="gateway")
    story = build_story(TraceInputs("ab" * 16, "r", spans=[http, cap, other]))
    req = story.stage("request")
    assert (req.start_ns, req.end_ns, req.source) == (T, T + 80 * MS, "gateway span")
