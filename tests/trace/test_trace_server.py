"""`tensortrace trace --server`: the same story through the gRPC query service (Trace and
SlowestTraces in query.proto) as read from ClickHouse directly.

A real query service on loopback over the session's chDB engine, started as the loader process
starts it (compose.LoaderWithQuery) and as `tensortrace query-server` does; the data written as in
tests/trace/test_trace.py (tensortrace.testing.traces: the loader's rows, SGLang's and the bridge's
spans; the probe service's scores). Each CLI run is in-process, as a user runs it.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import types
from concurrent import futures

import grpc
import numpy as np
import pytest

from test_trace import PNG_MAGIC, insert_probe_scores, insert_probe_spans, probe_score, stage_rows
from tensortrace.query.trace import main as trace
from tensortrace.service.security import EndpointSecurity
from tensortrace.storage import ThreadSafeClient
from tensortrace.testing.traces import TimedRequest, insert_timed
from tensortrace.v1 import query_pb2 as qpb
from tensortrace.v1 import query_pb2_grpc as qgrpc

pytestmark = pytest.mark.integration


@pytest.fixture
def served(tt_db, ch_dsn):
    """(client, db, local args, server args): the query service as `tensortrace loader --query-port 0
    --query-otel-database DB` starts it (compose.py), over this test's database."""
    from tensortrace.compose import LOADER, LoaderWithQuery

    client, db = tt_db
    cfg, _ = LOADER.parse(["--bootstrap-servers", "127.0.0.1:9", "--clickhouse-dsn", ch_dsn, "--database", db,
                           "--query-port", "0", "--query-plaintext", "--query-otel-database", db])
    composed = LoaderWithQuery(cfg)
    composed._serve_query(types.SimpleNamespace(client=ThreadSafeClient(client)))   # what Loader.on_open does
    yield client, db, ["--clickhouse", ch_dsn, "--database", db, "--otel-database", db], \
        ["--server", f"127.0.0.1:{composed.query_port}"]
    composed.query_server.stop(grace=0).wait()


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = trace(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def probed_request(client, db, rid: str) -> TimedRequest:
    req = TimedRequest.make(rid, layers=3, hidden=8, prompt=5, generated=4)
    insert_timed(client, db, req, otel_database=db)
    scores = [probe_score(req, "injection", 0.91, after_ms=30), probe_score(req, "sentiment", 0.12, after_ms=35),
              probe_score(req, "jailbreak", 0.77, shadow=True, complete=False, after_ms=40)]
    insert_probe_spans(client, db, scores)
    insert_probe_scores(client, db, scores)
    return req


def stub(server_args) -> qgrpc.QueryServiceStub:
    return qgrpc.QueryServiceStub(grpc.insecure_channel(server_args[1]))


def test_server_json_and_text_are_identical_to_clickhouse(served, capsys, monkeypatch):
    client, db, local, server = served
    req = probed_request(client, db, "req-same")
    monkeypatch.setenv("TENSORTRACE_TRACE_LINK", "http://grafana/explore?traceId={trace_id}")
    rc, want, err = run(capsys, req.trace_id, *local, "--json")
    assert rc == 0, err
    rc, got, err = run(capsys, req.trace_id, *server, "--json")
    assert rc == 0, err
    assert got == want                       # byte for byte: one code path, a lossless message
    d = json.loads(got)
    assert [s["name"] for s in d["stages"]] == ["request", "tokenize", "queue", "prefill", "decode", "capture",
                                                "export", "kafka", "load", "probe"]
    assert d["completeness"]["state"] == "complete" and len(d["probe_verdicts"]) == 3
    assert d["probes"]["injection"]["positions"] == list(range(8))

    rc, want, _ = run(capsys, req.trace_id, *local)
    rc2, got, err = run(capsys, req.trace_id, "--server", "grpc://" + server[1])    # the grpc:// form too
    assert rc == rc2 == 0, err
    assert got == want
    assert "probe injection: 0.910 (threshold 0.500) FLAGGED; 8 token scores" in got
    assert "probe jailbreak: 0.770 (threshold 0.500) SHADOW; over an incomplete request" in got
    assert list(stage_rows(got))[-1] == "probe"

    # by request id, and a 64-bit trace id given as Jaeger shows it (16 hex digits)
    rc, want, _ = run(capsys, "--request-id", "req-same", *local, "--json")
    rc2, got, _ = run(capsys, "--request-id", "req-same", *server, "--json")
    assert rc == rc2 == 0 and got == want
    short = TimedRequest.make("req-64", layers=1, hidden=8, prompt=3, generated=3)
    tid = bytes(8) + bytes.fromhex("c2d62a4bd60d3cc0")
    for r in short.syn.records:
        r.trace_id = tid
    short.syn.trace_id = short.syn.summary.trace_id = tid
    for s in short.sglang_spans:
        s.trace_id = tid
    insert_timed(client, db, short, otel_database=db)
    rc, got, err = run(capsys, "c2d62a4bd60d3cc0", *server)
    assert rc == 0 and f"trace {tid.hex()}  request req-64" in got, err


def test_server_writes_the_html_and_png_with_the_same_heatmap(served, capsys, tmp_path):
    from tensortrace.query.remote import GrpcBackend
    from tensortrace.query.tracedata import TraceSource
    from tensortrace.query.tracewire import GrpcTraceSource

    client, db, local, server = served
    req = probed_request(client, db, "req-picture")
    page, png = tmp_path / "t.html", tmp_path / "t.png"
    rc, out, err = run(capsys, req.trace_id, *server, "--html", str(page), "--png", str(png))
    assert rc == 0, err
    assert f"wrote {page}, {png}" in err
    text = page.read_text()
    assert all(f"<img id='{p}'" in text for p in ("timeline", "heatmap", "probes")) and "req-picture" in text
    assert png.read_bytes().startswith(PNG_MAGIC)
    # the matrix that travelled (float32 bytes + shape) is the one read locally
    want = TraceSource(client, db, db).read(req.trace_id, norms=True).norms
    backend = GrpcBackend(server[1])
    try:
        got = GrpcTraceSource(backend, server[1]).read(req.trace_id, norms=True).norms
    finally:
        backend.close()
    assert (got.layers, got.start, got.hook, got.truncated_from) == (want.layers, want.start, want.hook, 0)
    assert got.norms.dtype == np.float32 and got.norms.shape == want.norms.shape == (3, 8)
    np.testing.assert_array_equal(got.norms, want.norms)


def test_responses_are_bounded_and_say_so(served, capsys, monkeypatch, tmp_path):
    from tensortrace.query import tracedata, tracewire

    client, db, local, server = served
    req = probed_request(client, db, "req-bounded")
    monkeypatch.setattr(tracedata, "MAX_SPANS", 5)
    rc, want, _ = run(capsys, req.trace_id, *local, "--json")
    rc2, got, err = run(capsys, req.trace_id, *server, "--json")
    assert rc == rc2 == 0 and got == want, err
    d = json.loads(got)
    assert len(d["spans"]) == 5
    assert "more than 5 spans in this trace: the first 5 by start time are shown (the read bound)" in d["notes"]
    m = stub(server).Trace(qpb.TraceRequest(trace_id=bytes.fromhex(req.trace_id)), timeout=30)
    assert m.spans_truncated and len(m.spans) == 5

    monkeypatch.setattr(tracewire, "NORMS_MAX_BYTES", 3 * 4 * 4)     # 3 layers x 4 positions of float32
    page = tmp_path / "b.html"
    rc, _, err = run(capsys, req.trace_id, *server, "--html", str(page))
    assert rc == 0, err
    assert "heatmap: the first 4 of 8 positions (the query service&#x27;s response bound" in page.read_text()


def test_server_slowest_lists_the_same_requests(served, capsys):
    client, db, local, server = served
    reqs = [TimedRequest.make(f"req-{n}", layers=1, hidden=8, prompt=3, generated=n, step_ms=10.0, slow_step_ms=10.0)
            for n in (3, 9, 6)]
    for r in reqs:
        insert_timed(client, db, r, otel_database=db)
    rc, want, _ = run(capsys, "--slowest", "2", "--since", "10m", *local, "--json")
    rc2, got, err = run(capsys, "--slowest", "2", "--since", "10m", *server, "--json")
    assert rc == rc2 == 0, err
    assert json.loads(got)["requests"] == json.loads(want)["requests"]      # since_unix_nano: each run's now
    assert [r["trace_id"] for r in json.loads(got)["requests"]] == [reqs[1].trace_id, reqs[2].trace_id]
    rc, out, err = run(capsys, "--slowest", "3", *server)
    assert rc == 0, err
    assert f"(through the query service at {server[1]})" in out and f"{db}.requests/activations" in out
    assert out.index(reqs[1].trace_id) < out.index(reqs[2].trace_id) < out.index(reqs[0].trace_id)
    assert f"next: tensortrace trace {reqs[1].trace_id} --server {server[1]}" in out
    rc, _, err = run(capsys, "--slowest", "5000", *server)
    assert rc == 2 and "--slowest N needs 1 <= N <= 1000" in err
    with pytest.raises(grpc.RpcError) as e:
        stub(server).SlowestTraces(qpb.SlowestTracesRequest(limit=0), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "limit 0: expected 1 to 1000" in e.value.details()


def test_unknown_and_malformed_trace_ids(served, capsys):
    client, db, local, server = served
    missing = "4bf92f3577b34da6a3ce929d0e0e4736"
    rc, out, err = run(capsys, missing, *server)
    assert rc == 1 and out == ""
    assert f"no request or span with trace id {missing} in {db}.requests/activations and {db}.otel_traces" in err
    assert f"(through the query service at {server[1]})" in err
    rc, _, err = run(capsys, "--request-id", "nobody", *server)
    assert rc == 1 and "no request or span with request id 'nobody'" in err
    for bad in ("xyz", "4bf92f3577b34da6a3ce929d0e0e473", "'; DROP TABLE x"):
        rc, out, err = run(capsys, bad, *server)
        assert rc == 2 and "is not a trace id (32 hex characters" in err and out == "", bad
    # the server checks too (a client of its own, bypassing the CLI's checks)
    s = stub(server)
    for tid, why in ((b"\x01" * 5, "trace id must be 16 bytes, got 5"), (bytes(16), "all zeros"),
                     (b"", "give trace_id or request_id")):
        with pytest.raises(grpc.RpcError) as e:
            s.Trace(qpb.TraceRequest(trace_id=tid), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and why in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        s.Trace(qpb.TraceRequest(trace_id=bytes.fromhex(missing)), timeout=30)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and missing in e.value.details()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_old_or_misconfigured_servers_give_clear_messages(served, capsys, tmp_path):
    client, db, local, server = served
    tid = "4bf92f3577b34da6a3ce929d0e0e4736"
    port = _closed_port()
    t0 = time.monotonic()
    rc, out, err = run(capsys, tid, "--server", f"127.0.0.1:{port}")
    assert rc == 1 and out == "" and f"cannot reach the query service at 127.0.0.1:{port}" in err
    assert time.monotonic() - t0 < 10
    for bad in ("localhost", "grpc://", "host:99999", "http://h:1"):
        rc, _, err = run(capsys, tid, "--server", bad)
        assert rc == 2 and "expected HOST:PORT or grpc://HOST:PORT" in err, bad
    rc, _, err = run(capsys, tid, *server, "--otel-database", "otel")
    assert rc == 2 and "--otel-database: with --server the query service's own flags name the tables" in err
    rc, _, err = run(capsys, tid, *server, *local)
    assert rc == 2 and "not both" in err
    if local[1].startswith("chdb://"):   # this process holds the session's engine: it cannot open another path,
        # as a second process cannot open the path a running loader holds; the message points to --server
        rc, _, err = run(capsys, tid, "--clickhouse", f"chdb://{tmp_path}/held")
        assert rc == 1 and "cannot reach ClickHouse at chdb://" in err and "through its query service: --server" in err

    # a query service from before Trace: UNIMPLEMENTED, said plainly
    old = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    old_port = old.add_insecure_port("127.0.0.1:0")
    old.start()
    try:
        rc, _, err = run(capsys, tid, "--server", f"127.0.0.1:{old_port}")
    finally:
        old.stop(grace=0).wait()
    assert rc == 1 and f"the query service at 127.0.0.1:{old_port} does not serve Trace (an older tensortrace)" in err

    # a service whose ClickHouse is down (a labelled fault injector over the real client)
    from tensortrace.query.server import serve

    class ClickHouseDown:
        def __init__(self, inner):
            self.inner = inner

        def query(self, *a, **kw):
            raise ConnectionError("injected: ClickHouse down")

        def __getattr__(self, name):
            return getattr(self.inner, name)

    down, down_port = serve(ClickHouseDown(client), database=db, port=0, security=EndpointSecurity(plaintext=True))
    try:
        rc, _, err = run(capsys, tid, "--server", f"127.0.0.1:{down_port}")
    finally:
        down.stop(grace=0).wait()
    assert rc == 1 and f"the query service at 127.0.0.1:{down_port} cannot reach ClickHouse" in err
    assert "injected: ClickHouse down" in err


def test_the_standalone_query_server_serves_trace_on_its_tables(tt_db, ch_dsn, capsys):
    from tensortrace.query.main import SERVICE, QueryServer

    client, db = tt_db
    req = TimedRequest.make("req-standalone", layers=2, hidden=8, prompt=4, generated=3)
    insert_timed(client, db, req, otel_database=db)
    cfg, _ = SERVICE.parse(["--clickhouse-dsn", ch_dsn, "--database", db, "--otel-database", db, "--query-port", "0",
                           "--plaintext"])
    qs = QueryServer(cfg)
    runner = threading.Thread(target=qs.run, name="query-server", daemon=True)
    runner.start()
    try:
        deadline = time.monotonic() + 30
        while qs.port < 0 and runner.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert qs.port > 0
        rc, out, err = run(capsys, req.trace_id, "--server", f"127.0.0.1:{qs.port}")
    finally:
        qs.stop()
        runner.join(timeout=10)
    assert not runner.is_alive()
    assert rc == 0, err
    assert f"trace {req.trace_id}  request req-standalone" in out and "kafka" in stage_rows(out)
    from tensortrace.service.config import ConfigError

    with pytest.raises(ConfigError, match=r"traces_table \(--traces-table\): table name 'otel_traces; DROP' is not"):
        SERVICE.parse(["--clickhouse-dsn", ch_dsn, "--traces-table", "otel_traces; DROP"])
