"""Ring² file format v1 (tensortrace.ring.format): frames in order, wrap-around, restart, corruption."""

from __future__ import annotations

import os
import random
import signal
import stat
import struct
import subprocess
import sys
import zlib

import pytest

from tensortrace.ring import format as rf
from tensortrace.ring.format import (ALIGN, FRAME_HEADER_SIZE, HEADER_SIZE, FrameKind, RingCorruptError,
                                     RingFormatError, RingIdentity, RingLockedError, RingReader, RingWriter)

pytestmark = pytest.mark.unit


@pytest.fixture
def ring_path(tmp_path):
    return str(tmp_path / "pod-0-r0.ring")


def payload_for(i: int, n: int) -> bytes:
    return bytes((i * 7 + k) & 0xFF for k in range(n))


def drain(reader: RingReader, release: bool = True) -> list[tuple[int, bytes, bytes]]:
    out = []
    last = None
    for f in reader.frames():
        out.append((f.kind, bytes(f.meta), bytes(f.payload)))
        last = f.end
    if release and last is not None:
        reader.release(last)
    return out


def test_frames_come_out_in_order_with_their_meta_and_payload(ring_path):
    w = RingWriter.create(ring_path, capacity=64 * 1024, identity=RingIdentity("m", "pod-0", "node-a", tp_rank=1))
    r = RingReader.open(ring_path)
    assert r.header.identity.pod == "pod-0" and r.header.identity.tp_rank == 1
    assert r.header.identity.pid == os.getpid() and r.header.generation == w.header.generation
    sent = [(FrameKind.STEP, b"step-meta", b""), (FrameKind.SLAB, b"slab", payload_for(1, 1000)),
            (FrameKind.SUMMARY, b"summary", b"")]
    for kind, meta, payload in sent:
        assert w.write(kind, meta, payload)
    assert drain(r) == sent
    assert drain(r) == []  # nothing twice
    r.close()
    w.close()


def test_wrap_around_with_pad_frames_and_varied_sizes(ring_path):
    capacity = 8 * 1024
    w = RingWriter.create(ring_path, capacity=capacity)
    r = RingReader.open(ring_path)
    rnd = random.Random(11)
    sent, got, seqs = [], [], []
    i = 0
    while w._m.head.get() < 6 * capacity:  # many laps
        meta = f"m{i}".encode() * rnd.randint(1, 5)
        payload = payload_for(i, rnd.choice([0, 1, 63, 64, 65, 500, 1500, 3000]))
        if w.write(FrameKind.SLAB, meta, payload):
            sent.append((FrameKind.SLAB, meta, payload))
            i += 1
        else:
            # Full: the consumer catches up (releases everything it read) and the producer retries.
            last = None
            for f in r.frames():
                got.append((f.kind, bytes(f.meta), bytes(f.payload)))
                seqs.append(f.seq)
                last = f.end
            assert last is not None, "ring full but nothing to read"
            r.release(last)
    for f in r.frames():
        got.append((f.kind, bytes(f.meta), bytes(f.payload)))
        seqs.append(f.seq)
    assert got == sent
    # PAD frames took sequence numbers: the data frames' sequence has holes exactly there.
    pads = (seqs[-1] + 1) - len(seqs)
    assert pads > 0 and w._m.head.get() > 5 * capacity
    r.close()
    w.close()


def test_consumer_started_after_the_producer_sees_everything(ring_path):
    w = RingWriter.create(ring_path, capacity=64 * 1024)
    sent = [(FrameKind.SLAB, f"{i}".encode(), payload_for(i, 100 * i)) for i in range(10)]
    for s in sent:
        w.write(*s)
    r = RingReader.open(ring_path)
    assert drain(r) == sent
    r.close()
    w.close()


def test_consumer_restart_rereads_unreleased_frames(ring_path):
    w = RingWriter.create(ring_path, capacity=64 * 1024)
    for i in range(6):
        w.write(FrameKind.SLAB, f"{i}".encode(), payload_for(i, 10))
    r = RingReader.open(ring_path)
    frames = list(r.frames())
    assert [bytes(f.meta) for f in frames] == [b"0", b"1", b"2", b"3", b"4", b"5"]
    r.release(frames[1].end)  # frames 0 and 1 were delivered; 2..5 were read but not delivered
    r.close()  # the consumer dies
    w.write(FrameKind.SLAB, b"6", b"")
    r2 = RingReader.open(ring_path)
    assert [m for _, m, _ in drain(r2, release=False)] == [b"2", b"3", b"4", b"5", b"6"]
    r2.rewind()  # same thing without a restart
    assert [m for _, m, _ in drain(r2)] == [b"2", b"3", b"4", b"5", b"6"]
    r2.close()
    w.close()


def test_release_beyond_what_was_read_or_backwards_is_refused(ring_path):
    w = RingWriter.create(ring_path, capacity=4096)
    w.write(FrameKind.SLAB, b"a", b"x")
    r = RingReader.open(ring_path)
    with pytest.raises(ValueError, match="not read"):
        r.release(10**6)
    [f] = r.frames()
    r.release(f.end)
    with pytest.raises(ValueError, match="tail is already"):
        r.release(0)
    assert r.tail == f.end
    r.close()
    w.close()


def test_full_ring_refuses_and_counts_drops_then_accepts_after_release(ring_path):
    w = RingWriter.create(ring_path, capacity=4096)
    n = 0
    while w.write(FrameKind.SLAB, b"m", payload_for(n, 500)):
        n += 1
    assert n >= 5
    w.count_drop(500)
    r = RingReader.open(ring_path)
    stats = r.producer_stats()
    assert stats["frames_committed"] == n and stats["frames_dropped"] == 1 and stats["bytes_dropped"] == 500
    assert len(drain(r)) == n
    assert w.write(FrameKind.SLAB, b"m", payload_for(0, 500))
    r.close()
    w.close()


def test_frame_larger_than_half_the_ring_is_refused(ring_path):
    w = RingWriter.create(ring_path, capacity=4096)
    assert w.reserve(FrameKind.SLAB, b"", 4096 // 2) is None
    assert not w.write(FrameKind.SLAB, b"", b"\0" * 3000)
    w.close()


def test_rollback_forgets_uncommitted_frames(ring_path):
    w = RingWriter.create(ring_path, capacity=4096)
    w.write(FrameKind.SLAB, b"kept", b"")
    mark = w.mark()
    assert w.reserve(FrameKind.SLAB, b"abandoned", 10) is not None
    w.rollback(mark)
    w.write(FrameKind.SLAB, b"next", b"")
    r = RingReader.open(ring_path)
    assert [m for _, m, _ in drain(r)] == [b"kept", b"next"]
    r.close()
    w.close()


def test_a_second_consumer_is_locked_out(ring_path):
    w = RingWriter.create(ring_path, capacity=4096)
    r = RingReader.open(ring_path)
    with pytest.raises(RingLockedError, match="another consumer"):
        RingReader.open(ring_path)
    r.close()
    RingReader.open(ring_path).close()  # free again once the first one closed
    w.close()


def test_ring_files_are_owner_only(ring_path, tmp_path):
    old = os.umask(0)  # even with a permissive umask
    try:
        w = RingWriter.create(ring_path, capacity=4096)
        r = RingReader.open(ring_path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(ring_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(ring_path + ".consumer.lock").st_mode) == 0o600
    assert rf.ring_files(str(tmp_path)) == [ring_path]
    r.close()
    w.close()


def test_producer_closed_flag(ring_path):
    w = RingWriter.create(ring_path, capacity=4096)
    r = RingReader.open(ring_path)
    assert not r.producer_closed()
    w.close()
    assert r.producer_closed()
    r.close()


_PRODUCER = r"""
import sys, time
from tensortrace.ring.format import RingWriter, FrameKind
w = RingWriter.create(sys.argv[1], capacity=4096)
w.write(FrameKind.SUMMARY, b"alive", b"")
print("ready", flush=True)
time.sleep(600)
"""


def test_producer_alive_is_false_after_the_producer_process_dies(ring_path):
    proc = subprocess.Popen([sys.executable, "-c", _PRODUCER, ring_path], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        r = RingReader.open(ring_path)
        assert r.header.identity.pid == proc.pid
        assert r.producer_alive()
        assert r.producer_alive()  # asking does not take the lock away from the producer
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert not r.producer_alive()
        assert not r.producer_closed()  # killed, not closed cleanly
        assert [m for _, m, _ in drain(r)] == [b"alive"]  # what it committed is still there
        r.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_control_block_round_trip(ring_path):
    w = RingWriter.create(ring_path, capacity=4096)
    r = RingReader.open(ring_path)
    assert w.poll_control() is None
    doc = {"enabled": True, "hooks": ["resid_pre"], "layers": [0, 3]}
    seq = r.write_control(doc)
    assert seq % 2 == 0 and seq > 0
    assert w.poll_control() == doc
    assert w.poll_control() is None  # only changes are returned
    r.write_control({"enabled": False})
    assert w.poll_control() == {"enabled": False}
    r.close()
    w.close()


def test_control_block_being_written_or_corrupt_is_not_read(ring_path):
    w = RingWriter.create(ring_path, capacity=4096)
    r = RingReader.open(ring_path)
    seq = r.write_control({"a": 1})
    r._m.control_seq.set(seq + 1)  # a writer in the middle of an update (odd)
    assert w.poll_control() is None
    r._m.control_seq.set(seq + 2)
    r._m.mm[rf.CONTROL_DATA_OFFSET] ^= 0xFF  # body no longer matches its crc
    assert w.poll_control() is None
    r.write_control({"a": 2})
    assert w.poll_control() == {"a": 2}
    with pytest.raises(ValueError, match="control document is"):
        r.write_control({"x": "y" * rf.CONTROL_MAX})
    r.close()
    w.close()


# -- bad rings -------------------------------------------------------------------------------

def _patch(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_bad_magic_is_a_format_error(ring_path):
    RingWriter.create(ring_path, capacity=4096).close()
    _patch(ring_path, 0, b"NOTARING")
    with pytest.raises(RingFormatError, match="bad magic .* not a TensorTrace ring"):
        RingReader.open(ring_path)


def test_unknown_version_is_a_format_error(ring_path):
    RingWriter.create(ring_path, capacity=4096).close()
    _patch(ring_path, 8, struct.pack("<I", 2))
    with pytest.raises(RingFormatError, match="version 2 is not supported"):
        RingReader.open(ring_path)


def test_truncated_file_is_a_format_error(ring_path):
    RingWriter.create(ring_path, capacity=4096).close()
    os.truncate(ring_path, HEADER_SIZE + 1024)
    with pytest.raises(RingFormatError, match="does not match the file size"):
        RingReader.open(ring_path)
    os.truncate(ring_path, 100)
    with pytest.raises(RingFormatError, match="smaller than the ring header"):
        RingReader.open(ring_path)


def _ring_with_three_frames(path: str) -> RingWriter:
    w = RingWriter.create(path, capacity=8192)
    for i in range(3):
        assert w.write(FrameKind.SLAB, f"meta-{i}".encode(), payload_for(i, 100))
    return w


def _frame_offsets(path: str) -> list[int]:
    """File offsets of the frames of a ring that has not wrapped."""
    out, pos = [], 0
    with open(path, "rb") as f:
        data = f.read()
    head = struct.unpack_from("<Q", data, rf.OFF_HEAD)[0]
    while pos < head:
        out.append(HEADER_SIZE + pos)
        pos += struct.unpack_from("<I", data, HEADER_SIZE + pos + 8)[0]
    return out


@pytest.mark.parametrize("corrupt, message", [
    (lambda off: (off + 0, struct.pack("<I", 0xDEADBEEF)), "bad frame magic 0xdeadbeef"),
    (lambda off: (off + 4, struct.pack("<H", 9)), "unknown frame kind 9"),
    (lambda off: (off + 8, struct.pack("<I", 100)), "frame length 100 .* is impossible"),
    (lambda off: (off + 8, struct.pack("<I", 1 << 20)), "frame length 1048576 .* is impossible"),
    (lambda off: (off + 8, struct.pack("<I", 256)), "says 256 bytes but meta 6 \\+ payload 100 need 192"),
    (lambda off: (off + 32, struct.pack("<I", 12345)), "meta checksum mismatch in frame 1"),
    (lambda off: (off + FRAME_HEADER_SIZE, b"XXXX"), "meta checksum mismatch in frame 1"),
    (lambda off: (off + 24, struct.pack("<Q", 7)), "frame sequence 7 at position \\d+, expected 1"),
])
def test_corrupt_frame_raises_after_the_good_frames_before_it(ring_path, corrupt, message):
    w = _ring_with_three_frames(ring_path)
    second = _frame_offsets(ring_path)[1]
    offset, data = corrupt(second)
    _patch(ring_path, offset, data)
    r = RingReader.open(ring_path)
    got = []
    with pytest.raises(RingCorruptError, match=message):
        for f in r.frames():
            got.append(bytes(f.meta))
    assert got == [b"meta-0"]  # the good frame before the damage was delivered, nothing after it
    r.close()
    w.close()


def test_head_outside_the_ring_is_corrupt(ring_path):
    w = _ring_with_three_frames(ring_path)
    _patch(ring_path, rf.OFF_HEAD, struct.pack("<Q", 10**9))
    r = RingReader.open(ring_path)
    with pytest.raises(RingCorruptError, match="head .* is outside"):
        list(r.frames())
    r.close()
    w.close()


def test_a_frame_beyond_head_is_never_read(ring_path):
    # A producer killed between writing a frame and publishing head leaves nothing visible.
    w = RingWriter.create(ring_path, capacity=4096)
    w.write(FrameKind.SLAB, b"published", b"")
    assert w.reserve(FrameKind.SLAB, b"written-not-committed", 0) is not None
    r = RingReader.open(ring_path)
    assert [m for _, m, _ in drain(r)] == [b"published"]
    r.close()
    w.close()


def test_layout_constants_match_the_documented_offsets():
    # docs/ring-format.md documents these numbers; changing one needs a new FORMAT_VERSION.
    assert (rf.MAGIC, rf.FORMAT_VERSION, HEADER_SIZE, ALIGN, FRAME_HEADER_SIZE) == (b"TTRING\x00\x01", 1, 4096, 64, 40)
    assert (rf.OFF_HEAD, rf.OFF_TAIL, rf.OFF_PRODUCER_STATS, rf.OFF_CONSUMER_STATS, rf.CONTROL_OFFSET) == (256, 320, 384, 448, 512)
    assert (FrameKind.STEP, FrameKind.SLAB, FrameKind.SUMMARY, FrameKind.PAD) == (1, 2, 3, 0xFFFF)
    assert rf.frame_size(6, 100) == 192 and rf.frame_size(0, 0) == 64
    assert zlib.crc32(b"") == 0


def test_the_ring_memory_is_allocated_up_front_unless_asked_not_to(tmp_path):
    """prefault: the file's blocks exist from creation (no page allocation on the hot path, no
    SIGBUS when the tmpfs fills later); prefault=False leaves a sparse file."""
    cap = 8 << 20
    dense = RingWriter.create(str(tmp_path / "dense.ring"), cap)
    sparse = RingWriter.create(str(tmp_path / "sparse.ring"), cap, prefault=False)
    try:
        assert os.stat(dense.path).st_blocks * 512 >= cap
        assert os.stat(sparse.path).st_blocks * 512 < cap // 4
    finally:
        dense.close()
        sparse.close()


def test_a_ring_that_does_not_fit_fails_at_creation_naming_the_directory(tmp_path):
    """Out of space at creation is a clear error and leaves no file behind (the file-size limit
    stands in for a full tmpfs: both make fallocate fail)."""
    code = f"""
import resource, signal
from tensortrace.ring.format import RingWriter
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
try:
    RingWriter.create({str(tmp_path / "big.ring")!r}, 64 << 20)
except OSError as e:
    print("ERROR", e)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "ERROR" in out.stdout, out.stdout + out.stderr
    assert f"cannot allocate a 64 MiB ring in {tmp_path}" in out.stdout
    assert os.listdir(tmp_path) == []


def test_open_refuses_a_symbolic_link_as_the_ring_or_its_lock_file(tmp_path):
    # The exporter lstat-checks a ring and its lock file, then opens them: a producer that swaps in a
    # symbolic link in between must not make it map, lock or create another file (O_NOFOLLOW).
    victim = RingWriter.create(str(tmp_path / "victim.ring"), 1 << 16)
    victim.write(FrameKind.SUMMARY, b"secret")
    link = str(tmp_path / "hostile.ring")
    os.symlink(victim.path, link)
    with pytest.raises(rf.RingNotRegularError, match=r"hostile\.ring: the ring is a symbolic link \(opened with O_NOFOLLOW\)"):
        RingReader.open(link)
    # the lock taken for the refused ring was given back: the real ring opens
    assert not os.path.islink(link + ".consumer.lock")
    os.unlink(link)
    os.unlink(link + ".consumer.lock")
    # a symbolic link as the lock file (dangling: it would create the target through the link)
    own = RingWriter.create(link, 1 << 16)
    target = str(tmp_path / "elsewhere.lock")
    os.symlink(target, link + ".consumer.lock")
    with pytest.raises(rf.RingNotRegularError, match=r"consumer lock file of ring .*hostile\.ring is a symbolic link"):
        RingReader.open(link)
    assert not os.path.exists(target), "nothing created through the link"
    # a FIFO as the lock file: not a regular file
    os.unlink(link + ".consumer.lock")
    os.mkfifo(link + ".consumer.lock", 0o600)
    with pytest.raises(rf.RingNotRegularError, match="is not a regular file"):
        RingReader.open(link)
    os.unlink(link + ".consumer.lock")
    r = RingReader.open(link)
    r.close()
    r = RingReader.open(victim.path)
    assert [f.meta for f in r.frames()] == [b"secret"]
    r.close()
    own.close()
    victim.close()


def test_the_reader_opens_its_files_close_on_exec(ring_path):
    w = RingWriter.create(ring_path, 1 << 16)
    r = RingReader.open(ring_path)
    try:
        import fcntl
        for fd in (r._lock_fd, r._m.fd):
            assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    finally:
        r.close()
        w.close()


def test_unread_puts_back_the_last_frame_read(ring_path):
    w = RingWriter.create(ring_path, 1 << 16)
    r = RingReader.open(ring_path)
    try:
        for i in range(3):
            w.write(FrameKind.SUMMARY, b"m%d" % i)
        frames = r.frames()
        first, second = next(frames), next(frames)
        frames.close()
        with pytest.raises(ValueError, match="is not the last frame read"):
            r.unread(first)
        r.unread(second)
        assert [f.meta for f in r.frames()] == [b"m1", b"m2"]
    finally:
        r.close()
        w.close()
