"""The pure part of the bridge: a released request -> its spans and otel_traces rows."""

import json
import threading

import pytest
from opentelemetry.trace import SpanKind, StatusCode

from tensortrace.bridge.export import ClickHouseWriter, bridge_resource, readable_span
from tensortrace.bridge.service import BridgeSink
from tensortrace.bridge.spans import (CAPTURE, EXPORT, KAFKA, RecordStats, SpanSource, attribute_string,
                                      request_spans, skip_reason, span_id, string_map, trace_columns)
from tensortrace.consume import CapturedRequest, Release
from tensortrace.consume.sink import SealedBatch, Source
from tensortrace.testing.synthetic import SyntheticRequest
from tensortrace.storage.otel import TRACES_COLUMNS
from tensortrace.wire.completeness import completeness

pytestmark = pytest.mark.unit

SOURCE = SpanSource(topic="tensortrace.activations", group_id="tensortrace-bridge")


def released(syn: SyntheticRequest, *, records=None, summaries=None, final=False, sources=None):
    records = syn.records if records is None else records
    summaries = [syn.summary] if summaries is None else summaries
    st = RecordStats()
    for r in records:
        st.add(r)
    req = CapturedRequest(trace_id=syn.trace_id, request_id=syn.request_id, model=syn.summary.model_id,
                          summaries=summaries, records_seen=len(records),
                          completeness=completeness(summaries, len(records), final=final),
                          sources=sources if sources is not None else {2: (10, 17)},
                          release=Release.TIMEOUT if final else Release.COMPLETE)
    return req, (st if records else None)


def by_name(spans):
    return {s.name: s for s in spans}


def test_span_ids_are_derived_from_trace_request_and_stage_never_zero_and_stable():
    tid = bytes(range(16))
    a = span_id(tid, "r1", CAPTURE)
    assert a == span_id(tid, "r1", CAPTURE) and len(a) == 8 and a != bytes(8)
    others = {span_id(tid, "r1", EXPORT), span_id(tid, "r2", CAPTURE), span_id(bytes(15) + b"\x01", "r1", CAPTURE),
              span_id(tid, "r1", "tensortrace.step", 3), span_id(tid, "r1", "tensortrace.step", 4)}
    assert a not in others and len(others) == 5
    # a fixed value: the derivation is part of the contract (docs/bridge.md), not an accident
    assert span_id(bytes(16), "req-1", CAPTURE).hex() == __import__("hashlib").blake2b(
        bytes(16) + b"req-1\x00tensortrace.capture", digest_size=8).hexdigest()


def test_a_complete_request_gets_capture_export_kafka_spans_in_its_own_trace():
    syn = SyntheticRequest.make("r1", layers=3, hidden=8, prompt=5, generated=3, model_id="m/tiny")
    req, st = released(syn)
    spans = request_spans(req, st, SOURCE, received_ns=syn.summary.export_time_unix_nano + 5_000_000)
    s = by_name(spans)
    assert [x.name for x in spans] == [CAPTURE, EXPORT, KAFKA]
    assert all(x.trace_id == syn.trace_id for x in spans)
    cap, exp, kaf = s[CAPTURE], s[EXPORT], s[KAFKA]
    assert cap.parent_span_id == syn.summary.span_id            # the request's own span
    assert exp.parent_span_id == cap.span_id and kaf.parent_span_id == cap.span_id
    assert cap.span_id == span_id(syn.trace_id, "r1", CAPTURE)
    assert (cap.kind, exp.kind, kaf.kind) == (SpanKind.INTERNAL, SpanKind.PRODUCER, SpanKind.CONSUMER)
    assert cap.start_ns == syn.summary.start_time_unix_nano and cap.end_ns == syn.summary.end_time_unix_nano
    first = min(r.capture_time_unix_nano for r in syn.records)
    assert exp.start_ns == first
    assert exp.end_ns == max([r.export_time_unix_nano for r in syn.records] + [syn.summary.export_time_unix_nano])
    assert kaf.start_ns == exp.end_ns and kaf.end_ns == syn.summary.export_time_unix_nano + 5_000_000
    a = cap.attributes
    assert a["gen_ai.request.model"] == "m/tiny"
    assert a["tensortrace.hooks"] == ["resid_final", "resid_pre"] and a["tensortrace.layers"] == [0, 1, 2]
    assert a["tensortrace.tokens.prompt"] == 5 == a["gen_ai.usage.input_tokens"]
    assert a["tensortrace.tokens.generated"] == 3 == a["gen_ai.usage.output_tokens"]
    assert a["tensortrace.records.captured"] == len(syn.records) == a["tensortrace.records.received"]
    assert a["tensortrace.records.dropped"] == 0 and a["tensortrace.complete"] is True
    assert a["tensortrace.bytes"] == syn.summary.bytes_captured
    assert a["tensortrace.steps"] == 3    # prefill + 2 decode steps
    assert (a["tensortrace.store"], a["tensortrace.table"]) == ("clickhouse", "tensortrace.activations")
    assert a["tensortrace.trace_id"] == syn.trace_id.hex() and a["tensortrace.request_id"] == "r1"
    assert cap.status is StatusCode.UNSET
    k = kaf.attributes
    assert (k["messaging.system"], k["messaging.destination.name"], k["messaging.destination.partition.id"]) == \
        ("kafka", "tensortrace.activations", "2")
    assert (k["tensortrace.kafka.offset.first"], k["tensortrace.kafka.offset.last"]) == (10, 17)
    assert k["messaging.consumer.group.name"] == "tensortrace-bridge"


def test_the_same_request_twice_gives_the_same_span_ids():
    syn = SyntheticRequest.make("r1", layers=1, hidden=8)
    a = request_spans(*released(syn), SOURCE, received_ns=1)
    b = request_spans(*released(syn), SOURCE, received_ns=2)
    assert [(x.trace_id, x.span_id, x.parent_span_id) for x in a] == [(x.trace_id, x.span_id, x.parent_span_id) for x in b]


def test_an_incomplete_request_has_status_error_with_the_reason():
    syn = SyntheticRequest.make("r1", layers=1, hidden=8)
    syn.summary.records_dropped = 3
    syn.summary.dropped_by_reason["ring_full"] = 3
    syn.summary.complete = False
    syn.summary.incomplete_reason = "3 records dropped: ring_full"
    cap = by_name(request_spans(*released(syn), SOURCE, received_ns=1))[CAPTURE]
    assert cap.status is StatusCode.ERROR and "ring_full" in cap.status_message
    assert cap.attributes["tensortrace.complete"] is False
    assert cap.attributes["tensortrace.completeness"] == "incomplete"
    assert cap.attributes["tensortrace.records.dropped"] == 3
    assert cap.attributes["tensortrace.records.dropped.ring_full"] == 3


def test_missing_records_and_a_missing_summary_are_errors_too():
    syn = SyntheticRequest.make("r1", layers=2, hidden=8)
    req, st = released(syn, records=syn.records[:-2], final=True)
    cap = by_name(request_spans(req, st, SOURCE, received_ns=1))[CAPTURE]
    assert cap.status is StatusCode.ERROR and "captured records arrived" in cap.status_message
    req, st = released(syn, summaries=[], final=True)
    spans = request_spans(req, st, SOURCE, received_ns=1)
    cap = by_name(spans)[CAPTURE]
    assert cap.status is StatusCode.ERROR and cap.attributes["tensortrace.completeness"] == "no_summary"
    assert cap.parent_span_id == syn.records[0].span_id                    # from the records
    assert cap.start_ns == min(r.capture_time_unix_nano for r in syn.records)
    assert "tensortrace.tokens.prompt" not in cap.attributes                # unknown, not 0


def test_no_trace_id_or_not_sampled_gets_no_spans():
    syn = SyntheticRequest.make("r1", layers=1, hidden=8)
    for tid in (b"", bytes(16)):
        req, st = released(syn)
        req.trace_id = tid
        assert skip_reason(req) == "no_trace_id" and request_spans(req, st, SOURCE, 1) == []
    syn.summary.sampled = False
    req, _ = released(syn, records=[])
    assert skip_reason(req) == "not_sampled" and request_spans(req, None, SOURCE, 1) == []


def test_a_request_without_a_parent_span_id_gets_a_root_capture_span():
    syn = SyntheticRequest.make("r1", layers=1, hidden=8)
    syn.summary.span_id = b""
    for r in syn.records:
        r.span_id = b""
    cap = by_name(request_spans(*released(syn), SOURCE, received_ns=1))[CAPTURE]
    assert cap.parent_span_id == b""


def test_attribute_strings_follow_the_collector_exporter():
    assert [attribute_string(v) for v in (True, False, 3, 1.5, "x")] == ["true", "false", "3", "1.5", "x"]
    assert attribute_string(["a", "b"]) == '["a","b"]' and attribute_string([1, 2]) == "[1,2]"
    assert attribute_string(['q"t', "é"]) == '["q\\"t","é"]' and attribute_string([]) == "[]"
    for v in (["a", 'b"', "c\\"], [1, "x"], ["\n"]):
        assert json.loads(attribute_string(v)) == v
    assert string_map({"a": 1, "b": "s", "c": [0, 1]}) == {"a": "1", "b": "s", "c": "[0,1]"}


def test_otel_traces_columns_match_the_table_and_the_exporter_conventions():
    syn = SyntheticRequest.make("r1", layers=1, hidden=8)
    syn.summary.complete = False
    syn.summary.incomplete_reason = "cut short"
    spans = request_spans(*released(syn), SOURCE, received_ns=1)
    cols = trace_columns(spans, "tensortrace-bridge", {"service.name": "tensortrace-bridge"}, "tensortrace.bridge", "0.1.0")
    assert len(cols.columns) == len(TRACES_COLUMNS) and len(cols) == 3
    row = dict(zip(TRACES_COLUMNS, [c[0] for c in cols.columns]))
    assert row["TraceId"] == syn.trace_id.hex() and row["ParentSpanId"] == syn.summary.span_id.hex()
    assert row["SpanKind"] == "Internal" and row["StatusCode"] == "Error" and row["StatusMessage"] == "cut short"
    assert row["SpanAttributes"]["tensortrace.complete"] == "false"
    assert row["Duration"] == spans[0].end_ns - spans[0].start_ns and row["Timestamp"] == spans[0].start_ns
    kinds = [c for c in cols.columns[TRACES_COLUMNS.index("SpanKind")]]
    assert kinds == ["Internal", "Producer", "Consumer"]


def test_readable_span_carries_our_ids_parent_and_status():
    syn = SyntheticRequest.make("r1", layers=1, hidden=8)
    syn.summary.complete = False
    spans = request_spans(*released(syn), SOURCE, received_ns=1)
    rs = readable_span(spans[0], bridge_resource("svc"), None)
    assert rs.context.trace_id == int.from_bytes(syn.trace_id, "big")
    assert rs.context.span_id == int.from_bytes(spans[0].span_id, "big")
    assert rs.parent.span_id == int.from_bytes(syn.summary.span_id, "big") and rs.parent.is_remote
    assert rs.status.status_code is StatusCode.ERROR
    assert rs.resource.attributes["service.name"] == "svc"


def test_the_sink_keeps_no_payloads_and_hands_record_stats_with_each_request():
    written = []
    sink = BridgeSink(lambda spans, stopping: written.extend(spans) or True, SOURCE, timeout_s=60)
    a = SyntheticRequest.make("a", layers=2, hidden=8)
    b = SyntheticRequest.make("b", layers=2, hidden=8)
    for i, rec in enumerate(a.records + a.records):        # every record twice: duplicates
        sink.add_tensor(rec, Source("t", 1, i))
    sink.add_summary(a.summary, Source("t", 1, 99))
    for rec in b.records[:3]:
        sink.add_tensor(rec, Source("t", 0, 5))
    batch = sink.seal()
    assert [req.request_id for req, _ in batch.requests] == ["a"]
    assert (sink.commit_offset(1, 200), sink.commit_offset(0, 200)) == (200, 5)   # "b" is held while open
    req, st = batch.requests[0]
    assert req.records == [] and req.records_seen == len(a.records) and req.completeness.complete
    assert st.layers == {0, 1} and st.first_capture_ns == min(r.capture_time_unix_nano for r in a.records)
    assert sink.open_record_stats == 1                           # only "b" is still open
    assert sink.flush(SealedBatch(batch), threading.Event())
    assert sink.commit_offset(0, 200) == 5
    assert [s.name for s in written] == [CAPTURE, EXPORT, KAFKA]
    assert sink.stats.requests == {"complete": 1} and sink.stats.spans == 3
    sink.revoked({0})                                            # "b"'s partition moved away
    assert sink.open_record_stats == 0 and sink.view.stats.requests_open == 0


def test_the_clickhouse_writer_retries_until_the_insert_succeeds():
    class Flaky:
        def __init__(self):
            self.calls = 0
            self.rows = 0

        def insert(self, table, columns, column_names, column_oriented):
            self.calls += 1
            if self.calls < 3:
                raise ConnectionError("down")
            self.rows += len(columns[0])

    syn = SyntheticRequest.make("r1", layers=1, hidden=8)
    client = Flaky()
    w = ClickHouseWriter(client, "otel", "otel_traces", resource=bridge_resource("svc"), retry_initial_s=0.01,
                         retry_max_s=0.02)
    assert w.write(request_spans(*released(syn), SOURCE, received_ns=1), threading.Event())
    assert client.rows == 3 and w.stats.failures == 2 and w.stats.spans == 3
    stopping = threading.Event()
    stopping.set()
    client.calls = 0
    assert not w.write(request_spans(*released(syn), SOURCE, received_ns=1), stopping)   # gives up only when stopping


def test_commits_never_fall_inside_a_released_request():
    sink = BridgeSink(lambda spans, stopping: True, SOURCE, timeout_s=60)
    r1 = SyntheticRequest.make("r1", layers=1, hidden=8)
    r2 = SyntheticRequest.make("r2", layers=1, hidden=8)
    sink.add_tensor(r1.records[0], Source("t", 0, 0))
    sink.add_tensor(r2.records[0], Source("t", 0, 1))         # r2 opens at offset 1, never ends here
    for i, rec in enumerate(r1.records[1:]):
        sink.add_tensor(rec, Source("t", 0, 2 + i))
    sink.add_summary(r1.summary, Source("t", 0, 2 + len(r1.records)))
    batch = sink.seal()
    assert sink.flush(SealedBatch(batch), threading.Event())   # r1 exported
    assert sink.commit_offset(0, 500) == 0                      # not 1 (r2's first): that would cut r1
    for i, rec in enumerate(r2.records[1:]):
        sink.add_tensor(rec, Source("t", 0, 100 + i))
    sink.add_summary(r2.summary, Source("t", 0, 200))
    assert sink.flush(SealedBatch(sink.seal()), threading.Event())
    assert sink.commit_offset(0, 500) == 500                    # nothing held any more


def test_step_spans_link_every_request_of_a_forward_step_once_it_is_quiet():
    now = [100.0]
    written = []
    sink = BridgeSink(lambda spans, stopping: written.extend(spans) or True, SOURCE, timeout_s=60, step_spans=True,
                      step_linger_s=2.0, monotonic=lambda: now[0])
    reqs = [SyntheticRequest.make(f"s{i}", layers=2, hidden=8, prompt=4 + i, generated=3) for i in range(3)]
    offset = 0
    for r in reqs:
        for rec in r.records:
            sink.add_tensor(rec, Source("t", 0, offset))
            offset += 1
    assert sink.open_steps == 3                       # prefill (step 0) and decode steps 1, 2, shared by all three
    assert sink.seal() is None                        # not quiet yet, no request released
    assert sink.commit_offset(0, 500) == 0            # pending steps hold commits
    now[0] += 2.5
    batch = sink.seal()
    assert len(batch.steps) == 3 and sink.open_steps == 0
    assert sink.flush(SealedBatch(batch), threading.Event())
    steps = {s.attributes["tensortrace.step"]: s for s in written if s.name == "tensortrace.step"}
    assert set(steps) == {0, 1, 2} and sink.stats.steps == 3
    prefill = steps[0]
    assert prefill.attributes["tensortrace.batch.requests"] == 3 == prefill.attributes["tensortrace.batch.prefill_requests"]
    assert prefill.attributes["tensortrace.batch.tokens"] == 4 + 5 + 6
    assert steps[1].attributes["tensortrace.batch.decode_requests"] == 3 and steps[1].attributes["tensortrace.batch.tokens"] == 3
    links = {(t, sid) for t, sid, _ in prefill.links}
    assert links == {(r.trace_id, span_id(r.trace_id, r.request_id, CAPTURE)) for r in reqs}
    assert prefill.trace_id not in {r.trace_id for r in reqs} and prefill.parent_span_id == b""
    again = BridgeSink(lambda spans, stopping: True, SOURCE, step_spans=True, monotonic=lambda: now[0])
    for r in reqs:
        for rec in r.records:
            again.add_tensor(rec, Source("t", 0, 0))
    now[0] += 2.5
    from tensortrace.bridge.spans import step_span
    assert {step_span(ss)[0].span_id for ss in again.seal().steps} == {s.span_id for s in steps.values()}   # a replay: same ids
    late = SyntheticRequest.make("late", layers=1, hidden=8)
    sink.add_tensor(late.records[0], Source("t", 0, 999))       # step 0 of this producer was emitted already
    assert sink.stats.step_late_records == 1 and sink.open_steps == 0
    cols = trace_columns([prefill], "svc", {}, "scope", "v")
    row = dict(zip(TRACES_COLUMNS, [c[0] for c in cols.columns]))
    assert sorted(row["Links.SpanId"]) == sorted(sid.hex() for _, sid in links)
    assert {a["tensortrace.phase"] for a in row["Links.Attributes"]} == {"prefill"}


def test_a_step_span_never_drops_a_link_a_cap_moves_the_rest_to_link_spans():
    from tensortrace.bridge.spans import STEP_LINKS, StepStats, step_span
    reqs = [SyntheticRequest.make(f"m{i}", layers=1, hidden=8) for i in range(5)]
    ss = StepStats(reqs[0].records[0])
    for r in reqs:
        ss.add(r.records[0], 0, 0, 0.0)
    want = {(r.trace_id, span_id(r.trace_id, r.request_id, CAPTURE)) for r in reqs}
    (whole,) = step_span(ss)                                       # default: every link on the step span
    assert {(t, sid) for t, sid, _ in whole.links} == want and whole.attributes["tensortrace.batch.links"] == 5
    step, *rest = step_span(ss, max_links=2)                       # a cap: 2 + 2 + 1, all of them
    assert [len(s.links) for s in [step, *rest]] == [2, 2, 1] and step.attributes["tensortrace.batch.link_spans"] == 3
    assert step.span_id == whole.span_id and {s.name for s in rest} == {STEP_LINKS}
    assert all(s.parent_span_id == step.span_id and s.trace_id == step.trace_id for s in rest)
    assert {(t, sid) for s in [step, *rest] for t, sid, _ in s.links} == want
    assert [s.span_id for s in step_span(ss, max_links=2)] == [s.span_id for s in [step, *rest]]   # derived ids
    assert len({s.span_id for s in [step, *rest]}) == 3


def test_the_sdk_span_limits_do_not_apply_to_the_bridges_finished_spans(monkeypatch):
    """The SDK's link limit (128, OTEL_SPAN_LINK_COUNT_LIMIT) is applied by its Tracer while a span is
    recorded; the bridge hands finished ReadableSpans to the real OTLP encoder, which keeps every link."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    from tensortrace.bridge.export import bridge_resource, bridge_scope, readable_span
    from tensortrace.bridge.spans import StepStats, step_span
    monkeypatch.setenv("OTEL_SPAN_LINK_COUNT_LIMIT", "128")
    monkeypatch.setenv("OTEL_ATTRIBUTE_COUNT_LIMIT", "8")
    base = SyntheticRequest.make("big", layers=1, hidden=8)
    ss = StepStats(base.records[0])
    for i in range(300):
        rec = type(base.records[0])()
        rec.CopyFrom(base.records[0])
        rec.request_id, rec.trace_id = f"b{i:03d}", bytes([1 + i % 200]) * 16
        ss.add(rec, 0, i, 0.0)
    (s,) = step_span(ss)
    req = encode_spans([readable_span(s, bridge_resource("t"), bridge_scope())])
    (span,) = [x for rs in req.resource_spans for ss_ in rs.scope_spans for x in ss_.spans]
    assert len(span.links) == 300 and span.dropped_links_count == 0
    assert len(span.attributes) == len(s.attributes) > 8 and span.dropped_attributes_count == 0


def test_capture_spans_name_their_step_spans_bounded():
    from tensortrace.bridge.spans import step_ids
    reqs = [SyntheticRequest.make("short", layers=1, hidden=8, prompt=4, generated=3),
            SyntheticRequest.make("long", layers=1, hidden=8, prompt=4, generated=40)]
    written = []
    src = SpanSource("t", "g", step_spans=True, step_ids_max=8)
    sink = BridgeSink(lambda spans, stopping: written.extend(spans) or True, src, timeout_s=60)
    for r in reqs:
        for rec in r.records:
            sink.add_tensor(rec, Source("t", 0, 0))
        sink.add_summary(r.summary, Source("t", 0, 0))
    assert sink.flush(SealedBatch(sink.seal()), threading.Event())
    caps = {s.attributes["tensortrace.request_id"]: s.attributes for s in written if s.name == CAPTURE}
    p = reqs[0].records[0].producer
    short, long_ = caps["short"], caps["long"]
    assert short["tensortrace.step.span_ids"] == [step_ids(p.pod, p.pid, p.generation, k)[1].hex() for k in range(3)]
    assert short["tensortrace.step.trace_ids"] == [step_ids(p.pod, p.pid, p.generation, k)[0].hex() for k in range(3)]
    assert short["tensortrace.step.span_ids.omitted"] == 0
    assert len(long_["tensortrace.step.span_ids"]) == 8 and long_["tensortrace.step.span_ids.omitted"] == 40 - 8
    assert (long_["tensortrace.step.first"], long_["tensortrace.step.last"]) == (0, 39)
    assert long_["tensortrace.step.producers"] == [f"{p.pod}/{p.pid}/{p.generation}"]
    # not emitted without step spans: the ids would name spans that do not exist
    req, st = released(reqs[0])
    plain = by_name(request_spans(req, st, SOURCE, received_ns=1))[CAPTURE]
    assert not any(k.startswith("tensortrace.step.") for k in plain.attributes)
