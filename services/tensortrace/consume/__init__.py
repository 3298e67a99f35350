"""`tensortrace.consume`: the one implementation of reading the activation topic.

    from tensortrace.consume import ConsumerConfig, ConsumerCore, RequestView
    core = ConsumerCore(ConsumerConfig(group_id="token-counter"), RequestView(my_handler), name="token-counter")
    core.run()     # until core.stop()

Pieces (docs/consumers.md):
  ConsumerCore   poll -> decode -> reassemble chunks -> a Sink; offsets committed only behind what
                 the sink made durable; pause/resume backpressure; rebalances; dead letters.
  Sink           what a consumer service implements (the loader's ClickHouseSink is one).
  RequestView    a Sink for consumers that think in requests (bridge, probes): records grouped
                 by request, de-duplicated, released complete or explicitly incomplete.
  InvalidRecord / DeadLetterReason   typed dead letters.
"""

from tensortrace.consume.config import ConsumerConfig
from tensortrace.consume.core import ConsumerCore, ConsumerStats
from tensortrace.consume.deadletter import DeadLetterReason, InvalidRecord
from tensortrace.consume.requests import CapturedRequest, Release, RequestHandler, RequestView, RequestViewStats
from tensortrace.consume.sink import SealedBatch, Sink, Source

__all__ = ["CapturedRequest", "ConsumerConfig", "ConsumerCore", "ConsumerStats", "DeadLetterReason", "InvalidRecord",
           "Release", "RequestHandler", "RequestView", "RequestViewStats", "SealedBatch", "Sink", "Source"]
