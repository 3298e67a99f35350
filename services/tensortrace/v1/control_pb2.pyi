from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SetCaptureRequest(_message.Message):
    __slots__ = ("control_json", "enabled", "selection_json", "rings")
    CONTROL_JSON_FIELD_NUMBER: _ClassVar[int]
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    SELECTION_JSON_FIELD_NUMBER: _ClassVar[int]
    RINGS_FIELD_NUMBER: _ClassVar[int]
    control_json: str
    enabled: bool
    selection_json: str
    rings: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, control_json: _Optional[str] = ..., enabled: _Optional[bool] = ..., selection_json: _Optional[str] = ..., rings: _Optional[_Iterable[str]] = ...) -> None: ...

class RingControlResult(_message.Message):
    __slots__ = ("ring", "control_seq", "error")
    RING_FIELD_NUMBER: _ClassVar[int]
    CONTROL_SEQ_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ring: str
    control_seq: int
    error: str
    def __init__(self, ring: _Optional[str] = ..., control_seq: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class SetCaptureResponse(_message.Message):
    __slots__ = ("results", "control_json")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    CONTROL_JSON_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[RingControlResult]
    control_json: str
    def __init__(self, results: _Optional[_Iterable[_Union[RingControlResult, _Mapping]]] = ..., control_json: _Optional[str] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RingStatus(_message.Message):
    __slots__ = ("ring", "path", "state", "reason", "pod", "node", "model_id", "pid", "tp_rank", "generation", "fill", "capacity", "producer_alive", "frames_committed", "frames_dropped_by_producer", "frames_released", "frames_pending", "frames_dropped_by_reason", "records_published", "bytes_published", "messages_published", "records_per_second", "bytes_per_second", "control_seq", "control_json", "oldest_undelivered_age_seconds")
    class FramesDroppedByReasonEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    RING_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    POD_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    TP_RANK_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    FILL_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    PRODUCER_ALIVE_FIELD_NUMBER: _ClassVar[int]
    FRAMES_COMMITTED_FIELD_NUMBER: _ClassVar[int]
    FRAMES_DROPPED_BY_PRODUCER_FIELD_NUMBER: _ClassVar[int]
    FRAMES_RELEASED_FIELD_NUMBER: _ClassVar[int]
    FRAMES_PENDING_FIELD_NUMBER: _ClassVar[int]
    FRAMES_DROPPED_BY_REASON_FIELD_NUMBER: _ClassVar[int]
    RECORDS_PUBLISHED_FIELD_NUMBER: _ClassVar[int]
    BYTES_PUBLISHED_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_PUBLISHED_FIELD_NUMBER: _ClassVar[int]
    RECORDS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    CONTROL_SEQ_FIELD_NUMBER: _ClassVar[int]
    CONTROL_JSON_FIELD_NUMBER: _ClassVar[int]
    OLDEST_UNDELIVERED_AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ring: str
    path: str
    state: str
    reason: str
    pod: str
    node: str
    model_id: str
    pid: int
    tp_rank: int
    generation: int
    fill: float
    capacity: int
    producer_alive: bool
    frames_committed: int
    frames_dropped_by_producer: int
    frames_released: int
    frames_pending: int
    frames_dropped_by_reason: _containers.ScalarMap[str, int]
    records_published: int
    bytes_published: int
    messages_published: int
    records_per_second: float
    bytes_per_second: float
    control_seq: int
    control_json: str
    oldest_undelivered_age_seconds: float
    def __init__(self, ring: _Optional[str] = ..., path: _Optional[str] = ..., state: _Optional[str] = ..., reason: _Optional[str] = ..., pod: _Optional[str] = ..., node: _Optional[str] = ..., model_id: _Optional[str] = ..., pid: _Optional[int] = ..., tp_rank: _Optional[int] = ..., generation: _Optional[int] = ..., fill: _Optional[float] = ..., capacity: _Optional[int] = ..., producer_alive: _Optional[bool] = ..., frames_committed: _Optional[int] = ..., frames_dropped_by_producer: _Optional[int] = ..., frames_released: _Optional[int] = ..., frames_pending: _Optional[int] = ..., frames_dropped_by_reason: _Optional[_Mapping[str, int]] = ..., records_published: _Optional[int] = ..., bytes_published: _Optional[int] = ..., messages_published: _Optional[int] = ..., records_per_second: _Optional[float] = ..., bytes_per_second: _Optional[float] = ..., control_seq: _Optional[int] = ..., control_json: _Optional[str] = ..., oldest_undelivered_age_seconds: _Optional[float] = ...) -> None: ...

class ExporterStatus(_message.Message):
    __slots__ = ("kafka_connected", "topic", "ring_dir", "rings", "inflight_messages", "inflight_bytes", "kafka_errors", "default_control_json", "uptime_seconds")
    KAFKA_CONNECTED_FIELD_NUMBER: _ClassVar[int]
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    RING_DIR_FIELD_NUMBER: _ClassVar[int]
    RINGS_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_MESSAGES_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    KAFKA_ERRORS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_CONTROL_JSON_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    kafka_connected: bool
    topic: str
    ring_dir: str
    rings: _containers.RepeatedCompositeFieldContainer[RingStatus]
    inflight_messages: int
    inflight_bytes: int
    kafka_errors: int
    default_control_json: str
    uptime_seconds: float
    def __init__(self, kafka_connected: _Optional[bool] = ..., topic: _Optional[str] = ..., ring_dir: _Optional[str] = ..., rings: _Optional[_Iterable[_Union[RingStatus, _Mapping]]] = ..., inflight_messages: _Optional[int] = ..., inflight_bytes: _Optional[int] = ..., kafka_errors: _Optional[int] = ..., default_control_json: _Optional[str] = ..., uptime_seconds: _Optional[float] = ...) -> None: ...
