"""The chart secured by default (issue 15): TLS and bearer tokens on every gRPC endpoint, the
refusals when an install names no certificate source or no tokens, the plaintext development
opt-in, cert-manager Certificates for the names clients dial, NetworkPolicies that admit each port
only from the peers the values name, and Pod Security "restricted" for every pod but the documented
exceptions.

Every container's flags go through its service's own parser and validation with real files at the
paths the chart mounts (test_chart.py's `_service_config`: a CA, a server certificate, a tokens
file from tests/security/security_pki.py); test_render_run.py runs the rendered install with them.
"""

from __future__ import annotations

import pytest
import yaml

from helmchart import (CHART, EXAMPLES, FIXTURES, NAMESPACE, RELEASE, command_line, container_env, containers, find,
                       one, pod_spec, render, render_error)
from test_chart import VARIANTS, _service_config, _service_containers, mounted_security_secrets  # noqa: F401

pytestmark = pytest.mark.unit

TLS = "/etc/tensortrace/tls"
TOKENS = "/etc/tensortrace/tokens/tokens"
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())


@pytest.fixture(scope="module")
def rendered():
    return {name: render(values) for name, values in VARIANTS.items()}


def _endpoints(name: str, cfg) -> dict:
    """{endpoint: EndpointSecurity} a service's config serves (only those it starts)."""
    if name == "exporter":
        return {"control": cfg.control_security}
    if name == "query-server":
        return {"query": cfg.security}
    if name == "bridge":
        return {"otlp": cfg.otlp_receiver_security}
    if name == "loader":
        out = {}
        if cfg.query_port >= 0:
            out["query"] = cfg.query_security
        if getattr(cfg, "bridge", False) and cfg.bridge_otlp_receiver_port >= 0:
            out["otlp"] = cfg.bridge_otlp_receiver_security
        return out
    return {}


def _served(docs, monkeypatch) -> dict[tuple[str, str], object]:
    """{(service, endpoint): EndpointSecurity} of every gRPC endpoint the rendered install serves."""
    out = {}
    for _, c in _service_containers(docs):
        name, cfg, _ = _service_config(c, monkeypatch, strict=True)
        for ep, sec in _endpoints(name, cfg).items():
            out[(name, ep)] = sec
    return out


def _volumes(w) -> dict:
    return {v["name"]: v for v in pod_spec(w).get("volumes") or []}


# -- the secure default ---------------------------------------------------------------------------

def test_values_yaml_alone_is_refused_with_what_to_set():
    """No certificate source: `helm install` fails, saying which values give one."""
    err = render_error(secure=False)
    assert "security: TLS is on (the default) but there is no source of certificates" in err, err
    assert "security.tls.certManager.enabled=true" in err and "security.tls.existingSecret=" in err
    assert "security.plaintext=true" in err
    assert VALUES["security"]["plaintext"] is False


@pytest.mark.parametrize("values, complaint", [
    ({"security.tls.existingSecret": "tls"}, "security: TLS without tokens lets every pod"),
    ({"security.tls.certManager.enabled": True, "security.tokens.existingSecret": "t"},
     "security.tls.certManager.enabled=true needs security.tls.certManager.issuerRef.name"),
    ({"security.tls.certManager.enabled": True, "security.tls.certManager.issuerRef.name": "ca",
      "security.tls.existingSecret": "tls", "security.tokens.existingSecret": "t"},
     "both certManager.enabled and existingSecret are set"),
    ({"security.tls.existingSecret": "tls", "security.tokens.existingSecret": "t", "sglang.enabled": True},
     "whose OTLP receiver requires an ingest token: set security.ingestToken.existingSecret"),
])
def test_an_install_without_a_certificate_source_or_tokens_is_refused(values, complaint):
    err = render_error(set_values=values, secure=False)
    assert complaint in err, err


def test_every_grpc_endpoint_is_tls_with_tokens_and_the_otlp_receiver_plaintext_with_tokens(rendered, monkeypatch):
    served = _served(rendered["default"], monkeypatch)
    assert set(served) == {("exporter", "control"), ("loader", "query"), ("loader", "otlp")}, served
    for (svc, ep), sec in served.items():
        assert sec.token_file.endswith("/tokens/tokens"), (svc, ep)
        if ep == "otlp":
            # SGLang's span exporter is insecure=True: plaintext on the pod network, with a token
            assert sec.plaintext and sec.plaintext_any_address and not sec.tls, (svc, ep)
        else:
            assert sec.tls and not sec.plaintext and not sec.tls_client_ca, (svc, ep)
    # the exporter's control endpoint stays on the pod's loopback, TLS all the same (the audit names who)
    exporter = pod_spec(one(rendered["default"], "DaemonSet", "exporter"))["containers"][0]
    assert "--control-host=127.0.0.1" in exporter["args"]
    assert f"--control-tls-cert={TLS}/tls.crt" in exporter["args"] and f"--control-token-file={TOKENS}" in exporter["args"]


def test_the_secrets_are_mounted_where_the_flags_point(rendered):
    secure = yaml.safe_load((FIXTURES / "secure.yaml").read_text())["security"]
    for w, c in _service_containers(rendered["default"]):
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        vols = _volumes(w)
        args = " ".join(c["args"])
        if "-tls-cert=" in args:
            m = mounts[TLS]
            assert m["readOnly"] is True and vols[m["name"]]["secret"]["secretName"] == secure["tls"]["existingSecret"]
        m = mounts["/etc/tensortrace/tokens"]
        assert m["readOnly"] is True
        assert vols[m["name"]]["secret"] == {"secretName": secure["tokens"]["existingSecret"],
                                             "items": [{"key": "tokens", "path": "tokens"}]}
        assert not any("token" in a and "=" in a and "/" not in a.split("=", 1)[1] for a in c["args"]), \
            "a token on the command line"


def test_mtls_and_cert_manager_certificates_for_the_names_clients_dial(rendered, monkeypatch):
    docs = rendered["kafka-sasl-ssl"]          # certManager (a ClusterIssuer) + clientCA
    served = _served(docs, monkeypatch)
    assert set(served) == {("exporter", "control"), ("query-server", "query"), ("bridge", "otlp")}
    for (svc, ep), sec in served.items():
        assert sec.token_file
        if ep == "otlp":
            assert sec.plaintext and not sec.tls_client_ca
        else:
            assert sec.tls and sec.tls_client_ca.endswith("/tls/ca.crt"), (svc, ep)
    certs = {c["metadata"]["name"]: c["spec"] for c in find(docs, "Certificate")}
    assert set(certs) == {f"{RELEASE}-tensortrace-tls", f"{RELEASE}-tensortrace-exporter-tls"}
    for spec in certs.values():
        assert spec["issuerRef"] == {"name": "internal-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}
        assert spec["privateKey"]["rotationPolicy"] == "Always"   # the services reload renewed files
    query = certs[f"{RELEASE}-tensortrace-tls"]
    for svc in ("query", "bridge"):
        name = one(docs, "Service", svc)["metadata"]["name"]
        for host in (name, f"{name}.{NAMESPACE}", f"{name}.{NAMESPACE}.svc", f"{name}.{NAMESPACE}.svc.cluster.local"):
            assert host in query["dnsNames"], host
    # each server mounts the Secret its Certificate writes
    q = one(docs, "Deployment", "query")
    assert _volumes(q)["tls"]["secret"]["secretName"] == query["secretName"]
    ds = one(docs, "DaemonSet", "exporter")
    assert _volumes(ds)["tls"]["secret"]["secretName"] == certs[f"{RELEASE}-tensortrace-exporter-tls"]["secretName"]
    assert f"{RELEASE}-tensortrace-exporter" in certs[f"{RELEASE}-tensortrace-exporter-tls"]["dnsNames"]
    assert "tls" not in _volumes(one(docs, "Deployment", "bridge"))   # plaintext receiver: no key to hold
    # the embedded layout: the loader serves the query Service with the same certificate
    emb = render([EXAMPLES / "embedded-clickhouse.yaml"])
    cert = one(emb, "Certificate", "query")["spec"]
    assert _volumes(one(emb, "Deployment", "loader"))["tls"]["secret"]["secretName"] == cert["secretName"]


def test_the_otlp_receiver_can_be_tls_for_engines_that_can(monkeypatch):
    served = _served(render(set_values={"security.otlpReceiverTLS": True}), monkeypatch)
    assert served[("loader", "otlp")].tls and not served[("loader", "otlp")].plaintext


def test_plaintext_is_the_explicit_development_opt_in_and_still_runs(monkeypatch):
    docs = render(set_values={"security.plaintext": True}, secure=False)
    served = _served(docs, monkeypatch)
    assert set(served) == {("exporter", "control"), ("loader", "query"), ("loader", "otlp")}
    for (svc, ep), sec in served.items():
        assert sec.plaintext and not sec.tls and not sec.token_file, (svc, ep)
    exporter = pod_spec(one(docs, "DaemonSet", "exporter"))
    assert "--control-plaintext-any-address" not in exporter["containers"][0]["args"]   # loopback
    for w in docs:
        if w["kind"] in ("Deployment", "DaemonSet"):
            assert not {"tls", "tokens"} & set(_volumes(w)), w["metadata"]["name"]
    assert not find(docs, "Certificate")
    # with tokens: plaintext still checks them; on the host port the opt-in must say any address
    docs = render(set_values={"security.plaintext": True, "security.tokens.existingSecret": "t",
                              "exporter.control.hostPort": True}, secure=False)
    served = _served(docs, monkeypatch)
    assert all(sec.token_file for sec in served.values())
    assert served[("exporter", "control")].plaintext_any_address


def test_the_quick_start_sglang_sends_its_spans_with_the_ingest_token_from_a_secret():
    docs = render([EXAMPLES / "nonroot-sglang.yaml"])
    c = pod_spec(one(docs, "Deployment", "sglang"))["containers"][0]
    env = {e["name"]: e for e in c["env"]}
    assert env["INGEST_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "tensortrace-ingest-token", "key": "token"}
    assert container_env(c)["OTEL_EXPORTER_OTLP_TRACES_HEADERS"] == "authorization=Bearer%20secret-from-kubernetes"
    names = [e["name"] for e in c["env"]]
    assert names.index("INGEST_TOKEN") < names.index("OTEL_EXPORTER_OTLP_TRACES_HEADERS")   # $(VAR) needs it first
    assert "--otlp-traces-endpoint=" + one(docs, "Service", "bridge")["metadata"]["name"] + ":4317" in c["args"]
    # no trace, no token needed
    docs = render(set_values={"sglang.enabled": True, "sglang.trace": False, "security.ingestToken.existingSecret": ""})
    c = pod_spec(one(docs, "Deployment", "sglang"))["containers"][0]
    assert "OTEL_EXPORTER_OTLP_TRACES_HEADERS" not in {e["name"] for e in c["env"]}


# -- NetworkPolicy ---------------------------------------------------------------------------------

def _selects(selector: dict, labels: dict) -> bool:
    return selector.get("matchLabels", {}).items() <= labels.items() and not selector.get("matchExpressions")


def _port_peers(np: dict) -> dict[int, list]:
    out = {}
    for rule in np["spec"].get("ingress") or []:
        for p in rule["ports"]:
            out[p["port"]] = rule["from"]
    return out


@pytest.mark.parametrize("variant", ["default", "kafka-sasl-ssl", "everything-on"])
def test_network_policies_select_each_component_and_open_only_its_ports_to_the_named_peers(rendered, variant):
    docs = rendered[variant]
    workloads = [d for d in docs if d["kind"] in ("Deployment", "DaemonSet")]
    policies = find(docs, "NetworkPolicy")
    covered = set()
    for np in policies:
        sel = np["spec"]["podSelector"]
        pods = [w for w in workloads if _selects(sel, w["spec"]["template"]["metadata"]["labels"])]
        assert len(pods) == 1, f"{np['metadata']['name']} selects {[w['metadata']['name'] for w in pods]}"
        w = pods[0]
        comp = w["metadata"]["labels"]["app.kubernetes.io/component"]
        covered.add(comp)
        declared = {p["name"]: p["containerPort"] for c in pod_spec(w)["containers"] for p in c.get("ports", [])}
        peers = _port_peers(np)
        assert set(peers) <= set(declared.values()), (comp, peers, declared)
        assert peers[declared["http"]] == VALUES["networkPolicy"]["metricsFrom"], comp
        if "query" in declared:
            assert peers[declared["query"]] == VALUES["networkPolicy"]["queryFrom"], comp
        if "otlp" in declared:
            assert peers[declared["otlp"]] == VALUES["networkPolicy"]["otlpFrom"], comp
        if "control" in declared:
            assert declared["control"] not in peers, "the control port is open with controlFrom: []"
        assert np["spec"]["policyTypes"] == ["Ingress"]
    # every TensorTrace pod has one (the user's SGLang is theirs to police)
    assert covered == {w["metadata"]["labels"]["app.kubernetes.io/component"] for w in workloads} - {"sglang"}


def test_the_otlp_receiver_admits_the_inference_pods_and_the_query_port_its_clients(rendered):
    docs = rendered["everything-on"]
    sglang = one(docs, "Deployment", "sglang")["spec"]["template"]["metadata"]["labels"]
    bridge = one(docs, "NetworkPolicy", "bridge")
    [otlp_from] = [r["from"] for r in bridge["spec"]["ingress"] if r["ports"][0]["port"] == 4317]
    assert any(_selects(p["podSelector"], sglang) and p.get("namespaceSelector") == {} for p in otlp_from)
    loader = one(rendered["default"], "NetworkPolicy", "loader")
    [query_from] = [r["from"] for r in loader["spec"]["ingress"] if r["ports"][0]["port"] == 50052]
    assert query_from == [{"podSelector": {"matchLabels": {"tensortrace.io/query-client": "true"}}}]
    assert not _selects(query_from[0]["podSelector"], sglang), "an inference pod may read tensors"


def test_network_policy_switches(monkeypatch):
    assert not find(render(set_values={"networkPolicy.enabled": False}), "NetworkPolicy")
    docs = render(set_values={"exporter.control.hostPort": True,
                              "networkPolicy.controlFrom": [{"ipBlock": {"cidr": "10.0.0.0/8"}}],
                              "networkPolicy.metricsFrom": [],
                              "networkPolicy.egress": {"enabled": True, "to": [
                                  {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kafka"}}}],
                                   "ports": [{"port": 9092, "protocol": "TCP"}]}]}})
    import kubernetes_validate

    from helmchart import KUBE_VERSION
    exporter = one(docs, "NetworkPolicy", "exporter")
    assert _port_peers(exporter) == {50051: [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}   # metrics closed: []
    assert exporter["spec"]["policyTypes"] == ["Ingress", "Egress"]
    egress = exporter["spec"]["egress"]
    assert {"port": 53, "protocol": "UDP"} in egress[0]["ports"] and egress[1]["ports"] == [{"port": 9092, "protocol": "TCP"}]
    for np in find(docs, "NetworkPolicy"):
        kubernetes_validate.validate(np, KUBE_VERSION, strict=True)
    probes_only = render(set_values={"networkPolicy.metricsFrom": [], "networkPolicy.queryFrom": [],
                                     "networkPolicy.otlpFrom": []})
    assert one(probes_only, "NetworkPolicy", "loader")["spec"]["ingress"] == []   # deny all


# -- Pod Security "restricted" -------------------------------------------------------------------

# The restricted profile (Kubernetes Pod Security Standards, v1.30), as the admission controller
# checks a pod: baseline's host namespaces, privileged, capabilities, hostPath, hostPort; restricted's
# volume types, privilege escalation, non-root, seccomp, dropped capabilities.
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}


def restricted_violations(w: dict) -> set[str]:
    spec = pod_spec(w)
    psc = spec.get("securityContext") or {}
    out = {k for k in ("hostNetwork", "hostPID", "hostIPC") if spec.get(k)}
    for v in spec.get("volumes") or []:
        out |= {f"volume {v['name']}: {t}" for t in set(v) - {"name"} - RESTRICTED_VOLUMES}
    if psc.get("sysctls"):
        out.add("sysctls")
    for c in (spec.get("initContainers") or []) + spec["containers"]:
        sc, n = c.get("securityContext") or {}, c["name"]
        if sc.get("privileged"):
            out.add(f"{n}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.add(f"{n}: allowPrivilegeEscalation")
        if sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is not True:
            out.add(f"{n}: runAsNonRoot")
        if sc.get("runAsUser", psc.get("runAsUser")) == 0:
            out.add(f"{n}: runAsUser 0")
        if (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
            out.add(f"{n}: seccompProfile")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            out.add(f"{n}: capabilities.drop")
        added = set(caps.get("add") or []) - {"NET_BIND_SERVICE"}
        if added:
            out.add(f"{n}: capabilities.add {','.join(sorted(added))}")
        out |= {f"{n}: hostPort" for p in c.get("ports") or [] if p.get("hostPort")}
        if sc.get("procMount", "Default") != "Default":
            out.add(f"{n}: procMount")
    return out


# The documented exceptions (docs/operations.md "Pod Security"): the exporter reads the node's ring
# directory (a hostPath), which its init container prepares as root with three capabilities; the
# control port on the node with exporter.control.hostPort. The quick-start SGLang is the user's
# inference server (hostPath ring mount, the image's user): not TensorTrace's to restrict.
EXPORTER_EXCEPTIONS = {"volume rings: hostPath", "prepare-ring-dir: runAsNonRoot", "prepare-ring-dir: runAsUser 0",
                       "prepare-ring-dir: capabilities.add CHOWN,FOWNER,FSETID"}


def test_the_restricted_checker_finds_what_it_should():
    pod = {"spec": {"template": {"spec": {
        "hostPID": True, "volumes": [{"name": "h", "hostPath": {"path": "/"}}, {"name": "s", "secret": {}}],
        "containers": [{"name": "c", "ports": [{"containerPort": 1, "hostPort": 1}],
                        "securityContext": {"runAsUser": 0, "capabilities": {"add": ["SYS_ADMIN"]}}}]}}}}
    assert restricted_violations(pod) == {"hostPID", "volume h: hostPath", "c: allowPrivilegeEscalation",
                                          "c: runAsNonRoot", "c: runAsUser 0", "c: seccompProfile",
                                          "c: capabilities.drop", "c: capabilities.add SYS_ADMIN", "c: hostPort"}


@pytest.mark.parametrize("variant", sorted(VARIANTS) + ["plaintext", "control-host-port"])
def test_every_pod_meets_pod_security_restricted_but_the_documented_exceptions(rendered, variant):
    docs = rendered.get(variant) or render(set_values={"security.plaintext": True} if variant == "plaintext"
                                           else {"exporter.control.hostPort": True},
                                           secure=variant != "plaintext")
    seen = set()
    for w in docs:
        if w["kind"] not in ("Deployment", "DaemonSet", "StatefulSet", "Job"):
            continue
        comp = w["metadata"]["labels"]["app.kubernetes.io/component"]
        if comp == "sglang":
            continue
        seen.add(comp)
        got = restricted_violations(w)
        if comp == "exporter":
            want = EXPORTER_EXCEPTIONS | ({"exporter: hostPort"} if variant == "control-host-port" else set())
            assert got == want, variant
        else:
            assert got == set(), f"{variant}: {w['metadata']['name']}"
    assert {"exporter", "loader"} <= seen


# -- data lifecycle --------------------------------------------------------------------------------

def test_retention_and_the_forget_sweep_reach_the_loader(monkeypatch):
    docs = render(set_values={"loader.retention": "activations=7d,requests=30d,forgotten=30d",
                              "loader.forgetSweepSeconds": 120})
    c = pod_spec(one(docs, "Deployment", "loader"))["containers"][0]
    _, cfg, _ = _service_config(c, monkeypatch, strict=True)
    assert cfg.retention == "activations=7d,requests=30d,forgotten=30d" and cfg.forget_sweep_s == 120
    c = pod_spec(one(render(), "Deployment", "loader"))["containers"][0]
    assert not any(a.startswith("--retention") for a in c["args"]) and "--forget-sweep-s=60" in c["args"]
    err = render_error(set_values={"loader.retention": "activations=7 days"})
    assert "/loader/retention" in err, err


# -- NOTES -----------------------------------------------------------------------------------------

def test_notes_say_how_clients_reach_the_secured_endpoints(tmp_path):
    from test_chart import _notes

    notes = _notes(tmp_path)
    q = f"{RELEASE}-tensortrace-query"
    assert "0. Security. Every gRPC endpoint is TLS (Secret tensortrace-tls)" in notes
    assert f"kubectl -n {NAMESPACE} get secret tensortrace-tls -o jsonpath='{{.data.ca\\.crt}}' | base64 -d > ca.crt" in notes
    assert (f"export TENSORTRACE_TLS_CA=$PWD/ca.crt TENSORTRACE_TOKEN_FILE=$PWD/read.token "
            f"TENSORTRACE_TLS_SERVER_NAME={q}.{NAMESPACE}.svc") in notes
    assert (f"TENSORTRACE_TLS_CA=$PWD/exporter-ca.crt TENSORTRACE_TLS_SERVER_NAME={RELEASE}-tensortrace-exporter "
            "TENSORTRACE_TOKEN_FILE=$PWD/control.token tensortrace exporterctl --address 127.0.0.1:50051 status") in notes
    assert "PLAINTEXT with an ingest token" in notes and "cross the pod network unencrypted" in notes
    assert "tensortrace.io/query-client=true" in notes and "WARNING" not in notes
    assert f"tensortrace show <trace-id> --server {q}.{NAMESPACE}:50052" in notes
    notes = _notes(tmp_path / "b", [EXAMPLES / "kafka-sasl-ssl.yaml"])
    assert "cert-manager, ClusterIssuer internal-ca, Secret tt-tensortrace-tls, mTLS" in notes
    assert "TENSORTRACE_TLS_CERT=client.crt" in notes
    notes = " ".join(_notes(tmp_path / "c", set_values={"security.plaintext": True}, secure=False).split())
    assert "WARNING: security.plaintext=true (development only)" in notes and "without authentication" in notes
    assert "TENSORTRACE_TLS_CA" not in notes and "tensortrace exporterctl --address 127.0.0.1:50051 status" in notes
    assert "{{" not in notes and "<no value>" not in notes
