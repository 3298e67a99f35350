"""Topic helper shared by the exporter tests (a module, not conftest: `from conftest import`
resolves to whichever conftest.py was imported first when several test folders run together)."""

from __future__ import annotations

import time


def topic_name(fresh_topic, partitions: int = 3) -> str:
    """A new topic from the shared factory. Retried for a while: after a broker restart (outage
    tests) the session's admin client needs a moment to reconnect."""
    from kafka.errors import KafkaError

    deadline = time.monotonic() + 60
    while True:
        try:
            return fresh_topic(partitions=partitions)
        except KafkaError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
