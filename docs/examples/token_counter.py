"""Count the tokens each model served, from the activation stream: a whole consumer service.

    python docs/examples/token_counter.py --kafka-bootstrap-servers 127.0.0.1:9092 --http-port 9470

Flags (Kafka, topic, group, dead letters, batching), /healthz, /readyz, /metrics, logging and
SIGTERM come from the platform; what is below is all this consumer's own.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from prometheus_client import Counter as PromCounter

from tensortrace.consume import CapturedRequest, ConsumerConfig, ConsumerCore, RequestView
from tensortrace.service import service_main


@dataclass
class TokenCounterConfig(ConsumerConfig):
    group_id: str = "token-counter"
    request_timeout_s: float = 30.0   # a request still missing records after this counts as incomplete

    def problems(self) -> list[str]:
        out = self.consumer_problems()
        if self.request_timeout_s <= 0:
            out.append(f"request_timeout_s: {self.request_timeout_s} must be > 0")
        return out


class TokenCounter:
    def __init__(self, cfg: TokenCounterConfig):
        self.registry = CollectorRegistry()
        self.tokens_total = PromCounter("token_counter_tokens", "Tokens served, by model and kind",
                                        ["model", "kind"], registry=self.registry)
        self.requests_total = PromCounter("token_counter_requests", "Requests seen, by model and completeness",
                                          ["model", "state"], registry=self.registry)
        self.tokens: Counter[str] = Counter()
        # keep=...: no payloads are needed, only the summaries (every record still counts for completeness)
        view = RequestView(self, timeout_s=cfg.request_timeout_s, keep=lambda record: False)
        self.core = ConsumerCore(cfg, view, name="token-counter")

    def on_request(self, req: CapturedRequest) -> None:   # once per finished request
        c = req.completeness
        self.requests_total.labels(req.model, c.state).inc()
        if c.summaries:   # token counts come from the summary; a request without one has none
            self.tokens[req.model] += c.prompt_tokens + c.generated_tokens
            self.tokens_total.labels(req.model, "prompt").inc(c.prompt_tokens)
            self.tokens_total.labels(req.model, "generated").inc(c.generated_tokens)

    # what service_main needs
    def run(self) -> None:
        self.core.run()

    def stop(self) -> None:
        self.core.stop()

    def live(self) -> bool:
        return self.core.live()

    def ready(self) -> bool:
        return self.core.ready.is_set()

    def ports(self) -> dict[str, int]:
        return {}


def main(argv: list[str] | None = None) -> int:
    return service_main("token-counter", TokenCounterConfig, TokenCounter, argv, http_port=9470)


if __name__ == "__main__":
    sys.exit(main())
