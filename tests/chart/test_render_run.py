"""Render and run: what `helm template charts/tensortrace` renders for the default install runs.

Each container's command, args and env come from the real helm output and run as local processes
under the uid/gid/groups the manifests declare (tensortrace.testing.podrun: the test runs as root
and drops privileges per container). The exporter DaemonSet's init container prepares the ring
hostPath exactly as on a node; the inference pods come from the chart's own SGLang Deployment
(`sglang.enabled=true`), as its image's non-root user and as root, with the SGLang server replaced
by a tiny Hugging Face model carrying the real capture agent, configured by the environment the
chart renders. A real Kafka broker stands in for `kafka:9092` and chDB is the loader's engine on
its volume. Records flow agent -> ring -> exporter -> Kafka -> loader -> ClickHouse and come back,
bit-exact, through the query Service. Only addresses, ports, listen hosts and volume paths are
mapped to this machine (podrun's docstring lists every rewrite).

The install is secured as the chart requires (issue 15): the Secrets it names (a server certificate
with the Services' DNS names, its CA, a tokens file, the inference pods' ingest token) are made at
test time (tests/security/security_pki.py's CA) and mounted where the rendered pods mount them
(podrun's secret volumes). The read-back goes over TLS with a read token and the Service's name;
without a token it is refused; the exporter's control answers a control token over TLS; the
quick-start SGLang's span headers (from its Secret) are accepted by the bridge's OTLP receiver and a
call without them is not. The same install with the plaintext opt-in (`security.plaintext=true`)
runs too.

The two crash bugs this test exists for fail it (checked below without helm, on the manifests of
the chart that had them): a number helm rendered as a float (`--batch-size=1.048576e+06`) and rings
the exporter cannot read (created 0600 by a root inference pod, no ring group).
"""

from __future__ import annotations

import copy
import glob
import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

from tensortrace.testing.podrun import ContainerFailed, PodRunner  # noqa: E402
from tensortrace.testing.privileges import can_switch_users, python_argv, shared_tmpdir, tensortrace_argv  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CHART = Path(os.environ.get("TENSORTRACE_CHART_DIR") or ROOT / "charts" / "tensortrace")   # another checkout of the chart
RELEASE, NAMESPACE = "tt", "tt"
pytestmark = pytest.mark.skipif(not can_switch_users(), reason="needs root to run containers as their uids")


def _helm() -> str | None:
    found = os.environ.get("TENSORTRACE_HELM") or next(iter(sorted(glob.glob(str(ROOT / ".cache/helm/*/bin/helm")))), None)
    return found if found and os.access(found, os.X_OK) else None


SECURE_VALUES = Path(__file__).resolve().parent / "fixtures" / "secure.yaml"


def render(*sets: str, plaintext: bool = False) -> list[dict]:
    """helm template with the Secrets fixtures/secure.yaml names (or the plaintext opt-in)."""
    helm = _helm()
    if helm is None:
        pytest.skip("helm is not built (`make helm` builds it from the Go module proxy into .cache/helm/)")
    cmd = [helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    cmd += ["--set", "security.plaintext=true"] if plaintext else ["-f", str(SECURE_VALUES)]
    for s in sets:
        cmd += ["--set", s]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def workload(docs: list[dict], component: str) -> dict:
    [w] = [d for d in docs if d.get("kind") in ("DaemonSet", "Deployment")
           and d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component]
    return w


def topics(docs: list[dict]) -> set[str]:
    """Every topic a rendered container names (`--...topic=NAME`)."""
    out = set()
    for d in docs:
        if d.get("kind") not in ("DaemonSet", "Deployment"):
            continue
        for c in d["spec"]["template"]["spec"].get("containers") or []:
            for a in c.get("args") or []:
                m = re.fullmatch(r"--[\w-]*topic=(.+)", str(a))
                if m:
                    out.add(m.group(1))
    return out


class RingsUnreadable(AssertionError):
    pass


def wait_rings_attached(run: PodRunner, pod: str, n: int, timeout_s: float = 60.0) -> list[str]:
    """The exporter's log says it attached `n` rings; a refusal fails at once with its reason."""
    deadline = time.monotonic() + timeout_s
    while True:
        log = run.log_tail(pod, "exporter", 1 << 20)
        refused = [line for line in log.splitlines() if "ring refused:" in line]
        if refused:
            raise RingsUnreadable("the exporter cannot read the rings:\n" + "\n".join(refused))
        attached = [line for line in log.splitlines() if "ring attached:" in line]
        if len(attached) >= n:
            return attached
        if time.monotonic() > deadline:
            raise RingsUnreadable(f"{len(attached)} of {n} rings attached after {timeout_s:.0f}s:\n{log[-3000:]}")
        time.sleep(0.2)


# The inference container, replaced: the real capture agent configured exactly as the SGLang plugin
# configures it (SGLangBackendConfig.from_env: TENSORTRACE_RING_DIR, ..._CAPACITY, ..._SELECTION,
# ..._OVERFLOW; AgentConfig: TENSORTRACE_RING_GID, POD_NAME, NODE_NAME), on a tiny Llama through the
# HF backend. It saves the model's own hidden states (uninstrumented run) to compare with.
AGENT = r"""
import json, os, sys
import torch
from tensortrace.agent import AgentConfig, CaptureAgent, Selection
from tensortrace.agent.backends.hf import HFBackend
from tensortrace.agent.backends.sglang.config import SGLangBackendConfig
from tensortrace.testing.tiny_models import left_padded, make
out_dir, prefix = sys.argv[1], sys.argv[2]
cfg = SGLangBackendConfig.from_env()
cfg.validate()
agent = CaptureAgent(AgentConfig(ring_dir=cfg.ring_dir, ring_capacity=cfg.ring_capacity, model_id="tiny-llama",
                                 overflow_policy=cfg.overflow_policy), Selection.from_doc(cfg.selection_doc()))
model = make("llama")
prompts = [[5, 6, 7], [11, 12, 13, 14, 15]]
ids, mask = left_padded(prompts)
kw = dict(max_new_tokens=3, do_sample=False, eos_token_id=None, pad_token_id=0, return_dict_in_generate=True)
ref = model.generate(input_ids=ids, attention_mask=mask, output_hidden_states=True, **kw)
backend = HFBackend(model, agent)
rids = [f"{prefix}-{b}" for b in range(len(prompts))]
out, ctxs = backend.generate(ids, attention_mask=mask, request_ids=rids, **kw)
backend.detach()
assert torch.equal(out.sequences, ref.sequences)
P, want = ids.shape[1], {}
for b, rid in enumerate(rids):
    n = len(prompts[b])
    hidden = [torch.cat([ref.hidden_states[0][L][b, P - n:]] + [ref.hidden_states[k][L][b, :1] for k in range(1, 3)])
              for L in range(model.config.num_hidden_layers + 1)]
    want[rid] = (ctxs[b].trace_id.hex(), hidden)
torch.save(want, os.path.join(out_dir, prefix + ".pt"))
st = os.stat(agent.ring_path)
print(json.dumps({"ring": agent.ring_path, "uid": st.st_uid, "gid": st.st_gid, "mode": st.st_mode & 0o7777,
                  "written": agent.stats().written}))
agent.close()
"""


def agent_in_place_of_sglang(out_dir: str, prefix: str):
    def replace(container, argv, env):
        return python_argv(AGENT, out_dir, prefix), env
    return replace


def tensortrace_cli() -> list[str]:
    """This environment's `tensortrace` command."""
    return tensortrace_argv()


def wait_exit(run: PodRunner, pod: str, container: str, timeout_s: float = 300.0) -> int:
    proc = run.procs[(pod, container)]
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise ContainerFailed(f"{pod}/{container} still running after {timeout_s:.0f}s:\n"
                              f"{run.log_tail(pod, container)}") from None


def _pki_secrets(out_dir: str) -> tuple[dict, dict]:
    """The Secrets fixtures/secure.yaml names, made now: a CA, one server certificate for every name
    the chart's Certificates list (the Services, the exporter, localhost, 127.0.0.1), the tokens
    file, the ingest token. Returns (secrets for PodRunner, {file: path} a client uses)."""
    import datetime
    import ipaddress
    import sys

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    sys.path.insert(0, str(ROOT / "tests" / "security"))
    try:
        import security_pki
    finally:
        sys.path.pop(0)
    ca = security_pki.Issuer.ca("tensortrace-render-run-ca")
    names = [f"{RELEASE}-tensortrace-{c}{suffix}" for c in ("query", "bridge", "exporter")
             for suffix in ("", f".{NAMESPACE}", f".{NAMESPACE}.svc", f".{NAMESPACE}.svc.cluster.local")]
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{RELEASE}-tensortrace")]))
            .issuer_name(ca.cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names + ["localhost"]]
                                                       + [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca.key, hashes.SHA256()))
    secure = yaml.safe_load(SECURE_VALUES.read_text())["security"]
    secrets = {
        secure["tls"]["existingSecret"]: {
            "tls.crt": cert.public_bytes(serialization.Encoding.PEM),
            "tls.key": key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()),
            "ca.crt": ca.pem},
        secure["tokens"]["existingSecret"]: {"tokens": security_pki.TOKENS},
        secure["ingestToken"]["existingSecret"]: {"token": security_pki.INGEST_TOKEN},
    }
    files = {}
    for name, data in (("ca.crt", ca.pem), ("read.token", security_pki.READ_TOKEN + "\n"),
                       ("control.token", security_pki.CONTROL_TOKEN + "\n")):
        files[name] = os.path.join(out_dir, name)
        with open(files[name], "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
        os.chmod(files[name], 0o644)
    return secrets, files


def _send_span(endpoint: str, headers: dict | None):
    """One span through the real OpenTelemetry SDK's OTLP/gRPC exporter, as SGLang sends it
    (insecure=True: SGLang's exporter cannot do TLS). Returns the SpanExportResult."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    results = []

    class Recording:
        def __init__(self, inner):
            self.inner = inner

        def export(self, spans):
            results.append(self.inner.export(spans))
            return results[-1]

        def shutdown(self):
            self.inner.shutdown()

    provider = TracerProvider(resource=Resource.create({"service.name": "sglang"}))
    provider.add_span_processor(SimpleSpanProcessor(Recording(OTLPSpanExporter(
        endpoint=endpoint, insecure=True, headers=headers, timeout=10))))
    provider.get_tracer("sglang").start_span("prefill_forward").end()
    provider.shutdown()
    return results[0]


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("mode", ["secure", "plaintext"])
def test_the_default_install_runs_records_flow_from_agents_to_clickhouse_and_back(kafka_broker, mode):
    torch = pytest.importorskip("torch")
    import grpc
    from opentelemetry.sdk.trace.export import SpanExportResult
    from opentelemetry.util.re import parse_env_headers

    from tensortrace.query import QueryError, TensorTraceClient
    from tensortrace.service.security import ClientSecurity
    from tensortrace.testing.kafka import create_topics

    plaintext = mode == "plaintext"
    docs = render(plaintext=plaintext)
    # The chart's own inference pod: the image's user (non-root) and root, on the same node.
    inference = {
        "sglang-nonroot": render("sglang.enabled=true", "sglang.capture.ringCapacity=16M", plaintext=plaintext),
        "sglang-root": render("sglang.enabled=true", "sglang.capture.ringCapacity=16M",
                              "sglang.runAsUser=0", "sglang.runAsGroup=0", plaintext=plaintext),
    }
    pods = []
    for name, rendered in inference.items():
        d = copy.deepcopy(workload(rendered, "sglang"))
        d["metadata"]["name"] = name
        pods.append(d)
    exporter = workload(docs, "exporter")["metadata"]["name"]
    loader = workload(docs, "loader")["metadata"]["name"]
    kafka_args = [a for c in workload(docs, "exporter")["spec"]["template"]["spec"]["containers"] for a in c["args"]
                  if a.startswith("--kafka-bootstrap-servers=")]
    assert kafka_args, "the exporter is given no --kafka-bootstrap-servers"
    chart_kafka = kafka_args[0].split("=", 1)[1]
    for t in sorted(topics(docs)):
        create_topics(kafka_broker.bootstrap, partitions=1, name=t) if not _topic_exists(kafka_broker.bootstrap, t) else None

    with shared_tmpdir("tt-render-run-") as root:
        out_dir = os.path.join(root, "agent-out")
        os.mkdir(out_dir)
        os.chmod(out_dir, 0o777)
        replace = {(name, "sglang"): agent_in_place_of_sglang(out_dir, name) for name in inference}
        secrets, files = _pki_secrets(out_dir) if not plaintext else ({}, {})
        with PodRunner(docs + pods, root, external={chart_kafka: kafka_broker.bootstrap}, namespace=NAMESPACE,
                       replace=replace, secrets=secrets) as run:
            run.start_pod(exporter)          # init container: tensortrace ring-dir prepare, as root
            run.wait_ready(exporter)
            ring_dir = os.path.join(root, "host", "run/tensortrace")
            st = os.stat(ring_dir)
            assert (st.st_gid, st.st_mode & 0o7777) == (2000, 0o2770), "the init container prepared the hostPath"
            run.start_pod(loader)
            run.wait_ready(loader, timeout_s=240)
            wrote = {}
            for name in inference:
                run.start_pod(name)          # init container: waits for the prepared ring dir, as the pod's uid
                rc = wait_exit(run, name, "sglang")
                assert rc == 0, run.log_tail(name, "sglang")
                wrote[name] = json.loads(run.log_tail(name, "sglang").strip().splitlines()[-1])
            assert wrote["sglang-root"]["uid"] == 0 and wrote["sglang-nonroot"]["uid"] == 1000
            assert all(w["gid"] == 2000 and w["mode"] == 0o660 and w["written"] > 0 for w in wrote.values()), wrote
            wait_rings_attached(run, exporter, len(inference))

            query = run.service_address(f"{RELEASE}-tensortrace-query", 50052)   # the Service users are told to use
            if plaintext:
                security = ClientSecurity()
            else:
                # NOTES' client settings: the CA, a read token, the Service's name in the certificate
                security = ClientSecurity(tls_ca=files["ca.crt"], token_file=files["read.token"],
                                          tls_server_name=f"{RELEASE}-tensortrace-query.{NAMESPACE}.svc")
                with TensorTraceClient(f"grpc://{query}", security=ClientSecurity(
                        tls_ca=files["ca.crt"], tls_server_name=f"{RELEASE}-tensortrace-query.{NAMESPACE}.svc")) as anon:
                    with pytest.raises(QueryError, match="UNAUTHENTICATED"):
                        anon.status(trace_id="0" * 31 + "1")
                with pytest.raises(QueryError):   # plaintext to a TLS endpoint: no handshake, no data
                    with TensorTraceClient(f"grpc://{query}") as plain:
                        plain.status(trace_id="0" * 31 + "1")
            checked = 0
            with TensorTraceClient(f"grpc://{query}", poll_interval_s=0.2, security=security) as tt:
                for name in inference:
                    want = torch.load(os.path.join(out_dir, name + ".pt"))
                    for rid, (trace_id, hidden) in want.items():
                        got = tt.tensors(trace_id=trace_id, hooks=["resid_pre", "resid_final"], wait_s=180)
                        assert got.request_id == rid
                        assert got.completeness.state == "complete", got.completeness
                        hs = got.hidden_states()
                        assert len(hs) == len(hidden)
                        for L, (g, w) in enumerate(zip(hs, hidden)):
                            assert torch.equal(g[0], w), f"{rid}: hidden state {L} differs from the model's"
                        checked += 1
            assert checked == 4
            # the exporter's control endpoint (the pod's loopback; NOTES' port-forward): TLS + a control token
            control = f"127.0.0.1:{run.local_ports[(exporter, 50051)]}"
            ctl = [*tensortrace_cli(), "exporterctl", "--address", control]
            if not plaintext:
                ctl += ["--tls-ca", files["ca.crt"], "--tls-server-name", f"{RELEASE}-tensortrace-exporter",
                        "--token-file", files["control.token"]]
            st = subprocess.run([*ctl, "status"], capture_output=True, text=True, timeout=60)
            assert st.returncode == 0 and "kafka: connected" in st.stdout, st.stdout + st.stderr
            # SGLang's spans: the headers the chart gives it (its ingest token Secret), plaintext as
            # SGLang sends them, into the bridge Service's receiver
            otlp = run.service_address(f"{RELEASE}-tensortrace-bridge", 4317)
            sglang_env = run.argv_env(run.pods["sglang-nonroot"], run.pods["sglang-nonroot"].containers[0])[1]
            if plaintext:
                assert "OTEL_EXPORTER_OTLP_TRACES_HEADERS" not in sglang_env
                assert _send_span(otlp, None) == SpanExportResult.SUCCESS
            else:
                headers = parse_env_headers(sglang_env["OTEL_EXPORTER_OTLP_TRACES_HEADERS"], liberal=True)
                assert _send_span(otlp, headers) == SpanExportResult.SUCCESS
                assert _send_span(otlp, None) == SpanExportResult.FAILURE
            metrics = run.http(exporter, "exporter", "http", "/metrics")
            assert "tensortrace_exporter_rings_refused_total{" not in metrics, metrics
            codes = run.stop_all()
        assert codes[(exporter, "exporter")] == 0 and codes[(loader, "loader")] == 0, codes


def _topic_exists(bootstrap: str, topic: str) -> bool:
    from tensortrace.testing.kafka import admin_client

    admin = admin_client(bootstrap)
    try:
        return topic in admin.list_topics()
    finally:
        admin.close()


# -- the historical bugs: the harness fails on them (no helm needed) ---------------------------------

def _old_chart_exporter(batch_size: str = "1.048576e+06") -> dict:
    """The exporter DaemonSet as the chart rendered it before this work (helm renders values.yaml
    numbers as floats without `int64`; no init container; no ring group; the hostPath as Kubernetes
    creates it)."""
    return {
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": "old-exporter"},
        "spec": {"template": {
            "metadata": {"labels": {"app": "old-exporter"}},
            "spec": {
                "securityContext": {"runAsUser": 10001, "runAsGroup": 10001, "runAsNonRoot": True},
                "containers": [{
                    "name": "exporter", "image": "ghcr.io/tensortrace/tensortrace:0.1.0",
                    "args": ["exporter", "--ring-dir=/run/tensortrace", "--bootstrap-servers=kafka:9092",
                             "--topic=tensortrace.activations", "--compression=zstd", "--linger-ms=5",
                             f"--batch-size={batch_size}", "--control-port=50051", "--metrics-port=9464",
                             "--allow-flat-rings",    # the old layout: rings directly in the ring dir
                             "--control-plaintext"],  # today's exporter refuses a control port without TLS or this
                    "ports": [{"name": "metrics", "containerPort": 9464}, {"name": "control", "containerPort": 50051}],
                    "readinessProbe": {"httpGet": {"path": "/healthz", "port": "metrics"}},
                    "volumeMounts": [{"name": "rings", "mountPath": "/run/tensortrace"},
                                     {"name": "tmp", "mountPath": "/tmp"}]}],
                "volumes": [{"name": "rings", "hostPath": {"path": "/run/tensortrace", "type": "DirectoryOrCreate"}},
                            {"name": "tmp", "emptyDir": {}}],
            }}}}


def _old_inference_pod() -> dict:
    """A root inference pod with the agent's old default: no ring group (rings 0600)."""
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "old-sglang"},
        "spec": {"template": {"metadata": {"labels": {"app": "old-sglang"}}, "spec": {
            "securityContext": {"runAsUser": 0, "runAsGroup": 0},
            "containers": [{"name": "sglang", "image": "lmsysorg/sglang:v0.5.23",
                            "command": ["python3", "-m", "sglang.launch_server"],
                            "env": [{"name": "TENSORTRACE_RING_DIR", "value": "/run/tensortrace"},
                                    {"name": "TENSORTRACE_RING_CAPACITY", "value": "1M"}],
                            "volumeMounts": [{"name": "rings", "mountPath": "/run/tensortrace"}]}],
            "volumes": [{"name": "rings", "hostPath": {"path": "/run/tensortrace", "type": "DirectoryOrCreate"}}],
        }}}}


@pytest.mark.unit
def test_a_float_rendered_number_fails_the_run():
    with shared_tmpdir("tt-render-run-") as root:
        with PodRunner([_old_chart_exporter()], root, external={"kafka:9092": "127.0.0.1:9"}) as run:
            run.start_pod("old-exporter")
            with pytest.raises(ContainerFailed) as e:
                run.wait_ready("old-exporter", timeout_s=60)
    msg = str(e.value)
    assert msg.startswith("old-exporter/exporter exited 2:")
    assert "--batch-size" in msg and "1.048576e+06" in msg


@pytest.mark.unit
def test_unreadable_rings_fail_the_run():
    """The exporter (uid 10001) and a root agent with the old defaults: the ring is refused, and the
    check the render-and-run test makes (wait_rings_attached) fails with the exporter's reason."""
    pytest.importorskip("torch")
    with shared_tmpdir("tt-render-run-") as root:
        out_dir = os.path.join(root, "agent-out")
        os.mkdir(out_dir)
        os.chmod(out_dir, 0o777)
        docs = [_old_chart_exporter(batch_size="1000000"), _old_inference_pod()]
        with PodRunner(docs, root, external={"kafka:9092": "127.0.0.1:9"},
                       replace={("old-sglang", "sglang"): agent_in_place_of_sglang(out_dir, "old")}) as run:
            run.start_pod("old-exporter")
            run.wait_ready("old-exporter")      # /healthz: running (Kafka is not needed to refuse a ring)
            run.start_pod("old-sglang")
            assert wait_exit(run, "old-sglang", "sglang") == 0, run.log_tail("old-sglang", "sglang")
            with pytest.raises(RingsUnreadable) as e:
                wait_rings_attached(run, "old-exporter", 1)
    msg = str(e.value)
    assert "ring refused:" in msg and "owner: owned by uid 0 (uid 0, gid 0, mode 0600)" in msg
    assert "set TENSORTRACE_RING_GID=<gid> in the inference container and --ring-group <gid> here" in msg


@pytest.mark.unit
def test_the_runner_maps_only_addresses_ports_hosts_and_paths():
    """What the harness changes in a rendered container, and nothing else."""
    d = _old_chart_exporter(batch_size="1000000")
    c = d["spec"]["template"]["spec"]["containers"][0]
    c["args"] += ["--node=$(NODE_NAME)", "--control-host=0.0.0.0", "--ring-owner-uids=1000", "--x=$$(NODE_NAME)"]
    c["env"] = [{"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                {"name": "OTHER", "value": "/run/tensortrace/x /var/run/tensortrace kafka:90921 kafka:9092 /tmp/y"}]
    with shared_tmpdir("tt-render-run-") as root:
        run = PodRunner([d], root, external={"kafka:9092": "127.0.0.1:4242"}, node="node-7")
        pod = run.pods["old-exporter"]
        argv, env = run.argv_env(pod, pod.containers[0])
        rings = os.path.join(root, "host", "run/tensortrace")
        i = argv.index("exporter")
        assert argv[i:] == [
            "exporter", f"--ring-dir={rings}", "--bootstrap-servers=127.0.0.1:4242", "--topic=tensortrace.activations",
            "--compression=zstd", "--linger-ms=5", "--batch-size=1000000",
            f"--control-port={run.local_ports[('old-exporter', 50051)]}",
            f"--metrics-port={run.local_ports[('old-exporter', 9464)]}", "--allow-flat-rings", "--control-plaintext",
            "--node=node-7",
            "--control-host=127.0.0.1",
            "--ring-owner-uids=1000", "--x=$(NODE_NAME)", "--http-host=127.0.0.1"]
        tmp = os.path.join(root, "pods", "old-exporter", "tmp")
        assert env["OTHER"] == f"{rings}/x /var/run/tensortrace kafka:90921 127.0.0.1:4242 {tmp}/y"
        assert pod.containers[0].identity.uid == 10001 and pod.containers[0].identity.groups == ()
        run.stop_all()


@pytest.mark.unit
def test_the_runner_mounts_a_subpathexpr_as_kubelet_makes_it():
    """The inference pod's ring mount (`subPathExpr: $(POD_NAMESPACE)_$(POD_NAME)`): its own
    subdirectory of the hostPath, created by root with the mode of the hostPath's root."""
    d = _old_inference_pod()
    c = d["spec"]["template"]["spec"]["containers"][0]
    c["env"] += [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                 {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}]
    c["volumeMounts"][0]["subPathExpr"] = "$(POD_NAMESPACE)_$(POD_NAME)"
    with shared_tmpdir("tt-render-run-") as root:
        host = os.path.join(root, "host", "run/tensortrace")
        os.makedirs(host)
        os.chmod(host, 0o2770)
        run = PodRunner([d], root, namespace="team-a")
        pod = run.pods["old-sglang"]
        mounts = run.mounts(pod, pod.containers[0])
        assert mounts == {"/run/tensortrace": os.path.join(host, "team-a_old-sglang-0")}
        st = os.stat(mounts["/run/tensortrace"])
        assert (st.st_uid, st.st_mode & 0o7777) == (0, 0o2770)
        c["volumeMounts"][0]["subPathExpr"] = "../$(POD_NAME)"
        with pytest.raises(ValueError, match="must be a relative path inside the volume"):
            run.mounts(pod, pod.containers[0])
        run.stop_all()


@pytest.mark.unit
def test_the_runner_mounts_secrets_as_the_kubelet_does_and_refuses_a_missing_one():
    """secret volumes (all keys, or `items` under their path, 0644 root-owned) and secretKeyRef env
    from the Secrets the caller says the cluster holds; a missing Secret or key fails the pod."""
    d = _old_chart_exporter(batch_size="1000000")
    spec = d["spec"]["template"]["spec"]
    c = spec["containers"][0]
    c["volumeMounts"] += [{"name": "tls", "mountPath": "/etc/tensortrace/tls", "readOnly": True},
                          {"name": "tokens", "mountPath": "/etc/tensortrace/tokens", "readOnly": True}]
    c["args"] += ["--control-tls-cert=/etc/tensortrace/tls/tls.crt", "--control-token-file=/etc/tensortrace/tokens/tokens"]
    c["env"] = [{"name": "INGEST_TOKEN", "valueFrom": {"secretKeyRef": {"name": "ingest", "key": "token"}}},
                {"name": "HEADERS", "value": "authorization=Bearer%20$(INGEST_TOKEN)"},
                {"name": "OPTIONAL", "valueFrom": {"secretKeyRef": {"name": "nope", "key": "x", "optional": True}}}]
    spec["volumes"] += [{"name": "tls", "secret": {"secretName": "tls"}},
                        {"name": "tokens", "secret": {"secretName": "tok", "items": [{"key": "tokens", "path": "tokens"}]}}]
    secrets = {"tls": {"tls.crt": b"CERT", "tls.key": b"KEY"}, "tok": {"tokens": "a read 0123456789abcdef", "other": "x"},
               "ingest": {"token": "s3cret-token"}}
    with shared_tmpdir("tt-render-run-") as root:
        run = PodRunner([d], root, secrets=secrets)
        pod = run.pods["old-exporter"]
        argv, env = run.argv_env(pod, pod.containers[0])
        tls, tok = (os.path.join(root, "secrets", "old-exporter", v) for v in ("tls", "tokens"))
        assert f"--control-tls-cert={tls}/tls.crt" in argv and f"--control-token-file={tok}/tokens" in argv
        assert sorted(os.listdir(tls)) == ["tls.crt", "tls.key"] and os.listdir(tok) == ["tokens"]
        st = os.stat(os.path.join(tls, "tls.key"))
        assert (st.st_uid, st.st_mode & 0o777) == (0, 0o644)
        assert open(os.path.join(tok, "tokens")).read() == "a read 0123456789abcdef"
        assert env["HEADERS"] == "authorization=Bearer%20s3cret-token" and "OPTIONAL" not in env
        run.stop_all()
    for missing, msg in (({"tls": secrets["tls"], "tok": secrets["tok"]}, "env INGEST_TOKEN: Secret 'ingest' does not exist"),
                         ({**secrets, "tok": {"other": "x"}}, "volume 'tokens': Secret 'tok' has no key 'tokens' (has: other)")):
        with shared_tmpdir("tt-render-run-") as root:
            run = PodRunner([copy.deepcopy(d)], root, secrets=missing)
            pod = run.pods["old-exporter"]
            with pytest.raises(ContainerFailed, match=re.escape(msg)):
                run.argv_env(pod, pod.containers[0])
            run.stop_all()
