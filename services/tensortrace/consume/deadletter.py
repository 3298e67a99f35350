"""Dead letters: why a message or record is not processed, as a type, and where it goes.

>>> e = InvalidRecord("raw_size", "raw_size 10 != 64 implied by shape [4, 8]")
>>> e.reason is DeadLetterReason.RAW_SIZE, e.reason.value, str(e)
(True, 'raw_size', 'raw_size 10 != 64 implied by shape [4, 8]')

The reason travels as an enum on the error (`InvalidRecord.reason`), never as text to be searched:
the consumer core counts dead letters by `reason.value` (the `reason` label of the services'
dead-letter metrics) and writes it to the `tensortrace.dlq.reason_code` header; the human-readable
message goes to `tensortrace.dlq.reason`, the source to `tensortrace.dlq.source` ("topic/partition/offset").
"""

from __future__ import annotations

import enum

DLQ_REASON_HEADER = "tensortrace.dlq.reason"          # the message: what exactly is wrong
DLQ_REASON_CODE_HEADER = "tensortrace.dlq.reason_code"  # DeadLetterReason.value
DLQ_SOURCE_HEADER = "tensortrace.dlq.source"          # "topic/partition/offset"


class DeadLetterReason(str, enum.Enum):
    ENVELOPE = "envelope"            # the Kafka message is not a decodable v1 envelope
    CHUNKS = "chunks"                # a chunk set never completed, or its chunks disagree
    DTYPE = "dtype"                  # unknown dtype code
    ENCODING = "encoding"            # unknown payload encoding, or a payload that does not decode
    SHAPE = "shape"                  # negative dimension
    RAW_SIZE = "raw_size"            # raw_size disagrees with shape x dtype, or with a RAW payload
    TOKEN_RANGE = "token_range"      # token_end - token_start != rows
    POSITIONS = "positions"          # positions list length != rows
    TRACE_ID = "trace_id"            # not 16 bytes
    SPAN_ID = "span_id"              # not 8 bytes
    MISSING_FIELD = "missing_field"  # request_id or hook empty
    INVALID_RECORD = "invalid_record"  # anything else a sink refuses


class InvalidRecord(ValueError):
    """A record a consumer will not process; it goes to the dead-letter topic with `reason`."""

    def __init__(self, reason: DeadLetterReason, message: str):
        super().__init__(message)
        self.reason = DeadLetterReason(reason)
