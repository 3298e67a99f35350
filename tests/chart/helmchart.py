"""The chart as real helm renders it, for the tests in tests/chart/ (imported by name: pytest puts
this folder on sys.path).

    docs = render()                                   # the default install: a list of manifests (dicts)
    docs = render(values=[EXAMPLES / "kafka-sasl-ssl.yaml"], set_values={"loader.replicas": 3})
    docs = render(secure=False)                       # values.yaml alone: refused (no certificate source)
    for pod, c in containers(docs): ...               # (pod template owner, container), init containers too
    helm("lint", "--strict", CHART)                   # any helm command: CompletedProcess

helm is built from the Go module proxy by `make helm` (a pinned release, HELM_VERSION below, the
Makefile's); a missing binary fails the test with that command. The chart tests' Go helpers
(`make chart-tools`: the PromQL parser and kustomize's build engine) likewise.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "tensortrace"
EXAMPLES = CHART / "examples"
FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
# The Secrets every install must name (security.tls.existingSecret, security.tokens.existingSecret).
SECURE = FIXTURES / "secure.yaml"
HELM_VERSION = "v3.22.0"
HELM = ROOT / ".cache" / "helm" / HELM_VERSION / "bin" / "helm"
CHART_TOOLS = ROOT / ".cache" / "chart-tools" / "bin" / "charttools"
RELEASE = "tt"
NAMESPACE = "ml"
# What the chart says a rendered install is validated against (kubernetes-validate's schemas).
KUBE_VERSION = "1.30.0"

WORKLOAD_KINDS = ("Deployment", "DaemonSet", "StatefulSet", "Job")


def helm_binary() -> pathlib.Path:
    if not HELM.is_file():
        pytest.fail(f"helm {HELM_VERSION} is not built: run `make helm` (go install helm.sh/helm/v3/cmd/helm@"
                    f"{HELM_VERSION} from the Go module proxy into {HELM.parent}); `make test` builds it first",
                    pytrace=False)
    return HELM


def chart_tools() -> pathlib.Path:
    if not CHART_TOOLS.is_file():
        pytest.fail(f"the chart tests' Go helpers are not built: run `make chart-tools` (tests/chart/tools -> "
                    f"{CHART_TOOLS}); `make test` builds them first", pytrace=False)
    return CHART_TOOLS


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run helm; with check, a non-zero exit fails the test with helm's own message."""
    p = subprocess.run([str(helm_binary()), *map(str, args)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "HELM_CACHE_HOME": "/tmp/helm-cache", "HELM_CONFIG_HOME": "/tmp/helm-config",
                            "HELM_DATA_HOME": "/tmp/helm-data"})
    if check and p.returncode != 0:
        pytest.fail(f"helm {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stderr}{p.stdout}", pytrace=False)
    return p


def with_security(values=()) -> list:
    """`values`, preceded by fixtures/secure.yaml (a certificate source and a tokens Secret, which the
    chart requires) unless one of them has a `security:` block of its own."""
    values = list(values)
    if any("security" in (yaml.safe_load(pathlib.Path(v).read_text()) or {}) for v in values):
        return values
    return [SECURE, *values]


def template_args(values=(), set_values: dict | None = None, chart: pathlib.Path = CHART,
                  secure: bool = True) -> list[str]:
    """`helm template` arguments; with `secure`, values go through with_security()."""
    args = ["template", RELEASE, str(chart), "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION]
    for v in (with_security(values) if secure else values):
        args += ["-f", str(v)]
    for k, v in (set_values or {}).items():
        args += ["--set-json", f"{k}={json.dumps(v)}"]
    return args


def render_text(values=(), set_values: dict | None = None, chart: pathlib.Path = CHART, secure: bool = True) -> str:
    """`helm template` output, as text (what `kubectl apply` would get)."""
    return helm(*template_args(values, set_values, chart, secure=secure)).stdout


def render(values=(), set_values: dict | None = None, chart: pathlib.Path = CHART, secure: bool = True) -> list[dict]:
    """`helm template` output, parsed: one dict per manifest (empty documents dropped)."""
    return [d for d in yaml.safe_load_all(render_text(values, set_values, chart, secure)) if d]


def render_error(values=(), set_values: dict | None = None, secure: bool = True) -> str:
    """helm's error message for values that must not render (fails the test if they do)."""
    p = helm(*template_args(values, set_values, secure=secure), check=False)
    if p.returncode == 0:
        pytest.fail(f"helm rendered values that must be refused: {values} {set_values}", pytrace=False)
    return p.stderr


def find(docs: list[dict], kind: str, component: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (
        component is None or d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component)]


def one(docs: list[dict], kind: str, component: str | None = None) -> dict:
    found = find(docs, kind, component)
    assert len(found) == 1, f"expected one {kind} {component or ''}, found {[d['metadata']['name'] for d in found]}"
    return found[0]


def pod_spec(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"]


def containers(docs: list[dict], init: bool = True):
    """(workload, container) for every container of every workload; init containers too."""
    for d in docs:
        if d["kind"] in WORKLOAD_KINDS:
            spec = pod_spec(d)
            for c in (spec.get("initContainers") or []) if init else []:
                yield d, c
            for c in spec["containers"]:
                yield d, c


def container_env(c: dict, secrets: str = "secret-from-kubernetes", node: str = "node-a",
                  pod: str = "pod-a") -> dict[str, str]:
    """The container's environment as the kubelet would set it: literal values; secretKeyRef ->
    `secrets`; fieldRef spec.nodeName / metadata.name -> `node` / `pod`."""
    env = {}
    for e in c.get("env") or []:
        if "value" in e:
            env[e["name"]] = expand(str(e["value"]), env)   # $(VAR) of a variable defined before it
        elif "secretKeyRef" in e.get("valueFrom", {}):
            env[e["name"]] = secrets
        elif "fieldRef" in e.get("valueFrom", {}):
            path = e["valueFrom"]["fieldRef"]["fieldPath"]
            env[e["name"]] = {"spec.nodeName": node, "metadata.name": pod}.get(path, path)
    return env


def expand(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command and args."""
    for k, v in env.items():
        arg = arg.replace(f"$({k})", v)
    return arg


def command_line(c: dict) -> list[str]:
    """The container's argv with $(VAR) expanded (command + args)."""
    env = container_env(c)
    return [expand(a, env) for a in (c.get("command") or []) + (c.get("args") or [])]
