"""`tensortrace trace`: one request's story from real pipeline parts in a real ClickHouse engine (chDB).

The request's records and summary are inserted as the loader inserts them (loader.rows.ColumnBatch,
with a chosen load time), SGLang-shaped spans and the bridge's own spans (bridge.spans.request_spans
-> bridge.export.ClickHouseWriter) go into otel_traces (tensortrace.testing.traces); then the CLI
runs in-process against the session's engine, as a user runs it against theirs.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tensortrace.query.trace import main as trace
from tensortrace.query.timeline import STAGE_ORDER
from tensortrace.testing.traces import MS, TimedRequest, insert_timed
from tensortrace.v1 import records_pb2 as pb

pytestmark = pytest.mark.integration

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def store(tt_db, ch_dsn):
    """(client, db, args): a migrated database that also holds otel_traces, and the CLI's source flags."""
    client, db = tt_db
    return client, db, ["--clickhouse", ch_dsn, "--database", db, "--otel-database", db]


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = trace(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def stage_rows(text: str) -> dict[str, tuple[float, float]]:
    """{stage: (start ms, duration ms)} from the terminal timeline."""
    rows = {}
    for line in text.splitlines():
        m = re.match(r"^(\w+)\s+\+([\d,.]+) ms\s+([\d,.]+) ms\s+\|", line)
        if m:
            rows[m.group(1)] = (float(m.group(2).replace(",", "")), float(m.group(3).replace(",", "")))
    return rows


def test_the_timeline_lists_every_stage_in_order_with_its_duration(store, capsys):
    client, db, src = store
    req = TimedRequest.make("req-story", layers=4, hidden=16, prompt=6, generated=6)
    insert_timed(client, db, req, otel_database=db)
    rc, out, err = run(capsys, req.trace_id, *src)
    assert rc == 0, err
    rows = stage_rows(out)
    assert list(rows) == list(STAGE_ORDER[:-1])   # request, tokenize, queue, prefill, decode, capture, export, kafka, load (no probe)
    t0 = req.expected["request"][0]
    for name, (a, b) in req.expected.items():
        assert rows[name] == (pytest.approx((a - t0) / MS, abs=0.051), pytest.approx((b - a) / MS, abs=0.051)), name
    assert rows["queue"][1] == 10.0 and rows["prefill"][1] == 20.0 and rows["kafka"][1] == 7.0 and rows["load"][1] == 40.0
    # decode: 5 decode_loop steps of 5 ms with one of 15 ms in the middle
    assert "5 steps, p50 5.0 ms, max 15.0 ms" in out
    assert f"trace {req.trace_id}  request req-story" in out
    where = out.split("where the time went")[1].splitlines()
    assert where[1].split()[0] == "load" and where[2].split()[0] == "decode"    # 40 ms, then 35 ms
    assert "captured: 2 hooks x 5 (hook, layer) slots: resid_final [-], resid_pre [0-3]" in out
    assert "positions 0-10 (6 prompt + 6 generated tokens, finish length)" in out
    assert f"records {len(req.syn.records)} captured, {len(req.syn.records)} loaded, 0 dropped" in out
    assert "complete: yes (complete)" in out
    assert "spans: sglang 13, tensortrace-bridge 3" in out
    assert "wall-clock ns" in out and "node-a" in out


def test_json_is_the_same_story(store, capsys, monkeypatch):
    client, db, src = store
    req = TimedRequest.make("req-json", layers=2, hidden=8, prompt=4, generated=4)
    insert_timed(client, db, req, otel_database=db)
    insert_timed(client, db, req, otel_database=db)          # re-delivered: rows and spans twice, read once
    monkeypatch.setenv("TENSORTRACE_TRACE_LINK", "http://grafana/explore?left={\"q\":\"{trace_id}\"}")
    rc, out, err = run(capsys, req.trace_id, *src, "--json")
    assert rc == 0, err
    d = json.loads(out)
    assert d["trace_id"] == req.trace_id and d["request_id"] == "req-json" and d["request_ids"] == ["req-json"]
    assert [s["name"] for s in d["stages"]] == list(STAGE_ORDER[:-1])   # no probe scores here
    st = {s["name"]: s for s in d["stages"]}
    for name, (a, b) in req.expected.items():
        assert (st[name]["start_unix_nano"], st[name]["end_unix_nano"]) == (a, b), name
    assert st["decode"]["steps"] == 3 and st["decode"]["max_ms"] == 15.0 and st["decode"]["source"] == "sglang decode_loop"
    assert sum(w["ms"] for w in d["where"]) == pytest.approx(d["total_ms"])
    assert d["completeness"]["state"] == "complete" and d["captured"]["records_loaded"] == len(req.syn.records)
    assert len(d["spans"]) == len(req.sglang_spans) + 3 == len({s["span_id"] for s in d["spans"]})
    assert d["link"] == "http://grafana/explore?left={\"q\":\"" + req.trace_id + "\"}"


def test_without_spans_the_stages_come_from_the_records_and_the_summary(store, capsys):
    client, db, src = store
    req = TimedRequest.make("req-nospans", layers=3, hidden=8, prompt=5, generated=5)
    insert_timed(client, db, req)                              # no otel_traces table at all
    rc, out, err = run(capsys, req.trace_id, *src, "--json")
    assert rc == 0, err
    d = json.loads(out)
    st = {s["name"]: s for s in d["stages"]}
    assert list(st) == ["prefill", "decode", "capture", "export", "load"]
    assert st["capture"]["source"] == "request summary (start..end)"
    assert (st["capture"]["start_unix_nano"], st["capture"]["end_unix_nano"]) == req.expected["capture"]
    assert (st["export"]["start_unix_nano"], st["export"]["end_unix_nano"]) == req.expected["export"]
    assert (st["load"]["start_unix_nano"], st["load"]["end_unix_nano"]) == req.expected["load"]
    # tap to tap: the first decode step's taps start exactly when the step does
    assert st["prefill"]["source"] == "capture times (tap to tap)" and st["decode"]["steps"] == 4
    assert st["prefill"]["duration_ms"] == pytest.approx(20.0) and st["decode"]["p50_ms"] == pytest.approx(5.0)
    assert any("otel_traces table: no spans" in n for n in d["notes"])


def test_html_holds_the_timeline_and_a_heatmap_of_the_residual_norms(store, capsys, tmp_path, ch_dsn):
    client, db, src = store
    req = TimedRequest.make("req-html", layers=5, hidden=32, prompt=7, generated=6, encoding=pb.SHUFFLE_ZSTD)
    insert_timed(client, db, req, otel_database=db)
    page = tmp_path / "trace.html"
    rc, out, err = run(capsys, req.trace_id, *src, "--html", str(page))
    assert rc == 0, err
    assert f"wrote {page}" in err
    text = page.read_text()
    assert "<img id='heatmap'" in text and "<img id='timeline'" in text and "id='probes'" not in text
    assert not re.search(r"(src|href)\s*=\s*['\"]?(https?:)?//", text)    # nothing loaded from the network
    assert not re.search(r"<(script|link)\b", text)
    for name in ("timeline", "heatmap"):
        data = base64.b64decode(re.search(rf"<img id='{name}'[^>]*src='data:image/png;base64,([^']+)'", text).group(1))
        assert data.startswith(PNG_MAGIC)
    assert "req-html" in text and "Where the time went" in text and "prefill_forward" in text

    # the heatmap's numbers: the numpy path (no torch) equals the SDK's tensors, row by row
    from tensortrace.query import TensorTraceClient
    from tensortrace.query.tracedata import TraceSource

    source = TraceSource(client, db, db)
    _, ref = source.inputs(req.trace_id)
    norms = source.residual_norms(ref)
    got = TensorTraceClient(client, database=db).tensors(trace_id=req.trace_id, hooks=["resid_pre"])
    assert norms.layers == [0, 1, 2, 3, 4] and (norms.start, norms.end) == (0, 12)
    for i, layer in enumerate(norms.layers):
        want = got["resid_pre", layer].tensor.float().norm(dim=-1).numpy()
        np.testing.assert_allclose(norms.norms[i], want, rtol=1e-5)


def test_the_heatmap_marks_missing_positions_and_falls_back_to_the_sdk_for_token_lists(store):
    client, db, _ = store
    from tensortrace.query.tracedata import TraceSource

    req = TimedRequest.make("req-gaps", layers=2, hidden=8, prompt=4, generated=5)
    lost = [r for r in req.syn.records if r.token_start == 5]
    insert_timed(client, db, req, records=[r for r in req.syn.records if r not in lost])
    source = TraceSource(client, db, db)
    _, ref = source.inputs(req.trace_id)
    norms = source.residual_norms(ref)
    assert np.isnan(norms.norms[:, 5]).all() and not np.isnan(norms.norms[:, :5]).any()

    lst = TimedRequest.make("req-list", layers=1, hidden=8, prompt=4, generated=2)
    for r in lst.syn.records:   # the same rows as TOKEN_LIST records: the SDK (torch) path
        r.positions_kind = pb.TOKEN_LIST
        r.positions[:] = list(range(r.token_start, r.token_end))
    insert_timed(client, db, lst)
    _, ref = source.inputs(lst.trace_id)
    norms = source.residual_norms(ref)
    want = lst.syn.truth["resid_pre", 0].float().norm(dim=-1).numpy()
    np.testing.assert_allclose(norms.norms[0], want, rtol=1e-5)


# The probe_scores table as storage migration 3 makes it (the probe service's scores, loaded by the
# loader): created here if the migrations did not already, with exactly its columns.
PROBE_SCORES_DDL = """CREATE TABLE IF NOT EXISTS {db}.probe_scores (
    trace_id FixedString(16), span_id FixedString(8), request_id String, model LowCardinality(String),
    probe LowCardinality(String), probe_hash String, score Float64, threshold Float64, flagged Bool, shadow Bool,
    complete Bool, incomplete_reason String, hook LowCardinality(String), layers Array(Int32),
    pooling LowCardinality(String), tokens_scored UInt32, token_scores Array(Float32), token_positions Array(UInt32),
    request_end_time DateTime64(9, 'UTC'), scored_time DateTime64(9, 'UTC'), release LowCardinality(String),
    load_time DateTime64(9, 'UTC'), kafka_partition UInt32, kafka_offset UInt64)
ENGINE = ReplacingMergeTree(scored_time) ORDER BY (trace_id, request_id, probe, probe_hash)"""
PROBE_SCORE_COLUMNS = ["trace_id", "span_id", "request_id", "model", "probe", "probe_hash", "score", "threshold",
                       "flagged", "shadow", "complete", "incomplete_reason", "hook", "layers", "pooling",
                       "tokens_scored", "token_scores", "token_positions", "request_end_time", "scored_time",
                       "release", "load_time", "kafka_partition", "kafka_offset"]


def probe_score(req, probe: str, score: float, *, threshold: float = 0.5, shadow: bool = False, positions=range(8),
                token_scores=None, probe_hash: str = "a1b2c3d4e5f60718", complete: bool = True,
                after_ms: float = 30.0) -> pb.ProbeScore:
    """A ProbeScore as the probe service publishes it for a TimedRequest."""
    end = req.syn.summary.end_time_unix_nano
    positions = list(positions)
    token_scores = token_scores if token_scores is not None else [score * (i + 1) / len(positions) for i in
                                                                  range(len(positions))]
    return pb.ProbeScore(model_id=req.syn.summary.model_id, request_id=req.request_id, trace_id=req.syn.trace_id,
                         span_id=req.syn.summary.span_id, probe=probe, probe_hash=probe_hash, score=score,
                         threshold=threshold, flagged=score >= threshold and not shadow, shadow=shadow,
                         complete=complete, incomplete_reason="" if complete else "2 records dropped: ring_full",
                         hook="resid_pre", layers=[1, 2], pooling="mean", tokens_scored=len(positions),
                         token_scores=token_scores, token_positions=positions, request_end_time_unix_nano=end,
                         scored_time_unix_nano=end + int(after_ms * 1e6), release="complete")


def insert_probe_scores(client, db: str, scores: list[pb.ProbeScore], load_ns: int = 0) -> None:
    """Rows as the loader writes them from the scores topic (one per ProbeScore)."""
    client.command(PROBE_SCORES_DDL.format(db=db))
    rows = [[s.trace_id, s.span_id, s.request_id, s.model_id, s.probe, s.probe_hash, s.score, s.threshold, s.flagged,
             s.shadow, s.complete, s.incomplete_reason, s.hook, list(s.layers), s.pooling, s.tokens_scored,
             list(s.token_scores), list(s.token_positions), s.request_end_time_unix_nano, s.scored_time_unix_nano,
             s.release, load_ns or s.scored_time_unix_nano + 5_000_000, 0, i] for i, s in enumerate(scores)]
    client.insert(f"{db}.probe_scores", rows, column_names=PROBE_SCORE_COLUMNS)


def insert_probe_spans(client, db: str, scores: list[pb.ProbeScore]) -> None:
    """The bridge's tensortrace.probe spans of the scores, through its ClickHouse writer."""
    import threading

    from tensortrace.bridge.export import ClickHouseWriter, bridge_resource
    from tensortrace.bridge.probes import probe_span
    w = ClickHouseWriter(client, db, "otel_traces", resource=bridge_resource("tensortrace-bridge"))
    assert w.write([probe_span(s) for s in scores], threading.Event())


def test_png_is_one_valid_picture_and_probe_scores_are_drawn_when_there_are_some(store, capsys, tmp_path):
    client, db, src = store
    req = TimedRequest.make("req-png", layers=3, hidden=8, prompt=5, generated=4)
    insert_timed(client, db, req, otel_database=db)
    insert_probe_scores(client, db, [
        probe_score(req, "refusal", 0.9, token_scores=[0.1 * i + 0.5 for i in range(8)]),
        probe_score(req, "toxicity", 0.2, token_scores=[0.1 * i for i in range(8)])])
    png, page = tmp_path / "t.png", tmp_path / "t.html"
    rc, out, err = run(capsys, req.trace_id, *src, "--png", str(png), "--html", str(page), "--json")
    assert rc == 0, err
    data = png.read_bytes()
    assert data.startswith(PNG_MAGIC)
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width >= 800 and height >= 600        # timeline + heatmap + probes stacked
    try:
        from PIL import Image
    except ImportError:
        pass
    else:
        with Image.open(png) as im:
            im.verify()
    assert "<img id='probes'" in page.read_text()
    d = json.loads(out)
    assert sorted(d["probes"]) == ["refusal", "toxicity"] and d["probes"]["refusal"]["positions"] == list(range(8))
    assert d["probes"]["toxicity"]["scores"][3] == pytest.approx(0.3)
    assert {v["probe"]: v["label"] for v in d["probe_verdicts"]} == {"refusal": "flagged", "toxicity": "pass"}


def test_probe_verdicts_show_in_the_timeline_from_the_probe_spans_and_the_table(store, capsys, tmp_path):
    client, db, src = store
    req = TimedRequest.make("req-probed", layers=2, hidden=8, prompt=5, generated=4)
    insert_timed(client, db, req, otel_database=db)
    scores = [probe_score(req, "injection", 0.91, after_ms=30), probe_score(req, "sentiment", 0.12, after_ms=35),
              probe_score(req, "jailbreak", 0.77, shadow=True, complete=False, after_ms=40)]
    insert_probe_spans(client, db, scores)
    insert_probe_scores(client, db, scores)
    # a re-published score (a restarted probe service): the same identity, read once
    insert_probe_scores(client, db, [scores[0]])
    rc, out, err = run(capsys, req.trace_id, *src)
    assert rc == 0, err
    rows = stage_rows(out)
    assert list(rows)[-1] == "probe" and list(rows) == [s for s in STAGE_ORDER if s in rows]
    end_ms = (req.syn.summary.end_time_unix_nano - int(min(req.expected["request"][0], req.syn.records[0]
                                                          .capture_time_unix_nano))) / 1e6
    assert rows["probe"][0] == pytest.approx(end_ms, abs=0.15) and rows["probe"][1] == pytest.approx(40.0, abs=0.15)
    assert "tensortrace.probe spans" in out
    assert "probe injection: 0.910 (threshold 0.500) FLAGGED; 8 token scores" in out
    assert "probe sentiment: 0.120 (threshold 0.500) PASS" in out
    assert "probe jailbreak: 0.770 (threshold 0.500) SHADOW; over an incomplete request: 2 records dropped" in out
    assert out.count("probe injection:") == 1
    rc, out, err = run(capsys, req.trace_id, *src, "--json")
    d = json.loads(out)
    assert [s["name"] for s in d["stages"]][-1] == "probe" and len(d["probe_verdicts"]) == 3
    assert {s["name"] for s in d["spans"]} >= {"tensortrace.probe", "tensortrace.capture"}
    page = tmp_path / "p.html"
    rc, _, err = run(capsys, req.trace_id, *src, "--html", str(page))
    assert rc == 0 and "<img id='probes'" in page.read_text()


def test_without_a_probe_scores_table_there_is_no_probe_panel(store, capsys, tmp_path):
    client, db, src = store
    client.command(f"DROP TABLE IF EXISTS {db}.probe_scores")
    req = TimedRequest.make("req-noprobes", layers=2, hidden=8, prompt=4, generated=3)
    insert_timed(client, db, req, otel_database=db)
    page = tmp_path / "n.html"
    rc, out, err = run(capsys, req.trace_id, *src, "--html", str(page), "--json")
    assert rc == 0, err
    d = json.loads(out)
    assert d["probes"] is None and d["probe_verdicts"] == [] and "probe" not in [s["name"] for s in d["stages"]]
    assert "id='probes'" not in page.read_text()


def test_a_probe_scores_request_id_finds_its_trace_and_prints_its_link(store, capsys):
    client, db, src = store
    req = TimedRequest.make("req-only-scored", layers=1, hidden=8, prompt=3, generated=3)
    score = probe_score(req, "injection", 0.8)
    insert_probe_scores(client, db, [score])       # nothing else stored: only the probe service's row
    link = "https://grafana.example/explore?traceId={trace_id}&request={request_id}"
    rc, out, err = run(capsys, "--request-id", score.request_id, *src, "--link-template", link)
    assert rc == 0, err
    assert f"trace {req.trace_id}  request req-only-scored" in out
    assert f"link: https://grafana.example/explore?traceId={req.trace_id}&request=req-only-scored" in out
    assert "probe injection: 0.800 (threshold 0.500) FLAGGED" in out
    # and once the bridge and the loader wrote the rest: the same trace, the whole story
    insert_timed(client, db, req, otel_database=db)
    insert_probe_spans(client, db, [score])
    rc, out, err = run(capsys, "--request-id", score.request_id, *src, "--link-template", link, "--json")
    d = json.loads(out)
    assert d["trace_id"] == req.trace_id and d["link"].endswith(f"traceId={req.trace_id}&request=req-only-scored")
    assert [s["name"] for s in d["stages"]][-1] == "probe"


def test_a_64_bit_trace_id_is_a_trace_id(store, capsys):
    """SGLang's own traces (a request without traceparent) have the upper 64 bits zero."""
    client, db, src = store
    req = TimedRequest.make("req-64", layers=1, hidden=8, prompt=3, generated=3)
    tid = bytes(8) + bytes.fromhex("c2d62a4bd60d3cc0")
    req.syn.trace_id = tid
    for r in req.syn.records:
        r.trace_id = tid
    req.syn.summary.trace_id = tid
    for s in req.sglang_spans:
        s.trace_id = tid
    insert_timed(client, db, req, otel_database=db)
    for given in (tid.hex(), "c2d62a4bd60d3cc0"):
        rc, out, err = run(capsys, given, *src)
        assert rc == 0, err
        assert f"trace {tid.hex()}  request req-64" in out and "capture" in stage_rows(out)
    rc, out, err = run(capsys, "--request-id", "req-64", *src, "--json")
    assert rc == 0 and json.loads(out)["trace_id"] == tid.hex()


def test_a_malformed_a_missing_trace_id_and_an_unreachable_clickhouse(store, capsys):
    client, db, src = store
    for bad in ("xyz", "4bf92f3577b34da6a3ce929d0e0e473", "4bf92f3577b34da6a3ce929d0e0e4736aa", "'; DROP TABLE x"):
        rc, out, err = run(capsys, bad, *src)
        assert rc == 2 and "is not a trace id (32 hex characters" in err and out == "", bad
    rc, _, err = run(capsys, "0" * 32, *src)
    assert rc == 2 and "all zeros" in err
    missing = "4bf92f3577b34da6a3ce929d0e0e4736"
    rc, out, err = run(capsys, missing, *src)
    assert rc == 1 and out == ""
    assert f"no request or span with trace id {missing} in {db}.requests/activations and {db}.otel_traces (absent)" in err
    rc, _, err = run(capsys, "--request-id", "nobody", *src)
    assert rc == 1 and "no request or span with request id 'nobody'" in err
    rc, _, err = run(capsys, missing, "--clickhouse", "http://tt:secret@127.0.0.1:1")
    assert rc == 1 and "cannot reach ClickHouse at http://tt:***@127.0.0.1:1" in err and "secret" not in err
    rc, _, err = run(capsys, missing, "--server", "127.0.0.1:50052", *src)
    assert rc == 2 and "not both" in err          # --server: tests/trace/test_trace_server.py


def test_a_request_id_finds_its_trace_and_a_shared_trace_picks_one_request(store, capsys):
    client, db, src = store
    a = TimedRequest.make("req-a", layers=1, hidden=8, prompt=3, generated=3)
    b = TimedRequest.make("9f2c1a0b4d5e6f708192a3b4c5d6e7f8", layers=1, hidden=8, prompt=4, generated=2)  # SGLang-style rid
    for r in b.syn.records:    # b is a second request of a's trace (e.g. n=2 sampling)
        r.trace_id = a.syn.trace_id
    b.syn.summary.trace_id = a.syn.trace_id
    insert_timed(client, db, a, otel_database=db)
    insert_timed(client, db, b)
    rc, out, err = run(capsys, "--request-id", "req-a", *src)
    assert rc == 0, err
    assert f"trace {a.trace_id}  request req-a" in out and "this trace holds 2 requests" in out
    rc, out, err = run(capsys, a.trace_id, "--request-id", b.request_id, *src, "--json")
    d = json.loads(out)
    assert d["request_id"] == b.request_id and d["captured"]["prompt_tokens"] == 4
    # a 32-hex request id given where a trace id goes: no such trace, so it is tried as a request id
    rc, out, err = run(capsys, b.request_id, *src)
    assert rc == 0 and f"trace {a.trace_id}  request {b.request_id}" in out and "is a request id, not a trace id" in out


def test_a_trace_known_only_from_spans_is_shown_from_its_spans(store, capsys):
    client, db, src = store
    req = TimedRequest.make("req-spans-only", layers=1, hidden=8, prompt=3, generated=4)
    insert_timed(client, db, req, otel_database=db, records=[], summary=False)
    rc, out, err = run(capsys, req.trace_id, *src)
    assert rc == 0, err
    assert list(stage_rows(out)) == ["request", "tokenize", "queue", "prefill", "decode", "capture", "export", "kafka"]
    assert "captured: nothing stored" in out and "nothing stored for this trace" in out


def test_slowest_lists_the_longest_requests_first(store, capsys, monkeypatch):
    client, db, src = store
    reqs = {n: TimedRequest.make(f"req-{n}", layers=1, hidden=8, prompt=3, generated=n, step_ms=10.0, slow_step_ms=10.0)
            for n in (3, 9, 6)}
    for r in reqs.values():
        insert_timed(client, db, r, otel_database=db)
    spans_only = TimedRequest.make("req-long", layers=1, hidden=8, prompt=3, generated=20, step_ms=10.0)
    insert_timed(client, db, spans_only, otel_database=db, records=[], summary=False, bridge=False)
    old = TimedRequest.make("req-old", layers=1, hidden=8, prompt=3, generated=30, step_ms=10.0, t0_ns=reqs[3].t0_ns - 3600_000 * MS)
    insert_timed(client, db, old, otel_database=db)
    monkeypatch.setenv("TENSORTRACE_TRACE_LINK", "http://g/{trace_id}")
    rc, out, err = run(capsys, "--slowest", "3", "--since", "10m", *src, "--json")
    assert rc == 0, err
    got = json.loads(out)["requests"]
    assert [r["trace_id"] for r in got] == [spans_only.trace_id, reqs[9].trace_id, reqs[6].trace_id]
    assert got[0]["from"] == ["otel_traces"] and got[0]["request_id"] == "req-long"
    assert got[1]["from"] == ["requests", "otel_traces"] and got[1]["complete"] is True
    assert got[1]["duration_ms"] == pytest.approx((reqs[9].expected["request"][1] - reqs[9].expected["request"][0]) / MS)
    assert got[1]["link"] == f"http://g/{reqs[9].trace_id}"
    rc, out, err = run(capsys, "--slowest", "5", "--since", "2h", *src)
    assert rc == 0 and out.index(old.trace_id) < out.index(spans_only.trace_id) < out.index(reqs[3].trace_id)
    assert "next: tensortrace trace " + old.trace_id in out
    rc, _, err = run(capsys, "--slowest", "3", "--since", "ten minutes", *src)
    assert rc == 2 and "--since" in err


def test_the_cli_has_the_trace_command():
    from tensortrace import cli

    assert cli.resolve("trace") is trace and "trace" in cli.usage()
    r = subprocess.run([sys.executable, "-m", "tensortrace.cli", "trace", "--help"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "--slowest" in r.stdout and "--html" in r.stdout


def _browser() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _screenshot(browser: str, page, shot) -> None:
    r = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        "--window-size=1200,2600", f"--screenshot={shot}", page.as_uri()],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and shot.exists(), r.stderr[-2000:]


def _saturated_colours(path) -> int:
    from PIL import Image

    with Image.open(path) as im:
        px = np.asarray(im.convert("RGB")).reshape(-1, 3).astype(np.int16)
    sat = px[(px.max(axis=1) - px.min(axis=1)) > 40]
    return len({tuple(p) for p in sat.tolist()})


@pytest.mark.skipif(_browser() is None, reason="no chromium / chromium-browser on PATH (Debian: apt-get install chromium)")
def test_a_headless_browser_renders_the_page_with_its_heatmap(store, capsys, tmp_path):
    pytest.importorskip("PIL", reason="Pillow reads the screenshot")
    client, db, src = store
    req = TimedRequest.make("req-browser", layers=12, hidden=16, prompt=20, generated=21)
    insert_timed(client, db, req, otel_database=db)
    page = tmp_path / "page.html"
    rc, _, err = run(capsys, req.trace_id, *src, "--html", str(page))
    assert rc == 0, err
    # the control: the same page with the heatmap image blanked
    blank = base64.b64encode(PNG_MAGIC).decode()
    control = tmp_path / "control.html"
    control.write_text(re.sub(r"(<img id='heatmap'[^>]*src='data:image/png;base64,)[^']+", rf"\g<1>{blank}",
                              page.read_text()))
    shot, shot_control = tmp_path / "shot.png", tmp_path / "control.png"
    _screenshot(_browser(), page, shot)
    _screenshot(_browser(), control, shot_control)
    colours, without = _saturated_colours(shot), _saturated_colours(shot_control)
    assert without > 3                       # the page itself rendered (the timeline's bars)
    assert colours > without + 150, (colours, without)   # the heatmap (12 x 40 cells + its colour bar) is drawn
