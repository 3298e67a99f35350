"""The Grafana dashboards of the chart, as code: `python charts/tensortrace/dashboards/generate.py`
rewrites capture.json and pipeline.json beside it (tests/chart/test_monitoring.py fails when they
differ from what this prints). Every Prometheus panel uses the `datasource` variable, every
ClickHouse panel the `clickhouse` variable; both are declared in the dashboard's templating.
"""
import json

PROM = {"type": "prometheus", "uid": "${datasource}"}
CH = {"type": "grafana-clickhouse-datasource", "uid": "${clickhouse}"}
NS = 'namespace=~"$namespace"'
POD = 'label_replace({inner}, "inference_pod", "$1", "ring", "(.+)-[0-9]+-r[0-9]+[.]ring")'


def ds_var(name, label, plugin):
    return {"name": name, "label": label, "type": "datasource", "query": plugin, "current": {}, "hide": 0,
            "refresh": 1, "regex": "", "options": []}


def query_var(name, label, query, multi=True):
    return {"name": name, "label": label, "type": "query", "datasource": PROM,
            "query": {"query": query, "refId": name}, "definition": query, "refresh": 2, "includeAll": True,
            "multi": multi, "allValue": ".*", "current": {"text": "All", "value": "$__all"}, "options": [],
            "sort": 1, "hide": 0}


class Board:
    def __init__(self):
        self.panels, self.y, self.x, self.next_id = [], 0, 0, 1

    def row(self, title):
        if self.x:
            self.y += 8
            self.x = 0
        self.panels.append({"id": self.next_id, "type": "row", "title": title, "collapsed": False,
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}, "panels": []})
        self.next_id += 1
        self.y += 1

    def panel(self, title, targets, kind="timeseries", unit="short", w=12, h=8, ds=PROM, desc="", extra=None):
        if self.x + w > 24:
            self.y += h
            self.x = 0
        p = {"id": self.next_id, "type": kind, "title": title, "description": desc, "datasource": ds,
             "gridPos": {"h": h, "w": w, "x": self.x, "y": self.y},
             "fieldConfig": {"defaults": {"unit": unit}, "overrides": []}, "options": {}, "targets": []}
        for i, t in enumerate(targets):
            t = dict(t)
            t.setdefault("refId", chr(ord("A") + i))
            t["datasource"] = ds
            p["targets"].append(t)
        if extra:
            p.update(extra)
        self.panels.append(p)
        self.next_id += 1
        self.x += w
        if self.x >= 24:
            self.x = 0
            self.y += h

    def dashboard(self, uid, title, desc, variables):
        return {"uid": uid, "title": title, "description": desc, "tags": ["tensortrace"], "editable": True,
                "schemaVersion": 39, "version": 1, "timezone": "browser", "refresh": "30s",
                "time": {"from": "now-3h", "to": "now"}, "graphTooltip": 1,
                "links": [{"type": "dashboards", "tags": ["tensortrace"], "title": "TensorTrace", "asDropdown": True}],
                "templating": {"list": variables}, "annotations": {"list": []}, "panels": self.panels}


def prom(expr, legend=""):
    return {"expr": expr, "legendFormat": legend, "range": True}


# -- capture (node side) --------------------------------------------------------------------------
b = Board()
b.row("Capture per inference pod")
b.panel("Capture rate (records/s)", [prom(
    f'sum by (inference_pod) ({POD.format(inner=f"rate(tensortrace_exporter_records_in_total{{{NS}}}[$__rate_interval])")})',
    "{{inference_pod}}")], unit="rps",
    desc="TensorRecords and summaries the exporters read from each inference pod's rings (the pod is the ring file's name prefix).")
b.panel("Drops by pod and reason (frames/s)", [prom(
    f'sum by (inference_pod, reason) ({POD.format(inner=f"rate(tensortrace_exporter_frames_dropped_total{{{NS}}}[$__rate_interval])")})',
    "{{inference_pod}} {{reason}}")], unit="rps",
    desc="producer_dropped: the agent dropped (ring full, frame too large); the rest: frames the exporter could not use. Every drop makes its request incomplete.")
b.panel("Ring fill", [prom(f'max by (ring) (tensortrace_exporter_ring_fill_ratio{{{NS}}})', "{{ring}}")],
        unit="percentunit", desc="Unreleased fraction of each ring's data area; at 100% the agent drops by its overflow policy.",
        extra={"fieldConfig": {"defaults": {"unit": "percentunit", "min": 0, "max": 1}, "overrides": []}})
b.panel("Capture cost (share of one inference thread)", [prom(
    f'sum by (inference_pod) ({POD.format(inner=f"rate(tensortrace_exporter_agent_thread_seconds_total{{{NS}}}[$__rate_interval])")})',
    "{{inference_pod}}")], unit="percentunit",
    desc="Inference-thread time the agents spend capturing, per second: 0.02 = 2% of one scheduler thread.")
b.row("Exporters")
b.panel("Published to Kafka (payload bytes/s)", [prom(
    f'sum by (pod) (rate(tensortrace_exporter_payload_published_bytes_total{{{NS}}}[$__rate_interval]))', "{{pod}}")], unit="Bps", w=8)
b.panel("Kafka send latency", [
    prom(f'histogram_quantile(0.5, sum by (le) (rate(tensortrace_exporter_kafka_send_latency_seconds_bucket{{{NS}}}[$__rate_interval])))', "p50"),
    prom(f'histogram_quantile(0.99, sum by (le) (rate(tensortrace_exporter_kafka_send_latency_seconds_bucket{{{NS}}}[$__rate_interval])))', "p99")],
    unit="s", w=8)
b.panel("Oldest undelivered record (exporter lag)", [prom(
    f'max by (pod) (tensortrace_exporter_oldest_undelivered_age_seconds{{{NS}}})', "{{pod}}")], unit="s", w=8,
    desc="Capture -> now, for the oldest record read from a ring and not yet acknowledged by Kafka.")
b.panel("Rings attached", [prom(f'sum by (pod) (tensortrace_exporter_rings_attached{{{NS}}})', "{{pod}}")], w=8)
b.panel("Rings refused / quarantined (per 10m)", [
    prom(f'sum by (pod, reason) (increase(tensortrace_exporter_rings_refused_total{{{NS}}}[10m]))', "refused {{pod}} {{reason}}"),
    prom(f'sum by (pod, reason) (increase(tensortrace_exporter_rings_quarantined_total{{{NS}}}[10m]))', "quarantined {{pod}} {{reason}}")],
    w=8, desc="Refused: ring permissions (docs/operations.md, Ring permissions). Quarantined: unreadable or corrupt.")
b.panel("Kafka connected", [prom(f'min by (pod) (tensortrace_exporter_kafka_connected{{{NS}}})', "{{pod}}")], w=8)
capture = b.dashboard("tensortrace-capture", "TensorTrace / Capture",
                      "Capture on the inference nodes: rates, drops, ring fill and cost per inference pod; the exporters' delivery to Kafka.",
                      [ds_var("datasource", "Prometheus", "prometheus"),
                       query_var("namespace", "Namespace", "label_values(tensortrace_exporter_rings_attached, namespace)")])

# -- pipeline (cluster side) ----------------------------------------------------------------------
b = Board()
b.row("Kafka")
b.panel("Activations topic: published vs read (messages/s)", [
    prom(f'sum(rate(tensortrace_exporter_messages_out_total{{{NS}, topic=~"$topic"}}[$__rate_interval]))', "published (exporters)"),
    prom(f'sum(rate(tensortrace_loader_messages_total{{{NS}}}[$__rate_interval]))', "read (loader)"),
    prom(f'sum(rate(tensortrace_bridge_messages_total{{{NS}}}[$__rate_interval]))', "read (bridge)"),
    prom(f'sum(rate(tensortrace_probes_messages_total{{{NS}}}[$__rate_interval]))', "read (probes)")],
    unit="rps", desc="A consumer that reads less than the exporters publish for a while is falling behind.")
b.panel("Consumer lag (messages behind)", [
    prom(f'sum(tensortrace_loader_consumer_lag_messages{{{NS}}})', "loader"),
    prom(f'sum(tensortrace_bridge_consumer_lag_messages{{{NS}}})', "bridge"),
    prom(f'sum(tensortrace_probes_consumer_lag_messages{{{NS}}})', "probes")],
    desc="Per consumer group, summed over partitions: the topic's high watermark minus the group's committed offset, "
         "as each consumer reports it for the partitions it holds. Growing: the consumer falls behind.")
b.row("Load")
b.panel("Rows loaded (rows/s)", [prom(f'sum by (table) (rate(tensortrace_loader_rows_total{{{NS}}}[$__rate_interval]))', "{{table}}")],
        unit="rps", w=8)
b.panel("Dead letters (per 5m)", [
    prom(f'sum by (reason) (increase(tensortrace_loader_dead_letters_total{{{NS}}}[5m]))', "loader {{reason}}"),
    prom(f'sum by (reason) (increase(tensortrace_bridge_dead_letters_total{{{NS}}}[5m]))', "bridge {{reason}}")],
    w=8, desc="Messages sent to the dead-letter topic, by reason (docs/consumers.md).")
b.panel("Loader time by stage (busy share)", [prom(
    f'sum by (stage) (rate(tensortrace_loader_busy_seconds_total{{{NS}}}[$__rate_interval]))', "{{stage}}")],
    unit="percentunit", w=8)
b.panel("Load freshness: capture -> queryable", [
    prom(f'histogram_quantile(0.5, sum by (le) (rate(tensortrace_loader_freshness_seconds_bucket{{{NS}}}[$__rate_interval])))', "p50"),
    prom(f'histogram_quantile(0.99, sum by (le) (rate(tensortrace_loader_freshness_seconds_bucket{{{NS}}}[$__rate_interval])))', "p99")],
    unit="s", desc="Per activation row, from its capture in the inference process to the loader's insert returning "
                   "(tensortrace_loader_freshness_seconds; buckets 50 ms to 300 s).")
b.panel("Requests by completeness (bridge)", [prom(
    f'sum by (state) (rate(tensortrace_bridge_requests_total{{{NS}}}[$__rate_interval]))', "{{state}}")], unit="rps",
    desc="complete: every record and summary arrived; incomplete / no_summary: tensortrace show <trace-id> says why.")
b.row("Probes")
b.panel("Probe scores", [prom(
    f'sum by (le) (increase(tensortrace_probes_score_bucket{{{NS}, probe=~"$probe"}}[$__rate_interval]))', "{{le}}")],
    kind="heatmap", w=8, extra={"options": {"calculate": False, "yAxis": {"unit": "short"}}},
    desc="Distribution of published scores (0..1) of the selected probes.")
b.panel("Flagged share by probe", [prom(
    f'sum by (probe) (rate(tensortrace_probes_alerts_total{{{NS}, probe=~"$probe"}}[$__rate_interval])) / sum by (probe) (rate(tensortrace_probes_scores_total{{{NS}, probe=~"$probe"}}[$__rate_interval]))',
    "{{probe}}")], unit="percentunit", w=8)
b.panel("Probe freshness: request end -> score", [
    prom(f'histogram_quantile(0.5, sum by (le) (rate(tensortrace_probes_freshness_seconds_bucket{{{NS}}}[$__rate_interval])))', "p50"),
    prom(f'histogram_quantile(0.99, sum by (le) (rate(tensortrace_probes_freshness_seconds_bucket{{{NS}}}[$__rate_interval])))', "p99")],
    unit="s", w=8)
b.row("Requests")
b.panel("Slowest requests (ClickHouse): open one with `tensortrace trace <trace id>`", [{
    "rawSql": "SELECT lower(hex(trace_id)) AS trace_id, request_id, model, producer_pod AS pod,\n"
              "       dateDiff('millisecond', start_time, end_time) AS duration_ms,\n"
              "       prompt_tokens, generated_tokens, complete, incomplete_reason,\n"
              "       concat('tensortrace trace ', lower(hex(trace_id))) AS command\n"
              "FROM ${database}.requests\nWHERE $__timeFilter(end_time)\n"
              "ORDER BY duration_ms DESC\nLIMIT 1 BY trace_id, request_id\nLIMIT 25",
    "format": 1, "queryType": "table", "editorType": "sql"}], kind="table", w=24, h=10, ds=CH,
    desc="The slowest captured requests in the time range. Copy the command column (add --server <release>-tensortrace-query:50052 "
         "or port-forward it) to see the request end to end: queue, prefill, decode steps, capture, export, load.",
    extra={"fieldConfig": {"defaults": {"unit": "short"}, "overrides": [
        {"matcher": {"id": "byName", "options": "duration_ms"}, "properties": [{"id": "unit", "value": "ms"}]},
        {"matcher": {"id": "byName", "options": "trace_id"}, "properties": [{"id": "links", "value": [
            {"title": "Trace in Explore", "url": "/explore?left=${__url_time_range}&schemaVersion=1&panes={\"t\":{\"datasource\":\"${clickhouse}\",\"queries\":[{\"refId\":\"A\",\"queryType\":\"traces\",\"traceId\":\"${__value.raw}\"}]}}"}]}]}]}})
pipeline = b.dashboard("tensortrace-pipeline", "TensorTrace / Pipeline",
                       "From Kafka to ClickHouse: consumer rates and lag, load freshness, dead letters, completeness, probe scores, slowest requests.",
                       [ds_var("datasource", "Prometheus", "prometheus"),
                        ds_var("clickhouse", "ClickHouse", "grafana-clickhouse-datasource"),
                        query_var("namespace", "Namespace", "label_values(tensortrace_loader_ready, namespace)"),
                        query_var("topic", "Activations topic", "label_values(tensortrace_exporter_messages_out_total, topic)"),
                        query_var("probe", "Probe", "label_values(tensortrace_probes_scores_total, probe)"),
                        {"name": "database", "label": "ClickHouse database", "type": "textbox", "query": "tensortrace",
                         "current": {"text": "tensortrace", "value": "tensortrace"}, "hide": 0, "options": []}])

DASHBOARDS = {"capture": capture, "pipeline": pipeline}


def render(d: dict) -> str:
    return json.dumps(d, indent=2) + "\n"


if __name__ == "__main__":
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    for name, d in DASHBOARDS.items():
        with open(os.path.join(here, f"{name}.json"), "w") as f:
            f.write(render(d))
