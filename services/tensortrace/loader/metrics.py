"""Prometheus metrics of the loader (`--metrics-port`): the LoaderStats counters, read at scrape time.

>>> serve_metrics(loader, 9465)   # then GET http://host:9465/metrics

Declared metrics (all counters unless noted):
  tensortrace_loader_messages_total           Kafka messages read
  tensortrace_loader_rows_total{table}         rows accepted by ClickHouse (re-read duplicates included)
  tensortrace_loader_payload_bytes_total       payload bytes inserted
  tensortrace_loader_batches_total             inserts that succeeded
  tensortrace_loader_insert_failures_total     insert attempts that failed (retried)
  tensortrace_loader_commits_total / _commit_failures_total   Kafka offset commits
  tensortrace_loader_dead_letters_total{reason}               messages sent to the dead-letter topic
"""

from __future__ import annotations

from prometheus_client import start_http_server
from prometheus_client.core import REGISTRY, CounterMetricFamily


class _LoaderCollector:
    def __init__(self, loader):
        self.loader = loader

    def collect(self):
        s = self.loader.stats
        yield CounterMetricFamily("tensortrace_loader_messages", "Kafka messages read", value=s.messages)
        rows = CounterMetricFamily("tensortrace_loader_rows", "rows accepted by ClickHouse", labels=["table"])
        rows.add_metric(["activations"], s.tensor_rows)
        rows.add_metric(["requests"], s.summary_rows)
        yield rows
        yield CounterMetricFamily("tensortrace_loader_payload_bytes", "payload bytes inserted", value=s.payload_bytes)
        yield CounterMetricFamily("tensortrace_loader_batches", "successful inserts", value=s.batches)
        yield CounterMetricFamily("tensortrace_loader_insert_failures", "failed insert attempts", value=s.insert_failures)
        yield CounterMetricFamily("tensortrace_loader_commits", "offset commits", value=s.commits)
        yield CounterMetricFamily("tensortrace_loader_commit_failures", "failed offset commits", value=s.commit_failures)
        dl = CounterMetricFamily("tensortrace_loader_dead_letters", "messages sent to the DLQ", labels=["reason"])
        for reason, n in sorted(s.dlq_by_reason.items()):
            dl.add_metric([reason], n)
        yield dl


def serve_metrics(loader, port: int, addr: str = "0.0.0.0"):
    REGISTRY.register(_LoaderCollector(loader))
    return start_http_server(port, addr=addr)
