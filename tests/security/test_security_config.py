"""The security block's configuration: token file format and its errors, certificate checks at
start, the plaintext rule, and the flags every service and client shares."""

from __future__ import annotations

import pytest

from security_pki import CONTROL_TOKEN, READ_TOKEN, TOKENS
from tensortrace.service.security import EndpointSecurity, SecurityError, is_loopback, parse_tokens

pytestmark = pytest.mark.unit


def test_the_token_file_maps_tokens_to_identities_and_roles():
    t = parse_tokens(TOKENS + "alice read,control second-token-for-alice-0000\n", "tokens")
    assert t.identities == ["alice", "engine", "ops"]
    assert (t.match(READ_TOKEN).identity, sorted(t.match(READ_TOKEN).roles)) == ("alice", ["read"])
    assert sorted(t.match("second-token-for-alice-0000").roles) == ["control", "read"]   # rotation: two lines
    assert t.match(CONTROL_TOKEN).identity == "ops"
    assert t.match(READ_TOKEN[:-1]) is None and t.match("") is None and t.match(READ_TOKEN + "x") is None


@pytest.mark.parametrize("text, message", [
    ("alice read\n", "tokens: line 1: expected `<identity> <role>[,<role>] <token>` (3 fields), got 2"),
    ("alice write abcdefghijklmnopqrstu\n", "tokens: line 1 (alice): role(s) 'write' not one of read, control, ingest, forget"),
    ("alice read short\n", "tokens: line 1 (alice): the token must be at least 16 printable characters"),
    ("-alice read abcdefghijklmnopqrstu\n", "tokens: line 1: identity '-alice' must be 1-64 of"),
    ("a read abcdefghijklmnopqrstu\n# c\n\nb control abcdefghijklmnopqrstu\n", "tokens: line 4 (b): the same token as line 1"),
    ("# only comments\n\n", "tokens: no tokens (every call would be refused)"),
])
def test_a_malformed_token_file_names_the_line_and_never_the_token(text, message):
    with pytest.raises(SecurityError) as e:
        parse_tokens(text, "tokens")
    assert message in str(e.value)
    for word in text.split():
        if len(word) >= 16:
            assert word not in str(e.value)


def test_a_malformed_token_file_stops_the_service_at_start_with_the_reason(tmp_path, capsys):
    from tensortrace.query.main import SERVICE

    bad = tmp_path / "tokens"
    bad.write_text("alice read abcdefghijklmnopqrstuvwx\nbob reader abcdefghijklmnopqrstuvwxyz\n")
    assert SERVICE.main(["--clickhouse-dsn", "chdb:///tmp/none", "--plaintext", "--token-file", str(bad)]) == 2
    err = capsys.readouterr().err
    assert (f"tensortrace query-server: config: security.token_file (--security-token-file): {bad}: line 2 (bob): "
            "role(s) 'reader' not one of read, control, ingest, forget") in err
    assert "abcdefghijklmnopqrstuvwxyz" not in err
    assert SERVICE.main(["--clickhouse-dsn", "chdb:///tmp/none", "--plaintext",
                         "--token-file", str(tmp_path / "missing")]) == 2
    assert "missing: No such file or directory" in capsys.readouterr().err


def test_certificate_problems_are_named_at_start(pki):
    pki.server(cn="other", prefix="other")
    mismatched = EndpointSecurity(tls_cert=pki.path("server.crt"), tls_key=pki.path("other.key"))
    assert mismatched.problems() == [f"tls_key: tls_key {pki.path('other.key')} is not the key of tls_cert "
                                     f"{pki.path('server.crt')}"]
    not_pem = EndpointSecurity(tls_cert=pki.write("junk.crt", "hello"), tls_key=pki.path("server.key"))
    assert "not a PEM certificate" in not_pem.problems()[0]
    assert EndpointSecurity(tls_cert=pki.path("server.crt")).problems() == [
        "tls_cert/tls_key: give both (the certificate and its key) or neither"]
    assert EndpointSecurity(plaintext=True, tls_client_ca=pki.path("ca.crt")).problems() == [
        "tls_client_ca: mTLS needs TLS: set tls_cert and tls_key too"]
    ok = EndpointSecurity(tls_cert=pki.path("server.crt"), tls_key=pki.path("server.key"),
                          tls_client_ca=pki.path("ca.crt"), token_file=pki.path("tokens"))
    assert ok.problems("0.0.0.0") == [] and ok.describe() == "mTLS, bearer tokens"


def test_plaintext_is_an_opt_in_and_loopback_only_unless_forced():
    assert [p.split(":")[0] for p in EndpointSecurity().problems("127.0.0.1")] == ["tls_cert"]
    assert EndpointSecurity(plaintext=True).problems("127.0.0.1") == []
    assert EndpointSecurity(plaintext=True).problems("::1") == []
    assert EndpointSecurity(plaintext=True).problems("10.1.2.3")[0].startswith(
        "plaintext: refusing plaintext on 10.1.2.3, which is not a loopback address")
    assert EndpointSecurity(plaintext=True, plaintext_any_address=True).problems("0.0.0.0") == []
    assert [is_loopback(h) for h in ("127.0.0.1", "127.3.4.5", "::1", "[::1]", "localhost", "0.0.0.0", "::",
                                     "10.0.0.1", "query.svc")] == [True] * 5 + [False] * 4


def test_every_service_and_client_takes_the_same_flags():
    from tensortrace.bridge.main import SERVICE as BRIDGE
    from tensortrace.compose import LOADER
    from tensortrace.exporter.main import SERVICE as EXPORTER
    from tensortrace.query.main import SERVICE as QUERY

    for spec, prefix in ((QUERY, "--"), (EXPORTER, "--control-"), (LOADER, "--query-"),
                         (LOADER, "--bridge-otlp-receiver-"), (BRIDGE, "--otlp-receiver-")):
        flags = set(spec.parser()[0]._option_string_actions)
        for name in ("tls-cert", "tls-key", "tls-client-ca", "token-file", "plaintext", "plaintext-any-address"):
            assert prefix + name in flags, (spec.name, prefix + name)
    import argparse

    from tensortrace.service.security import add_client_flags, client_security_from_args

    p = argparse.ArgumentParser()
    add_client_flags(p)
    sec = client_security_from_args(p.parse_args(["--tls-ca", "ca", "--tls-cert", "c", "--tls-key", "k",
                                                  "--tls-server-name", "query.svc", "--token-file", "t"]))
    assert (sec.tls_ca, sec.tls_cert, sec.tls_key, sec.tls_server_name, sec.token_file) == (
        "ca", "c", "k", "query.svc", "t")


def test_the_loader_names_its_query_and_bridge_receiver_blocks(capsys):
    from tensortrace.compose import LOADER

    assert LOADER.main(["--clickhouse-dsn", "chdb:///tmp/none", "--query-port", "0", "--query-host", "0.0.0.0",
                        "--query-plaintext", "--bridge"]) == 2
    err = capsys.readouterr().err
    assert ("query_security.plaintext (--query-security-plaintext): refusing plaintext on 0.0.0.0, which is not a "
            "loopback address") in err
    assert ("bridge_otlp_receiver_security.tls_cert (--bridge-otlp-receiver-security-tls-cert): the OTLP "
            "receiver has no TLS") in err
