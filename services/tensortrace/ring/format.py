"""Ring² host side: the shared-memory ring file, format version 1.

The contract between two processes on one node: the capture agent (single producer, inside the
inference process) and the exporter (single consumer). It depends on nothing but the standard
library and numpy-free ctypes, so both sides import the same code. docs/ring-format.md documents
every offset below; change them only with a new FORMAT_VERSION.

File = HEADER_SIZE-byte header + `capacity` bytes of data area.

Header (little-endian):
    0   8s   magic b"TTRING\\x00\\x01"
    8   u32  format version (1)
    12  u32  header size (4096)
    16  u64  capacity of the data area in bytes (multiple of ALIGN)
    24  u64  generation (unique per producer incarnation)
    32  u32  producer pid
    36  u32  tp rank
    40  u64  created (unix ns)
    48  u32  flags (bit 0: producer closed cleanly)
    56  64s  model id, 120 64s pod, 184 64s node   (utf-8, NUL padded)
    256 u64  head: bytes ever committed by the producer        (own cache line)
    320 u64  tail: bytes ever released by the consumer         (own cache line)
    384 u64  producer heartbeat (unix ns), u64 frames committed, u64 frames dropped,
             u64 payload bytes committed, u64 payload bytes dropped
    448 u64  consumer heartbeat (unix ns), u64 frames consumed
    512      control block (written by the consumer, read by the producer):
             u64 seq (odd while being written), u32 length, u32 crc32, then `length` bytes of
             UTF-8 JSON (at most CONTROL_MAX bytes)

Frames in the data area start at ALIGN-aligned positions; positions are monotonic byte counters,
the physical offset is position % capacity. A frame never wraps: when it does not fit before the
end of the data area, the producer writes a PAD frame over the rest and starts at offset 0.

Frame header (FRAME_HEADER_SIZE bytes):
    0   u32  magic 0x54544652 ("TTFR")
    4   u16  kind (STEP, SLAB, SUMMARY, PAD)
    6   u16  reserved
    8   u32  total frame length in bytes (ALIGN-aligned, header included)
    12  u32  meta length
    16  u64  payload length
    24  u64  sequence number (per producer generation; 0, 1, 2, ... without gaps)
    32  u32  crc32 of the meta bytes
    36  u32  reserved
    40..     meta, then the payload at the next ALIGN boundary

Publication: the producer writes a whole frame, then stores the new head (an aligned 8-byte store).
A frame beyond head is never read, so a producer killed mid-write leaves nothing half-visible.
The consumer releases space by storing tail after it has delivered the frames (at-least-once).
On x86-64 (TSO) aligned stores are not reordered with earlier stores, which is what this relies on.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import mmap
import os
import stat
import struct
import time
import zlib
from dataclasses import dataclass
from typing import Iterator

from tensortrace.ring.permissions import describe_process

MAGIC = b"TTRING\x00\x01"
FORMAT_VERSION = 1
HEADER_SIZE = 4096
ALIGN = 64
FRAME_MAGIC = 0x54544652
FRAME_HEADER_SIZE = 40
CONTROL_OFFSET = 512
CONTROL_DATA_OFFSET = CONTROL_OFFSET + 16
CONTROL_MAX = HEADER_SIZE - CONTROL_DATA_OFFSET

OFF_HEAD = 256
OFF_TAIL = 320
OFF_PRODUCER_STATS = 384
OFF_CONSUMER_STATS = 448

_HEADER = struct.Struct("<8sIIQQIIQI4x64s64s64s")
_FRAME = struct.Struct("<IHHIIQQI4x")
_CONTROL = struct.Struct("<QII")
assert _FRAME.size == FRAME_HEADER_SIZE
assert _HEADER.size <= OFF_HEAD


class FrameKind:
    STEP = 1
    SLAB = 2
    SUMMARY = 3
    PAD = 0xFFFF
    VALID = (STEP, SLAB, SUMMARY, PAD)


class RingError(Exception):
    """Base class of every ring error."""


class RingFormatError(RingError):
    """The file is not a ring this code can read (magic, version, sizes)."""


class RingCorruptError(RingError):
    """A frame inside the ring is inconsistent; the ring must be quarantined."""


class RingLockedError(RingError):
    """Another consumer already drains this ring."""


class RingNotRegularError(RingError):
    """The ring or its consumer lock file is not a regular file (a symbolic link swapped in after the
    exporter's check, a FIFO, a directory): refused, nothing is opened through it."""


_ALIGN_MASK = ALIGN - 1   # ALIGN is a power of two


def align_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def frame_size(meta_len: int, payload_len: int) -> int:
    """Bytes a frame with this meta and payload occupies in the data area."""
    return align_up(FRAME_HEADER_SIZE + meta_len) + align_up(payload_len)


def payload_offset_in_frame(meta_len: int) -> int:
    return align_up(FRAME_HEADER_SIZE + meta_len)


def _fixed(s: str, n: int = 64) -> bytes:
    b = s.encode()[:n]
    return b + b"\x00" * (n - len(b))


def _unfixed(b: bytes) -> str:
    return b.rstrip(b"\x00").decode(errors="replace")


@dataclass(frozen=True)
class RingIdentity:
    """Who writes a ring: copied into the header, read by the exporter."""

    model_id: str = ""
    pod: str = ""
    node: str = ""
    pid: int = 0
    tp_rank: int = 0


@dataclass(frozen=True)
class RingHeader:
    version: int
    capacity: int
    generation: int
    identity: RingIdentity
    created_unix_nano: int
    flags: int

    @property
    def producer_closed(self) -> bool:
        return bool(self.flags & 1)


class _U64:
    """An aligned 8-byte counter inside the mapping; loads and stores are single machine ops."""

    __slots__ = ("_c",)

    def __init__(self, buf, offset: int):
        self._c = ctypes.c_uint64.from_buffer(buf, offset)

    def get(self) -> int:
        return self._c.value

    def set(self, v: int) -> None:
        self._c.value = v

    def add(self, d: int) -> None:  # single writer per counter
        self._c.value += d


class _Mapping:
    """A mapped ring file with typed views on its header fields."""

    def __init__(self, path: str, fd: int, size: int, populate: bool = False):
        self.path = path
        self.fd = fd
        flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
        self.mm = mmap.mmap(fd, size, flags, mmap.PROT_READ | mmap.PROT_WRITE)
        self.size = size
        self.head = _U64(self.mm, OFF_HEAD)
        self.tail = _U64(self.mm, OFF_TAIL)
        self.producer_heartbeat = _U64(self.mm, OFF_PRODUCER_STATS)
        self.frames_committed = _U64(self.mm, OFF_PRODUCER_STATS + 8)
        self.frames_dropped = _U64(self.mm, OFF_PRODUCER_STATS + 16)
        self.bytes_committed = _U64(self.mm, OFF_PRODUCER_STATS + 24)
        self.bytes_dropped = _U64(self.mm, OFF_PRODUCER_STATS + 32)
        # the producer's own inference-thread time (ns), in the slot that was zero padding
        self.producer_thread_ns = _U64(self.mm, OFF_PRODUCER_STATS + 40)
        self.consumer_heartbeat = _U64(self.mm, OFF_CONSUMER_STATS)
        self.frames_consumed = _U64(self.mm, OFF_CONSUMER_STATS + 8)
        self.control_seq = _U64(self.mm, CONTROL_OFFSET)

    def close(self) -> None:
        # ctypes views pin the buffer; drop them before closing the map.
        for name in ("head", "tail", "producer_heartbeat", "frames_committed", "frames_dropped",
                     "bytes_committed", "bytes_dropped", "producer_thread_ns", "consumer_heartbeat", "frames_consumed",
                     "control_seq"):
            setattr(self, name, None)
        try:
            self.mm.close()
        except BufferError:
            pass  # a caller still holds a view (e.g. a torch tensor); the OS unmaps at exit
        os.close(self.fd)


def read_header(mm) -> RingHeader:
    if len(mm) < HEADER_SIZE:
        raise RingFormatError(f"file is {len(mm)} bytes, smaller than the {HEADER_SIZE}-byte ring header")
    (magic, version, header_size, capacity, generation, pid, tp_rank, created, flags,
     model_id, pod, node) = _HEADER.unpack_from(mm, 0)
    if magic != MAGIC:
        raise RingFormatError(f"bad magic {magic!r} (expected {MAGIC!r}): not a TensorTrace ring")
    if version != FORMAT_VERSION:
        raise RingFormatError(f"ring format version {version} is not supported (this reader knows {FORMAT_VERSION})")
    if header_size != HEADER_SIZE:
        raise RingFormatError(f"header size {header_size} != {HEADER_SIZE}")
    if capacity == 0 or capacity % ALIGN or HEADER_SIZE + capacity != len(mm):
        raise RingFormatError(f"capacity {capacity} does not match the file size {len(mm)}")
    ident = RingIdentity(_unfixed(model_id), _unfixed(pod), _unfixed(node), pid, tp_rank)
    return RingHeader(version, capacity, generation, ident, created, flags)


class RingWriter:
    """The producer side. Not thread-safe: one inference thread writes.

        w = RingWriter.create("/run/tensortrace/pod-0.ring", capacity=64 << 20)
        w.write(FrameKind.SUMMARY, meta=b"...", payload=b"")   # True, or False when full
    """

    def __init__(self, mapping: _Mapping, header: RingHeader, lock_fd: int | None):
        self._m = mapping
        self.header = header
        self.capacity = header.capacity
        self.path = mapping.path
        self._lock_fd = lock_fd
        self._reserved = mapping.head.get()  # == head: nothing outstanding at start
        self._seq = 0
        self.data = memoryview(mapping.mm)[HEADER_SIZE:]
        self._last_control_seq = 0

    @classmethod
    def create(cls, path: str, capacity: int, identity: RingIdentity | None = None,
               generation: int | None = None, mode: int = 0o600, prefault: bool = True,
               gid: int | None = None) -> "RingWriter":
        """Create a ring file atomically (written aside, then renamed into place).

        mode, gid: owner-only `0600` by default; `mode=0o660, gid=G` shares it with the ring group G
        (the exporter's supplementary group; docs/operations.md "Ring permissions"). The group is
        set before the rename, so the exporter never sees the ring with another group.

        prefault: allocate the file's memory now (posix_fallocate) and map it populated. A sparse
        tmpfs file allocates and zeroes a page the first time a frame touches it, on the inference
        thread (8x slower writes on a fresh ring: docs/ring-format.md), and when the tmpfs is full
        that first touch is a SIGBUS that kills the process; allocated up front, a ring that does
        not fit fails here, with an error naming the directory.
        """
        if capacity <= 0 or capacity % ALIGN:
            raise ValueError(f"capacity must be a positive multiple of {ALIGN}, got {capacity}")
        identity = identity or RingIdentity(pid=os.getpid())
        if identity.pid == 0:
            identity = RingIdentity(identity.model_id, identity.pod, identity.node, os.getpid(), identity.tp_rank)
        generation = generation if generation is not None else time.time_ns()
        tmp = f"{path}.tmp-{os.getpid()}"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)
        try:
            if gid is not None and os.fstat(fd).st_gid != gid:   # a setgid directory already gave it
                try:
                    os.fchown(fd, -1, gid)
                except PermissionError as e:
                    raise PermissionError(e.errno, f"cannot give ring {path} to group {gid}: {e.strerror} (this "
                                                   f"process: {describe_process()}); run it in group {gid} "
                                                   "(securityContext.supplementalGroups) or as root, or create the "
                                                   "ring directory setgid with that group (`tensortrace ring-dir "
                                                   "prepare`)") from None
            os.fchmod(fd, mode)  # not subject to umask; after the chown, which may clear bits
            try:
                os.ftruncate(fd, HEADER_SIZE + capacity)
                if prefault:
                    os.posix_fallocate(fd, 0, HEADER_SIZE + capacity)
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.ENOMEM):
                    raise  # not a space problem (fallocate is emulated by glibc where unsupported)
                raise OSError(e.errno, f"cannot allocate a {(HEADER_SIZE + capacity) >> 20} MiB ring in "
                                       f"{os.path.dirname(path) or '.'}: {e.strerror} (free space there, or a "
                                       f"smaller ring capacity)") from None
            m = _Mapping(path, fd, HEADER_SIZE + capacity, populate=prefault)
            _HEADER.pack_into(m.mm, 0, MAGIC, FORMAT_VERSION, HEADER_SIZE, capacity, generation,
                              identity.pid, identity.tp_rank, time.time_ns(), 0,
                              _fixed(identity.model_id), _fixed(identity.pod), _fixed(identity.node))
            # The producer holds a shared lock for its whole life: the exporter knows the
            # producer is gone when it can take an exclusive lock (works across containers).
            fcntl.flock(fd, fcntl.LOCK_SH)
            os.rename(tmp, path)
        except BaseException:
            os.close(fd)
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        m.path = path
        w = cls(m, read_header(m.mm), None)
        w.heartbeat()
        return w

    # -- writing -------------------------------------------------------------------------
    def reserve(self, kind: int, meta: bytes, payload_len: int) -> tuple[int, int] | None:
        """Reserve a frame and write its header and meta; returns (position, payload offset in
        `data`), or None when the ring has no room (the caller drops by its policy).

        The payload must be written to data[payload_offset : payload_offset + payload_len] and
        then `commit(position)` called, in reservation order.
        """
        # frame_size() and payload_offset_in_frame(), inlined: this runs once per tap per step
        meta_len = len(meta)
        head_len = (FRAME_HEADER_SIZE + meta_len + _ALIGN_MASK) & ~_ALIGN_MASK
        size = head_len + ((payload_len + _ALIGN_MASK) & ~_ALIGN_MASK)
        cap = self.capacity
        if size > cap // 2:
            return None  # never fits without starving everything else; caller counts it
        pos = self._reserved
        phys = pos % cap
        pad = cap - phys if phys + size > cap else 0
        if cap - (pos - self._m.tail._c.value) < pad + size:
            return None
        mm = self._m.mm
        if pad:
            _FRAME.pack_into(mm, HEADER_SIZE + phys, FRAME_MAGIC, FrameKind.PAD, 0, pad, 0, 0,
                             self._seq, 0)
            self._seq += 1
            pos += pad
            phys = 0
        base = HEADER_SIZE + phys
        _FRAME.pack_into(mm, base, FRAME_MAGIC, kind, 0, size, meta_len, payload_len, self._seq,
                         zlib.crc32(meta))
        self._seq += 1
        mm[base + FRAME_HEADER_SIZE: base + FRAME_HEADER_SIZE + meta_len] = meta
        self._reserved = pos + size
        return pos + size, phys + head_len

    def commit(self, end_position: int, payload_len: int = 0) -> None:
        """Publish every frame reserved up to `end_position` (the value reserve returned)."""
        self._m.head.set(end_position)
        self._m.frames_committed.add(1)
        self._m.bytes_committed.add(payload_len)

    def write(self, kind: int, meta: bytes, payload: bytes | memoryview = b"") -> bool:
        """Reserve, copy and commit one frame. False when the ring is full."""
        r = self.reserve(kind, meta, len(payload))
        if r is None:
            return False
        end, off = r
        if len(payload):
            self.data[off: off + len(payload)] = payload
        self.commit(end, len(payload))
        return True

    def mark(self) -> tuple[int, int]:
        """The reservation state, for rollback() when filling a reserved frame fails."""
        return self._reserved, self._seq

    def rollback(self, mark: tuple[int, int]) -> None:
        """Forget every frame reserved since `mark` (none of them may be committed yet)."""
        if mark[0] < self._m.head.get():
            raise ValueError("cannot roll back past a committed frame")
        self._reserved, self._seq = mark

    def count_drop(self, payload_len: int) -> None:
        self._m.frames_dropped.add(1)
        self._m.bytes_dropped.add(payload_len)

    def heartbeat(self) -> None:
        self._m.producer_heartbeat.set(time.time_ns())

    def report_thread_ns(self, ns: int) -> None:
        """The producer's inference-thread time spent capturing (cumulative ns), for the exporter's
        metrics. One store; 0 means not reported (rings written before this field existed)."""
        self._m.producer_thread_ns.set(ns)

    @property
    def outstanding(self) -> bool:
        """True while reserved frames are not yet committed."""
        return self._reserved != self._m.head.get()

    # -- control block (written by the exporter) -------------------------------------------
    def poll_control(self) -> dict | None:
        """The newest control document if it changed since the last call, else None. Never blocks."""
        return _read_control(self._m, self)

    def close(self) -> None:
        """Mark the ring closed by its producer (the exporter drains it, then removes it)."""
        struct.pack_into("<I", self._m.mm, 48, self.header.flags | 1)
        self.data.release()
        self._m.close()


def _read_control(m: _Mapping, state) -> dict | None:
    seq = m.control_seq.get()
    if seq == state._last_control_seq or seq & 1:
        return None
    _, length, crc = _CONTROL.unpack_from(m.mm, CONTROL_OFFSET)
    if length > CONTROL_MAX:
        return None
    body = bytes(m.mm[CONTROL_DATA_OFFSET: CONTROL_DATA_OFFSET + length])
    if m.control_seq.get() != seq or zlib.crc32(body) != crc:
        return None  # being rewritten; next poll sees the finished one
    state._last_control_seq = seq
    try:
        return json.loads(body)
    except ValueError:
        return None


@dataclass
class Frame:
    """One frame read from a ring. `meta` is a copy (the bytes its checksum was verified on: a
    producer rewriting the frame afterwards cannot change what is parsed); `payload` is a view into
    the mapping, valid until the consumer releases past `end`."""

    kind: int
    seq: int
    position: int
    end: int
    meta: bytes
    payload: memoryview


class RingReader:
    """The consumer side (the exporter). One reader per ring, enforced with a lock file.

        r = RingReader.open("/run/tensortrace/pod-0.ring")
        for frame in r.frames():
            publish(frame)
        r.release(frame.end)
    """

    def __init__(self, mapping: _Mapping, header: RingHeader, lock_fd: int):
        self._m = mapping
        self.header = header
        self.capacity = header.capacity
        self.path = mapping.path
        self._lock_fd = lock_fd
        self._data = memoryview(mapping.mm)[HEADER_SIZE:]
        # The consumer's own copy of tail. The producer maps the same page and could store anything
        # there: tail is read from the file once (what the previous consumer released) and from then
        # on only written, so a hostile producer cannot make the consumer skip, re-read or refuse
        # its own release (which used to raise ValueError out of the exporter's main loop).
        self._released = mapping.tail.get()
        self._read_pos = self._released
        self._expected_seq: int | None = None

    @classmethod
    def open(cls, path: str) -> "RingReader":
        """Lock `path + ".consumer.lock"` and map `path`. Both are opened with O_NOFOLLOW (and
        O_CLOEXEC) and must be regular files: a producer that swaps a symbolic link in between the
        exporter's lstat check and this open cannot make it lock, map or create another file
        (RingNotRegularError, which the exporter counts as a `not_regular` refusal)."""
        lock_path = path + ".consumer.lock"
        lock_fd = _open_regular(lock_path, os.O_RDWR | os.O_CREAT, "consumer lock file of ring " + path)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise RingLockedError(f"{path}: another consumer holds {path}.consumer.lock")
        try:
            fd = _open_regular(path, os.O_RDWR, "ring")
        except BaseException:
            os.close(lock_fd)
            raise
        try:
            size = os.fstat(fd).st_size
            if size < HEADER_SIZE:
                raise RingFormatError(f"{path}: {size} bytes, smaller than the ring header")
            m = _Mapping(path, fd, size)
        except BaseException:
            os.close(fd)
            os.close(lock_fd)
            raise
        try:
            header = read_header(m.mm)
        except RingFormatError as e:
            m.close()
            os.close(lock_fd)
            raise RingFormatError(f"{path}: {e}") from None
        return cls(m, header, lock_fd)

    @property
    def head(self) -> int:
        return self._m.head.get()

    @property
    def tail(self) -> int:
        """Bytes released by this consumer (its own copy; the value in the file is not trusted)."""
        return self._released

    def fill(self) -> float:
        """Fraction of the data area holding frames not yet released."""
        return min(1.0, max(0, self.head - self._released) / self.capacity)

    def frames(self, max_frames: int = 1 << 30, max_bytes: int = 1 << 62) -> Iterator[Frame]:
        """Yield committed frames after the last one yielded (PAD frames are skipped).

        Raises RingCorruptError on the first inconsistent frame; nothing after it is yielded.
        """
        head = self._m.head.get()
        mm = self._m.mm
        n = 0
        start = self._read_pos
        if head - self._released > self.capacity or head < self._read_pos:
            raise RingCorruptError(f"{self.path}: head {head} is outside [tail {self._released}, tail + capacity "
                                   f"{self.capacity}] (read position {self._read_pos})")
        while self._read_pos < head and n < max_frames and self._read_pos - start < max_bytes:
            pos = self._read_pos
            phys = pos % self.capacity
            if self.capacity - phys < FRAME_HEADER_SIZE or phys % ALIGN:
                raise RingCorruptError(f"{self.path}: frame position {pos} is misaligned")
            base = HEADER_SIZE + phys
            magic, kind, _, total, meta_len, payload_len, seq, crc = _FRAME.unpack_from(mm, base)
            if magic != FRAME_MAGIC:
                raise RingCorruptError(f"{self.path}: bad frame magic {magic:#x} at position {pos}")
            if kind not in FrameKind.VALID:
                raise RingCorruptError(f"{self.path}: unknown frame kind {kind} at position {pos}")
            if (total < FRAME_HEADER_SIZE or total % ALIGN or phys + total > self.capacity
                    or pos + total > head):
                raise RingCorruptError(f"{self.path}: frame length {total} at position {pos} is impossible")
            if kind != FrameKind.PAD and frame_size(meta_len, payload_len) != total:
                raise RingCorruptError(
                    f"{self.path}: frame at {pos} says {total} bytes but meta {meta_len} + payload {payload_len} need {frame_size(meta_len, payload_len)}")
            if self._expected_seq is not None and seq != self._expected_seq:
                raise RingCorruptError(f"{self.path}: frame sequence {seq} at position {pos}, expected {self._expected_seq}")
            self._expected_seq = seq + 1
            self._read_pos = pos + total
            if kind == FrameKind.PAD:
                continue
            # one copy of the meta (at most the frame's size, checked above against the ring), and the
            # checksum of that copy: what is parsed later is what was checked
            meta = mm[base + FRAME_HEADER_SIZE: base + FRAME_HEADER_SIZE + meta_len]
            if zlib.crc32(meta) != crc:
                raise RingCorruptError(f"{self.path}: meta checksum mismatch in frame {seq} at position {pos}")
            poff = phys + payload_offset_in_frame(meta_len)
            n += 1
            yield Frame(kind, seq, pos, pos + total, meta, self._data[poff: poff + payload_len])

    def release(self, end_position: int) -> None:
        """Give the space of every frame ending at or before `end_position` back to the producer."""
        if end_position > self._read_pos:
            raise ValueError("cannot release frames that were not read")
        if end_position < self._released:
            # Moving tail back would hand the consumer space the producer may already reuse.
            raise ValueError(f"cannot release back to {end_position}: tail is already {self._released}")
        self._released = end_position
        self._m.tail.set(end_position)
        self._m.consumer_heartbeat.set(time.time_ns())

    def rewind(self) -> None:
        """Forget frames read but not released: the next frames() starts again at tail."""
        self._read_pos = self._released
        self._expected_seq = None

    def unread(self, frame: Frame) -> None:
        """Put back the last frame frames() yielded (the generator must be closed first): the next
        frames() yields it again. The exporter stops a pass before a frame that would take it past
        its record budget (max-pass-records) this way; nothing is released or skipped."""
        if frame.end != self._read_pos or frame.position < self._released:
            raise ValueError(f"{self.path}: frame {frame.seq} at {frame.position} is not the last frame read "
                             f"(read position {self._read_pos})")
        self._read_pos = frame.position
        self._expected_seq = frame.seq

    def count_consumed(self, n: int) -> None:
        self._m.frames_consumed.add(n)

    @property
    def frames_consumed(self) -> int:
        """Frames released over the ring's life, by every consumer incarnation (kept in the header)."""
        return self._m.frames_consumed.get()

    def file_identity(self) -> tuple[int, int]:
        """(st_dev, st_ino) of the mapped file: tells a ring replaced under the same path apart."""
        st = os.fstat(self._m.fd)
        return st.st_dev, st.st_ino

    def producer_stats(self) -> dict:
        m = self._m
        return {
            "heartbeat_unix_nano": m.producer_heartbeat.get(),
            "frames_committed": m.frames_committed.get(),
            "frames_dropped": m.frames_dropped.get(),
            "bytes_committed": m.bytes_committed.get(),
            "bytes_dropped": m.bytes_dropped.get(),
            "thread_ns": m.producer_thread_ns.get(),
        }

    def producer_alive(self) -> bool:
        """False once the producer process is gone (its shared lock on the ring file is released)."""
        try:
            fcntl.flock(self._m.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(self._m.fd, fcntl.LOCK_UN)
        return False

    def producer_closed(self) -> bool:
        return bool(struct.unpack_from("<I", self._m.mm, 48)[0] & 1)

    def write_control(self, doc: dict) -> int:
        """Publish a control document for the producer (seqlock: odd while writing)."""
        body = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
        if len(body) > CONTROL_MAX:
            raise ValueError(f"control document is {len(body)} bytes; at most {CONTROL_MAX}")
        seq = self._m.control_seq.get()
        if seq & 1:
            seq += 1
        self._m.control_seq.set(seq + 1)
        mm = self._m.mm
        struct.pack_into("<II", mm, CONTROL_OFFSET + 8, len(body), zlib.crc32(body))
        mm[CONTROL_DATA_OFFSET: CONTROL_DATA_OFFSET + len(body)] = body
        self._m.control_seq.set(seq + 2)
        return seq + 2

    def close(self) -> None:
        self._data.release()
        self._m.close()
        os.close(self._lock_fd)


def _open_regular(path: str, flags: int, what: str) -> int:
    """os.open without following a symbolic link in the last component, and only a regular file."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise RingNotRegularError(f"{path}: the {what} is a symbolic link (opened with O_NOFOLLOW); "
                                      "rings and their lock files must be regular files: remove it") from None
        raise
    try:
        mode = os.fstat(fd).st_mode
    except BaseException:
        os.close(fd)
        raise
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise RingNotRegularError(f"{path}: the {what} is not a regular file (mode {mode:o}); rings and their "
                                  "lock files must be regular files: remove it")
    return fd


def ring_files(directory: str) -> list[str]:
    """Ring files in a directory (the exporter's watch list), oldest first."""
    try:
        names = [n for n in os.listdir(directory) if n.endswith(".ring")]
    except FileNotFoundError:
        return []
    paths = [os.path.join(directory, n) for n in names]
    return sorted(paths, key=lambda p: os.stat(p).st_mtime_ns if os.path.exists(p) else 0)
