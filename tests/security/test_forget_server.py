"""`tensortrace forget --server`: the Forget RPC of the query service over TLS with bearer tokens,
on the real chDB engine the service holds (the loader's situation: nobody else can open the path).
Only a token with the `forget` role erases (read and control do not imply it); each call is one
audit line with who, the ids and the per-table counts; afterwards the read-back through the same
service reports the request as not found, and the other request is untouched."""

from __future__ import annotations

import json
import logging

import pytest

from security_pki import TOKENS
from tensortrace.query import NotFound, TensorTraceClient
from tensortrace.query.errors import QueryError
from tensortrace.query.forget import main as forget
from tensortrace.query.remote import GrpcBackend
from tensortrace.query.server import serve
from tensortrace.query.tracewire import GrpcTraceSource
from tensortrace.service.security import ClientSecurity, EndpointSecurity
from tensortrace.storage import ThreadSafeClient
from tensortrace.testing.traces import TimedRequest, insert_timed

pytestmark = pytest.mark.integration

FORGET_TOKEN = "forget-token-0123456789abcdef"


@pytest.fixture
def service(tt_db, pki):
    """Two requests in every table (spans in the same database), served over TLS with tokens:
    alice read, ops control, dpo forget."""
    client, db = tt_db
    a, b = TimedRequest.make("req-forget-a"), TimedRequest.make("req-forget-b")
    for r in (a, b):
        insert_timed(client, db, r, otel_database=db)
    pki.write("tokens", TOKENS + f"dpo forget {FORGET_TOKEN}\n")
    pki.write("forget.token", FORGET_TOKEN + "\n")
    sec = EndpointSecurity(tls_cert=pki.path("server.crt"), tls_key=pki.path("server.key"),
                           token_file=pki.path("tokens"))
    server, port = serve(ThreadSafeClient(client), database=db, host="127.0.0.1", port=0, otel_database=db,
                         where="chdb:///test", security=sec)
    yield server, f"127.0.0.1:{port}", client, db, a, b
    server.stop(grace=0).wait()


def _rows(client, db, rid: str) -> dict[str, int]:
    out = {t: client.query(f"SELECT count() FROM {db}.{t} WHERE request_id = {{r:String}}",
                           parameters={"r": rid}).result_rows[0][0]
           for t in ("activations", "requests", "activation_traces")}
    out["spans"] = client.query(f"SELECT count() FROM {db}.otel_traces WHERE SpanAttributes['rid'] = {{r:String}} "
                                "OR SpanAttributes['tensortrace.request_id'] = {r:String}",
                                parameters={"r": rid}).result_rows[0][0]
    return out


def _backend(pki, addr, token_file: str) -> GrpcBackend:
    return GrpcBackend(addr, security=ClientSecurity(tls_ca=pki.path("ca.crt"), token_file=pki.path(token_file)))


def _audit(caplog, rpc="Forget") -> list[dict]:
    return [json.loads(r.getMessage()) for r in caplog.records
            if r.name == "tensortrace.audit" and f'"rpc":"{rpc}"' in r.getMessage()]


def test_read_and_control_tokens_cannot_forget_and_nothing_is_deleted(service, pki, caplog, capsys):
    server, addr, client, db, a, b = service
    before = _rows(client, db, a.request_id)
    assert all(n > 0 for n in before.values()), before
    caplog.set_level(logging.INFO, logger="tensortrace.audit")
    for token, identity, has in (("read.token", "alice", "read"), ("control.token", "ops", "control")):
        backend = _backend(pki, addr, token)
        with pytest.raises(QueryError) as e:
            backend.forget(request_id=a.request_id)
        backend.close()
        text = str(e.value)
        assert "PERMISSION_DENIED" in text and f"{identity} may not call Forget: it needs role forget" in text
        assert f"the token has {has}" in text and "with the `forget` role" in text, text
    # the CLI says the same and exits 1; without a token: UNAUTHENTICATED, naming --token-file
    assert forget(["--request-id", a.request_id, "--server", addr, "--tls-ca", pki.path("ca.crt"),
                   "--token-file", pki.path("read.token")]) == 1
    err = capsys.readouterr().err
    assert "PERMISSION_DENIED" in err and "needs a token with the `forget` role" in err, err
    assert forget(["--request-id", a.request_id, "--server", addr, "--tls-ca", pki.path("ca.crt")]) == 1
    err = capsys.readouterr().err
    assert "UNAUTHENTICATED" in err and "--token-file" in err and "`forget` role" in err, err
    assert _rows(client, db, a.request_id) == before
    lines = _audit(caplog)
    assert [(x["identity"], x["result"], x.get("reason")) for x in lines] == [
        ("alice", "PERMISSION_DENIED", "wrong_role"), ("ops", "PERMISSION_DENIED", "wrong_role"),
        ("alice", "PERMISSION_DENIED", "wrong_role"), ("unauthenticated", "UNAUTHENTICATED", "no_token")]
    assert all(x["request_id"] == a.request_id and x["audit"] == "forget" for x in lines)


def test_a_forget_token_forgets_through_the_service_and_the_read_back_reports_not_found(service, pki, caplog,
                                                                                       capsys):
    server, addr, client, db, a, b = service
    before_b = _rows(client, db, b.request_id)
    caplog.set_level(logging.INFO, logger="tensortrace.audit")
    tls = ["--server", addr, "--tls-ca", pki.path("ca.crt"), "--token-file", pki.path("forget.token")]
    # a dry run counts and deletes nothing
    assert forget(["--request-id", a.request_id, "--dry-run", "--json"] + tls) == 0
    dry = json.loads(capsys.readouterr().out)
    assert dry["dry_run"] and dry["deleted_total"] == 0 and dry["rows_before"][f"{db}.activations"] > 0
    assert _rows(client, db, a.request_id)["activations"] == dry["rows_before"][f"{db}.activations"]

    assert forget(["--request-id", a.request_id, "--json"] + tls) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["requests"] == [{"trace_id": a.trace_id, "request_id": a.request_id}]
    assert rep["recorded"] and rep["deleted"] == rep["rows_before"] and rep["deleted_total"] > 0
    assert "through the query service at" in rep["where"]
    assert set(_rows(client, db, a.request_id).values()) == {0}
    assert _rows(client, db, b.request_id) == before_b                      # the other request is untouched

    # the audit line: who, the ids, the per-table counts
    [line] = [x for x in _audit(caplog) if not x["dry_run"]]
    assert line["identity"] == "dpo" and line["auth"] == "token" and line["result"] == "OK"
    assert line["request_id"] == a.request_id and line["deleted"] == rep["deleted"]
    assert line["rows_before"] == rep["rows_before"] and line["whole_traces"] == [a.trace_id]
    ctl = {tuple(sorted(s.labels.items())): s.value for m in server.guard.audit.registry.collect()
           for s in m.samples if s.name == "tensortrace_audit_control_changes_total"}
    assert ctl[(("endpoint", "query"), ("identity", "dpo"), ("result", "OK"), ("rpc", "Forget"))] == 2

    # read back through the same service with a read token: not found, by request id and by trace id
    sec = ClientSecurity(tls_ca=pki.path("ca.crt"), token_file=pki.path("read.token"))
    with TensorTraceClient(f"grpc://{addr}", security=sec) as tt:
        with pytest.raises(NotFound):
            tt.tensors(request_id=a.request_id)
        with pytest.raises(NotFound):
            tt.tensors(trace_id=a.trace_id)
        assert tt.tensors(request_id=b.request_id).completeness.state == "complete"
    backend = _backend(pki, addr, "read.token")
    with pytest.raises(NotFound):
        GrpcTraceSource(backend, addr).read(None, request_id=a.request_id)
    backend.close()

    # forgetting again: nothing left, "already forgotten", exit 0; an id never stored: exit 3
    assert forget(["--request-id", a.request_id] + tls) == 0
    assert "already forgotten at" in capsys.readouterr().out
    assert forget(["--request-id", "never-stored"] + tls) == 3
    assert "no request, score or span with request_id never-stored" in capsys.readouterr().err


def test_forget_server_arguments_are_checked_before_dialling(pki, capsys):
    assert forget(["--trace-id", "xyz", "--server", "127.0.0.1:1"]) == 2
    assert "not 32 hex characters" in capsys.readouterr().err
    assert forget(["--request-id", "r", "--server", "127.0.0.1:1", "--clickhouse", "chdb:///x"]) == 2
    assert "--clickhouse: with --server the query service forgets in the tables it was started with" in \
        capsys.readouterr().err
    assert forget(["--request-id", "r", "--server", "127.0.0.1:1", "--tls-cert", pki.path("ca.crt")]) == 2
    assert "tls_cert/tls_key" in capsys.readouterr().err


def test_a_malformed_id_sent_to_the_service_is_invalid_argument(service, pki):
    server, addr, client, db, a, b = service
    backend = _backend(pki, addr, "forget.token")
    with pytest.raises(QueryError, match="INVALID_ARGUMENT.*forget: trace id 'abc' is not 32 hex characters"):
        backend.forget(trace_id="abc")
    backend.close()
