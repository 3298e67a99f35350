"""Ring permissions across pods (docs/operations.md "Ring permissions"): the agent as root or as a
non-root uid, the exporter as uid 10001 in the ring group, the directory prepared by
`tensortrace ring-dir prepare` as the chart's init container does. Each side is a real process
under its own uid/gids (the test runs as root and drops privileges per "container")."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from tensortrace.agent.config import AgentConfig
from tensortrace.ring.permissions import parse_id, parse_mode, prepare_ring_dir
from tensortrace.testing.privileges import ROOT, Identity, can_switch_users, run_python_as, shared_tmpdir

pytestmark = [pytest.mark.unit,
              pytest.mark.skipif(not can_switch_users(), reason="needs root to run processes as other users")]

RING_GID = 2000
EXPORTER = Identity(10001, 10001, (RING_GID,))

# The agent: the real CaptureAgent (AgentConfig from the environment, as the SGLang plugin builds
# it), then synthetic frames through its writer; prints the ring's path and what it wrote.
AGENT = """
import json, sys
from tensortrace.agent import AgentConfig, CaptureAgent
from tensortrace.testing.ringgen import TrafficGen
try:
    agent = CaptureAgent(AgentConfig(ring_dir=sys.argv[1], model_id="m", pod=sys.argv[2], ring_capacity=1 << 20))
except (OSError, ValueError) as e:
    print(json.dumps({"error": f"{type(e).__name__}: {e}"})); sys.exit(3)
gen = TrafficGen(agent.writer, n_requests=2, hooks=("resid_pre",), prefix=sys.argv[2])
gen.run(steps=3)
print(json.dumps({"path": agent.ring_path, "frames": gen.frames_written}))
"""

# The exporter's discovery and permission check (Exporter.scan) without Kafka: attach, read every
# frame, release (stores tail) and write a control document (the two writes it makes).
EXPORTER_SCAN = """
import json, logging, sys
logging.disable(logging.CRITICAL)
from tensortrace.exporter.config import ExporterConfig
from tensortrace.exporter.service import Exporter
from tensortrace.service.kafka import KafkaConfig
group = None if sys.argv[2] == "none" else int(sys.argv[2])
exp = Exporter(ExporterConfig(ring_dir=sys.argv[1], ring_group=group, control_port=-1, allow_flat_rings=True,
                              kafka=KafkaConfig(bootstrap_servers="127.0.0.1:9")))
exp.scan()
out = {"refused": sorted(exp.refused.values()), "rings": {}}
for ring in exp.rings.values():
    frames = list(ring.reader.frames())
    ring.reader.release(frames[-1].end)
    ring.reader.write_control({"version": 1, "enabled": True})
    out["rings"][ring.name] = {"frames": len(frames), "tail": ring.reader.tail}
    ring.close()
print(json.dumps(out))
"""


def _json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.stdout.strip(), f"no output (rc {proc.returncode}): {proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _prepare(path: str, gid: int = RING_GID, *extra: str) -> subprocess.CompletedProcess:
    """The init container's command, as root."""
    return subprocess.run([sys.executable, "-m", "tensortrace.cli", "ring-dir", "prepare", "--path", path,
                           "--gid", str(gid), *extra], capture_output=True, text=True, timeout=60)


def _agent(ident: Identity, ring_dir: str, pod: str, **env: str) -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith("TENSORTRACE_RING_")}
    e.update(env)
    return _json(run_python_as(ident, AGENT, ring_dir, pod, env=e))


def _exporter(ring_dir: str, group: int | None = RING_GID, ident: Identity = EXPORTER) -> dict:
    return _json(run_python_as(ident, EXPORTER_SCAN, ring_dir, "none" if group is None else str(group)))


@pytest.fixture
def hostpath():
    """A hostPath as Kubernetes creates it (DirectoryOrCreate): root, 0755."""
    with shared_tmpdir("tt-perm-") as d:
        path = os.path.join(d, "run-tensortrace")
        os.mkdir(path)
        os.chmod(path, 0o755)
        yield path


@pytest.mark.parametrize("agent", [ROOT, Identity(1000, 1000, (RING_GID,))], ids=["agent-root", "agent-uid1000"])
def test_exporter_10001_in_the_ring_group_reads_the_agents_ring(hostpath, agent):
    assert _prepare(hostpath).returncode == 0
    wrote = _agent(agent, hostpath, "pod-a", TENSORTRACE_RING_GID=str(RING_GID))
    st = os.stat(wrote["path"])
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (agent.uid, RING_GID, 0o660)
    got = _exporter(hostpath)
    assert got["refused"] == []
    name = os.path.basename(wrote["path"])
    assert got["rings"][name]["frames"] == wrote["frames"] > 0
    assert got["rings"][name]["tail"] > 0, "the exporter released (wrote the tail) as uid 10001"
    # the exporter made its lock file in the directory: the group can write there
    assert os.stat(wrote["path"] + ".consumer.lock").st_uid == EXPORTER.uid


def test_without_a_ring_group_a_root_agents_ring_is_refused_as_owner_only(hostpath):
    assert _prepare(hostpath).returncode == 0
    wrote = _agent(ROOT, hostpath, "pod-b")           # no TENSORTRACE_RING_GID: 0600 (the old default)
    assert stat.S_IMODE(os.stat(wrote["path"]).st_mode) == 0o600
    got = _exporter(hostpath)
    assert got["rings"] == {}
    [reason] = got["refused"]
    assert reason.startswith("owner: owned by uid 0 (uid 0, gid 2000, mode 0600); this exporter reads rings of uids 10001")
    assert "or group-shared rings (0660) of gid 2000 (--ring-group)" in reason


def test_a_ring_of_another_gid_is_refused_with_what_to_set(hostpath):
    assert _prepare(hostpath).returncode == 0
    wrote = _agent(ROOT, hostpath, "pod-c", TENSORTRACE_RING_GID="3000")   # root may give it to any gid
    assert os.stat(wrote["path"]).st_gid == 3000
    got = _exporter(hostpath, ident=Identity(10001, 10001, (RING_GID, 3000)))
    assert got["rings"] == {}
    [reason] = got["refused"]
    assert reason.startswith("group: group-accessible (mode 0660) by gid 3000, configured ring group is 2000")
    assert "set TENSORTRACE_RING_GID=2000 in the inference container" in reason


def test_an_exporter_outside_the_ring_group_says_what_it_saw_and_what_to_set(hostpath):
    assert _prepare(hostpath).returncode == 0
    _agent(ROOT, hostpath, "pod-d", TENSORTRACE_RING_GID=str(RING_GID))
    got = _exporter(hostpath, ident=Identity(10001, 10001, ()))   # supplementalGroups forgotten
    assert got["rings"] == {}
    [reason] = got["refused"]
    # it cannot even list the 2770 directory
    assert reason.startswith("ring_dir: cannot list the ring directory (Permission denied)")
    assert f"ring dir {hostpath}: owner uid 0, gid 2000, mode 2770" in reason
    assert "this exporter: uid 10001, gid 10001, supplementary groups none" in reason
    assert "supplementalGroups [2000]" in reason


def test_a_ring_the_exporter_cannot_open_is_reported_with_owner_group_and_mode(hostpath):
    assert _prepare(hostpath).returncode == 0
    wrote = _agent(ROOT, hostpath, "pod-e", TENSORTRACE_RING_GID=str(RING_GID))
    os.chmod(hostpath, 0o2775)   # the directory is listable by everyone...
    # ...and the exporter is configured for the ring group but not a member of it
    got = _exporter(hostpath, ident=Identity(10001, 10001, ()))
    [reason] = got["refused"]
    assert reason.startswith("permission_denied: cannot open the consumer lock file (Permission denied)")
    os.chown(hostpath, EXPORTER.uid, RING_GID)   # it may create its lock file, but still not open the ring
    os.chmod(hostpath, 0o2770)
    got = _exporter(hostpath, ident=Identity(10001, 10001, ()))
    [reason] = got["refused"]
    assert reason.startswith("permission_denied: cannot open the ring read-write (Permission denied)")
    assert f"{wrote['path']}: owner uid 0, gid 2000, mode 0660" in reason
    assert "with supplementalGroups [2000] here" in reason


def test_group_rings_in_a_directory_everyone_can_write_are_refused(hostpath):
    assert _prepare(hostpath).returncode == 0
    _agent(Identity(1000, 1000, (RING_GID,)), hostpath, "pod-f", TENSORTRACE_RING_GID=str(RING_GID))
    os.chmod(hostpath, 0o2777)   # anyone could now plant a file that the setgid bit gives gid 2000
    got = _exporter(hostpath)
    [reason] = got["refused"]
    assert reason.startswith(f"group: ring dir {hostpath} is writable by every user")
    assert got["rings"] == {}


def test_a_non_root_agent_cannot_write_a_hostpath_kubernetes_created_and_says_so(hostpath):
    got = _agent(Identity(1000, 1000, (RING_GID,)), hostpath, "pod-g", TENSORTRACE_RING_GID=str(RING_GID))
    assert got["error"].startswith(f"PermissionError: [Errno 13] cannot create rings in {hostpath} "
                                   "(owner uid 0, gid 0, mode 0755; this process uid 1000, gid 1000, "
                                   "supplementary groups 2000)")
    assert f"tensortrace ring-dir prepare --path {hostpath} --gid 2000" in got["error"]


def test_a_non_root_agent_outside_the_configured_gid_says_so(hostpath):
    assert _prepare(hostpath).returncode == 0
    got = _agent(Identity(1000, 1000, (RING_GID,)), hostpath, "pod-h", TENSORTRACE_RING_GID="3000")
    assert "cannot give ring" in got["error"] and "to group 3000: Operation not permitted" in got["error"]
    assert [n for n in os.listdir(hostpath)] == [], "no ring and no temporary file left behind"


def test_an_agent_creates_a_missing_ring_dir_setgid_in_its_group():
    with shared_tmpdir("tt-perm-") as d:
        os.chmod(d, 0o777)
        path = os.path.join(d, "rings")
        wrote = _agent(Identity(1000, 1000, (RING_GID,)), path, "pod-i", TENSORTRACE_RING_GID=str(RING_GID))
        st = os.stat(path)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1000, RING_GID, 0o2770)
        assert os.stat(wrote["path"]).st_gid == RING_GID


def test_prepare_is_idempotent_and_fixes_a_kubernetes_hostpath(hostpath):
    first = _prepare(hostpath)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == (f"ring dir {hostpath}: owner 0:0 -> 0:2000; mode 0755 -> 2770 "
                                    "(now owner uid 0, gid 2000, mode 2770)")
    before = os.stat(hostpath)
    again = _prepare(hostpath)
    assert again.returncode == 0 and again.stdout.strip() == f"ring dir {hostpath}: unchanged (owner uid 0, gid 2000, mode 2770)"
    after = os.stat(hostpath)
    assert (after.st_ino, after.st_mode, after.st_uid, after.st_gid, after.st_ctime_ns) == \
        (before.st_ino, before.st_mode, before.st_uid, before.st_gid, before.st_ctime_ns)
    # a missing directory is created; an owner can be set
    fresh = os.path.join(hostpath, "sub", "rings")
    out = _prepare(fresh, RING_GID, "--uid", "0", "--mode", "02770")
    assert out.returncode == 0 and out.stdout.startswith(f"ring dir {fresh}: created;")
    assert stat.S_IMODE(os.stat(fresh).st_mode) == 0o2770 and os.stat(fresh).st_gid == RING_GID


def test_prepare_refuses_bad_input_with_a_clear_error(hostpath):
    out = _prepare(hostpath, "1.048576e+06")
    assert out.returncode == 2 and "--gid '1.048576e+06' is not a non-negative integer (a number rendered as a float" in out.stderr
    out = _prepare(hostpath, RING_GID, "--mode", "2777")
    assert out.returncode == 1 and "mode 2777 lets every user write the ring directory; use 2770" in out.stderr
    out = _prepare(hostpath, RING_GID, "--mode", "2750")
    assert out.returncode == 1 and "the ring group needs rwx on the directory" in out.stderr
    out = _prepare(hostpath, RING_GID, "--mode", "rwx")
    assert out.returncode == 2 and "mode 'rwx' is not an octal permission mode" in out.stderr
    link = hostpath + "-link"
    os.symlink(hostpath, link)
    try:
        out = _prepare(link)
        assert out.returncode == 1 and "is not a directory (a symbolic link or a file)" in out.stderr
    finally:
        os.unlink(link)
    # not root: it says what is needed
    code = ("import sys; from tensortrace.ring.ringdir import main; sys.exit(main(['prepare', '--path', sys.argv[1], "
            "'--gid', '2000']))")
    out = run_python_as(Identity(1000, 1000, ()), code, hostpath)
    assert out.returncode == 1 and "run this as root (the chart's init container: runAsUser 0" in out.stderr
    assert stat.S_IMODE(os.stat(hostpath).st_mode) == 0o755


def test_agent_ring_settings_from_the_environment_are_validated(monkeypatch):
    monkeypatch.setenv("TENSORTRACE_RING_GID", "2000")
    cfg = AgentConfig(ring_dir="/x")
    cfg.validate()
    assert (cfg.ring_gid, cfg.ring_file_mode) == (2000, 0o660)
    monkeypatch.delenv("TENSORTRACE_RING_GID")
    cfg = AgentConfig(ring_dir="/x")
    cfg.validate()
    assert (cfg.ring_gid, cfg.ring_file_mode) == (None, 0o600)
    for gid, mode, msg in [("2e3", None, "TENSORTRACE_RING_GID (ring_gid) '2e3' is not a non-negative integer"),
                           ("-1", None, "TENSORTRACE_RING_GID (ring_gid) '-1' is not a non-negative integer"),
                           ("2000", "0644", "ring mode 0644 gives more than owner and group read-write"),
                           ("2000", "0640", "the group needs read-write"),
                           (None, "0660", "shares the ring with a group but no ring gid is configured"),
                           ("2000", "9", "mode '9' is not an octal permission mode")]:
        with pytest.raises(ValueError) as e:
            AgentConfig(ring_dir="/x", ring_gid=gid, ring_mode=mode).validate()
        assert msg in str(e.value), (gid, mode, str(e.value))
    assert parse_id(7, "gid") == 7 and parse_mode("0o2770") == 0o2770
    with pytest.raises(ValueError, match="mode 2777 lets every user write"):
        prepare_ring_dir("/nonexistent/never-created", 0, 0o2777)


def test_ring_dir_check_says_what_a_container_sees(hostpath):
    assert _prepare(hostpath).returncode == 0
    wrote = _agent(ROOT, hostpath, "pod-j", TENSORTRACE_RING_GID=str(RING_GID))
    code = "import sys; from tensortrace.ring.ringdir import main; sys.exit(main(['check', '--path', sys.argv[1], '--gid', '2000']))"
    ok = run_python_as(EXPORTER, code, hostpath)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "this process: uid 10001, gid 10001, supplementary groups 2000" in ok.stdout
    assert f"{os.path.basename(wrote['path'])}: owner uid 0, gid 2000, mode 0660; read-write by this process" in ok.stdout
    bad = run_python_as(Identity(10001, 10001, ()), code, hostpath)
    assert bad.returncode == 1
    assert "problem: this process is not in group 2000: add it to the pod's supplementalGroups" in bad.stdout
