"""`tensortrace show <trace-id>`: what was captured for a request.

    tensortrace show 4bf92f3577b34da6a3ce929d0e0e4736 --server 127.0.0.1:50052
    tensortrace show --request-id req-17 --clickhouse http://user:pw@ch:8123 --hooks resid_pre
    tensortrace show 4bf9... --server query.tensortrace:50052 --tls-ca ca.crt --token-file token

With --server: TLS to a non-loopback address (--tls-ca, --tls-cert/--tls-key for mTLS,
--tls-server-name), plaintext to loopback (kubectl port-forward) unless --tls, --insecure to force
plaintext; --token-file (or TENSORTRACE_TOKEN_FILE) sends a bearer token (docs/security.md).

Prints, per hook: layers, tokens covered, records, bytes (raw / stored), capture->export->load
latencies; then the request's completeness. `--tensors` also reads every payload back (as the SDK
does) to prove it decodes, with a progress bar on stderr (only on a tty, or with --progress).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from tensortrace.query.errors import QueryError
from tensortrace.query.text import byte_size, int_ranges
from tensortrace.service.security import SecurityError, add_client_flags, client_security_from_args


class ProgressBar:
    """A one-line progress bar on a stream (stderr); silent unless enabled."""

    def __init__(self, stream, enabled: bool, width: int = 30):
        self.stream, self.enabled, self.width = stream, enabled, width
        self.started = time.monotonic()
        self.shown = False

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled or not total:
            return
        frac = min(1.0, done / total)
        fill = int(frac * self.width)
        rate = done / max(1e-6, time.monotonic() - self.started)
        self.stream.write(f"\rreading [{'#' * fill}{'.' * (self.width - fill)}] {done}/{total} records "
                          f"({rate:,.0f}/s)")
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tensortrace show", description="print what was captured for a request")
    p.add_argument("trace_id", nargs="?", help="W3C trace id (32 hex characters)")
    p.add_argument("--request-id", help="select by request id (or disambiguate a trace with several requests)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--server", help="query service host:port (e.g. a loader's --query-port)")
    src.add_argument("--clickhouse", help="read ClickHouse directly: http(s)://... or chdb:///path")
    p.add_argument("--database", default="tensortrace")
    p.add_argument("--hooks", help="comma-separated hook names (with --tensors)")
    p.add_argument("--layers", help="comma-separated layers or a-b ranges (with --tensors)")
    p.add_argument("--tensors", action="store_true", help="read and decode every tensor too")
    p.add_argument("--progress", action="store_true", help="progress bar even when stderr is not a tty")
    p.add_argument("--wait", type=float, default=0.0, help="seconds to wait for the request to appear")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_client_flags(p)
    a = p.parse_args(argv)
    if not a.trace_id and not a.request_id:
        p.error("give a trace id or --request-id")
    if not a.server and not a.clickhouse:
        p.error("give --server host:port or --clickhouse DSN")

    from tensortrace.query.client import TensorTraceClient

    layers = None
    if a.layers:
        layers = []
        for part in a.layers.split(","):
            lo, _, hi = part.partition("-") if not part.startswith("-") else (part, "", "")
            try:
                layers.extend(range(int(lo), int(hi) + 1) if hi else [int(lo)])
            except ValueError:
                print(f"tensortrace show: --layers: {part!r} is not an integer or a-b range", file=sys.stderr)
                return 2
    hooks = a.hooks.split(",") if a.hooks else None
    try:
        with TensorTraceClient(f"grpc://{a.server}" if a.server else a.clickhouse, database=a.database,
                               security=client_security_from_args(a)) as tt:
            if a.wait:
                tt.status(a.trace_id, a.request_id, wait_s=a.wait)
            ref, comp, stats = tt.describe(a.trace_id, a.request_id)
            decoded = None
            if a.tensors:
                bar = ProgressBar(sys.stderr, enabled=a.progress or sys.stderr.isatty())
                t0 = time.monotonic()
                try:
                    req = tt.tensors(request_id=ref.request_id, trace_id=ref.trace_id, hooks=hooks, layers=layers,
                                     progress=bar)
                finally:
                    bar.close()
                decoded = (req, time.monotonic() - t0)
    except (QueryError, SecurityError) as e:
        print(f"tensortrace show: {e}", file=sys.stderr)
        return 1

    if a.json:
        out = {"trace_id": ref.trace_id.hex(), "request_id": ref.request_id, "model": ref.model,
               "completeness": comp.__dict__, "hooks": [s.__dict__ for s in stats]}
        if decoded:
            out["tensors"] = {f"{h}[{l}]": {"shape": list(c.tensor.shape), "dtype": str(c.tensor.dtype),
                                            "positions": [c.start, c.end], "gaps": c.gaps}
                              for (h, l), c in decoded[0].tensors.items()}
        print(json.dumps(out, indent=1, default=str))
        return 0

    print(f"request {ref.request_id}  trace {ref.trace_id.hex()}  model {ref.model or '?'}")
    by_hook: dict[str, list] = {}
    for s in stats:
        by_hook.setdefault(s.hook, []).append(s)
    print(f"{'hook':<18}{'layers':<14}{'tokens':<12}{'records':>8}{'raw':>12}{'encoded':>12}"
          f"{'cap->exp p50':>14}{'exp->load p50':>15}{'cap->load max':>15}")
    for hook, rows in by_hook.items():
        raw = sum(r.raw_bytes for r in rows)
        stored = sum(r.stored_bytes for r in rows)
        t0, t1 = min(r.token_start for r in rows), max(r.token_end for r in rows)
        print(f"{hook:<18}{int_ranges([r.layer for r in rows]):<14}{f'{t0}-{t1 - 1}':<12}"
              f"{sum(r.records for r in rows):>8}{byte_size(raw):>12}{byte_size(stored):>12}"
              f"{max(r.capture_to_export_ms_p50 for r in rows):>11.1f} ms{max(r.export_to_load_ms_p50 for r in rows):>12.1f} ms"
              f"{max(r.capture_to_load_ms_max for r in rows):>12.1f} ms")
    line = f"completeness: {comp.state}  captured {comp.records_captured}  loaded {comp.records_loaded}  dropped {comp.records_dropped}"
    if comp.dropped_by_reason:
        line += " (" + ", ".join(f"{k}: {v}" for k, v in sorted(comp.dropped_by_reason.items())) + ")"
    if comp.incomplete_reason:
        line += f"  reason: {comp.incomplete_reason}"
    print(line)
    if comp.summaries:
        print(f"tokens: prompt {comp.prompt_tokens}, generated {comp.generated_tokens}, finish {comp.finish_reason or '?'}")
    if decoded:
        req, secs = decoded
        gaps = {k: c.gaps for k, c in req.tensors.items() if c.gaps}
        print(f"decoded {len(req.tensors)} tensors in {secs * 1000:.0f} ms; "
              + (f"gaps in {len(gaps)}: {list(gaps.items())[:3]}" if gaps else "no gaps"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
