"""Bad rings: wrong magic, unknown format version, corrupted frame length -> quarantined with one
clear log line and a metric, while every other ring keeps flowing; rings with the wrong permissions
or owner are refused with a clear message."""

from __future__ import annotations

import os
import struct

import pytest

from tensortrace.ring.format import HEADER_SIZE, RingIdentity, RingReader, RingWriter
from tensortrace.ring.slabs import SEQ_PARTS_PER_FRAME
from tensortrace.testing.ringgen import Arrivals, TrafficGen, consume_all

pytestmark = pytest.mark.integration


def _frame_positions(path: str) -> list[tuple[int, int]]:
    r = RingReader.open(path)
    try:
        return [(f.seq, f.position % r.capacity) for f in r.frames()]
    finally:
        r.close()


def _good_ring(ring_dir, name, prefix):
    w = RingWriter.create(os.path.join(ring_dir, name), 1 << 20, RingIdentity(pod=prefix))
    g = TrafficGen(w, n_requests=2, prefix=prefix, hooks=("a",))
    g.run(steps=4)
    return w, g


def test_corrupt_rings_are_quarantined_and_the_others_keep_flowing(kafka_broker, fresh_topic, ring_dir, exporter_factory):
    topic = fresh_topic(partitions=1)
    with open(os.path.join(ring_dir, "junk.ring"), "wb") as f:      # wrong magic
        f.write(os.urandom(HEADER_SIZE + 4096))
    os.chmod(os.path.join(ring_dir, "junk.ring"), 0o600)
    wv, _ = _good_ring(ring_dir, "future.ring", "v")                 # unknown version
    with open(wv.path, "r+b") as f:
        f.seek(8)
        f.write(struct.pack("<I", 99))
    wc, gc = _good_ring(ring_dir, "corrupt.ring", "c")               # corrupted frame length mid-stream
    positions = _frame_positions(wc.path)
    bad_seq, bad_pos = positions[5]
    with open(wc.path, "r+b") as f:
        f.seek(HEADER_SIZE + bad_pos + 8)
        f.write(struct.pack("<I", 1_000_000_007))
    wg, gg = _good_ring(ring_dir, "good.ring", "g")

    exp = exporter_factory(ring_dir, kafka_broker.bootstrap, topic)
    # everything of the good ring arrives
    want = len(gg.expected) + len(gg.summaries)
    arrivals = Arrivals()
    for key, r in consume_all(kafka_broker.bootstrap, topic,
                              lambda rs: sum(1 for _, x in rs if (x.tensor.producer.pod or x.summary.producer.pod) == "g") >= want):
        arrivals.add(key, r)
    assert {s for (pod, s) in arrivals.tensors if pod == "g"} == set(gg.expected)
    # the corrupt ring: frames before the bad one were published, nothing from it or after it
    got_c = {s for (pod, s) in arrivals.tensors if pod == "c"}
    assert got_c == {s for s in gc.expected if s // SEQ_PARTS_PER_FRAME < bad_seq}
    assert got_c, "frames before the corruption should have been delivered"

    status = {r.ring: r for r in exp.status().rings}
    assert status["junk.ring"].state == "quarantined" and "bad magic" in status["junk.ring"].reason
    assert status["future.ring"].state == "quarantined" and "version 99 is not supported" in status["future.ring"].reason
    c = exp.wait_for(lambda: (r := exp.ring("corrupt.ring")) and r.frames_dropped_by_reason.get("ring_corrupt") and r,
                     what="corrupt ring accounted")
    assert c.state == "quarantined" and "frame length 1000000007" in c.reason
    # every frame of the corrupt ring is accounted: published before the corruption, or dropped as ring_corrupt
    assert c.frames_dropped_by_reason["ring_corrupt"] == gc.frames_written - 5
    assert status["good.ring"].state == "attached"
    log = exp.log()
    for name in ("junk.ring", "future.ring", "corrupt.ring"):
        assert sum(1 for line in log.splitlines() if "ring quarantined" in line and name in line) == 1, name
    _, metrics = exp.http("/metrics")
    for reason in ("bad_magic", "bad_version", "corrupt_frame"):
        assert f'tensortrace_exporter_rings_quarantined_total{{reason="{reason}"}} 1.0' in metrics
    assert exp.alive()
    for w in (wv, wc, wg):
        w.close()


def test_rings_with_loose_permissions_or_a_foreign_owner_are_refused(kafka_broker, fresh_topic, ring_dir, exporter_factory):
    topic = fresh_topic(partitions=1)
    loose = RingWriter.create(os.path.join(ring_dir, "world.ring"), 1 << 16, RingIdentity(pod="w"), mode=0o644)
    group = RingWriter.create(os.path.join(ring_dir, "group.ring"), 1 << 16, RingIdentity(pod="gr"), mode=0o660)
    os.symlink(loose.path, os.path.join(ring_dir, "link.ring"))
    foreign = None
    if os.getuid() == 0:  # only root can give a file to another user
        foreign = RingWriter.create(os.path.join(ring_dir, "foreign.ring"), 1 << 16, RingIdentity(pod="f"))
        os.chown(foreign.path, 4242, -1)
    wg, gg = _good_ring(ring_dir, "good.ring", "g")
    for w in (loose, group) + ((foreign,) if foreign else ()):
        TrafficGen(w, n_requests=1, prefix=w.header.identity.pod, hooks=("a",)).run(steps=1)
    exp = exporter_factory(ring_dir, kafka_broker.bootstrap, topic)
    recs = consume_all(kafka_broker.bootstrap, topic, lambda rs: len(rs) >= len(gg.expected) + len(gg.summaries))
    pods = {(r.tensor.producer.pod or r.summary.producer.pod) for _, r in recs}
    assert pods == {"g"}, "only the owner-only ring may be read"
    exp.wait_for(lambda: "link.ring" in exp.log() and "group.ring" in exp.log(), what="refusals logged")
    log = exp.log()
    assert "ring refused: " in log and "world.ring: permissions: mode 0644 gives other users access" in log
    assert "group.ring: permissions: mode 0660 gives group access but no --ring-group is configured" in log
    assert "link.ring: not_regular: a symbolic link" in log
    if foreign:
        assert "foreign.ring: owner: owned by uid 4242" in log
    assert sum(1 for line in log.splitlines() if "world.ring" in line) == 1, "refused once, not at every scan"
    _, metrics = exp.http("/metrics")
    assert 'tensortrace_exporter_rings_refused_total{reason="permissions"} 2.0' in metrics
    exp.stop()
    # with the ring group configured, the group-readable ring is accepted
    os.chown(group.path, -1, os.getgid())
    topic2 = fresh_topic(partitions=1)
    exp2 = exporter_factory(ring_dir, kafka_broker.bootstrap, topic2, extra=["--ring-group", str(os.getgid())])
    exp2.wait_for(lambda: (r := exp2.ring("group.ring")) and r.records_published > 0, what="group ring drained")
    for w in (loose, group, wg) + ((foreign,) if foreign else ()):
        w.close()
