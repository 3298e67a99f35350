"""The one retry backoff of every service: doubling delays, capped, interruptible by a stop event.

    backoff = Backoff(initial_s=0.2, max_s=10.0)
    while not try_once():
        if backoff.wait(stopping):     # True: stopping was set while waiting -> give up
            break

>>> b = Backoff(initial_s=0.5, max_s=3.0)
>>> [b.next_delay() for _ in range(5)]
[0.5, 1.0, 2.0, 3.0, 3.0]
>>> b.reset(); b.next_delay()
0.5
>>> stopping = threading.Event(); stopping.set()
>>> b.wait(stopping)                   # returns at once: the service is stopping
True
"""

from __future__ import annotations

import random
import threading


class Backoff:
    def __init__(self, initial_s: float = 0.2, max_s: float = 10.0, jitter: float = 0.0):
        if not 0 < initial_s <= max_s:
            raise ValueError(f"backoff: need 0 < initial_s ({initial_s}) <= max_s ({max_s})")
        self.initial_s, self.max_s, self.jitter = initial_s, max_s, jitter
        self.delay = initial_s
        self.attempts = 0

    def next_delay(self) -> float:
        """The delay to wait now; the following one doubles (up to max_s)."""
        d = self.delay
        self.delay = min(self.delay * 2, self.max_s)
        self.attempts += 1
        if self.jitter:
            d *= 1 + random.uniform(-self.jitter, self.jitter)
        return d

    def wait(self, stopping: threading.Event | None = None) -> bool:
        """Sleep the next delay; True when `stopping` was set (before or while waiting)."""
        d = self.next_delay()
        if stopping is None:
            threading.Event().wait(d)
            return False
        return stopping.wait(d)

    def reset(self) -> None:
        self.delay = self.initial_s
        self.attempts = 0
