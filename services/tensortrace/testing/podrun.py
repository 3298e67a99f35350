"""Run what a Helm chart renders, as local processes: each container's command, args and env from
the manifests, under the uid/gid/groups its securityContext declares — the proof that what the
chart renders runs (tests/chart/test_render_run.py).

    docs = list(yaml.safe_load_all(helm_template_output))
    with PodRunner(docs, root="/tmp/tt-run-x", external={"kafka:9092": broker.bootstrap}) as run:
        run.start_pod("tt-tensortrace-exporter")            # init containers to completion, then containers
        run.wait_ready("tt-tensortrace-exporter")           # its readinessProbe, on its mapped port
        addr = run.service_address("tt-tensortrace-query", 50052)   # "127.0.0.1:41234"

What a kubelet would provide, and how it is provided here (the only changes made to what the chart
rendered):
- **identity**: runAsUser/runAsGroup (container over pod over the image's USER), supplementalGroups
  plus fsGroup as supplementary groups; runAsNonRoot with uid 0 is refused, as the kubelet does.
- **volumes**: each mountPath is a local directory, and the rendered args and env name that
  directory instead (path prefixes rewritten). A hostPath is one directory per host path, shared by
  every pod (created root 0755 by DirectoryOrCreate, as the kubelet does); emptyDir 0777 per pod; a
  PersistentVolumeClaim one directory per claim, group fsGroup and setgid when the pod has one. A
  `subPath`/`subPathExpr` mount is that subdirectory, made as the kubelet makes it (root, the
  volume root's mode).
- **network**: each pod would have its own IP; here all share the loopback. Every declared
  containerPort gets a free local port: a `--...port=P` argument naming a declared port is
  rewritten, a listen host `0.0.0.0` becomes 127.0.0.1, and TensorTrace services get
  `--http-host=127.0.0.1` when none is rendered (their default is every interface). A port a process
  listens on but the manifest does not declare is not mapped: its probe or its Service fails.
- **addresses**: `<service>[.<ns>[.svc[.cluster.local]]]:<port>` of a rendered Service becomes the
  local port of the pod it selects (targetPort by name or number); `external` maps other addresses
  (the Kafka bootstrap servers) to local ones.
- **secrets**: the Secrets a cluster would hold are given by the caller (`secrets={name: {key:
  bytes}}`; the chart names Secrets the user creates). A `secret` volume is a directory per pod and
  volume holding each key (or the `items` it lists, under their `path`), owned by root with the
  volume's defaultMode (0644, as the kubelet writes them); a missing Secret or key fails the pod
  unless `optional`, as on a node. `secretKeyRef` env takes the key's value.
- **env**: value, fieldRef (metadata.name/namespace, spec.nodeName, status.podIP), secretKeyRef
  (above), `$(VAR)` expansion in command, args and env, as Kubernetes does.
- **command**: `tensortrace ...` (the images' entry point) runs this environment's CLI; `/bin/sh`
  runs the host's. Anything else (an inference engine) must be replaced by the caller (`replace`).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field

from tensortrace.testing.privileges import Identity, tensortrace_argv

# USER of the images this repository builds (docker/*/Dockerfile), by repository name suffix.
IMAGE_USERS = {"tensortrace-exporter": (10001, 10001), "tensortrace": (10001, 10001),
               "sglang-tensortrace": (1000, 1000)}
WORKLOAD_KINDS = ("DaemonSet", "Deployment", "StatefulSet", "Job")


class ContainerFailed(RuntimeError):
    """A container exited (or never became ready); the message carries its log's tail."""


@dataclass
class Container:
    pod: str
    name: str
    init: bool
    spec: dict
    identity: Identity
    ports: dict[str, int] = field(default_factory=dict)   # name (or str(number)) -> containerPort


@dataclass
class Pod:
    name: str               # the workload's name (one pod per workload here)
    kind: str
    labels: dict
    spec: dict
    init_containers: list[Container]
    containers: list[Container]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _image_user(image: str) -> tuple[int, int] | None:
    repo = image.rsplit("/", 1)[-1].split("@")[0].split(":")[0]
    return IMAGE_USERS.get(repo)


def _identity(pod_sc: dict, c: dict, where: str) -> Identity:
    sc = c.get("securityContext") or {}
    default = _image_user(c.get("image", ""))
    uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
    gid = sc.get("runAsGroup", pod_sc.get("runAsGroup"))
    if uid is None or gid is None:
        if default is None:
            raise ValueError(f"{where}: no runAsUser/runAsGroup and image {c.get('image')!r} is not one of ours")
        uid = default[0] if uid is None else uid
        gid = default[1] if gid is None else gid
    for what, v in (("runAsUser", uid), ("runAsGroup", gid)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise ValueError(f"{where}: {what} {v!r} is not an integer")
    if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) and uid == 0:
        raise ValueError(f"{where}: runAsNonRoot is true but the container runs as uid 0 (the kubelet refuses it)")
    groups = list(pod_sc.get("supplementalGroups") or [])
    if pod_sc.get("fsGroup") is not None:
        groups.append(pod_sc["fsGroup"])
    for g in groups:
        if not isinstance(g, int) or isinstance(g, bool):
            raise ValueError(f"{where}: supplementary group {g!r} is not an integer")
    return Identity(uid, gid, tuple(sorted(set(groups))))


def pods_from_manifests(docs: list[dict]) -> dict[str, Pod]:
    pods = {}
    for d in docs:
        if not d or d.get("kind") not in WORKLOAD_KINDS:
            continue
        name = d["metadata"]["name"]
        tmpl = d["spec"]["template"]
        spec = tmpl["spec"]
        pod_sc = spec.get("securityContext") or {}

        def containers(key: str, init: bool) -> list[Container]:
            out = []
            for c in spec.get(key) or []:
                where = f"{d['kind']} {name}, container {c['name']}"
                ports = {}
                for p in c.get("ports") or []:
                    ports[str(p["containerPort"])] = p["containerPort"]
                    if p.get("name"):
                        ports[p["name"]] = p["containerPort"]
                out.append(Container(name, c["name"], init, c, _identity(pod_sc, c, where), ports))
            return out
        pods[name] = Pod(name, d["kind"], dict(tmpl.get("metadata", {}).get("labels") or {}), spec,
                         containers("initContainers", True), containers("containers", False))
    return pods


_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion: defined variables are replaced, `$$` is a literal `$`,
    undefined references stay as they are."""
    return _VAR.sub(lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


class PodRunner:
    def __init__(self, docs: list[dict], root: str, external: dict[str, str] | None = None,
                 namespace: str = "default", node: str = "node-1", replace: dict | None = None,
                 secrets: dict[str, dict[str, bytes | str]] | None = None):
        self.docs = [d for d in docs if d]
        self.pods = pods_from_manifests(self.docs)
        self.services = {d["metadata"]["name"]: d for d in self.docs if d.get("kind") == "Service"}
        self.root = root
        self.namespace = namespace
        self.node = node
        self.external = dict(external or {})
        self.replace = dict(replace or {})      # (pod, container) -> fn(container, argv, env) -> (argv, env)
        self.secrets = {name: {k: v.encode() if isinstance(v, str) else bytes(v) for k, v in data.items()}
                        for name, data in (secrets or {}).items()}
        self.local_ports: dict[tuple[str, int], int] = {}   # (pod, containerPort) -> local port
        for pod in self.pods.values():
            for c in pod.init_containers + pod.containers:
                for p in set(c.ports.values()):
                    self.local_ports.setdefault((pod.name, p), _free_port())
        self.procs: dict[tuple[str, str], subprocess.Popen] = {}
        self.logs: dict[tuple[str, str], str] = {}
        os.makedirs(os.path.join(root, "logs"), exist_ok=True)

    # -- context -----------------------------------------------------------------------------
    def __enter__(self) -> "PodRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()

    # -- volumes -----------------------------------------------------------------------------
    def _volume_dir(self, pod: Pod, vol_name: str) -> str:
        vols = {v["name"]: v for v in pod.spec.get("volumes") or []}
        if vol_name not in vols:
            raise ValueError(f"{pod.name}: volumeMount {vol_name!r} names no volume")
        v = vols[vol_name]
        fs_group = (pod.spec.get("securityContext") or {}).get("fsGroup")
        if "hostPath" in v:
            path = os.path.join(self.root, "host", v["hostPath"]["path"].strip("/"))
            if not os.path.isdir(path):
                if v["hostPath"].get("type") not in ("DirectoryOrCreate", None, ""):
                    raise ValueError(f"{pod.name}: hostPath {v['hostPath']['path']} does not exist (type {v['hostPath'].get('type')})")
                os.makedirs(path, exist_ok=True)
                os.chmod(path, 0o755)   # as the kubelet creates it: root, 0755
            return path
        if "emptyDir" in v:
            path = os.path.join(self.root, "pods", pod.name, vol_name)
            if not os.path.isdir(path):
                os.makedirs(path)
                os.chmod(path, 0o777)
            return path
        if "persistentVolumeClaim" in v:
            path = os.path.join(self.root, "pvc", v["persistentVolumeClaim"]["claimName"])
            if not os.path.isdir(path):
                os.makedirs(path)
                os.chmod(path, 0o755)
            if fs_group is not None:   # the kubelet's fsGroup ownership management
                os.chown(path, -1, fs_group)
                os.chmod(path, 0o2775)
            return path
        if "secret" in v:
            return self._secret_volume(pod, vol_name, v["secret"])
        raise NotImplementedError(f"{pod.name}: volume {vol_name!r} of type {sorted(set(v) - {'name'})} is not emulated")

    def _secret_key(self, where: str, name: str, key: str, optional: bool) -> bytes | None:
        data = self.secrets.get(name)
        if data is None or key not in data:
            if optional:
                return None
            what = f"Secret {name!r} does not exist" if data is None else f"Secret {name!r} has no key {key!r} (has: {', '.join(sorted(data))})"
            raise ContainerFailed(f"{where}: {what} (the kubelet would not start the pod)")
        return data[key]

    def _secret_volume(self, pod: Pod, vol_name: str, src: dict) -> str:
        path = os.path.join(self.root, "secrets", pod.name, vol_name)
        if os.path.isdir(path):
            return path
        name, optional = src["secretName"], bool(src.get("optional"))
        mode = src.get("defaultMode", 0o644)
        where = f"{pod.name}: volume {vol_name!r}"
        if src.get("items"):
            files = [(i["key"], i["path"], i.get("mode", mode)) for i in src["items"]]
        else:
            files = [(k, k, mode) for k in sorted(self.secrets.get(name, {}))]
            if name not in self.secrets and not optional:
                self._secret_key(where, name, "", False)
        os.makedirs(path)
        os.chmod(path, 0o755)
        for key, rel, m in files:
            data = self._secret_key(where, name, key, optional)
            if data is None:
                continue
            if rel.startswith("/") or ".." in rel.split("/"):
                raise ValueError(f"{where}: item path {rel!r} must be relative inside the volume")
            f = os.path.join(path, rel)
            os.makedirs(os.path.dirname(f), exist_ok=True)
            with open(f, "wb") as out:
                out.write(data)
            os.chmod(f, m)
        return path

    def mounts(self, pod: Pod, c: Container) -> dict[str, str]:
        """mountPath -> local directory. A `subPath` / `subPathExpr` (`$(VAR)` from the container's
        env) mounts that subdirectory of the volume, created as the kubelet does (doSafeMakeDir):
        by root, then chmod to the mode of the volume's root, setgid included."""
        out = {}
        env = None
        for m in c.spec.get("volumeMounts") or []:
            path = self._volume_dir(pod, m["name"])
            sub = m.get("subPath") or ""
            if m.get("subPathExpr"):
                env = self._env(pod, c) if env is None else env
                sub = expand(m["subPathExpr"], env)
            if sub:
                if sub.startswith("/") or ".." in sub.split("/"):
                    raise ValueError(f"{pod.name}/{c.name}: subPath {sub!r} must be a relative path inside the volume")
                full = os.path.join(path, sub)
                if not os.path.isdir(full):
                    os.makedirs(full)
                    os.chmod(full, os.stat(path).st_mode & 0o7777)
                path = full
            out[m["mountPath"]] = path
        return out

    # -- addresses ---------------------------------------------------------------------------
    def service_address(self, service: str, port: int) -> str:
        """127.0.0.1:<local port> of the pod behind a rendered Service's port."""
        svc = self.services.get(service)
        if svc is None:
            raise KeyError(f"no Service {service!r} rendered (have: {', '.join(sorted(self.services))})")
        sp = next((p for p in svc["spec"]["ports"] if p["port"] == port), None)
        if sp is None:
            raise KeyError(f"Service {service} has no port {port} ({[p['port'] for p in svc['spec']['ports']]})")
        selector = svc["spec"].get("selector") or {}
        targets = [p for p in self.pods.values()
                   if selector and all(p.labels.get(k) == v for k, v in selector.items())]
        if not targets:
            raise KeyError(f"Service {service} selects no rendered pod ({selector})")
        target = sp.get("targetPort", port)
        for pod in targets:
            for c in pod.containers:
                if str(target) in c.ports:
                    return f"127.0.0.1:{self.local_ports[(pod.name, c.ports[str(target)])]}"
        raise KeyError(f"Service {service} port {port}: targetPort {target!r} is not a containerPort of "
                       f"{', '.join(p.name for p in targets)}")

    def _address_map(self) -> dict[str, str]:
        out = dict(self.external)
        ns = self.namespace
        for name, svc in self.services.items():
            for sp in svc["spec"].get("ports") or []:
                try:
                    local = self.service_address(name, sp["port"])
                except KeyError:
                    continue   # a Service of a pod this install does not run
                for host in (name, f"{name}.{ns}", f"{name}.{ns}.svc", f"{name}.{ns}.svc.cluster.local"):
                    out[f"{host}:{sp['port']}"] = local
        return out

    # -- one container -----------------------------------------------------------------------
    def _env(self, pod: Pod, c: Container) -> dict[str, str]:
        env: dict[str, str] = {}
        for e in c.spec.get("env") or []:
            if "value" in e:
                env[e["name"]] = expand(str(e["value"]), env)
            elif "valueFrom" in e:
                vf = e["valueFrom"]
                if "fieldRef" in vf:
                    fp = vf["fieldRef"]["fieldPath"]
                    env[e["name"]] = {"metadata.name": f"{pod.name}-0", "metadata.namespace": self.namespace,
                                      "spec.nodeName": self.node, "status.podIP": "127.0.0.1",
                                      "status.hostIP": "127.0.0.1"}[fp]
                elif "secretKeyRef" in vf:
                    ref = vf["secretKeyRef"]
                    data = self._secret_key(f"{pod.name}/{c.name}: env {e['name']}", ref["name"], ref["key"],
                                            bool(ref.get("optional")))
                    if data is not None:
                        env[e["name"]] = data.decode()
                else:
                    raise NotImplementedError(f"{pod.name}/{c.name}: env {e['name']} from {sorted(vf)} is not emulated")
            else:
                env[e["name"]] = ""
        return env

    def argv_env(self, pod: Pod, c: Container) -> tuple[list[str], dict[str, str]]:
        """The container's argv and environment as it will run here (every rewrite applied)."""
        env = self._env(pod, c)
        command = [expand(str(x), env) for x in c.spec.get("command") or []]
        args = [expand(str(x), env) for x in c.spec.get("args") or []]
        if not command and _image_user(c.spec.get("image", "")) and "sglang" not in c.spec.get("image", ""):
            command = ["tensortrace"]   # our images' ENTRYPOINT
        mounts = self.mounts(pod, c)
        addresses = self._address_map()
        ports = set(c.ports.values())

        # One pass each (a replaced path or address is never rewritten again), longest match first.
        by_path = {m.rstrip("/") or "/": d for m, d in mounts.items()}
        path_re = re.compile(r"(?:(?<=^)|(?<=[\s=:,/\"']))(" + "|".join(
            re.escape(m) for m in sorted(by_path, key=len, reverse=True)) + r")(?=/|$|[\s,:\"'])") if by_path else None
        addr_re = re.compile(r"(?<![\w.-])(" + "|".join(
            re.escape(a) for a in sorted(addresses, key=len, reverse=True)) + r")(?![\w.-])") if addresses else None

        def rewrite(s: str, is_arg: bool) -> str:
            if path_re is not None:
                s = path_re.sub(lambda m: by_path[m.group(1)], s)
            if addr_re is not None:
                s = addr_re.sub(lambda m: addresses[m.group(1)], s)
            if is_arg:
                m = re.fullmatch(r"(--[\w-]*port)=(\d+)", s)
                if m and int(m.group(2)) in ports:
                    s = f"{m.group(1)}={self.local_ports[(pod.name, int(m.group(2)))]}"
                m = re.fullmatch(r"(--[\w-]*host)=0\.0\.0\.0", s)
                if m:
                    s = f"{m.group(1)}=127.0.0.1"
            return s

        args = [rewrite(a, True) for a in args]
        command = [rewrite(a, True) for a in command]
        env = {k: rewrite(v, False) for k, v in env.items()}
        if command[:1] == ["tensortrace"]:
            rest = command[1:] + args
            if rest and rest[0] not in ("ring-dir", "exporterctl", "show", "trace", "--help") \
                    and not any(a.startswith(("--http-host", "--metrics-host")) for a in rest):
                rest.append("--http-host=127.0.0.1")
            argv = tensortrace_argv(*rest)
        elif command[:1] in (["/bin/sh"], ["sh"], ["/bin/bash"], ["bash"]):
            argv = ["/bin/sh" if command[0].endswith("sh") and "bash" not in command[0] else "/bin/bash"] + command[1:] + args
        else:
            argv = command + args
        base = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOSTNAME": f"{pod.name}-0", "HOME": "/"}
        base.update(env)
        key = (pod.name, c.name)
        if key in self.replace:
            argv, base = self.replace[key](c, argv, base)
        elif command[:1] not in (["tensortrace"], ["/bin/sh"], ["sh"], ["/bin/bash"], ["bash"]):
            raise NotImplementedError(f"{pod.name}/{c.name}: command {command} cannot run here; pass a replacement")
        return argv, base

    def _spawn(self, pod: Pod, c: Container) -> subprocess.Popen:
        argv, env = self.argv_env(pod, c)
        log = os.path.join(self.root, "logs", f"{pod.name}.{c.name}.log")
        self.logs[(pod.name, c.name)] = log
        with open(log, "ab") as out:
            out.write(f"# {c.identity}: {argv[:1] + [a if len(a) < 300 else a[:60] + '...' for a in argv[1:]]}\n".encode())
            out.flush()
            return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd="/",
                                    preexec_fn=_preexec(c.identity), start_new_session=False)

    def log_tail(self, pod: str, container: str, n: int = 4000) -> str:
        try:
            with open(self.logs[(pod, container)], "rb") as f:
                return f.read()[-n:].decode(errors="replace")
        except (KeyError, OSError):
            return ""

    # -- pods --------------------------------------------------------------------------------
    def start_pod(self, name: str, init_timeout_s: float = 180.0) -> Pod:
        """Run its init containers to completion (each must exit 0), then start its containers."""
        pod = self.pods[name]
        for c in pod.init_containers:
            p = self._spawn(pod, c)
            try:
                rc = p.wait(timeout=init_timeout_s)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                raise ContainerFailed(f"{name}/{c.name} (init) did not finish in {init_timeout_s:.0f}s:\n"
                                      f"{self.log_tail(name, c.name)}") from None
            if rc != 0:
                raise ContainerFailed(f"{name}/{c.name} (init) exited {rc}:\n{self.log_tail(name, c.name)}")
        for c in pod.containers:
            self.procs[(name, c.name)] = self._spawn(pod, c)
        return pod

    def _probe_url(self, pod: Pod, c: Container, which: str) -> str | None:
        probe = c.spec.get(which) or {}
        hg = probe.get("httpGet")
        if not hg:
            return None
        port = hg["port"]
        if str(port) not in c.ports:
            raise ContainerFailed(f"{pod.name}/{c.name}: {which} port {port!r} is not a declared containerPort "
                                  f"({sorted(c.ports)})")
        return f"http://127.0.0.1:{self.local_ports[(pod.name, c.ports[str(port)])]}{hg.get('path', '/')}"

    def wait_ready(self, name: str, timeout_s: float = 120.0) -> None:
        """Every container's readinessProbe answers 200 and its livenessProbe too (no probe: running)."""
        pod = self.pods[name]
        deadline = time.monotonic() + timeout_s
        for c in pod.containers:
            urls = [u for u in (self._probe_url(pod, c, "livenessProbe"), self._probe_url(pod, c, "readinessProbe")) if u]
            proc = self.procs[(name, c.name)]
            last = ""
            while True:
                if proc.poll() is not None:
                    raise ContainerFailed(f"{name}/{c.name} exited {proc.returncode}:\n{self.log_tail(name, c.name)}")
                ok = True
                for url in urls:
                    try:
                        with urllib.request.urlopen(url, timeout=2) as r:
                            ok &= r.status == 200
                    except Exception as e:  # not listening yet, 503 not ready
                        ok, last = False, f"{url}: {e}"
                if ok:
                    break
                if time.monotonic() > deadline:
                    raise ContainerFailed(f"{name}/{c.name} not ready after {timeout_s:.0f}s ({last}):\n"
                                          f"{self.log_tail(name, c.name)}")
                time.sleep(0.2)

    def http(self, name: str, container: str, port_name: str, path: str) -> str:
        c = next(c for c in self.pods[name].containers if c.name == container)
        url = f"http://127.0.0.1:{self.local_ports[(name, c.ports[port_name])]}{path}"
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.read().decode()

    def stop_all(self, timeout_s: float = 40.0) -> dict[tuple[str, str], int]:
        """SIGTERM every container (as the kubelet does), SIGKILL what is left after the timeout."""
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        codes = {}
        for key, p in self.procs.items():
            try:
                codes[key] = p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                codes[key] = p.wait()
        self.procs.clear()
        return codes


def _preexec(ident: Identity):
    drop = ident.preexec()

    def run() -> None:
        os.setpgrp()          # its own process group: a signal to the test does not reach it twice
        os.umask(0o022)       # the container runtime's default
        drop()
    return run
