"""The HTTP endpoint every service serves on one port: `/healthz` (liveness), `/readyz`
(readiness) and `/metrics` (Prometheus text of the service's own CollectorRegistry).

    endpoint = HttpEndpoint(service, "0.0.0.0", 9464).start()   # service: see service.runtime.Service
    endpoint.port          # the bound port (0 asks for an ephemeral one)
    endpoint.stop()

Secured where asked (`--http-tls-cert/--http-tls-key [--http-tls-client-ca]`, `--http-token-file`:
the security block of service/security.py, docs/security.md): TLS on the whole port, the
certificate re-read when its files change (checked at most once a second, on a new connection);
a token file makes `/metrics` need a bearer token with the `read` role (Prometheus:
`authorization: {credentials_file: ...}`), while `/healthz` and `/readyz` stay open for the
kubelet (they say "ok" or why not, nothing captured). Without any of it the port is plain HTTP
on whatever address is asked: it carries counters and probe answers, no user data.

Liveness and readiness are the service's `live()` and `ready()`. A failing probe answers 503 with
a reason when the service has one (`not_ready_reason()` / `not_live_reason()`), so
`curl host:port/readyz` says why. Each request runs on its own thread: a readiness check that
probes the network (the exporter connects to a broker) never blocks a scrape.
"""

from __future__ import annotations

import dataclasses
import logging
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

log = logging.getLogger("tensortrace.service")


def _reason(service, method: str, default: str) -> str:
    fn = getattr(service, method, None)
    try:
        return (fn() if fn is not None else "") or default
    except Exception as e:  # a reason is a courtesy; never let it turn a 503 into a 500
        return f"{default} ({type(e).__name__}: {e})"


def http_security_problems(security) -> list[str]:
    """The HTTP endpoint's block: the same files and checks as a gRPC endpoint's, but plain HTTP
    needs no opt-in (no user data on this port)."""
    if security is None or not (security.tls or security.token_file or security.tls_client_ca):
        return []
    return dataclasses.replace(security, plaintext=not security.tls, plaintext_any_address=True).problems(None, "HTTP endpoint")


class _ReloadingSSLContext:
    """An SSLContext for the server's certificate files, rebuilt when they change (stat at most
    once a second); a change that does not load keeps the current context, logged once."""

    def __init__(self, security):
        from tensortrace.service.security import _stat_key

        self.security, self._stat_key = security, _stat_key
        self.paths = [p for p in (security.tls_cert, security.tls_key, security.tls_client_ca) if p]
        self.key = self._stat()
        self.context = self._build()
        self._checked, self._failed = time.monotonic(), None

    def _stat(self):
        return tuple(self._stat_key(p) for p in self.paths)

    def _build(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.security.tls_cert, self.security.tls_key)
        if self.security.tls_client_ca:
            ctx.load_verify_locations(self.security.tls_client_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def current(self) -> ssl.SSLContext:
        now = time.monotonic()
        if now - self._checked >= 1.0:
            self._checked = now
            try:
                key = self._stat()
                if key not in (self.key, self._failed):
                    self.context, self.key = self._build(), key
                    log.info("http endpoint: TLS certificate %s reloaded", self.security.tls_cert)
            except (OSError, ssl.SSLError, ValueError) as e:
                if self._failed != ("x", str(e)):
                    self._failed = ("x", str(e))
                    log.error("http endpoint: TLS files changed but cannot be used (%s); keeping the current "
                              "certificate", e)
        return self.context


class _TLSHTTPServer(ThreadingHTTPServer):
    tls: _ReloadingSSLContext

    def get_request(self):
        sock, addr = super().get_request()
        # the handshake runs on the request's thread (first read), never on the accept loop
        return self.tls.current().wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr

    def handle_error(self, request, client_address):   # a failed handshake: no traceback on stderr
        log.debug("http endpoint: connection from %s failed", client_address, exc_info=True)


def http_server(host: str, port: int, handler, security=None) -> ThreadingHTTPServer:
    """A threading HTTP server on host:port (daemon threads), HTTPS when `security` has TLS: the
    handshake on the request's thread, the context rebuilt when the certificate files change.
    Shared by the runtime's endpoint and the bridge's OTLP/HTTP receiver. OSError if it cannot bind."""
    if security is not None and security.tls:
        server = _TLSHTTPServer((host, port), handler, bind_and_activate=False)
        server.tls = _ReloadingSSLContext(security)
        try:
            server.server_bind()
            server.server_activate()
        except OSError:
            server.server_close()
            raise
    else:
        server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


class HttpEndpoint:
    """GET /healthz, /readyz, /metrics for one service (anything with live(), ready(), registry)."""

    def __init__(self, service, host: str, port: int, security=None):
        endpoint = self
        self.tokens = None
        if security is not None and security.token_file:
            from tensortrace.service.security import ReloadingFile, parse_tokens

            self.tokens = ReloadingFile(security.token_file, lambda b: parse_tokens(b.decode("utf-8", "replace"),
                                                                                    security.token_file), "token file")

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server API)
                path = self.path.split("?", 1)[0]
                svc = endpoint.service
                try:
                    if path == "/metrics" and not endpoint._may_scrape(self.headers.get("Authorization", "")):
                        self._reply(401, b"/metrics needs a bearer token with the read role (--http-token-file)\n")
                    elif path == "/metrics":
                        self._reply(200, generate_latest(svc.registry), CONTENT_TYPE_LATEST)
                    elif path == "/healthz":
                        ok = bool(svc.live())
                        self._reply(200 if ok else 503, b"ok\n" if ok else
                                    (_reason(svc, "not_live_reason", "not live") + "\n").encode())
                    elif path == "/readyz":
                        ok = bool(svc.ready())
                        self._reply(200 if ok else 503, b"ready\n" if ok else
                                    (_reason(svc, "not_ready_reason", "not ready") + "\n").encode())
                    else:
                        self._reply(404, b"not found: try /metrics, /healthz, /readyz\n")
                except Exception as e:  # a broken check answers 500 and keeps the server up
                    log.exception("http endpoint: %s failed", path)
                    self._reply(500, f"{path}: {type(e).__name__}: {e}\n".encode())

            def _reply(self, code, body, ctype="text/plain; charset=utf-8"):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # quiet: probes and scrapes are not news
                pass

        self.service = service
        self._server = http_server(host, port, Handler, security)
        self.host = host
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="http-endpoint", daemon=True)

    def _may_scrape(self, header: str) -> bool:
        if self.tokens is None:
            return True
        scheme, _, token = header.partition(" ")
        entry = self.tokens.get().match(token.strip()) if scheme.lower() == "bearer" and token.strip() else None
        return entry is not None and "read" in entry.roles

    def start(self) -> "HttpEndpoint":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
