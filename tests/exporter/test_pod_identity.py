"""Pods cannot impersonate each other (issue 15, item 3; docs/operations.md "Pod isolation and the
threat model"): each pod writes into its own subdirectory of the ring directory, the exporter takes
the producer's identity from that location (pod from the directory's name, node its own), and a ring
whose header claims another pod is quarantined with its frames counted, never published.

The first test runs the real exporter process against a real Kafka broker with a hostile pod (a
separate process writing its own subdirectory, claiming the victim's pod, node and request ids);
the others call the exporter's discovery (`Exporter.scan`) without Kafka for every refusal.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from tensortrace.exporter.config import ExporterConfig
from tensortrace.exporter.service import Exporter
from tensortrace.ring.format import RingIdentity, RingWriter
from tensortrace.ring.permissions import parse_pod_dir
from tensortrace.service.kafka import KafkaConfig
from tensortrace.testing.ringgen import TrafficGen, consume_all
from tensortrace.wire import codec


def _pod_dir(ring_dir: str, name: str, uid: int | None = None) -> str:
    d = os.path.join(ring_dir, name)
    os.mkdir(d, 0o700)
    if uid is not None:
        os.chown(d, uid, -1)
    return d


@pytest.mark.integration
def test_a_pod_claiming_another_pods_identity_is_refused_and_counted_and_the_victim_is_untouched(
        kafka_broker, fresh_topic, ring_dir, exporter_factory, tmp_path):
    topic = fresh_topic(partitions=2)
    victim_dir = _pod_dir(ring_dir, "prod_victim")
    hostile_dir = _pod_dir(ring_dir, "prod_hostile")
    # the victim: an honest producer whose header agrees with its directory
    vw = RingWriter.create(os.path.join(victim_dir, "victim-1-r0.ring"), 4 << 20,
                           RingIdentity(pod="victim", node="victim-says-node-a"))
    victim = TrafficGen(vw, n_requests=3, prefix="victim", row_shape=(16,))
    victim.run(steps=5)
    # the hostile pod: another process, in its own directory, under the victim's file name, claiming the
    # victim's pod, node and request ids (so its trace ids are the victim's), with more and other data
    out = tmp_path / "hostile.json"
    subprocess.run([sys.executable, "-m", "tensortrace.testing.producer_proc",
                    os.path.join(hostile_dir, "victim-1-r0.ring"), str(out), "--pod", "victim",
                    "--node", "victim-says-node-a", "--prefix", "victim", "--requests", "4", "--steps", "7",
                    "--row", "64", "--interval", "0"], check=True, timeout=120)
    hostile = json.loads(out.read_text())
    assert hostile["frames_written"] > 0 and hostile["frames_dropped"] == 0
    # a ring directly in the ring directory: refused without the development opt-in
    flat = RingWriter.create(os.path.join(ring_dir, "flat-1-r0.ring"), 1 << 20, RingIdentity(pod="flat"))
    TrafficGen(flat, n_requests=1, prefix="flat").run(steps=2)

    exp = exporter_factory(ring_dir, kafka_broker.bootstrap, topic,
                           extra=["--no-allow-flat-rings", "--node", "node-real"])
    want = len(victim.expected) + len(victim.summaries)
    st = exp.wait_for(lambda: (r := exp.ring("prod_victim/victim-1-r0.ring")) and r.records_published == want
                      and r.frames_pending == 0 and r, what="the victim's ring delivered and released")
    # the victim's ring: identity from its location, exact accounting, nothing dropped
    assert (st.pod, st.node) == ("prod/victim", "node-real")
    assert st.frames_committed == st.frames_released == victim.frames_written
    assert not st.frames_dropped_by_reason
    # the hostile ring: quarantined, every frame it wrote counted as dropped for that reason
    bad = exp.wait_for(lambda: (r := exp.ring("prod_hostile/victim-1-r0.ring")) and r.frames_dropped_by_reason
                       and r, what="the hostile ring quarantined and counted")
    assert bad.state == "quarantined" and bad.reason.startswith("identity_mismatch: ")
    assert "claims pod 'victim'" in bad.reason and "directory of pod 'prod/hostile'" in bad.reason
    assert dict(bad.frames_dropped_by_reason) == {"identity_mismatch": hostile["frames_written"]}
    assert bad.records_published == 0
    metrics = exp.http("/metrics")[1]
    assert 'tensortrace_exporter_rings_quarantined_total{reason="identity_mismatch"} 1.0' in metrics
    assert ('tensortrace_exporter_frames_dropped_total{reason="identity_mismatch",'
            f'ring="prod_hostile/victim-1-r0.ring"}} {float(hostile["frames_written"])}') in metrics
    assert 'tensortrace_exporter_rings_refused_total{reason="flat_ring"} 1.0' in metrics
    log = exp.log()
    assert "ring refused: " + os.path.join(ring_dir, "flat-1-r0.ring") + ": flat_ring: " in log
    assert "--allow-flat-rings" in log

    # what Kafka has: exactly the victim's records, bit-exact, all attributed to the victim's location
    recs = consume_all(kafka_broker.bootstrap, topic, lambda rs: len(rs) >= want, timeout_s=60)
    assert len(recs) == want, f"{len(recs)} records on the topic, the victim wrote {want}"
    tensors = {}
    for key, r in recs:
        item = r.summary if r.HasField("summary") else r.tensor
        assert (item.producer.pod, item.producer.node) == ("prod/victim", "node-real"), item.producer
        assert item.producer.generation == vw.header.generation
        assert key == item.request_id.encode()
        if r.HasField("tensor"):
            tensors[item.seq] = item
    assert set(tensors) == set(victim.expected)
    for seq, t in tensors.items():
        rid, hook, step, pos, raw = victim.expected[seq]
        assert (t.request_id, t.hook, t.step, t.token_start) == (rid, hook, step, pos)
        assert codec.record_raw_bytes(t) == raw, f"payload of seq {seq} differs"
    vw.close()
    flat.close()


def _scan(ring_dir: str, **kw) -> Exporter:
    exp = Exporter(ExporterConfig(ring_dir=ring_dir, control_port=-1, node="node-real",
                                  kafka=KafkaConfig(bootstrap_servers="127.0.0.1:9"), **kw))
    exp.scan()
    return exp


def _close(exp: Exporter) -> None:
    for ring in exp.rings.values():
        ring.close()


def test_rings_in_pod_directories_carry_the_location_identity_and_flat_rings_need_the_opt_in(ring_dir):
    d = _pod_dir(ring_dir, "team-a_sglang-0")
    w = RingWriter.create(os.path.join(d, "sglang-0-7-r1.ring"), 1 << 20,
                          RingIdentity(pod="sglang-0", node="claimed-node", tp_rank=1))
    plain = RingWriter.create(os.path.join(_pod_dir(ring_dir, "worker-3"), "worker-3-9-r0.ring"), 1 << 20,
                              RingIdentity(pod="worker-3", node="claimed-node"))
    flat = RingWriter.create(os.path.join(ring_dir, "old-1-r0.ring"), 1 << 20, RingIdentity(pod="old", node="n-old"))
    exp = _scan(ring_dir)
    try:
        by_name = {r.name: r for r in exp.rings.values()}
        assert set(by_name) == {"team-a_sglang-0/sglang-0-7-r1.ring", "worker-3/worker-3-9-r0.ring"}
        p = by_name["team-a_sglang-0/sglang-0-7-r1.ring"].producer
        assert (p.pod, p.node, p.tp_rank, p.generation) == ("team-a/sglang-0", "node-real", 1, w.header.generation)
        assert by_name["worker-3/worker-3-9-r0.ring"].producer.pod == "worker-3"
        [reason] = exp.refused.values()
        assert reason.startswith(f"flat_ring: a ring directly in the ring directory {ring_dir}; each inference pod "
                                 f"writes into its own subdirectory, {ring_dir}/<namespace>_<pod>/")
        assert exp.metrics.rings_refused.labels("flat_ring")._value.get() == 1
        status = {s.ring: s for s in exp.status().rings}
        assert status["team-a_sglang-0/sglang-0-7-r1.ring"].pod == "team-a/sglang-0"
        # control by pod: the published identity, or the bare pod name
        res = exp.set_capture({"version": 1, "enabled": True}, ["sglang-0"])
        assert [(r.ring, r.error) for r in res] == [("team-a_sglang-0/sglang-0-7-r1.ring", "")]
    finally:
        _close(exp)
    # with the development opt-in the flat ring is read, identified by its header as before
    exp = _scan(ring_dir, allow_flat_rings=True)
    try:
        flat_ring = {r.name: r for r in exp.rings.values()}["old-1-r0.ring"]
        assert (flat_ring.producer.pod, flat_ring.producer.node) == ("old", "n-old")
        assert not exp.refused
    finally:
        _close(exp)
    for x in (w, plain, flat):
        x.close()


def test_a_ring_owned_by_another_uid_than_its_pod_directory_is_refused(ring_dir, caplog):
    if os.geteuid() != 0:
        pytest.skip("os.chown to other uids needs root")
    d = _pod_dir(ring_dir, "prod_pod-b", uid=1234)
    w = RingWriter.create(os.path.join(d, "pod-b-1-r0.ring"), 1 << 20, RingIdentity(pod="pod-b"))
    os.chown(w.path, 4321, -1)   # another uid planted it in pod-b's directory
    ok = _pod_dir(ring_dir, "prod_pod-c")          # root-owned (kubelet's subPath directory): any owner
    wc = RingWriter.create(os.path.join(ok, "pod-c-1-r0.ring"), 1 << 20, RingIdentity(pod="pod-c"))
    with caplog.at_level(logging.ERROR, logger="tensortrace.exporter"):
        exp = _scan(ring_dir, ring_owner_uids=(0, 4321))
    try:
        assert [r.name for r in exp.rings.values()] == ["prod_pod-c/pod-c-1-r0.ring"]
        [reason] = exp.refused.values()
        assert reason == (f"owner_mismatch: {w.path} is owned by uid 4321, its pod directory {d} by uid 1234: "
                          "a ring in a pod's directory must be that pod's (another uid wrote it there)")
        assert f"ring refused: {w.path}: owner_mismatch: " in caplog.text
        assert exp.metrics.rings_refused.labels("owner_mismatch")._value.get() == 1
    finally:
        _close(exp)
    # the pod's own uid is accepted
    os.chown(w.path, 1234, -1)
    exp = _scan(ring_dir, ring_owner_uids=(0, 1234))
    try:
        assert sorted(r.name for r in exp.rings.values()) == ["prod_pod-b/pod-b-1-r0.ring", "prod_pod-c/pod-c-1-r0.ring"]
        assert not exp.refused
    finally:
        _close(exp)
        w.close()
        wc.close()


def test_pod_directories_that_cannot_be_trusted_are_refused_with_their_reason(ring_dir, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    other = RingWriter.create(str(elsewhere / "victim-1-r0.ring"), 1 << 20, RingIdentity(pod="victim"))
    os.symlink(str(elsewhere), os.path.join(ring_dir, "prod_victim"))         # a symlinked pod directory
    bad = _pod_dir(ring_dir, "Not_A_Namespace")                              # not <namespace>_<pod>
    RingWriter.create(os.path.join(bad, "x-1-r0.ring"), 1 << 20, RingIdentity(pod="A_Namespace")).close()
    open_dir = _pod_dir(ring_dir, "prod_open")
    os.chmod(open_dir, 0o777)                                                # writable by every user
    RingWriter.create(os.path.join(open_dir, "open-1-r0.ring"), 1 << 20, RingIdentity(pod="open")).close()
    # a lock file planted as a symbolic link (the exporter would open and lock another file)
    d = _pod_dir(ring_dir, "prod_lock")
    lw = RingWriter.create(os.path.join(d, "lock-1-r0.ring"), 1 << 20, RingIdentity(pod="lock"))
    os.symlink(other.path + ".consumer.lock", lw.path + ".consumer.lock")
    exp = _scan(ring_dir)
    try:
        assert not exp.rings
        reasons = sorted(exp.refused.values())
        assert len(reasons) == 4, reasons
        assert any(r.startswith(f"pod_dir: {ring_dir}/prod_victim is a symbolic link") for r in reasons)
        assert any(r.startswith("pod_dir: pod directory name 'Not_A_Namespace' is not <namespace>_<pod> or <pod>")
                   for r in reasons)
        assert any(r.startswith(f"pod_dir: pod directory {open_dir} is writable by every user") for r in reasons)
        assert any(r == f"not_regular: {lw.path}.consumer.lock is not a regular file (a symbolic link?); remove it"
                   for r in reasons)
        assert not os.path.exists(other.path + ".consumer.lock")   # nothing created through the link
    finally:
        _close(exp)
        lw.close()
        other.close()


def test_a_pod_directory_is_read_for_at_most_max_rings_per_pod_rings(ring_dir):
    d = _pod_dir(ring_dir, "prod_many")
    writers = [RingWriter.create(os.path.join(d, f"many-{i}-r0.ring"), 1 << 16, RingIdentity(pod="many"))
               for i in range(3)]
    exp = _scan(ring_dir, max_rings_per_pod=2)
    try:
        assert len(exp.rings) == 2
        [reason] = exp.refused.values()
        assert reason.startswith(f"too_many_rings: pod directory {d} already has 2 rings being read or kept "
                                 "(--max-rings-per-pod 2)")
    finally:
        _close(exp)
        for w in writers:
            w.close()


def test_pod_directory_names():
    assert parse_pod_dir("kube-system_coredns-5d78c9869d-abcde").identity == "kube-system/coredns-5d78c9869d-abcde"
    assert parse_pod_dir("host-1.example").identity == "host-1.example"
    assert parse_pod_dir("prod_victim").header_matches("victim")
    assert not parse_pod_dir("prod_victim").header_matches("prod/victim")
    long = "p" * 100
    assert parse_pod_dir(f"ns_{long}").header_matches("p" * 64)   # the header keeps 64 bytes of the name
    for bad in ("", ".", "..", ".hidden", "a_b_c", "UPPER_pod", "pod-", "ns_", "_pod", "a/b", "pod\x00"):
        with pytest.raises(ValueError, match="is not <namespace>_<pod> or <pod>"):
            parse_pod_dir(bad)


def test_a_symbolic_link_swapped_in_after_the_check_is_refused_at_open_and_counted(ring_dir, tmp_path, caplog):
    # The race O_NOFOLLOW closes: the pod replaces its ring with a symbolic link (to another pod's ring)
    # after the exporter's lstat check and before its open. The open refuses it: nothing is attached
    # (nothing of the other ring is read under this pod's name), the refusal is logged and counted.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    other = RingWriter.create(str(elsewhere / "victim-1-r0.ring"), 1 << 20, RingIdentity(pod="swap"))
    d = _pod_dir(ring_dir, "prod_swap")
    w = RingWriter.create(os.path.join(d, "swap-1-r0.ring"), 1 << 20, RingIdentity(pod="swap"))
    exp = Exporter(ExporterConfig(ring_dir=ring_dir, control_port=-1, node="node-real",
                                  kafka=KafkaConfig(bootstrap_servers="127.0.0.1:9")))
    check = exp._ring_refusal

    def check_then_swap(path, *a):
        why = check(path, *a)          # the check sees the regular file ...
        os.unlink(path)                # ... then the pod swaps in a link before the open
        os.symlink(other.path, path)
        return why
    exp._ring_refusal = check_then_swap
    try:
        with caplog.at_level(logging.ERROR, logger="tensortrace.exporter"):
            exp.scan()
        assert not exp.rings
        [reason] = exp.refused.values()
        assert reason.startswith(f"not_regular: {w.path}: the ring is a symbolic link (opened with O_NOFOLLOW)")
        assert f"ring refused: {w.path}: not_regular: " in caplog.text
        assert exp.metrics.rings_refused.labels("not_regular")._value.get() == 1
        assert not os.path.exists(other.path + ".consumer.lock")
        # the next scan sees the link itself at lstat and refuses it there (another file: counted once more)
        exp._ring_refusal = check
        exp.scan()
        assert not exp.rings and exp.metrics.rings_refused.labels("not_regular")._value.get() == 2
    finally:
        _close(exp)
        w.close()
        other.close()
