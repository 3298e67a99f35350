"""The query service over TLS with bearer tokens (and mTLS), over the real chDB engine: who may
read, what each read leaves in the audit log and the metrics, and certificate / token rotation
without a restart."""

from __future__ import annotations

import json
import logging
import time

import grpc
import pytest
import torch

from security_pki import READ_TOKEN, TOKENS
from tensortrace.query import TensorTraceClient
from tensortrace.query.errors import QueryError
from tensortrace.query.server import serve
from tensortrace.service.security import ClientSecurity, EndpointSecurity, SecurityError
from tensortrace.storage import ThreadSafeClient
from tensortrace.testing.clickhouse import insert_rows
from tensortrace.testing.synthetic import SyntheticRequest
from tensortrace.testing.waiting import wait_until
from tensortrace.v1 import query_pb2 as qpb
from tensortrace.v1 import query_pb2_grpc as qgrpc

pytestmark = pytest.mark.integration


@pytest.fixture
def secured(tt_db, pki):
    """A query service with TLS and the token file; one stored request."""
    client, db = tt_db
    req = SyntheticRequest.make("req-secure", layers=2, hidden=8, prompt=4, generated=2)
    insert_rows(client, db, req.records, [req.summary])
    sec = EndpointSecurity(tls_cert=pki.path("server.crt"), tls_key=pki.path("server.key"),
                           token_file=pki.path("tokens"))
    server, port = serve(ThreadSafeClient(client), database=db, host="127.0.0.1", port=0, security=sec)
    yield server, f"127.0.0.1:{port}", req
    server.stop(grace=0).wait()


def _client(pki, address, token: str | None = "read.token", **kw) -> TensorTraceClient:
    sec = ClientSecurity(tls_ca=pki.path("ca.crt"), token_file=pki.path(token) if token else "", **kw)
    return TensorTraceClient(f"grpc://{address}", security=sec)


def _samples(registry, name: str) -> dict:
    return {tuple(sorted(s.labels.items())): s.value for m in registry.collect() for s in m.samples
            if s.name == name}


def test_without_a_token_the_call_is_unauthenticated_and_counted(secured, pki):
    server, addr, req = secured
    with _client(pki, addr, token=None) as tt:
        with pytest.raises(QueryError, match="UNAUTHENTICATED.*needs a bearer token"):
            tt.requests(trace_id=req.trace_id.hex())
    with pytest.raises(QueryError, match="UNAUTHENTICATED.*not in the service's token file"):
        sec = ClientSecurity(tls_ca=pki.path("ca.crt"), token_file=pki.write("bogus.token", "x" * 32))
        with TensorTraceClient(f"grpc://{addr}", security=sec) as tt:
            tt.requests(trace_id=req.trace_id.hex())
    fails = _samples(server.guard.audit.registry, "tensortrace_security_auth_failures_total")
    assert fails[(("endpoint", "query"), ("reason", "no_token"))] == 1
    assert fails[(("endpoint", "query"), ("reason", "unknown_token"))] == 1


def test_a_control_token_cannot_read_tensors(secured, pki):
    server, addr, req = secured
    with _client(pki, addr, token="control.token") as tt:
        with pytest.raises(QueryError, match="PERMISSION_DENIED.*ops may not call Lookup: it needs role read"):
            tt.requests(trace_id=req.trace_id.hex())


def test_plaintext_clients_cannot_talk_to_a_tls_service(secured, pki):
    server, addr, req = secured
    with pytest.raises(QueryError, match="UNAVAILABLE"):
        with TensorTraceClient(f"grpc://{addr}", security=ClientSecurity(token_file=pki.path("read.token"))) as tt:
            tt.backend.timeout_s = 5
            tt.requests(trace_id=req.trace_id.hex())


def test_a_read_token_reads_bit_exact_tensors_and_each_read_is_audited(secured, pki, caplog):
    server, addr, req = secured
    caplog.set_level(logging.INFO, logger="tensortrace.audit")
    with _client(pki, addr) as tt:
        got = tt.tensors(trace_id=req.trace_id.hex(), hooks=["resid_pre"])
    for key, want in req.truth.items():
        if key[0] == "resid_pre":
            assert torch.equal(got[key].tensor, want)
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "tensortrace.audit"]
    rpcs = [x["rpc"] for x in lines]
    assert {"Lookup", "Status", "Fetch"} <= set(rpcs)
    fetch = next(x for x in lines if x["rpc"] == "Fetch")
    assert (fetch["audit"], fetch["identity"], fetch["auth"], fetch["result"]) == ("read", "alice", "token", "OK")
    assert fetch["trace_id"] == req.trace_id.hex() and fetch["request_id"] == "req-secure"
    assert fetch["hooks"] == ["resid_pre"] and fetch["time"].endswith("Z") and fetch["peer"]
    assert READ_TOKEN not in caplog.text                          # tokens are never logged
    reads = _samples(server.guard.audit.registry, "tensortrace_audit_reads_total")
    key = (("endpoint", "query"), ("identity", "alice"), ("result", "OK"), ("rpc", "Fetch"))
    assert reads[key] == rpcs.count("Fetch") >= 1
    # a read of something that is not there is audited with its result too
    with _client(pki, addr) as tt:
        assert tt.requests(trace_id="0af7651916cd43dd8448eb211c80319c") == []
        with pytest.raises(grpc.RpcError):   # the raw stub: the server's own check
            tt.backend.stub.Status(qpb.RequestRef(trace_id=b"\x01" * 3, request_id="r"), timeout=10)
    status_lines = [json.loads(r.getMessage()) for r in caplog.records
                    if r.name == "tensortrace.audit" and '"rpc":"Status"' in r.getMessage()]
    assert status_lines[-1]["result"] == "INVALID_ARGUMENT"


def test_show_and_trace_take_the_client_flags(secured, pki, capsys, monkeypatch):
    from tensortrace.query.show import main as show
    from tensortrace.query.trace import main as trace

    server, addr, req = secured
    tid = req.trace_id.hex()
    assert show([tid, "--server", addr, "--tls-ca", pki.path("ca.crt"), "--token-file", pki.path("read.token")]) == 0
    assert "req-secure" in capsys.readouterr().out
    assert show([tid, "--server", addr, "--tls-ca", pki.path("ca.crt")]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    # the environment supplies what the flags do not (a pod with the Secret mounted)
    monkeypatch.setenv("TENSORTRACE_TLS_CA", pki.path("ca.crt"))
    monkeypatch.setenv("TENSORTRACE_TOKEN_FILE", pki.path("read.token"))
    assert trace([tid, "--server", addr, "--json"]) in (0, 1)   # the spans table may not exist: not an auth error
    err = capsys.readouterr().err
    assert "UNAUTHENTICATED" not in err and "PERMISSION_DENIED" not in err and "cannot reach" not in err
    monkeypatch.setenv("TENSORTRACE_TOKEN_FILE", pki.path("control.token"))
    assert trace([tid, "--server", addr]) == 1
    assert "PERMISSION_DENIED" in capsys.readouterr().err


def test_tokens_rotate_without_a_restart(secured, pki):
    server, addr, req = secured
    new = "rotated-token-abcdefghijklmnop"
    pki.write("new.token", new)
    with TensorTraceClient(f"grpc://{addr}", security=ClientSecurity(tls_ca=pki.path("ca.crt"),
                                                                     token_file=pki.path("new.token"))) as tt:
        with pytest.raises(QueryError, match="UNAUTHENTICATED"):
            tt.requests(trace_id=req.trace_id.hex())
        pki.write("tokens", TOKENS.replace(READ_TOKEN, new))       # alice's token replaced
        assert wait_until(lambda: _ok(tt, req), 10, 0.2)
    with _client(pki, addr) as tt:                                   # the old one no longer works
        with pytest.raises(QueryError, match="UNAUTHENTICATED"):
            tt.requests(trace_id=req.trace_id.hex())
    # a broken token file keeps the previous tokens in force, counted
    pki.write("tokens", "alice read short\n")
    time.sleep(1.1)
    with TensorTraceClient(f"grpc://{addr}", security=ClientSecurity(tls_ca=pki.path("ca.crt"),
                                                                     token_file=pki.path("new.token"))) as tt:
        assert _ok(tt, req)
    fails = _samples(server.guard.audit.registry, "tensortrace_security_reload_failures_total")
    assert fails[(("endpoint", "query"), ("file", "token file"))] == 1


def _ok(tt, req) -> bool:
    try:
        return len(tt.requests(trace_id=req.trace_id.hex())) == 1
    except QueryError:
        return False


def _cert_serial(address: str, ca: str, verify: bool = True) -> int:
    """The serial number of the certificate the server presents on a new connection (`verify`
    False: also an expired one)."""
    import socket
    import ssl

    from cryptography import x509

    host, port = address.rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=ca)
    if not verify:
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection((host, int(port)), timeout=5) as s, ctx.wrap_socket(s, server_hostname=host) as t:
        return x509.load_der_x509_certificate(t.getpeercert(binary_form=True)).serial_number


def test_a_rotated_certificate_is_served_to_new_connections_without_a_restart(secured, pki):
    server, addr, req = secured
    before = _cert_serial(addr, pki.path("ca.crt"))
    pki.server(cn="tensortrace-server-rotated")       # cert-manager renewed the Secret
    assert wait_until(lambda: _cert_serial(addr, pki.path("ca.crt")) != before, 10, 0.2)
    with _client(pki, addr) as tt:
        assert len(tt.requests(trace_id=req.trace_id.hex())) == 1
    # a half-written update (a key that is not the certificate's) keeps the current certificate
    current = _cert_serial(addr, pki.path("ca.crt"))
    pki.server(cn="half", prefix="next")
    pki.write("server.crt", open(pki.path("next.crt"), "rb").read())   # the new cert, the old key
    time.sleep(0.2)
    assert _cert_serial(addr, pki.path("ca.crt")) == current
    fails = _samples(server.guard.audit.registry, "tensortrace_security_reload_failures_total")
    assert fails[(("endpoint", "query"), ("file", "tls"))] == 1
    pki.write("server.key", open(pki.path("next.key"), "rb").read())   # the rest of the update arrives
    assert wait_until(lambda: _cert_serial(addr, pki.path("ca.crt")) != current, 10, 0.2)


def test_an_expired_certificate_is_refused_by_clients_and_its_renewal_served_without_a_restart(secured, pki):
    """The Secret's certificate expired (cert-manager was down): clients refuse the handshake, and
    nothing else is weakened; the renewal lands in the mounted files and new connections get it."""
    server, addr, req = secured
    before = _cert_serial(addr, pki.path("ca.crt"))
    pki.server(cn="tensortrace-server-expired", expired=True)
    assert wait_until(lambda: _cert_serial(addr, pki.path("ca.crt"), verify=False) != before, 10, 0.2)   # served: it is the file's
    with _client(pki, addr) as tt, pytest.raises(QueryError):
        tt.requests(trace_id=req.trace_id.hex())                      # the client's TLS refuses it
    pki.server(cn="tensortrace-server-renewed")
    with _client(pki, addr) as tt:
        assert wait_until(lambda: _reads(tt, req), 10, 0.2)


def _reads(tt, req) -> bool:
    try:
        return len(tt.requests(trace_id=req.trace_id.hex())) == 1
    except QueryError:
        return False


@pytest.fixture
def mtls(tt_db, pki):
    client, db = tt_db
    req = SyntheticRequest.make("req-mtls", layers=1, hidden=4, prompt=2, generated=1)
    insert_rows(client, db, req.records, [req.summary])
    sec = EndpointSecurity(tls_cert=pki.path("server.crt"), tls_key=pki.path("server.key"),
                           tls_client_ca=pki.path("ca.crt"))
    server, port = serve(ThreadSafeClient(client), database=db, host="127.0.0.1", port=0, security=sec)
    yield server, f"127.0.0.1:{port}", req
    server.stop(grace=0).wait()


def test_mtls_accepts_a_client_of_its_ca_and_audits_its_subject(mtls, pki, caplog):
    server, addr, req = mtls
    caplog.set_level(logging.INFO, logger="tensortrace.audit")
    cert, key = pki.client("analyst-1")
    with TensorTraceClient(f"grpc://{addr}", security=ClientSecurity(tls_ca=pki.path("ca.crt"), tls_cert=cert,
                                                                     tls_key=key)) as tt:
        assert len(tt.requests(request_id="req-mtls")) == 1
    line = json.loads([r for r in caplog.records if r.name == "tensortrace.audit"][-1].getMessage())
    assert line["auth"] == "mtls" and "CN=analyst-1" in line["subject"] and line["request_id"] == "req-mtls"
    reads = _samples(server.guard.audit.registry, "tensortrace_audit_reads_total")
    assert reads[(("endpoint", "query"), ("identity", "mtls"), ("result", "OK"), ("rpc", "Lookup"))] == 1


def test_mtls_refuses_a_client_certificate_from_another_ca_and_no_certificate(mtls, pki):
    server, addr, req = mtls
    cert, key = pki.client("intruder", issuer=pki.other_ca)
    for sec in (ClientSecurity(tls_ca=pki.path("ca.crt"), tls_cert=cert, tls_key=key),
                ClientSecurity(tls_ca=pki.path("ca.crt"))):
        with TensorTraceClient(f"grpc://{addr}", security=sec) as tt:
            tt.backend.timeout_s = 5
            with pytest.raises(QueryError, match="UNAVAILABLE"):   # the handshake fails: no call is made
                tt.requests(request_id="req-mtls")


def test_plaintext_needs_the_opt_in_and_loopback(tt_db):
    client, db = tt_db
    with pytest.raises(SecurityError, match="no TLS: give tls_cert and tls_key, or opt into plaintext"):
        serve(ThreadSafeClient(client), database=db, host="127.0.0.1", port=0, security=EndpointSecurity())
    with pytest.raises(SecurityError, match="refusing plaintext on 0.0.0.0, which is not a loopback address"):
        serve(ThreadSafeClient(client), database=db, host="0.0.0.0", port=0, security=EndpointSecurity(plaintext=True))
    server, port = serve(ThreadSafeClient(client), database=db, host="0.0.0.0", port=0,
                         security=EndpointSecurity(plaintext=True, plaintext_any_address=True))   # forced
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            assert qgrpc.QueryServiceStub(ch).Lookup(qpb.LookupRequest(request_id="none"), timeout=10).requests == []
    finally:
        server.stop(grace=0).wait()


def test_the_sdk_refuses_plaintext_to_a_remote_address_unless_insecure():
    sec = ClientSecurity()
    assert not sec.uses_tls("127.0.0.1:50052") and not sec.uses_tls("localhost:50052")
    assert sec.uses_tls("query.tensortrace:50052") and sec.uses_tls("10.0.0.5:50052")
    assert not ClientSecurity(insecure=True).uses_tls("10.0.0.5:50052")
    assert ClientSecurity(tls=True).uses_tls("127.0.0.1:50052")
    assert ClientSecurity(tls_ca="/x").with_env({"TENSORTRACE_TLS_CA": "/y", "TENSORTRACE_TOKEN_FILE": "/t"}) == \
        ClientSecurity(tls_ca="/x", token_file="/t")
    assert ClientSecurity(insecure=True, tls_ca="/x").problems() == [
        "insecure: set together with TLS options (--tls-ca/--tls-cert/--tls): choose one", "tls_ca: /x: no such file"]
