"""Prometheus metric families every consumer service exports the same way (its own prefix).

    yield lag_family("tensortrace_loader_", core)   # in a collector's collect()
"""

from __future__ import annotations

from prometheus_client.core import GaugeMetricFamily


def lag_family(prefix: str, core, name: str = "consumer_lag_messages") -> GaugeMetricFamily:
    """`<prefix>consumer_lag_messages{partition}`: per assigned partition, its high watermark (as
    the last fetch reported it) minus the group's committed offset (ConsumerCore.lag)."""
    g = GaugeMetricFamily(prefix + name, "messages on the topic not yet committed by this consumer, per partition",
                          labels=["partition"])
    for partition, n in sorted(core.lag.items()):
        g.add_metric([str(partition)], n)
    return g
