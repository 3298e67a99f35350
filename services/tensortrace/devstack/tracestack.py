"""The trace side of a serving engine, on 127.0.0.1, as one process to drive over stdin/stdout:
a local Kafka broker, `tensortrace exporter` draining a ring directory, and `tensortrace bridge`
with its OTLP receiver (the engine's spans) writing otel_traces into its own chDB path.

    python -m tensortrace.devstack.tracestack --workdir /tmp/ts
    -> {"ready": true, "otlp": "127.0.0.1:PORT", "ring_dir": "/tmp/ts/rings", ...}      (one JSON line)
    <- collect <trace-id hex> <min engine spans> <min requests> [timeout_s]
    -> {"rows": [{"SpanName": ..., "TraceId": ..., ...}, ...], "metrics": {...}}      (then it exits)

The serving engine runs elsewhere (the SGLang venv: tests/sglang/test_sglang_trace.py) with
`--enable-trace --otlp-traces-endpoint <otlp>` and TENSORTRACE_RING_DIR=<ring_dir>. `collect` waits
until the bridge's metrics show at least that many engine spans and captured requests written to
ClickHouse and nothing new arrived for 2 s, stops the bridge (SIGTERM: it drains; the chDB engine
has one owner process), reads the trace's otel_traces rows and prints them. Project venv only (Kafka,
chDB, the exporter and the bridge); stdlib and tensortrace on the engine's side.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from tensortrace.devstack.processes import ExporterProcess, ServiceProcess

TOPIC = "tensortrace.activations.tracestack"
SPANS_TOPIC = "tensortrace.spans.tracestack"


def _emit(doc: dict) -> None:
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


def _log(text: str) -> None:
    print(f"tracestack: {text}", file=sys.stderr, flush=True)


class BridgeProcess(ServiceProcess):
    """`tensortrace bridge` as a subprocess: ready once its OTLP receiver is up too."""

    def __init__(self, args: list[str], workdir: str):
        super().__init__("bridge", args, workdir)

    def wait_ready(self, timeout_s: float = 90.0) -> dict[str, int]:
        deadline = time.monotonic() + timeout_s
        ports = super().wait_ready(timeout_s)
        while "otlp" not in ports and time.monotonic() < deadline:   # the receiver reports its port last
            time.sleep(0.2)
            ports = super().wait_ready(max(0.1, deadline - time.monotonic()))
        if "otlp" not in ports:
            raise TimeoutError(f"bridge has no OTLP receiver port after {timeout_s:.0f}s\n{self.log_tail()}")
        return ports

    def metrics(self, prefix: str = "tensortrace_bridge_") -> dict[str, float]:
        return super().metrics(prefix)


def _total(metrics: dict, prefix: str) -> float:
    return sum(v for k, v in metrics.items() if k.startswith(prefix))


def create_topics(bootstrap: str, wanted: dict[str, int], timeout_s: float = 60.0) -> None:
    """Create the topics and return once every partition has a leader (a consumer that joins
    before that may be assigned nothing until its next metadata refresh)."""
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30000)
    try:
        admin.create_topics([NewTopic(t, n, 1) for t, n in wanted.items()])
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                described = {d.get("name", d.get("topic")): d for d in admin.describe_topics(list(wanted))}
                if all(len((described.get(t) or {}).get("partitions") or []) == n
                       and all(p.get("leader_id", -1) >= 0 for p in described[t]["partitions"])
                       for t, n in wanted.items()):
                    return
            except Exception:   # metadata not there yet
                pass
            time.sleep(0.05)
        raise TimeoutError(f"topics {sorted(wanted)}: partitions without a leader after {timeout_s:.0f}s")
    finally:
        admin.close()


def read_trace(ch_path: str, trace_id: str) -> list[dict]:
    import clickhouse_connect

    client = clickhouse_connect.get_client(dsn=f"chdb://{ch_path}")
    cols = ["SpanName", "TraceId", "SpanId", "ParentSpanId", "SpanKind", "ServiceName", "ScopeName", "StatusCode",
            "SpanAttributes", "ResourceAttributes", "Duration", "Timestamp", "Events.Name", "Links.SpanId"]
    rows = client.query(f"SELECT {', '.join(cols[:-3])}, toUnixTimestamp64Nano(Timestamp), Events.Name, Links.SpanId "
                        "FROM otel.otel_traces WHERE TraceId = {t:String} ORDER BY Timestamp LIMIT 1 BY SpanId",
                        parameters={"t": trace_id}).result_rows
    return [dict(zip(cols, r)) for r in rows]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tensortrace.devstack.tracestack", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    a = p.parse_args(argv)
    from tensortrace.devkafka import LocalKafka

    os.makedirs(a.workdir, exist_ok=True)
    ring_dir = os.path.join(a.workdir, "rings")
    os.makedirs(ring_dir, mode=0o700, exist_ok=True)
    ch_path = os.path.join(a.workdir, "chdb")
    kafka = exporter = bridge = None
    try:
        t0 = time.monotonic()
        kafka = LocalKafka().start()
        create_topics(kafka.bootstrap, {TOPIC: 2, TOPIC + ".dlq": 1, SPANS_TOPIC: 1, SPANS_TOPIC + ".dlq": 1})
        exporter = ExporterProcess(ring_dir, kafka.bootstrap, TOPIC, a.workdir).start()
        bridge = BridgeProcess(["--kafka-bootstrap-servers", kafka.bootstrap, "--topic", TOPIC,
                                "--dlq-topic", TOPIC + ".dlq", "--clickhouse-dsn", f"chdb://{ch_path}",
                                "--otlp-receiver-port", "0", "--otlp-receiver-host", "127.0.0.1",
                                "--otlp-receiver-plaintext",   # loopback development (docs/security.md)
                                "--spans-topic", SPANS_TOPIC, "--batch-max-delay-s", "0.1",
                                "--request-timeout-s", "10"], a.workdir)
        ports = bridge.wait_ready()
        _log(f"ready in {time.monotonic() - t0:.1f}s: Kafka {kafka.bootstrap}, exporter pid {exporter.proc.pid}, "
             f"bridge pid {bridge.proc.pid}")
        _emit({"ready": True, "otlp": f"127.0.0.1:{ports['otlp']}", "ring_dir": ring_dir, "kafka": kafka.bootstrap,
               "bridge_http": ports["http"], "bridge_log": bridge.log_path})
        for line in sys.stdin:
            parts = line.split()
            if not parts:
                continue
            if parts[0] != "collect":
                _emit({"error": f"unknown command {parts[0]!r}"})
                continue
            trace_id, min_engine, min_requests = parts[1], int(parts[2]), int(parts[3])
            timeout_s = float(parts[4]) if len(parts) > 4 else 120.0
            deadline = time.monotonic() + timeout_s
            last, quiet_since, m = None, time.monotonic(), {}
            while time.monotonic() < deadline:
                m = bridge.metrics()
                engine = _total(m, 'tensortrace_bridge_engine_spans_total{destination="clickhouse"}')
                requests = _total(m, "tensortrace_bridge_requests_total")
                now = (engine, requests)
                if now != last:
                    last, quiet_since = now, time.monotonic()
                if engine >= min_engine and requests >= min_requests and time.monotonic() - quiet_since >= 2.0:
                    break
                time.sleep(0.2)
            rc = bridge.stop()
            rows = read_trace(ch_path, trace_id)
            _emit({"rows": rows, "metrics": {k: v for k, v in m.items() if "_bucket" not in k},
                   "bridge_exit": rc, "bridge_log_tail": bridge.log_tail(30)})
            return 0
        return 0
    except Exception as e:
        _emit({"error": f"{type(e).__name__}: {e}"})
        raise
    finally:
        if bridge is not None:
            bridge.stop()
        if exporter is not None:
            exporter.stop()
        if kafka is not None:
            kafka.close()


if __name__ == "__main__":
    sys.exit(main())
