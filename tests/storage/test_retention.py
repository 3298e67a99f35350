"""Retention per table, enforced by ClickHouse TTL (storage/retention.py), on the real chDB engine:
the TTL each table carries is the configured one, changing the config changes it (and only what
differs, logged), and rows older than the TTL are gone after OPTIMIZE TABLE ... FINAL."""

import datetime
import logging
import time

import pytest

from tensortrace.loader.config import LoaderConfig
from tensortrace.loader.scores import scores_table
from tensortrace.storage import retention as ret
from tensortrace.storage.otel import apply_otel_schema
from tensortrace.storage.schema import apply_migrations
from tensortrace.testing.clickhouse import insert_rows
from tensortrace.testing.synthetic import SyntheticRequest
from tensortrace.v1 import records_pb2 as pb

pytestmark = pytest.mark.integration

DAY_NS = 86_400 * 10**9


def ttls(client, db) -> dict[str, str]:
    return {t: ret.current_ttl(client, db, t) for t in ret.TTL_COLUMNS}


def test_every_table_carries_the_configured_ttl_and_a_config_change_alters_only_what_differs(ch_client, ch_database,
                                                                                             caplog):
    client, db = ch_client, ch_database
    apply_migrations(client, db, ttl_days=9, recompress_after_hours=0,
                     retention="activations=3d,requests=30d,probe_scores=36h")
    assert ttls(client, db) == {
        "activations": "toDateTime(capture_time) + toIntervalDay(3)",
        "requests": "toDateTime(end_time) + toIntervalDay(30)",
        "activation_traces": "toDateTime(last_capture) + toIntervalDay(3)",   # follows activations
        "probe_scores": "toDateTime(scored_time) + toIntervalHour(36)",
        "forgotten": "toDateTime(forgotten_at) + toIntervalDay(30)",
    }
    # what ClickHouse itself reports (system.tables) is that clause
    create = client.query("SELECT create_table_query FROM system.tables WHERE database = {d:String} AND "
                          "name = 'probe_scores'", parameters={"d": db}).result_rows[0][0]
    assert "TTL toDateTime(scored_time) + toIntervalHour(36) SETTINGS" in create

    # the same config again: nothing is altered
    with caplog.at_level(logging.INFO, logger="tensortrace.storage.retention"):
        apply_migrations(client, db, ttl_days=9, recompress_after_hours=0,
                         retention="activations=3d,requests=30d,probe_scores=36h")
    assert not [r for r in caplog.records if "TTL changed" in r.getMessage()]

    # a change: only the tables whose period changed are altered, each logged with old and new
    with caplog.at_level(logging.INFO, logger="tensortrace.storage.retention"):
        apply_migrations(client, db, ttl_days=9, recompress_after_hours=12,
                         retention="activations=3d,requests=2d,probe_scores=36h,forgotten=60d")
    changed = sorted(r.getMessage().split()[1] for r in caplog.records if "TTL changed" in r.getMessage())
    assert changed == [f"{db}.activations", f"{db}.forgotten", f"{db}.requests"]
    got = ttls(client, db)
    assert got["requests"] == "toDateTime(end_time) + toIntervalDay(2)"
    assert got["activations"] == ("toDateTime(capture_time) + toIntervalHour(12) RECOMPRESS CODEC(ZSTD(1)), "
                                  "toDateTime(capture_time) + toIntervalDay(3)")
    assert got["forgotten"] == "toDateTime(forgotten_at) + toIntervalDay(60)"
    # tables not named fall back to --ttl-days
    apply_migrations(client, db, ttl_days=5, recompress_after_hours=0)
    assert set(ttls(client, db).values()) == {f"toDateTime({c}) + toIntervalDay(5)" for t, c in ret.TTL_COLUMNS.items()
                                              if t != "forgotten"} | {"toDateTime(forgotten_at) + toIntervalDay(30)"}


def wait_mutations(client, db):
    deadline = time.monotonic() + 60
    while client.query("SELECT count() FROM system.mutations WHERE database = {d:String} AND NOT is_done",
                       parameters={"d": db}).result_rows[0][0]:
        assert time.monotonic() < deadline, "TTL recalculation did not finish"
        time.sleep(0.05)


def test_rows_older_than_their_tables_ttl_are_gone_after_optimize_final(ch_client, ch_database):
    """Rows are written under a long retention, then the config shortens it: the rows now older
    than their table's TTL are gone after OPTIMIZE TABLE ... FINAL, the younger ones stay."""
    client, db = ch_client, ch_database
    apply_migrations(client, db, ttl_days=30, recompress_after_hours=0)
    apply_otel_schema(client, db, ttl_days=30)
    now = time.time_ns()
    old = {"activations": now - 3 * DAY_NS, "requests": now - 4 * DAY_NS, "probe_scores": now - 5 * DAY_NS,
           "forgotten": now - 6 * DAY_NS, "otel_traces": now - 3 * DAY_NS}
    young = now - DAY_NS                              # one day: inside every TTL below
    reqs = {}
    for name, t_act, t_req in (("old", old["activations"], old["requests"]), ("young", young, young)):
        r = SyntheticRequest.make(name, layers=2, hidden=8)
        for rec in r.records:
            rec.capture_time_unix_nano = t_act
        r.summary.end_time_unix_nano = t_req
        insert_rows(client, db, r.records, [r.summary])
        reqs[name] = r
    # just inside its TTL: 2 d old minus an hour is kept by a 2 d TTL
    edge = SyntheticRequest.make("edge", layers=1, hidden=8)
    for rec in edge.records:
        rec.capture_time_unix_nano = now - 2 * DAY_NS + 3600 * 10**9
    insert_rows(client, db, edge.records, [])
    client.insert_arrow(f"{db}.probe_scores", scores_table(
        [(pb.ProbeScore(request_id=n, trace_id=reqs[n].trace_id, probe="p", probe_hash="h",
                        scored_time_unix_nano=t), 0, i)
         for i, (n, t) in enumerate((("old", old["probe_scores"]), ("young", young)))], now))
    client.insert(f"{db}.forgotten", [["request_id", n, [], datetime.datetime.fromtimestamp(t / 1e9, datetime.timezone.utc)]
                                      for n, t in (("old", old["forgotten"]), ("young", young))],
                  column_names=["selector", "value", "whole_traces", "forgotten_at"])
    client.insert(f"{db}.otel_traces", [[datetime.datetime.fromtimestamp(t / 1e9, datetime.timezone.utc), tid, "00" * 8, n, "s"]
                                        for n, t, tid in (("old", old["otel_traces"], reqs["old"].trace_id.hex()),
                                                          ("young", young, reqs["young"].trace_id.hex()))],
                  column_names=["Timestamp", "TraceId", "SpanId", "SpanName", "ServiceName"])

    def by_table():
        q = lambda sql: sorted(r[0] for r in client.query(sql).result_rows)   # noqa: E731
        return {"activations": q(f"SELECT DISTINCT request_id FROM {db}.activations"),
                "requests": q(f"SELECT request_id FROM {db}.requests"),
                "activation_traces": q(f"SELECT DISTINCT request_id FROM {db}.activation_traces"),
                "probe_scores": q(f"SELECT request_id FROM {db}.probe_scores"),
                "forgotten": q(f"SELECT value FROM {db}.forgotten"),
                "otel_traces": q(f"SELECT SpanName FROM {db}.otel_traces"),
                "otel_traces_trace_id_ts": q(f"SELECT TraceId FROM {db}.otel_traces_trace_id_ts")}

    everything = {"activations": ["edge", "old", "young"], "requests": ["old", "young"],
                  "activation_traces": ["edge", "old", "young"], "probe_scores": ["old", "young"],
                  "forgotten": ["old", "young"], "otel_traces": ["old", "young"],
                  "otel_traces_trace_id_ts": sorted(r.trace_id.hex() for r in reqs.values())}
    assert by_table() == everything
    tables = (*ret.TTL_COLUMNS, "otel_traces", "otel_traces_trace_id_ts")
    for t in tables:
        client.command(f"OPTIMIZE TABLE {db}.{t} FINAL")
    assert by_table() == everything                   # nothing is older than 30 days
    apply_migrations(client, db, ttl_days=30, recompress_after_hours=0,
                     retention="activations=2d,requests=3d,probe_scores=4d,forgotten=5d")
    apply_otel_schema(client, db, ttl_days=2)
    wait_mutations(client, db)
    for t in tables:
        client.command(f"OPTIMIZE TABLE {db}.{t} FINAL")
    assert by_table() == {"activations": ["edge", "young"], "requests": ["young"], "activation_traces": ["edge", "young"],
                          "probe_scores": ["young"], "forgotten": ["young"], "otel_traces": ["young"],
                          "otel_traces_trace_id_ts": [reqs["young"].trace_id.hex()]}


def test_otel_ttl_is_altered_only_when_it_differs(ch_client, ch_database, caplog):
    client, db = ch_client, ch_database
    apply_otel_schema(client, db, ttl_days=7)
    with caplog.at_level(logging.INFO, logger="tensortrace.storage.retention"):
        apply_otel_schema(client, db, ttl_days=7)
        assert not caplog.records
        apply_otel_schema(client, db, ttl_days=14)
    assert len([r for r in caplog.records if "TTL changed" in r.getMessage()]) == 2
    assert ret.current_ttl(client, db, "otel_traces") == "toDateTime(Timestamp) + toIntervalDay(14)"
    apply_otel_schema(client, db, ttl_days=0)
    assert ret.current_ttl(client, db, "otel_traces") == "" and ret.current_ttl(client, db, "otel_traces_trace_id_ts") == ""


def test_bad_retention_is_refused_with_every_problem_named():
    problems = LoaderConfig(retention="activations=7x,nosuch=1d,requests=0d,requests=1d,probe_scores",
                            forget_sweep_s=-1).problems()
    [line] = [p for p in problems if p.startswith("retention:")]
    for why in ("'7x' is not a period", "'nosuch' is not a table", "must be at least 1h",
                "'probe_scores' is not table=period"):
        assert why in line, (why, line)
    assert "forget_sweep_s: -1 < 0" in problems
    assert ret.parse_retention(" activations = 12h , requests=30d ") == {
        "activations": ret.Period(12, "h"), "requests": ret.Period(30, "d")}
    assert ret.parse_retention("") == {}
    with pytest.raises(ValueError, match="given twice"):
        ret.parse_retention("requests=1d,requests=2d")
