"""Test harness for the SGLang backend: find SGLang, launch a real server as a subprocess (its own
process group, always killed), read a Ring² directory back through the production split rule.

SGLang's tests run under the SGLang virtualenv (scripts/sglang/run-tests.sh); under the project
venv, where SGLang is not installed, they skip — unless TENSORTRACE_REQUIRE_SGLANG=1 (set by
that script), where a missing SGLang is a failure.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STUB_DIR = os.path.join(ROOT, "scripts", "sglang", "sgl_kernel_stub")
sys.path.insert(0, os.path.join(ROOT, "scripts", "sglang"))

def _has_sglang() -> bool:
    # tests/ is on sys.path under pytest, so this very directory is a namespace package called
    # `sglang`; the real SGLang is a regular package (it has an origin file).
    try:
        spec = importlib.util.find_spec("sglang")
    except (ImportError, ValueError):
        return False
    return spec is not None and spec.origin is not None


HAS_SGLANG = _has_sglang()
REQUIRE_SGLANG = os.environ.get("TENSORTRACE_REQUIRE_SGLANG") == "1"


def require_sglang():
    """Skip (project venv) or fail (SGLang venv run) when SGLang cannot be imported."""
    if HAS_SGLANG:
        return
    if REQUIRE_SGLANG:
        pytest.fail("TENSORTRACE_REQUIRE_SGLANG=1 but `import sglang` fails in " + sys.executable)
    pytest.skip("SGLang is not installed in this interpreter; these tests run under the SGLang venv "
                "(bash scripts/sglang/run-tests.sh)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class SGLangServer:
    """A real `python -m sglang.launch_server` on 127.0.0.1 with the TensorTrace plugin."""

    model_path: str
    ring_dir: str
    log_path: str
    port: int = 0
    env_extra: dict = field(default_factory=dict)
    args_extra: tuple = ()
    proc: subprocess.Popen | None = None
    startup_s: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 240.0) -> "SGLangServer":
        self.port = self.port or free_port()
        env = dict(os.environ)
        env.update({
            "PYTHONPATH": os.pathsep.join(p for p in (STUB_DIR, env.get("PYTHONPATH", "")) if p),
            "SGLANG_USE_CPU_ENGINE": "1",
            "SGLANG_PLUGINS": "tensortrace",
            "TENSORTRACE_RING_DIR": self.ring_dir,
            "TENSORTRACE_RING_CAPACITY": "64M",
        })
        env.update(self.env_extra)
        cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", self.model_path,
               "--host", "127.0.0.1", "--port", str(self.port), "--device", "cpu",
               "--attention-backend", "torch_native", "--disable-cuda-graph", "--disable-overlap-schedule",
               "--sleep-on-idle", "--dtype", "float32", "--max-total-tokens", "8192",
               "--mem-fraction-static", "0.05", "--skip-server-warmup", *self.args_extra]
        t0 = time.monotonic()
        self._log = open(self.log_path, "w")
        # Own process group: SGLang spawns scheduler/detokenizer children; stop() kills them all.
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=ROOT)
        deadline = t0 + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"SGLang server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        self.startup_s = time.monotonic() - t0
                        return self
            except OSError:
                pass
            time.sleep(1.0)
        raise RuntimeError(f"SGLang server not healthy after {timeout_s:.0f}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # children that ignored SIGTERM
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)
        self.proc = None
        self._log.close()

    def log_tail(self, n: int = 60) -> str:
        try:
            with open(self.log_path) as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def post(self, path: str, body: dict, headers: dict | None = None, timeout: float = 120.0):
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")


@dataclass
class RingContents:
    records: list = field(default_factory=list)    # TensorRecords
    summaries: dict = field(default_factory=dict)  # request_id -> RequestSummary
    steps: list = field(default_factory=list)      # RingStep

    def by_request(self):
        out = defaultdict(list)
        for r in self.records:
            out[r.request_id].append(r)
        return out


def read_rings(ring_dir: str) -> RingContents:
    """Every frame of every ring in `ring_dir`, split into TensorRecords the way the exporter does
    (tensortrace.ring.slabs). Reads without releasing (the producer keeps running)."""
    from tensortrace.ring.format import FrameKind, RingReader
    from tensortrace.ring.slabs import split_slab, summary_record
    from tensortrace.v1 import records_pb2 as pb
    from tensortrace.v1 import ring_pb2

    out = RingContents()
    for path in sorted(glob.glob(os.path.join(ring_dir, "*.ring"))):
        reader = RingReader.open(path)
        try:
            ident = reader.header.identity
            producer = pb.Producer(pod=ident.pod, pid=ident.pid, tp_rank=ident.tp_rank,
                                   generation=reader.header.generation)
            steps = {}
            for frame in reader.frames():
                if frame.kind == FrameKind.STEP:
                    st = ring_pb2.RingStep.FromString(bytes(frame.meta))
                    steps[st.step] = st
                    out.steps.append(st)
                elif frame.kind == FrameKind.SLAB:
                    slab = ring_pb2.RingSlab.FromString(bytes(frame.meta))
                    out.records += split_slab(steps[slab.step], slab, frame.payload, frame.seq, producer)
                elif frame.kind == FrameKind.SUMMARY:
                    s = summary_record(pb.RequestSummary.FromString(bytes(frame.meta)), frame.seq, producer)
                    assert s.request_id not in out.summaries, f"two summaries for {s.request_id}"
                    out.summaries[s.request_id] = s
        finally:
            reader.close()
    return out
