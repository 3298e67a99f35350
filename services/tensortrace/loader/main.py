"""`tensortrace loader`: load the activations topic into ClickHouse.

    tensortrace loader --bootstrap 127.0.0.1:9092 --clickhouse chdb:///var/lib/tensortrace/chdb \\
        --query-port 50071

With an embedded chDB path, this process owns the engine (chDB locks its directory; another
process cannot open it), so `--query-port` serves the gRPC query service from the same engine:
`tensortrace show --server 127.0.0.1:50071 <trace-id>` then reads through it.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading

from tensortrace.loader.config import ConfigError, LoaderConfig


def parse_args(argv: list[str]) -> LoaderConfig:
    d = LoaderConfig()
    p = argparse.ArgumentParser(prog="tensortrace loader", description=__doc__.split("\n")[0])
    p.add_argument("--bootstrap", "--bootstrap-servers", dest="bootstrap", default=d.bootstrap, help="Kafka bootstrap servers (default %(default)s)")
    p.add_argument("--topic", default=d.topic)
    p.add_argument("--group", "--group-id", dest="group_id", default=d.group_id, help="consumer group (default %(default)s)")
    p.add_argument("--dlq-topic", "--dead-letter-topic", dest="dlq_topic", default=d.dlq_topic)
    p.add_argument("--auto-offset-reset", default=d.auto_offset_reset, choices=["earliest", "latest"])
    p.add_argument("--clickhouse", "--clickhouse-dsn", dest="clickhouse_dsn", default=d.clickhouse_dsn,
                   help="chdb:///path | chdb://memory | http(s)://user:password@host:port (default %(default)s)")
    p.add_argument("--database", default=d.database)
    p.add_argument("--ttl-days", type=int, default=d.ttl_days)
    p.add_argument("--payload-codec", default=d.payload_codec,
                   help="ClickHouse codec of the payload column (default %(default)s: the part codec, LZ4, "
                        "recompressed after --recompress-after-hours)")
    p.add_argument("--recompress-after-hours", type=int, default=d.recompress_after_hours,
                   help="merges recompress payloads older than this with --recompress-codec; 0: never (default %(default)s)")
    p.add_argument("--recompress-codec", default=d.recompress_codec, help="(default %(default)s)")
    p.add_argument("--batch-max-rows", type=int, default=d.batch_max_rows)
    p.add_argument("--batch-max-bytes", type=int, default=d.batch_max_bytes)
    p.add_argument("--batch-max-delay", dest="batch_max_delay_s", type=float, default=d.batch_max_delay_s,
                   help="seconds (default %(default)s)")
    p.add_argument("--chunk-timeout", dest="chunk_timeout_s", type=float, default=d.chunk_timeout_s)
    p.add_argument("--session-timeout-ms", type=int, default=d.session_timeout_ms)
    p.add_argument("--query-host", default=d.query_host)
    p.add_argument("--query-port", type=int, default=None, help="also serve the gRPC query service here")
    p.add_argument("--metrics-port", type=int, default=None, help="Prometheus metrics on this port")
    p.add_argument("--stats-interval", type=float, default=0.0, help="print stats JSON to stderr every N s (0: off)")
    p.add_argument("-v", "--verbose", action="store_true")
    a = vars(p.parse_args(argv))
    extra = {k: a.pop(k) for k in ("stats_interval", "verbose", "metrics_port")}
    cfg = LoaderConfig(**a)
    cfg._stats_interval = extra["stats_interval"]  # type: ignore[attr-defined]
    cfg._verbose = extra["verbose"]  # type: ignore[attr-defined]
    cfg._metrics_port = extra["metrics_port"]  # type: ignore[attr-defined]
    return cfg


def start_loader(cfg: LoaderConfig, stopping: threading.Event):
    """A Loader, once ClickHouse answers and the schema is migrated: a loader started while
    ClickHouse is down waits (backing off) instead of crash-looping. None if stopped meanwhile."""
    from tensortrace.loader.service import Loader

    log = logging.getLogger("tensortrace.loader")
    delay = cfg.retry_initial_s
    while not stopping.is_set():
        try:
            return Loader(cfg)
        except Exception as e:  # connection refused, auth, DNS: report and retry
            if "EmbeddedServer" in str(e) or "Cannot lock file" in str(e):
                raise  # another process holds this chdb path: retrying will not help
            print(json.dumps({"clickhouse_unavailable": f"{type(e).__name__}: {str(e)[:300]}", "retry_in_s": delay}),
                  file=sys.stderr, flush=True)
            log.warning("ClickHouse not reachable (%s); retrying in %.1fs", e, delay)
            stopping.wait(delay)
            delay = min(delay * 2, cfg.retry_max_s)
    return None


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO if cfg._verbose else logging.WARNING,  # type: ignore[attr-defined]
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg.validate()
    except ConfigError as e:
        print(f"tensortrace loader: {e}", file=sys.stderr)
        return 2
    from tensortrace.loader.service import Loader

    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    loader = start_loader(cfg, stopping)
    if loader is None:
        return 0
    server = None
    if cfg.query_port is not None:
        from tensortrace.query.server import serve

        server, port = serve(loader.client, database=cfg.database, host=cfg.query_host, port=cfg.query_port)
        print(json.dumps({"query_service": f"{cfg.query_host}:{port}"}), file=sys.stderr, flush=True)

    def on_signal(signum, frame):
        loader.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if stopping.is_set():
        loader.stop()
    if cfg._metrics_port is not None:  # type: ignore[attr-defined]
        from tensortrace.loader.metrics import serve_metrics

        serve_metrics(loader, cfg._metrics_port)  # type: ignore[attr-defined]
    stop_stats = threading.Event()
    if cfg._stats_interval > 0:  # type: ignore[attr-defined]
        def report():
            while not stop_stats.wait(cfg._stats_interval):  # type: ignore[attr-defined]
                print(json.dumps(loader.stats.snapshot()), file=sys.stderr, flush=True)
        threading.Thread(target=report, daemon=True).start()
    try:
        loader.run()
    finally:
        stop_stats.set()
        if server is not None:
            server.stop(grace=1).wait()
        print(json.dumps({"final_stats": loader.stats.snapshot()}), file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
