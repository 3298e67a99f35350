"""One clickhouse-connect client shared by threads.

    shared = ThreadSafeClient(connect("chdb:///tmp/tt"))

chDB runs the engine inside this process and a path can be opened by one process only, so the
loader's insert thread and the query service's handlers share one client; clickhouse-connect
clients are not thread-safe, hence every call is serialised.
"""

from __future__ import annotations

import threading


class ThreadSafeClient:
    """Serialises calls on one clickhouse-connect client (attributes pass through unlocked)."""

    def __init__(self, client):
        self.client = client
        self._lock = threading.Lock()

    def __getattr__(self, name):
        attr = getattr(self.client, name)
        if not callable(attr):
            return attr

        def locked(*args, **kwargs):
            with self._lock:
                return attr(*args, **kwargs)
        return locked
