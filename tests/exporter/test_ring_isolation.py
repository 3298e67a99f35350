"""One ring's failure outside the drain pass (acknowledgement handling, release, housekeeping) stops
only that ring (issue 15 follow-up): the exporter's `step()` catches per ring, quarantines the ring
(`internal_error`, counted) and keeps every other ring of the node flowing.

An in-process `Exporter` (its `step()` driven by the test) against a real Kafka broker; the failure
is injected with monkeypatch on one ring's `release_acked` (what a bug in release or ack handling
would raise).
"""

from __future__ import annotations

import os
import time

import pytest

from tensortrace.exporter.config import ExporterConfig
from tensortrace.exporter.service import Exporter
from tensortrace.ring.format import RingIdentity, RingWriter
from tensortrace.service.kafka import KafkaConfig
from tensortrace.testing.ringgen import TrafficGen, consume_all
from tensortrace.wire import codec

pytestmark = pytest.mark.integration


def _step_until(exp: Exporter, cond, what: str, timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        exp.step()                       # raises if one ring's failure escapes: the test fails
        if cond():
            return
        time.sleep(0.002)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_failing_release_quarantines_only_its_ring_and_the_others_keep_flowing(
        kafka_broker, fresh_topic, ring_dir, monkeypatch):
    topic = fresh_topic(partitions=1)
    good_w = RingWriter.create(os.path.join(ring_dir, "good.ring"), 1 << 20, RingIdentity(pod="good", model_id="m"))
    bad_w = RingWriter.create(os.path.join(ring_dir, "bad.ring"), 1 << 20, RingIdentity(pod="bad", model_id="m"))
    good = TrafficGen(good_w, n_requests=2, prefix="g", hooks=("a",))
    bad = TrafficGen(bad_w, n_requests=2, prefix="b", hooks=("a",))
    good.run(steps=3)
    bad.run(steps=3)
    exp = Exporter(ExporterConfig(ring_dir=ring_dir, control_port=-1, allow_flat_rings=True, topic=topic,
                                  kafka=KafkaConfig(bootstrap_servers=kafka_broker.bootstrap)))
    try:
        exp.scan()
        rings = {r.name: r for r in exp.rings.values()}
        assert set(rings) == {"good.ring", "bad.ring"}

        def boom(force_all=False):
            raise RuntimeError("injected release failure")
        monkeypatch.setattr(rings["bad.ring"], "release_acked", boom)

        g = rings["good.ring"]
        _step_until(exp, lambda: g.reader.frames_consumed == good.frames_written and not g.units,
                    "the good ring delivered and released")
        b = rings["bad.ring"]
        _step_until(exp, lambda: b.state == "quarantined", "the failing ring quarantined")
        assert b.reason.startswith("internal_error: ") and "RuntimeError: injected release failure" in b.reason
        assert exp.metrics.rings_quarantined.labels("internal_error")._value.get() == 1
        # the failing ring is closed and what it did not release is counted as dropped (accounting)
        _step_until(exp, lambda: getattr(b, "reader_closed", False), "the quarantined ring closed", timeout_s=10)
        st = {s.ring: s for s in exp.status().rings}["bad.ring"]
        assert st.state == "quarantined"
        # its release never ran: every frame it committed is counted, none published
        assert dict(st.frames_dropped_by_reason) == {"internal_error": bad.frames_written}
        assert st.records_published == 0

        # the good ring keeps flowing after the quarantine
        more = TrafficGen(good_w, n_requests=1, prefix="g2", hooks=("a",))
        more._step = 100
        more.run(steps=3)
        total = good.frames_written + more.frames_written
        _step_until(exp, lambda: g.reader.frames_consumed == total and not g.units, "the good ring's later frames")
        assert g.state == "attached" and not g.dropped
        assert g.records_out == len(good.expected) + len(good.summaries) + len(more.expected) + len(more.summaries)
    finally:
        exp.shutdown(flush_timeout_s=5)
    want = {**good.expected, **more.expected}
    recs = consume_all(kafka_broker.bootstrap, topic,
                       lambda rs: want.keys() <= {r.tensor.seq for _, r in rs if r.tensor.producer.pod == "good"})
    got = {r.tensor.seq: r.tensor for _, r in recs if r.HasField("tensor") and r.tensor.producer.pod == "good"}
    for seq, (rid, hook, step, pos, raw) in want.items():
        t = got[seq]
        assert (t.request_id, t.hook, t.step, t.token_start) == (rid, hook, step, pos)
        assert codec.record_raw_bytes(t) == raw, "bit-exact"
    good_w.close()
    bad_w.close()
