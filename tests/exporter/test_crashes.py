"""Crashes and outages: the exporter killed with SIGKILL and restarted, the broker stopped and
restarted, the producer killed in the middle of a frame. Nothing committed to a ring is lost;
duplicates only within the at-least-once rule (docs/exporter.md); accounting adds up exactly."""

from __future__ import annotations

import collections
import json
import os
import struct
import subprocess
import sys
import time

import pytest

from tensortrace.ring.format import HEADER_SIZE, OFF_TAIL
from tensortrace.ring.slabs import SEQ_PARTS_PER_FRAME
from tensortrace.testing.ringgen import consume_all, rows_bytes
from tensortrace.testing.waiting import wait_until
from tensortrace.wire import codec

pytestmark = [pytest.mark.integration, pytest.mark.slow]

def start_producer(ring_dir, tmp_path, name="pod-p", *args):
    out = str(tmp_path / f"{name}.json")
    proc = subprocess.Popen([sys.executable, "-m", "tensortrace.testing.producer_proc",
                             os.path.join(ring_dir, f"{name}-r0.ring"), out, "--pod", name, *args])
    return proc, out


def wait_file(path, proc, timeout_s=120):
    assert wait_until(lambda: os.path.exists(path), timeout_s), "producer did not finish"
    proc.wait(30)
    with open(path) as f:
        return json.load(f)


def collect(bootstrap, topic, dump, timeout_s=120):
    """Consume until every written record and summary arrived; returns (tensor seq Counter, summaries)."""
    want_t = {int(s) for s in dump["expected"]}
    want_s = {int(s) for s in dump["summaries"]}
    seen_t, seen_s = collections.Counter(), {}
    asm = codec.ChunkAssembler()

    def stop(records):
        for key, r in records[stop.n:]:
            if r.HasField("summary"):
                seen_s.setdefault(r.summary.seq, r.summary)
                continue
            t = asm.add(r.tensor)
            if t is None:
                continue
            seen_t[t.seq] += 1
            rid, hook, step, pos = dump["expected"][str(t.seq)]
            assert key == rid.encode() and (t.request_id, t.hook, t.step, t.token_start) == (rid, hook, step, pos)
            assert codec.record_raw_bytes(t) == rows_bytes(rid, step, hook, pos, t.shape[0], dump["row_bytes"])
        stop.n = len(records)
        return want_t <= set(seen_t) and want_s <= set(seen_s)

    stop.n = 0
    consume_all(bootstrap, topic, stop, timeout_s=timeout_s)
    missing = want_t - set(seen_t)
    assert not missing, f"{len(missing)} records never arrived, e.g. {sorted(missing)[:5]}"
    assert set(seen_t) == want_t, "records arrived that were never written"
    assert set(seen_s) == want_s
    for s in seen_s.values():
        assert s.records_captured == dump["captured"].get(s.request_id, 0)
    return seen_t, seen_s


def test_exporter_killed_mid_stream_restarts_and_loses_nothing(kafka_broker, fresh_topic, ring_dir, tmp_path, exporter_factory):
    topic = fresh_topic(partitions=3)
    exp = exporter_factory(ring_dir, kafka_broker.bootstrap, topic, extra=["--cleanup-grace-s", "60"])
    proc, out = start_producer(ring_dir, tmp_path, "pod-k", "--steps", "300", "--interval", "0.004", "--capacity", str(1 << 20))
    ring_name = "pod-k-r0.ring"
    exp.wait_for(lambda: (r := exp.ring(ring_name)) and r.records_published > 200, what="some records published")
    exp.kill9()
    # what the killed exporter had released: everything before `tail`; it may have sent more
    path = os.path.join(ring_dir, ring_name)
    with open(path, "rb") as f:
        head = f.read(HEADER_SIZE)
        capacity = struct.unpack_from("<Q", head, 16)[0]
        tail = struct.unpack_from("<Q", head, OFF_TAIL)[0]
        f.seek(HEADER_SIZE + tail % capacity + 24)
        tail_frame_seq = struct.unpack("<Q", f.read(8))[0]
    assert proc.poll() is None, "the producer must keep running while the exporter is dead"
    time.sleep(0.5)
    exp.start()
    dump = wait_file(out, proc)
    assert proc.returncode == 0
    seen_t, _ = collect(kafka_broker.bootstrap, topic, dump)
    dups = {s for s, n in seen_t.items() if n > 1}
    # at-least-once rule: only frames not yet released when the exporter died can arrive twice
    assert all(s // SEQ_PARTS_PER_FRAME >= tail_frame_seq for s in dups), (min(dups), tail_frame_seq)
    st = exp.wait_for(lambda: (r := exp.ring(ring_name)) and r.state == "detached" and r, what="ring detached")
    # produced = published + dropped, per frame (the producer's own counts and the ring header agree)
    assert st.frames_committed == dump["frames_written"] and st.frames_dropped_by_producer == dump["frames_dropped"]
    assert st.frames_released == st.frames_committed and not st.frames_dropped_by_reason


@pytest.mark.parametrize("delivery_timeout_ms", [120_000, 4_000], ids=["kafka-retries", "delivery-timeout-rewind"])
def test_broker_outage_exporter_reconnects_and_accounting_is_exact(kafka_broker, fresh_topic, ring_dir, tmp_path,
                                                                   exporter_factory, delivery_timeout_ms):
    topic = fresh_topic(partitions=3)
    exp = exporter_factory(ring_dir, kafka_broker.bootstrap, topic,
                           extra=["--cleanup-grace-s", "60", "--delivery-timeout-ms", str(delivery_timeout_ms),
                                  "--request-timeout-ms", "2000"])
    proc, out = start_producer(ring_dir, tmp_path, "pod-o", "--steps", "1200", "--interval", "0.005",
                               "--capacity", str(512 << 10))
    ring_name = "pod-o-r0.ring"
    exp.wait_for(lambda: (r := exp.ring(ring_name)) and r.records_published > 100, what="publishing")
    kafka_broker.stop()
    try:
        time.sleep(7)   # the producer keeps writing: the exporter stops draining, the ring fills, the producer drops
        mid = exp.ring(ring_name)
        assert exp.http("/readyz")[0] == 503
    finally:
        kafka_broker.start()
    assert exp.alive()
    dump = wait_file(out, proc)
    assert dump["frames_dropped"] > 0, "the ring should have filled during the outage"
    assert mid.fill > 0.5
    seen_t, _ = collect(kafka_broker.bootstrap, topic, dump, timeout_s=180)
    st = exp.wait_for(lambda: (r := exp.ring(ring_name)) and r.state == "detached" and r, timeout_s=120, what="ring drained")
    assert st.frames_committed == dump["frames_written"] and st.frames_dropped_by_producer == dump["frames_dropped"]
    assert st.frames_released == st.frames_committed and not st.frames_dropped_by_reason
    # records: written + dropped (counted by the producer) = every record selected
    total = sum(dump["captured"].values()) + sum(dump["dropped_records"].values())
    assert len(seen_t) == sum(dump["captured"].values()) and total == 1200 * 3 * 2
    _, metrics = exp.http("/metrics")
    assert (f'tensortrace_exporter_frames_dropped_total{{reason="producer_dropped",ring="{ring_name}"}} '
            f'{float(dump["frames_dropped"])}') in metrics
    exp.wait_for(lambda: exp.http("/readyz")[0] == 200, what="ready again")


def test_producer_killed_mid_frame_half_frame_never_exported_ring_cleaned_up(kafka_broker, fresh_topic, ring_dir,
                                                                            tmp_path, exporter_factory):
    topic = fresh_topic(partitions=1)
    exp = exporter_factory(ring_dir, kafka_broker.bootstrap, topic)
    proc, out = start_producer(ring_dir, tmp_path, "pod-x", "--steps", "20", "--interval", "0.002", "--die-mid-frame")
    dump = wait_file(out, proc)
    assert proc.returncode == -9
    seen_t, _ = collect(kafka_broker.bootstrap, topic, dump)
    half = dump["half_frame_seq"]
    assert all(s // SEQ_PARTS_PER_FRAME != half for s in seen_t)
    path = os.path.join(ring_dir, "pod-x-r0.ring")
    exp.wait_for(lambda: not os.path.exists(path), what="ring of the dead producer removed")
    log = exp.log()
    assert "ring detached: " + path in log and "ring removed: " + path in log
    # nothing else arrived (no record of the half-written frame, no extras)
    recs = consume_all(kafka_broker.bootstrap, topic, lambda rs: False, timeout_s=3)
    assert {r.tensor.seq for _, r in recs if r.HasField("tensor")} == set(seen_t)
