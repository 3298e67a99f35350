"""Prometheus metrics of the loader, on the loader's own registry: the LoaderStats counters, read
at scrape time (served at /metrics by the service runtime's HTTP endpoint, with /healthz, /readyz).

    metrics = LoaderMetrics(service)      # anything with `.stats` (a LoaderStats) and `ready()`
    generate_latest(metrics.registry)

Declared metrics (counters unless noted; documented in docs/storage.md):
  tensortrace_loader_messages_total                 Kafka messages read
  tensortrace_loader_rows_total{table}              rows accepted by ClickHouse (re-read duplicates included)
  tensortrace_loader_payload_bytes_total            payload bytes inserted
  tensortrace_loader_batches_total                  inserts that succeeded
  tensortrace_loader_insert_failures_total          insert attempts that failed (retried)
  tensortrace_loader_commits_total / _commit_failures_total   Kafka offset commits
  tensortrace_loader_dead_letters_total{reason}     messages sent to the dead-letter topic
  tensortrace_loader_fetch_pauses_total             times fetching paused because inserts fell behind
  tensortrace_loader_busy_seconds_total{stage}      time spent decoding (consume thread), building
                                                    Arrow tables and inserting (flush thread)
  tensortrace_loader_ready (gauge)                  1 once the consumer holds partitions
  tensortrace_loader_consumer_lag_messages{partition} (gauge) activation-topic messages not yet committed
  tensortrace_loader_freshness_seconds (histogram)  capture -> queryable per activation row (insert returned)
  tensortrace_loader_scores_messages_total          probe scores read off the scores topic (--scores-consumer)
  tensortrace_loader_scores_dead_letters_total{reason}  scores-topic messages sent to <scores topic>.dlq
  (rows_total{table="probe_scores"}: score rows accepted by ClickHouse)
  tensortrace_loader_forget_sweeps_total            forget sweeps run (docs/data-lifecycle.md)
  tensortrace_loader_forget_swept_rows_total        rows of forgotten requests a Kafka re-read brought back, deleted again
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from tensortrace.consume.metrics import lag_family

P = "tensortrace_loader_"


class _LoaderCollector:
    """Reads `loader.stats` at every scrape (the counters live in one place: LoaderStats)."""

    def __init__(self, loader):
        self.loader = loader

    def collect(self):
        s = self.loader.stats
        yield CounterMetricFamily(P + "messages", "Kafka messages read", value=s.messages)
        rows = CounterMetricFamily(P + "rows", "rows accepted by ClickHouse", labels=["table"])
        rows.add_metric(["activations"], s.tensor_rows)
        rows.add_metric(["requests"], s.summary_rows)
        scores = getattr(self.loader, "scores_stats", None)
        if scores is not None:
            rows.add_metric(["probe_scores"], scores.rows)
        yield rows
        yield CounterMetricFamily(P + "payload_bytes", "payload bytes inserted", value=s.payload_bytes)
        yield CounterMetricFamily(P + "batches", "successful inserts", value=s.batches)
        yield CounterMetricFamily(P + "insert_failures", "failed insert attempts", value=s.insert_failures)
        yield CounterMetricFamily(P + "commits", "offset commits", value=s.commits)
        yield CounterMetricFamily(P + "commit_failures", "failed offset commits", value=s.commit_failures)
        dl = CounterMetricFamily(P + "dead_letters", "messages sent to the dead-letter topic", labels=["reason"])
        for reason, n in sorted(s.dlq_by_reason.items()):
            dl.add_metric([reason], n)
        yield dl
        yield CounterMetricFamily(P + "fetch_pauses", "times fetching paused because inserts fell behind",
                                  value=getattr(s, "paused", 0))
        busy = CounterMetricFamily(P + "busy_seconds", "time spent per stage", labels=["stage"])
        for stage, attr in (("decode", "decode_seconds"), ("arrow", "arrow_seconds"), ("insert", "insert_seconds")):
            busy.add_metric([stage], getattr(s, attr, 0.0))
        yield busy
        yield CounterMetricFamily(P + "forget_sweeps", "forget sweeps run", value=getattr(s, "forget_sweeps", 0))
        yield CounterMetricFamily(P + "forget_swept_rows",
                                  "rows of forgotten requests a Kafka re-read brought back, deleted again",
                                  value=getattr(s, "forget_swept_rows", 0))
        core = getattr(self.loader, "scores_core", None)
        if core is not None:
            yield CounterMetricFamily(P + "scores_messages", "probe scores read off the scores topic",
                                      value=core.stats.messages)
            sdl = CounterMetricFamily(P + "scores_dead_letters", "scores-topic messages sent to <scores topic>.dlq",
                                      labels=["reason"])
            for reason, n in sorted(core.stats.dlq_by_reason.items()):
                sdl.add_metric([reason], n)
            yield sdl
        counts = getattr(s, "freshness_counts", None)
        if counts is not None:
            from tensortrace.loader.service import FRESHNESS_BUCKETS
            buckets, acc = [], 0
            for bound, n in zip([*map(str, FRESHNESS_BUCKETS), "+Inf"], counts):
                acc += n
                buckets.append((bound, acc))
            yield HistogramMetricFamily(P + "freshness_seconds", "capture -> queryable per activation row (insert returned)",
                                        buckets=buckets, sum_value=s.freshness_sum)
        core = getattr(getattr(self.loader, "loader", None), "core", None)   # LoaderService.loader: the Loader
        if core is not None:
            yield lag_family(P, core)
        ready = getattr(self.loader, "ready", None)
        if callable(ready):
            yield GaugeMetricFamily(P + "ready", "1 once the consumer holds partitions", value=1.0 if ready() else 0.0)


class LoaderMetrics:
    def __init__(self, loader):
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_LoaderCollector(loader))
