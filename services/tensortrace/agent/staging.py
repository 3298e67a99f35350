"""CUDA staging path: device staging ring -> async D2H on a side stream -> the pinned ring file.

On the inference thread (no host<->device synchronisation anywhere):
  1. per slab, the ring frame (header + meta) is reserved on the host, as on the CPU path, and the
     selected rows are copied device-to-device into a preallocated device staging ring on the
     compute stream (the activation can be freed or overwritten right after);
  2. once per step (end_step): an event on the compute stream orders a side stream behind those
     copies; the side stream copies each slab from staging straight into its frame's payload
     region of the ring file (registered as pinned memory with cudaHostRegister: one DMA, no
     second host copy); one more event marks them landed. These are launches only.
The background commit thread, per step and in order, waits for that event (Event.synchronize
releases the GIL, so the inference thread runs on), publishes the frames (stores head) and
releases the staging space. The copies are launched by the inference thread (a few µs each, once
per step) rather than by the commit thread: Python work on the commit thread would compete with
the inference thread for the GIL, while Event.synchronize does not hold it.

cudaHostRegister only pins shared-memory (tmpfs) mappings: /run and /dev/shm work, a ring file on
a disk filesystem is refused with cudaErrorInvalidValue (seen on an H100). Then the D2H copies go
into a pinned bounce buffer laid out like the staging ring, and the commit thread copies them into
the ring file (one extra host copy, off the inference thread; `zero_copy` says which). A pageable
destination is never used: cudaMemcpyAsync into pageable memory blocks the calling thread.

When the staging ring or the commit queue is full, a slab is dropped and counted
("staging_full"); the inference thread never waits.

    staging = CudaStaging(writer, ring_u8, torch.device("cuda"), config)   # made by the agent
"""

from __future__ import annotations

import logging
import threading
from collections import deque

import numpy as np

log = logging.getLogger("tensortrace.agent")

_STAGING_ALIGN = 256


class CudaStaging:
    def __init__(self, writer, ring_u8, device, config):
        import torch

        self._torch = torch
        self._writer = writer
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.capacity = config.device_staging_bytes
        self._staging = torch.empty(self.capacity, dtype=torch.uint8, device=device)
        self._side = torch.cuda.Stream(device=device)
        self._queue_max = config.commit_queue_max
        self._queue: deque = deque()   # batches: (event | None, [(end, payload_len, staged, ring_off, staging_end)])
        self._open: list = []          # this step's frames, not yet handed to the commit thread
        self._open_device = False
        self._open_stream = None
        self._busy = False
        self._wake = threading.Event()
        self._stop = False
        self._head = 0   # staging bytes ever reserved (inference thread)
        self._tail = 0   # staging bytes ever released (commit thread)
        self._registered_ptr = None
        self._bounce = None  # pinned host buffer, only when the ring file cannot be registered
        self.commit_error: BaseException | None = None
        # Pin the ring's data area in place: D2H copies land directly in the shared file.
        self._ring = ring_u8
        self._ring_np = ring_u8.numpy()
        ptr = ring_u8.data_ptr()
        size = ring_u8.numel()
        rc = torch.cuda.cudart().cudaHostRegister(ptr, size, 0)
        if int(rc) != 0:
            _clear_cuda_error()  # else torch reports it at its next launch check
            self._bounce = torch.empty(self.capacity, dtype=torch.uint8, pin_memory=True)
            self._bounce_np = self._bounce.numpy()
            log.warning("tensortrace: cudaHostRegister of the ring %s failed (error %d; the ring "
                        "directory is not tmpfs?); copies go through a pinned bounce buffer",
                        writer.path, int(rc))
        else:
            self._registered_ptr = ptr
        self._thread = threading.Thread(target=self._commit_loop, name="tensortrace-commit", daemon=True)
        self._thread.start()

    # -- inference thread ----------------------------------------------------------------------
    def has_room(self, nbytes: int) -> bool:
        if len(self._queue) >= self._queue_max:
            return False
        return self._place(nbytes) is not None

    def _place(self, nbytes: int):
        """(start offset, new head) of a contiguous staging region, or None."""
        size = (nbytes + _STAGING_ALIGN - 1) // _STAGING_ALIGN * _STAGING_ALIGN
        if size > self.capacity:
            return None
        head, tail = self._head, self._tail
        phys = head % self.capacity
        skip = self.capacity - phys if phys + size > self.capacity else 0
        if self.capacity - (head - tail) < skip + size:
            return None
        return (0 if skip else phys), head + skip + size

    def stage(self, rows, src_runs, nrows: int, row_shape: tuple, ring_offset: int, nbytes: int,
              end_position: int) -> None:
        placed = self._place(nbytes)
        if placed is None:  # has_room was checked just before; only a bug gets here
            raise RuntimeError("staging ring full after has_room")
        if not self._open_device:
            # One stream per step is the rule (one forward runs on one stream); looked up once.
            self._open_stream = self._torch.cuda.current_stream(self.device)
        start, new_head = placed
        staged = self._staging[start: start + nbytes]
        dst = staged.view(rows.dtype).view(nrows, *row_shape)
        for src, d, count in src_runs:
            dst[d: d + count].copy_(rows[src: src + count])   # device-to-device, compute stream
        self._head = new_head
        self._open.append((end_position, nbytes, (start, staged), ring_offset, new_head))
        self._open_device = True

    def commit_after_copies(self, end_position: int, nbytes: int) -> None:
        """Publish a frame with no device payload (STEP, SUMMARY) after every earlier frame."""
        if self._open:
            self._open.append((end_position, nbytes, None, 0, None))
        else:
            self._queue.append((None, [(end_position, nbytes, None, 0, None)]))
            self._wake.set()

    def seal(self) -> None:
        """Queue the open frames: one event orders the side stream behind their device copies,
        the side stream copies each slab into the ring (or the bounce buffer), and one event
        marks them landed. Launches only; nothing here waits."""
        if not self._open:
            return
        landed = None
        if self._open_device:
            torch = self._torch
            copied = torch.cuda.Event()
            copied.record(self._open_stream)
            self._side.wait_event(copied)
            with torch.cuda.stream(self._side):
                for _, nbytes, staged, ring_offset, _ in self._open:
                    if staged is None:
                        continue
                    start, src = staged
                    if self._bounce is None:   # straight into the registered ring file
                        self._ring[ring_offset: ring_offset + nbytes].copy_(src, non_blocking=True)
                    else:
                        self._bounce[start: start + nbytes].copy_(src, non_blocking=True)
                landed = torch.cuda.Event()
                landed.record(self._side)
        self._queue.append((landed, self._open))
        self._open = []
        self._open_device = False
        self._wake.set()

    def end_step(self) -> None:
        self.seal()

    def idle(self) -> bool:
        self.seal()
        return not self._queue and not self._busy

    # -- commit thread -------------------------------------------------------------------------
    def _commit_loop(self) -> None:
        torch = self._torch
        torch.cuda.set_device(self.device)
        while True:
            if not self._queue:
                if self._stop:
                    return
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            self._busy = True
            landed, items = self._queue[0]
            try:
                if landed is not None:
                    # Event.synchronize releases the GIL while it waits: the inference thread
                    # runs on; only this thread waits for the copies.
                    landed.synchronize()
                    if self._bounce is not None:
                        for _, nbytes, staged, ring_offset, _ in items:
                            if staged is not None:
                                start = staged[0]
                                np.copyto(self._ring_np[ring_offset: ring_offset + nbytes],
                                          self._bounce_np[start: start + nbytes])
                staging_end = None
                for end, nbytes, _, _, s_end in items:
                    self._writer.commit(end, nbytes)
                    if s_end is not None:
                        staging_end = s_end
            except BaseException as e:  # noqa: BLE001 - the ring stays consistent: head not moved
                self.commit_error = e
                log.error("tensortrace: commit thread failed: %r", e)
                self._busy = False
                return
            if staging_end is not None:
                self._tail = staging_end
            self._queue.popleft()
            self._busy = False

    @property
    def zero_copy(self) -> bool:
        """True when D2H copies land directly in the ring file (it is registered as pinned)."""
        return self._registered_ptr is not None

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)
        if self._registered_ptr is not None:
            self._torch.cuda.cudart().cudaHostUnregister(self._registered_ptr)
            self._registered_ptr = None
        self._ring = None
        self._ring_np = None




def _clear_cuda_error() -> None:
    """Reset the CUDA runtime's last error (a failed cudaHostRegister leaves one behind), in the
    libcudart this process actually loaded."""
    import ctypes

    path = None
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                if "libcudart.so" in line:
                    path = line.split()[-1]
                    break
    except OSError:
        pass
    try:
        ctypes.CDLL(path or "libcudart.so").cudaGetLastError()
    except OSError:
        log.warning("tensortrace: could not load libcudart to clear a CUDA error")
