"""A refused call tells the user what to do: `tensortrace trace --server` and `show --server`
without a token (UNAUTHENTICATED) or with a token of another role (PERMISSION_DENIED) name the
role the RPC needs and the --token-file option (query/tracewire.py, query/remote.py), against a
real query service over TLS with tokens."""

from __future__ import annotations

import pytest

from tensortrace.query.remote import GrpcBackend
from tensortrace.query.server import serve
from tensortrace.query.tracewire import AccessRefused, GrpcTraceSource
from tensortrace.service.security import ClientSecurity, EndpointSecurity
from tensortrace.storage import ThreadSafeClient

pytestmark = pytest.mark.integration

TID = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.fixture
def addr(tt_db, pki):
    client, db = tt_db
    sec = EndpointSecurity(tls_cert=pki.path("server.crt"), tls_key=pki.path("server.key"),
                           token_file=pki.path("tokens"))
    server, port = serve(ThreadSafeClient(client), database=db, host="127.0.0.1", port=0, security=sec)
    yield f"127.0.0.1:{port}"
    server.stop(grace=0).wait()


def _source(pki, addr, token: str = ""):
    backend = GrpcBackend(addr, security=ClientSecurity(tls_ca=pki.path("ca.crt"),
                                                        token_file=pki.path(token) if token else ""))
    return GrpcTraceSource(backend, addr)


def test_the_trace_client_says_which_token_and_role_is_needed(addr, pki):
    with pytest.raises(AccessRefused) as e:
        _source(pki, addr).read(TID)
    text = str(e.value)
    assert text.startswith(f"the query service at {addr} refused Trace: not authenticated (UNAUTHENTICATED: ")
    assert "Trace needs a bearer token with the `read` role" in text and "--token-file FILE" in text
    assert "TENSORTRACE_TOKEN_FILE" in text

    with pytest.raises(AccessRefused) as e:
        _source(pki, addr, "control.token").slowest(5, 0)
    text = str(e.value)
    assert text.startswith(f"the query service at {addr} refused SlowestTraces: permission denied "
                           "(PERMISSION_DENIED: query: ops may not call SlowestTraces: it needs role read, the token "
                           "has control)")
    assert "SlowestTraces needs a token with the `read` role; the token given is known but lacks it" in text


def test_trace_and_show_print_it_and_exit_1(addr, pki, capsys, monkeypatch):
    from tensortrace.query.show import main as show
    from tensortrace.query.trace import main as trace

    monkeypatch.delenv("TENSORTRACE_TOKEN_FILE", raising=False)
    assert trace([TID, "--server", addr, "--tls-ca", pki.path("ca.crt")]) == 1
    err = capsys.readouterr().err
    assert "refused Trace: not authenticated" in err and "needs a bearer token with the `read` role" in err, err
    assert trace([TID, "--server", addr, "--tls-ca", pki.path("ca.crt"), "--token-file", pki.path("ingest.token")]) == 1
    err = capsys.readouterr().err
    assert "refused Trace: permission denied" in err and "engine may not call Trace" in err, err
    assert "needs a token with the `read` role" in err
    assert show([TID, "--server", addr, "--tls-ca", pki.path("ca.crt"), "--token-file", pki.path("control.token")]) == 1
    err = capsys.readouterr().err
    assert "PERMISSION_DENIED" in err and "Lookup needs a token with the `read` role" in err, err
