"""Monitoring as the chart ships it: one switch (monitoring.enabled) turns on the PodMonitor,
ServiceMonitor, PrometheusRule and the Grafana dashboards (ConfigMaps with the sidecar label).

Every PromQL expression in the alerts and the dashboards is parsed by Prometheus' own parser
(tests/chart/tools: github.com/prometheus/prometheus/promql/parser, built by `make chart-tools`),
and every metric it selects must be one the services really export: the exporter, the loader (with
its embedded bridge), the bridge, the query service and the probe service are started as the CLI
starts them, and their /metrics pages are read. Every dashboard is valid JSON, its panels use only
the datasource variables it declares, and it is what charts/tensortrace/dashboards/generate.py makes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from helmchart import CHART, EXAMPLES, chart_tools, find, helm, one, render, template_args

TENSORTRACE = [sys.executable, "-m", "tensortrace.cli"]


@pytest.fixture(scope="module")
def monitored():
    return render(values=[EXAMPLES / "monitoring.yaml"], set_values={"probes.enabled": True})


@pytest.fixture(scope="module")
def dashboards(monitored):
    out = {}
    for cm in find(monitored, "ConfigMap"):
        for key, text in cm["data"].items():
            if key.endswith(".json"):
                out[key] = json.loads(text)
    return out


# -- what the services export --------------------------------------------------------------------

def _exported_names(text: str) -> set[str]:
    """Every series name a /metrics page can carry, from its # TYPE lines (a labelled metric with no
    sample yet has only those): counters `x_total`, histograms `x_bucket` / `x_sum` / `x_count`."""
    names = set()
    for line in text.splitlines():
        m = re.match(r"# TYPE (\S+) (\S+)", line)
        if not m:
            continue
        name, kind = m.groups()
        names.add(name)
        if kind == "counter":
            names.add(name if name.endswith("_total") else name + "_total")
        elif kind in ("histogram", "summary"):
            names.update({name + "_sum", name + "_count", name + "_created"})
            if kind == "histogram":
                names.add(name + "_bucket")
    return names


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{service: /metrics text}, from the services started through the CLI, as the chart starts them
    (no Kafka: port 1 refuses; the metrics are declared before anything connects)."""
    tmp = tmp_path_factory.mktemp("metrics")
    (tmp / "rings").mkdir()
    (tmp / "probes").mkdir()
    kafka = ["--kafka-bootstrap-servers", "127.0.0.1:1"]
    runs = {
        "exporter": ["exporter", "--ring-dir", str(tmp / "rings"), "--control-port", "-1", *kafka],
        # loopback, plaintext by opt-in (docs/security.md): this test reads metrics, not the endpoints
        "loader": ["loader", "--clickhouse-dsn", f"chdb://{tmp}/loader", "--query-port", "0", "--query-plaintext",
                   "--bridge", "--bridge-otlp-receiver-port", "0", "--bridge-otlp-receiver-plaintext",
                   "--scores-consumer=true", *kafka],
        "bridge": ["bridge", "--clickhouse-dsn", f"chdb://{tmp}/bridge", "--otlp-receiver-port", "0",
                   "--otlp-receiver-host", "127.0.0.1", "--otlp-receiver-plaintext", *kafka],
        "query-server": ["query-server", "--clickhouse-dsn", f"chdb://{tmp}/query", "--query-port", "0", "--plaintext"],
        "probes": ["probes", "--probe-dir", str(tmp / "probes"), *kafka],
    }
    procs = {}
    try:
        for name, args in runs.items():
            status = tmp / f"{name}.json"
            procs[name] = (subprocess.Popen([*TENSORTRACE, *args, "--http-port", "0", "--status-file", str(status)],
                                            stdout=subprocess.DEVNULL, stderr=open(tmp / f"{name}.log", "w"),
                                            cwd=tmp, env={**os.environ, "HOME": str(tmp)}), status)
        pages = {}
        deadline = time.monotonic() + 120
        for name, (proc, status) in procs.items():
            while not status.exists():
                assert proc.poll() is None, f"{name} exited {proc.returncode}: {(tmp / f'{name}.log').read_text()[-2000:]}"
                assert time.monotonic() < deadline, f"{name} reported no port: {(tmp / f'{name}.log').read_text()[-2000:]}"
                time.sleep(0.2)
            port = json.loads(status.read_text())["ports"]["http"]
            # A service declares the metrics of what it opens (the loader's consumer, its lag) once
            # its backend is open: wait for that, as Prometheus would scrape a running pod.
            while _not_ready_reason(port) == BACKEND_NOT_OPEN:
                assert proc.poll() is None, f"{name} exited {proc.returncode}: {(tmp / f'{name}.log').read_text()[-2000:]}"
                assert time.monotonic() < deadline, f"{name} never opened ClickHouse: {(tmp / f'{name}.log').read_text()[-2000:]}"
                time.sleep(0.2)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                pages[name] = r.read().decode()
        return pages
    finally:
        for proc, _ in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, _ in procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# What /readyz says while a service waits for ClickHouse (loader, bridge, query service).
BACKEND_NOT_OPEN = "ClickHouse not reachable yet"


def _not_ready_reason(port: int) -> str:
    """/readyz's body when it answers 503 ("" when ready)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10):
            return ""
    except urllib.error.HTTPError as e:
        return e.read().decode().strip()


def _parse_promql(exprs: list[str]) -> list[dict]:
    p = subprocess.run([str(chart_tools()), "promql"], input=json.dumps(exprs), capture_output=True, text=True,
                       timeout=60, check=True)
    return json.loads(p.stdout)


# Grafana's variables, as Grafana substitutes them before the query reaches Prometheus.
_GRAFANA = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h", "$namespace": "ml",
            "$topic": "tensortrace.activations", "$probe": "injection"}


def _grafana_to_promql(expr: str) -> str:
    for k, v in _GRAFANA.items():
        expr = expr.replace(k, v)
    assert "$" not in expr.replace('"$1"', ""), f"an undeclared variable in {expr}"
    return expr


def _rule_exprs(docs) -> dict[str, str]:
    rule = one(docs, "PrometheusRule")
    return {r["alert"]: r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]}


def _dashboard_exprs(dashboards) -> dict[str, str]:
    out = {}
    for key, d in dashboards.items():
        for p in d["panels"]:
            for t in p.get("targets", []):
                if "expr" in t:
                    out[f"{key}: {p['title']} ({t['refId']})"] = _grafana_to_promql(t["expr"])
    return out


@pytest.mark.integration
def test_every_promql_expression_parses_and_names_metrics_the_services_export(monitored, dashboards, exported):
    names = set()
    for text in exported.values():
        names |= _exported_names(text)
    assert {"tensortrace_exporter_frames_dropped_total", "tensortrace_loader_rows_total",
            "tensortrace_bridge_requests_total", "tensortrace_probes_alerts_total"} <= names
    # Declared before any partition is held (no Kafka here): the collectors yield the lag family
    # empty, and prometheus_client still writes its # TYPE line.
    for service, families in {
        "loader": {"tensortrace_loader_consumer_lag_messages", "tensortrace_loader_freshness_seconds_bucket",
                   "tensortrace_bridge_consumer_lag_messages"},   # the embedded bridge
        "bridge": {"tensortrace_bridge_consumer_lag_messages"},
        "probes": {"tensortrace_probes_consumer_lag_messages"},
    }.items():
        missing = families - _exported_names(exported[service])
        assert not missing, f"{service}'s /metrics lacks {missing}"
    exprs = _rule_exprs(monitored) | _dashboard_exprs(dashboards)
    assert len(exprs) >= 30
    results = _parse_promql(list(exprs.values()))
    used = set()
    for (where, expr), res in zip(exprs.items(), results):
        assert not res.get("error"), f"{where}: {res['error']}\n{expr}"
        assert res["metrics"], f"{where}: selects no metric"
        unknown = [m for m in res["metrics"] if m not in names]
        assert unknown == [], f"{where}: no service exports {unknown}"
        used |= set(res["metrics"])
    # each service's metrics are watched by something
    for prefix in ("tensortrace_exporter_", "tensortrace_loader_", "tensortrace_bridge_", "tensortrace_probes_"):
        assert any(m.startswith(prefix) for m in used), prefix


def test_the_promql_check_catches_a_misspelt_metric_and_a_syntax_error():
    res = _parse_promql(["sum(rate(tensortrace_exporter_frames_droped_total[5m]))", "sum(rate(x[5m])"])
    assert res[0]["metrics"] == ["tensortrace_exporter_frames_droped_total"]
    assert "parse error" in res[1]["error"]


def test_alerts_cover_drops_fill_lag_dead_letters_freshness_probes_and_completeness(monitored):
    rules = _rule_exprs(monitored)
    assert {"TensorTraceAgentDropping", "TensorTraceRingFilling", "TensorTraceExporterLagging",
            "TensorTraceLoaderLagging", "TensorTraceBridgeLagging", "TensorTraceProbesLagging",
            "TensorTraceLoaderFreshnessSlow", "TensorTraceDeadLetters", "TensorTraceLoaderStale",
            "TensorTraceProbeAlertRateHigh", "TensorTraceIncompleteRequests", "TensorTraceRingsRefused"} <= set(rules)
    assert "by (namespace, pod, reason)" in rules["TensorTraceAgentDropping"]
    assert "> 0.7" in rules["TensorTraceRingFilling"]   # examples/monitoring.yaml's threshold
    for g in one(monitored, "PrometheusRule")["spec"]["groups"]:
        for r in g["rules"]:
            assert r["labels"]["severity"] in ("info", "warning", "critical") and r["annotations"]["summary"], r["alert"]


def test_lag_and_freshness_alerts_read_the_real_gauges_and_histogram_with_the_values_thresholds():
    """The consumers' own lag gauges (high watermark - committed offset), not published - read rates;
    the loader's capture -> queryable histogram, not "published but nothing loaded"."""
    rules = _rule_exprs(render(values=[EXAMPLES / "monitoring.yaml"], set_values={
        "monitoring.rules.consumerLagMessages": {"loader": 2_000_000, "bridge": 3_000_000, "probes": 4_000_000},
        "monitoring.rules.loaderFreshnessP99Seconds": 2.5}))
    assert rules["TensorTraceLoaderLagging"] == "sum by (namespace) (tensortrace_loader_consumer_lag_messages) > 2000000"
    assert rules["TensorTraceBridgeLagging"] == "sum by (namespace) (tensortrace_bridge_consumer_lag_messages) > 3000000"
    assert rules["TensorTraceProbesLagging"] == "sum by (namespace) (tensortrace_probes_consumer_lag_messages) > 4000000"
    freshness = " ".join(rules["TensorTraceLoaderFreshnessSlow"].split())
    assert freshness == ("histogram_quantile(0.99, sum by (namespace, le) "
                         "(rate(tensortrace_loader_freshness_seconds_bucket[5m]))) > 2.5")
    # kept for what lag and freshness cannot see: no loader at all (their series vanish with it)
    assert "tensortrace_loader_rows_total" in rules["TensorTraceLoaderStale"]
    defaults = _rule_exprs(render(values=[EXAMPLES / "monitoring.yaml"]))
    assert defaults["TensorTraceLoaderLagging"].endswith("> 100000")
    assert defaults["TensorTraceProbesLagging"].endswith("> 10000")
    assert defaults["TensorTraceLoaderFreshnessSlow"].strip().endswith("> 10")


@pytest.mark.parametrize("threshold", [0, 300, 301, "10"])
def test_a_freshness_threshold_histogram_quantile_can_never_reach_is_refused(threshold):
    """The histogram's last finite bucket is 300 s: histogram_quantile answers at most 300."""
    p = helm(*template_args(values=[EXAMPLES / "monitoring.yaml"],
                            set_values={"monitoring.rules.loaderFreshnessP99Seconds": threshold}), check=False)
    assert p.returncode != 0 and "loaderFreshnessP99Seconds" in p.stderr, p.stderr


def test_the_freshness_threshold_bound_is_the_loaders_last_bucket():
    from tensortrace.loader.service import FRESHNESS_BUCKETS

    schema = json.loads((CHART / "values.schema.json").read_text())
    rule = schema["properties"]["monitoring"]["properties"]["rules"]["properties"]["loaderFreshnessP99Seconds"]
    assert rule["exclusiveMaximum"] == FRESHNESS_BUCKETS[-1]


# -- monitors ------------------------------------------------------------------------------------

def test_monitoring_is_off_by_default_and_one_switch_turns_it_all_on(monitored):
    assert not [d for d in render() if d["apiVersion"].startswith("monitoring.coreos.com")]
    assert not find(render(), "ConfigMap")
    kinds = sorted(d["kind"] for d in monitored if d["apiVersion"].startswith("monitoring.coreos.com"))
    assert kinds == ["PodMonitor", "PrometheusRule", "ServiceMonitor"]
    for d in monitored:
        if d["apiVersion"].startswith("monitoring.coreos.com"):
            assert d["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_the_monitors_select_every_metrics_port(monitored):
    pm = one(monitored, "PodMonitor")
    exporter = one(monitored, "DaemonSet", "exporter")
    assert pm["spec"]["selector"]["matchLabels"].items() <= exporter["spec"]["template"]["metadata"]["labels"].items()
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] == "http"
    sm = one(monitored, "ServiceMonitor")
    sel = sm["spec"]["selector"]["matchLabels"]
    scraped = {s["metadata"]["labels"]["app.kubernetes.io/component"] for s in find(monitored, "Service")
               if sel.items() <= s["metadata"]["labels"].items()}
    assert scraped == {"loader", "probes"}   # embedded ClickHouse: the loader also carries the bridge's metrics
    for s in find(monitored, "Service"):
        if s["metadata"]["labels"]["app.kubernetes.io/component"] in scraped:
            assert "http" in {p["name"] for p in s["spec"]["ports"]}
    server = render(values=[EXAMPLES / "kafka-sasl-ssl.yaml", EXAMPLES / "monitoring.yaml"])
    scraped = {s["metadata"]["labels"]["app.kubernetes.io/component"] for s in find(server, "Service")
               if sel.items() <= s["metadata"]["labels"].items()}
    assert scraped == {"loader", "query", "bridge", "probes"}


# -- dashboards ------------------------------------------------------------------------------------

def test_dashboards_ship_as_configmaps_with_the_sidecar_label(monitored):
    cms = find(monitored, "ConfigMap")
    assert len(cms) == 2
    for cm in cms:
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert cm["metadata"]["annotations"] == {"grafana_folder": "TensorTrace"}


def _variables_used(node) -> set[str]:
    text = json.dumps(node)
    return set(re.findall(r"\$\{(\w+)(?::\w+)?\}", text)) | set(re.findall(r"\$(\w+)", text))


def test_dashboards_parse_and_use_only_the_datasource_variables_they_declare(dashboards):
    assert set(dashboards) == {"tensortrace-capture.json", "tensortrace-pipeline.json"}
    for key, d in dashboards.items():
        declared = {v["name"]: v for v in d["templating"]["list"]}
        ds_vars = {n for n, v in declared.items() if v["type"] == "datasource"}
        assert "datasource" in ds_vars, key
        used_ds = set()
        ids = [p["id"] for p in d["panels"]]
        assert len(ids) == len(set(ids)), f"{key}: duplicate panel ids"
        for p in d["panels"]:
            if p["type"] == "row":
                continue
            uid = p["datasource"]["uid"]
            m = re.fullmatch(r"\$\{(\w+)\}", uid)
            assert m and m.group(1) in ds_vars, f"{key}: panel {p['title']!r} uses datasource {uid}"
            used_ds.add(m.group(1))
            assert p["targets"], f"{key}: {p['title']} has no query"
            for t in p["targets"]:
                assert t["datasource"]["uid"] == uid, f"{key}: {p['title']}"
                kind = declared[m.group(1)]["query"]
                assert ("expr" in t) == (kind == "prometheus") and ("rawSql" in t) == (kind != "prometheus")
            for v in _variables_used(p["targets"]) - {"__rate_interval", "__interval", "__range", "__timeFilter",
                                                      "1", "__url_time_range", "__value"}:
                assert v in declared, f"{key}: {p['title']} uses ${v}, not declared"
        assert used_ds == ds_vars, f"{key}: declared datasources {ds_vars}, used {used_ds}"
        for v in declared.values():   # query variables read through the declared Prometheus datasource
            if v["type"] == "query":
                assert v["datasource"]["uid"] == "${datasource}"


def test_the_slowest_requests_panel_links_to_tensortrace_trace(dashboards):
    d = dashboards["tensortrace-pipeline.json"]
    panel = [p for p in d["panels"] if p["title"].startswith("Slowest requests")][0]
    sql = panel["targets"][0]["rawSql"]
    assert "concat('tensortrace trace ', lower(hex(trace_id))) AS command" in sql
    assert "ORDER BY duration_ms DESC" in sql and "${database}.requests" in sql


def test_the_slowest_requests_query_runs_on_the_loaders_schema(dashboards, tmp_path):
    """The dashboard's ClickHouse SQL against a real engine (chDB, in a process of its own) with the
    loader's migrations applied."""
    d = dashboards["tensortrace-pipeline.json"]
    sqls = [t["rawSql"] for p in d["panels"] for t in p.get("targets", []) if "rawSql" in t]
    code = "\n".join([
        "import sys, clickhouse_connect",
        "from tensortrace.storage import schema",
        f"c = clickhouse_connect.get_client(dsn='chdb://{tmp_path}/ch')",
        "schema.apply_migrations(c, 'tensortrace')",
        "for sql in sys.argv[1:]:",
        "    sql = sql.replace('${database}', 'tensortrace').replace('$__timeFilter(end_time)', 'end_time > now() - 3600')"
        ".replace('$__timeFilter(load_time)', 'load_time > now() - 3600')",
        "    c.query(sql)",
        "print('ok', len(sys.argv) - 1)",
    ])
    p = subprocess.run([sys.executable, "-c", code, *sqls], capture_output=True, text=True, timeout=240)
    assert p.returncode == 0 and p.stdout.strip() == f"ok {len(sqls)}", p.stderr[-3000:]


def test_the_dashboards_are_what_generate_py_makes():
    spec = importlib.util.spec_from_file_location("generate", CHART / "dashboards" / "generate.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    for name, d in gen.DASHBOARDS.items():
        assert (CHART / "dashboards" / f"{name}.json").read_text() == gen.render(d), \
            f"dashboards/{name}.json is stale: run python charts/tensortrace/dashboards/generate.py"
