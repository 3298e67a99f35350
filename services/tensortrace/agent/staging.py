"""CUDA staging path: device staging ring -> async D2H on a side stream -> the pinned ring file.

On the inference thread, per slab (no host<->device synchronisation anywhere):
  1. the ring frame (header + meta) is reserved on the host, as on the CPU path;
  2. the selected rows are copied device-to-device into a preallocated device staging ring
     (on the compute stream, so the activation can be freed or overwritten right after);
  3. an event on the compute stream orders a side stream behind that copy; the side stream copies
     the staged bytes into the frame's payload region of the ring file, which is registered as
     pinned memory (cudaHostRegister), so the copy is a true async DMA with no second host copy;
  4. an event recorded after the D2H copy, with the frame's end position, goes to the commit queue.
A background commit thread waits for each event in order and publishes the frame (stores head),
then releases the staging space.

cudaHostRegister only pins shared-memory (tmpfs) mappings: /run and /dev/shm work, a ring file on
a disk filesystem is refused with cudaErrorInvalidValue (seen on an H100). Then the D2H copy goes
into a pinned bounce buffer laid out like the staging ring, and the commit thread copies it into
the ring file (one extra host copy, off the inference thread). A pageable destination is never
used: cudaMemcpyAsync into pageable memory blocks the calling thread. The inference thread never waits on it: when the staging ring or
the commit queue is full, the slab is dropped and counted ("staging_full").

>>> staging = CudaStaging(writer, ring_u8, torch.device("cuda"), config)   # made by the agent
"""

from __future__ import annotations

import logging
import threading
from collections import deque

log = logging.getLogger("tensortrace.agent")

_STAGING_ALIGN = 256


class CudaStaging:
    def __init__(self, writer, ring_u8, device, config):
        import torch

        self._torch = torch
        self._writer = writer
        self.device = device
        self.capacity = config.device_staging_bytes
        self._staging = torch.empty(self.capacity, dtype=torch.uint8, device=device)
        self._side = torch.cuda.Stream(device=device)
        self._queue_max = config.commit_queue_max
        self._queue: deque = deque()   # (event | None, end_position, payload_len, staging_end)
        self._wake = threading.Event()
        self._stop = False
        self._head = 0   # staging bytes ever reserved (inference thread)
        self._tail = 0   # staging bytes ever released (commit thread)
        self._registered_ptr = None
        self._bounce = None  # pinned host buffer, only when the ring file cannot be registered
        self.commit_error: BaseException | None = None
        # Pin the ring's data area in place: D2H copies land directly in the shared file.
        self._ring = ring_u8
        ptr = ring_u8.data_ptr()
        size = ring_u8.numel()
        rc = torch.cuda.cudart().cudaHostRegister(ptr, size, 0)
        if int(rc) != 0:
            _clear_cuda_error()  # else torch reports it at its next launch check
            self._bounce = torch.empty(self.capacity, dtype=torch.uint8, pin_memory=True)
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
        torch = self._torch
        placed = self._place(nbytes)
        if placed is None:  # has_room was checked just before; only a bug gets here
            raise RuntimeError("staging ring full after has_room")
        start, new_head = placed
        staged = self._staging[start: start + nbytes]
        dst = staged.view(rows.dtype).view(nrows, *row_shape)
        for src, d, count in src_runs:
            dst[d: d + count].copy_(rows[src: src + count])   # device-to-device, compute stream
        copied = torch.cuda.Event()
        copied.record()                                         # on the compute stream
        self._side.wait_event(copied)
        bounce = None
        with torch.cuda.stream(self._side):
            if self._bounce is None:
                self._ring[ring_offset: ring_offset + nbytes].copy_(staged, non_blocking=True)
            else:
                bounce = (self._bounce[start: start + nbytes], ring_offset)
                bounce[0].copy_(staged, non_blocking=True)
            landed = torch.cuda.Event()
            landed.record(self._side)
        self._head = new_head
        self._queue.append((landed, end_position, nbytes, new_head, bounce))
        self._wake.set()

    def commit_after_copies(self, end_position: int, nbytes: int) -> None:
        """Publish a frame with no device payload (STEP, SUMMARY) after every earlier frame."""
        self._queue.append((None, end_position, nbytes, None, None))
        self._wake.set()

    def end_step(self) -> None:
        pass

    def idle(self) -> bool:
        return not self._queue

    # -- commit thread -------------------------------------------------------------------------
    def _commit_loop(self) -> None:
        while True:
            if not self._queue:
                if self._stop:
                    return
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            event, end, nbytes, staging_end, bounce = self._queue[0]
            try:
                if event is not None:
                    event.synchronize()   # this thread only; the inference thread never waits
                if bounce is not None:
                    src, ring_offset = bounce
                    self._ring[ring_offset: ring_offset + src.numel()].copy_(src)
                self._writer.commit(end, nbytes)
            except BaseException as e:  # noqa: BLE001 - the ring stays consistent: head not moved
                self.commit_error = e
                log.error("tensortrace: commit thread failed: %r", e)
                return
            if staging_end is not None:
                self._tail = staging_end
            self._queue.popleft()

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
