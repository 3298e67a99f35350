"""The services' HTTP endpoint, secured where asked: TLS on the port (reloaded when the files
change), a bearer token for /metrics, /healthz and /readyz open for the kubelet."""

from __future__ import annotations

import ssl
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter

from security_pki import CONTROL_TOKEN, READ_TOKEN
from tensortrace.service.endpoint import HttpEndpoint
from tensortrace.service.security import EndpointSecurity
from tensortrace.testing.waiting import wait_until

pytestmark = pytest.mark.integration


class Svc:
    def __init__(self):
        self.registry = CollectorRegistry()
        Counter("tensortrace_test_things", "things", registry=self.registry).inc(3)

    def live(self):
        return True

    def ready(self):
        return True


def _get(url: str, ca: str, token: str | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=5, context=ssl.create_default_context(cafile=ca)) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_metrics_need_a_read_token_over_tls_and_probes_stay_open(pki):
    sec = EndpointSecurity(tls_cert=pki.path("server.crt"), tls_key=pki.path("server.key"),
                           token_file=pki.path("tokens"))
    ep = HttpEndpoint(Svc(), "127.0.0.1", 0, security=sec).start()
    base, ca = f"https://127.0.0.1:{ep.port}", pki.path("ca.crt")
    try:
        assert _get(base + "/healthz", ca) == (200, "ok\n")
        assert _get(base + "/readyz", ca) == (200, "ready\n")
        code, body = _get(base + "/metrics", ca)
        assert code == 401 and "bearer token" in body and "tensortrace_test_things" not in body
        assert _get(base + "/metrics", ca, CONTROL_TOKEN)[0] == 401
        code, body = _get(base + "/metrics", ca, READ_TOKEN)
        assert code == 200 and "tensortrace_test_things_total 3.0" in body
        with pytest.raises((urllib.error.URLError, ConnectionError)):   # plain HTTP to a TLS port: no answer
            urllib.request.urlopen(f"http://127.0.0.1:{ep.port}/healthz", timeout=5)
        # a renewed certificate is served without a restart
        before = _serial(ep.port, ca)
        pki.server(cn="renewed")
        time.sleep(1.1)
        assert wait_until(lambda: _serial(ep.port, ca) != before, 10, 0.2)
    finally:
        ep.stop()


def _serial(port: int, ca: str) -> int:
    import socket

    from cryptography import x509

    ctx = ssl.create_default_context(cafile=ca)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s, \
            ctx.wrap_socket(s, server_hostname="127.0.0.1") as t:
        return x509.load_der_x509_certificate(t.getpeercert(binary_form=True)).serial_number


def test_the_runtime_flags_secure_the_http_port(pki):
    from tensortrace.query.main import SERVICE

    cfg, rt = SERVICE.parse(["--clickhouse-dsn", "chdb:///tmp/x", "--plaintext", "--http-tls-cert",
                             pki.path("server.crt"), "--http-tls-key", pki.path("server.key"),
                             "--http-token-file", pki.path("tokens")])
    assert (rt.http_security.tls_cert, rt.http_security.token_file) == (pki.path("server.crt"), pki.path("tokens"))
    from tensortrace.service.config import ConfigError

    with pytest.raises(ConfigError, match="http_security.tls_cert/tls_key: give both"):
        SERVICE.parse(["--clickhouse-dsn", "chdb:///tmp/x", "--plaintext", "--http-tls-cert", pki.path("server.crt")])
