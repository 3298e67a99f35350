"""Turning capture on in SGLang, both supported ways:

  * the chart's quick-start Deployment (sglang.enabled), and
  * for an existing Deployment, deploy/sglang-capture: a strategic-merge patch (`kubectl patch
    --patch-file`) and the Kustomize component around it, built here with kustomize's own engine
    (sigs.k8s.io/kustomize/api/krusty, `make chart-tools`) over a non-root SGLang Deployment
    (tests/chart/fixtures/sglang-existing).

Both must give the inference container the same thing (the image with the plugin, SGLANG_PLUGINS,
the ring directory, the ring group and the producer identity), what they give must be what the
agent's own configuration accepts, and the patch must leave the rest of the Deployment as it was.
"""

from __future__ import annotations

import os
import pathlib
import subprocess

import kubernetes_validate
import pytest
import yaml

from helmchart import (CHART, EXAMPLES, FIXTURES, KUBE_VERSION, ROOT, chart_tools, container_env, one, pod_spec,
                       render)

pytestmark = pytest.mark.unit

COMPONENT = ROOT / "deploy" / "sglang-capture"
EXISTING = FIXTURES / "sglang-existing"
SGLANG_PY = ROOT / ".cache" / "sglang-venv" / "bin" / "python"
CAPTURE_ENV = ("SGLANG_PLUGINS", "TENSORTRACE_RING_DIR", "TENSORTRACE_RING_GID", "TENSORTRACE_SELECTION",
               "TENSORTRACE_RING_CAPACITY", "TENSORTRACE_OVERFLOW", "POD_NAME", "NODE_NAME")


@pytest.fixture(scope="module")
def built() -> list[dict]:
    p = subprocess.run([str(chart_tools()), "kustomize", str(EXISTING)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return [d for d in yaml.safe_load_all(p.stdout) if d]


@pytest.fixture(scope="module")
def quickstart() -> dict:
    return one(render(values=[EXAMPLES / "nonroot-sglang.yaml"]), "Deployment", "sglang")


def _by_name(items):
    return {i["name"]: i for i in items or []}


def _sglang(deployment: dict) -> dict:
    return _by_name(pod_spec(deployment)["containers"])["sglang"]


def test_the_component_patches_the_labelled_deployment_and_keeps_what_was_there(built):
    before = {d["metadata"]["name"]: d for d in yaml.safe_load_all((EXISTING / "deployment.yaml").read_text())}
    after = {d["metadata"]["name"]: d for d in built}
    assert after["embedder"] == before["embedder"], "an unlabelled Deployment was changed"
    old, new = before["llama-serving"], after["llama-serving"]
    spec, old_spec = pod_spec(new), pod_spec(old)
    c, old_c = _sglang(new), _sglang(old)
    # what was there is still there
    assert new["spec"]["replicas"] == 2 and c["args"] == old_c["args"] and c["command"] == old_c["command"]
    assert c["resources"] == old_c["resources"] and c["ports"] == old_c["ports"]
    assert {"name": "HF_HOME", "value": "/models"} in c["env"]
    assert _by_name(c["volumeMounts"])["models"] == {"name": "models", "mountPath": "/models"}
    assert "models" in _by_name(spec["volumes"]) and "fetch-model" in _by_name(spec["initContainers"])
    assert _by_name(spec["containers"])["metrics-sidecar"] == _by_name(old_spec["containers"])["metrics-sidecar"]
    for k in ("runAsUser", "runAsGroup", "runAsNonRoot"):
        assert spec["securityContext"][k] == old_spec["securityContext"][k]
    # what capture needs
    assert c["image"] == "ghcr.io/tensortrace/sglang-tensortrace:0.5.23"
    assert spec["securityContext"]["supplementalGroups"] == [2000]
    env = container_env(c)
    assert {k: env[k] for k in CAPTURE_ENV} == {
        "SGLANG_PLUGINS": "tensortrace", "TENSORTRACE_RING_DIR": "/run/tensortrace", "TENSORTRACE_RING_GID": "2000",
        "TENSORTRACE_SELECTION": "hidden-states", "TENSORTRACE_RING_CAPACITY": "256M",
        "TENSORTRACE_OVERFLOW": "drop_newest", "POD_NAME": "pod-a", "NODE_NAME": "node-a"}
    assert _by_name(c["volumeMounts"])["tensortrace-rings"]["mountPath"] == "/run/tensortrace"
    assert _by_name(spec["volumes"])["tensortrace-rings"]["hostPath"] == {"path": "/run/tensortrace",
                                                                          "type": "DirectoryOrCreate"}
    wait = spec["initContainers"][0]
    assert wait["name"] == "tensortrace-wait-ring-dir"   # first: before anything else starts
    for d in built:
        kubernetes_validate.validate(d, KUBE_VERSION, strict=True)


def test_the_patch_gives_what_the_charts_quick_start_gives(built, quickstart):
    patched = [d for d in built if d["metadata"]["name"] == "llama-serving"][0]
    for dep in (patched, quickstart):
        assert pod_spec(dep)["securityContext"]["supplementalGroups"] == [2000]
    q, p = _sglang(quickstart), _sglang(patched)
    q_env = {e["name"]: e for e in q["env"] if e["name"] in CAPTURE_ENV}
    p_env = {e["name"]: e for e in p["env"] if e["name"] in CAPTURE_ENV}
    assert p_env == q_env | {"TENSORTRACE_RING_CAPACITY": p_env["TENSORTRACE_RING_CAPACITY"]}   # the example: 512M
    assert _by_name(q["volumeMounts"])["tensortrace-rings"] == _by_name(p["volumeMounts"])["tensortrace-rings"]
    assert _by_name(pod_spec(quickstart)["volumes"])["tensortrace-rings"] == \
        _by_name(pod_spec(patched)["volumes"])["tensortrace-rings"]
    q_wait, p_wait = pod_spec(quickstart)["initContainers"][0], pod_spec(patched)["initContainers"][0]
    assert q_wait == p_wait
    assert q["image"] == p["image"]
    # the patch's values are the chart's defaults
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert (values["rings"]["hostPath"], values["rings"]["groupId"]) == ("/run/tensortrace", 2000)
    assert f'{values["sglang"]["image"]["repository"]}:{values["sglang"]["image"]["tag"]}' == p["image"]


def test_the_agent_accepts_the_capture_environment(built, quickstart, monkeypatch):
    from tensortrace.agent.backends.sglang.config import SGLangBackendConfig
    from tensortrace.agent.config import AgentConfig

    for dep in (quickstart, [d for d in built if d["metadata"]["name"] == "llama-serving"][0]):
        env = container_env(_sglang(dep))
        cfg = SGLangBackendConfig.from_env(env)
        cfg.validate()
        assert cfg.ring_dir == "/run/tensortrace" and not cfg.disabled
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        agent = AgentConfig(ring_dir=cfg.ring_dir)
        agent.validate()
        assert agent.ring_gid == 2000 and agent.ring_file_mode == 0o660


def test_the_wait_for_the_ring_dir_goes_on_when_prepared_and_never_blocks_for_good(built, tmp_path):
    """The init container's script, run by sh: it returns at once for a prepared (setgid, writable)
    directory; for an unprepared one it gives up (exit 0) instead of keeping SGLang from starting."""
    wait = pod_spec([d for d in built if d["metadata"]["name"] == "llama-serving"][0])["initContainers"][0]
    script = wait["command"][2]
    assert wait["command"][:2] == ["/bin/sh", "-c"] and "seq 1 60" in script and "sleep 2" in script
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    os.chmod(prepared, 0o2770)
    p = subprocess.run(["/bin/sh", "-c", script], env={"TENSORTRACE_RING_DIR": str(prepared), "PATH": os.environ["PATH"]},
                       capture_output=True, text=True, timeout=10)
    assert p.returncode == 0 and p.stdout == ""
    fast = script.replace("seq 1 60", "seq 1 2").replace("sleep 2", "sleep 0.1")
    bare = tmp_path / "bare"
    bare.mkdir()
    os.chmod(bare, 0o755)
    p = subprocess.run(["/bin/sh", "-c", fast], env={"TENSORTRACE_RING_DIR": str(bare), "PATH": os.environ["PATH"]},
                       capture_output=True, text=True, timeout=10)
    assert p.returncode == 0 and "not prepared by the exporter yet" in p.stdout


def test_the_quick_start_runs_sglang_non_root_in_the_ring_group_with_its_spans_to_the_bridge(quickstart):
    spec = pod_spec(quickstart)
    assert spec["securityContext"] == {"runAsUser": 1000680000, "runAsNonRoot": True, "runAsGroup": 1000680000,
                                       "supplementalGroups": [2000]}
    c = _sglang(quickstart)
    assert c["command"] == ["python3", "-m", "sglang.launch_server"]
    assert "--otlp-traces-endpoint=tt-tensortrace-bridge:4317" in c["args"] and "--enable-trace" in c["args"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert _by_name(spec["volumes"])["dshm"]["emptyDir"]["medium"] == "Memory"
    kubernetes_validate.validate(quickstart, KUBE_VERSION, strict=True)


def _cpu(quantity) -> float:
    q = str(quantity)
    return int(q[:-1]) / 1000 if q.endswith("m") else float(q)


def test_the_quick_start_server_requests_far_more_cpu_than_the_exporter():
    """Under CPU contention the kernel shares a core by the pods' CPU requests: the server (its
    scheduler, tokenizer, detokenizer) must outweigh the node's exporter (docs/operations.md "CPU:
    keep the exporter below inference"); without a request its weight is the minimum, below the
    exporter's. 4:1 while fitting a 4-vCPU one-GPU node."""
    docs = render(values=[EXAMPLES / "nonroot-sglang.yaml"])
    server = _by_name(pod_spec(one(docs, "Deployment", "sglang"))["containers"])["sglang"]
    exporter = _by_name(pod_spec(one(docs, "DaemonSet", "exporter"))["containers"])["exporter"]
    assert _cpu(server["resources"]["requests"]["cpu"]) >= 4 * _cpu(exporter["resources"]["requests"]["cpu"])


def test_the_quick_start_arguments_are_accepted_by_sglangs_own_parser(quickstart):
    if not SGLANG_PY.is_file():
        pytest.skip(f"no SGLang here ({SGLANG_PY}; `make sglang-env` builds it): SGLang's parser not run")
    args = _sglang(quickstart)["args"]
    code = ("import argparse, json, sys\nfrom sglang.srt.server_args import ServerArgs\n"
            "p = argparse.ArgumentParser(); ServerArgs.add_cli_args(p)\n"
            "a = p.parse_args(sys.argv[1:])\n"
            "print(json.dumps([a.model_path, a.port, a.tp_size, a.enable_trace, a.otlp_traces_endpoint]))")
    p = subprocess.run([str(SGLANG_PY), "-c", code, *args], capture_output=True, text=True, timeout=300,
                       cwd=str(pathlib.Path("/tmp")))
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip().splitlines()[-1] == '["Qwen/Qwen3-8B", 30000, 1, true, "tt-tensortrace-bridge:4317"]'
