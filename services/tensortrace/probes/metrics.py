"""Prometheus metrics of `tensortrace probes`, on the service's own registry (served at /metrics by
the service runtime's HTTP endpoint, with /healthz and /readyz; port 9468 by default).

    metrics = ProbesMetrics(service)     # service: .stats (ScoresStats), .probes, .core, .sink, .ready()
    generate_latest(metrics.registry)

Declared metrics (documented in docs/probes.md, "The service"); counters count what Kafka acknowledged:
  tensortrace_probes_score{probe}                      histogram of published scores (probabilities: 0..1 buckets)
  tensortrace_probes_scores_total{probe,complete}      scores published
  tensortrace_probes_alerts_total{probe}               flagged scores (score >= threshold, not shadow): the alert
  tensortrace_probes_shadow_flagged_total{probe}       shadow scores >= threshold (what it would have alerted)
  tensortrace_probes_incomplete_scores_total{probe,release}  scores over an incomplete request
                                                       (rate / scores_total = the incomplete-score rate)
  tensortrace_probes_freshness_seconds                 histogram: request end (its summary) -> score acknowledged
  tensortrace_probes_errors_total{probe,stage}         a probe raised (new_state, decode, update, finalize)
  tensortrace_probes_requests_total{release}           requests scored, by how the view released them
  tensortrace_probes_requests_skipped_total{reason}    released requests with nothing to score (not_sampled, no_probe)
  tensortrace_probes_records_total{kind}               kept (payload decoded) / skipped (never decoded) /
                                                       superseded (kept, but a later record of its layer was held instead)
  tensortrace_probes_payload_bytes_total{kind}         the same in payload bytes
  tensortrace_probes_loaded (gauge)                    probes scoring now; tensortrace_probes_refused (gauge)
  tensortrace_probes_probe_info{probe,hash,hook,shadow}  1 per loaded probe
  tensortrace_probes_refused_info{file,reason}         1 per refused probe file (the reason, cut to 200 chars)
  tensortrace_probes_reloads_total                     probe directory re-reads that changed the set
  tensortrace_probes_escalations_total                 flagged scores acknowledged on the escalation topic
  tensortrace_probes_publish_failures_total            publish attempts that failed (retried)
  tensortrace_probes_consumer_lag_messages{partition}  (gauge) messages not yet committed (tensortrace.consume.metrics)
  tensortrace_probes_open_requests (gauge)             requests waiting for their records
  tensortrace_probes_messages_total, _dead_letters_total{reason}, _commits_total   the consumer core's
  tensortrace_probes_busy_seconds_total{stage}         decode (consume thread), score, publish (flush thread)
  tensortrace_probes_ready (gauge)                     1 once the consumer holds partitions

Alerting rules read these: e.g. `increase(tensortrace_probes_alerts_total[5m]) > 0`; the threshold
itself comes from each probe's metadata (its calibrated `threshold`, or `--thresholds`).
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from tensortrace.consume.metrics import lag_family

P = "tensortrace_probes_"
SCORE_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 20)) + (1.0,)
FRESHNESS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)


class _Collector:
    """Reads the service's counters at every scrape (they live in one place: ScoresStats)."""

    def __init__(self, svc):
        self.svc = svc

    def describe(self):   # registered before the service is whole: nothing to read at registration
        return []

    def collect(self):
        svc = self.svc
        s = svc.stats
        per = dict(svc.metrics.per_probe)
        scores = CounterMetricFamily(P + "scores", "scores published (acknowledged by Kafka)", labels=["probe", "complete"])
        alerts = CounterMetricFamily(P + "alerts", "flagged scores (score >= threshold, not shadow)", labels=["probe"])
        shadow = CounterMetricFamily(P + "shadow_flagged", "shadow-mode scores >= threshold (never alerted)", labels=["probe"])
        incomplete = CounterMetricFamily(P + "incomplete_scores", "scores over an incomplete request",
                                         labels=["probe", "release"])
        for (probe, kind, extra), n in sorted(per.items()):
            if kind == "scores":
                scores.add_metric([probe, extra], n)
            elif kind == "alerts":
                alerts.add_metric([probe], n)
            elif kind == "shadow":
                shadow.add_metric([probe], n)
            elif kind == "incomplete":
                incomplete.add_metric([probe, extra], n)
        yield scores
        yield alerts
        yield shadow
        yield incomplete
        errors = CounterMetricFamily(P + "errors", "times a probe raised, by stage", labels=["probe", "stage"])
        for (probe, stage), n in sorted(list(s.errors.items())):
            errors.add_metric([probe, stage], n)
        yield errors
        req = CounterMetricFamily(P + "requests", "requests scored, by release", labels=["release"])
        for k, n in sorted(list(s.requests.items())):
            req.add_metric([k], n)
        yield req
        skipped = CounterMetricFamily(P + "requests_skipped", "released requests with nothing to score", labels=["reason"])
        skipped.add_metric(["not_sampled"], s.not_sampled)
        skipped.add_metric(["no_probe"], s.no_probe)
        yield skipped
        recs = CounterMetricFamily(P + "records", "records by whether a probe needed their payload", labels=["kind"])
        recs.add_metric(["kept"], s.records_kept)
        recs.add_metric(["skipped"], s.records_skipped)
        recs.add_metric(["superseded"], s.records_superseded)   # of the kept: a later record of its layer held instead
        yield recs
        nbytes = CounterMetricFamily(P + "payload_bytes", "payload bytes (raw size) kept (decoded) / skipped (never decoded)",
                                     labels=["kind"])
        nbytes.add_metric(["kept"], s.bytes_kept)
        nbytes.add_metric(["skipped"], s.bytes_skipped)
        yield nbytes
        cur = svc.probes.current
        yield GaugeMetricFamily(P + "loaded", "probes scoring now", value=len(cur.probes))
        yield GaugeMetricFamily(P + "refused", "probe files refused (bad file, or does not fit the stream)",
                                value=len(cur.refused))
        info = GaugeMetricFamily(P + "probe_info", "1 per loaded probe", labels=["probe", "hash", "hook", "shadow"])
        for p in cur.probes:
            info.add_metric([p.name, p.hash, p.hook, "true" if p.shadow else "false"], 1)
        yield info
        rinfo = GaugeMetricFamily(P + "refused_info", "1 per refused probe file, with the reason", labels=["file", "reason"])
        for path, why in sorted(cur.refused.items()):
            rinfo.add_metric([path, why[:200]], 1)
        yield rinfo
        yield CounterMetricFamily(P + "reloads", "probe directory re-reads that changed the set", value=svc.probes.reloads)
        yield CounterMetricFamily(P + "escalations", "flagged scores acknowledged on the escalation topic", value=s.escalations)
        yield CounterMetricFamily(P + "publish_failures", "publish attempts that failed (retried)", value=s.publish_failures)
        yield lag_family(P, svc.core)
        yield GaugeMetricFamily(P + "open_requests", "requests waiting for their records",
                                value=svc.sink.view.stats.requests_open)
        cs = svc.core.stats
        yield CounterMetricFamily(P + "messages", "Kafka messages read", value=cs.messages)
        yield CounterMetricFamily(P + "commits", "offset commits", value=cs.commits)
        dl = CounterMetricFamily(P + "dead_letters", "messages sent to the dead-letter topic", labels=["reason"])
        for reason, n in sorted(cs.dlq_by_reason.items()):
            dl.add_metric([reason], n)
        yield dl
        busy = CounterMetricFamily(P + "busy_seconds", "time spent per stage", labels=["stage"])
        busy.add_metric(["decode"], cs.decode_seconds)
        busy.add_metric(["score"], s.score_seconds)
        busy.add_metric(["publish"], s.publish_seconds)
        yield busy
        yield GaugeMetricFamily(P + "ready", "1 once the consumer holds partitions", value=1.0 if svc.ready() else 0.0)


class ProbesMetrics:
    def __init__(self, svc):
        self.registry = CollectorRegistry(auto_describe=True)
        self.per_probe: dict[tuple[str, str, str], int] = {}
        self.score = Histogram(P + "score", "published scores, by probe", ["probe"], buckets=SCORE_BUCKETS,
                               registry=self.registry)
        self.freshness = Histogram(P + "freshness_seconds", "request end (its summary) -> score acknowledged by Kafka",
                                   buckets=FRESHNESS_BUCKETS, registry=self.registry)
        self.registry.register(_Collector(svc))

    def _inc(self, key: tuple[str, str, str]) -> None:
        self.per_probe[key] = self.per_probe.get(key, 0) + 1

    def observe_scores(self, scores) -> None:
        """Called on the flush thread once Kafka acknowledged these scores."""
        now = time.time_ns()
        for sc in scores:
            if sc.score == sc.score:   # NaN (nothing to score) is not a score
                self.score.labels(sc.probe).observe(sc.score)
            self._inc((sc.probe, "scores", "true" if sc.complete else "false"))
            if not sc.complete:
                self._inc((sc.probe, "incomplete", sc.release))
            if sc.flagged:
                self._inc((sc.probe, "alerts", ""))
            elif sc.shadow and sc.score >= sc.threshold:
                self._inc((sc.probe, "shadow", ""))
            if sc.request_end_time_unix_nano:
                self.freshness.observe(max(0.0, (now - sc.request_end_time_unix_nano) / 1e9))
