"""`tensortrace forget` against the real chDB engine: a request's tensors, summary, probe scores and
spans go from every table, the read-back (SDK, `tensortrace trace`'s reader) then reports it as not
found, other requests stay untouched, a dry run deletes nothing, bad ids get a clear error; and the
loader's sweep deletes a forgotten request again when Kafka (a real broker) delivers it again."""

import json
import logging
import time

import pytest
import torch

from tensortrace.loader.config import KafkaConfig, LoaderConfig
from tensortrace.loader.scores import scores_table
from tensortrace.loader.service import Loader
from tensortrace.query import NotFound, TensorTraceClient
from tensortrace.query.tracedata import TraceSource
from tensortrace.storage import ThreadSafeClient
from tensortrace.storage.forget import EXIT_NOT_FOUND, EXIT_OK, EXIT_USAGE, Forgetter, ForgetInputError, Target, main
from tensortrace.testing.clickhouse import insert_rows
from tensortrace.testing.kafka import create_topics
from tensortrace.testing.synthetic import SyntheticRequest, produce
from tensortrace.testing.traces import TimedRequest, insert_timed
from tensortrace.testing.waiting import wait_until
from tensortrace.v1 import records_pb2 as pb

pytestmark = pytest.mark.integration

TABLES = ("activations", "requests", "activation_traces", "probe_scores")


def score(req: TimedRequest, probe: str) -> pb.ProbeScore:
    return pb.ProbeScore(model_id="synthetic/tiny", request_id=req.request_id, trace_id=req.syn.trace_id,
                         span_id=req.syn.summary.span_id, probe=probe, probe_hash="h1", score=0.5, threshold=0.7,
                         complete=True, hook="resid_pre", layers=[1], pooling="mean", tokens_scored=3,
                         token_scores=[0.1, 0.5, 0.9], token_positions=[0, 1, 2],
                         scored_time_unix_nano=time.time_ns(), release="complete")


def same_trace(req: TimedRequest, trace_id: bytes) -> TimedRequest:
    """Put a request (made with sglang=False) under another request's trace id."""
    req.syn.trace_id = trace_id
    for r in req.syn.records:
        r.trace_id = trace_id
    req.syn.summary.trace_id = trace_id
    return req


@pytest.fixture
def stored(tt_db):
    """Three requests in every table (spans in the same database): a alone in its trace; b and c
    sharing one trace (c has no engine spans, only the bridge's)."""
    client, db = tt_db
    a = TimedRequest.make("req-a")
    b = TimedRequest.make("req-b")
    c = same_trace(TimedRequest.make("req-c", sglang=False), b.syn.trace_id)
    for r in (a, b, c):
        insert_timed(client, db, r, otel_database=db)
    client.insert_arrow(f"{db}.probe_scores",
                        scores_table([(score(r, p), 0, i) for i, r in enumerate((a, b, c)) for p in ("pii", "inj")],
                                     time.time_ns()))
    return client, db, {"a": a, "b": b, "c": c}


def counts(client, db, req) -> dict[str, int]:
    """Rows of one request in every table (spans: those of its trace naming it, and all of its trace)."""
    out = {t: client.query(f"SELECT count() FROM {db}.{t} WHERE request_id = {{r:String}}",
                           parameters={"r": req.request_id}).result_rows[0][0] for t in TABLES}
    q = lambda sql: client.query(sql, parameters={"t": req.trace_id, "r": req.request_id}).result_rows[0][0]  # noqa: E731
    out["spans_naming_it"] = q(f"SELECT count() FROM {db}.otel_traces WHERE TraceId = {{t:String}} AND "
                               "(SpanAttributes['rid'] = {r:String} OR SpanAttributes['tensortrace.request_id'] = {r:String})")
    out["spans_of_trace"] = q(f"SELECT count() FROM {db}.otel_traces WHERE TraceId = {{t:String}}")
    out["trace_index"] = q(f"SELECT count() FROM {db}.otel_traces_trace_id_ts WHERE TraceId = {{t:String}}")
    return out


def assert_not_found(client, db, req, trace_gone=True):
    with pytest.raises(NotFound):
        TensorTraceClient(client, database=db).tensors(request_id=req.request_id)
    src = TraceSource(client, database=db, otel_database=db)
    with pytest.raises(NotFound):
        src.read(None, request_id=req.request_id)
    if trace_gone:
        with pytest.raises(NotFound):
            TensorTraceClient(client, database=db).tensors(trace_id=req.trace_id)
        with pytest.raises(NotFound):
            TraceSource(client, database=db, otel_database=db).read(req.trace_id)


def assert_intact(client, db, req, before):
    assert counts(client, db, req) == before
    got = TensorTraceClient(client, database=db).tensors(request_id=req.request_id)
    assert got.completeness.state == "complete"
    for key, want in req.syn.truth.items():
        assert torch.equal(got[key].tensor, want), key


def test_forget_by_request_id_removes_it_everywhere_and_reads_back_as_not_found(stored, caplog):
    client, db, r = stored
    before = {k: counts(client, db, v) for k, v in r.items()}
    assert all(n > 0 for n in before["a"].values()), before["a"]     # a is in every table to begin with
    with caplog.at_level(logging.WARNING, logger="tensortrace.forget"):
        rep = Forgetter(client, db, db).forget(Target.parse(request_id="req-a"))
    assert rep.requests == [(r["a"].trace_id, "req-a")]
    assert rep.whole_traces == [r["a"].trace_id]                     # no other request in its trace
    assert rep.deleted == {f"{db}.activations": before["a"]["activations"], f"{db}.requests": 1,
                           f"{db}.activation_traces": 1, f"{db}.probe_scores": 2,
                           f"{db}.otel_traces": before["a"]["spans_of_trace"],
                           f"{db}.otel_traces_trace_id_ts": before["a"]["trace_index"]}
    assert set(counts(client, db, r["a"]).values()) == {0}
    assert_not_found(client, db, r["a"])
    for k in "bc":
        assert_intact(client, db, r[k], before[k])
    # the audit line: one JSON line with the ids and the counts
    [line] = [json.loads(m.getMessage()) for m in caplog.records if m.name == "tensortrace.forget"]
    assert line["event"] == "forget" and line["id"] == "req-a" and line["deleted_total"] == sum(rep.deleted.values())
    assert line["requests"] == [{"trace_id": r["a"].trace_id, "request_id": "req-a"}]


def test_forget_one_request_of_a_shared_trace_keeps_the_other_requests_spans(stored):
    client, db, r = stored
    before = {k: counts(client, db, v) for k, v in r.items()}
    rep = Forgetter(client, db, db).forget(Target.parse(request_id="req-c"))
    assert rep.whole_traces == []                                    # b is in the same trace
    after_c = counts(client, db, r["c"])
    assert {k: after_c[k] for k in (*TABLES, "spans_naming_it")} == dict.fromkeys((*TABLES, "spans_naming_it"), 0)
    assert after_c["spans_of_trace"] == before["b"]["spans_of_trace"] - before["c"]["spans_naming_it"]
    with pytest.raises(NotFound):
        TensorTraceClient(client, database=db).tensors(request_id="req-c")
    with pytest.raises(NotFound):
        TraceSource(client, database=db, otel_database=db).read(r["c"].trace_id, request_id="req-c")
    b_now = counts(client, db, r["b"])
    assert {k: b_now[k] for k in (*TABLES, "spans_naming_it", "trace_index")} == \
        {k: before["b"][k] for k in (*TABLES, "spans_naming_it", "trace_index")}
    assert_intact(client, db, r["a"], before["a"])


def test_forget_by_trace_id_removes_every_request_of_the_trace(stored):
    client, db, r = stored
    before_a = counts(client, db, r["a"])
    rep = Forgetter(client, db, db).forget(Target.parse(trace_id=r["b"].trace_id.upper()))
    assert sorted(rid for _, rid in rep.requests) == ["req-b", "req-c"]
    for k in "bc":
        assert set(counts(client, db, r[k]).values()) == {0}, k
        assert_not_found(client, db, r[k])
    assert_intact(client, db, r["a"], before_a)


def test_dry_run_deletes_nothing_and_forgetting_twice_is_idempotent(stored, capsys, ch_dsn):
    client, db, r = stored
    before = {k: counts(client, db, v) for k, v in r.items()}
    args = ["--request-id", "req-a", "--clickhouse", ch_dsn, "--database", db, "--otel-database", db]
    assert main(args + ["--dry-run", "--json"]) == EXIT_OK
    dry = json.loads(capsys.readouterr().out)
    assert dry["dry_run"] and dry["deleted"] == {} and dry["rows_before"][f"{db}.activations"] == before["a"]["activations"]
    assert {k: counts(client, db, v) for k, v in r.items()} == before
    assert client.query(f"SELECT count() FROM {db}.forgotten").result_rows[0][0] == 0
    assert main(args + ["--json"]) == EXIT_OK
    first = json.loads(capsys.readouterr().out)
    assert first["deleted_total"] == sum(before["a"].values()) - before["a"]["spans_naming_it"] and not first["previously_forgotten"]
    assert main(args) == EXIT_OK                                     # again: nothing left, says when it was forgotten
    out = capsys.readouterr().out
    assert "already forgotten at" in out and "deleted 0 rows" in out
    assert_not_found(client, db, r["a"])


def test_unknown_and_malformed_ids_get_a_clear_message_and_exit_code(tt_db, capsys, ch_dsn):
    client, db = tt_db
    base = ["--clickhouse", ch_dsn, "--database", db, "--otel-database", db]
    assert main(["--request-id", "never-stored"] + base) == EXIT_NOT_FOUND
    assert "no request, score or span with request_id never-stored" in capsys.readouterr().err
    assert main(["--trace-id", "ab" * 16] + base) == EXIT_NOT_FOUND
    # recorded all the same: a request still in flight (in Kafka) is deleted by the sweep when it lands
    assert client.query(f"SELECT count() FROM {db}.forgotten").result_rows[0][0] == 2
    for bad, why in ((["--trace-id", "not-hex"], "is not 32 hex characters"),
                     (["--trace-id", "0" * 32], "all zeros"),
                     (["--request-id", "a\nb"], "control characters"),
                     (["--request-id", "x" * 300], "at most 256"),
                     (["--database", "x; DROP TABLE y", "--request-id", "r"], "not a plain identifier")):
        assert main(bad + base[:2]) == EXIT_USAGE, bad
        assert why in capsys.readouterr().err
    assert main(["--request-id", "r", "--trace-id", "ab" * 16] + base) == EXIT_USAGE   # exactly one id
    with pytest.raises(ForgetInputError, match="exactly one"):
        Target.parse()
    assert client.query(f"SELECT count() FROM {db}.forgotten").result_rows[0][0] == 2   # bad ids: nothing done


def test_sweep_deletes_a_forgotten_request_that_was_inserted_again(stored):
    client, db, r = stored
    f = Forgetter(client, db, db)
    f.forget(Target.parse(request_id="req-a"))
    # what a Kafka re-read does: the loader inserts the request's rows again (a later load time)
    insert_rows(client, db, r["a"].syn.records, [r["a"].syn.summary])
    insert_timed(client, db, r["a"], otel_database=db, records=[], summary=False)     # the spans again
    assert counts(client, db, r["a"])["activations"] == len(r["a"].syn.records)
    [rep] = f.sweep()
    assert rep.deleted[f"{db}.activations"] == len(r["a"].syn.records) and rep.deleted[f"{db}.requests"] == 1
    assert rep.deleted[f"{db}.otel_traces"] > 0
    assert set(counts(client, db, r["a"]).values()) == {0}
    assert_not_found(client, db, r["a"])
    assert f.sweep() == []                                           # nothing came back since


def test_loader_sweep_deletes_a_forgotten_request_that_kafka_delivers_again(kafka_broker, tt_db):
    client, db = tt_db
    bs = kafka_broker.bootstrap
    topic = create_topics(bs, 1, prefix="tt-forget", dlq=True)
    a, b = SyntheticRequest.make("fa", layers=2, hidden=8), SyntheticRequest.make("fb", layers=2, hidden=8)
    cfg = LoaderConfig(kafka=KafkaConfig(bootstrap_servers=bs), topic=topic, dlq_topic=topic + ".dlq",
                       group_id=f"g-{topic}", clickhouse_dsn="chdb://memory", database=db, batch_max_delay_s=0.1,
                       scores_consumer=False, forget_sweep_s=0.3)
    loader = Loader(cfg, client=ThreadSafeClient(client))
    import threading
    t = threading.Thread(target=loader.run, daemon=True)
    t.start()
    try:
        n = len(a.records)
        produce(bs, topic, a.messages() + b.messages())
        rows = lambda rid: client.query(f"SELECT count() FROM {db}.activations WHERE request_id = {{r:String}}",  # noqa: E731
                                        parameters={"r": rid}).result_rows[0][0]
        assert wait_until(lambda: rows("fa") == n and rows("fb") == len(b.records))
        Forgetter(client, db).forget(Target.parse(request_id="fa"))
        assert rows("fa") == 0
        inserted = loader.stats.tensor_rows
        produce(bs, topic, a.messages())                             # the same request delivered again
        assert wait_until(lambda: loader.stats.tensor_rows >= inserted + n)   # the loader inserted it again ...
        assert wait_until(lambda: rows("fa") == 0 and loader.stats.forget_swept_rows >= n)   # ... the sweep deleted it
        with pytest.raises(NotFound):
            TensorTraceClient(client, database=db).tensors(request_id="fa")
        assert rows("fb") == len(b.records)
        from prometheus_client import generate_latest

        from tensortrace.loader.metrics import LoaderMetrics
        text = generate_latest(LoaderMetrics(loader).registry).decode()
        assert f"tensortrace_loader_forget_swept_rows_total {float(loader.stats.forget_swept_rows)}" in text
    finally:
        loader.stop()
        t.join(timeout=60)
    assert not t.is_alive()


def test_a_chdb_path_held_by_another_process_is_reported_with_exit_1(tt_db, ch_dsn):
    """This test process holds the session's chDB path (as a running loader holds its own): a
    `tensortrace forget` process cannot open it and says why."""
    import subprocess
    import sys

    if not ch_dsn.startswith("chdb://"):
        pytest.skip("needs the embedded engine")
    client, db = tt_db
    r = subprocess.run([sys.executable, "-m", "tensortrace.cli", "forget", "--request-id", "r", "--clickhouse", ch_dsn,
                        "--database", db], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert "cannot open ClickHouse" in r.stderr and "held by a running process" in r.stderr, r.stderr[-2000:]
