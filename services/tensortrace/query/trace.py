"""`tensortrace trace <trace-id>`: the end-to-end story of one request, in one command and one picture.

    tensortrace trace 4bf92f3577b34da6a3ce929d0e0e4736 --clickhouse http://user:pw@ch:8123
    tensortrace trace --request-id req-17 --clickhouse chdb:///var/lib/tensortrace/chdb --html req-17.html
    tensortrace trace 4bf92f3577b34da6a3ce929d0e0e4736 --clickhouse http://ch:8123 --png req.png --json
    tensortrace trace --slowest 10 --since 10m --clickhouse http://ch:8123
    tensortrace trace 4bf92f3577b34da6a3ce929d0e0e4736 --server 127.0.0.1:50052 --html req.html
    tensortrace trace 4bf92f3577b34da6a3ce929d0e0e4736 --server query:50052 --tls-ca ca.crt --token-file token

Reads ClickHouse directly (--clickhouse), or asks the gRPC query service (--server HOST:PORT or
grpc://HOST:PORT: the loader's --query-port, where an embedded chDB engine is reachable only
through the loader process; or `tensortrace query-server`), which runs the same reads
(tracedata.TraceSource.read) on its own ClickHouse client and sends what they return
(query/tracewire.py): the same story either way. The reads: the bridge's and the serving engine's spans in `otel_traces` (the OTel
Collector ClickHouse exporter's table, docs/bridge.md), the request's summary and record times in
`requests` / `activations` (docs/storage.md), and for the picture the `resid_pre` rows (per-layer
L2 norms) and `probe_scores` if that table exists. Prints the stages with offsets and durations
from the request's first event, where the time went, and what was captured (docs/trace.md).

Trace ids are 32 hex characters; 64-bit ids (the upper half zero: traces SGLang starts itself when a
request has no traceparent) are ordinary ids here, and may also be given as their 16 low hex digits.

Exit status: 0 shown; 1 not found, or ClickHouse / the query service unreachable or failing; 2 a
bad argument (a trace id that is not 32 (or 16) hex characters, a bad --since, --server with
--clickhouse or with a table flag: with --server the service's own flags name the tables).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
import time
from urllib.parse import urlsplit, urlunsplit

from tensortrace.query.errors import BackendUnavailable, InvalidQuery, NotFound, QueryError
from tensortrace.storage.otel import DEFAULT_OTEL_DATABASE, DEFAULT_TRACES_TABLE
from tensortrace.storage.schema import DEFAULT_DATABASE

LINK_ENV = "TENSORTRACE_TRACE_LINK"
_HEX32 = re.compile(r"^[0-9a-fA-F]{32}$")
_HEX16 = re.compile(r"^[0-9a-fA-F]{16}$")
_SINCE = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|d)?$")
_UNIT_S = {None: 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}
_HOST_PORT = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")
# the tables: with --clickhouse these defaults; with --server the service's own flags choose them
TABLE_FLAGS = {"database": DEFAULT_DATABASE, "otel_database": DEFAULT_OTEL_DATABASE,
               "traces_table": DEFAULT_TRACES_TABLE, "probe_table": "probe_scores"}


def server_address(text: str) -> str:
    """'grpc://host:50052' or 'host:50052' -> 'host:50052' (what `tensortrace show --server` takes)."""
    addr = text.strip().removeprefix("grpc://").rstrip("/")
    m = _HOST_PORT.match(addr)
    if not m or not 0 < int(m.group(2)) < 65536:
        raise ValueError(f"--server {text!r}: expected HOST:PORT or grpc://HOST:PORT (the query service, e.g. "
                         "127.0.0.1:50052)")
    return addr


def parse_since(text: str) -> float:
    """'10m' -> 600.0 seconds ('30s', '2h', '1d', or plain seconds)."""
    m = _SINCE.match(text.strip())
    if not m:
        raise ValueError(f"--since {text!r}: expected a duration like 30s, 10m, 2h, 1d")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


def safe_dsn(dsn: str) -> str:
    """The DSN without its password, for messages."""
    if not dsn.startswith(("http://", "https://")):
        return dsn
    u = urlsplit(dsn)
    if u.password is None:
        return dsn
    netloc = f"{u.username}:***@{u.hostname}" + (f":{u.port}" if u.port else "")
    return urlunsplit((u.scheme, netloc, u.path, u.query, u.fragment))


def make_link(template: str, trace_id: str, request_id: str = "") -> str:
    """The template with {trace_id} and {request_id} replaced (plain replacement: Grafana URLs hold
    other braces)."""
    return template.replace("{trace_id}", trace_id).replace("{request_id}", request_id) if template else ""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tensortrace trace",
                                description="the end-to-end story of one request: timeline, where the time went, "
                                            "what was captured (terminal, --json, --html, --png)")
    p.add_argument("trace_id", nargs="?", help="W3C trace id (32 hex characters; 16 for a 64-bit id)")
    p.add_argument("--request-id", help="find the trace of this request id (or pick one request of a trace)")
    p.add_argument("--clickhouse", help="ClickHouse to read: http(s)://user:pw@host:8123 or chdb:///path "
                                        "(CLICKHOUSE_USER / CLICKHOUSE_PASSWORD for credentials)")
    p.add_argument("--server", help="ask the gRPC query service instead: HOST:PORT or grpc://HOST:PORT (the loader's "
                                    "--query-port, e.g. through kubectl port-forward; tensortrace query-server)")
    p.add_argument("--database", help="the loader's database (requests, activations; default tensortrace)")
    p.add_argument("--otel-database", help="database of the spans table (default otel)")
    p.add_argument("--traces-table", help="the spans table (OTel Collector ClickHouse exporter shape; default otel_traces)")
    p.add_argument("--probe-table", help="probe scores table ([db.]table; skipped if absent; default probe_scores)")
    p.add_argument("--json", action="store_true", help="print the story as JSON")
    p.add_argument("--html", metavar="FILE", help="write one self-contained HTML page (timeline, heatmap, probes)")
    p.add_argument("--png", metavar="FILE", help="write the same picture as one PNG")
    p.add_argument("--link-template", default=os.environ.get(LINK_ENV, ""),
                   help=f"print a link: {{trace_id}} / {{request_id}} replaced (default ${LINK_ENV})")
    p.add_argument("--slowest", type=int, metavar="N", help="list the N slowest recent requests instead")
    p.add_argument("--since", default="10m", help="with --slowest: how far back (30s, 10m, 2h, 1d; default 10m)")
    from tensortrace.service.security import add_client_flags

    add_client_flags(p)   # --server: TLS, mTLS, token (docs/security.md)
    return p


def _err(msg: str, code: int) -> int:
    print(f"tensortrace trace: {msg}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    if a.server and a.clickhouse:
        return _err("give --server HOST:PORT (the query service) or --clickhouse DSN, not both", 2)
    if not a.server and not a.clickhouse:
        return _err("give --clickhouse DSN (http(s)://user:pw@host:8123 or chdb:///path) or --server HOST:PORT "
                    "(the query service)", 2)
    if a.server:
        given = [f"--{k.replace('_', '-')}" for k in TABLE_FLAGS if getattr(a, k) is not None]
        if given:
            return _err(f"{', '.join(given)}: with --server the query service's own flags name the tables "
                        "(tensortrace query-server --otel-database ..., tensortrace loader --query-otel-database ...)", 2)
        try:
            a.server = server_address(a.server)
        except ValueError as e:
            return _err(str(e), 2)
    for k, default in TABLE_FLAGS.items():
        if getattr(a, k) is None:
            setattr(a, k, default)
    if a.slowest is None and not a.trace_id and not a.request_id:
        return _err("give a trace id, --request-id ID, or --slowest N", 2)
    if a.trace_id and _HEX16.match(a.trace_id.strip()):
        # a 64-bit trace id (SGLang's own traces; Jaeger shows such ids without the zero upper half)
        a.trace_id = "0" * 16 + a.trace_id.strip()
    if a.trace_id and not _HEX32.match(a.trace_id.strip()):
        return _err(f"{a.trace_id[:80]!r} is not a trace id (32 hex characters, as in a W3C traceparent, or 16 for "
                    "a 64-bit one); for a request id use --request-id", 2)
    if a.trace_id and not any(bytes.fromhex(a.trace_id.strip())):
        return _err("the trace id is all zeros (invalid in W3C trace context)", 2)
    from tensortrace.query.tracedata import MAX_SLOWEST

    if a.slowest is not None and not 1 <= a.slowest <= MAX_SLOWEST:
        return _err(f"--slowest N needs 1 <= N <= {MAX_SLOWEST}", 2)
    try:
        since_s = parse_since(a.since)
    except ValueError as e:
        return _err(str(e), 2)

    if (a.html or a.png) and importlib.util.find_spec("matplotlib") is None:
        return _err("--html / --png need matplotlib (a dependency of tensortrace: pip install matplotlib)", 1)

    if a.server:
        from tensortrace.query.remote import GrpcBackend
        from tensortrace.query.tracewire import GrpcTraceSource

        from tensortrace.service.security import SecurityError, client_security_from_args

        try:    # the channel `tensortrace show --server` uses
            client = GrpcBackend(a.server, security=client_security_from_args(a))
        except SecurityError as e:
            return _err(str(e), 2)
        src = GrpcTraceSource(client, a.server)
    else:
        from tensortrace.query.tracedata import TraceSource

        where = safe_dsn(a.clickhouse)
        try:
            client = _connect(a.clickhouse)
        except BackendUnavailable as e:
            hint = ("; a chDB path a running loader holds is read through its query service: --server HOST:PORT"
                    if a.clickhouse.startswith("chdb://") else "")
            return _err(f"cannot reach ClickHouse at {where}: {e}{hint}", 1)
        try:
            src = TraceSource(client, a.database, a.otel_database, a.traces_table, a.probe_table, where=where)
        except ValueError as e:   # a database / table name that is not a plain identifier
            client.close()
            return _err(str(e), 2)
    try:
        if a.slowest is not None:
            return _slowest(src, a.slowest, since_s, a)
        return _one(src, a)
    except BackendUnavailable as e:   # the query service's errors name it already
        return _err(str(e) if a.server else f"cannot reach ClickHouse at {where}: {e}", 1)
    except NotFound as e:
        return _err(str(e), 1)
    except InvalidQuery as e:
        return _err(str(e), 2)
    except QueryError as e:
        return _err(str(e) if a.server else f"reading {where}: {e}", 1)
    finally:
        try:
            client.close()
        except Exception:
            pass


def _connect(dsn: str):
    import logging

    from tensortrace.storage.schema import connect

    log = logging.getLogger("clickhouse_connect")
    level = log.level
    log.setLevel(logging.CRITICAL)   # its own "Unexpected Http Driver Exception" line; ours says it better
    try:
        return connect(dsn)
    except Exception as e:   # clickhouse-connect pings the server when the client is made
        errno = re.search(r"\[Errno -?\d+\] [^\"')]+", str(e))
        raise BackendUnavailable(errno.group(0) if errno else f"{type(e).__name__}: {str(e)[:300]}") from e
    finally:
        log.setLevel(level)


def _one(src, a) -> int:
    """One trace's story from `src` (a TraceSource, or a GrpcTraceSource with --server: the same
    TraceRead either way)."""
    from tensortrace.query.timeline import build_story, render_text, story_dict

    trace_id = a.trace_id.strip().lower() if a.trace_id else None
    picture = bool(a.html or a.png)
    t0 = time.monotonic()
    read = src.read(trace_id, a.request_id, norms=picture)
    inp, ref, norms = read.inputs, read.ref, read.norms
    story = build_story(inp)
    link = make_link(a.link_template, story.trace_id, story.request_id)
    if picture:
        from tensortrace.query.picture import panels, render_html, render_png

        if norms is None and ref is not None:
            story.notes.append("no resid_pre rows stored for this request: no heatmap")
        elif norms is not None and norms.truncated_from:
            story.notes.append(f"heatmap: the first {norms.norms.shape[1]:,} of {norms.truncated_from:,} positions "
                               "(the query service's response bound; --clickhouse reads them all)")
        if a.html:
            with open(a.html, "w", encoding="utf-8") as f:
                f.write(render_html(story, norms, link, panels(story, norms)))
        if a.png:
            with open(a.png, "wb") as f:
                f.write(render_png(story, norms))
        written = ", ".join(x for x in (a.html, a.png) if x)
        print(f"tensortrace trace: wrote {written} ({time.monotonic() - t0:.2f} s)", file=sys.stderr)
    if a.json:
        print(json.dumps(story_dict(story, link), indent=1, default=str))
    else:
        print(render_text(story, link))
    return 0


def _slowest(src, n: int, since_s: float, a) -> int:
    from tensortrace.query.timeline import _utc

    since_ns = time.time_ns() - int(since_s * 1e9)
    rows = src.slowest(n, since_ns)
    for r in rows:
        r["link"] = make_link(a.link_template, r["trace_id"], r["request_id"] or "") or None
    if a.json:
        print(json.dumps({"since_unix_nano": since_ns, "requests": rows}, indent=1))
        return 0
    print(f"the {n} slowest requests since {_utc(since_ns)} ({a.since}) in {src.where()}:")
    if not rows:
        print("  (none)")
        return 0
    print(f"  {'#':>3}  {'trace id':<32}  {'request':<20}{'duration':>14}  {'tokens':<11}{'complete':<10}from")
    for i, r in enumerate(rows, 1):
        tok = f"{r['prompt_tokens']}+{r['generated_tokens']}" if r["prompt_tokens"] is not None else "?"
        ok = "?" if r["complete"] is None else ("yes" if r["complete"] else "NO")
        print(f"  {i:>3}  {r['trace_id']:<32}  {(r['request_id'] or '-')[:19]:<20}{r['duration_ms']:>11,.1f} ms  "
              f"{tok:<11}{ok:<10}{', '.join(r['from'])}" + (f"  {r['link']}" if r["link"] else ""))
    via = f"--server {a.server}" if a.server else f"--clickhouse {safe_dsn(a.clickhouse)}"
    print(f"next: tensortrace trace {rows[0]['trace_id']} {via}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
