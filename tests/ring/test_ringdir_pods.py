"""Pod directories across uids (docs/operations.md "Pod isolation and the threat model"): the agent
writes into `<ring dir>/<namespace>_<pod>/` — made by kubelet for a `subPathExpr` mount (root, the
ring directory's mode) or, on a plain host, by the agent itself — and the exporter (uid 10001 in the
ring group, production defaults: no flat rings) reads it with the pod's identity from the location.
`tensortrace ring-dir prepare` fixes pod directories kubelet made before the ring directory was
prepared; `check` reports what the exporter would refuse. Each side is a real process under its own
uid/gids (the test runs as root)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from tensortrace.testing.privileges import Identity, can_switch_users, run_python_as, shared_tmpdir

pytestmark = [pytest.mark.unit,
              pytest.mark.skipif(not can_switch_users(), reason="needs root to run processes as other users")]

RING_GID = 2000
EXPORTER = Identity(10001, 10001, (RING_GID,))
AGENT_UID = Identity(1000, 1000, (RING_GID,))

AGENT = """
import json, sys
from tensortrace.agent import AgentConfig, CaptureAgent
from tensortrace.testing.ringgen import TrafficGen
try:
    agent = CaptureAgent(AgentConfig(ring_dir=sys.argv[1], model_id="m", pod=sys.argv[2], ring_capacity=1 << 20,
                                     ring_gid=2000))
except (OSError, ValueError) as e:
    print(json.dumps({"error": f"{type(e).__name__}: {e}"})); sys.exit(3)
gen = TrafficGen(agent.writer, n_requests=2, hooks=("resid_pre",), prefix=sys.argv[2])
gen.run(steps=3)
print(json.dumps({"path": agent.ring_path, "frames": gen.frames_written}))
"""

# The exporter's discovery with its production defaults (no --allow-flat-rings), as uid 10001.
EXPORTER_SCAN = """
import json, logging, sys
logging.disable(logging.CRITICAL)
from tensortrace.exporter.config import ExporterConfig
from tensortrace.exporter.service import Exporter
from tensortrace.service.kafka import KafkaConfig
exp = Exporter(ExporterConfig(ring_dir=sys.argv[1], ring_group=2000, control_port=-1, node="node-1",
                              kafka=KafkaConfig(bootstrap_servers="127.0.0.1:9")))
exp.scan()
out = {"refused": sorted(exp.refused.values()), "rings": {}}
for ring in exp.rings.values():
    frames = list(ring.reader.frames())
    ring.reader.release(frames[-1].end)
    out["rings"][ring.name] = {"frames": len(frames), "pod": ring.producer.pod, "node": ring.producer.node}
    ring.close()
print(json.dumps(out))
"""


def _json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.stdout.strip(), f"no output (rc {proc.returncode}): {proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ringdir(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tensortrace.cli", "ring-dir", *args],
                          capture_output=True, text=True, timeout=60)


def _kubelet_subpath(ring_dir: str, name: str) -> str:
    """What kubelet does for `subPathExpr` (doSafeMakeDir): mkdir as root, then chmod to the mode
    of the volume's root, setgid included; the group is the parent's when it is setgid."""
    path = os.path.join(ring_dir, name)
    os.mkdir(path)
    os.chmod(path, stat.S_IMODE(os.stat(ring_dir).st_mode))
    return path


@pytest.fixture
def hostpath():
    """A hostPath as Kubernetes creates it (DirectoryOrCreate): root, 0755."""
    with shared_tmpdir("tt-pods-") as d:
        path = os.path.join(d, "run-tensortrace")
        os.mkdir(path)
        os.chmod(path, 0o755)
        yield path


def test_a_pod_directory_kubelet_makes_in_the_prepared_ring_dir_works_for_a_non_root_agent(hostpath):
    assert _ringdir("prepare", "--path", hostpath, "--gid", str(RING_GID)).returncode == 0
    pod_dir = _kubelet_subpath(hostpath, "prod_sglang-0")
    st = os.stat(pod_dir)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, RING_GID, 0o2770)
    wrote = _json(run_python_as(AGENT_UID, AGENT, pod_dir, "sglang-0"))   # TENSORTRACE_RING_DIR: its mount
    got = _json(run_python_as(EXPORTER, EXPORTER_SCAN, hostpath))
    assert got["refused"] == []
    name = "prod_sglang-0/" + os.path.basename(wrote["path"])
    assert got["rings"] == {name: {"frames": wrote["frames"], "pod": "prod/sglang-0", "node": "node-1"}}


def test_prepare_fixes_pod_directories_kubelet_made_before_the_ring_dir_was_prepared(hostpath):
    pod_dir = _kubelet_subpath(hostpath, "prod_early")          # root:root 0755, like its parent
    got = _json(run_python_as(AGENT_UID, AGENT, pod_dir, "early"))
    assert got["error"].startswith(f"PermissionError: [Errno 13] cannot create rings in {pod_dir}")
    out = _ringdir("prepare", "--path", hostpath, "--gid", str(RING_GID))
    assert out.returncode == 0, out.stderr
    assert f"pod dir {pod_dir}: owner 0:0 -> 0:2000; mode 0755 -> 2770 (now owner uid 0, gid 2000, mode 2770)" \
        in out.stdout
    again = _ringdir("prepare", "--path", hostpath, "--gid", str(RING_GID))
    assert again.stdout.strip() == f"ring dir {hostpath}: unchanged (owner uid 0, gid 2000, mode 2770)"
    wrote = _json(run_python_as(AGENT_UID, AGENT, pod_dir, "early"))
    got = _json(run_python_as(EXPORTER, EXPORTER_SCAN, hostpath))
    assert got["rings"]["prod_early/" + os.path.basename(wrote["path"])]["frames"] == wrote["frames"]


def test_on_a_plain_host_another_uid_cannot_write_into_a_pods_directory(hostpath):
    assert _ringdir("prepare", "--path", hostpath, "--gid", str(RING_GID)).returncode == 0
    pod_dir = os.path.join(hostpath, "pod-b")
    wrote = _json(run_python_as(AGENT_UID, AGENT, pod_dir, "pod-b"))   # the agent makes its own directory
    st = os.stat(pod_dir)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1000, RING_GID, 0o2770)
    # another inference process of the node (uid 1001, in the ring group) plants a ring there, as pod-b
    proc = run_python_as(Identity(1001, 1001, (RING_GID,)), AGENT, pod_dir, "pod-b")
    hostile = _json(proc)
    # (an honest agent in that position is told at start-up why its rings would not be read)
    assert (f"ring directory {pod_dir} is owned by uid 1000, not this process (uid 1001): if it is a pod "
            "directory, the exporter refuses this process's rings there (owner_mismatch)") in proc.stderr
    got = _json(run_python_as(EXPORTER, EXPORTER_SCAN, hostpath))
    assert list(got["rings"]) == ["pod-b/" + os.path.basename(wrote["path"])]
    assert got["rings"]["pod-b/" + os.path.basename(wrote["path"])]["pod"] == "pod-b"
    assert got["refused"] == [f"owner_mismatch: {hostile['path']} is owned by uid 1001, its pod directory {pod_dir} "
                              "by uid 1000: a ring in a pod's directory must be that pod's (another uid wrote it there)"]
    # `check`, as the exporter, shows the same and exits 1
    chk = run_python_as(EXPORTER, "import sys\nfrom tensortrace.ring.ringdir import main\nsys.exit(main(sys.argv[1:]))",
                        "check", "--path", hostpath, "--gid", str(RING_GID))
    assert chk.returncode == 1, chk.stdout + chk.stderr
    assert "  pod-b/ (pod pod-b): owner uid 1000, gid 2000, mode 2770" in chk.stdout
    assert f"problem: owner_mismatch: {hostile['path']} is owned by uid 1001" in chk.stdout


def test_check_reports_flat_rings_and_untrusted_pod_directories(hostpath):
    assert _ringdir("prepare", "--path", hostpath, "--gid", str(RING_GID)).returncode == 0
    _json(run_python_as(AGENT_UID, AGENT, hostpath, "flat"))            # a ring directly in the ring dir
    bad = _kubelet_subpath(hostpath, "prod_open")
    os.chmod(bad, 0o777)
    chk = _ringdir("check", "--path", hostpath, "--gid", str(RING_GID))
    assert chk.returncode == 1
    assert "flat (directly in the ring dir): read only by an exporter with --allow-flat-rings" in chk.stdout
    assert f"problem: pod_dir: pod directory {bad} is writable by every user" in chk.stdout
