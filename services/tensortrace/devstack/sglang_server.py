"""A real SGLang server with the TensorTrace plugin, on 127.0.0.1, as a subprocess in its own
process group (SGLang spawns scheduler/detokenizer children; stop() kills the whole group).

    server = SGLangServer(model_path, ring_dir="/tmp/rings", log_path="/tmp/sglang.log",
                          python=".cache/sglang-venv/bin/python").start()
    status, body = server.post("/generate", {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 4}})
    server.stop()

Stdlib only: the SGLang venv (tests/sglang) and the project venv (the demo) both use it. The flags
are the ones that make SGLang 0.5.x serve on a CPU-only machine (docs/sglang.md); the CPU stand-in
for sgl_kernel (scripts/sglang/sgl_kernel_stub) goes on PYTHONPATH, which SGLang's children inherit.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
STUB_DIR = os.path.join(ROOT, "scripts", "sglang", "sgl_kernel_stub")
DEFAULT_VENV = os.path.join(ROOT, ".cache", "sglang-venv")


def _sglang_shm_files() -> set[str]:
    try:
        return {os.path.join("/dev/shm", n) for n in os.listdir("/dev/shm") if n.startswith("sglang_loads_")}
    except OSError:
        return set()


def group_pids(pgid: int) -> list[int]:
    """The processes of process group `pgid` now (from /proc/<pid>/stat; the server and SGLang's
    scheduler / detokenizer children, which stay in the group start_new_session made)."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[2]) == pgid:   # field 5: the process group
                    out.append(int(pid))
        except (OSError, ValueError, IndexError):
            continue
    return out


def _group_semaphore_inodes(pgid: int) -> set[int]:
    """Inodes of the /dev/shm files mapped by the processes of process group `pgid` (from
    /proc/<pid>/maps). SGLang's processes create multiprocessing named semaphores (sem.mp-*) and
    leave them behind when they are killed; glibc maps a semaphore under a temporary name before
    linking it to its own, so a mapping is matched to a sem.mp-* file by inode, never by name or age:
    other users' semaphores are never touched."""
    out: set[int] = set()
    for pid in group_pids(pgid):
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    if "/dev/shm/" in line:
                        out.add(int(line.split()[4]))   # address perms offset dev inode path
        except (OSError, ValueError, IndexError):
            continue
    return out


def _semaphores_with_inodes(inodes: set[int]) -> set[str]:
    out = set()
    try:
        names = os.listdir("/dev/shm")
    except OSError:
        return out
    for n in names:
        if n.startswith("sem.mp-"):
            path = os.path.join("/dev/shm", n)
            try:
                if os.stat(path).st_ino in inodes:
                    out.add(path)
            except OSError:
                continue
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sglang_python(venv: str | None = None) -> str:
    """The SGLang venv's interpreter ($SGLANG_VENV or .cache/sglang-venv, built by `make sglang-env`)."""
    return os.path.join(venv or os.environ.get("SGLANG_VENV") or DEFAULT_VENV, "bin", "python")


@dataclass
class SGLangServer:
    """A real `python -m sglang.launch_server` on 127.0.0.1 with the TensorTrace plugin."""

    model_path: str
    ring_dir: str
    log_path: str
    port: int = 0
    env_extra: dict = field(default_factory=dict)
    args_extra: tuple = ()
    python: str = sys.executable  # an interpreter with SGLang and tensortrace installed
    proc: subprocess.Popen | None = None
    startup_s: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 240.0) -> "SGLangServer":
        return self.launch().wait_healthy(timeout_s)

    def launch(self) -> "SGLangServer":
        """Start the process and return at once (wait_healthy() waits for it)."""
        self._shm_before = _sglang_shm_files()
        # SGLang names its ZMQ IPC sockets and scratch files with tempfile and leaves them behind
        # when its processes are killed: give it a temp directory of its own, removed by stop().
        self._tmpdir = tempfile.mkdtemp(prefix="tt-sglang-")
        self.port = self.port or free_port()
        env = dict(os.environ)
        env.update({
            "TMPDIR": self._tmpdir,
            "PYTHONPATH": os.pathsep.join(p for p in (STUB_DIR, env.get("PYTHONPATH", "")) if p),
            "SGLANG_USE_CPU_ENGINE": "1",
            "SGLANG_PLUGINS": "tensortrace",
            "TENSORTRACE_RING_DIR": self.ring_dir,
            "TENSORTRACE_RING_CAPACITY": "64M",
        })
        env.update(self.env_extra)
        cmd = [self.python, "-m", "sglang.launch_server", "--model-path", self.model_path,
               "--host", "127.0.0.1", "--port", str(self.port), "--device", "cpu",
               "--attention-backend", "torch_native", "--disable-cuda-graph", "--disable-overlap-schedule",
               "--sleep-on-idle", "--dtype", "float32", "--max-total-tokens", "8192",
               "--mem-fraction-static", "0.05", "--skip-server-warmup", *self.args_extra]
        self._t0 = time.monotonic()
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=ROOT)
        return self

    def wait_healthy(self, timeout_s: float = 240.0) -> "SGLangServer":
        deadline = self._t0 + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"SGLang server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        self.startup_s = time.monotonic() - self._t0
                        self._sem_inodes = _group_semaphore_inodes(self.proc.pid)
                        return self
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"SGLang server not healthy after {timeout_s:.0f}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None:
            return
        pgid = self.proc.pid
        inodes = getattr(self, "_sem_inodes", set()) | _group_semaphore_inodes(pgid)
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        # SGLang's shutdown makes semaphores of its own: keep noting the group's mappings meanwhile
        deadline = time.monotonic() + 15
        while self.proc.poll() is None and time.monotonic() < deadline:
            inodes |= _group_semaphore_inodes(pgid)
            time.sleep(0.1)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # children that ignored SIGTERM
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)
        self.proc = None
        self._log.close()
        # SGLang leaves its load-report segments in /dev/shm when its processes are killed
        # (sglang_loads_*.shm, 16 KiB each): remove the ones this server created.
        # And its processes' named semaphores (sem.mp-*): the ones they had mapped (by inode).
        for path in (_sglang_shm_files() - getattr(self, "_shm_before", set())) | _semaphores_with_inodes(inodes):
            try:
                os.unlink(path)
            except OSError:
                pass
        if getattr(self, "_tmpdir", None):
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

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
