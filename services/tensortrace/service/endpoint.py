"""The HTTP endpoint every service serves on one port: `/healthz` (liveness), `/readyz`
(readiness) and `/metrics` (Prometheus text of the service's own CollectorRegistry).

    endpoint = HttpEndpoint(service, "0.0.0.0", 9464).start()   # service: see service.runtime.Service
    endpoint.port          # the bound port (0 asks for an ephemeral one)
    endpoint.stop()

Liveness and readiness are the service's `live()` and `ready()`. A failing probe answers 503 with
a reason when the service has one (`not_ready_reason()` / `not_live_reason()`), so
`curl host:port/readyz` says why. Each request runs on its own thread: a readiness check that
probes the network (the exporter connects to a broker) never blocks a scrape.
"""

from __future__ import annotations

import logging
import threading
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


class HttpEndpoint:
    """GET /healthz, /readyz, /metrics for one service (anything with live(), ready(), registry)."""

    def __init__(self, service, host: str, port: int):
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server API)
                path = self.path.split("?", 1)[0]
                svc = endpoint.service
                try:
                    if path == "/metrics":
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
        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.host = host
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="http-endpoint", daemon=True)

    def start(self) -> "HttpEndpoint":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
