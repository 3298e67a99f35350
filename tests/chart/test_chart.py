"""The Helm chart, rendered by real helm (`make helm`: a pinned v3 release built from the Go module
proxy), for the default values and every example values file:

  * `helm lint --strict` passes, and every manifest is valid against the Kubernetes schemas
    (kubernetes-validate, offline) — the Prometheus Operator kinds against their required shape;
  * every number renders as an integer (a large value from values.yaml would otherwise print as
    1.048576e+06 and crash-loop the pod), checked with values far above a million;
  * every TensorTrace container starts with flags its service's real parser and validation accept
    (`tensortrace <service> --help`), its ports and probes are the ones that configuration listens
    on, and the chart's default ports are the services' own;
  * the restricted Pod Security profile holds for every container but the ring hostPath and the
    init container that prepares it; the exporter's grace period covers its drain;
  * values.schema.json refuses bad values, and configurations that cannot run fail with a reason
    (`chdb://` with more than one loader, SASL without its Secret, ...).

The render-and-run test (test_render_run*.py) starts what the default install renders.
"""

from __future__ import annotations

import json
import re

import kubernetes_validate
import pytest
import yaml

from helmchart import (CHART, EXAMPLES, FIXTURES, KUBE_VERSION, NAMESPACE, RELEASE, command_line, container_env,
                       containers, find, helm, one, pod_spec, render, render_error, render_text, with_security)
from tensortrace import cli
from tensortrace.service.config import ConfigError

pytestmark = pytest.mark.unit

EXAMPLE_FILES = sorted(EXAMPLES.glob("*.yaml"))
BIG_NUMBERS = FIXTURES / "big-numbers.yaml"
# Values under which every template renders (each example, plus everything on at once).
VARIANTS = {"default": []} | {f.stem: [f] for f in EXAMPLE_FILES} | {
    "everything-on": [EXAMPLES / "kafka-sasl-ssl.yaml", EXAMPLES / "monitoring.yaml", FIXTURES / "everything-on.yaml"],
    "big-numbers": [BIG_NUMBERS],
}
SERVICES = ("exporter", "loader", "query-server", "bridge", "probes")
# Files the chart mounts from Secrets the user creates: absent here, so the services' "is not a
# readable file" problems about exactly these paths are expected outside a cluster.
MOUNTED_SECRET_DIRS = ("/etc/tensortrace/kafka-ca/", "/etc/tensortrace/kafka-client/")
# The server certificate and the tokens Secret: the services read them at start (a key that is not
# the certificate's, a malformed token line fail there), so they are made here, real (a CA, a server
# certificate, a tokens file: tests/security/security_pki.py), and the rendered paths point at them.
SECURITY_MOUNTS = ("/etc/tensortrace/tls/", "/etc/tensortrace/tokens/", "/etc/tensortrace/kafka-ca/",
                   "/etc/tensortrace/kafka-client/")
_SECRETS_DIR: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def mounted_security_secrets(tmp_path_factory):
    import sys

    from helmchart import ROOT

    sys.path.insert(0, str(ROOT / "tests" / "security"))
    try:
        import security_pki
    finally:
        sys.path.pop(0)
    d = tmp_path_factory.mktemp("secrets")
    (d / "tls").mkdir()
    (d / "tokens").mkdir()
    ca = security_pki.Issuer.ca("tensortrace-test-ca")
    cert, key = ca.issue("tensortrace-server", server=True)
    (d / "tls" / "tls.crt").write_bytes(cert)
    (d / "tls" / "tls.key").write_bytes(key)
    (d / "tls" / "ca.crt").write_bytes(ca.pem)
    (d / "tokens" / "tokens").write_text(security_pki.TOKENS)
    # the Kafka client's CA and certificate (kafka.tls.*): the same CA stands in for the brokers'
    (d / "kafka-ca").mkdir()
    (d / "kafka-ca" / "ca.crt").write_bytes(ca.pem)
    (d / "kafka-client").mkdir()
    cert, key = ca.issue("tensortrace-kafka-client", server=False)
    (d / "kafka-client" / "tls.crt").write_bytes(cert)
    (d / "kafka-client" / "tls.key").write_bytes(key)
    _SECRETS_DIR[:] = [str(d)]
    yield d
    _SECRETS_DIR.clear()


def _local_secret_paths(arg: str) -> str:
    for m in SECURITY_MOUNTS:
        arg = arg.replace(m, f"{_SECRETS_DIR[0]}/{m.rstrip('/').rsplit('/', 1)[1]}/")
    return arg


@pytest.fixture(scope="module")
def rendered():
    return {name: render(values) for name, values in VARIANTS.items()}


def test_there_are_example_values_for_each_documented_setup():
    assert {f.stem for f in EXAMPLE_FILES} >= {"nonroot-sglang", "kafka-sasl-ssl", "monitoring", "embedded-clickhouse"}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_helm_lint_strict_passes(variant):
    args = ["lint", "--strict", str(CHART)]
    for v in with_security(VARIANTS[variant]):
        args += ["-f", str(v)]
    out = helm(*args).stdout
    assert "0 chart(s) failed" in out, out


# -- Kubernetes schemas -----------------------------------------------------------------------------

# The Prometheus Operator's and cert-manager's kinds have no schema in kubernetes-validate: the
# fields the operator requires, checked by hand (monitoring.coreos.com/v1, cert-manager.io/v1).
def _check_monitoring_kind(doc: dict) -> list[str]:
    problems, spec, kind = [], doc.get("spec") or {}, doc["kind"]
    if kind == "ServiceMonitor":
        problems += [] if spec.get("selector", {}).get("matchLabels") else ["spec.selector.matchLabels missing"]
        problems += [f"endpoint {e} has no port" for e in spec.get("endpoints") or [{}] if not e.get("port")]
    elif kind == "PodMonitor":
        problems += [] if spec.get("selector", {}).get("matchLabels") else ["spec.selector.matchLabels missing"]
        problems += [f"endpoint {e} has no port" for e in spec.get("podMetricsEndpoints") or [{}] if not e.get("port")]
    elif kind == "Certificate":   # cert-manager.io/v1: what cert-manager needs to issue it
        problems += [] if spec.get("secretName") else ["spec.secretName missing"]
        problems += [] if (spec.get("issuerRef") or {}).get("name") else ["spec.issuerRef.name missing"]
        problems += [] if spec.get("dnsNames") else ["spec.dnsNames missing"]
        problems += [f"{k} {spec[k]!r} is not a Go duration" for k in ("duration", "renewBefore")
                     if k in spec and not re.fullmatch(r"([0-9]+(\.[0-9]+)?(h|m|s))+", spec[k])]
    elif kind == "PrometheusRule":
        for g in spec.get("groups") or [{}]:
            if not g.get("name") or not g.get("rules"):
                problems.append(f"group {g.get('name')} without a name or rules")
            for r in g.get("rules", []):
                if not isinstance(r.get("expr"), str) or not (r.get("alert") or r.get("record")):
                    problems.append(f"rule {r} needs expr and alert (or record)")
                if "for" in r and not re.fullmatch(r"[0-9]+(ms|s|m|h|d)", r["for"]):
                    problems.append(f"rule {r['alert']}: for {r['for']!r} is not a duration")
    else:
        problems.append(f"unexpected kind {kind}")
    for k in ("interval", "scrapeTimeout"):
        for e in spec.get("endpoints", []) + spec.get("podMetricsEndpoints", []):
            if k in e and not re.fullmatch(r"[0-9]+(ms|s|m|h)", e[k]):
                problems.append(f"{k} {e[k]!r} is not a duration")
    return problems


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_manifest_is_valid_against_the_kubernetes_schemas(rendered, variant):
    checked = 0
    for doc in rendered[variant]:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        assert doc["metadata"].get("namespace") in (None, NAMESPACE), where
        if doc["apiVersion"] in ("monitoring.coreos.com/v1", "cert-manager.io/v1"):
            assert _check_monitoring_kind(doc) == [], where
            continue
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{variant}: {where}: {e.message} at {'.'.join(map(str, e.path))}")
        checked += 1
    assert checked >= 5


def test_names_fit_and_are_unique(rendered):
    for variant, docs in rendered.items():
        keys = [(d["kind"], d["metadata"]["name"]) for d in docs]
        assert len(keys) == len(set(keys)), f"{variant}: duplicate objects"
        for _, name in keys:
            assert len(name) <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name), name


# -- integers ---------------------------------------------------------------------------------------

_FLOAT = re.compile(r"(?<![\w.])[0-9]+(\.[0-9]+)?e[+-]?[0-9]+(?![\w.])")


def float_renderings(text: str) -> list[str]:
    """Numbers Go printed in exponent form (what helm makes of a large float64 without int64)."""
    return [m.group(0) for m in _FLOAT.finditer(text)]


def test_a_number_from_values_renders_as_a_float_without_int64(tmp_path):
    """The premise, with helm itself: `{{ .Values.batch }}` of 1048576 prints 1.048576e+06 (the bug that
    crash-looped every exporter), `{{ int64 .Values.batch }}` prints 1048576."""
    chart = tmp_path / "floaty"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: floaty\nversion: 0.1.0\n")
    (chart / "values.yaml").write_text("batch: 1048576\nuid: 1000680000\n")
    (chart / "templates" / "cm.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n"
        "data: {bad: \"--batch-size={{ .Values.batch }}\", uid: \"{{ .Values.uid }}\", good: \"--batch-size={{ int64 .Values.batch }}\"}\n")
    text = render_text(chart=chart)
    assert float_renderings(text) == ["1.048576e+06", "1.00068e+09"], text
    assert "--batch-size=1048576" in text


def test_every_number_renders_as_an_integer_even_when_large(rendered):
    values = yaml.safe_load(BIG_NUMBERS.read_text())
    assert values["exporter"]["batchSizeBytes"] >= 1_000_000 and values["rings"]["ownerUids"][0] >= 1_000_000_000
    for name, vals in VARIANTS.items():
        text = render_text(vals)
        assert float_renderings(text) == [], f"{name}: numbers rendered as floats"
    docs = rendered["big-numbers"]
    exporter = one(docs, "DaemonSet", "exporter")
    argv = command_line(pod_spec(exporter)["containers"][0])
    assert "--batch-size=1048576" in argv
    assert "--ring-owner-uids=1000680002" in argv
    assert f"--ring-group={values['rings']['groupId']}" in argv
    assert pod_spec(exporter)["securityContext"]["supplementalGroups"] == [values["rings"]["groupId"]]
    loader = pod_spec(one(docs, "Deployment", "loader"))["containers"][0]
    assert "--batch-max-bytes=1073741824" in loader["args"]


def _walk_numbers(node, path=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk_numbers(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk_numbers(v, f"{path}[{i}]")
    elif isinstance(node, float):
        yield path, node


def test_no_manifest_field_is_a_float(rendered):
    for name, docs in rendered.items():
        for d in docs:
            floats = list(_walk_numbers(d))
            assert floats == [], f"{name}: {d['kind']}/{d['metadata']['name']}: {floats}"


# -- the services accept what the chart starts them with --------------------------------------------

def _service_config(c: dict, monkeypatch, strict: bool):
    """(service name, config, runtime) from the container's argv, parsed by the service's own parser
    and validated by its config, with the container's environment."""
    argv = command_line(c)
    assert argv[0] == "tensortrace", f"{c['name']}: not started through the tensortrace CLI: {argv}"
    name, args = argv[1], [_local_secret_paths(a) for a in argv[2:]]
    spec = cli.service_spec(name)
    for k, v in container_env(c).items():
        monkeypatch.setenv(k, v)
    try:
        cfg, runtime = spec.parse(args)
    except ConfigError as e:
        unexpected = [p for p in e.problems
                      if strict or not ("is not a readable file" in p and any(d in p for d in MOUNTED_SECRET_DIRS))]
        assert unexpected == [], f"{c['name']}: tensortrace {name} refuses its arguments: {unexpected}"
        return name, None, None
    except SystemExit as e:  # argparse: an unknown flag or a value of the wrong type
        pytest.fail(f"{c['name']}: tensortrace {name} exits {e.code} on {args}")
    return name, cfg, runtime


def _service_containers(docs):
    for w, c in containers(docs, init=False):
        if (c.get("command") or [None])[0] == "tensortrace":
            yield w, c


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_container_starts_with_flags_its_service_accepts(rendered, variant, monkeypatch):
    started = set()
    for w, c in _service_containers(rendered[variant]):
        name, _, _ = _service_config(c, monkeypatch, strict=False)
        started.add(name)
    assert "exporter" in started and "loader" in started


def test_the_default_install_validates_with_no_problem_at_all(rendered, monkeypatch):
    """What test_render_run starts: every service's config is valid as rendered."""
    names = []
    for w, c in _service_containers(rendered["default"]):
        name, cfg, runtime = _service_config(c, monkeypatch, strict=True)
        assert cfg is not None
        names.append(name)
    assert sorted(names) == ["exporter", "loader"], names


def _ports(c):
    return {p["name"]: p["containerPort"] for p in c.get("ports", [])}


def _listen_ports(cfg, runtime) -> dict[str, int]:
    ports = {"http": runtime.http_port}
    if hasattr(cfg, "listen_ports"):
        ports.update({k: v for k, v in cfg.listen_ports().items() if v >= 0})
    if getattr(cfg, "otlp_receiver_port", -1) >= 0 and hasattr(cfg, "receives_spans"):
        ports["otlp"] = cfg.otlp_receiver_port
    return ports


@pytest.mark.parametrize("variant", ["default", "kafka-sasl-ssl", "everything-on", "big-numbers"])
def test_container_ports_and_probes_are_the_ones_the_service_listens_on(rendered, variant, monkeypatch):
    for w, c in _service_containers(rendered[variant]):
        name, cfg, runtime = _service_config(c, monkeypatch, strict=False)
        if cfg is None:
            continue
        listens = _listen_ports(cfg, runtime)
        declared = _ports(c)
        assert declared == {k: v for k, v in listens.items() if k in declared} and set(declared) == set(listens), \
            f"{name}: containerPorts {declared}, the service listens on {listens}"
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            assert c[probe]["httpGet"] == {"path": path, "port": "http"}, f"{name} {probe}"
        annotations = w["spec"]["template"]["metadata"].get("annotations", {})
        assert annotations.get("prometheus.io/port") == str(declared["http"]), name
        # the control port is the pod's loopback unless hostPort publishes it
        if name == "exporter":
            assert cfg.control_host == "127.0.0.1" and "hostPort" not in c["ports"][1]


def test_the_charts_default_ports_are_the_services_own(rendered, monkeypatch):
    from tensortrace.bridge.config import BridgeConfig
    from tensortrace.exporter.config import ExporterConfig
    from tensortrace.query.config import QueryServerConfig

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    http = {svc: cli.service_spec(svc).http_port for svc in SERVICES}
    assert values["exporter"]["metricsPort"] == http["exporter"] == 9464
    assert values["loader"]["metricsPort"] == http["loader"] == 9465
    assert values["query"]["metricsPort"] == http["query-server"] == 9466
    assert values["bridge"]["metricsPort"] == http["bridge"] == 9467
    assert values["probes"]["metricsPort"] == http["probes"] == 9468
    assert values["exporter"]["control"]["port"] == ExporterConfig().control_port == 50051
    assert values["query"]["port"] == QueryServerConfig().query_port == 50052
    assert values["bridge"]["otlpReceiverPort"] == BridgeConfig().otlp_receiver_port == 4317
    assert values["exporter"]["drainTimeoutSeconds"] <= ExporterConfig().delivery_timeout_ms / 1000


def test_exporter_with_control_on_the_host_port_is_reachable_at_node_ip(monkeypatch):
    docs = render(set_values={"exporter.control.hostPort": True})
    c = pod_spec(one(docs, "DaemonSet", "exporter"))["containers"][0]
    _, cfg, _ = _service_config(c, monkeypatch, strict=True)
    assert cfg.control_host == "0.0.0.0"
    control = [p for p in c["ports"] if p["name"] == "control"][0]
    assert control["hostPort"] == control["containerPort"] == cfg.control_port


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_services_target_named_ports_of_the_pods_they_select(rendered, variant):
    docs = rendered[variant]
    workloads = [d for d in docs if d["kind"] in ("Deployment", "DaemonSet")]
    for svc in find(docs, "Service"):
        sel = svc["spec"]["selector"]
        pods = [w for w in workloads if sel.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert pods, f"Service {svc['metadata']['name']} selects no pod"
        for p in svc["spec"]["ports"]:
            for w in pods:
                names = {cp["name"] for c in pod_spec(w)["containers"] for cp in c.get("ports", [])}
                assert p["targetPort"] in names, f"{svc['metadata']['name']}: {p['targetPort']} not on {w['metadata']['name']}"
    for pdb in find(docs, "PodDisruptionBudget"):
        sel = pdb["spec"]["selector"]["matchLabels"]
        assert any(sel.items() <= w["spec"]["template"]["metadata"]["labels"].items() for w in workloads)


# -- layout ------------------------------------------------------------------------------------------

def test_default_install_embeds_clickhouse_in_one_loader_that_serves_reads_and_the_bridge(rendered):
    docs = rendered["default"]
    assert sorted((d["kind"], d["metadata"]["labels"]["app.kubernetes.io/component"])
                  for d in docs if d["kind"] in ("Deployment", "DaemonSet")) == [("DaemonSet", "exporter"), ("Deployment", "loader")]
    loader = one(docs, "Deployment", "loader")
    assert loader["spec"]["replicas"] == 1 and loader["spec"]["strategy"] == {"type": "Recreate"}
    args = pod_spec(loader)["containers"][0]["args"]
    assert "--clickhouse-dsn=chdb:///var/lib/tensortrace/chdb" in args and "--bridge" in args
    assert "--query-host=0.0.0.0" in args and "--bridge-otlp-receiver-host=0.0.0.0" in args
    pvc = one(docs, "PersistentVolumeClaim")
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    mounts = {m["name"]: m["mountPath"] for m in pod_spec(loader)["containers"][0]["volumeMounts"]}
    assert mounts["data"] == "/var/lib/tensortrace"
    assert one(docs, "Service", "query")["spec"]["selector"]["app.kubernetes.io/component"] == "loader"
    assert one(docs, "Service", "bridge")["spec"]["selector"]["app.kubernetes.io/component"] == "loader"


def test_a_clickhouse_server_gets_query_and_bridge_deployments_and_many_loaders(rendered):
    docs = rendered["kafka-sasl-ssl"]
    assert one(docs, "Deployment", "loader")["spec"]["replicas"] == 3
    assert "strategy" not in one(docs, "Deployment", "loader")["spec"]
    assert not find(docs, "PersistentVolumeClaim")
    loader_args = pod_spec(one(docs, "Deployment", "loader"))["containers"][0]["args"]
    assert not any(a.startswith(("--query-port", "--bridge")) for a in loader_args)
    query = one(docs, "Deployment", "query")
    assert one(docs, "Service", "query")["spec"]["selector"]["app.kubernetes.io/component"] == "query"
    assert "--clickhouse-dsn=https://clickhouse.db.svc:8443" in pod_spec(query)["containers"][0]["args"]
    bridge = pod_spec(one(docs, "Deployment", "bridge"))["containers"][0]["args"]
    assert "--otlp-endpoint=otel-collector.observability.svc:4317" in bridge
    assert one(docs, "Deployment", "probes")
    assert {d["metadata"]["labels"]["app.kubernetes.io/component"] for d in find(docs, "PodDisruptionBudget")} == \
        {"loader", "query", "bridge", "probes"}


def test_kafka_sasl_ssl_and_clickhouse_credentials_come_from_the_named_secrets(rendered):
    docs = rendered["kafka-sasl-ssl"]
    consumers = 0
    for w, c in _service_containers(docs):
        if c["name"] == "query":
            continue   # reads ClickHouse only (below)
        env = {e["name"]: e for e in c["env"]}
        assert env["TENSORTRACE_KAFKA_SASL_PASSWORD"]["valueFrom"]["secretKeyRef"] == \
            {"name": "tensortrace-kafka", "key": "password"}, c["name"]
        args = c["args"]
        assert "--kafka-security-protocol=SASL_SSL" in args and "--kafka-sasl-mechanism=SCRAM-SHA-512" in args
        assert "--kafka-ssl-cafile=/etc/tensortrace/kafka-ca/ca.crt" in args
        assert not any("password" in a.lower() and "=" in a and "file" not in a for a in args), "a secret on the command line"
        vols = {v["name"]: v for v in pod_spec(w)["volumes"]}
        assert vols["kafka-ca"]["secret"]["secretName"] == "tensortrace-kafka-ca"
        if c["name"] in ("loader", "bridge"):
            consumers += 1
            assert env["CLICKHOUSE_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "tensortrace-clickhouse", "key": "password"}
            assert env["CLICKHOUSE_USER"]["valueFrom"]["secretKeyRef"]["optional"] is True
        else:
            assert "CLICKHOUSE_PASSWORD" not in env
    assert consumers == 2   # loader and bridge read Kafka; the query service reads ClickHouse only
    q = pod_spec(one(docs, "Deployment", "query"))["containers"][0]
    assert {e["name"] for e in q["env"]} >= {"CLICKHOUSE_USER", "CLICKHOUSE_PASSWORD"}
    assert pod_spec(one(docs, "DaemonSet", "exporter"))["imagePullSecrets"] == [{"name": "registry-credentials"}]


def test_extra_env_volumes_affinity_and_pull_secrets_reach_the_pods(rendered):
    docs = rendered["everything-on"]
    for w in docs:
        if w["kind"] not in ("Deployment", "DaemonSet"):
            continue
        comp = w["metadata"]["labels"]["app.kubernetes.io/component"]
        spec = pod_spec(w)
        assert spec["imagePullSecrets"] == [{"name": "registry-credentials"}], comp
        if comp == "sglang":
            continue
        c = spec["containers"][0]
        assert {"name": "EXTRA", "value": comp} in c["env"], comp
        assert {"name": "extra", "mountPath": "/extra"} in c["volumeMounts"], comp
        assert {"name": "extra", "emptyDir": {}} in spec["volumes"], comp
        assert spec["affinity"]["nodeAffinity"], comp
        assert f"--log-level=DEBUG" in c["args"], comp


# -- security ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_containers_meet_the_restricted_profile_but_the_ring_hostpath(rendered, variant):
    for w, c in containers(rendered[variant]):
        comp = w["metadata"]["labels"]["app.kubernetes.io/component"]
        if comp == "sglang":
            continue   # the user's inference server: checked in test_sglang_capture.py
        sc, pod = c.get("securityContext", {}), pod_spec(w).get("securityContext", {})
        assert sc.get("allowPrivilegeEscalation") is False, c["name"]
        assert sc.get("readOnlyRootFilesystem") is True, c["name"]
        assert (sc.get("seccompProfile") or pod.get("seccompProfile")) == {"type": "RuntimeDefault"}, c["name"]
        assert "ALL" in sc["capabilities"]["drop"], c["name"]
        if c["name"] == "prepare-ring-dir":
            # the one root step: chown/chmod of the hostPath, nothing else
            assert sc["runAsUser"] == 0 and sorted(sc["capabilities"]["add"]) == ["CHOWN", "FOWNER", "FSETID"]
            continue
        assert "add" not in sc.get("capabilities", {}), c["name"]
        assert sc.get("runAsNonRoot") is True and pod["runAsNonRoot"] is True and pod["runAsUser"] > 0, c["name"]
    for w in rendered[variant]:
        if w["kind"] in ("Deployment", "DaemonSet"):
            spec = pod_spec(w)
            host = [v["name"] for v in spec.get("volumes", []) if "hostPath" in v]
            comp = w["metadata"]["labels"]["app.kubernetes.io/component"]
            assert host == (["rings"] if comp == "exporter" else ["tensortrace-rings"] if comp == "sglang" else []), comp
            assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC"), comp
            assert spec.get("automountServiceAccountToken") in (False, None) or comp == "sglang", comp


def test_exporter_runs_as_its_uid_in_the_ring_group_and_prepares_the_ring_dir(rendered, monkeypatch):
    from tensortrace.ring.ringdir import _parser as ring_dir_parser

    docs = rendered["default"]
    ds = one(docs, "DaemonSet", "exporter")
    spec = pod_spec(ds)
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    gid, ring_dir = values["rings"]["groupId"], values["rings"]["hostPath"]
    assert spec["securityContext"]["runAsUser"] == 10001 and spec["securityContext"]["supplementalGroups"] == [gid]
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    init = spec["initContainers"][0]
    argv = command_line(init)
    assert argv[:3] == ["tensortrace", "ring-dir", "prepare"]
    ns = ring_dir_parser().parse_args(argv[2:])
    assert (ns.path, ns.gid, ns.mode) == (ring_dir, gid, 0o2770)
    mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    assert mounts["rings"] == ring_dir
    assert {v["name"]: v for v in spec["volumes"]}["rings"]["hostPath"] == {"path": ring_dir, "type": "DirectoryOrCreate"}
    _, cfg, runtime = _service_config(spec["containers"][0], monkeypatch, strict=True)
    assert cfg.ring_dir == ring_dir and cfg.ring_group == gid and cfg.node == "node-a"
    # SIGTERM -> drain -> exit before the SIGKILL
    assert spec["terminationGracePeriodSeconds"] > runtime.drain_timeout_s
    loader = pod_spec(one(docs, "Deployment", "loader"))
    _, _, lrt = _service_config(loader["containers"][0], monkeypatch, strict=True)
    assert loader["terminationGracePeriodSeconds"] > lrt.drain_timeout_s


def test_exporter_pushes_the_capture_values_to_every_ring_as_a_valid_control_document(rendered, monkeypatch):
    from tensortrace.agent.selection import Selection

    c = pod_spec(one(rendered["default"], "DaemonSet", "exporter"))["containers"][0]
    _, cfg, _ = _service_config(c, monkeypatch, strict=True)
    sel = Selection.from_doc(cfg.default_control)
    assert sel.enabled and sel.wants("resid_pre", 0)
    docs = render(set_values={"capture.selection": {"preset": "logits", "sample": {"rate": 0.25}}, "capture.enabled": False})
    c = pod_spec(one(docs, "DaemonSet", "exporter"))["containers"][0]
    _, cfg, _ = _service_config(c, monkeypatch, strict=True)
    sel = Selection.from_doc(cfg.default_control)
    assert not sel.enabled and sel.sample_rate == 0.25 and not sel.wants("resid_pre", 0)
    docs = render(set_values={"capture.setDefault": False})
    c = pod_spec(one(docs, "DaemonSet", "exporter"))["containers"][0]
    assert not any(a.startswith("--default-control") for a in c["args"])


# -- refusals ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("values, complaint", [
    ({"exporter.metricsPort": "9464"}, "/exporter/metricsPort"),
    ({"exporter.batchSizeBytes": 2000000}, "/exporter/batchSizeBytes"),
    ({"loader.replicas": 1.5}, "/loader/replicas"),
    ({"loader.ttlDays": 0}, "/loader/ttlDays"),
    ({"rings.groupId": 0}, "/rings/groupId"),
    ({"rings.ownerUids": [-1]}, "/rings/ownerUids"),
    ({"kafka.securityProtocol": "SASL_TLS"}, "/kafka/securityProtocol"),
    ({"kafka.bootstrapServers": "kafka"}, "/kafka/bootstrapServers"),
    ({"clickhouse.dsn": "mysql://db"}, "/clickhouse/dsn"),
    ({"exporter.compression": "snappy"}, "/exporter/compression"),
    ({"exporter.podSecurityContext.runAsUser": 0}, "/exporter/podSecurityContext/runAsUser"),
    ({"loader.replcas": 2}, "replcas"),
    ({"monitoring.interval": "30"}, "/monitoring/interval"),
])
def test_the_values_schema_refuses_bad_values(values, complaint):
    err = render_error(set_values=values)
    assert "values don't meet the specifications of the schema" in err and complaint in err, err


@pytest.mark.parametrize("values, complaint", [
    ({"loader.replicas": 2}, "loader.replicas=2 with clickhouse.dsn=chdb:///var/lib/tensortrace/chdb"),
    ({"clickhouse.dsn": "chdb://memory"}, "keeps nothing across a restart"),
    ({"kafka.securityProtocol": "SASL_SSL"}, "needs kafka.sasl.mechanism, kafka.sasl.username and kafka.sasl.existingSecret"),
    ({"kafka.sasl.mechanism": "PLAIN"}, "uses no SASL"),
    ({"kafka.tls.caSecret": "ca"}, "uses no TLS"),
    ({"bridge.otlpEndpoint": "collector:4317"}, "bridge.otlpEndpoint needs a ClickHouse server"),
    ({"clickhouse.dsn": "http://ch:8123", "bridge.writeClickhouse": False}, "needs a destination for the spans"),
])
def test_configurations_that_cannot_run_fail_with_the_reason(values, complaint):
    err = render_error(set_values=values)
    assert complaint in err, err


def test_more_than_one_loader_is_fine_with_a_clickhouse_server():
    docs = render(set_values={"clickhouse.dsn": "http://clickhouse:8123", "loader.replicas": 4})
    assert one(docs, "Deployment", "loader")["spec"]["replicas"] == 4


# -- NOTES --------------------------------------------------------------------------------------------

def _notes(tmp_path, values=(), set_values=None, secure: bool = True) -> str:
    """NOTES.txt as helm renders it (helm template does not print NOTES: a copy of the chart renders
    it as a string inside a manifest)."""
    import shutil

    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    notes = (chart / "templates" / "NOTES.txt").read_text()
    (chart / "templates" / "NOTES.txt").unlink()
    (chart / "templates" / "_notes.tpl").write_text('{{- define "test.notes" -}}\n' + notes + "{{- end -}}\n")
    (chart / "templates" / "notes.yaml").write_text('notes: {{ include "test.notes" . | toJson }}\n')
    text = render_text(values, set_values, chart=chart, secure=secure)
    return [d for d in yaml.safe_load_all(text) if d and "notes" in d][0]["notes"]


def test_notes_say_exactly_what_to_do_next(tmp_path):
    notes = _notes(tmp_path)
    svc = f"{RELEASE}-tensortrace"
    assert f"kubectl -n {NAMESPACE} get pods -l app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component=exporter" in notes
    assert "kubectl label namespace ml pod-security.kubernetes.io/enforce=privileged" in notes
    assert "--patch-file deploy/sglang-capture/capture-patch.yaml" in notes
    assert "--field-selector spec.nodeName=<node>" in notes and "tensortrace exporterctl --address 127.0.0.1:50051 status" in notes
    assert f"port-forward svc/{svc}-query 50052" in notes and "tensortrace show <trace-id> --server 127.0.0.1:50052" in notes
    assert "tensortrace trace <trace-id> --server 127.0.0.1:50052" in notes   # works on embedded chDB too
    assert f"--otlp-traces-endpoint {svc}-bridge.{NAMESPACE}:4317" in notes
    assert "--set monitoring.enabled=true" in notes
    assert "{{" not in notes and "<no value>" not in notes
    notes = _notes(tmp_path / "b", [EXAMPLES / "nonroot-sglang.yaml"], {"exporter.control.hostPort": True})
    assert f"port-forward svc/{svc}-sglang 30000" in notes and "patch-file" not in notes
    assert "tensortrace exporterctl --address <node-ip>:50051 status" in notes
    notes = _notes(tmp_path / "c", [EXAMPLES / "kafka-sasl-ssl.yaml", EXAMPLES / "monitoring.yaml"])
    assert "tensortrace trace <trace-id> --server 127.0.0.1:50052" in notes
    assert "PrometheusRule" in notes and "grafana_dashboard=1" in notes


# -- rings.ownerUids: only the uid the exporter runs as --------------------------------------------

# An agent (the real CaptureAgent, as the SGLang plugin builds it) writing an owner-only ring: no
# TENSORTRACE_RING_GID, so the ring is 0600.
_AGENT_0600 = """
import json, sys
from tensortrace.agent import AgentConfig, CaptureAgent
from tensortrace.testing.ringgen import TrafficGen
agent = CaptureAgent(AgentConfig(ring_dir=sys.argv[1], model_id="m", pod="pod-a", ring_capacity=1 << 20))
TrafficGen(agent.writer, n_requests=1, hooks=("resid_pre",), prefix="pod-a").run(steps=2)
print(json.dumps({"path": agent.ring_path}))
"""

# The exporter as the chart starts it (its argv through its own parser; the ring directory, Kafka
# and the control port replaced for a test): discovery, the permission check and the open.
_EXPORTER_SCAN = """
import json, logging, sys
logging.disable(logging.CRITICAL)
from tensortrace import cli
from tensortrace.exporter.service import Exporter
cfg, _ = cli.service_spec("exporter").parse(json.loads(sys.argv[1]))
exp = Exporter(cfg)
exp.scan()
print(json.dumps({"refused": sorted(exp.refused.values()), "rings": sorted(exp.rings)}))
"""


def _exporter_identity_and_args(docs, ring_dir: str):
    from tensortrace.testing.privileges import Identity

    spec = pod_spec(one(docs, "DaemonSet", "exporter"))
    sc = spec["securityContext"]
    argv = command_line(spec["containers"][0])[2:]
    args = [a for a in argv if not a.startswith(("--ring-dir=", "--kafka-bootstrap-servers=", "--control-port="))]
    args += [f"--ring-dir={ring_dir}", "--kafka-bootstrap-servers=127.0.0.1:9", "--control-port=-1"]
    return Identity(sc["runAsUser"], sc["runAsGroup"], tuple(sc["supplementalGroups"])), args


def _scan_a_0600_ring_of_uid_1000(docs) -> dict:
    import os
    import subprocess
    import sys

    from tensortrace.testing.privileges import Identity, run_python_as, shared_tmpdir

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    gid = values["rings"]["groupId"]
    with shared_tmpdir("tt-owner-") as d:
        ring_dir = os.path.join(d, "rings")
        os.mkdir(ring_dir)
        prep = subprocess.run([sys.executable, "-m", "tensortrace.cli", "ring-dir", "prepare", "--path", ring_dir,
                               "--gid", str(gid)], capture_output=True, text=True, timeout=60)
        assert prep.returncode == 0, prep.stderr
        # the pod's own subdirectory, as kubelet makes it for the subPathExpr mount: root, the ring dir's mode
        pod_dir = os.path.join(ring_dir, "default_pod-a")
        os.mkdir(pod_dir)
        os.chmod(pod_dir, os.stat(ring_dir).st_mode & 0o7777)
        env = {k: v for k, v in os.environ.items() if not k.startswith("TENSORTRACE_RING_")}
        agent = run_python_as(Identity(1000, 1000, (gid,)), _AGENT_0600, pod_dir, env=env)
        assert agent.returncode == 0, agent.stderr[-2000:]
        ring = json.loads(agent.stdout.strip().splitlines()[-1])["path"]
        st = os.stat(ring)
        assert (st.st_uid, st.st_mode & 0o777) == (1000, 0o600)
        ident, args = _exporter_identity_and_args(docs, ring_dir)
        scan = run_python_as(ident, _EXPORTER_SCAN, json.dumps(args))
        assert scan.returncode == 0, scan.stderr[-2000:]
        return json.loads(scan.stdout.strip().splitlines()[-1])


def test_owner_uids_the_exporter_does_not_run_as_read_nothing_and_the_notes_say_so(tmp_path):
    """uid 10001 cannot open a 0600 file of uid 1000, whatever --ring-owner-uids says."""
    from tensortrace.testing.privileges import can_switch_users

    foreign = {"rings.ownerUids": [1000]}
    argv = command_line(pod_spec(one(render(set_values=foreign), "DaemonSet", "exporter"))["containers"][0])
    assert "--ring-owner-uids=1000" in argv
    notes = " ".join(_notes(tmp_path, set_values=foreign).split())
    assert "WARNING: rings.ownerUids lists 1000, but the exporter runs as uid 10001" in notes
    assert "exporter.podSecurityContext.runAsUser" in notes and "TENSORTRACE_RING_GID=2000" in notes
    if not can_switch_users():
        pytest.skip("needs root to run the agent and the exporter as their uids")
    got = _scan_a_0600_ring_of_uid_1000(render(set_values=foreign))
    assert got["rings"] == [] and len(got["refused"]) == 1
    assert got["refused"][0].startswith("permission_denied: cannot open the ring read-write (Permission denied)")


def test_an_exporter_run_as_the_rings_uid_reads_its_0600_rings_without_owner_uids(tmp_path):
    as_1000 = {"exporter.podSecurityContext.runAsUser": 1000}
    docs = render(set_values=as_1000)
    spec = pod_spec(one(docs, "DaemonSet", "exporter"))
    assert spec["securityContext"]["runAsUser"] == 1000
    assert not [a for a in command_line(spec["containers"][0]) if a.startswith("--ring-owner-uids")]
    assert "WARNING" not in _notes(tmp_path, set_values=as_1000)
    assert "WARNING" not in _notes(tmp_path / "b", set_values={**as_1000, "rings.ownerUids": [1000]})
    assert "WARNING" not in _notes(tmp_path / "c")
    from tensortrace.testing.privileges import can_switch_users
    if not can_switch_users():
        pytest.skip("needs root to run the agent and the exporter as their uids")
    got = _scan_a_0600_ring_of_uid_1000(docs)
    assert got["refused"] == [] and len(got["rings"]) == 1


# -- images: the names docker/ builds ----------------------------------------------------------------

def _docs_build_commands() -> dict[str, str]:
    """{Dockerfile folder: image} from docs/operations.md's build commands, $REG and $V as written there."""
    from helmchart import ROOT

    text = (ROOT / "docs" / "operations.md").read_text()
    env = dict(re.findall(r"^(REG|V)=(\S+)", text, re.M))
    out = {}
    for folder, image in re.findall(r"^docker build \$ARGS -f docker/(\w+)/Dockerfile -t (\S+) \.$", text, re.M):
        out[folder] = image.replace("$REG", env["REG"]).replace("$V", env["V"])
        assert f"docker push {image}" in text, image
    return out


def test_the_charts_images_are_the_ones_docker_builds_and_the_docs_push():
    from helmchart import ROOT

    docs = render(set_values={"sglang.enabled": True})
    used = {c["name"]: c["image"] for _, c in containers(docs)}
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    expected = {"exporter": used["exporter"], "tensortrace": used["loader"], "sglang": used["sglang"]}
    assert used["prepare-ring-dir"] == used["exporter"]
    assert expected["exporter"] == f"ghcr.io/tensortrace/tensortrace-exporter:{chart['appVersion']}"
    assert expected["tensortrace"] == f"ghcr.io/tensortrace/tensortrace:{chart['appVersion']}"
    assert _docs_build_commands() == expected
    ops = (ROOT / "docs" / "operations.md").read_text()
    for folder, image in expected.items():
        repo, tag = image.rsplit(":", 1)
        dockerfile = (ROOT / "docker" / folder / "Dockerfile").read_text()
        assert f"-f docker/{folder}/Dockerfile -t {image} ." in dockerfile, folder   # its own build comment
        title = re.search(r'org\.opencontainers\.image\.title="([^"]+)"', dockerfile).group(1)
        assert title == repo.rsplit("/", 1)[1], folder
        assert f"| `{repo}` | `docker/{folder}/Dockerfile` |" in ops, folder
        if folder != "sglang":   # the consumers' and the exporter's version label is the chart's appVersion
            assert re.search(r"^ARG VERSION=(\S+)$", dockerfile, re.M).group(1) == tag == chart["appVersion"]
    # the SGLang image's tag is the SGLang inside it
    sglang = (ROOT / "docker" / "sglang" / "Dockerfile").read_text()
    assert re.search(r"^ARG SGLANG_IMAGE=\S+:v(\S+)$", sglang, re.M).group(1) == expected["sglang"].rsplit(":", 1)[1]


def test_the_quick_start_sglang_image_has_the_tracing_extra_enable_trace_needs():
    from helmchart import ROOT

    sglang = [c for _, c in containers(render(set_values={"sglang.enabled": True})) if c["name"] == "sglang"][0]
    assert "--enable-trace" in command_line(sglang)
    dockerfile = (ROOT / "docker" / "sglang" / "Dockerfile").read_text()
    run = " ".join(re.findall(r"^RUN (?:.*\\\n)*.*$", dockerfile, re.M))
    assert '"sglang[tracing]==$(python3 -c' in run   # SGLang's own extra, pinned to the installed SGLang
    assert "import tensortrace.agent.backends.sglang.plugin, opentelemetry.sdk.trace, " \
           "opentelemetry.exporter.otlp.proto.grpc.trace_exporter" in run   # checked at build time


# -- how helm gets here ---------------------------------------------------------------------------

def test_make_builds_the_pinned_helm_before_the_tests():
    from helmchart import HELM, HELM_VERSION, ROOT

    text = (ROOT / "Makefile").read_text()
    assert f"HELM_VERSION := {HELM_VERSION}" in text
    assert "go install helm.sh/helm/v3/cmd/helm@$(HELM_VERSION)" in text
    assert re.search(r"^test: .*\bhelm\b.*\bchart-tools\b", text, re.M)
    assert str(HELM).endswith(f".cache/helm/{HELM_VERSION}/bin/helm")
    assert helm("version", "--short").stdout.startswith(HELM_VERSION.rsplit(".", 1)[0])


def test_make_helm_without_go_says_so(tmp_path):
    import os
    import shutil
    import subprocess

    from helmchart import ROOT

    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    r = subprocess.run([make, "-s", "-C", str(ROOT), "helm", f"HELM={tmp_path}/helm/bin/helm"],
                       env={**os.environ, "PATH": str(bin_dir)}, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "error: go not found (need Go to build helm from the module proxy)" in r.stdout + r.stderr
