"""Configuration of `tensortrace probes`: the consumer settings every stream consumer has
(ConsumerConfig: Kafka, topic, group, dead letters, batching, retries), plus the probe service's own.

>>> ProbesConfig(probe_dir="/etc/tensortrace/probes").problems()
[]
>>> ProbesConfig(probe_dir="", scores_topic="tensortrace.activations").problems()
['probe_dir: empty; give the directory of probe files', "scores_topic: 'tensortrace.activations' is also the activation or dead-letter topic"]

Flags are generated from the fields (tensortrace.service.config): `--probe-dir`, `--scores-topic`,
`--escalation-topic`, `--shadow`, `--shadow-probes`, `--model-id`, `--hidden-size`, ...
docs/probes.md, "The service", has the whole story.
"""

from __future__ import annotations

from dataclasses import dataclass

from tensortrace.consume.config import ConsumerConfig
from tensortrace.service.config import option, raise_problems

DEFAULT_GROUP = "tensortrace-probes"
DEFAULT_SCORES_TOPIC = "tensortrace.probe_scores"
DEFAULT_ESCALATION_TOPIC = "tensortrace.escalations"


@dataclass
class ProbesConfig(ConsumerConfig):
    group_id: str = option(DEFAULT_GROUP, "Kafka consumer group")
    probe_dir: str = option("/etc/tensortrace/probes", "directory of probe files (safetensors + JSON), re-read when it changes")
    reload_interval_s: float = option(2.0, "how often the probe directory is checked for new, changed or removed files")

    # What the stream is expected to carry. Set, every probe is checked against them when it is
    # loaded; unset, when the first record of its model and hook arrives.
    model_id: str = option("", "the model the stream carries; probes for another model are refused at load ('': "
                               "checked against each record's model)")
    hidden_size: int = option(0, "the width of the hooked rows; probes of another width are refused at load (0: checked "
                                 "against the first record of the probe's model and hook)")

    shadow: bool = option(False, "every probe in shadow mode: scored and published, never flagged or escalated")
    shadow_probes: str = option("", "comma-separated probe names in shadow mode (beside their own metadata)")
    thresholds: dict = option(factory=dict, help="JSON object: probe name -> threshold overriding the calibrated one "
                                                 "from its metadata")

    request_timeout_s: float = option(30.0, "a request still missing records or summaries after this is scored "
                                            "incomplete (with what arrived)")
    max_open_requests: int = option(10_000, "requests held at once; beyond, the oldest is scored incomplete (evicted)")
    max_open_bytes: int = option(512 << 20, "payload bytes held for open requests; beyond, the oldest is scored "
                                            "incomplete (evicted)")

    scores_topic: str = option(DEFAULT_SCORES_TOPIC, "Kafka topic of the scores (tensortrace.v1.ProbeScore, keyed by "
                                                     "request id)")
    escalation_topic: str = option(DEFAULT_ESCALATION_TOPIC, "Kafka topic of flagged (non-shadow) scores, the cascade's "
                                                             "second stage; '': off")
    publish_timeout_s: float = option(30.0, "one wait for Kafka to acknowledge a batch of scores (retried after it)")
    token_scores: bool = option(True, "publish each score's per-token scores and positions (for pictures)")
    max_token_scores: int = option(4096, "per-token scores published per score at most (the last ones are kept)")

    def problems(self) -> list[str]:
        out = self.consumer_problems()
        if not self.probe_dir:
            out.append("probe_dir: empty; give the directory of probe files")
        if not 0 < self.reload_interval_s <= 3600:
            out.append(f"reload_interval_s: {self.reload_interval_s} not in (0, 3600]")
        if self.hidden_size < 0:
            out.append(f"hidden_size: {self.hidden_size} < 0")
        if self.request_timeout_s <= 0:
            out.append(f"request_timeout_s: {self.request_timeout_s} must be > 0")
        if self.max_open_requests < 1:
            out.append(f"max_open_requests: {self.max_open_requests} < 1")
        if self.max_open_bytes < 1 << 20:
            out.append(f"max_open_bytes: {self.max_open_bytes} < 1 MiB")
        for name in ("scores_topic", "escalation_topic"):
            v = getattr(self, name)
            if name == "escalation_topic" and v == "":
                continue
            if not v or any(ch.isspace() for ch in v):
                out.append(f"{name}: {v!r} must be a non-empty name without spaces")
            elif v in (self.topic, self.dlq_topic):
                out.append(f"{name}: {v!r} is also the activation or dead-letter topic")
        if self.escalation_topic and self.escalation_topic == self.scores_topic:
            out.append("escalation_topic: must differ from scores_topic")
        for name, v in self.thresholds.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
                out.append(f"thresholds: {name!r}: {v!r} is not a number")
        if self.publish_timeout_s <= 0:
            out.append(f"publish_timeout_s: {self.publish_timeout_s} must be > 0")
        if self.max_token_scores < 0:
            out.append(f"max_token_scores: {self.max_token_scores} < 0")
        return out

    @property
    def shadow_names(self) -> frozenset[str]:
        return frozenset(x.strip() for x in self.shadow_probes.split(",") if x.strip())

    def validate(self) -> "ProbesConfig":
        return raise_problems(self, "probes config")
