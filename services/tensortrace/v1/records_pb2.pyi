from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    FLOAT64: _ClassVar[DType]
    INT8: _ClassVar[DType]
    UINT8: _ClassVar[DType]
    INT16: _ClassVar[DType]
    INT32: _ClassVar[DType]
    INT64: _ClassVar[DType]
    BOOL: _ClassVar[DType]
    FLOAT8_E4M3FN: _ClassVar[DType]
    FLOAT8_E5M2: _ClassVar[DType]
    FLOAT8_E4M3FNUZ: _ClassVar[DType]
    FLOAT8_E5M2FNUZ: _ClassVar[DType]
    FLOAT8_E8M0FNU: _ClassVar[DType]

class Encoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENCODING_UNSPECIFIED: _ClassVar[Encoding]
    RAW: _ClassVar[Encoding]
    ZSTD: _ClassVar[Encoding]
    SHUFFLE_ZSTD: _ClassVar[Encoding]
    LZ4: _ClassVar[Encoding]

class Phase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PHASE_UNSPECIFIED: _ClassVar[Phase]
    PREFILL: _ClassVar[Phase]
    DECODE: _ClassVar[Phase]

class PositionsKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POSITIONS_KIND_UNSPECIFIED: _ClassVar[PositionsKind]
    TOKEN_RANGE: _ClassVar[PositionsKind]
    TOKEN_LIST: _ClassVar[PositionsKind]
    NO_TOKEN_AXIS: _ClassVar[PositionsKind]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT16: DType
BFLOAT16: DType
FLOAT64: DType
INT8: DType
UINT8: DType
INT16: DType
INT32: DType
INT64: DType
BOOL: DType
FLOAT8_E4M3FN: DType
FLOAT8_E5M2: DType
FLOAT8_E4M3FNUZ: DType
FLOAT8_E5M2FNUZ: DType
FLOAT8_E8M0FNU: DType
ENCODING_UNSPECIFIED: Encoding
RAW: Encoding
ZSTD: Encoding
SHUFFLE_ZSTD: Encoding
LZ4: Encoding
PHASE_UNSPECIFIED: Phase
PREFILL: Phase
DECODE: Phase
POSITIONS_KIND_UNSPECIFIED: PositionsKind
TOKEN_RANGE: PositionsKind
TOKEN_LIST: PositionsKind
NO_TOKEN_AXIS: PositionsKind

class Producer(_message.Message):
    __slots__ = ("node", "pod", "pid", "tp_rank", "generation")
    NODE_FIELD_NUMBER: _ClassVar[int]
    POD_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    TP_RANK_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    node: str
    pod: str
    pid: int
    tp_rank: int
    generation: int
    def __init__(self, node: _Optional[str] = ..., pod: _Optional[str] = ..., pid: _Optional[int] = ..., tp_rank: _Optional[int] = ..., generation: _Optional[int] = ...) -> None: ...

class TensorRecord(_message.Message):
    __slots__ = ("model_id", "request_id", "trace_id", "span_id", "hook", "layer", "tp_rank", "tp_size", "positions_kind", "token_start", "token_end", "positions", "phase", "step", "dtype", "shape", "encoding", "raw_size", "payload", "capture_time_unix_nano", "export_time_unix_nano", "producer", "seq", "chunk_index", "chunk_count", "chunk_offset", "payload_size")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    SPAN_ID_FIELD_NUMBER: _ClassVar[int]
    HOOK_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    TP_RANK_FIELD_NUMBER: _ClassVar[int]
    TP_SIZE_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_KIND_FIELD_NUMBER: _ClassVar[int]
    TOKEN_START_FIELD_NUMBER: _ClassVar[int]
    TOKEN_END_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    RAW_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    CAPTURE_TIME_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    EXPORT_TIME_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    PRODUCER_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    CHUNK_COUNT_FIELD_NUMBER: _ClassVar[int]
    CHUNK_OFFSET_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SIZE_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    request_id: str
    trace_id: bytes
    span_id: bytes
    hook: str
    layer: int
    tp_rank: int
    tp_size: int
    positions_kind: PositionsKind
    token_start: int
    token_end: int
    positions: _containers.RepeatedScalarFieldContainer[int]
    phase: Phase
    step: int
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    encoding: Encoding
    raw_size: int
    payload: bytes
    capture_time_unix_nano: int
    export_time_unix_nano: int
    producer: Producer
    seq: int
    chunk_index: int
    chunk_count: int
    chunk_offset: int
    payload_size: int
    def __init__(self, model_id: _Optional[str] = ..., request_id: _Optional[str] = ..., trace_id: _Optional[bytes] = ..., span_id: _Optional[bytes] = ..., hook: _Optional[str] = ..., layer: _Optional[int] = ..., tp_rank: _Optional[int] = ..., tp_size: _Optional[int] = ..., positions_kind: _Optional[_Union[PositionsKind, str]] = ..., token_start: _Optional[int] = ..., token_end: _Optional[int] = ..., positions: _Optional[_Iterable[int]] = ..., phase: _Optional[_Union[Phase, str]] = ..., step: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., encoding: _Optional[_Union[Encoding, str]] = ..., raw_size: _Optional[int] = ..., payload: _Optional[bytes] = ..., capture_time_unix_nano: _Optional[int] = ..., export_time_unix_nano: _Optional[int] = ..., producer: _Optional[_Union[Producer, _Mapping]] = ..., seq: _Optional[int] = ..., chunk_index: _Optional[int] = ..., chunk_count: _Optional[int] = ..., chunk_offset: _Optional[int] = ..., payload_size: _Optional[int] = ...) -> None: ...

class RequestSummary(_message.Message):
    __slots__ = ("model_id", "request_id", "trace_id", "span_id", "producer", "seq", "records_captured", "records_dropped", "dropped_by_reason", "bytes_captured", "complete", "incomplete_reason", "prompt_tokens", "generated_tokens", "finish_reason", "hooks", "start_time_unix_nano", "end_time_unix_nano", "export_time_unix_nano", "sampled", "producers")
    class DroppedByReasonEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    SPAN_ID_FIELD_NUMBER: _ClassVar[int]
    PRODUCER_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    RECORDS_CAPTURED_FIELD_NUMBER: _ClassVar[int]
    RECORDS_DROPPED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_BY_REASON_FIELD_NUMBER: _ClassVar[int]
    BYTES_CAPTURED_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    INCOMPLETE_REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    HOOKS_FIELD_NUMBER: _ClassVar[int]
    START_TIME_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    END_TIME_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    EXPORT_TIME_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_FIELD_NUMBER: _ClassVar[int]
    PRODUCERS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    request_id: str
    trace_id: bytes
    span_id: bytes
    producer: Producer
    seq: int
    records_captured: int
    records_dropped: int
    dropped_by_reason: _containers.ScalarMap[str, int]
    bytes_captured: int
    complete: bool
    incomplete_reason: str
    prompt_tokens: int
    generated_tokens: int
    finish_reason: str
    hooks: _containers.RepeatedScalarFieldContainer[str]
    start_time_unix_nano: int
    end_time_unix_nano: int
    export_time_unix_nano: int
    sampled: bool
    producers: int
    def __init__(self, model_id: _Optional[str] = ..., request_id: _Optional[str] = ..., trace_id: _Optional[bytes] = ..., span_id: _Optional[bytes] = ..., producer: _Optional[_Union[Producer, _Mapping]] = ..., seq: _Optional[int] = ..., records_captured: _Optional[int] = ..., records_dropped: _Optional[int] = ..., dropped_by_reason: _Optional[_Mapping[str, int]] = ..., bytes_captured: _Optional[int] = ..., complete: _Optional[bool] = ..., incomplete_reason: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., generated_tokens: _Optional[int] = ..., finish_reason: _Optional[str] = ..., hooks: _Optional[_Iterable[str]] = ..., start_time_unix_nano: _Optional[int] = ..., end_time_unix_nano: _Optional[int] = ..., export_time_unix_nano: _Optional[int] = ..., sampled: _Optional[bool] = ..., producers: _Optional[int] = ...) -> None: ...

class Record(_message.Message):
    __slots__ = ("tensor", "summary")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    tensor: TensorRecord
    summary: RequestSummary
    def __init__(self, tensor: _Optional[_Union[TensorRecord, _Mapping]] = ..., summary: _Optional[_Union[RequestSummary, _Mapping]] = ...) -> None: ...

class Envelope(_message.Message):
    __slots__ = ("version", "records")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    version: int
    records: _containers.RepeatedCompositeFieldContainer[Record]
    def __init__(self, version: _Optional[int] = ..., records: _Optional[_Iterable[_Union[Record, _Mapping]]] = ...) -> None: ...

class ProbeScore(_message.Message):
    __slots__ = ("model_id", "request_id", "trace_id", "span_id", "probe", "probe_hash", "score", "threshold", "flagged", "shadow", "complete", "incomplete_reason", "hook", "layers", "pooling", "tokens_scored", "token_scores", "token_positions", "request_end_time_unix_nano", "scored_time_unix_nano", "release")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    SPAN_ID_FIELD_NUMBER: _ClassVar[int]
    PROBE_FIELD_NUMBER: _ClassVar[int]
    PROBE_HASH_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    FLAGGED_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    INCOMPLETE_REASON_FIELD_NUMBER: _ClassVar[int]
    HOOK_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    POOLING_FIELD_NUMBER: _ClassVar[int]
    TOKENS_SCORED_FIELD_NUMBER: _ClassVar[int]
    TOKEN_SCORES_FIELD_NUMBER: _ClassVar[int]
    TOKEN_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_END_TIME_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    SCORED_TIME_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    request_id: str
    trace_id: bytes
    span_id: bytes
    probe: str
    probe_hash: str
    score: float
    threshold: float
    flagged: bool
    shadow: bool
    complete: bool
    incomplete_reason: str
    hook: str
    layers: _containers.RepeatedScalarFieldContainer[int]
    pooling: str
    tokens_scored: int
    token_scores: _containers.RepeatedScalarFieldContainer[float]
    token_positions: _containers.RepeatedScalarFieldContainer[int]
    request_end_time_unix_nano: int
    scored_time_unix_nano: int
    release: str
    def __init__(self, model_id: _Optional[str] = ..., request_id: _Optional[str] = ..., trace_id: _Optional[bytes] = ..., span_id: _Optional[bytes] = ..., probe: _Optional[str] = ..., probe_hash: _Optional[str] = ..., score: _Optional[float] = ..., threshold: _Optional[float] = ..., flagged: _Optional[bool] = ..., shadow: _Optional[bool] = ..., complete: _Optional[bool] = ..., incomplete_reason: _Optional[str] = ..., hook: _Optional[str] = ..., layers: _Optional[_Iterable[int]] = ..., pooling: _Optional[str] = ..., tokens_scored: _Optional[int] = ..., token_scores: _Optional[_Iterable[float]] = ..., token_positions: _Optional[_Iterable[int]] = ..., request_end_time_unix_nano: _Optional[int] = ..., scored_time_unix_nano: _Optional[int] = ..., release: _Optional[str] = ...) -> None: ...
