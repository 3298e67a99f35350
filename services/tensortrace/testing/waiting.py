"""A bounded wait for a condition. The limit only stops a hung test; it is not a timing assertion.

    assert wait_until(lambda: loader.stats.get("tensor_rows", 0) > 0, timeout_s=120), "".join(loader.lines)
    assert wait_for_exit(broker_pid, timeout_s=30), "the broker outlived its parent"

>>> wait_until(lambda: 42, timeout_s=1)
42
>>> wait_until(lambda: [], timeout_s=0.1, interval=0.02)
[]
>>> wait_for_exit(os.getpid(), timeout_s=0.1)
False
"""

from __future__ import annotations

import os
import time
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_until(pred: Callable[[], T], timeout_s: float = 90.0, interval: float = 0.05) -> T:
    """Call `pred` every `interval` seconds until it returns something truthy, and return that; at
    the deadline, return what one last call returns (falsy if the condition never held)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    return pred()


def wait_for_exit(pid: int, timeout_s: float = 30.0) -> bool:
    """True once no process has `pid` (signal 0 finds none), False if one still does at the deadline."""
    return wait_until(lambda: not _exists(pid), timeout_s, 0.2)


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's
        return True
    return True
